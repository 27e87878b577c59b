//! The API's side of the status store: record a transaction as pending when it is accepted,
//! and read statuses back, from Redis first and PostgreSQL (the source of truth for decided
//! transactions) when Redis has none.

use allot_shared::status_store::transaction_key;
use allot_shared::{TransactionId, TransactionView};
use anyhow::Context;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, ExistenceCheck, SetOptions};

#[derive(Clone)]
pub struct StatusStore {
    redis: ConnectionManager,
    prefix: String,
}

impl StatusStore {
    pub fn new(redis: ConnectionManager, prefix: String) -> Self {
        Self { redis, prefix }
    }

    /// Records a newly accepted transaction as pending. `NX`: if the worker was faster and
    /// already wrote the final status, that status stays.
    pub async fn record_pending(&self, view: &TransactionView) -> anyhow::Result<()> {
        let json = serde_json::to_string(view).context("failed to serialise a status")?;
        let options = SetOptions::default().conditional_set(ExistenceCheck::NX);
        let _: Option<String> = self
            .redis
            .clone()
            .set_options(
                transaction_key(&self.prefix, view.transaction_id),
                json,
                options,
            )
            .await
            .context("failed to record a pending status in Redis")?;
        Ok(())
    }

    /// Removes the pending record of a request that was not accepted after all (its publish
    /// failed). Best effort: a leftover record is only visible to someone who guesses the id.
    pub async fn forget(&self, id: TransactionId) {
        let result: redis::RedisResult<()> = self
            .redis
            .clone()
            .del(transaction_key(&self.prefix, id))
            .await;
        if let Err(err) = result {
            tracing::warn!(transaction_id = %id, error = %err, "could not remove the pending status of a refused request");
        }
    }

    /// The status Redis holds for `id`, if any.
    pub async fn get(&self, id: TransactionId) -> anyhow::Result<Option<TransactionView>> {
        let json: Option<String> = self
            .redis
            .clone()
            .get(transaction_key(&self.prefix, id))
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
}
