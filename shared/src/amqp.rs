//! RabbitMQ connection and topology: one durable quorum queue per partition, with
//! single-active-consumer (so any number of worker replicas may run, and the broker hands each
//! partition to one of them at a time) and a length bound that turns a flood into refused
//! publishes instead of an unbounded queue. On a cluster, each queue is replicated on a
//! configured number of nodes, its leader placed on the node that leads the fewest queues.

use crate::ids::PartitionId;
use crate::partition::queue_name;
use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

/// Opens a connection. When it fails, the owner opens a fresh one and declares its topology
/// again (the worker's session loop, the API's publisher).
///
/// Not lapin's automatic recovery: with lapin 4.12.3, a connection that dropped (broker
/// stopped) while frames were still queued for it (acks, publishes under load) stays in
/// `Reconnecting` for ever, its I/O loop "waiting for socket events" on a dead socket, so
/// consumers never came back (seen by the chaos test; lapin trace logs in the report of
/// issue 3). A fresh connection is simpler to reason about: deliveries of the dead one are
/// redelivered by RabbitMQ, and deciding is idempotent.
pub async fn connect(url: &str, connection_name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
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
    /// Replicas of each queue on a cluster (`x-quorum-initial-group-size`), with the leaders
    /// spread (`x-queue-leader-locator: balanced`); `None` sends neither argument.
    pub quorum_group_size: Option<u16>,
}

impl Topology {
    pub fn queue(&self, partition: PartitionId) -> String {
        queue_name(&self.queue_prefix, partition)
    }

    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + use<> {
        (0..self.partitions).map(PartitionId)
    }

    /// How many messages wait (ready, not delivered and unacked) in `partition`'s queue: a
    /// passive declare. One that fails (the queue is missing) closes `channel`.
    pub async fn depth(&self, channel: &Channel, partition: PartitionId) -> lapin::Result<u32> {
        let queue = channel
            .queue_declare(
                self.queue(partition).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
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
        if let Some(size) = self.quorum_group_size {
            // RabbitMQ 3.10 places a quorum queue's leader on the declaring connection's node
            // by default (`client-local`), so every leader would sit on the node the first
            // declarer happened to reach; `balanced` picks the node with the fewest leaders.
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongLongInt(i64::from(size)),
            );
            args.insert(
                "x-queue-leader-locator".into(),
                AMQPValue::LongString("balanced".into()),
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(quorum_group_size: Option<u16>) -> Topology {
        Topology {
            queue_prefix: "t".into(),
            partitions: 2,
            max_length: 10,
            quorum_group_size,
        }
    }

    #[test]
    fn a_single_node_declares_the_arguments_it_always_did() {
        let args = topology(None).arguments();
        let mut keys: Vec<&str> = args.inner().keys().map(|key| key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "x-max-length",
                "x-overflow",
                "x-queue-type",
                "x-single-active-consumer"
            ]
        );
    }

    #[test]
    fn a_cluster_replicates_each_queue_with_its_leader_balanced() {
        let args = topology(Some(3)).arguments();
        assert_eq!(
            args.inner().get("x-quorum-initial-group-size"),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert_eq!(
            args.inner().get("x-queue-leader-locator"),
            Some(&AMQPValue::LongString("balanced".into()))
        );
        assert_eq!(args.inner().len(), 6);
    }
}
