//! PostgreSQL: the pool and the embedded schema migrations (`shared/migrations`), which both
//! binaries apply at start. sqlx takes an advisory lock while migrating, so starting several
//! processes at once is safe.

use anyhow::Context;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;

/// The schema, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Connects a pool of at most `max_connections` and brings the schema up to date.
///
/// Size pools so that the API and every worker together stay under the server's
/// `max_connections`.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .context("failed to connect to PostgreSQL")?;
    MIGRATOR
        .run(&pool)
        .await
        .context("failed to apply database migrations")?;
    Ok(pool)
}
