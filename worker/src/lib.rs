//! `allot-worker`: decides purchase requests. One consumer per partition takes the partition's
//! requests in arrival order, in batches, decides them with the pure [`core`], commits each batch
//! in one PostgreSQL transaction ([`persist`]), publishes the statuses to Redis and acks
//! ([`consumer`]).
//!
//! [`run`] is the whole worker; `main` only reads the configuration and calls it.

pub mod config;
pub mod consumer;
pub mod core;
pub mod decider;
pub mod http;
pub mod monitor;
pub mod persist;

use crate::consumer::{BatchSettings, consume_partition};
use crate::decider::Decider;
use allot_shared::{Clock, amqp};
use anyhow::Context;
pub use config::WorkerConfig;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Runs the worker until `shutdown` completes, with its HTTP server on
/// `ALLOT_WORKER_HTTP_ADDR` (see [`serve`]).
pub async fn run(
    config: WorkerConfig,
    pool: PgPool,
    redis: ConnectionManager,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    serve(listener, config, pool, redis, clock, shutdown).await
}

/// Runs the worker until `shutdown` completes: connects to RabbitMQ, declares the partition
/// queues and consumes every partition, and serves `/healthz`, `/readyz` and `/metrics` on
/// `listener` (tests pass one bound to port 0). On shutdown each consumer finishes the batch it
/// is deciding, then the connection is closed; unacked messages go back to their queues.
pub async fn serve(
    listener: TcpListener,
    config: WorkerConfig,
    pool: PgPool,
    redis: ConnectionManager,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let connection = Arc::new(amqp::connect(&config.common.amqp_url, "allot-worker").await?);
    let health = http::Health {
        pool: pool.clone(),
        redis: redis.clone(),
        connection: connection.clone(),
        metrics: allot_shared::metrics::install(),
    };
    let topology = config.common.topology();
    let decider = Arc::new(Decider::new(
        pool,
        redis,
        config.common.redis_prefix.clone(),
        clock,
        config.timezone,
    ));
    let settings = BatchSettings {
        max_size: config.batch_size as usize,
        linger: config.batch_linger(),
        prefetch: config.prefetch,
    };
    let stop = CancellationToken::new();
    let mut consumers = JoinSet::new();
    for partition in topology.partitions() {
        let channel = connection
            .create_channel()
            .await
            .with_context(|| format!("failed to open a channel for partition {partition}"))?;
        consumers.spawn(consume_partition(
            channel,
            topology.clone(),
            partition,
            decider.clone(),
            settings,
            stop.clone(),
        ));
    }
    tracing::info!(partitions = topology.partitions, queue_prefix = %topology.queue_prefix, "worker consuming");
    let address = listener.local_addr().context("listener has no address")?;
    let server = axum::serve(listener, http::router(health))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    tracing::info!(%address, "worker HTTP server listening (/healthz, /readyz, /metrics)");
    let monitor = {
        let connection = connection.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            monitor::watch_queue_depths(&connection, topology, stop).await;
        })
    };

    let result = tokio::select! {
        () = shutdown => Ok(()),
        Some(ended) = consumers.join_next() => Err(match ended {
            Ok(Ok(())) => anyhow::anyhow!("a partition consumer stopped unexpectedly"),
            Ok(Err(err)) => err,
            Err(join) => anyhow::Error::new(join).context("a partition consumer panicked"),
        }),
    };
    stop.cancel();
    while let Some(ended) = consumers.join_next().await {
        if let Ok(Err(err)) = ended {
            tracing::warn!(error = ?err, "partition consumer ended with an error during shutdown");
        }
    }
    let _ = monitor.await;
    if let Ok(Err(err)) = server.await {
        tracing::warn!(error = %err, "the worker HTTP server failed");
    }
    if let Err(err) = connection.close(200, "worker shutting down".into()).await {
        tracing::debug!(error = %err, "closing the RabbitMQ connection");
    }
    tracing::info!("worker stopped");
    result
}
