//! Everything the worker says to RabbitMQ about one partition: subscribe to its queue, take
//! the deliveries that have arrived as one batch, unpack their batch envelopes into items, and
//! ack the batch. The consumer loop ([`crate::consumer`]) calls these in that order, acking
//! only what is committed.
//!
//! The queue has single-active-consumer: when several worker replicas run, RabbitMQ delivers a
//! partition to one of them and keeps the others' consumers as standbys ([`crate::seats`]
//! spreads the partitions evenly among them).

use crate::decider::Item;
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

/// How a partition consumer batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most requests per batch (a batch may end one message past it).
    pub max_size: usize,
    /// How long to wait for more messages after the first.
    pub linger: Duration,
    /// Messages RabbitMQ may have in flight to this consumer.
    pub prefetch: u16,
}

/// Called with every batch RabbitMQ delivers to a subscription: the consumer is then the
/// queue's single active one (see [`crate::seats`]).
pub type OnDelivery = Arc<dyn Fn() + Send + Sync>;

/// One partition's subscription, on a channel of its own (a `multiple` ack is per channel).
pub struct Subscription {
    consumer: Consumer,
    partition: PartitionId,
    settings: BatchSettings,
    on_delivery: OnDelivery,
}

/// Sets the prefetch, declares `partition`'s queue (idempotent) and consumes it under the
/// consumer tag `tag`.
pub async fn subscribe(
    channel: &Channel,
    topology: &Topology,
    partition: PartitionId,
    settings: BatchSettings,
    tag: &str,
    on_delivery: OnDelivery,
) -> anyhow::Result<Subscription> {
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .context("failed to set the prefetch")?;
    topology.declare_queue(channel, partition).await?;
    let queue = topology.queue(partition);
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume {queue}"))?;
    Ok(Subscription {
        consumer,
        partition,
        settings,
        on_delivery,
    })
}

impl Subscription {
    /// Waits for the next message, then takes whatever else arrives within the linger time, up
    /// to the batch size in requests (a message's envelope may carry many; the batch may end a
    /// message past the size). An error when the consumer ended or the connection dropped: the
    /// session ends, a fresh one subscribes again, and the unacked deliveries go back to the
    /// queue, to be decided (idempotently) again.
    pub async fn next_batch(&mut self) -> anyhow::Result<Vec<Delivery>> {
        let partition = self.partition;
        let interrupted = |err| {
            anyhow::Error::new(err).context(format!(
                "the consumer of partition {partition} was interrupted"
            ))
        };
        let Some(first) = self.consumer.next().await else {
            anyhow::bail!("the consumer of partition {partition} was cancelled");
        };
        let first = first.map_err(interrupted)?;
        (self.on_delivery)();
        let mut requests = requests_in(&first);
        let mut batch = vec![first];
        let linger = self.settings.linger;
        let deadline = tokio::time::Instant::now() + linger;
        while requests < self.settings.max_size {
            let next = match futures::FutureExt::now_or_never(self.consumer.next()) {
                Some(next) => next,
                None if linger.is_zero() => break,
                None => match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                    Ok(next) => next,
                    Err(_elapsed) => break,
                },
            };
            match next {
                Some(delivery) => {
                    let delivery = delivery.map_err(interrupted)?;
                    requests += requests_in(&delivery);
                    batch.push(delivery);
                }
                None => break,
            }
        }
        Ok(batch)
    }

    /// Acks every delivery of the batch with one `multiple` ack on the last one. Call it only
    /// once the batch is committed: a lost ack means a redelivery, which replays.
    pub async fn ack(&self, deliveries: &[Delivery]) {
        let partition = self.partition;
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
}

/// The items of a batch of deliveries, in order: each envelope's requests (see
/// [`allot_shared::message::items`]), each with the id it is set aside under
/// (`<message_id>#<index>`); a message that is not an envelope is one item, under its own
/// `message_id`.
pub fn items_of(deliveries: &[Delivery]) -> Vec<Item<'_>> {
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
            items.push(Item {
                body,
                message_id: id,
            });
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
