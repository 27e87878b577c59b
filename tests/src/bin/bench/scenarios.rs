//! The scenarios against a running allot, each returning what it measured. Correctness problems
//! are collected in `Bench::failures` (they fail the run); timing targets are only reported.

use crate::db::{self, Decisions};
use crate::load::{self, Load, Tally};
use crate::{Bench, Settings};
use anyhow::{Context as _, Result};
use bytes::Bytes;
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
    Load {
        addr,
        path: ORDER_PATH.into(),
        body: Arc::new(move |i| {
            let product = first + (load::mix(i) % span) as i64;
            Bytes::from(format!(
                r#"{{"user_id":{},"product_id":{product},"quantity":1}}"#,
                i + 1
            ))
        }),
    }
}

/// Accept path: closed loop, then open loop at a fraction of the closed-loop rate, on one
/// product per partition with endless stock.
pub struct Accept {
    pub closed: Tally,
    pub open: Tally,
    pub open_rate: f64,
    pub decisions: Decisions,
}

pub async fn accept(bench: &mut Bench, s: &Settings) -> Result<Accept> {
    let (first, last) = db::create_products(
        &bench.pool,
        "bench-accept-",
        i64::from(s.partitions),
        1_000_000_000,
    )
    .await?;
    let load = orders(bench.addr, first, last);
    let counter = Arc::new(AtomicU64::new(0));
    // Warm-up: connections, the broker's and PostgreSQL's caches. Not reported.
    let warm = load::closed_loop(&load, s.connections, u64::MAX, s.warmup, counter.clone()).await;
    let closed = load::closed_loop(&load, s.connections, u64::MAX, s.duration, counter).await;
    let open_rate = (closed.rate() * s.open_fraction).max(10.0);
    let open = load::open_loop(&load, s.connections, open_rate, s.duration, s.duration).await;
    let accepted = warm.count(202) + closed.count(202) + open.count(202);
    db::wait_decided(&bench.pool, first, last, accepted, DECIDE_WITHIN).await?;
    let decisions = db::decisions(&bench.pool, first, last).await?;
    bench.expect(
        decisions.count == accepted,
        format!(
            "accept: {} decided for {accepted} accepted",
            decisions.count
        ),
    );
    Ok(Accept {
        closed,
        open,
        open_rate,
        decisions,
    })
}

/// Flash sale on one hot product, then the sold-out short-circuit, then a restock.
pub struct Flash {
    pub sale: Tally,
    pub decisions: Decisions,
    pub sold_out: Tally,
    pub reopened_after: Option<Duration>,
}

pub async fn flash(bench: &mut Bench, s: &Settings) -> Result<Flash> {
    let product = bench
        .admin
        .create_product("bench-flash", s.flash_stock)
        .await?;
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
