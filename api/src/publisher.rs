//! Publishing accepted requests to their partition queue, with publisher confirms: a request
//! counts as accepted only once RabbitMQ confirmed it stored the (persistent) message.
//!
//! Many request handlers share one confirm-mode channel; each awaits its own confirm, so
//! confirms are pipelined rather than serialised.

use allot_shared::amqp::{self, Topology};
use allot_shared::partition::partition_for;
use allot_shared::{PartitionId, ProductId, PurchaseRequest};
use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
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

/// The `result` label of `allot_api_publishes_total`: `confirmed`, `refused` by the broker
/// (queue full, unroutable), or `failed` (no confirm: timeout or connection trouble).
fn publish_result(result: &Result<(), PublishError>) -> &'static str {
    match result {
        Ok(()) => "confirmed",
        Err(PublishError::QueueFull | PublishError::Unroutable(_)) => "refused",
        Err(_) => "failed",
    }
}

/// The API's connection to RabbitMQ and its confirm-mode channel.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    topology: Topology,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Connects, declares every partition queue and enables publisher confirms.
    pub async fn connect(
        url: &str,
        topology: Topology,
        confirm_timeout: Duration,
    ) -> anyhow::Result<Self> {
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
        Ok(Self {
            connection,
            channel,
            topology,
            confirm_timeout,
        })
    }

    /// Publishes `request` as a persistent message to its partition's queue and waits for the
    /// broker's confirm.
    pub async fn publish(&self, request: &PurchaseRequest) -> Result<(), PublishError> {
        let result = self.publish_confirmed(request).await;
        metrics::counter!("allot_api_publishes_total", "result" => publish_result(&result))
            .increment(1);
        result
    }

    async fn publish_confirmed(&self, request: &PurchaseRequest) -> Result<(), PublishError> {
        let queue = self.topology.queue(self.partition_of(request.product_id));
        let properties = BasicProperties::default()
            .with_delivery_mode(2) // persistent
            .with_content_type("application/json".into())
            .with_message_id(request.transaction_id.to_string().into());
        let payload = request.to_json();
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let send = self.channel.basic_publish(
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
        self.connection.status().connected()
    }

    /// Closes the connection (after the server drained its requests).
    pub async fn close(&self) {
        if let Err(err) = self.connection.close(200, "api shutting down".into()).await {
            tracing::debug!(error = %err, "closing the RabbitMQ connection");
        }
    }
}
