//! `xtask`: allot's dev and CI tasks, one module each (the cargo-xtask convention), behind
//! `deploy/local.sh`. The script does what belongs in shell (root, apt-get, cargo build) and
//! hands over to this binary; this binary holds the copy's state folder and port map, runs the
//! services through `deploy/services.sh` (a leaf), runs allot's processes, and runs the whole
//! test pipeline. Nothing it runs calls back into `deploy/local.sh`.
//!
//! - [`services`]: `services`, `status`, `env`, `down`, `rabbitmqctl`;
//! - [`up`]: `up`, a long-running allot on the copy;
//! - [`test`]: `test`, the pipeline CI runs (its steps in [`tools`] for the Node and Python
//!   tools, [`bench`] for the benchmark);
//! - [`bench`]: `bench`, the benchmark on a fresh allot;
//! - [`run`]: running commands and numbered steps.
//!
//! The environment it reads: `ALLOT_LOCAL_STATE` (the state folder, default `<repo>/.allot`),
//! `ALLOT_LOCAL_PORT_OFFSET` (see `allot_tests::ports`), `ALLOT_CHAOS_STATE` and
//! `ALLOT_CHAOS_PORT_OFFSET` (the chaos test's copy), `ALLOT_ADMIN_TOKEN` (`up`), `CI`.

mod bench;
mod run;
mod services;
mod test;
mod tools;
mod up;

use allot_tests::ports::PortMap;
use allot_tests::system::Services;
use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: deploy/local.sh COMMAND (as root)

  up        services, release build, then allot-api and allot-worker in the background
            (restarted when already running; admin token in <state>/admin-token unless
            ALLOT_ADMIN_TOKEN is set)
  test      services, fmt, clippy, cargo tests, the functional test against a fresh allot,
            then against another fresh one the Postman collection (newman), the web page in
            headless Chromium, schemathesis, the JSON-log and docker-compose checks; then the
            benchmark's smoke form and the chaos test (short form) on services of its own.
            The services stay up afterwards, except with CI=true
  bench [--smoke] [bench flags]
            services, release build, the benchmark (tests/src/bin/bench) against a fresh allot;
            --smoke is the tiny form `test` runs (figures meaningless)
  services  just the services (and the integration tests' vhost)
  status    what runs
  env       the services' URLs as shell exports: eval \"$(deploy/local.sh env)\"
  rabbitmqctl ARGS...
            rabbitmqctl against the copy's node
  down      stop everything started on this copy (and on its chaos copy)

ALLOT_LOCAL_STATE (default .allot) and ALLOT_LOCAL_PORT_OFFSET (default 0) choose the copy.";

/// One copy of allot on this machine: where its state is, its ports, its chaos copy.
#[derive(Clone)]
pub struct Local {
    pub repo: PathBuf,
    pub state: PathBuf,
    pub ports: PortMap,
    pub chaos_state: PathBuf,
    pub chaos_ports: PortMap,
    /// Where the release binaries are (this binary's folder).
    pub bin_dir: PathBuf,
    /// `CI=true`: nothing outlives a `test` run.
    pub ci: bool,
}

impl Local {
    fn from_env() -> Result<Local> {
        let repo = match std::env::var_os("ALLOT_REPO") {
            Some(repo) => PathBuf::from(repo),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
        };
        let repo = repo.canonicalize().unwrap_or(repo);
        let state = match std::env::var_os("ALLOT_LOCAL_STATE") {
            Some(state) if !state.is_empty() => PathBuf::from(state),
            _ => repo.join(".allot"),
        };
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        let state = state.canonicalize()?;
        let ports = PortMap::from_env()?;
        let chaos_state = match std::env::var_os("ALLOT_CHAOS_STATE") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => state.join("chaos"),
        };
        let chaos_ports = match std::env::var("ALLOT_CHAOS_PORT_OFFSET") {
            Ok(raw) if !raw.is_empty() => PortMap::new(raw.parse().with_context(|| {
                format!("ALLOT_CHAOS_PORT_OFFSET must be a number, not {raw:?}")
            })?)?,
            _ => ports.chaos()?,
        };
        let bin_dir = std::env::current_exe()?
            .parent()
            .context("this binary has a folder")?
            .to_owned();
        Ok(Local {
            repo,
            state,
            ports,
            chaos_state,
            chaos_ports,
            bin_dir,
            ci: std::env::var("CI").is_ok_and(|ci| ci == "true"),
        })
    }

    /// The copy's services, talking on the terminal.
    pub fn services(&self) -> Services {
        Services::new(&self.repo, self.state.clone(), self.ports)
    }

    /// The chaos test's copy.
    pub fn chaos_services(&self) -> Services {
        Services::new(&self.repo, self.chaos_state.clone(), self.chaos_ports).quiet()
    }

    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    /// What `test` keeps for people to look at (screenshots, the smoke run's chart).
    pub fn artifacts(&self) -> PathBuf {
        self.state.join("artifacts")
    }

    /// A release binary beside this one.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// A signal that ends the run: its exit code.
async fn interrupted() -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => 130,
        _ = terminate.recv() => 143,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "help".into());
    let rest: Vec<String> = args.collect();
    if matches!(command.as_str(), "help" | "-h" | "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let local = match Local::from_env() {
        Ok(local) => local,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
    let work = async {
        match command.as_str() {
            "services" => services::services(&local).await,
            "status" => services::status(&local).await,
            "env" => services::env(&local),
            "down" => services::down(&local).await,
            "rabbitmqctl" => services::rabbitmqctl(&local, &rest).await,
            "up" => up::up(&local).await,
            "test" => test::test(&local).await,
            "bench" => bench::bench(&local, &rest).await,
            other => {
                eprintln!("{USAGE}");
                anyhow::bail!("unknown command {other:?}")
            }
        }
    };
    // The command is dropped on a signal: its children die with it (kill on drop); what it
    // started in the background is stopped by its own cleanup below.
    let (outcome, code) = tokio::select! {
        outcome = work => (outcome, 1),
        code = interrupted() => (Err(anyhow::anyhow!("interrupted")), code),
    };
    if command == "test" {
        test::cleanup(&local).await;
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(code)
        }
    }
}
