//! Transaction statuses in Redis: the API writes `pending` on acceptance, the worker overwrites
//! it with the final outcome after its commit. Keys are `<prefix>:tx:<transaction id>`, values
//! the JSON of [`TransactionView`](crate::TransactionView). No key expires: an accepted id must
//! never stop answering. PostgreSQL stays the source of truth for decided transactions.

use crate::ids::TransactionId;
use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// The Redis key of a transaction's status.
pub fn transaction_key(prefix: &str, id: TransactionId) -> String {
    format!("{prefix}:tx:{id}")
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
