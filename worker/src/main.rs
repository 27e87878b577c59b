//! `allot-worker`: reads its configuration from the environment and runs the worker until
//! SIGTERM or Ctrl-C.

use allot_shared::{SystemClock, db, shutdown, status_store, telemetry};
use allot_worker::WorkerConfig;
use clap::Parser;
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let config = WorkerConfig::parse();
    if let Some(ignored) = config.common.ignored_amqp_url() {
        tracing::warn!(%ignored, "ALLOT_AMQP_URL is ignored: ALLOT_AMQP_URLS is set");
    }
    let pool =
        db::connect_and_migrate(&config.common.database_url, config.db_max_connections).await?;
    let redis =
        status_store::connect(&config.common.redis_url, config.common.redis_timeout()).await?;
    allot_worker::run(
        config,
        pool,
        redis,
        Arc::new(SystemClock),
        shutdown::signal(),
    )
    .await
}
