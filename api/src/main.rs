//! `allot-api`: reads its configuration from the environment and serves until SIGTERM or Ctrl-C.

use allot_api::{ApiConfig, AppState};
use allot_shared::{db, shutdown, status_store, telemetry};
use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let config = ApiConfig::parse();
    if config.uses_default_admin_token() {
        tracing::warn!(
            "ALLOT_ADMIN_TOKEN is not set: using the development default; set it in production"
        );
    }
    if let Some(ignored) = config.common.ignored_amqp_url() {
        tracing::warn!(%ignored, "ALLOT_AMQP_URL is ignored: ALLOT_AMQP_URLS is set");
    }
    let pool =
        db::connect_and_migrate(&config.common.database_url, config.db_max_connections).await?;
    let redis =
        status_store::connect(&config.common.redis_url, config.common.redis_timeout()).await?;
    let state = AppState::build(&config, pool, redis).await?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    allot_api::run(listener, state, shutdown::signal()).await
}
