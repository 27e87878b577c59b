//! One hot product spread over 1, 2 and 4 partitions (`shards`), in the same run: how many of
//! its purchases allot decides per second with each.
//!
//! For each shard count: a product of its own with stock enough for every request (so each
//! decision is a sale from its own shard's share: what is measured is the throughput of one
//! product, not the end of a sale), a closed loop of `--connections` for `--duration-secs` on
//! that product alone, then everything accepted is awaited. Decisions/s is the count decided
//! over the time from the first request received to the last decision (as the other scenarios
//! count it). Checked: everything accepted decided, every one a sale, the product's stock (the
//! sum of its shares) down by exactly that many, and the partitions that decided it.

use crate::db::{self, Decisions};
use crate::{Bench, Settings};
use allot_tests::load::{self, Load, Tally};
use anyhow::{Context as _, Result};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The shard counts measured, each on a product of its own.
pub const SHARDS: [u16; 3] = [1, 2, 4];
/// Stock of each hot product: more than any run sells.
const STOCK: i64 = 1_000_000_000;

/// One shard count's figures.
pub struct Hot {
    pub shards: u16,
    pub load: Tally,
    pub decisions: Decisions,
}

/// Runs the hot product with each of [`SHARDS`] (those up to the partitions), one after the
/// other.
pub async fn run(bench: &mut Bench, s: &Settings) -> Result<Vec<Hot>> {
    let mut measured = Vec::new();
    for shards in SHARDS.into_iter().filter(|&k| k <= s.partitions) {
        measured.push(one(bench, s, shards).await?);
    }
    Ok(measured)
}

async fn one(bench: &mut Bench, s: &Settings, shards: u16) -> Result<Hot> {
    let name = format!("bench-hot-{shards}");
    let product = bench
        .admin
        .create_sharded_product(&name, STOCK, shards)
        .await?
        .id;
    let load = Load::new(
        bench.addr,
        "/api/v1/order/addToCart",
        Arc::new(move |i| {
            Bytes::from(format!(
                r#"{{"user_id":{},"product_id":{product},"quantity":1}}"#,
                i + 1
            ))
        }),
    );
    let counter = Arc::new(AtomicU64::new(0));
    load::closed_loop(&load, s.connections, u64::MAX, s.warmup, counter.clone()).await;
    let tally = load::closed_loop(&load, s.connections, u64::MAX, s.duration, counter).await;
    let phase = format!("hot product, {shards} shard(s)");
    let accepted = tally.count(202);
    // The warm-up's requests are decided too: wait for at least the measured ones.
    db::wait_decided(
        &bench.pool,
        product,
        product,
        accepted,
        Duration::from_secs(180),
    )
    .await
    .with_context(|| format!("{phase}: waiting for the decisions"))?;
    let decisions = settled(bench, product).await?;
    bench.expect(
        decisions.succeeded == decisions.count,
        format!(
            "{phase}: {} of {} decided were sales, with stock for all",
            decisions.succeeded, decisions.count
        ),
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT p.stock + COALESCE((SELECT sum(s.stock) FROM product_shares s \
                                   WHERE s.product_id = p.id), 0)::bigint \
         FROM products p WHERE p.id = $1",
    )
    .bind(product)
    .fetch_one(&bench.pool)
    .await?;
    bench.expect(
        left == STOCK - decisions.succeeded as i64,
        format!(
            "{phase}: stock {left} left after {} sales of {STOCK}",
            decisions.succeeded
        ),
    );
    // A full partition queue may refuse (503, not accepted): that is allowed, nothing else.
    bench.expect(
        tally.errors == 0
            && tally
                .statuses
                .keys()
                .all(|&status| status == 202 || status == 503),
        format!(
            "{phase}: answers by status {:?}, {} errors",
            tally.statuses, tally.errors
        ),
    );
    Ok(Hot {
        shards,
        load: tally,
        decisions,
    })
}

/// The decisions of `product` once no more arrive (the warm-up's and the measured requests).
async fn settled(bench: &Bench, product: i64) -> Result<Decisions> {
    let mut last = db::decided_count(&bench.pool, product, product).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = db::decided_count(&bench.pool, product, product).await?;
        if now == last {
            return db::decisions(&bench.pool, product, product).await;
        }
        last = now;
    }
}

/// Prints each shard count's figures and the ratio to one partition.
pub fn report(hot: &[Hot]) {
    let single = hot
        .iter()
        .find(|h| h.shards == 1)
        .map(|h| h.decisions.per_second);
    for h in hot {
        crate::report::load_line(&format!("hot product, {} shard(s)", h.shards), &h.load);
        let ratio = single.map_or(String::new(), |single| {
            format!(" ({:.2}x one partition)", h.decisions.per_second / single)
        });
        println!(
            "hot product, {} shard(s): {} decided, {:.0} decisions/s{ratio}, partitions {}",
            h.shards, h.decisions.count, h.decisions.per_second, h.decisions.partitions
        );
    }
}
