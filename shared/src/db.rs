//! PostgreSQL: the pool and the embedded schema migrations (`shared/migrations`), which both
//! binaries apply at start. sqlx takes an advisory lock while migrating, so starting several
//! processes at once is safe.
//!
//! # Statements over a set of ids are planned per call
//!
//! sqlx prepares and caches every statement per connection, and after five executions
//! PostgreSQL may keep one generic plan for it. For `WHERE id = ANY($1)` over a table that
//! grows, that plan is made while the table is small: a sequential scan comparing every row
//! with every id of the array. It stays until the next autovacuum analyze (up to a minute),
//! while the table grows to tens of thousands of rows and the arrays to thousands of ids:
//! measured in the benchmark, the worker's commits took 1-5 s, CPU in `uuid_eq`. The worker's
//! set statements (lock the batch's products, load stored outcomes, write stock) therefore run
//! with `.persistent(false)`: planned for the array and the table at hand, for about 0.1 ms.

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
