//! The consumer loop of one partition: take what has arrived (up to a batch), let the
//! [`Decider`] process it, retrying until it succeeds (or setting aside a message that fails
//! every time, see [`crate::poison`]), then ack the whole batch at once (`multiple`). Never an
//! ack before the commit.
//!
//! The queue has single-active-consumer: when several worker replicas run, RabbitMQ delivers a
//! partition to one of them and keeps the others' consumers as standbys.

use crate::decider::{Decider, Message};
use crate::poison::{Failure, classify};
use allot_shared::PartitionId;
use allot_shared::amqp::Topology;
use anyhow::Context;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How a partition consumer batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most messages per batch.
    pub max_size: usize,
    /// How long to wait for more messages after the first.
    pub linger: Duration,
    /// Messages RabbitMQ may have in flight to this consumer.
    pub prefetch: u16,
}

/// Consumes `partition` on its own `channel` until `shutdown` is cancelled (`Ok`) or the
/// connection fails (`Err`). A batch being processed is finished (committed and acked) first;
/// one still failing is left unacked for redelivery.
pub async fn consume_partition(
    channel: Channel,
    topology: Topology,
    partition: PartitionId,
    decider: Arc<Decider>,
    settings: BatchSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut consumer = subscribe(&channel, &topology, partition, settings.prefetch).await?;
    loop {
        let batch = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            batch = next_batch(&mut consumer, settings) => batch,
        };
        let deliveries = match batch {
            Ok(Some(deliveries)) => deliveries,
            Ok(None) => anyhow::bail!("the consumer of partition {partition} was cancelled"),
            // The connection dropped: the session ends and a fresh one subscribes again.
            // Unacked deliveries go back to the queue and are decided (idempotently) again.
            Err(err) => {
                return Err(anyhow::Error::new(err).context(format!(
                    "the consumer of partition {partition} was interrupted"
                )));
            }
        };
        if !process_until_done(&decider, partition, &deliveries, &shutdown).await {
            return Ok(()); // shutting down with the batch unacked: it will be redelivered
        }
        ack_all(partition, &deliveries).await;
    }
}

async fn subscribe(
    channel: &Channel,
    topology: &Topology,
    partition: PartitionId,
    prefetch: u16,
) -> anyhow::Result<Consumer> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("failed to set the prefetch")?;
    topology.declare_queue(channel, partition).await?;
    let queue = topology.queue(partition);
    let tag = format!("allot-worker-{}-{}", std::process::id(), partition);
    channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume {queue}"))
}

/// Waits for the next message, then takes whatever else arrives within the linger time, up to
/// the batch size. `Ok(None)` when the consumer ended.
async fn next_batch(
    consumer: &mut Consumer,
    settings: BatchSettings,
) -> lapin::Result<Option<Vec<Delivery>>> {
    let Some(first) = consumer.next().await else {
        return Ok(None);
    };
    let mut batch = vec![first?];
    let deadline = tokio::time::Instant::now() + settings.linger;
    while batch.len() < settings.max_size {
        let next = match futures::FutureExt::now_or_never(consumer.next()) {
            Some(next) => next,
            None if settings.linger.is_zero() => break,
            None => match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(next) => next,
                Err(_elapsed) => break,
            },
        };
        match next {
            Some(delivery) => batch.push(delivery?),
            None => break,
        }
    }
    Ok(Some(batch))
}

/// How often a batch, or a single message once a batch was split, may fail deterministically
/// before it is split, or set aside.
const DETERMINISTIC_ATTEMPTS: u32 = 3;
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// How a series of attempts ended.
enum Attempts {
    Decided,
    ShuttingDown,
    /// Failed deterministically [`DETERMINISTIC_ATTEMPTS`] times; the last error.
    KeepsFailing(anyhow::Error),
}

/// Processes a batch until it is decided. Transient failures are retried forever with a
/// capped backoff; a batch that keeps failing deterministically is split and retried message
/// by message (in order), and a message that still keeps failing is set aside (dead letter,
/// transaction rejected as `unprocessable`), so the partition moves on. Returns `false` if
/// shutdown came first: the batch stays unacked and is redelivered.
async fn process_until_done(
    decider: &Decider,
    partition: PartitionId,
    deliveries: &[Delivery],
    shutdown: &CancellationToken,
) -> bool {
    let messages: Vec<Message<'_>> = deliveries
        .iter()
        .map(|d| Message {
            body: &d.data,
            message_id: d.properties.message_id().as_ref().map(|id| id.as_str()),
        })
        .collect();
    let err = match attempt(decider, partition, &messages, shutdown).await {
        Attempts::Decided => return true,
        Attempts::ShuttingDown => return false,
        Attempts::KeepsFailing(err) => err,
    };
    if messages.len() > 1 {
        tracing::warn!(%partition, size = messages.len(), error = %format_args!("{err:#}"), "batch keeps failing; retrying it message by message");
    }
    for message in &messages {
        let err = if messages.len() == 1 {
            format!("{err:#}")
        } else {
            match attempt(decider, partition, std::slice::from_ref(message), shutdown).await {
                Attempts::Decided => continue,
                Attempts::ShuttingDown => return false,
                Attempts::KeepsFailing(err) => format!("{err:#}"),
            }
        };
        if !set_aside_until_done(decider, partition, *message, &err, shutdown).await {
            return false;
        }
    }
    true
}

/// Tries `messages` as one batch until it is decided, shutdown comes, or it failed
/// deterministically [`DETERMINISTIC_ATTEMPTS`] times.
async fn attempt(
    decider: &Decider,
    partition: PartitionId,
    messages: &[Message<'_>],
    shutdown: &CancellationToken,
) -> Attempts {
    let mut pause = Duration::from_millis(50);
    let mut deterministic = 0;
    loop {
        let err = match decider.process_batch(partition, messages).await {
            Ok(_) => return Attempts::Decided,
            Err(err) => err,
        };
        let failure = classify(&err);
        if failure == Failure::Deterministic {
            deterministic += 1;
            if deterministic >= DETERMINISTIC_ATTEMPTS {
                return Attempts::KeepsFailing(err);
            }
        }
        tracing::warn!(%partition, ?failure, error = %format_args!("{err:#}"), retry_in = ?pause, "batch failed; it will be retried");
        if !pause_or_shutdown(&mut pause, shutdown).await {
            return Attempts::ShuttingDown;
        }
    }
}

/// Sets `message` aside, retrying (the database may be down) until it is recorded. `false` if
/// shutdown came first.
async fn set_aside_until_done(
    decider: &Decider,
    partition: PartitionId,
    message: Message<'_>,
    reason: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut pause = Duration::from_millis(50);
    loop {
        match decider.set_aside(partition, message, reason).await {
            Ok(()) => {
                crate::monitor::record_set_aside();
                return true;
            }
            Err(err) => {
                tracing::warn!(%partition, error = %format_args!("{err:#}"), retry_in = ?pause, "could not set a message aside; retrying");
            }
        }
        if !pause_or_shutdown(&mut pause, shutdown).await {
            return false;
        }
    }
}

/// Sleeps `pause` (then doubles it, up to [`MAX_PAUSE`]); `false` if shutdown came first.
async fn pause_or_shutdown(pause: &mut Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => return false,
        () = tokio::time::sleep(*pause) => {}
    }
    *pause = (*pause * 2).min(MAX_PAUSE);
    true
}

/// Acks every delivery of the batch with one `multiple` ack on the last one.
async fn ack_all(partition: PartitionId, deliveries: &[Delivery]) {
    let Some(last) = deliveries.last() else {
        return;
    };
    // Bounded: on a connection that died unnoticed, an ack may never complete.
    let ack = last.acker.ack(BasicAckOptions { multiple: true });
    match tokio::time::timeout(Duration::from_secs(5), ack).await {
        Ok(Ok(_)) => {}
        // The batch is committed; if the ack is lost it is redelivered and replayed.
        Ok(Err(err)) => {
            tracing::warn!(%partition, error = %err, "could not ack a committed batch; it will be replayed");
        }
        Err(_elapsed) => {
            tracing::warn!(%partition, "acking a committed batch timed out; it will be replayed");
        }
    }
}
