//! The chaos test's own copy of PostgreSQL, Redis and RabbitMQ, driven through `deploy/local.sh`
//! with a state folder and a port offset of their own, so that stopping and killing them never
//! touches anybody else's services.

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::process::Command;

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    RabbitMq,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Service::Postgres => "PostgreSQL",
            Service::Redis => "Redis",
            Service::RabbitMq => "RabbitMQ",
        })
    }
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Postgres => "postgres",
            Service::Redis => "redis",
            Service::RabbitMq => "rabbitmq",
        }
    }
}

/// `deploy/local.sh` bound to the chaos copy.
#[derive(Debug, Clone)]
pub struct Services {
    script: PathBuf,
    pub state: PathBuf,
    pub offset: u16,
}

impl Services {
    pub fn new(repo: &Path, state: PathBuf, offset: u16) -> Self {
        Self {
            script: repo.join("deploy/local.sh"),
            state,
            offset,
        }
    }

    pub fn database_admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            55432 + self.offset
        )
    }

    pub fn database_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/allot",
            55432 + self.offset
        )
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", 55672 + self.offset)
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", 56379 + self.offset)
    }

    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", 8080 + self.offset)
    }

    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    /// Runs `deploy/local.sh args...` for this copy; its output goes to `logs/chaos-local.log`.
    async fn local(&self, args: &[&str]) -> Result<()> {
        std::fs::create_dir_all(self.logs())?;
        let log_path = self.logs().join("chaos-local.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let status = Command::new(&self.script)
            .args(args)
            .env("ALLOT_LOCAL_STATE", &self.state)
            .env("ALLOT_LOCAL_PORT_OFFSET", self.offset.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .status()
            .await
            .with_context(|| format!("running deploy/local.sh {}", args.join(" ")))?;
        if !status.success() {
            bail!(
                "deploy/local.sh {} failed ({status}); see {}",
                args.join(" "),
                log_path.display()
            );
        }
        Ok(())
    }

    /// Stops whatever an earlier run left, wipes the state and starts fresh services.
    pub async fn fresh(&self) -> Result<()> {
        self.down().await?;
        for dir in ["pg", "redis", "rabbitmq", "run"] {
            let path = self.state.join(dir);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        // A port of ours inside the ephemeral range can be taken for a moment by somebody's
        // outgoing connection: then the start fails, and a later retry works.
        let mut attempt = 1;
        loop {
            match self.local(&["services"]).await {
                Ok(()) => return Ok(()),
                Err(err) if attempt < 5 => {
                    println!("    starting the services failed ({err:#}); retrying");
                    self.down().await?;
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub async fn down(&self) -> Result<()> {
        self.local(&["down"]).await
    }

    pub async fn stop(&self, service: Service) -> Result<()> {
        self.timed("stop-service", service).await
    }

    pub async fn start(&self, service: Service) -> Result<()> {
        self.timed("start-service", service).await
    }

    pub async fn kill(&self, service: Service) -> Result<()> {
        self.timed("kill-service", service).await
    }

    async fn timed(&self, what: &str, service: Service) -> Result<()> {
        let started = Instant::now();
        self.local(&[what, service.name()]).await?;
        println!(
            "    {what} {} ({:.1} s)",
            service.name(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
