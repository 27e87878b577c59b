//! A copy's PostgreSQL, Redis and RabbitMQ: private instances on the ports of its [`PortMap`],
//! with their data under its state folder. Starting and stopping them as their own users is
//! root's work and shell's (`deploy/services.sh`, a leaf that calls nothing back); everything
//! else (which ports, which folder, databases, vhosts, Redis databases) is decided here.

use super::process;
use crate::ports::{Deployment, MAX_RABBITMQ_NODES, PortMap, RabbitNode};
use anyhow::{Context as _, Result, bail};
use sqlx::Connection as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// The folder under the state folder that holds a cluster's Erlang cookie (its nodes' and
/// rabbitmqctl's home).
const CLUSTER_HOME: &str = "rabbitmq-cluster";

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    RabbitMq,
}

impl Service {
    /// In the order they start (and the reverse of the order they stop).
    pub const ALL: [Service; 3] = [Service::Postgres, Service::Redis, Service::RabbitMq];

    /// Its name for `deploy/services.sh`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Postgres => "postgres",
            Service::Redis => "redis",
            Service::RabbitMq => "rabbitmq",
        }
    }
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

/// The services of one copy: its state folder and its ports.
#[derive(Debug, Clone)]
pub struct Services {
    script: PathBuf,
    state: PathBuf,
    ports: PortMap,
    /// Where the script's output goes: the terminal, or `<state>/logs/services.log`.
    quiet: bool,
    /// Held by every run of the script, shared by every `Services` of the same state folder in
    /// this process: a start still running when its caller was dropped (a signal, a deadline,
    /// a failed step) finishes before `down` stops the services, so that nothing it starts is
    /// left behind.
    busy: Arc<Mutex<()>>,
}

impl Services {
    /// The services of the copy at `state` on `ports`; `repo` is the repository's root.
    pub fn new(repo: &Path, state: PathBuf, ports: PortMap) -> Services {
        Services {
            script: repo.join("deploy/services.sh"),
            busy: busy_lock(&state),
            state,
            ports,
            quiet: false,
        }
    }

    /// The script's output goes to `<state>/logs/services.log` instead of the terminal.
    pub fn quiet(mut self) -> Services {
        self.quiet = true;
        self
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    pub fn ports(&self) -> PortMap {
        self.ports
    }

    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }

    /// Where the pid files of the processes started on this copy go.
    pub fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    /// The copy's RabbitMQ nodes (one, or a cluster's), node 1 first.
    pub fn rabbitmq_nodes(&self) -> Vec<RabbitNode> {
        self.ports.rabbitmq_cluster()
    }

    /// Node `index` (1, 2, ...) of the copy's RabbitMQ.
    pub fn rabbitmq_node(&self, index: u8) -> Result<RabbitNode> {
        self.rabbitmq_nodes()
            .into_iter()
            .find(|node| node.index == index)
            .with_context(|| format!("the copy has no RabbitMQ node {index}"))
    }

    /// `deploy/services.sh args...` for the first RabbitMQ node.
    fn command(&self, args: &[&str]) -> Result<Command> {
        self.command_for(&self.rabbitmq_nodes()[0], args)
    }

    /// `deploy/services.sh args...` with `node` as its RabbitMQ node.
    fn command_for(&self, node: &RabbitNode, args: &[&str]) -> Result<Command> {
        let ports = self.ports;
        let mut command = Command::new(&self.script);
        command
            .args(args)
            .env("ALLOT_STATE", &self.state)
            .env("ALLOT_PG_PORT", ports.postgres().to_string())
            .env("ALLOT_REDIS_PORT", ports.redis().to_string())
            .env("ALLOT_RABBITMQ_PORT", node.amqp_port.to_string())
            .env("ALLOT_RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("ALLOT_EPMD_PORT", ports.epmd().to_string())
            .env("ALLOT_RABBITMQ_NODE", &node.name)
            .env("ALLOT_RABBITMQ_DIR", &node.dir)
            .stdin(Stdio::null());
        if node.clustered {
            command.env("ALLOT_RABBITMQ_HOME", CLUSTER_HOME);
        }
        if self.quiet {
            std::fs::create_dir_all(self.logs())?;
            let log = self.logs().join("services.log");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        Ok(command)
    }

    /// Runs `deploy/services.sh args...` (for `node`, else the first RabbitMQ node), blocking.
    fn script_blocking(&self, node: Option<&RabbitNode>, args: &[&str]) -> Result<()> {
        let _busy = self
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.run_script(node, args)
    }

    /// Runs `deploy/services.sh args...`; the caller holds `busy`.
    fn run_script(&self, node: Option<&RabbitNode>, args: &[&str]) -> Result<()> {
        let command = match node {
            Some(node) => self.command_for(node, args),
            None => self.command(args),
        };
        let status = command?
            .status()
            .with_context(|| format!("running {} {}", self.script.display(), args.join(" ")))?;
        if !status.success() {
            let log = if self.quiet {
                format!("; see {}", self.logs().join("services.log").display())
            } else {
                String::new()
            };
            bail!(
                "deploy/services.sh {} failed ({status}){log}",
                args.join(" ")
            );
        }
        Ok(())
    }

    async fn script(&self, args: &[&str]) -> Result<()> {
        self.script_on(None, args).await
    }

    /// Runs `deploy/services.sh args...` with `node` (else the first) as its RabbitMQ node.
    async fn script_on(&self, node: Option<&RabbitNode>, args: &[&str]) -> Result<()> {
        let services = self.clone();
        let node = node.cloned();
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            services.script_blocking(node.as_ref(), &args)
        })
        .await?
    }

    /// Runs `deploy/services.sh args...` and returns what it printed.
    async fn script_output(&self, args: &[&str]) -> Result<String> {
        self.script_output_on(&self.rabbitmq_nodes()[0], args).await
    }

    /// Runs `deploy/services.sh args...` with `node` as its RabbitMQ node and returns what it
    /// printed.
    async fn script_output_on(&self, node: &RabbitNode, args: &[&str]) -> Result<String> {
        let mut command = tokio::process::Command::from(self.command_for(node, args)?);
        let output = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .with_context(|| format!("running deploy/services.sh {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "deploy/services.sh {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts it (RabbitMQ: every node, a cluster's joined into one).
    pub async fn start(&self, service: Service) -> Result<()> {
        if service == Service::RabbitMq && self.ports.clustered() {
            return self.start_cluster().await;
        }
        self.script(&["start", service.name()]).await
    }

    /// Stops it cleanly (PostgreSQL: a fast shutdown, which cuts its sessions; RabbitMQ: every
    /// node, the first last).
    pub async fn stop(&self, service: Service) -> Result<()> {
        if service == Service::RabbitMq {
            for node in self.rabbitmq_nodes().iter().rev() {
                self.script_on(Some(node), &["stop", "rabbitmq"]).await?;
            }
            return Ok(());
        }
        self.script(&["stop", service.name()]).await
    }

    /// SIGKILL, as a crash of the machine would (PostgreSQL: with its children; RabbitMQ:
    /// the first node).
    pub async fn kill(&self, service: Service) -> Result<()> {
        self.script(&["kill", service.name()]).await
    }

    /// Its pid, if it runs (RabbitMQ: the first node's).
    pub async fn pid(&self, service: Service) -> Option<u32> {
        let output = self.script_output(&["pid", service.name()]).await.ok()?;
        output.trim().parse().ok()
    }

    /// Starts RabbitMQ node `index` (1, 2, ...) and waits until it answers. A cluster's node
    /// that was stopped or killed rejoins its cluster by itself.
    pub async fn start_node(&self, index: u8) -> Result<()> {
        let node = self.rabbitmq_node(index)?;
        self.script_on(Some(&node), &["start", "rabbitmq"]).await
    }

    /// Stops RabbitMQ node `index` cleanly.
    pub async fn stop_node(&self, index: u8) -> Result<()> {
        let node = self.rabbitmq_node(index)?;
        self.script_on(Some(&node), &["stop", "rabbitmq"]).await
    }

    /// SIGKILLs RabbitMQ node `index`.
    pub async fn kill_node(&self, index: u8) -> Result<()> {
        let node = self.rabbitmq_node(index)?;
        self.script_on(Some(&node), &["kill", "rabbitmq"]).await
    }

    /// The pid of RabbitMQ node `index`, if it runs.
    pub async fn node_pid(&self, index: u8) -> Option<u32> {
        let node = self.rabbitmq_node(index).ok()?;
        let output = self
            .script_output_on(&node, &["pid", "rabbitmq"])
            .await
            .ok()?;
        output.trim().parse().ok()
    }

    /// Starts the cluster: every node launched first, then each waited for (a node whose
    /// peers are all down waits for them before it opens its port), then each node after the
    /// first that is not yet in node 1's cluster joined to it (`stop_app`, `join_cluster`,
    /// `start_app`).
    async fn start_cluster(&self) -> Result<()> {
        let nodes = self.rabbitmq_nodes();
        for node in &nodes {
            self.script_on(Some(node), &["launch", "rabbitmq"]).await?;
        }
        for node in &nodes {
            self.script_on(Some(node), &["start", "rabbitmq"]).await?;
        }
        let first = &nodes[0];
        for node in &nodes[1..] {
            let members = self.cluster_members(node).await?;
            if members.contains(&first.name) {
                continue;
            }
            println!("==> joining {} to {}'s cluster", node.name, first.name);
            self.rabbitmqctl_on(node, &["-q", "stop_app"]).await?;
            self.rabbitmqctl_on(node, &["-q", "join_cluster", &first.name])
                .await?;
            self.rabbitmqctl_on(node, &["-q", "start_app"]).await?;
        }
        let members = self.cluster_members(first).await?;
        for node in &nodes {
            anyhow::ensure!(
                members.contains(&node.name),
                "{} is not in the cluster after joining it ({members:?})",
                node.name
            );
        }
        Ok(())
    }

    /// The nodes of `node`'s cluster, as it sees them (`rabbitmqctl cluster_status`).
    pub async fn cluster_members(&self, node: &RabbitNode) -> Result<Vec<String>> {
        let output = self
            .rabbitmqctl_on(node, &["-q", "cluster_status", "--formatter", "json"])
            .await?;
        let status: serde_json::Value = serde_json::from_str(output.trim())
            .with_context(|| format!("reading the cluster status of {}: {output}", node.name))?;
        let members = status["disk_nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect();
        Ok(members)
    }

    /// Starts all three (those already running are kept).
    pub async fn start_all(&self) -> Result<()> {
        for service in Service::ALL {
            self.start(service).await?;
        }
        Ok(())
    }

    /// Stops every process recorded in the copy's run folder, then the services.
    pub async fn down(&self) -> Result<()> {
        let services = self.clone();
        tokio::task::spawn_blocking(move || services.down_blocking()).await?
    }

    /// [`Services::down`], blocking (for drops and exit paths). Waits for a run of the script
    /// still going (see `busy`).
    pub fn down_blocking(&self) -> Result<()> {
        let _busy = self
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for stopped in process::stop_recorded(&self.run_dir(), Duration::from_secs(10)) {
            if !self.quiet {
                println!("==> stopped {} (pid {})", stopped.name, stopped.pid);
            }
        }
        if self.script.exists() {
            // Every RabbitMQ node the copy ever ran, the single one or a cluster's, whichever
            // mode it is in now: the highest first, so that node 1 stops last and starts first.
            for node in self.known_rabbitmq_nodes().iter().rev() {
                if self.state.join(&node.dir).exists() {
                    self.run_script(Some(node), &["stop", "rabbitmq"])?;
                }
            }
            self.run_script(None, &["down"])?;
        }
        Ok(())
    }

    /// The single node and every node a cluster of this copy may have.
    fn known_rabbitmq_nodes(&self) -> Vec<RabbitNode> {
        let single = PortMap::new(self.ports.offset()).map(PortMap::rabbitmq_cluster);
        let cluster = self
            .ports
            .with_rabbitmq_nodes(MAX_RABBITMQ_NODES)
            .map(PortMap::rabbitmq_cluster);
        single.into_iter().chain(cluster).flatten().collect()
    }

    /// Stops whatever an earlier run left, wipes the services' data and starts them fresh. A
    /// port of ours can be taken for a moment by somebody's outgoing connection: then a start
    /// fails, and a later attempt works.
    pub async fn fresh(&self) -> Result<()> {
        self.down().await?;
        let nodes = self.known_rabbitmq_nodes();
        let node_dirs = nodes.iter().map(|node| node.dir.as_str());
        for dir in ["pg", "redis", "run", CLUSTER_HOME]
            .into_iter()
            .chain(node_dirs)
        {
            let path = self.state.join(dir);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        let mut attempt = 1;
        loop {
            match self.start_all().await {
                Ok(()) => return Ok(()),
                Err(err) if attempt < 5 => {
                    println!("    starting the services failed ({err:#}); retrying");
                    self.down().await?;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `rabbitmqctl args...` against the copy's (first) node; returns its output.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["rabbitmqctl"];
        all.extend_from_slice(args);
        self.script_output(&all).await
    }

    /// `rabbitmq-queues args...` against `node` (`rebalance quorum`: spread the quorum queues'
    /// leaders over the nodes again); returns its output.
    pub async fn rabbitmq_queues_on(&self, node: &RabbitNode, args: &[&str]) -> Result<String> {
        let mut all = vec!["rabbitmq-queues"];
        all.extend_from_slice(args);
        self.script_output_on(node, &all).await
    }

    /// `rabbitmqctl args...` against `node`; returns its output.
    pub async fn rabbitmqctl_on(&self, node: &RabbitNode, args: &[&str]) -> Result<String> {
        let mut all = vec!["rabbitmqctl"];
        all.extend_from_slice(args);
        self.script_output_on(node, &all).await
    }

    /// The vhost, with every permission for guest, created if missing.
    pub async fn ensure_vhost(&self, vhost: &str) -> Result<()> {
        let vhosts = self.rabbitmqctl(&["-q", "list_vhosts", "name"]).await?;
        if !vhosts.lines().any(|line| line.trim() == vhost) {
            self.rabbitmqctl(&["-q", "add_vhost", vhost]).await?;
        }
        self.rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ])
        .await?;
        Ok(())
    }

    /// The vhost, deleted if it exists (with its queues) and created empty.
    pub async fn recreate_vhost(&self, vhost: &str) -> Result<()> {
        let vhosts = self.rabbitmqctl(&["-q", "list_vhosts", "name"]).await?;
        if vhosts.lines().any(|line| line.trim() == vhost) {
            self.rabbitmqctl(&["-q", "delete_vhost", vhost]).await?;
        }
        self.ensure_vhost(vhost).await
    }

    async fn admin(&self) -> Result<sqlx::PgConnection> {
        sqlx::PgConnection::connect(&self.ports.database_url("postgres"))
            .await
            .context("connecting to PostgreSQL as postgres")
    }

    /// The database, created if missing.
    pub async fn ensure_database(&self, name: &str) -> Result<()> {
        let mut admin = self.admin().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut admin)
                .await?;
        if !exists {
            create_database(&mut admin, name).await?;
        }
        Ok(())
    }

    /// The database, dropped (its sessions disconnected) and created empty.
    pub async fn recreate_database(&self, name: &str) -> Result<()> {
        let mut admin = self.admin().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote(name)?
        )))
        .execute(&mut admin)
        .await
        .with_context(|| format!("dropping database {name}"))?;
        create_database(&mut admin, name).await
    }

    /// Empties one Redis database. `ASYNC`: the keys are freed in the background, so the call
    /// returns at once however many a bench left (a plain FLUSHDB of a million keys outlasted
    /// the client's response timeout: "timed out").
    pub async fn flush_redis(&self, database: u8) -> Result<()> {
        let client = redis::Client::open(self.ports.redis_url(database))?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let () = redis::cmd("FLUSHDB")
            .arg("ASYNC")
            .query_async(&mut connection)
            .await
            .with_context(|| format!("emptying Redis database {database}"))?;
        Ok(())
    }

    /// A deployment's database, vhost and Redis database, emptied (created if missing).
    pub async fn fresh_deployment(&self, deployment: Deployment) -> Result<()> {
        self.recreate_database(deployment.database()).await?;
        if deployment.vhost() != "/" {
            self.recreate_vhost(deployment.vhost()).await?;
        }
        self.flush_redis(deployment.redis_database()).await
    }
}

/// The lock of a state folder's runs of the script (see `Services::busy`).
fn busy_lock(state: &Path) -> Arc<Mutex<()>> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = LazyLock::new(Mutex::default);
    let key = state.canonicalize().unwrap_or_else(|_| state.to_owned());
    let mut locks = LOCKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(key).or_default().clone()
}

async fn create_database(admin: &mut sqlx::PgConnection, name: &str) -> Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {}",
        quote(name)?
    )))
    .execute(admin)
    .await
    .with_context(|| format!("creating database {name}"))?;
    Ok(())
}

/// A database name as an SQL identifier: only the names this kit uses (letters, digits, `_`).
fn quote(name: &str) -> Result<String> {
    anyhow::ensure!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "unexpected database name {name:?}"
    );
    Ok(format!("\"{name}\""))
}

/// Services that are stopped when this is dropped (or [`Owned::down`] is called): a private
/// copy that no exit path leaves behind.
pub struct Owned {
    services: Option<Services>,
}

impl Owned {
    /// Starts fresh services (see [`Services::fresh`]) and owns them.
    pub async fn fresh(services: Services) -> Result<Owned> {
        let owned = Owned {
            services: Some(services.clone()),
        };
        services.fresh().await?;
        Ok(owned)
    }

    pub fn services(&self) -> &Services {
        self.services.as_ref().expect("owned until down")
    }

    /// Stops the processes and the services now.
    pub async fn down(mut self) -> Result<()> {
        match self.services.take() {
            Some(services) => services.down().await,
            None => Ok(()),
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(services) = self.services.take()
            && let Err(err) = services.down_blocking()
        {
            eprintln!("stopping the services failed: {err:#}");
        }
    }
}

impl std::ops::Deref for Owned {
    type Target = Services;

    fn deref(&self) -> &Services {
        self.services()
    }
}
