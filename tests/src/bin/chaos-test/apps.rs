//! The allot processes the chaos test owns: one `allot-api` and two `allot-worker` replicas,
//! started through the kit ([`Process`]) so that they can be SIGKILLed and SIGTERMed, and so
//! that their pid files sit in the chaos copy's run folder, where its `down` finds them even if
//! the chaos test died.

use allot_tests::system::{Process, Services, Spawn};
use anyhow::Result;
use std::path::PathBuf;

/// One of the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    WorkerA,
    WorkerB,
}

impl Role {
    /// The name of its log and pid files.
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

/// Starts `role`'s process.
pub fn spawn(role: Role, env: &AppEnv, services: &Services) -> Result<Process> {
    let mut vars = env.vars.clone();
    if role != Role::Api {
        // Two workers on one machine: their health servers must not share a port, and the
        // chaos test does not read them.
        vars.push(("ALLOT_WORKER_HTTP_ADDR".into(), "127.0.0.1:0".into()));
    }
    Process::spawn(&Spawn {
        name: role.name().into(),
        binary: env.bin_dir.join(role.binary()),
        args: Vec::new(),
        env: vars,
        run_dir: services.run_dir(),
        log_dir: services.logs(),
    })
}
