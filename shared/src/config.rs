//! Configuration both binaries share. Every setting comes from an `ALLOT_*` environment variable
//! (or the matching command-line flag) and has a default that works with the services
//! `deploy/local.sh` starts.
//!
//! Pointing two deployments at different databases, vhosts and Redis databases (or prefixes)
//! gives two fully separate systems.

use clap::Args;

/// Where the services are and how the partitions are laid out.
#[derive(Debug, Clone, Args)]
pub struct CommonConfig {
    /// PostgreSQL, the source of truth for products, orders and outcomes.
    #[arg(
        long,
        env = "ALLOT_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:55432/allot"
    )]
    pub database_url: String,

    /// RabbitMQ; the vhost in the URL scopes all of allot's queues.
    #[arg(
        long,
        env = "ALLOT_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:55672/%2f"
    )]
    pub amqp_url: String,

    /// Redis, which holds transaction statuses for fast polling.
    #[arg(
        long,
        env = "ALLOT_REDIS_URL",
        default_value = "redis://127.0.0.1:56379/0"
    )]
    pub redis_url: String,

    /// Number of partitions (queues, serial consumers). API and workers must agree.
    #[arg(long, env = "ALLOT_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,

    /// Prefix of the partition queue names (`<prefix>.partition.NN`).
    #[arg(long, env = "ALLOT_QUEUE_PREFIX", default_value = "allot")]
    pub queue_prefix: String,

    /// Prefix of every Redis key allot writes (`<prefix>:tx:<id>`).
    #[arg(long, env = "ALLOT_REDIS_PREFIX", default_value = "allot")]
    pub redis_prefix: String,

    /// Most messages one partition queue holds; a publish beyond it is refused by the broker
    /// and the request answered 503, so a flood cannot grow a queue without bound.
    #[arg(long, env = "ALLOT_QUEUE_MAX_LENGTH", default_value_t = 500_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub queue_max_length: i64,

    /// How long a Redis command may take before it counts as failed (milliseconds).
    #[arg(long, env = "ALLOT_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// On a RabbitMQ cluster: on how many nodes each partition queue keeps a replica
    /// (`x-quorum-initial-group-size`), its leaders spread over the nodes
    /// (`x-queue-leader-locator: balanced`). Unset: neither argument is sent (the broker's
    /// defaults; the one node of a single-node broker). Fixed once the queues exist, like
    /// `ALLOT_QUEUE_MAX_LENGTH`; every API and worker instance must agree.
    #[arg(long, env = "ALLOT_QUORUM_GROUP_SIZE", value_parser = clap::value_parser!(u16).range(1..=9))]
    pub quorum_group_size: Option<u16>,
}

impl CommonConfig {
    pub fn redis_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.redis_timeout_ms)
    }

    /// The partition layout, as the AMQP topology needs it.
    pub fn topology(&self) -> crate::amqp::Topology {
        crate::amqp::Topology {
            queue_prefix: self.queue_prefix.clone(),
            partitions: self.partitions,
            max_length: self.queue_max_length,
            quorum_group_size: self.quorum_group_size,
        }
    }
}
