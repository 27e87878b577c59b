//! RabbitMQ used directly, as a misbehaving or retrying publisher would (raw and duplicated
//! messages, batch envelopes published by hand) and as an operator would (queue depths).

use allot_shared::amqp::Topology;
use allot_shared::message::{COUNT_HEADER, ENVELOPE_TYPE, envelope};
use allot_shared::{PartitionId, ProductId, partition::partition_for};
use anyhow::{Context as _, Result, ensure};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};

/// One connection to a deployment's broker, and its partition queues.
pub struct Broker {
    connection: Connection,
    topology: Topology,
}

impl Broker {
    pub async fn connect(url: &str, topology: Topology) -> Result<Broker> {
        let connection = allot_shared::amqp::connect(url, "allot-tests")
            .await
            .context("connecting to RabbitMQ")?;
        Ok(Broker {
            connection,
            topology,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn partition_of(&self, product: i64) -> Result<PartitionId> {
        let product = ProductId::try_from(product).map_err(anyhow::Error::msg)?;
        Ok(partition_for(product, self.topology.partitions))
    }

    /// Publishes `body` to `partition`'s queue, persistent, and fails unless the broker
    /// confirms it.
    pub async fn publish(
        &self,
        partition: PartitionId,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Result<()> {
        self.publish_with(partition, body, message_id, BasicProperties::default())
            .await
    }

    /// Publishes `requests` in one batch envelope, as the API does, under `message_id`.
    pub async fn publish_envelope(
        &self,
        partition: PartitionId,
        requests: &[&[u8]],
        message_id: &str,
    ) -> Result<()> {
        let body = envelope(requests.iter().copied());
        let mut headers = FieldTable::default();
        headers.insert(
            COUNT_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(requests.len())?),
        );
        let properties = BasicProperties::default()
            .with_type(ENVELOPE_TYPE.into())
            .with_headers(headers);
        self.publish_with(partition, &body, Some(message_id), properties)
            .await
    }

    /// Publishes `body` with `properties` (made persistent), confirmed.
    pub async fn publish_with(
        &self,
        partition: PartitionId,
        body: &[u8],
        message_id: Option<&str>,
        properties: BasicProperties,
    ) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut properties = properties.with_delivery_mode(2);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        let queue = self.topology.queue(partition);
        let confirmation = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        ensure!(
            confirmation.is_ack(),
            "the broker refused a message to {queue}"
        );
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    /// Messages waiting in `partition`'s queue (not counting unacked ones).
    pub async fn depth(&self, partition: PartitionId) -> Result<u32> {
        // A passive declare of a missing queue closes its channel: one channel per read.
        let channel = self.connection.create_channel().await?;
        let depth = self
            .topology
            .depth(&channel, partition)
            .await
            .with_context(|| format!("reading the depth of {}", self.topology.queue(partition)))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(depth)
    }

    /// The deepest partition queue now.
    pub async fn deepest(&self) -> Result<u32> {
        let mut deepest = 0;
        for partition in self.topology.partitions() {
            deepest = deepest.max(self.depth(partition).await?);
        }
        Ok(deepest)
    }

    /// Messages waiting in all partition queues.
    pub async fn total_depth(&self) -> Result<u32> {
        let mut total = 0;
        for partition in self.topology.partitions() {
            total += self.depth(partition).await?;
        }
        Ok(total)
    }

    /// Deletes every partition queue (each quorum queue holds broker resources).
    pub async fn delete_queues(&self) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        for partition in self.topology.partitions() {
            let queue = self.topology.queue(partition);
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .with_context(|| format!("deleting {queue}"))?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}
