//! The consumer loop of one partition: take what has arrived (up to a batch), unpack the batch
//! envelopes into their requests, in order, let the [`Decider`] process them, retrying until it
//! succeeds (or setting aside, alone, a request that fails every time, see [`crate::poison`]),
//! then ack the whole batch at once (`multiple`). Never an ack before the commit.
//!
//! The queue has single-active-consumer: when several worker replicas run, RabbitMQ delivers a
//! partition to one of them and keeps the others' consumers as standbys.

use crate::decider::{Decider, Message};
use crate::poison::{Failure, classify};
use allot_shared::PartitionId;
use allot_shared::amqp::Topology;
use allot_shared::message::{self, COUNT_HEADER, ENVELOPE_TYPE};
use anyhow::Context;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
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
/// the batch size in requests (a message's envelope may carry many; the batch may end a message
/// past the size). `Ok(None)` when the consumer ended.
async fn next_batch(
    consumer: &mut Consumer,
    settings: BatchSettings,
) -> lapin::Result<Option<Vec<Delivery>>> {
    let Some(first) = consumer.next().await else {
        return Ok(None);
    };
    let first = first?;
    let mut requests = requests_in(&first);
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + settings.linger;
    while requests < settings.max_size {
        let next = match futures::FutureExt::now_or_never(consumer.next()) {
            Some(next) => next,
            None if settings.linger.is_zero() => break,
            None => match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(next) => next,
                Err(_elapsed) => break,
            },
        };
        match next {
            Some(delivery) => {
                let delivery = delivery?;
                requests += requests_in(&delivery);
                batch.push(delivery);
            }
            None => break,
        }
    }
    Ok(Some(batch))
}

/// The items of a batch of deliveries, in order: each envelope's requests (see
/// [`allot_shared::message::items`]), each with the id it is set aside under.
fn items_of(deliveries: &[Delivery]) -> Vec<(&[u8], Option<String>)> {
    let mut items = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str());
        let is_envelope = delivery
            .properties
            .kind()
            .as_ref()
            .map(|kind| kind.as_str())
            == Some(ENVELOPE_TYPE);
        let parts = if is_envelope {
            message::items(&delivery.data)
        } else {
            vec![delivery.data.as_slice()]
        };
        for (index, body) in parts.into_iter().enumerate() {
            let id = if is_envelope {
                message_id.map(|id| format!("{id}#{index}"))
            } else {
                message_id.map(str::to_owned)
            };
            items.push((body, id));
        }
    }
    items
}

/// How many requests a delivery carries, as its envelope's header says (1 without one).
fn requests_in(delivery: &Delivery) -> usize {
    let count = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(COUNT_HEADER))
        .and_then(|value| match value {
            AMQPValue::LongLongInt(n) => usize::try_from(*n).ok(),
            AMQPValue::LongInt(n) => usize::try_from(*n).ok(),
            _ => None,
        });
    count.unwrap_or(1).max(1)
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
/// capped backoff; a batch that keeps failing deterministically is split and retried request
/// by request (in order), and a request that still keeps failing is set aside (dead letter,
/// transaction rejected as `unprocessable`), so the partition moves on. Returns `false` if
/// shutdown came first: the batch stays unacked and is redelivered.
async fn process_until_done(
    decider: &Decider,
    partition: PartitionId,
    deliveries: &[Delivery],
    shutdown: &CancellationToken,
) -> bool {
    let items = items_of(deliveries);
    let messages: Vec<Message<'_>> = items
        .iter()
        .map(|(body, id)| Message {
            body,
            message_id: id.as_deref(),
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
