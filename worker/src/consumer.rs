//! The consumer loop of one partition: take what has arrived (up to a batch), let the
//! [`Decider`] process it, retrying until it succeeds, then ack the whole batch at once
//! (`multiple`). Never an ack before the commit.
//!
//! The queue has single-active-consumer: when several worker replicas run, RabbitMQ delivers a
//! partition to one of them and keeps the others' consumers as standbys.

use crate::decider::{Decider, Message};
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

/// Consumes `partition` on its own `channel` until `shutdown` is cancelled. A batch being
/// processed is finished (committed and acked) first; one still failing is left unacked for
/// redelivery.
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
            Err(err) => {
                // The connection dropped. Deliveries from before the recovery cannot be acked:
                // RabbitMQ redelivers them, and processing them again is idempotent.
                tracing::warn!(%partition, error = %err, "consumer interrupted, waiting for recovery");
                channel.wait_for_recovery(err).await.with_context(|| {
                    format!("the channel of partition {partition} did not recover")
                })?;
                tracing::info!(%partition, "consumer recovered");
                continue;
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

/// Processes a batch, retrying with a growing pause until it succeeds. Returns `false` if
/// shutdown came first.
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
    let mut pause = Duration::from_millis(50);
    loop {
        match decider.process_batch(partition, &messages).await {
            Ok(_) => return true,
            Err(err) => {
                tracing::warn!(%partition, error = ?err, retry_in = ?pause, "batch failed; it will be retried");
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Acks every delivery of the batch with one `multiple` ack on the last one.
async fn ack_all(partition: PartitionId, deliveries: &[Delivery]) {
    let Some(last) = deliveries.last() else {
        return;
    };
    if let Err(err) = last.acker.ack(BasicAckOptions { multiple: true }).await {
        // The batch is committed; if the ack is lost it is redelivered and replayed.
        tracing::warn!(%partition, error = %err, "could not ack a committed batch; it will be replayed");
    }
}
