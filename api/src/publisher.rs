//! Publishing accepted requests to their partition queue, with publisher confirms: a request
//! counts as accepted only once RabbitMQ confirmed it stored the (persistent) message.
//!
//! Many request handlers share one confirm-mode channel; each awaits its own confirm, so
//! confirms are pipelined rather than serialised. A connection that fails is replaced by a
//! fresh one in the background; while there is none, publishes are refused at once.

use allot_shared::amqp::{self, Topology};
use allot_shared::partition::partition_for;
use allot_shared::{PartitionId, ProductId, PurchaseRequest};
use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

/// The API's connection to RabbitMQ and its confirm-mode channel. When the connection fails
/// (the broker restarts), a background task opens a fresh one, declares the queues and enables
/// confirms again, retrying with a capped backoff; meanwhile publishes are refused at once.
pub struct Publisher {
    link: Arc<RwLock<Arc<Link>>>,
    topology: Topology,
    confirm_timeout: Duration,
    reconnect: tokio::task::JoinHandle<()>,
}

/// One connection and its confirm channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    async fn open(url: &str, topology: &Topology) -> anyhow::Result<Link> {
        let connection = amqp::connect(url, "allot-api").await?;
        let channel = connection
            .create_channel()
            .await
            .context("failed to open the publish channel")?;
        topology.declare_all(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("failed to enable publisher confirms")?;
        Ok(Link {
            connection,
            channel,
        })
    }

    fn is_up(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// Replaces a link that went down, for as long as the API runs.
async fn keep_connected(url: String, topology: Topology, link: Arc<RwLock<Arc<Link>>>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let up = link.read().expect("publisher link lock").is_up();
        if up {
            pause = Duration::from_millis(100);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        match Link::open(&url, &topology).await {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *link.write().expect("publisher link lock"),
                    Arc::new(fresh),
                );
                tracing::info!("reconnected to RabbitMQ");
                drop(old);
            }
            Err(err) => {
                tracing::warn!(error = ?err, retry_in = ?pause, "RabbitMQ unreachable; reconnecting");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reconnect.abort();
    }
}

impl Publisher {
    /// Connects, declares every partition queue and enables publisher confirms.
    pub async fn connect(
        url: &str,
        topology: Topology,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let link = Arc::new(RwLock::new(Arc::new(Link::open(url, &topology).await?)));
        let reconnect = tokio::spawn(keep_connected(
            url.to_owned(),
            topology.clone(),
            link.clone(),
        ));
        Ok(Self {
            link,
            topology,
            confirm_timeout,
            reconnect,
        })
    }

    /// Publishes `request` as a persistent message to its partition's queue and waits for the
    /// broker's confirm.
    pub async fn publish(&self, request: &PurchaseRequest) -> Result<(), PublishError> {
        let channel = {
            let link = self.link.read().expect("publisher link lock");
            if !link.is_up() {
                // A down broker must cost a client milliseconds, not the confirm timeout.
                return Err(PublishError::Disconnected);
            }
            link.channel.clone()
        };
        let queue = self.topology.queue(self.partition_of(request.product_id));
        let properties = BasicProperties::default()
            .with_delivery_mode(2) // persistent
            .with_content_type("application/json".into())
            .with_message_id(request.transaction_id.to_string().into());
        let payload = request.to_json();
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let send = channel.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
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

    /// The partition that decides `product`.
    pub fn partition_of(&self, product: ProductId) -> PartitionId {
        partition_for(product, self.topology.partitions)
    }

    /// Whether the connection to the broker is up.
    pub fn is_connected(&self) -> bool {
        self.link.read().expect("publisher link lock").is_up()
    }

    /// Closes the connection (after the server drained its requests).
    pub async fn close(&self) {
        self.reconnect.abort();
        let link = self.link.read().expect("publisher link lock").clone();
        if let Err(err) = link.connection.close(200, "api shutting down".into()).await {
            tracing::debug!(error = %err, "closing the RabbitMQ connection");
        }
    }
}
