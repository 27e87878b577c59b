//! RabbitMQ connection and topology: one durable quorum queue per partition, with
//! single-active-consumer (so any number of worker replicas may run, and the broker hands each
//! partition to one of them at a time) and a length bound that turns a flood into refused
//! publishes instead of an unbounded queue.

use crate::ids::PartitionId;
use crate::partition::queue_name;
use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

/// Opens the process's one connection, with lapin's automatic recovery: after a broker restart
/// it reconnects and re-declares queues, consumers, QoS and confirm mode by itself.
pub async fn connect(url: &str, connection_name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_connection_name(connection_name.into())
        .enable_auto_recover();
    Connection::connect(url, properties)
        .await
        .with_context(|| format!("failed to connect to RabbitMQ as {connection_name}"))
}

/// The partition queues of one allot deployment.
#[derive(Debug, Clone)]
pub struct Topology {
    pub queue_prefix: String,
    pub partitions: u16,
    pub max_length: i64,
}

impl Topology {
    pub fn queue(&self, partition: PartitionId) -> String {
        queue_name(&self.queue_prefix, partition)
    }

    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + use<> {
        (0..self.partitions).map(PartitionId)
    }

    /// The queue arguments. Every declarer must pass exactly these: RabbitMQ closes the channel
    /// (PRECONDITION_FAILED) when a queue is redeclared with other arguments.
    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.max_length),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    /// Declares one partition's queue (idempotent).
    pub async fn declare_queue(
        &self,
        channel: &Channel,
        partition: PartitionId,
    ) -> anyhow::Result<()> {
        let name = self.queue(partition);
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                self.arguments(),
            )
            .await
            .with_context(|| format!("failed to declare queue {name}"))?;
        Ok(())
    }

    /// Declares every partition's queue (idempotent). Both binaries call it at start, so
    /// neither depends on the other having run first.
    pub async fn declare_all(&self, channel: &Channel) -> anyhow::Result<()> {
        for partition in self.partitions() {
            self.declare_queue(channel, partition).await?;
        }
        Ok(())
    }
}
