//! allot's promises, checked where they are kept: in PostgreSQL (and Redis for the statuses),
//! never in the HTTP answers alone. Each check returns the violations it found (an empty list
//! when the promise holds) and fails only when it cannot look.
//!
//! - [`order_numbers`]: every day's numbers are exactly `1..N`, `N` the day's counter, and
//!   only successes are numbered;
//! - [`stock_never_negative`]: no product below zero;
//! - [`accepted_decided_once`]: every id that got a `202` has exactly one final outcome, for
//!   the product it was for, and none was withdrawn;
//! - [`sold_within_supply`]: per product, units sold == `min(demand, supply)` and the stock
//!   left == supply − sold, where the scenario knows demand and supply;
//! - [`redis_matches_postgres`]: every decided transaction's status in Redis is its stored one;
//! - [`conserved`]: per product, `stock + held + units sold == supply`, so an order of several
//!   products rejected took nothing and one that succeeded took every line (all or nothing),
//!   and a hold's units are counted once, held or sold or back;
//! - [`holds_consistent`]: every product's `held` is the units of its open holds, every slot's
//!   `taken` and `held` its succeeded and open bookings.
//!
//! A transaction's product, where one is named ([`Outcome::product_id`], the accepted map of
//! [`accepted_decided_once`]), is the product of its first line (an order's first item listed).
//!
//! [`whole_database`] runs the checks that need nothing but the database and Redis, for a
//! deployment whose database holds only one run (the benchmark's, the functional test's).

use anyhow::{Context as _, Result};
use chrono::NaiveDate;
use redis::AsyncCommands as _;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Every [`Outcome`]: each transaction, with the product of its first line.
macro_rules! outcomes {
    () => {
        "SELECT t.id, t.user_id, l.product_id, t.status, t.reason FROM transactions t \
         JOIN transaction_lines l ON l.transaction_id = t.id AND l.position = 0"
    };
}

/// How many examples a violation quotes.
const EXAMPLES: usize = 5;

/// Waits until every id has a decided row, or fails once `within` passed. A database that does
/// not answer (it may just be coming back) is retried until then.
pub async fn wait_decided(pool: &PgPool, ids: &[Uuid], within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let decided: i64 =
            match sqlx::query_scalar("SELECT count(*) FROM transactions WHERE id = ANY($1)")
                .bind(ids)
                .fetch_one(pool)
                .await
            {
                Ok(decided) => decided,
                Err(_) if started.elapsed() < within => -1,
                Err(err) => return Err(err).context("counting decided transactions"),
            };
        if decided == ids.len() as i64 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "only {decided} of {} accepted transactions decided after {within:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What [`order_numbers`] counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Numbered {
    /// Numbers checked, over every day.
    pub total: i64,
    /// `N` of the latest day that has any.
    pub latest_day: i64,
}

/// For every day: numbers exactly `1..N` (no gap, no duplicate), `N` the day's counter; and
/// every numbered order succeeded, every success is numbered.
pub async fn order_numbers(pool: &PgPool) -> Result<(Numbered, Vec<String>)> {
    let seqs: Vec<(NaiveDate, i64)> = sqlx::query_as(
        "SELECT order_day, order_seq FROM transactions WHERE order_seq IS NOT NULL \
         ORDER BY order_day, order_seq",
    )
    .fetch_all(pool)
    .await
    .context("reading the order numbers")?;
    let counters: BTreeMap<NaiveDate, i64> =
        sqlx::query_as("SELECT day, last_seq FROM order_counters")
            .fetch_all(pool)
            .await
            .context("reading the order counters")?
            .into_iter()
            .collect();
    let mut by_day: BTreeMap<NaiveDate, Vec<i64>> = BTreeMap::new();
    for (day, seq) in seqs {
        by_day.entry(day).or_default().push(seq);
    }
    let mut violations = Vec::new();
    let mut numbered = Numbered::default();
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
        numbered.total += n;
        numbered.latest_day = n;
    }
    for (day, last) in &counters {
        if !by_day.contains_key(day) && *last != 0 {
            violations.push(format!(
                "the counter of {day} is {last}, but no order carries its numbers"
            ));
        }
    }
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transactions WHERE (order_seq IS NOT NULL) <> (status = 'succeeded')",
    )
    .fetch_one(pool)
    .await?;
    if mismatched != 0 {
        violations.push(format!(
            "{mismatched} orders are numbered but not succeeded, or the reverse"
        ));
    }
    Ok((numbered, violations))
}

/// No product has a stock below zero, nor any share of a product spread over several
/// partitions.
pub async fn stock_never_negative(pool: &PgPool) -> Result<Vec<String>> {
    let negative: Vec<(i64, Option<i32>, i64)> = sqlx::query_as(
        "SELECT id, NULL::integer, stock FROM products WHERE stock < 0 \
         UNION ALL SELECT product_id, shard, stock FROM product_shares WHERE stock < 0 \
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .context("reading the stock")?;
    Ok((negative.iter())
        .map(|(product, shard, stock)| match shard {
            None => format!("product {product} has stock {stock}"),
            Some(shard) => format!("product {product}'s share {shard} has stock {stock}"),
        })
        .collect())
}

/// Every id that got a `202` (with the product it was for) has exactly one final outcome, for
/// that product, and was not withdrawn (`not_accepted`). The primary key makes two rows
/// impossible; a missing row or a withdrawn one is what this looks for. Returns the rows found.
pub async fn accepted_decided_once(
    pool: &PgPool,
    accepted: &HashMap<Uuid, i64>,
) -> Result<(Vec<Outcome>, Vec<String>)> {
    let ids: Vec<Uuid> = accepted.keys().copied().collect();
    let rows: Vec<Outcome> = sqlx::query_as(concat!(outcomes!(), " WHERE t.id = ANY($1)"))
        .bind(&ids)
        .fetch_all(pool)
        .await
        .context("reading the accepted transactions")?;
    let mut violations = Vec::new();
    if rows.len() != ids.len() {
        violations.push(format!(
            "{} of {} accepted ids have no final outcome",
            ids.len() - rows.len(),
            ids.len()
        ));
    }
    for row in &rows {
        if row.reason.as_deref() == Some("not_accepted") {
            violations.push(format!(
                "{} got a 202 but was recorded as not accepted",
                row.id
            ));
        }
        if accepted.get(&row.id) != Some(&row.product_id) {
            violations.push(format!(
                "{} was stored for product {}, not the one requested",
                row.id, row.product_id
            ));
        }
    }
    Ok((rows, violations))
}

/// One row of `transactions`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Outcome {
    pub id: Uuid,
    pub user_id: i64,
    /// The product of its first line: of its only one for an `addToCart` (an order of several
    /// products lists them in `transaction_items`).
    pub product_id: i64,
    pub status: String,
    pub reason: Option<String>,
}

/// Every row of `transactions`.
pub async fn every_outcome(pool: &PgPool) -> Result<Vec<Outcome>> {
    sqlx::query_as(outcomes!())
        .fetch_all(pool)
        .await
        .context("reading every transaction")
}

/// Per product of `supply` (its initial stock plus every restock): units sold ==
/// `min(demand, supply)` and the stock left == supply − sold. Demand: the units asked for by
/// requests that reached a decision. For sales without holds: units an open hold keeps are
/// neither sold nor in the stock.
pub async fn sold_within_supply(
    pool: &PgPool,
    supply: &BTreeMap<i64, i64>,
    demand: &HashMap<i64, u64>,
) -> Result<Vec<String>> {
    let stock = stock_by_product(pool).await?;
    let sold = sold_by_product(pool).await?;
    let mut violations = Vec::new();
    for (product, supply) in supply {
        let demand = demand.get(product).copied().unwrap_or(0) as i64;
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
    Ok(violations)
}

/// Every product's stock now (of a product spread over several partitions, the sum of its
/// shares).
pub async fn stock_by_product(pool: &PgPool) -> Result<HashMap<i64, i64>> {
    Ok(sqlx::query_as(
        "SELECT p.id, p.stock + COALESCE((SELECT sum(s.stock) FROM product_shares s \
                                         WHERE s.product_id = p.id), 0)::bigint \
         FROM products p",
    )
    .fetch_all(pool)
    .await
    .context("reading the stock")?
    .into_iter()
    .collect())
}

/// Units sold per product, over every line of every succeeded transaction (an `addToCart`'s
/// one line, or each item of an order of several products).
pub async fn sold_by_product(pool: &PgPool) -> Result<HashMap<i64, i64>> {
    units_by_product(pool, "succeeded").await
}

/// Units of the lines of the transactions in `status`, per product.
async fn units_by_product(pool: &PgPool, status: &str) -> Result<HashMap<i64, i64>> {
    Ok(sqlx::query_as(
        "SELECT l.product_id, sum(l.quantity)::bigint FROM transaction_lines l \
         JOIN transactions t ON t.id = l.transaction_id \
         WHERE t.status = $1 GROUP BY l.product_id",
    )
    .bind(status)
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading the units {status}"))?
    .into_iter()
    .collect())
}

/// Per product of `supply` (its initial stock plus every restock): `stock + held + units sold
/// == supply`, whatever the demand. Orders of several products, holds, checkouts, cancels and
/// expiries all keep it: it is broken by a rejected order that took a line, a succeeded one
/// that did not take every line, or a hold's units counted twice or lost.
pub async fn conserved(pool: &PgPool, supply: &BTreeMap<i64, i64>) -> Result<Vec<String>> {
    let counters: HashMap<i64, (i64, i64)> =
        sqlx::query_as::<_, (i64, i64, i64)>("SELECT id, stock, held FROM products")
            .fetch_all(pool)
            .await
            .context("reading the stock")?
            .into_iter()
            .map(|(id, stock, held)| (id, (stock, held)))
            .collect();
    let sold = sold_by_product(pool).await?;
    let mut violations = Vec::new();
    for (product, supply) in supply {
        let sold = sold.get(product).copied().unwrap_or(0);
        match counters.get(product) {
            Some((stock, held)) if stock + held + sold == *supply => {}
            Some((stock, held)) => violations.push(format!(
                "product {product}: stock {stock} + held {held} + sold {sold} != supply {supply}"
            )),
            None => violations.push(format!("product {product} does not exist")),
        }
    }
    Ok(violations)
}

/// Every product's `held` is the units of its open holds (`held` transactions), and every
/// slot's `taken` and `held` are its succeeded and open bookings (its capacity, which staff may
/// lower below them, is guarded by the database itself).
pub async fn holds_consistent(pool: &PgPool) -> Result<Vec<String>> {
    let held = units_by_product(pool, "held").await?;
    let products: Vec<(i64, i64)> = sqlx::query_as("SELECT id, held FROM products ORDER BY id")
        .fetch_all(pool)
        .await
        .context("reading the held units")?;
    let mut violations = Vec::new();
    for (product, counter) in products {
        let open = held.get(&product).copied().unwrap_or(0);
        if counter != open {
            violations.push(format!(
                "product {product}: held {counter}, but its open holds hold {open}"
            ));
        }
    }
    let slots: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT s.id, s.taken, s.held, \
           (SELECT count(*) FROM transactions t WHERE t.slot_id = s.id AND t.status = 'succeeded'), \
           (SELECT count(*) FROM transactions t WHERE t.slot_id = s.id AND t.status = 'held') \
         FROM slots s ORDER BY s.id",
    )
    .fetch_all(pool)
    .await
    .context("reading the slots")?;
    for (slot, taken, held, succeeded, open) in slots {
        if (taken, held) != (succeeded, open) {
            violations.push(format!(
                "slot {slot}: taken {taken}, held {held}, but {succeeded} succeeded and {open} \
                 open bookings name it"
            ));
        }
    }
    Ok(violations)
}

/// Redis, for [`redis_matches_postgres`]: the connection and the deployment's key prefix.
pub struct Statuses<'a> {
    pub redis: &'a mut redis::aio::ConnectionManager,
    pub prefix: &'a str,
}

/// Every id's status in Redis is its final one in PostgreSQL (`None`: every decided
/// transaction). A batch's statuses reach Redis just after its commit, so stragglers get ten
/// seconds. Returns how many matched.
pub async fn redis_matches_postgres(
    pool: &PgPool,
    statuses: Statuses<'_>,
    ids: Option<&[Uuid]>,
) -> Result<(usize, Vec<String>)> {
    let stored: HashMap<Uuid, (String, Option<String>)> = match ids {
        Some(ids) => {
            sqlx::query_as("SELECT id, status, reason FROM transactions WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(pool)
                .await
        }
        None => {
            sqlx::query_as("SELECT id, status, reason FROM transactions")
                .fetch_all(pool)
                .await
        }
    }
    .context("reading the stored statuses")?
    .into_iter()
    .map(|(id, status, reason)| (id, (status, reason)))
    .collect();
    let ids: Vec<Uuid> = match ids {
        Some(ids) => ids.to_vec(),
        None => stored.keys().copied().collect(),
    };
    let Statuses { redis, prefix } = statuses;
    let mut wrong = mismatches(redis, prefix, &ids, &stored).await?;
    for _ in 0..20 {
        if wrong.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again: Vec<Uuid> = wrong.iter().map(|(id, _)| *id).collect();
        wrong = mismatches(redis, prefix, &again, &stored).await?;
    }
    let mut violations: Vec<String> = (wrong.iter().take(EXAMPLES))
        .map(|(id, view)| format!("Redis has {view} for {id}, PostgreSQL {:?}", stored.get(id)))
        .collect();
    if wrong.len() > EXAMPLES {
        violations.push(format!("... {} Redis statuses wrong in all", wrong.len()));
    }
    Ok((ids.len() - wrong.len(), violations))
}

/// The ids whose Redis status differs from the stored one, with what Redis has.
async fn mismatches(
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

/// What [`whole_database`] checked.
#[derive(Debug, Default)]
pub struct Checked {
    pub numbered: Numbered,
    /// Decided transactions whose Redis status matched (when Redis was checked).
    pub redis_matched: Option<usize>,
    pub violations: Vec<String>,
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} order numbers, each day exactly 1..N and its counter N; no stock below zero; \
             held units and slot places equal to the open holds and bookings",
            self.numbered.total
        )?;
        if let Some(matched) = self.redis_matched {
            write!(f, "; {matched} Redis statuses equal PostgreSQL's")?;
        }
        Ok(())
    }
}

/// The checks a whole database (one run's) allows without knowing the requests: order numbers,
/// stock, and, given Redis, every decided status.
pub async fn whole_database(pool: &PgPool, statuses: Option<Statuses<'_>>) -> Result<Checked> {
    let (numbered, mut violations) = order_numbers(pool).await?;
    violations.extend(stock_never_negative(pool).await?);
    violations.extend(holds_consistent(pool).await?);
    let redis_matched = match statuses {
        Some(statuses) => {
            let (matched, wrong) = redis_matches_postgres(pool, statuses, None).await?;
            violations.extend(wrong);
            Some(matched)
        }
        None => None,
    };
    Ok(Checked {
        numbered,
        redis_matched,
        violations,
    })
}
