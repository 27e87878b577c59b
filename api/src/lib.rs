//! `allot-api`: the HTTP front of allot. It validates purchase requests and hands them to the
//! [`intake`], which gathers each partition's requests into batch envelopes, records them as
//! pending in Redis and publishes them; each request is answered 202 once RabbitMQ confirmed
//! its message. It serves transaction statuses (waiting for the decision on request, woken by
//! the worker's notifications, see [`decisions`]) and the product catalogue.
//!
//! [`run`] serves a router on a listener until a shutdown future completes, so tests can bind
//! `127.0.0.1:0` and drive a real server; `main` only reads the configuration and calls it.

pub mod backlog;
pub mod catalogue;
pub mod config;
pub mod decisions;
pub mod error;
pub mod extract;
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
    let refresher = state.catalogue_refresh.map(|every| {
        state
            .catalogue
            .clone()
            .spawn_refresher(state.pool.clone(), every)
    });
    let stopping = state.shutdown.clone();
    let address = listener.local_addr().context("listener has no address")?;
    tracing::info!(%address, "API listening");
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.cancel();
        })
        .await
        .context("the HTTP server failed")?;
    if let Some(refresher) = refresher {
        refresher.abort();
    }
    publisher.close().await;
    tracing::info!("API stopped");
    Ok(())
}
