//! `allot-api`: the HTTP front of allot. It validates purchase requests and hands them to the
//! [`intake`], which gathers each partition's requests into batch envelopes, records them as
//! pending in Redis and publishes them; each request is answered 202 once RabbitMQ confirmed
//! its message. It serves transaction statuses (waiting for the decision on request, woken by
//! the worker's notifications, see [`decisions`]) and the product catalogue.
//!
//! [`run`] serves a router on a listener until a shutdown future completes, so tests can bind
//! `127.0.0.1:0` and drive a real server; `main` only reads the configuration and calls it.

pub mod backlog;
pub mod buyers;
pub mod catalogue;
pub mod config;
pub mod decisions;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod intake;
pub mod observe;
pub mod openapi;
pub mod publisher;
pub mod routes;
pub mod state;

pub use config::ApiConfig;
pub use state::AppState;

use anyhow::Context;
use std::future::Future;
use tokio::net::TcpListener;

/// Serves the API on `listener` until `shutdown` completes, then stops accepting connections,
/// lets requests in flight finish (each is bounded by the request timeout) and closes the
/// broker connection.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let publisher = state.publisher.clone();
    // Refreshed even with the short-circuit off: the snapshot also says which products are
    // spread over several partitions, and the routing of their purchases needs that.
    let every = state
        .catalogue_refresh
        .unwrap_or(catalogue::SHARDS_REFRESH_WHEN_OFF);
    let refresher = Some(
        state
            .catalogue
            .clone()
            .spawn_refresher(state.pool.clone(), every),
    );
    let revocations = state
        .buyers
        .revocations
        .clone()
        .start_refresher(state.pool.clone(), state.buyers.revocation_refresh)
        .await;
    let limits_cleaner = state
        .buyers
        .limits
        .clone()
        .spawn_cleaner(std::time::Duration::from_secs(60));
    let stopping = state.shutdown.clone();
    let address = listener.local_addr().context("listener has no address")?;
    tracing::info!(%address, "API listening");
    // The peer's address is what the login rate limit counts per client.
    let app = routes::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.cancel();
        })
        .await
        .context("the HTTP server failed")?;
    if let Some(refresher) = refresher {
        refresher.abort();
    }
    revocations.abort();
    limits_cleaner.abort();
    publisher.close().await;
    tracing::info!("API stopped");
    Ok(())
}
