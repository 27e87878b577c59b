//! Which of an account's transactions are still pending, so that its history can list them.
//!
//! Pending transactions live in Redis (their status) and in their partition queue until a
//! worker decides them; PostgreSQL only has decided ones. So when an *account* buys (a buyer's
//! token, or staff on an account's behalf), the API adds the transaction id to a small sorted
//! set per account, `<prefix>:pending:<user id>`, in one Redis round trip before the request is
//! published. Anonymous purchases (ids below 10^15) are never indexed: their path gains no I/O,
//! and their history (staff only) lists decided transactions.
//!
//! The set is cleaned as it is read: an id whose status is final (so PostgreSQL has it) or gone
//! (a refused request) is removed. It keeps at most [`MAX_PENDING`] ids (the newest) and
//! expires [`KEEP_FOR`] after the account's last purchase, so an account that never reads its
//! history does not grow it forever.

use crate::state::AppState;
use allot_shared::status_store::transaction_key;
use allot_shared::{Status, TransactionId, TransactionView, UserId};
use anyhow::Context;
use std::time::Duration;

/// The most pending ids kept per account.
pub const MAX_PENDING: isize = 1000;
/// How long an account's set outlives its last purchase.
pub const KEEP_FOR: Duration = Duration::from_secs(7 * 24 * 60 * 60);

fn key(prefix: &str, user: UserId) -> String {
    format!("{prefix}:pending:{user}")
}

/// Records `id` as a pending transaction of `user` if `user` is an account (a no-op, and no
/// I/O, for anonymous ids). Call it before publishing; on failure refuse the request.
pub async fn note(state: &AppState, user: UserId, id: TransactionId) -> anyhow::Result<()> {
    if !super::is_account(user) {
        return Ok(());
    }
    let key = key(state.statuses.prefix(), user);
    redis::pipe()
        .zadd(&key, id.to_string(), 0)
        .ignore()
        .zremrangebyrank(&key, 0, -(MAX_PENDING + 1))
        .ignore()
        .pexpire(&key, KEEP_FOR.as_millis() as i64)
        .ignore()
        .query_async::<()>(&mut state.redis.clone())
        .await
        .context("failed to index a pending transaction in Redis")
}

/// Removes `id` again after its request was refused (best effort: a leftover is dropped at the
/// next read, its status being gone).
pub async fn forget(state: &AppState, user: UserId, id: TransactionId) {
    if !super::is_account(user) {
        return;
    }
    let removed: redis::RedisResult<()> = redis::cmd("ZREM")
        .arg(key(state.statuses.prefix(), user))
        .arg(id.to_string())
        .query_async(&mut state.redis.clone())
        .await;
    if let Err(err) = removed {
        tracing::debug!(error = %err, "could not unindex a refused transaction");
    }
}

/// The pending transactions of `user`, as Redis holds them (any order).
pub async fn read(state: &AppState, user: UserId) -> anyhow::Result<Vec<TransactionView>> {
    let prefix = state.statuses.prefix();
    let key = key(prefix, user);
    let mut redis = state.redis.clone();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .context("failed to read pending transactions from Redis")?;
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<TransactionId> = members
        .iter()
        .filter_map(|member| member.parse().ok().map(TransactionId))
        .collect();
    let statuses: Vec<Option<String>> = redis::cmd("MGET")
        .arg(
            ids.iter()
                .map(|id| transaction_key(prefix, *id))
                .collect::<Vec<_>>(),
        )
        .query_async(&mut redis)
        .await
        .context("failed to read pending statuses from Redis")?;
    let mut pending = Vec::new();
    let mut done = Vec::new();
    for (id, status) in ids.iter().zip(statuses) {
        let view = status.and_then(|json| serde_json::from_str::<TransactionView>(&json).ok());
        match view {
            Some(view) if view.status == Status::Pending && view.user_id == user => {
                pending.push(view)
            }
            _ => done.push(id.to_string()),
        }
    }
    if !done.is_empty() {
        let cleaned: redis::RedisResult<()> = redis::cmd("ZREM")
            .arg(&key)
            .arg(done)
            .query_async(&mut redis)
            .await;
        if let Err(err) = cleaned {
            tracing::debug!(error = %err, "could not clean an account's pending set");
        }
    }
    Ok(pending)
}
