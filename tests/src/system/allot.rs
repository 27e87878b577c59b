//! One running allot: an `allot-api` and an `allot-worker`, from release binaries, as
//! production runs them.

use super::process::{Process, Spawn};
use crate::client::Api;
use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// How long a fresh process gets to answer `/readyz`.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone)]
pub struct AllotSpec {
    /// The names of its processes (of their logs and pid files): `functional-api`, ...
    pub api_name: String,
    pub worker_name: String,
    /// Where `allot-api` and `allot-worker` are.
    pub bin_dir: PathBuf,
    /// The environment of both (database, broker, Redis, token, settings).
    pub env: Vec<(String, String)>,
    /// `host:port` of the API.
    pub api_addr: String,
    /// `host:port` of the worker's `/healthz`, `/readyz` and `/metrics`.
    pub worker_addr: String,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
}

/// A running API and worker; both are stopped when this is dropped.
pub struct Allot {
    pub api: Process,
    pub worker: Process,
    pub base_url: String,
    pub worker_url: String,
}

impl Allot {
    /// Starts the API, waits until it is ready, then the worker, and waits until it is ready
    /// too. The API first: it declares every partition queue before it is ready, and two
    /// processes declaring the same fresh quorum queues at once on a new vhost made RabbitMQ
    /// close the worker's connection (INTERNAL_ERROR, or noproc on 3.10).
    pub async fn start(spec: &AllotSpec) -> Result<Allot> {
        let process = |name: &str, role: &str, addr_var: &str, addr: &str| {
            let mut env = spec.env.clone();
            env.push((addr_var.to_owned(), addr.to_owned()));
            Spawn {
                name: name.to_owned(),
                binary: spec.bin_dir.join(format!("allot-{role}")),
                args: Vec::new(),
                env,
                run_dir: spec.run_dir.clone(),
                log_dir: spec.log_dir.clone(),
            }
        };
        let base_url = format!("http://{}", spec.api_addr);
        let worker_url = format!("http://{}", spec.worker_addr);
        let mut api = Process::spawn(&process(
            &spec.api_name,
            "api",
            "ALLOT_HTTP_ADDR",
            &spec.api_addr,
        ))?;
        println!(
            "==> started {} (pid {}), log {}",
            api.name(),
            api.pid(),
            api.log().display()
        );
        wait_ready(&base_url, &mut [&mut api]).await?;
        let mut worker = Process::spawn(&process(
            &spec.worker_name,
            "worker",
            "ALLOT_WORKER_HTTP_ADDR",
            &spec.worker_addr,
        ))?;
        println!(
            "==> started {} (pid {}), log {}",
            worker.name(),
            worker.pid(),
            worker.log().display()
        );
        wait_ready(&worker_url, &mut [&mut api, &mut worker]).await?;
        Ok(Allot {
            api,
            worker,
            base_url,
            worker_url,
        })
    }

    /// SIGTERM to both (SIGKILL after 10 s).
    pub async fn stop(self) {
        let Allot { api, worker, .. } = self;
        api.stop(Duration::from_secs(10)).await;
        worker.stop(Duration::from_secs(10)).await;
    }

    /// Leaves both running after we are gone.
    pub fn detach(self) {
        self.api.detach();
        self.worker.detach();
    }

    /// The last lines of both logs, for a failure report.
    pub fn show_logs(&self) {
        show_log(self.api.log());
        show_log(self.worker.log());
    }
}

/// Waits until `<base>/readyz` answers 200 while `processes` run; on failure (a process exited,
/// or a minute passed) prints their logs.
pub async fn wait_ready(base: &str, processes: &mut [&mut Process]) -> Result<()> {
    println!("==> waiting for {base}/readyz");
    let api = Api::new(base, None, 1)?;
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if api.ready().await {
            return Ok(());
        }
        let exited = processes.iter_mut().find_map(|p| p.ensure_alive().err());
        if exited.is_some() || Instant::now() >= deadline {
            for process in processes.iter() {
                show_log(process.log());
            }
            return Err(exited.unwrap_or_else(|| anyhow::anyhow!("{READY_WITHIN:?} passed")))
                .with_context(|| format!("{base}/readyz did not answer 200"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the last 40 lines of a log to stderr.
pub fn show_log(path: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("\n----- last lines of {} -----", path.display());
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{line}");
    }
}
