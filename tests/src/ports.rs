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
/// The copy's own epmd, so that stopping it touches nobody else's.
const EPMD: u16 = 55674;
const REDIS: u16 = 56379;

/// The ports of one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortMap {
    offset: u16,
}

impl PortMap {
    /// The copy at `offset`; fails if a port would not exist.
    pub fn new(offset: u16) -> Result<Self> {
        let highest = u32::from(REDIS) + u32::from(offset);
        ensure!(
            highest <= u32::from(u16::MAX),
            "port offset {offset} puts Redis on port {highest}, past 65535"
        );
        Ok(Self { offset })
    }

    /// The copy named by `ALLOT_LOCAL_PORT_OFFSET` (0 if unset).
    pub fn from_env() -> Result<Self> {
        match std::env::var("ALLOT_LOCAL_PORT_OFFSET") {
            Ok(raw) if !raw.is_empty() => {
                let offset: u16 = raw.parse().map_err(|_| {
                    anyhow::anyhow!("ALLOT_LOCAL_PORT_OFFSET must be a number, not {raw:?}")
                })?;
                Self::new(offset)
            }
            _ => Ok(Self::default()),
        }
    }

    pub fn offset(self) -> u16 {
        self.offset
    }

    /// The chaos test's copy beside this one (`offset + CHAOS_OFFSET` unless told otherwise).
    pub fn chaos(self) -> Result<Self> {
        Self::new(self.offset.saturating_add(CHAOS_OFFSET))
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
        format!("127.0.0.1:{}", self.port(deployment.api_port()))
    }

    /// Where a deployment's allot-worker serves `/healthz`, `/readyz` and `/metrics`.
    pub fn worker_addr(self, deployment: Deployment) -> String {
        format!("127.0.0.1:{}", self.port(deployment.api_port() + 1))
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
            // The broker list, when set, replaces ALLOT_AMQP_URL: set to the same one node, so
            // that a list in the caller's environment cannot point this copy elsewhere.
            ("ALLOT_AMQP_URLS".into(), self.amqp_url(deployment.vhost())),
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
    fn an_offset_past_the_last_port_is_refused() {
        assert!(PortMap::new(9156).is_ok());
        assert!(PortMap::new(9157).is_err());
        assert!(PortMap::new(4000).unwrap().chaos().is_err());
    }
}
