//! Login sessions: a row per login in `sessions`, and the revocations every instance must know.
//!
//! A token is signed ([`super::tokens`]), so it stays genuine until it expires; a logout makes
//! it worthless sooner by revoking its session. Checking a token must cost no I/O, so each API
//! instance keeps the set of revoked, unexpired sessions in memory ([`Revocations`]):
//! - the instance that takes a logout adds the session at once, after the database update, so
//!   the token is refused there from the logout's answer on;
//! - every instance reads the revocations from PostgreSQL before it serves, then again every
//!   `ALLOT_REVOCATION_REFRESH_MS` ([`Revocations::start_refresher`]), so another instance
//!   refuses the token within one refresh period (while PostgreSQL answers; an instance that
//!   cannot read keeps what it knew and catches up once it can).
//!
//! A session's entry is dropped once the session has expired: its token is refused for that
//! reason anyway.

use allot_shared::UserId;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How far back each refresh looks before the latest revocation it saw. A revocation's
/// `revoked_at` is its transaction's start, so one committed late may carry a time before one
/// seen earlier; re-reading this margin catches it.
const OVERLAP: TimeDelta = TimeDelta::seconds(60);

/// Records a new session of `user`, valid from `created_at` to `expires_at`.
pub async fn open(
    pool: &PgPool,
    session: Uuid,
    user: UserId,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(session)
    .bind(user.get())
    .bind(created_at)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks `session` revoked (if it was not already).
pub async fn revoke(pool: &PgPool, session: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
        .bind(session)
        .execute(pool)
        .await?;
    Ok(())
}

/// The revoked sessions that have not expired yet, with their expiry.
#[derive(Debug, Default)]
pub struct Revocations {
    sessions: RwLock<HashMap<Uuid, DateTime<Utc>>>,
}

impl Revocations {
    /// Whether `session` was revoked (as far as this instance knows).
    pub fn contains(&self, session: Uuid) -> bool {
        self.sessions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&session)
    }

    /// Records a revocation this instance just wrote.
    pub fn insert(&self, session: Uuid, expires_at: DateTime<Utc>) {
        self.write().insert(session, expires_at);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Uuid, DateTime<Utc>>> {
        self.sessions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the revocations made since `since` (all of them if `None`) and forgets expired
    /// ones; returns the latest `revoked_at` read, the next call's `since`.
    pub async fn refresh(
        &self,
        pool: &PgPool,
        since: Option<DateTime<Utc>>,
    ) -> sqlx::Result<Option<DateTime<Utc>>> {
        let rows: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, expires_at, revoked_at FROM sessions \
             WHERE revoked_at IS NOT NULL AND ($1::timestamptz IS NULL OR revoked_at >= $1) \
               AND expires_at > now()",
        )
        .bind(since.map(|since| since - OVERLAP))
        .fetch_all(pool)
        .await?;
        let latest = rows.iter().map(|(_, _, revoked)| *revoked).max().max(since);
        let now = Utc::now();
        let mut sessions = self.write();
        sessions.retain(|_, expires_at| *expires_at > now);
        sessions.extend(rows.into_iter().map(|(id, expires, _)| (id, expires)));
        Ok(latest)
    }

    /// Reads every revocation once (before the API serves: a token revoked before this
    /// instance started is refused from its first request), then refreshes every `every` for
    /// as long as the API runs.
    pub async fn start_refresher(self: Arc<Self>, pool: PgPool, every: Duration) -> JoinHandle<()> {
        let mut since = match self.refresh(&pool, None).await {
            Ok(latest) => latest,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the revoked sessions; retrying");
                None
            }
        };
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                match self.refresh(&pool, since).await {
                    Ok(latest) => since = latest,
                    Err(err) => {
                        tracing::warn!(error = %err, "could not refresh the revoked sessions; keeping the last known set")
                    }
                }
            }
        })
    }
}
