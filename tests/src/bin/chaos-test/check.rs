//! The promises, checked against PostgreSQL (and Redis for the statuses), never against the
//! HTTP answers alone. Every check runs over everything since the start of the run.

use crate::load::Ledger;
use anyhow::{Context as _, Result};
use redis::AsyncCommands as _;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use uuid::Uuid;

/// What is known about the products when checking.
pub struct Catalogue {
    /// Initial stock plus every restock, per sale product.
    pub supply: BTreeMap<i64, i64>,
    /// The product the poison fault makes undecidable; its requests must all be `unprocessable`.
    pub cursed: i64,
    pub cursed_stock: i64,
}

/// What the checks counted.
#[derive(Debug, Default)]
pub struct Summary {
    pub accepted: usize,
    pub succeeded: i64,
    pub rejected: i64,
    pub orders_today: i64,
    pub dead_letters: i64,
    pub redis_checked: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accepted ids each with exactly one final outcome ({} succeeded, {} rejected in PostgreSQL); \
             order numbers 1..{} gapless; {} dead letters; {} Redis statuses match",
            self.accepted,
            self.succeeded,
            self.rejected,
            self.orders_today,
            self.dead_letters,
            self.redis_checked
        )
    }
}

/// Waits until every accepted id has a decided row, or `deadline` passed.
pub async fn wait_decided(pool: &PgPool, ids: &[Uuid], deadline: Duration) -> Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let decided: i64 =
            match sqlx::query_scalar("SELECT count(*) FROM transactions WHERE id = ANY($1)")
                .bind(ids)
                .fetch_one(pool)
                .await
            {
                Ok(decided) => decided,
                Err(_) if started.elapsed() < deadline => -1, // PostgreSQL may just be coming back
                Err(err) => return Err(err).context("counting decided transactions"),
            };
        if decided == ids.len() as i64 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "only {decided} of {} accepted transactions decided after {deadline:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs every check; returns the counts and the violations found.
pub async fn check_all(
    pool: &PgPool,
    redis: &mut redis::aio::ConnectionManager,
    redis_prefix: &str,
    ledger: &Ledger,
    catalogue: &Catalogue,
) -> Result<(Summary, Vec<String>)> {
    let mut violations = ledger.violations.clone();
    let mut summary = Summary {
        accepted: ledger.accepted.len(),
        ..Summary::default()
    };
    let ids: Vec<Uuid> = ledger.accepted.keys().copied().collect();

    // Every 202 id: exactly one final outcome (the primary key makes "more than one"
    // impossible; a missing row or a withdrawn one is the violation to look for).
    let rows: Vec<(Uuid, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT id, status, reason, product_id FROM transactions WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .context("reading the accepted transactions")?;
    if rows.len() != ids.len() {
        violations.push(format!(
            "{} of {} accepted ids have no final outcome",
            ids.len() - rows.len(),
            ids.len()
        ));
    }
    for (id, status, reason, product) in &rows {
        if reason.as_deref() == Some("not_accepted") {
            violations.push(format!("{id} got a 202 but was recorded as not accepted"));
        }
        if ledger.accepted.get(id) != Some(product) {
            violations.push(format!(
                "{id} was stored for product {product}, not the one requested"
            ));
        }
        if *product == catalogue.cursed && reason.as_deref() != Some("unprocessable") {
            violations.push(format!("{id} for the cursed product ended {status} {reason:?}, not rejected as unprocessable"));
        }
    }

    // Nothing sold that a client was not told about: every success is a 202 id (so no 503'd
    // or unanswered request was sold).
    let succeeded: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM transactions WHERE status = 'succeeded'")
            .fetch_all(pool)
            .await?;
    summary.succeeded = succeeded.len() as i64;
    let unknown = succeeded
        .iter()
        .filter(|id| !ledger.accepted.contains_key(id))
        .count();
    if unknown > 0 {
        violations.push(format!(
            "{unknown} succeeded transactions were never answered 202"
        ));
    }
    summary.rejected =
        sqlx::query_scalar("SELECT count(*) FROM transactions WHERE status = 'rejected'")
            .fetch_one(pool)
            .await?;

    check_stock(pool, ledger, catalogue, &mut violations).await?;
    summary.orders_today = check_order_numbers(pool, &mut violations).await?;
    summary.dead_letters = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await?;
    summary.redis_checked = check_redis(pool, redis, redis_prefix, &ids, &mut violations).await?;
    Ok((summary, violations))
}

/// No stock below zero; per sale product, units sold == min(demand, supply) and the stock left
/// is supply - sold; the cursed product sold nothing.
async fn check_stock(
    pool: &PgPool,
    ledger: &Ledger,
    catalogue: &Catalogue,
    violations: &mut Vec<String>,
) -> Result<()> {
    let stock: HashMap<i64, i64> = sqlx::query_as("SELECT id, stock FROM products")
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
    let sold: HashMap<i64, i64> = sqlx::query_as(
        "SELECT product_id, sum(quantity)::bigint FROM transactions WHERE status = 'succeeded' GROUP BY product_id",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for (product, units) in &stock {
        if *units < 0 {
            violations.push(format!("product {product} has stock {units}"));
        }
    }
    for (product, supply) in &catalogue.supply {
        let demand = ledger.demand.get(product).copied().unwrap_or(0) as i64;
        let sold = sold.get(product).copied().unwrap_or(0);
        if sold != demand.min(*supply) {
            violations.push(format!(
                "product {product}: sold {sold}, expected min(demand {demand}, supply {supply})"
            ));
        }
        if stock.get(product) != Some(&(supply - sold)) {
            violations.push(format!(
                "product {product}: stock {:?}, expected supply {supply} - sold {sold}",
                stock.get(product)
            ));
        }
    }
    let cursed_sold = sold.get(&catalogue.cursed).copied().unwrap_or(0);
    if cursed_sold != 0 || stock.get(&catalogue.cursed) != Some(&catalogue.cursed_stock) {
        violations.push(format!("the cursed product sold {cursed_sold} units"));
    }
    Ok(())
}

/// For every day: numbers exactly 1..N, no gap, no duplicate, N the day's counter; every
/// numbered order succeeded. Returns N of the latest day.
async fn check_order_numbers(pool: &PgPool, violations: &mut Vec<String>) -> Result<i64> {
    let seqs: Vec<(chrono::NaiveDate, i64)> = sqlx::query_as(
        "SELECT order_day, order_seq FROM transactions WHERE order_seq IS NOT NULL ORDER BY order_day, order_seq",
    )
    .fetch_all(pool)
    .await?;
    let counters: BTreeMap<chrono::NaiveDate, i64> =
        sqlx::query_as("SELECT day, last_seq FROM order_counters")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let mut by_day: BTreeMap<chrono::NaiveDate, Vec<i64>> = BTreeMap::new();
    for (day, seq) in seqs {
        by_day.entry(day).or_default().push(seq);
    }
    let mut latest = 0;
    for (day, seqs) in &by_day {
        let n = seqs.len() as i64;
        if !seqs.iter().copied().eq(1..=n) {
            violations.push(format!("order numbers of {day} are not exactly 1..{n}"));
        }
        if counters.get(day) != Some(&n) {
            violations.push(format!(
                "the counter of {day} is {:?}, but {n} orders carry its numbers",
                counters.get(day)
            ));
        }
        latest = n;
    }
    let numbered_not_succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transactions WHERE (order_seq IS NOT NULL) <> (status = 'succeeded')",
    )
    .fetch_one(pool)
    .await?;
    if numbered_not_succeeded != 0 {
        violations.push(format!(
            "{numbered_not_succeeded} orders are numbered but not succeeded, or the reverse"
        ));
    }
    Ok(latest)
}

/// Every accepted id's status in Redis is its final one from PostgreSQL.
async fn check_redis(
    pool: &PgPool,
    redis: &mut redis::aio::ConnectionManager,
    prefix: &str,
    ids: &[Uuid],
    violations: &mut Vec<String>,
) -> Result<usize> {
    let stored: HashMap<Uuid, (String, Option<String>)> =
        sqlx::query_as("SELECT id, status, reason FROM transactions WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(id, status, reason)| (id, (status, reason)))
            .collect();
    // A batch's statuses reach Redis just after its commit: give stragglers a moment.
    let mut wrong: Vec<(Uuid, Value)> = statuses(redis, prefix, ids, &stored).await?;
    for _ in 0..20 {
        if wrong.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again: Vec<Uuid> = wrong.iter().map(|(id, _)| *id).collect();
        wrong = statuses(redis, prefix, &again, &stored).await?;
    }
    for (id, view) in wrong.iter().take(5) {
        violations.push(format!(
            "Redis has {view} for {id}, PostgreSQL {:?}",
            stored.get(id)
        ));
    }
    if wrong.len() > 5 {
        violations.push(format!("... {} Redis statuses wrong in all", wrong.len()));
    }
    Ok(ids.len() - wrong.len())
}

/// The ids whose Redis status differs from the stored one, with what Redis has.
async fn statuses(
    redis: &mut redis::aio::ConnectionManager,
    prefix: &str,
    ids: &[Uuid],
    stored: &HashMap<Uuid, (String, Option<String>)>,
) -> Result<Vec<(Uuid, Value)>> {
    let mut wrong = Vec::new();
    for chunk in ids.chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|id| format!("{prefix}:tx:{id}")).collect();
        let values = mget(redis, &keys).await?;
        for (id, value) in chunk.iter().zip(values) {
            let view: Value = value
                .and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or(Value::Null);
            let matches = stored.get(id).is_some_and(|(status, reason)| {
                view["status"] == status.as_str() && view["reason"].as_str() == reason.as_deref()
            });
            if !matches {
                wrong.push((*id, view));
            }
        }
    }
    Ok(wrong)
}

/// `MGET`, retried a few times: the first command after Redis restarted reports the dropped
/// connection, and the connection manager reconnects for the next.
async fn mget(
    redis: &mut redis::aio::ConnectionManager,
    keys: &[String],
) -> Result<Vec<Option<String>>> {
    let mut attempt = 0;
    loop {
        match redis.mget(keys).await {
            Ok(values) => return Ok(values),
            Err(_) if attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(err) => return Err(err).context("MGET statuses"),
        }
    }
}
