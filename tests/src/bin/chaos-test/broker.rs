//! Talking to RabbitMQ directly, as a misbehaving or retrying publisher would: publishing raw
//! (poison) and duplicated messages, and reading queue depths.

use allot_shared::amqp::Topology;
use allot_shared::{PartitionId, ProductId, partition::partition_for};
use anyhow::{Context as _, Result, ensure};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

pub struct Broker {
    connection: Connection,
    topology: Topology,
}

impl Broker {
    pub async fn connect(url: &str, topology: Topology) -> Result<Broker> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ")?;
        Ok(Broker {
            connection,
            topology,
        })
    }

    pub fn partition_of(&self, product: i64) -> Result<PartitionId> {
        let product = ProductId::try_from(product).map_err(anyhow::Error::msg)?;
        Ok(partition_for(product, self.topology.partitions))
    }

    /// Publishes `body` (persistent, confirmed) to `partition`'s queue.
    pub async fn publish(
        &self,
        partition: PartitionId,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Result<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut properties = BasicProperties::default().with_delivery_mode(2);
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

    /// The deepest partition queue now.
    pub async fn deepest_queue(&self) -> Result<u32> {
        let channel = self.connection.create_channel().await?;
        let mut deepest = 0;
        for partition in self.topology.partitions() {
            let queue = channel
                .queue_declare(
                    self.topology.queue(partition).as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            deepest = deepest.max(queue.message_count());
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(deepest)
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}
