//! The worker's settings (`allot-worker --help` lists them with their variables).

use allot_shared::CommonConfig;
use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "allot-worker",
    version,
    about = "Decides allot's purchase requests, one serial batch consumer per partition"
)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Time zone whose calendar day order numbers carry (an IANA name such as Europe/Berlin).
    #[arg(long, env = "ALLOT_TIMEZONE", default_value = "UTC")]
    pub timezone: chrono_tz::Tz,

    /// Most requests decided in one batch (one database transaction).
    #[arg(long, env = "ALLOT_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// How long a batch waits for more requests after its first (milliseconds). 0 takes only
    /// what has already arrived, so batches grow by themselves under load.
    #[arg(long, env = "ALLOT_BATCH_LINGER_MS", default_value_t = 0)]
    pub batch_linger_ms: u64,

    /// Unacknowledged messages RabbitMQ may push to each partition consumer.
    #[arg(long, env = "ALLOT_PREFETCH", default_value_t = 1000)]
    pub prefetch: u16,

    /// PostgreSQL connections of this worker; a partition uses one while committing.
    #[arg(long, env = "ALLOT_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// How often the expiry sweeper looks for holds past their expiry (milliseconds); each
    /// found is released in its partition's serial path.
    #[arg(long, env = "ALLOT_HOLD_SWEEP_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub hold_sweep_ms: u64,

    /// Address of the worker's HTTP server (`/healthz`, `/readyz`, `/metrics`). Port 0 picks a
    /// free port (logged at start).
    #[arg(long, env = "ALLOT_WORKER_HTTP_ADDR", default_value = "127.0.0.1:8081")]
    pub http_addr: SocketAddr,
}

impl WorkerConfig {
    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }

    pub fn hold_sweep(&self) -> Duration {
        Duration::from_millis(self.hold_sweep_ms)
    }
}
