//! `allot-worker`: decides purchase requests. One consumer per partition ([`consumer`], the
//! path of a batch read top-down) takes the partition's requests in arrival order, in batches
//! ([`broker`], all of AMQP), decides them with the pure [`core`] in one PostgreSQL transaction
//! per batch ([`decider`], with all SQL in [`persist`]), publishes the statuses to Redis and
//! acks. What follows a failed attempt is the pure [`retry`] policy. Several worker instances
//! share the partitions evenly ([`seats`], with the pure [`spread`] and the list of live
//! workers in [`membership`]). Holds past their expiry are found in the database and their
//! release asked for through their partition's queue ([`expiry`]).
//!
//! [`run`] is the whole worker; `main` only reads the configuration and calls it.

pub mod broker;
pub mod config;
pub mod consumer;
pub mod core;
pub mod decider;
pub mod expiry;
pub mod group;
pub mod http;
pub mod membership;
pub mod monitor;
pub mod persist;
pub mod poison;
pub mod retry;
pub mod seats;
pub mod spread;

use crate::broker::BatchSettings;
use crate::decider::Decider;
use crate::membership::{Member, Membership};
use crate::seats::{SeatContext, Seats};
use allot_shared::Clock;
use allot_shared::brokers::Failover;
use anyhow::Context;
pub use config::WorkerConfig;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
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

/// Runs the worker until `shutdown` completes: connects to RabbitMQ (the first address of
/// `ALLOT_AMQP_URLS` that answers), declares the partition queues and takes a seat in every
/// partition's line ([`seats`]), and serves `/healthz`, `/readyz`, `/partitions` and `/metrics`
/// on `listener` (tests pass one bound to port 0). When the connection fails (its broker node
/// stops), the session ends and a fresh connection is opened, on the next address first, with a
/// capped backoff between rounds, until it works. On shutdown each consumer finishes the batch
/// it is deciding, then the connection is closed; unacked messages go back to their queues.
pub async fn serve(
    listener: TcpListener,
    config: WorkerConfig,
    pool: PgPool,
    redis: ConnectionManager,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let broker_up = Arc::new(AtomicBool::new(false));
    let worker_id = format!("w-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let seats = Arc::new(Seats::new(worker_id.clone(), config.common.partitions));
    let membership = Arc::new(Membership::new(
        redis.clone(),
        &config.common.redis_prefix,
        &config.common.queue_prefix,
    ));
    let health = http::Health {
        pool: pool.clone(),
        redis: redis.clone(),
        broker_up: broker_up.clone(),
        seats: seats.clone(),
        metrics: monitor::install_metrics(),
    };
    let brokers = config.common.brokers();
    tracing::info!(worker = %worker_id, brokers = %brokers, "worker starting");
    let mut failover = Failover::new(brokers, "allot-worker");
    let sweeper = Arc::new(expiry::Sweeper {
        pool: pool.clone(),
        clock: clock.clone(),
        topology: config.common.topology(),
        seats: seats.clone(),
        every: config.hold_sweep(),
    });
    let decider = Arc::new(Decider::new(
        pool,
        redis,
        config.common.redis_prefix.clone(),
        clock,
        config.timezone,
    ));
    let stop = CancellationToken::new();
    let stop_on_shutdown = stop.clone();
    let address = listener.local_addr().context("listener has no address")?;
    let server = axum::serve(listener, http::router(health))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });
    tracing::info!(%address, "worker HTTP server listening (/healthz, /readyz, /metrics)");
    let sessions = async {
        let mut pause = Duration::from_millis(100);
        let mut number = 0;
        loop {
            let started = tokio::time::Instant::now();
            number += 1;
            let me = Member {
                worker: worker_id.clone(),
                session: number,
            };
            let shared = Shared {
                config: &config,
                decider: &decider,
                sweeper: &sweeper,
                seats: &seats,
                membership: &membership,
                broker_up: &broker_up,
            };
            let ended = session(&shared, &mut failover, me, &stop).await;
            if ended.is_err() {
                failover.lost(); // the next round starts at the next address
            }
            match ended {
                Ok(()) => return Ok(()),
                // Shutting down: whatever ended the session last, the batches not acked are
                // redelivered to the next decider; a graceful stop is a clean exit.
                Err(err) if stop.is_cancelled() => {
                    tracing::warn!(error = %format_args!("{err:#}"), "RabbitMQ session ended while shutting down");
                    return Ok(());
                }
                Err(err) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        pause = Duration::from_millis(100); // it had worked for a while
                    }
                    tracing::warn!(error = %format_args!("{err:#}"), retry_in = ?pause, "RabbitMQ session ended; reconnecting");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    };
    tokio::pin!(sessions);
    let result = tokio::select! {
        () = shutdown => {
            stop_on_shutdown.cancel();
            sessions.await
        }
        result = &mut sessions => result,
    };
    stop.cancel();
    if let Ok(Err(err)) = server.await {
        tracing::warn!(error = %err, "the worker HTTP server failed");
    }
    tracing::info!("worker stopped");
    result
}

/// What a session's end is, when one of its partition consumers ended first.
fn consumer_ended(
    ended: Result<anyhow::Result<()>, tokio::task::JoinError>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    match ended {
        // A consumer ends by itself when shutdown cancelled it, and it may do so before the
        // session sees the cancellation: no failure. (Taken for one, it made the worker exit 1
        // after SIGTERM, "a partition consumer stopped unexpectedly", in the chaos test.)
        Ok(Ok(())) if stop.is_cancelled() => Ok(()),
        Ok(Ok(())) => Err(anyhow::anyhow!("a partition consumer stopped unexpectedly")),
        Ok(Err(err)) => Err(err),
        Err(join) => Err(anyhow::Error::new(join).context("a partition consumer panicked")),
    }
}

/// How long partition consumers may take to finish their batch when a session ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The longest pause between two rounds over the broker addresses.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// What every session of the worker uses.
struct Shared<'a> {
    config: &'a WorkerConfig,
    decider: &'a Arc<Decider>,
    /// Asks for the release of holds past their expiry, while the session consumes.
    sweeper: &'a Arc<expiry::Sweeper>,
    seats: &'a Arc<Seats>,
    membership: &'a Arc<Membership>,
    /// Tells `/readyz` whether the session is consuming.
    broker_up: &'a AtomicBool,
}

/// One connection's life: open it (one round over the broker addresses), take a seat in every
/// partition's line, each on a channel of its own, and list this worker among the live ones,
/// until shutdown (`Ok`) or until a seat fails (`Err`; the others are stopped, this worker
/// leaves the list, and the connection is closed first).
async fn session(
    shared: &Shared<'_>,
    failover: &mut Failover,
    me: Member,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let (connection, address) = failover.connect().await?;
    let config = shared.config;
    let topology = config.common.topology();
    let settings = BatchSettings {
        max_size: config.batch_size as usize,
        linger: config.batch_linger(),
        prefetch: config.prefetch,
    };
    let session_stop = stop.child_token();
    let connection = Arc::new(connection);
    let context = SeatContext {
        connection: connection.clone(),
        topology: topology.clone(),
        settings,
        decider: shared.decider.clone(),
        seats: shared.seats.clone(),
        stop: session_stop.clone(),
    };
    let mut consumers = JoinSet::new();
    for partition in topology.partitions() {
        consumers.spawn(seats::hold_seat(context.clone(), partition));
    }
    let listed = tokio::spawn(seats::keep_listed(
        shared.seats.clone(),
        shared.membership.clone(),
        me.clone(),
        session_stop.clone(),
    ));
    tracing::info!(partitions = topology.partitions, queue_prefix = %topology.queue_prefix, broker = %address, session = me.session, "worker consuming");
    shared.broker_up.store(true, Ordering::Relaxed);
    let monitor = {
        let connection = connection.clone();
        let stop = session_stop.clone();
        tokio::spawn(async move {
            monitor::watch_queue_depths(&connection, topology, stop).await;
        })
    };
    let sweeping = {
        let connection = connection.clone();
        let stop = session_stop.clone();
        let sweeper = shared.sweeper.clone();
        tokio::spawn(async move { sweeper.run(&connection, stop).await })
    };

    // Until shutdown, a consumer's end, or the connection found down. lapin does not always
    // wake a consumer whose connection died, so the connection is also watched.
    let mut watchdog = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            biased;
            () = session_stop.cancelled() => break Ok(()),
            Some(ended) = consumers.join_next() => break consumer_ended(ended, &session_stop),
            _ = watchdog.tick() => {
                if !connection.status().connected() {
                    break Err(anyhow::anyhow!("the RabbitMQ connection to {address} is down"));
                }
            }
        }
    };
    // The others finish the batch they are deciding, within a grace period; after it, they are
    // aborted (a batch in flight rolls back and stays unacked, to be redelivered).
    shared.broker_up.store(false, Ordering::Relaxed);
    session_stop.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(ended) = consumers.join_next().await {
            if let Ok(Err(err)) = ended {
                tracing::debug!(error = %format_args!("{err:#}"), "partition consumer ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "partition consumers did not stop in time; aborting them");
        consumers.shutdown().await;
    }
    let _ = monitor.await;
    let _ = sweeping.await;
    // Leaves the list of workers (bounded by the Redis timeout).
    let _ = listed.await;
    shared.seats.session_ended();
    // Bounded: closing a connection whose node hangs must not hold the next session.
    let close = connection.close(200, "worker session ending".into());
    match tokio::time::timeout(Duration::from_secs(5), close).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "closing the RabbitMQ connection"),
        Err(_elapsed) => tracing::debug!("closing the RabbitMQ connection timed out"),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::consumer_ended;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn a_consumer_that_ends_by_itself_is_a_failure_unless_shutdown_asked_for_it() {
        let running = CancellationToken::new();
        let stopping = CancellationToken::new();
        stopping.cancel();
        assert!(consumer_ended(Ok(Ok(())), &stopping).is_ok());
        let err = consumer_ended(Ok(Ok(())), &running).unwrap_err();
        assert_eq!(err.to_string(), "a partition consumer stopped unexpectedly");
        let failed = consumer_ended(Ok(Err(anyhow::anyhow!("connection lost"))), &stopping);
        assert_eq!(failed.unwrap_err().to_string(), "connection lost");
    }
}
