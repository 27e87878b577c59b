//! The allot processes the chaos test owns: one `allot-api` and two `allot-worker` replicas,
//! spawned as children so that they can be SIGKILLed and SIGTERMed. Their pid files go where
//! `deploy/local.sh down` looks, so a copy left behind by a crashed run is still stopped.

use crate::services::Services;
use anyhow::{Context as _, Result, bail};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// One of the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    WorkerA,
    WorkerB,
}

impl Role {
    /// The name in `deploy/local.sh`'s pid files and logs (its command name is the suffix).
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "chaos-api",
            Role::WorkerA => "chaos-a-worker",
            Role::WorkerB => "chaos-b-worker",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Role::Api => "allot-api",
            Role::WorkerA | Role::WorkerB => "allot-worker",
        }
    }
}

/// How the allot processes are configured.
#[derive(Debug, Clone)]
pub struct AppEnv {
    pub bin_dir: PathBuf,
    pub vars: Vec<(String, String)>,
}

/// A running allot process.
pub struct App {
    role: Role,
    child: Child,
    pid_file: PathBuf,
}

impl App {
    pub async fn spawn(role: Role, env: &AppEnv, services: &Services) -> Result<App> {
        let binary = env.bin_dir.join(role.binary());
        let log_path = services.logs().join(format!("{}.log", role.name()));
        std::fs::create_dir_all(services.logs())?;
        std::fs::create_dir_all(services.run_dir())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = Command::new(&binary);
        command.envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if role != Role::Api {
            // Two workers on one machine: their health servers must not share a port, and the
            // chaos test does not read them.
            command.env("ALLOT_WORKER_HTTP_ADDR", "127.0.0.1:0");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("a fresh child has a pid")?;
        let pid_file = services.run_dir().join(format!("{}.pid", role.name()));
        std::fs::write(&pid_file, format!("{pid}\n"))?;
        Ok(App {
            role,
            child,
            pid_file,
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Fails if the process exited.
    pub fn ensure_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly ({status})", self.role.name());
        }
        Ok(())
    }

    /// SIGKILL, the crash.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("SIGKILL")?;
        let _ = std::fs::remove_file(&self.pid_file);
        Ok(())
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (status 0).
    pub async fn terminate(mut self, grace: Duration) -> Result<Duration> {
        let pid = self.child.id().context("the process already exited")?;
        let started = std::time::Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        let exit = tokio::time::timeout(grace, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "{} did not exit within {grace:?} of SIGTERM",
                    self.role.name()
                )
            })??;
        let _ = std::fs::remove_file(&self.pid_file);
        anyhow::ensure!(
            exit.success(),
            "{} exited with {exit} after SIGTERM",
            self.role.name()
        );
        Ok(started.elapsed())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
