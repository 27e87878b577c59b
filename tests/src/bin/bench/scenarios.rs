//! The scenarios against a running allot, each returning what it measured. Correctness problems
//! are collected in `Bench::failures` (they fail the run); timing targets are only reported.

use crate::db::{self, Decisions};
use crate::{Bench, Settings};
use allot_tests::load::{self, Load, Tally};
use anyhow::{Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const ORDER_PATH: &str = "/api/v1/order/addToCart";
/// How long allot gets to decide everything it accepted in a scenario.
const DECIDE_WITHIN: Duration = Duration::from_secs(180);

/// Requests for products `first..=last`, chosen uniformly at random (repeatably), quantity 1,
/// one user per request.
fn orders(addr: std::net::SocketAddr, first: i64, last: i64) -> Load {
    let span = (last - first + 1) as u64;
    Load::new(
        addr,
        ORDER_PATH,
        Arc::new(move |i| {
            let product = first + (load::mix(i) % span) as i64;
            Bytes::from(format!(
                r#"{{"user_id":{},"product_id":{product},"quantity":1}}"#,
                i + 1
            ))
        }),
    )
}

/// One product per partition with endless stock, for one accept-path phase.
async fn endless_products(bench: &Bench, s: &Settings, prefix: &str) -> Result<(i64, i64)> {
    db::create_products(&bench.pool, prefix, i64::from(s.partitions), 1_000_000_000).await
}

/// Waits until the `accepted` requests for products `first..=last` are decided, reads their
/// decisions, and checks that every accepted request was decided once.
async fn decided(
    bench: &mut Bench,
    phase: &str,
    (first, last): (i64, i64),
    accepted: u64,
) -> Result<Decisions> {
    db::wait_decided(&bench.pool, first, last, accepted, DECIDE_WITHIN)
        .await
        .with_context(|| format!("{phase}: waiting for the decisions"))?;
    let decisions = db::decisions(&bench.pool, first, last).await?;
    bench.expect(
        decisions.count == accepted,
        format!(
            "{phase}: {} decided for {accepted} accepted",
            decisions.count
        ),
    );
    Ok(decisions)
}

/// Accept path: closed loop, then open loop at a fraction of the closed-loop rate, on one
/// product per partition with endless stock; then, once all that is decided, a closed loop at
/// few connections on products of its own.
pub struct Accept {
    pub connections: usize,
    pub closed: Tally,
    pub open: Tally,
    pub open_rate: f64,
    pub decisions: Decisions,
    pub low_connections: usize,
    pub low: Tally,
    pub low_decisions: Decisions,
}

pub async fn accept(bench: &mut Bench, s: &Settings) -> Result<Accept> {
    let products = endless_products(bench, s, "bench-accept-").await?;
    let load = orders(bench.addr, products.0, products.1);
    let counter = Arc::new(AtomicU64::new(0));
    // Warm-up: connections, the broker's and PostgreSQL's caches. Not reported.
    let warm = load::closed_loop(&load, s.connections, u64::MAX, s.warmup, counter.clone()).await;
    let closed =
        load::closed_loop(&load, s.connections, u64::MAX, s.duration, counter.clone()).await;
    let open_rate = (closed.rate() * s.open_fraction).max(10.0);
    let open = load::open_loop(&load, s.connections, open_rate, s.duration, s.duration).await;
    let accepted = warm.count(202) + closed.count(202) + open.count(202);
    let decisions = decided(bench, "accept", products, accepted).await?;

    // Few connections, on a system with no backlog left: the latency a lightly loaded allot
    // gives, against the naive design at the same connections.
    let products = endless_products(bench, s, "bench-accept-low-").await?;
    let load = orders(bench.addr, products.0, products.1);
    let warm = load::closed_loop(
        &load,
        s.low_connections,
        u64::MAX,
        s.warmup,
        counter.clone(),
    )
    .await;
    let low = load::closed_loop(&load, s.low_connections, u64::MAX, s.duration, counter).await;
    let accepted = warm.count(202) + low.count(202);
    let low_decisions = decided(bench, "accept (few connections)", products, accepted).await?;
    Ok(Accept {
        connections: s.connections,
        closed,
        open,
        open_rate,
        decisions,
        low_connections: s.low_connections,
        low,
        low_decisions,
    })
}

/// `Prefer: wait=5` under the accept load: while the closed-loop accept load runs, a few more
/// connections send requests that ask to wait for the decision (products of their own, on the
/// same partitions, so their requests share envelopes and batches with the load's). Each final
/// answer's latency is set against the accept-to-decided of the same request.
pub struct Wait {
    /// Connections sending `Prefer: wait=5`.
    pub connections: usize,
    /// The accept load they ran under (not kept for the report's targets: only context).
    pub background: Tally,
    /// Every answer the waiting connections got.
    pub waited: Tally,
    /// 200 answers with the final transaction.
    pub final_answers: u64,
    /// 202 answers: still pending when the wait ran out (not final answers).
    pub pending: u64,
    /// Microseconds from the send to the answer, of every accepted request (200 or 202; a 202
    /// is counted at its own latency, at least the 5 s wait, since it was not final).
    pub answer_latency: Histogram<u64>,
    /// Accept-to-decided of the same requests, from the database, microseconds.
    pub decided_latency: Histogram<u64>,
    /// Per final answer, its latency minus its accept-to-decided: what answering costs after
    /// the decision (the commit, the announcement, the HTTP answer), microseconds, sorted.
    pub excess: Vec<i64>,
}

/// The seconds the wait phase asks for.
pub const WAIT_SECS: u64 = 5;

/// An accepted request's answer body (a `TransactionView` or the 202's `Accepted`).
#[derive(serde::Deserialize)]
struct Seen {
    transaction_id: uuid::Uuid,
    status: String,
}

pub async fn wait(bench: &mut Bench, s: &Settings) -> Result<Wait> {
    let busy = endless_products(bench, s, "bench-wait-load-").await?;
    let waiting = endless_products(bench, s, "bench-wait-").await?;
    let background_load = orders(bench.addr, busy.0, busy.1);
    let mut wait_load = orders(bench.addr, waiting.0, waiting.1);
    wait_load.headers.push((
        hyper::header::HeaderName::from_static("prefer"),
        hyper::header::HeaderValue::from_str(&format!("wait={WAIT_SECS}"))?,
    ));
    wait_load.keep_answers = true;
    let counter = Arc::new(AtomicU64::new(0));
    let warm = load::closed_loop(
        &background_load,
        s.connections,
        u64::MAX,
        s.warmup,
        counter.clone(),
    )
    .await;
    let (background, waited) = tokio::join!(
        load::closed_loop(
            &background_load,
            s.connections,
            u64::MAX,
            s.duration,
            counter.clone()
        ),
        load::closed_loop(
            &wait_load,
            s.wait_connections,
            u64::MAX,
            s.duration,
            counter
        ),
    );
    decided(
        bench,
        "wait (accept load)",
        busy,
        warm.count(202) + background.count(202),
    )
    .await?;

    let mut answer_latency = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let mut seen = Vec::new();
    for answer in &waited.answers {
        if answer.status != 200 && answer.status != 202 {
            continue; // refused: no transaction (counted in the statuses)
        }
        let Ok(body) = serde_json::from_slice::<Seen>(&answer.body) else {
            bench.expect(
                false,
                format!(
                    "wait: unreadable {} answer {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                ),
            );
            continue;
        };
        answer_latency.saturating_record(load::micros(answer.latency));
        if answer.status == 200 {
            let applied = answer
                .headers
                .get("preference-applied")
                .and_then(|v| v.to_str().ok());
            bench.expect(
                applied == Some(&format!("wait={WAIT_SECS}")[..]) && body.status != "pending",
                format!(
                    "wait: a 200 answered status {:?} with Preference-Applied {applied:?}",
                    body.status
                ),
            );
        }
        seen.push((answer.status, answer.latency, body));
    }
    let final_answers = waited.count(200);
    let pending = waited.count(202);
    let ids: Vec<uuid::Uuid> = seen.iter().map(|(_, _, b)| b.transaction_id).collect();
    decided(bench, "wait", waiting, ids.len() as u64).await?;
    let stored = db::decisions_of(&bench.pool, &ids).await?;
    let mut decided_latency = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let mut excess = Vec::new();
    for (status, latency, body) in &seen {
        let Some((to_decided, stored_status)) = stored.get(&body.transaction_id) else {
            bench.expect(
                false,
                format!(
                    "wait: {} answered {status} but never stored",
                    body.transaction_id
                ),
            );
            continue;
        };
        decided_latency.saturating_record(u64::try_from(*to_decided).unwrap_or(0).max(1));
        if *status == 200 {
            bench.expect(
                *stored_status == body.status,
                format!(
                    "wait: {} answered {} but stored {stored_status}",
                    body.transaction_id, body.status
                ),
            );
            excess.push(i64::try_from(latency.as_micros()).unwrap_or(i64::MAX) - to_decided);
        }
    }
    excess.sort_unstable();
    Ok(Wait {
        connections: s.wait_connections,
        background,
        waited,
        final_answers,
        pending,
        answer_latency,
        decided_latency,
        excess,
    })
}

/// Flash sale on one hot product, then the sold-out short-circuit, then a restock.
pub struct Flash {
    /// Units the product was created with.
    pub stock: u64,
    pub sale: Tally,
    pub decisions: Decisions,
    pub sold_out: Tally,
    pub reopened_after: Option<Duration>,
}

pub async fn flash(bench: &mut Bench, s: &Settings) -> Result<Flash> {
    let product = bench
        .admin
        .create_product("bench-flash", s.flash_stock)
        .await?
        .id;
    let load = orders(bench.addr, product, product);
    let counter = Arc::new(AtomicU64::new(0));
    let sale = load::closed_loop(
        &load,
        s.connections,
        s.flash_requests,
        Duration::from_secs(600),
        counter,
    )
    .await;
    let accepted = sale.count(202);
    db::wait_decided(&bench.pool, product, product, accepted, DECIDE_WITHIN).await?;
    let decisions = db::decisions(&bench.pool, product, product).await?;
    let stock = u64::try_from(s.flash_stock)?;
    bench.expect(
        decisions.succeeded == stock,
        format!("flash: {} succeeded, expected {stock}", decisions.succeeded),
    );
    let left = db::stock(&bench.pool, product).await?;
    bench.expect(left == 0, format!("flash: stock {left} left, expected 0"));
    bench.expect(
        decisions.count == accepted,
        format!("flash: {} decided for {accepted} accepted", decisions.count),
    );
    bench.expect(
        sale.answered() == s.flash_requests && sale.errors == 0,
        format!(
            "flash: {} answers and {} errors for {} requests",
            sale.answered(),
            sale.errors,
            s.flash_requests
        ),
    );

    // The product is sold out: once the API's next refresh saw it, its requests must be
    // answered without the broker.
    let (engaged, probes_accepted) = probe_until(bench, product, 200).await?;
    bench.expect(
        engaged,
        "sold out: the API kept accepting the sold-out product for 5 s".into(),
    );
    // Probes accepted before the short-circuit engaged are decided (rejected) before going on.
    db::wait_decided(
        &bench.pool,
        product,
        product,
        accepted + probes_accepted,
        DECIDE_WITHIN,
    )
    .await?;
    let counter = Arc::new(AtomicU64::new(0));
    let sold_out = load::closed_loop(&load, s.connections, u64::MAX, s.duration, counter).await;
    bench.expect(
        sold_out.count(200) == sold_out.answered() && sold_out.answered() > 0,
        format!("sold out: answers by status {:?}", sold_out.statuses),
    );

    let reopened_after = restock(bench, product).await?;
    Ok(Flash {
        stock: u64::try_from(s.flash_stock).unwrap_or(0),
        sale,
        decisions,
        sold_out,
        reopened_after,
    })
}

/// Restocks one unit and probes (one request at a time) until the product takes a request
/// again; then checks that exactly that unit was sold.
async fn restock(bench: &mut Bench, product: i64) -> Result<Option<Duration>> {
    let before = db::decisions(&bench.pool, product, product).await?;
    let started = Instant::now();
    bench.admin.restock(product, 1).await?;
    let (reopened, _) = probe_until(bench, product, 202).await?;
    let reopened_after = reopened.then(|| started.elapsed());
    bench.expect(
        reopened_after.is_some(),
        "restock: the product did not re-open within 5 s".into(),
    );
    if reopened_after.is_some() {
        db::wait_decided(
            &bench.pool,
            product,
            product,
            before.count + 1,
            DECIDE_WITHIN,
        )
        .await?;
        let after = db::decisions(&bench.pool, product, product).await?;
        bench.expect(
            after.succeeded == before.succeeded + 1,
            format!(
                "restock: {} succeeded after one more unit, expected {}",
                after.succeeded,
                before.succeeded + 1
            ),
        );
        let left = db::stock(&bench.pool, product).await?;
        bench.expect(left == 0, format!("restock: stock {left} left, expected 0"));
    }
    Ok(reopened_after)
}

/// Sends one request at a time for `product` until one is answered `status` (`false` if none
/// was within 5 s); also returns how many of them were accepted (202).
async fn probe_until(bench: &Bench, product: i64, status: u16) -> Result<(bool, u64)> {
    let body = Bytes::from(format!(
        r#"{{"user_id":1,"product_id":{product},"quantity":1}}"#
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut accepted = 0;
    while Instant::now() < deadline {
        let answer = load::one(bench.addr, ORDER_PATH, body.clone()).await?.0;
        accepted += u64::from(answer == 202);
        if answer == status {
            return Ok((true, accepted));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((false, accepted))
}

/// Wide catalogue: uniform random requests over many products; the backlog (accepted but not
/// yet decided) is sampled as it runs.
pub struct Wide {
    pub closed: Tally,
    pub decisions: Decisions,
    pub max_backlog: u64,
    pub final_backlog: u64,
}

pub async fn wide(bench: &mut Bench, s: &Settings) -> Result<Wide> {
    let (first, last) =
        db::create_products(&bench.pool, "bench-wide-", s.wide_products, 1_000_000).await?;
    let load = orders(bench.addr, first, last);
    let counter = Arc::new(AtomicU64::new(0));
    let max_backlog = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (pool, counter, max_backlog) =
            (bench.pool.clone(), counter.clone(), max_backlog.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let accepted = counter.load(Ordering::Relaxed);
                if let Ok(decided) = db::decided_count(&pool, first, last).await {
                    max_backlog.fetch_max(accepted.saturating_sub(decided), Ordering::Relaxed);
                }
            }
        })
    };
    let closed =
        load::closed_loop(&load, s.connections, u64::MAX, s.duration, counter.clone()).await;
    sampler.abort();
    let final_backlog = closed
        .count(202)
        .saturating_sub(db::decided_count(&bench.pool, first, last).await?);
    let max_backlog = max_backlog.load(Ordering::Relaxed).max(final_backlog);
    db::wait_decided(&bench.pool, first, last, closed.count(202), DECIDE_WITHIN)
        .await
        .context("wide catalogue")?;
    let decisions = db::decisions(&bench.pool, first, last).await?;
    bench.expect(
        decisions.count == closed.count(202),
        format!(
            "wide: {} decided for {} accepted",
            decisions.count,
            closed.count(202)
        ),
    );
    Ok(Wide {
        closed,
        decisions,
        max_backlog,
        final_backlog,
    })
}
