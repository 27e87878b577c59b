//! The one port map. Every copy of allot on a machine (the developer's, a helper's, CI's, the
//! chaos test's own) is a state folder and a port offset; every port of a copy is a base port
//! below plus its offset, and nothing else in the repository writes a port down (the product's
//! own configuration defaults, in `shared/src/config.rs`, match offset 0).
//!
//! One copy runs several deployments of allot on its services, each on a database, a vhost, a
//! Redis database and HTTP ports of its own ([`Deployment`]): the long-running one of
//! `deploy/local.sh up`, the fresh ones the functional test and the benchmark get, and the
//! integration tests' (a database per test, see [`PortMap::test_env`]).

use anyhow::{Result, ensure};

/// How far above its copy the chaos test's own copy sits: its services are stopped and killed
/// over and over, so they must be nobody else's. 6000 puts their ports (61432 and up) above
/// Linux's ephemeral range (32768-60999), where no outgoing connection can hold one for a
/// moment while it is being restarted ("address already in use").
pub const CHAOS_OFFSET: u16 = 6000;

const POSTGRES: u16 = 55432;
const RABBITMQ: u16 = 55672;
/// Erlang distribution (the default, AMQP port + 20000, is not a valid port).
const RABBITMQ_DIST: u16 = 55673;
/// The copy's own epmd, so that stopping it touches nobody else's (and, in cluster mode, the
/// one epmd through which the copy's nodes find each other).
const EPMD: u16 = 55674;
/// In cluster mode, node k (1, 2, 3, ...) has its AMQP port at `RABBITMQ + NODE_STEP * (k - 1)`
/// and its distribution port one above: 55672/55673, 55682/55683, 55692/55693 at offset 0.
const NODE_STEP: u16 = 10;
/// Instance n (1, 2, ...) of a deployment's allot-api listens at its first port
/// `+ INSTANCE_STEP * (n - 1)`, and so does its allot-worker's HTTP server.
const INSTANCE_STEP: u16 = 10;
/// The most instances of allot-api, and of allot-worker, one deployment runs: their ports stay
/// below the next copy's (offset + 100).
pub const MAX_INSTANCES: u8 = 5;
/// The most RabbitMQ nodes a copy runs: their ports stay below the next copy's (offset + 100).
pub const MAX_RABBITMQ_NODES: u8 = 5;
const REDIS: u16 = 56379;

/// The ports of one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    offset: u16,
    /// 1: one RabbitMQ node (the default); more: a cluster of that many nodes
    /// (`ALLOT_LOCAL_RABBITMQ_NODES`).
    rabbitmq_nodes: u8,
}

impl Default for PortMap {
    fn default() -> Self {
        Self {
            offset: 0,
            rabbitmq_nodes: 1,
        }
    }
}

/// One RabbitMQ node of a copy: its name, its ports and the folder of its data under the
/// copy's state folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitNode {
    /// 1, 2, 3, ...: the first node is the one the others join.
    pub index: u8,
    /// The Erlang node name (`allot-300@localhost`; `allot-300-n2@localhost` in a cluster).
    pub name: String,
    pub amqp_port: u16,
    pub dist_port: u16,
    /// Its folder under the state folder: `rabbitmq` for the single node, `rabbitmq-n2`, ...
    /// for a cluster's (whose Erlang cookie is in `rabbitmq-cluster/`).
    pub dir: String,
    /// Part of a cluster (its own cookie, joined to node 1).
    pub clustered: bool,
}

impl RabbitNode {
    /// `amqp://guest:guest@127.0.0.1:<port>/<vhost>`; `/` is the default vhost.
    pub fn amqp_url(&self, vhost: &str) -> String {
        let vhost = if vhost == "/" { "%2f" } else { vhost };
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.amqp_port)
    }
}

impl PortMap {
    /// The copy at `offset`; fails if a port would not exist.
    pub fn new(offset: u16) -> Result<Self> {
        let highest = u32::from(REDIS) + u32::from(offset);
        ensure!(
            highest <= u32::from(u16::MAX),
            "port offset {offset} puts Redis on port {highest}, past 65535"
        );
        Ok(Self {
            offset,
            rabbitmq_nodes: 1,
        })
    }

    /// The same copy with `nodes` RabbitMQ nodes (1, the default, or a cluster of 2 to
    /// [`MAX_RABBITMQ_NODES`]).
    pub fn with_rabbitmq_nodes(self, nodes: u8) -> Result<Self> {
        ensure!(
            (1..=MAX_RABBITMQ_NODES).contains(&nodes),
            "a copy runs 1 to {MAX_RABBITMQ_NODES} RabbitMQ nodes, not {nodes}"
        );
        Ok(Self {
            rabbitmq_nodes: nodes,
            ..self
        })
    }

    /// The copy named by `ALLOT_LOCAL_PORT_OFFSET` (0 if unset), with
    /// `ALLOT_LOCAL_RABBITMQ_NODES` RabbitMQ nodes (1 if unset).
    pub fn from_env() -> Result<Self> {
        let number = |name: &str| -> Result<Option<u16>> {
            match std::env::var(name) {
                Ok(raw) if !raw.is_empty() => raw
                    .parse()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("{name} must be a number, not {raw:?}")),
                _ => Ok(None),
            }
        };
        let ports = Self::new(number("ALLOT_LOCAL_PORT_OFFSET")?.unwrap_or(0))?;
        let nodes = number("ALLOT_LOCAL_RABBITMQ_NODES")?.unwrap_or(1);
        ports.with_rabbitmq_nodes(u8::try_from(nodes).unwrap_or(u8::MAX))
    }

    /// How many RabbitMQ nodes the copy runs (1 unless it is a cluster).
    pub fn rabbitmq_node_count(self) -> u8 {
        self.rabbitmq_nodes
    }

    /// Whether the copy runs a RabbitMQ cluster.
    pub fn clustered(self) -> bool {
        self.rabbitmq_nodes > 1
    }

    /// The copy's RabbitMQ nodes: the one node, or the cluster's, node 1 first.
    pub fn rabbitmq_cluster(self) -> Vec<RabbitNode> {
        if !self.clustered() {
            return vec![RabbitNode {
                index: 1,
                name: self.rabbitmq_node(),
                amqp_port: self.rabbitmq(),
                dist_port: self.rabbitmq_dist(),
                dir: "rabbitmq".into(),
                clustered: false,
            }];
        }
        (1..=self.rabbitmq_nodes)
            .map(|index| {
                let step = NODE_STEP * u16::from(index - 1);
                let name = match self.offset {
                    0 => format!("allot-n{index}@localhost"),
                    offset => format!("allot-{offset}-n{index}@localhost"),
                };
                RabbitNode {
                    index,
                    name,
                    amqp_port: self.rabbitmq() + step,
                    dist_port: self.rabbitmq_dist() + step,
                    dir: format!("rabbitmq-n{index}"),
                    clustered: true,
                }
            })
            .collect()
    }

    /// The AMQP URLs of every node of the copy, for `ALLOT_AMQP_URLS`.
    pub fn amqp_urls(self, vhost: &str) -> String {
        let urls: Vec<String> = self
            .rabbitmq_cluster()
            .iter()
            .map(|node| node.amqp_url(vhost))
            .collect();
        urls.join(",")
    }

    pub fn offset(self) -> u16 {
        self.offset
    }

    /// The chaos test's copy beside this one (`offset + CHAOS_OFFSET` unless told otherwise),
    /// with as many RabbitMQ nodes.
    pub fn chaos(self) -> Result<Self> {
        Self::new(self.offset.saturating_add(CHAOS_OFFSET))?
            .with_rabbitmq_nodes(self.rabbitmq_nodes)
    }

    fn port(self, base: u16) -> u16 {
        base + self.offset
    }

    pub fn postgres(self) -> u16 {
        self.port(POSTGRES)
    }

    pub fn redis(self) -> u16 {
        self.port(REDIS)
    }

    pub fn rabbitmq(self) -> u16 {
        self.port(RABBITMQ)
    }

    pub fn rabbitmq_dist(self) -> u16 {
        self.port(RABBITMQ_DIST)
    }

    pub fn epmd(self) -> u16 {
        self.port(EPMD)
    }

    /// The RabbitMQ node's name: every copy's node has its own.
    pub fn rabbitmq_node(self) -> String {
        match self.offset {
            0 => "allot@localhost".into(),
            offset => format!("allot-{offset}@localhost"),
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>` (trust authentication on loopback).
    pub fn database_url(self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.postgres()
        )
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/<vhost>`; `/` is the default vhost.
    pub fn amqp_url(self, vhost: &str) -> String {
        let vhost = if vhost == "/" { "%2f" } else { vhost };
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.rabbitmq())
    }

    pub fn redis_url(self, database: u8) -> String {
        format!("redis://127.0.0.1:{}/{database}", self.redis())
    }

    /// Where a deployment's allot-api listens.
    pub fn api_addr(self, deployment: Deployment) -> String {
        self.api_instance_addr(deployment, 1)
    }

    /// Where a deployment's allot-worker serves `/healthz`, `/readyz` and `/metrics`.
    pub fn worker_addr(self, deployment: Deployment) -> String {
        self.worker_instance_addr(deployment, 1)
    }

    /// Where instance `n` (1, 2, ... [`MAX_INSTANCES`]) of a deployment's allot-api listens:
    /// 8080, 8090, 8100, ... for `up`'s at offset 0.
    pub fn api_instance_addr(self, deployment: Deployment, n: u8) -> String {
        let step = INSTANCE_STEP * u16::from(n.clamp(1, MAX_INSTANCES) - 1);
        format!("127.0.0.1:{}", self.port(deployment.api_port() + step))
    }

    /// Where instance `n` of a deployment's allot-worker serves its HTTP endpoints: 8081,
    /// 8091, 8101, ... for `up`'s at offset 0.
    pub fn worker_instance_addr(self, deployment: Deployment, n: u8) -> String {
        let step = INSTANCE_STEP * u16::from(n.clamp(1, MAX_INSTANCES) - 1);
        format!("127.0.0.1:{}", self.port(deployment.api_port() + 1 + step))
    }

    /// Where the benchmark's reference servers listen.
    pub fn bench_reference_addr(self) -> String {
        format!("127.0.0.1:{}", self.port(29080))
    }

    /// The environment of a deployment's allot processes (besides its admin token).
    pub fn allot_env(self, deployment: Deployment) -> Vec<(String, String)> {
        vec![
            (
                "ALLOT_DATABASE_URL".into(),
                self.database_url(deployment.database()),
            ),
            ("ALLOT_AMQP_URL".into(), self.amqp_url(deployment.vhost())),
            // The broker list, when set, replaces ALLOT_AMQP_URL: set to the copy's nodes (its
            // one node, or a cluster's, node 1 first), so that a list in the caller's
            // environment cannot point this copy elsewhere.
            ("ALLOT_AMQP_URLS".into(), self.amqp_urls(deployment.vhost())),
            (
                "ALLOT_REDIS_URL".into(),
                self.redis_url(deployment.redis_database()),
            ),
            ("ALLOT_HTTP_ADDR".into(), self.api_addr(deployment)),
            (
                "ALLOT_WORKER_HTTP_ADDR".into(),
                self.worker_addr(deployment),
            ),
        ]
        .into_iter()
        .chain(self.cluster_env())
        .collect()
    }

    /// In cluster mode, what replicates allot's queues on every node:
    /// `ALLOT_QUORUM_GROUP_SIZE`, the number of nodes. Nothing for a single node, whose
    /// queues are declared as they always were.
    pub fn cluster_env(self) -> Vec<(String, String)> {
        if !self.clustered() {
            return Vec::new();
        }
        vec![(
            "ALLOT_QUORUM_GROUP_SIZE".into(),
            self.rabbitmq_nodes.to_string(),
        )]
    }

    /// What the integration tests read: `#[sqlx::test]` creates a database per test through
    /// `DATABASE_URL`; the broker's `allot-test` vhost and Redis database 2 are shared, each
    /// test with prefixes of its own.
    pub fn test_env(self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.database_url("postgres")),
            ("ALLOT_TEST_AMQP_URL".into(), self.amqp_url(TEST_VHOST)),
            ("ALLOT_TEST_REDIS_URL".into(), self.redis_url(TEST_REDIS_DB)),
        ]
    }
}

/// The integration tests' vhost.
pub const TEST_VHOST: &str = "allot-test";
/// The integration tests' Redis database.
pub const TEST_REDIS_DB: u8 = 2;

/// One allot on a copy's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// `deploy/local.sh up`'s, and the chaos test's on its own copy.
    Main,
    /// The fresh allot of the functional test and of the tools (newman, schemathesis, the page).
    Functional,
    /// The benchmark's fresh allot.
    Bench,
}

impl Deployment {
    /// Its name: the names of its processes, logs and pid files start with it.
    pub fn name(self) -> &'static str {
        match self {
            Deployment::Main => "main",
            Deployment::Functional => "functional",
            Deployment::Bench => "bench",
        }
    }

    fn api_port(self) -> u16 {
        match self {
            Deployment::Main => 8080,
            Deployment::Functional => 18080,
            Deployment::Bench => 28080,
        }
    }

    pub fn database(self) -> &'static str {
        match self {
            Deployment::Main => "allot",
            Deployment::Functional => "allot_functional",
            Deployment::Bench => "allot_bench",
        }
    }

    pub fn vhost(self) -> &'static str {
        match self {
            Deployment::Main => "/",
            Deployment::Functional => "allot-functional",
            Deployment::Bench => "allot-bench",
        }
    }

    pub fn redis_database(self) -> u8 {
        match self {
            Deployment::Main => 0,
            Deployment::Functional => 3,
            Deployment::Bench => 4,
        }
    }
}

/// The benchmark's naive reference design has a database of its own.
pub const BENCH_NAIVE_DATABASE: &str = "allot_bench_naive";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_is_its_base_plus_the_offset() {
        let ports = PortMap::new(100).unwrap();
        assert_eq!(ports.postgres(), 55532);
        assert_eq!(ports.redis(), 56479);
        assert_eq!(ports.rabbitmq(), 55772);
        assert_eq!(ports.rabbitmq_dist(), 55773);
        assert_eq!(ports.epmd(), 55774);
        assert_eq!(ports.rabbitmq_node(), "allot-100@localhost");
        assert_eq!(ports.api_addr(Deployment::Main), "127.0.0.1:8180");
        assert_eq!(ports.worker_addr(Deployment::Functional), "127.0.0.1:18181");
        assert_eq!(ports.api_addr(Deployment::Bench), "127.0.0.1:28180");
        assert_eq!(ports.bench_reference_addr(), "127.0.0.1:29180");
        assert_eq!(
            ports.amqp_url("/"),
            "amqp://guest:guest@127.0.0.1:55772/%2f"
        );
        assert_eq!(PortMap::default().rabbitmq_node(), "allot@localhost");
        assert_eq!(ports.chaos().unwrap().postgres(), 61532);
    }

    #[test]
    fn a_cluster_has_a_name_ports_and_folder_per_node_and_its_instances_ports_of_their_own() {
        let single = PortMap::new(300).unwrap();
        assert_eq!(
            single.rabbitmq_cluster(),
            [RabbitNode {
                index: 1,
                name: "allot-300@localhost".into(),
                amqp_port: 55972,
                dist_port: 55973,
                dir: "rabbitmq".into(),
                clustered: false,
            }]
        );
        assert!(single.cluster_env().is_empty());
        assert_eq!(
            single.amqp_urls("/"),
            "amqp://guest:guest@127.0.0.1:55972/%2f"
        );
        let cluster = single.with_rabbitmq_nodes(3).unwrap();
        let nodes = cluster.rabbitmq_cluster();
        let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "allot-300-n1@localhost",
                "allot-300-n2@localhost",
                "allot-300-n3@localhost"
            ]
        );
        let ports: Vec<(u16, u16)> = nodes
            .iter()
            .map(|node| (node.amqp_port, node.dist_port))
            .collect();
        assert_eq!(ports, [(55972, 55973), (55982, 55983), (55992, 55993)]);
        assert_eq!(nodes[2].dir, "rabbitmq-n3");
        assert_eq!(
            cluster.amqp_urls("v"),
            "amqp://guest:guest@127.0.0.1:55972/v,amqp://guest:guest@127.0.0.1:55982/v,\
             amqp://guest:guest@127.0.0.1:55992/v"
        );
        assert_eq!(
            cluster.cluster_env(),
            [("ALLOT_QUORUM_GROUP_SIZE".to_owned(), "3".to_owned())]
        );
        assert_eq!(
            cluster.chaos().unwrap().rabbitmq_cluster()[1].amqp_port,
            61982
        );
        assert_eq!(
            cluster.api_instance_addr(Deployment::Main, 2),
            "127.0.0.1:8390"
        );
        assert_eq!(
            cluster.worker_instance_addr(Deployment::Main, 3),
            "127.0.0.1:8401"
        );
        assert!(single.with_rabbitmq_nodes(0).is_err());
        assert!(single.with_rabbitmq_nodes(MAX_RABBITMQ_NODES + 1).is_err());
    }

    #[test]
    fn an_offset_past_the_last_port_is_refused() {
        assert!(PortMap::new(9156).is_ok());
        assert!(PortMap::new(9157).is_err());
        assert!(PortMap::new(4000).unwrap().chaos().is_err());
    }
}
