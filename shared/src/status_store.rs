//! Transaction statuses in Redis, the one store both binaries use: the API records a batch of
//! accepted requests as `pending` in one pipelined round trip before it publishes them; the
//! worker, after its commit, overwrites them with their final outcome and announces the batch on
//! a channel (`PUBLISH`, in the same pipeline), so that the API can wake whoever waits on those
//! ids ([`decisions_channel`]). Keys are `<prefix>:tx:<transaction id>`, values the JSON of
//! [`TransactionView`]. No key expires: an accepted id must never stop answering. PostgreSQL
//! stays the source of truth for decided transactions.

use crate::ids::TransactionId;
use crate::outcome::TransactionView;
use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ExistenceCheck, SetOptions};
use std::time::Duration;

/// The Redis key of a transaction's status.
pub fn transaction_key(prefix: &str, id: TransactionId) -> String {
    format!("{prefix}:tx:{id}")
}

/// The Redis channel on which the worker announces each committed batch: one message per batch,
/// the JSON array of its final [`TransactionView`]s.
pub fn decisions_channel(prefix: &str) -> String {
    format!("{prefix}:decided")
}

/// One multiplexed, self-reconnecting Redis connection for the whole process; clone it freely.
///
/// Commands time out after `response_timeout`, so a slow or vanished Redis turns into an error
/// the caller handles (a 503, a retried batch) rather than a hung request.
pub async fn connect(url: &str, response_timeout: Duration) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url).context("invalid Redis URL")?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, config)
        .await
        .context("failed to connect to Redis")
}

/// Statuses of one deployment (its key prefix) in Redis.
#[derive(Clone)]
pub struct StatusStore {
    redis: ConnectionManager,
    prefix: String,
}

impl StatusStore {
    pub fn new(redis: ConnectionManager, prefix: String) -> Self {
        Self { redis, prefix }
    }

    /// The key prefix (`<prefix>:tx:<id>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Records newly accepted transactions as pending, in one pipeline. `NX`: if the worker was
    /// faster and already wrote a final status, that status stays.
    pub async fn record_pending(&self, views: &[TransactionView]) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        self.add_pending(&mut pipe, views)?;
        pipe.query_async::<()>(&mut self.redis.clone())
            .await
            .context("failed to record pending statuses in Redis")
    }

    /// Adds [`StatusStore::record_pending`]'s commands to `pipe` (their replies ignored), for a
    /// caller that sends them with its own (the API's intake, with the queue bound's
    /// reservation).
    pub fn add_pending(
        &self,
        pipe: &mut redis::Pipeline,
        views: &[TransactionView],
    ) -> anyhow::Result<()> {
        let options = SetOptions::default().conditional_set(ExistenceCheck::NX);
        for view in views {
            let json = serde_json::to_string(view).context("failed to serialise a status")?;
            pipe.set_options(self.key(view.transaction_id), json, options.clone())
                .ignore();
        }
        Ok(())
    }

    /// Removes the pending records of requests that were not accepted after all (their publish
    /// failed), in one pipeline. Best effort: a leftover record is only visible to someone who
    /// guesses an id.
    pub async fn forget(&self, ids: &[TransactionId]) {
        if ids.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.del(self.key(*id)).ignore();
        }
        if let Err(err) = pipe.query_async::<()>(&mut self.redis.clone()).await {
            tracing::warn!(count = ids.len(), error = %err, "could not remove the pending statuses of refused requests");
        }
    }

    /// Overwrites each transaction's status with its final one and announces them on
    /// [`decisions_channel`], in one pipeline.
    pub async fn record_decided(&self, views: &[TransactionView]) -> anyhow::Result<()> {
        if views.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for view in views {
            let json = serde_json::to_string(view).context("failed to serialise a status")?;
            pipe.set(self.key(view.transaction_id), json).ignore();
        }
        let announcement = serde_json::to_string(views).context("failed to serialise statuses")?;
        pipe.publish(decisions_channel(&self.prefix), announcement)
            .ignore();
        pipe.query_async::<()>(&mut self.redis.clone())
            .await
            .context("failed to record final statuses in Redis")
    }

    /// The status Redis holds for `id`, if any.
    pub async fn get(&self, id: TransactionId) -> anyhow::Result<Option<TransactionView>> {
        let json: Option<String> = redis::cmd("GET")
            .arg(self.key(id))
            .query_async(&mut self.redis.clone())
            .await
            .context("failed to read a status from Redis")?;
        json.map(|json| serde_json::from_str(&json).context("a status in Redis is not valid JSON"))
            .transpose()
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.redis.clone())
            .await
            .context("Redis did not answer PING")?;
        Ok(())
    }

    fn key(&self, id: TransactionId) -> String {
        transaction_key(&self.prefix, id)
    }
}
