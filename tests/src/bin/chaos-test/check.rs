//! The promises, checked against PostgreSQL (and Redis for the statuses), never against the
//! HTTP answers alone. Every check runs over everything since the start of the run.

use crate::load::{Ledger, Said};
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
    pub lost: LostAnswers,
}

/// What became of the requests whose answer never reached their client.
#[derive(Debug, Default)]
pub struct LostAnswers {
    /// Requests without an answer (the API down, or killed while serving them).
    pub lost: usize,
    /// Of them, in flight across a `kill -9` of the API.
    pub cut: usize,
    /// Of those, decided by a worker: sold, or rejected.
    pub sold: usize,
    pub rejected: usize,
    /// Of those, withdrawn by the API (`not_accepted`) before it died.
    pub withdrawn: usize,
    /// 503s withdrawn in PostgreSQL (`not_accepted`): a publish the broker may have stored.
    pub refused_withdrawn: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accepted ids each with exactly one final outcome ({} succeeded, {} rejected in PostgreSQL); \
             order numbers 1..{} gapless; {} dead letters; {} Redis statuses match; \
             no refused request sold ({} 503s withdrawn); {} answers lost, {} of them cut by an API kill -9 \
             (each at most one outcome: {} sold, {} rejected, {} withdrawn, {} none)",
            self.accepted,
            self.succeeded,
            self.rejected,
            self.orders_today,
            self.dead_letters,
            self.redis_checked,
            self.lost.refused_withdrawn,
            self.lost.lost,
            self.lost.cut,
            self.lost.sold,
            self.lost.rejected,
            self.lost.withdrawn,
            (self.lost.cut)
                .saturating_sub(self.lost.sold + self.lost.rejected + self.lost.withdrawn),
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

    // Nothing sold that a client was not told about, request by request (each has its own
    // user id): every success is a 202 id or a request whose answer a kill -9 cut.
    let stored: Vec<Stored> =
        sqlx::query_as("SELECT id, user_id, product_id, status, reason FROM transactions")
            .fetch_all(pool)
            .await
            .context("reading every transaction")?;
    summary.succeeded = stored
        .iter()
        .filter(|row| row.status == "succeeded")
        .count() as i64;
    summary.rejected = stored.len() as i64 - summary.succeeded;
    let lost = check_requests(ledger, &stored, &mut violations);
    summary.lost = lost.summary;

    check_stock(pool, ledger, &lost.demand, catalogue, &mut violations).await?;
    summary.orders_today = check_order_numbers(pool, &mut violations).await?;
    summary.dead_letters = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await?;
    let decided: Vec<Uuid> = ids.iter().chain(&lost.decided).copied().collect();
    summary.redis_checked =
        check_redis(pool, redis, redis_prefix, &decided, &mut violations).await?;
    Ok((summary, violations))
}

/// One row of `transactions`.
#[derive(sqlx::FromRow)]
struct Stored {
    id: Uuid,
    user_id: i64,
    product_id: i64,
    status: String,
    reason: Option<String>,
}

/// What the rows of the requests without a 202 showed.
struct Unaccepted {
    summary: LostAnswers,
    /// Requests cut by a kill that a worker decided, per product: demand the 202s do not show.
    demand: HashMap<i64, u64>,
    /// Their ids (their statuses in Redis must be the stored ones).
    decided: Vec<Uuid>,
}

/// The rows of requests that got no 202, against what their clients were told (by user id,
/// one per request): no request answered 503 was sold, none answered sold-out or 422 was
/// recorded, and a request whose answer was lost may have been decided (or withdrawn) only if
/// a `kill -9` of the API cut it. And no request has two outcomes.
fn check_requests(ledger: &Ledger, stored: &[Stored], violations: &mut Vec<String>) -> Unaccepted {
    let mut found = Unaccepted {
        summary: LostAnswers {
            lost: (ledger.requests.values())
                .filter(|request| matches!(request.said, Said::Lost { .. }))
                .count(),
            cut: (ledger.requests.values())
                .filter(|request| matches!(request.said, Said::Lost { sent, gave_up } if ledger.cut_by_kill(sent, gave_up)))
                .count(),
            ..LostAnswers::default()
        },
        demand: HashMap::new(),
        decided: Vec::new(),
    };
    let mut broken: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut outcomes: HashMap<i64, usize> = HashMap::new();
    for row in stored {
        *outcomes.entry(row.user_id).or_default() += 1;
        if ledger.accepted.contains_key(&row.id) {
            continue; // checked above, id by id
        }
        let sold = row.status == "succeeded";
        let withdrawn = row.reason.as_deref() == Some("not_accepted");
        let what = format!(
            "{} {} {:?} (user {})",
            row.id, row.status, row.reason, row.user_id
        );
        let request = ledger.requests.get(&row.user_id);
        if request.is_some_and(|request| request.product != row.product_id) {
            broken
                .entry("requests were recorded for another product than requested")
                .or_default()
                .push(what.clone());
        }
        match request.map(|request| request.said) {
            Some(Said::Refused) if sold => broken
                .entry("requests answered 503 were sold")
                .or_default()
                .push(what),
            Some(Said::Refused) => found.summary.refused_withdrawn += usize::from(withdrawn),
            Some(Said::SoldOut) => broken
                .entry("requests answered sold out (200, final) were recorded")
                .or_default()
                .push(what),
            Some(Said::Invalid) => broken
                .entry("requests answered 422 were recorded")
                .or_default()
                .push(what),
            Some(Said::Lost { sent, gave_up }) if ledger.cut_by_kill(sent, gave_up) => {
                if withdrawn {
                    found.summary.withdrawn += 1;
                } else {
                    if sold {
                        found.summary.sold += 1;
                    } else {
                        found.summary.rejected += 1;
                    }
                    *found.demand.entry(row.product_id).or_default() += 1;
                    found.decided.push(row.id);
                }
            }
            Some(Said::Lost { .. }) => broken
                .entry("requests whose answer was lost while no API was killed were recorded")
                .or_default()
                .push(what),
            Some(Said::Accepted(_) | Said::Unexpected) => {} // two outcomes: counted below; unexpected: reported
            None if sold => broken
                .entry("successes belong to no request a client sent")
                .or_default()
                .push(what),
            None => {}
        }
    }
    for (user, n) in outcomes {
        if n > 1 {
            broken
                .entry("requests have more than one outcome")
                .or_default()
                .push(format!("user {user}: {n}"));
        }
    }
    for (what, examples) in broken {
        violations.push(format!(
            "{} {what}, e.g. {}",
            examples.len(),
            examples[..examples.len().min(3)].join(", ")
        ));
    }
    found
}

/// No stock below zero; per sale product, units sold == min(demand, supply) and the stock left
/// is supply - sold (demand: the 202s, and the requests a kill cut that a worker decided); the
/// cursed product sold nothing.
async fn check_stock(
    pool: &PgPool,
    ledger: &Ledger,
    cut_demand: &HashMap<i64, u64>,
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
        let demand = ledger.demand.get(product).copied().unwrap_or(0)
            + cut_demand.get(product).copied().unwrap_or(0);
        let demand = demand as i64;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Request;
    use std::time::Instant;

    fn row(user: i64, status: &str, reason: Option<&str>) -> Stored {
        Stored {
            id: Uuid::new_v4(),
            user_id: user,
            product_id: 1,
            status: status.into(),
            reason: reason.map(str::to_owned),
        }
    }

    fn said(ledger: &mut Ledger, user: i64, said: Said) {
        ledger.requests.insert(user, Request { product: 1, said });
    }

    /// Each kind of broken promise is found; what is allowed is counted, not reported.
    #[test]
    fn requests_are_judged_by_what_their_client_was_told() {
        let start = Instant::now();
        let later = start + Duration::from_secs(10);
        let mut ledger = Ledger::default();
        ledger.api_killed(
            start + Duration::from_secs(5),
            start + Duration::from_secs(6),
        );
        let cut = Said::Lost {
            sent: start + Duration::from_secs(4),
            gave_up: start + Duration::from_secs(5),
        };
        let not_cut = Said::Lost {
            sent: start,
            gave_up: start + Duration::from_secs(1),
        };
        said(&mut ledger, 1, Said::Refused);
        said(&mut ledger, 2, Said::Refused);
        said(&mut ledger, 3, Said::SoldOut);
        said(&mut ledger, 4, Said::Invalid);
        said(&mut ledger, 5, cut);
        said(&mut ledger, 6, cut);
        said(&mut ledger, 7, not_cut);
        said(&mut ledger, 8, cut);
        said(
            &mut ledger,
            9,
            Said::Lost {
                sent: later,
                gave_up: later,
            },
        );
        let stored = [
            row(1, "succeeded", None),
            row(2, "rejected", Some("not_accepted")),
            row(3, "rejected", Some("out_of_stock")),
            row(4, "succeeded", None),
            row(5, "succeeded", None),
            row(6, "rejected", Some("not_accepted")),
            row(7, "succeeded", None),
            row(8, "rejected", Some("out_of_stock")),
            row(8, "succeeded", None),
            row(100, "succeeded", None),
        ];
        let mut violations = Vec::new();
        let found = check_requests(&ledger, &stored, &mut violations);
        let has = |what: &str| violations.iter().any(|v| v.contains(what));
        assert!(has("1 requests answered 503 were sold"), "{violations:#?}");
        assert!(has(
            "1 requests answered sold out (200, final) were recorded"
        ));
        assert!(has("1 requests answered 422 were recorded"));
        assert!(has(
            "1 requests whose answer was lost while no API was killed were recorded"
        ));
        assert!(has("1 requests have more than one outcome, e.g. user 8: 2"));
        assert!(has("1 successes belong to no request a client sent"));
        assert_eq!(violations.len(), 6, "{violations:#?}");
        assert_eq!(found.summary.lost, 5);
        assert_eq!(found.summary.cut, 3);
        assert_eq!(
            (
                found.summary.sold,
                found.summary.rejected,
                found.summary.withdrawn
            ),
            (2, 1, 1)
        );
        assert_eq!(found.summary.refused_withdrawn, 1);
        assert_eq!(found.demand.get(&1), Some(&3));
        assert_eq!(found.decided.len(), 3);
    }

    /// Nothing to report when every row is what its client was told.
    #[test]
    fn a_clean_ledger_has_no_violations() {
        let mut ledger = Ledger::default();
        let id = Uuid::new_v4();
        ledger.accept(id, 1);
        said(&mut ledger, 1, Said::Accepted(id));
        said(&mut ledger, 2, Said::Refused);
        let mut accepted = row(1, "succeeded", None);
        accepted.id = id;
        let mut violations = Vec::new();
        let found = check_requests(&ledger, &[accepted], &mut violations);
        assert!(violations.is_empty(), "{violations:#?}");
        assert_eq!(found.summary.cut, 0);
    }
}
