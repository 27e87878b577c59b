//! What the bench reads from allot's PostgreSQL: when requests were decided, and the promises.
//!
//! Accept-to-decided is `decided_at - created_at` of each stored transaction: `created_at` is
//! taken by the API when it receives the request (before its publish), `decided_at` by the
//! worker when it starts deciding the batch, so the figure covers queueing and batching but not
//! the batch's own commit (a few milliseconds) nor the status reaching Redis.

use anyhow::{Context as _, Result, ensure};
use hdrhistogram::Histogram;
use sqlx::PgPool;
use std::time::Duration;
use tokio::time::Instant;

/// Decisions of a set of products.
pub struct Decisions {
    pub count: u64,
    pub succeeded: u64,
    /// Decided rows per second, from the first request received to the last decision.
    pub per_second: f64,
    /// Accept-to-decided, microseconds.
    pub latency: Histogram<u64>,
    /// Partitions that decided at least one of them.
    pub partitions: u64,
}

/// Rows decided so far for products `first..=last`.
pub async fn decided_count(pool: &PgPool, first: i64, last: i64) -> Result<u64> {
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transactions WHERE product_id BETWEEN $1 AND $2")
            .bind(first)
            .bind(last)
            .fetch_one(pool)
            .await?;
    Ok(count as u64)
}

/// Waits until `expected` transactions of products `first..=last` are decided.
pub async fn wait_decided(
    pool: &PgPool,
    first: i64,
    last: i64,
    expected: u64,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let decided = decided_count(pool, first, last).await?;
        if decided >= expected {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {decided} of {expected} accepted requests decided after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the decisions of products `first..=last`.
pub async fn decisions(pool: &PgPool, first: i64, last: i64) -> Result<Decisions> {
    let rows: Vec<(i64, i64, bool, i32)> = sqlx::query_as(
        "SELECT (extract(epoch FROM created_at) * 1000000)::bigint, \
                (extract(epoch FROM decided_at) * 1000000)::bigint, \
                status = 'succeeded', partition \
         FROM transactions WHERE product_id BETWEEN $1 AND $2",
    )
    .bind(first)
    .bind(last)
    .fetch_all(pool)
    .await
    .context("reading decisions")?;
    let mut latency = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let (mut first_created, mut last_decided) = (i64::MAX, i64::MIN);
    let mut partitions = std::collections::BTreeSet::new();
    let mut succeeded = 0;
    for &(created, decided, success, partition) in &rows {
        latency.saturating_record((decided - created).max(1) as u64);
        first_created = first_created.min(created);
        last_decided = last_decided.max(decided);
        succeeded += u64::from(success);
        partitions.insert(partition);
    }
    let span = (last_decided - first_created).max(1) as f64 / 1e6;
    Ok(Decisions {
        count: rows.len() as u64,
        succeeded,
        per_second: rows.len() as f64 / span,
        latency,
        partitions: partitions.len() as u64,
    })
}

/// Accept-to-decided (microseconds) and status of each of the transactions `ids` that is
/// stored, by id.
pub async fn decisions_of(
    pool: &PgPool,
    ids: &[uuid::Uuid],
) -> Result<std::collections::HashMap<uuid::Uuid, (i64, String)>> {
    let rows: Vec<(uuid::Uuid, i64, String)> = sqlx::query_as(
        "SELECT id, (extract(epoch FROM decided_at - created_at) * 1000000)::bigint, status \
         FROM transactions WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .context("reading the decisions of the waited requests")?;
    Ok(rows
        .into_iter()
        .map(|(id, micros, status)| (id, (micros, status)))
        .collect())
}

pub async fn stock(pool: &PgPool, product: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
            .bind(product)
            .fetch_one(pool)
            .await?,
    )
}

/// Creates `count` products with `stock` units each, straight in the database (the catalogue
/// is set-up, not what is measured); returns the first and last id.
pub async fn create_products(
    pool: &PgPool,
    prefix: &str,
    count: i64,
    stock: i64,
) -> Result<(i64, i64)> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO products (name, stock) SELECT $1 || g, $2 FROM generate_series(1, $3) AS g \
         RETURNING id",
    )
    .bind(prefix)
    .bind(stock)
    .bind(count)
    .fetch_all(pool)
    .await
    .context("creating products")?;
    let first = *ids.iter().min().context("no product created")?;
    let last = *ids.iter().max().context("no product created")?;
    ensure!(last - first + 1 == count, "product ids are not consecutive");
    Ok((first, last))
}
