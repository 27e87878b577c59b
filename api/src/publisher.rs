//! Publishing batch envelopes to their partition queue, with publisher confirms: the requests
//! of a message count as accepted only once RabbitMQ confirmed it stored the (persistent)
//! message. [`crate::intake`] decides what goes into a message.
//!
//! The partitions' intake lanes share a few confirm-mode channels, taken in turn; each awaits
//! its own confirm, so confirms are pipelined rather than serialised. More than one channel because
//! a channel is one sequence of frames and confirms on the broker side: under load a single one
//! became the accept path's bottleneck (see docs/benchmarks.md).
//!
//! The connection goes to whichever address of `ALLOT_AMQP_URLS` answers
//! ([`allot_shared::brokers::Failover`]). A connection that fails is replaced by a fresh one in
//! the background, on the next address first, with a capped backoff between rounds; while there
//! is none, publishes are refused at once. While it is up, the same background task reads every
//! partition queue's depth for the API's own bound below the broker's limit, shared by every
//! API instance ([`crate::backlog`]).

use crate::backlog::{self, Backlog, Place};
use allot_shared::amqp::Topology;
use allot_shared::brokers::{BrokerAddress, Brokers, Failover};
use allot_shared::message::{COUNT_HEADER, ENVELOPE_TYPE};
use allot_shared::partition::{partition_for, shard_partition};
use allot_shared::{PartitionId, ProductId, Shard};
use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How long opening the channels of a fresh connection, declaring the queues and enabling
/// confirms may take before the address counts as failed (a node that answers the handshake
/// but cannot serve its queues, say without a quorum, must not hold the API).
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest pause between two rounds over the addresses.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Why a publish did not become an accepted request.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message: the partition queue is at its length limit.
    #[error("the order queue is full")]
    QueueFull,
    /// The broker did not confirm in time; it may or may not have stored the message.
    #[error("the broker did not confirm in time")]
    Timeout,
    /// No route to the partition queue (it does not exist): a deployment error.
    #[error("the message could not be routed to queue {0}")]
    Unroutable(String),
    /// The publish channel is not connected (the broker is down, or a fresh connection is
    /// still being opened): refused at once, nothing was sent.
    #[error("the broker connection is down")]
    Disconnected,
    /// The publish could not even be sent: the connection or channel is down (for example
    /// while the broker restarts). Nothing reached the broker.
    #[error("the broker is unreachable: {0}")]
    Unreachable(lapin::Error),
    /// The message was sent but the connection failed before its confirm arrived; the broker
    /// may or may not have stored it.
    #[error("the connection failed before the broker confirmed: {0}")]
    ConfirmLost(lapin::Error),
}

impl PublishError {
    /// Whether the broker may have stored the message although it was not confirmed.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, PublishError::Timeout | PublishError::ConfirmLost(_))
    }
}

/// The `result` label of `allot_api_publishes_total`: `confirmed`, `refused` (queue full, by
/// the API's bound or the broker; unroutable), or `failed` (no confirm: timeout or connection
/// trouble).
fn publish_result(result: &Result<(), PublishError>) -> &'static str {
    match result {
        Ok(()) => "confirmed",
        Err(PublishError::QueueFull | PublishError::Unroutable(_)) => "refused",
        Err(_) => "failed",
    }
}

/// The API's connection to RabbitMQ and its confirm-mode channels. When the connection fails
/// (the broker node stops), a background task opens a fresh one (on the next address of the
/// list first), declares the queues and enables confirms again, retrying with a capped
/// backoff; meanwhile publishes are refused at once.
pub struct Publisher {
    link: Arc<RwLock<Arc<Link>>>,
    /// The next channel to use (modulo their number).
    next: AtomicUsize,
    topology: Topology,
    backlog: Backlog,
    confirm_timeout: Duration,
    reconnect: tokio::task::JoinHandle<()>,
}

/// One connection and its confirm-mode channels, used round-robin.
struct Link {
    connection: Connection,
    channels: Vec<Channel>,
    /// The broker address the connection uses.
    address: BrokerAddress,
}

impl Link {
    /// One round over the addresses: the first that answers and sets up in time. An address
    /// that answers but fails its setup is left, and the next one tried.
    async fn open(
        failover: &mut Failover,
        topology: &Topology,
        channels: usize,
    ) -> anyhow::Result<Link> {
        let mut failures = Vec::new();
        for _ in 0..failover.brokers().addresses().len() {
            let (connection, address) = match failover.connect().await {
                Ok(connected) => connected,
                Err(err) => {
                    failures.push(format!("{err:#}"));
                    break; // a whole round answered nothing
                }
            };
            let setup = Link::set_up(&connection, topology, channels);
            let failure = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
                Ok(Ok(opened)) => {
                    return Ok(Link {
                        connection,
                        channels: opened,
                        address,
                    });
                }
                Ok(Err(err)) => format!("{address}: {err:#}"),
                Err(_elapsed) => format!("{address}: setup took over {SETUP_TIMEOUT:?}"),
            };
            tracing::warn!(broker = %address, error = %failure, "RabbitMQ connection could not be set up; trying the next address");
            failures.push(failure);
            failover.lost();
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(200, "setup failed".into()),
            )
            .await;
        }
        anyhow::bail!("{}", failures.join("; "))
    }

    async fn set_up(
        connection: &Connection,
        topology: &Topology,
        channels: usize,
    ) -> anyhow::Result<Vec<Channel>> {
        let mut opened = Vec::with_capacity(channels.max(1));
        for _ in 0..channels.max(1) {
            let channel = connection
                .create_channel()
                .await
                .context("failed to open a publish channel")?;
            if opened.is_empty() {
                topology.declare_all(&channel).await?;
            }
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("failed to enable publisher confirms")?;
            opened.push(channel);
        }
        Ok(opened)
    }

    fn is_up(&self) -> bool {
        self.connection.status().connected()
            && self
                .channels
                .iter()
                .all(|channel| channel.status().connected())
    }
}

/// Replaces a link that went down, and reads the queue depths while it is up, for as long as
/// the API runs.
async fn keep_connected(
    mut failover: Failover,
    topology: Topology,
    channels: usize,
    link: Arc<RwLock<Arc<Link>>>,
    backlog: Backlog,
) {
    let mut pause = Duration::from_millis(100);
    let mut probe = None;
    let mut was_up = true;
    loop {
        let current = link.read().expect("publisher link lock").clone();
        if current.is_up() {
            pause = Duration::from_millis(100);
            read_depths(&current, &topology, &backlog, &mut probe).await;
            tokio::time::sleep(backlog::POLL_EVERY).await;
            continue;
        }
        if was_up {
            tracing::warn!(broker = %current.address, "the RabbitMQ connection is down; connecting again, next address first");
            failover.lost();
            was_up = false;
        }
        probe = None;
        match Link::open(&mut failover, &topology, channels).await {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *link.write().expect("publisher link lock"),
                    Arc::new(fresh),
                );
                tracing::info!(broker = %link.read().expect("publisher link lock").address, "reconnected to RabbitMQ");
                was_up = true;
                drop(old);
            }
            Err(err) => {
                tracing::warn!(error = %format_args!("{err:#}"), retry_in = ?pause, "RabbitMQ unreachable; reconnecting");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// Reads every partition queue's depth (passive declares on a channel of their own: a failed
/// one closes its channel) into the shared `backlog`. A round whose Redis part fails changes
/// nothing (the estimates stay as they are, erring on the full side).
async fn read_depths(
    link: &Link,
    topology: &Topology,
    backlog: &Backlog,
    probe: &mut Option<Channel>,
) {
    if !probe
        .as_ref()
        .is_some_and(|channel| channel.status().connected())
    {
        *probe = link.connection.create_channel().await.ok();
    }
    let Some(channel) = probe.as_ref() else {
        return;
    };
    let reads = match backlog.begin_reads().await {
        Ok(reads) => reads,
        Err(err) => {
            tracing::debug!(error = %err, "could not read the queue bound from Redis");
            return;
        }
    };
    let mut depths = Vec::with_capacity(usize::from(topology.partitions));
    for partition in topology.partitions() {
        match topology.depth(channel, partition).await {
            Ok(depth) => depths.push(Some(i64::from(depth))),
            Err(err) => {
                tracing::debug!(error = %err, "could not read a queue's depth");
                *probe = None;
                break;
            }
        }
    }
    depths.resize(usize::from(topology.partitions), None);
    if let Err(err) = backlog.end_reads(reads, &depths).await {
        tracing::debug!(error = %err, "could not record the queue depths in Redis");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reconnect.abort();
    }
}

impl Publisher {
    /// Connects to the first address of `brokers` that answers, declares every partition queue
    /// and opens `channels` confirm-mode channels; fails if no address answers. `backlog` is the
    /// queues' bound, shared with the other API instances.
    pub async fn connect(
        brokers: Brokers,
        topology: Topology,
        backlog: Backlog,
        confirm_timeout: Duration,
        channels: usize,
    ) -> anyhow::Result<Self> {
        tracing::info!(brokers = %brokers, "RabbitMQ addresses");
        let mut failover = Failover::new(brokers, "allot-api");
        let link = Link::open(&mut failover, &topology, channels).await?;
        let link = Arc::new(RwLock::new(Arc::new(link)));
        let reconnect = tokio::spawn(keep_connected(
            failover,
            topology.clone(),
            channels,
            link.clone(),
            backlog.clone(),
        ));
        Ok(Self {
            link,
            next: AtomicUsize::new(0),
            topology,
            backlog,
            confirm_timeout,
            reconnect,
        })
    }

    /// Publishes `body`, a batch envelope of `requests` requests (see
    /// [`allot_shared::message`]), as one persistent message to `partition`'s queue and waits
    /// for the broker's confirm.
    /// `place` is the message's place in the queue's bound ([`Backlog::reserve_with`]); `None`
    /// (the bound refused one) refuses the publish as [`PublishError::QueueFull`].
    pub async fn publish(
        &self,
        partition: PartitionId,
        body: &[u8],
        requests: usize,
        place: Option<Place>,
    ) -> Result<(), PublishError> {
        let result = match place {
            Some(place) => {
                self.publish_confirmed(partition, body, requests, place)
                    .await
            }
            None => Err(PublishError::QueueFull),
        };
        metrics::counter!("allot_api_publishes_total", "result" => publish_result(&result))
            .increment(1);
        result
    }

    async fn publish_confirmed(
        &self,
        partition: PartitionId,
        body: &[u8],
        requests: usize,
        place: Place,
    ) -> Result<(), PublishError> {
        let channel = {
            let link = self.link.read().expect("publisher link lock");
            if !link.is_up() {
                // A down broker must cost a client milliseconds, not the confirm timeout.
                place.give_back_later();
                return Err(PublishError::Disconnected);
            }
            let turn = self.next.fetch_add(1, Ordering::Relaxed);
            link.channels[turn % link.channels.len()].clone()
        };
        let result = self
            .send_and_confirm(&channel, partition, body, requests)
            .await;
        // Settled with the next round trip: the requests' answers need not wait for Redis, and
        // until it is settled the place counts as in flight (the estimate errs on the full side).
        if result.is_ok() || result.as_ref().is_err_and(PublishError::is_ambiguous) {
            place.keep_later(); // stored, or perhaps stored
        } else {
            place.give_back_later();
        }
        result
    }

    /// The queues' bound, shared with the other API instances.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    async fn send_and_confirm(
        &self,
        channel: &Channel,
        partition: PartitionId,
        body: &[u8],
        requests: usize,
    ) -> Result<(), PublishError> {
        let queue = self.topology.queue(partition);
        let mut headers = FieldTable::default();
        headers.insert(
            COUNT_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(requests).unwrap_or(i64::MAX)),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2) // persistent
            .with_content_type("application/json".into())
            .with_type(ENVELOPE_TYPE.into())
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_headers(headers);
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let send = channel.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        );
        let confirm = match tokio::time::timeout_at(deadline, send).await {
            Err(_elapsed) => return Err(PublishError::Timeout),
            Ok(Err(err)) => return Err(PublishError::Unreachable(err)),
            Ok(Ok(confirm)) => confirm,
        };
        match tokio::time::timeout_at(deadline, confirm).await {
            Err(_elapsed) => Err(PublishError::Timeout),
            Ok(Err(err)) => Err(PublishError::ConfirmLost(err)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(PublishError::Unroutable(queue)),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::QueueFull),
            Ok(Ok(Confirmation::NotRequested)) => {
                unreachable!("the publish channel is in confirm mode")
            }
        }
    }

    /// Every partition this publisher serves.
    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + use<> {
        self.topology.partitions()
    }

    /// The partition that decides `product`.
    pub fn partition_of(&self, product: ProductId) -> PartitionId {
        partition_for(product, self.topology.partitions)
    }

    /// How many partitions there are (`ALLOT_PARTITIONS`): the most shards a product may have.
    pub fn partition_count(&self) -> u16 {
        self.topology.partitions
    }

    /// The partition that decides `shard` of `product` (see [`shard_partition`]).
    pub fn partition_of_shard(&self, product: ProductId, shard: Shard) -> PartitionId {
        shard_partition(product, shard, self.topology.partitions)
    }

    /// Whether the connection to the broker is up.
    pub fn is_connected(&self) -> bool {
        self.link.read().expect("publisher link lock").is_up()
    }

    /// Closes the connection (after the server drained its requests).
    pub async fn close(&self) {
        self.reconnect.abort();
        let link = self.link.read().expect("publisher link lock").clone();
        // Bounded: a node that hangs must not hold the API's exit.
        let close = link.connection.close(200, "api shutting down".into());
        match tokio::time::timeout(Duration::from_secs(5), close).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "closing the RabbitMQ connection"),
            Err(_elapsed) => tracing::debug!("closing the RabbitMQ connection timed out"),
        }
    }
}
