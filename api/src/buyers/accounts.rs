//! The `users` table: sign-up and the lookup a login needs.

use super::credentials::Username;
use allot_shared::UserId;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// A new account.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: UserId,
    pub username: String,
    pub created_at: DateTime<Utc>,
}

/// Creates an account; `None` if the username is taken.
pub async fn create(
    pool: &PgPool,
    username: &Username,
    password_hash: &str,
) -> anyhow::Result<Option<Account>> {
    let row: Option<(i64, String, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO users (username, password_hash) VALUES ($1, $2) \
         ON CONFLICT (username) DO NOTHING RETURNING id, username, created_at",
    )
    .bind(username.as_str())
    .bind(password_hash)
    .fetch_optional(pool)
    .await?;
    row.map(|(id, username, created_at)| {
        Ok(Account {
            id: UserId::try_from(id).map_err(anyhow::Error::msg)?,
            username,
            created_at,
        })
    })
    .transpose()
}

/// The id and password hash of `username`'s account, if there is one.
pub async fn find(pool: &PgPool, username: &Username) -> anyhow::Result<Option<(UserId, String)>> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE username = $1")
            .bind(username.as_str())
            .fetch_optional(pool)
            .await?;
    row.map(|(id, hash)| Ok((UserId::try_from(id).map_err(anyhow::Error::msg)?, hash)))
        .transpose()
}
