//! The allot processes the chaos test owns: `allot-api` and two `allot-worker` replicas (in
//! the cluster form two API instances and three workers), started through the kit
//! ([`Process`]) so that they can be SIGKILLed and SIGTERMed, and so that their pid files sit
//! in the chaos copy's run folder, where its `down` finds them even if the chaos test died.

use allot_tests::system::{Process, Services, Spawn, rotate_brokers};
use anyhow::Result;
use std::path::PathBuf;

/// One of the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    /// The second API instance (cluster form).
    ApiB,
    WorkerA,
    WorkerB,
    /// The third worker (cluster form).
    WorkerC,
}

impl Role {
    /// The name of its log and pid files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "chaos-api",
            Role::ApiB => "chaos-b-api",
            Role::WorkerA => "chaos-a-worker",
            Role::WorkerB => "chaos-b-worker",
            Role::WorkerC => "chaos-c-worker",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Role::Api | Role::ApiB => "allot-api",
            Role::WorkerA | Role::WorkerB | Role::WorkerC => "allot-worker",
        }
    }

    pub fn is_api(self) -> bool {
        matches!(self, Role::Api | Role::ApiB)
    }
}

/// How the allot processes are configured.
#[derive(Debug, Clone)]
pub struct AppEnv {
    pub bin_dir: PathBuf,
    pub vars: Vec<(String, String)>,
    /// `host:port` of the second API instance.
    pub api_b_addr: String,
}

/// Starts `role`'s process.
pub fn spawn(role: Role, env: &AppEnv, services: &Services) -> Result<Process> {
    let mut vars = env.vars.clone();
    match role {
        Role::Api => {}
        Role::ApiB => vars.push(("ALLOT_HTTP_ADDR".into(), env.api_b_addr.clone())),
        // Several workers on one machine: their health servers must not share a port, and the
        // chaos test does not read them.
        _ => vars.push(("ALLOT_WORKER_HTTP_ADDR".into(), "127.0.0.1:0".into())),
    }
    // Each instance lists the nodes from a different one on: their connections are spread.
    let first = match role {
        Role::Api | Role::WorkerA => 0,
        Role::ApiB | Role::WorkerB => 1,
        Role::WorkerC => 2,
    };
    rotate_brokers(&mut vars, first);
    Process::spawn(&Spawn {
        name: role.name().into(),
        binary: env.bin_dir.join(role.binary()),
        args: Vec::new(),
        env: vars,
        run_dir: services.run_dir(),
        log_dir: services.logs(),
    })
}
