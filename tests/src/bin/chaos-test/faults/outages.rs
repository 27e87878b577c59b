//! Faults of the services: RabbitMQ, PostgreSQL or Redis stopped (or killed) during the sale,
//! then started again.

use super::under_load;
use crate::load::Reply;
use crate::system::System;
use allot_tests::invariants;
use allot_tests::system::Service;
use anyhow::Result;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Fault 3 of the issue: RabbitMQ stopped during the sale: 503 + Retry-After quickly and never 202 while it is
/// down; API and workers reconnect by themselves once it is back.
pub async fn broker_restart(
    system: &mut System,
    down_for: Duration,
    kill: bool,
) -> Result<Vec<String>> {
    outage(system, Service::RabbitMq, down_for, kill).await
}

/// Fault 5 of the issue: Redis stopped: addToCart fails fast with 503 (the pending status cannot be recorded),
/// GET of a decided transaction falls back to PostgreSQL; statuses right once it is back.
pub async fn redis_restart(system: &mut System, down_for: Duration) -> Result<Vec<String>> {
    outage(system, Service::Redis, down_for, false).await
}

/// Fault 4 of the issue: PostgreSQL restarted (fast shutdown: sessions in the middle of a batch are cut): the
/// batch is not acked and is retried; addToCart keeps answering 202, GET falls back to Redis.
pub async fn postgres_restart(
    system: &mut System,
    down_for: Duration,
    kill: bool,
) -> Result<Vec<String>> {
    outage(system, Service::Postgres, down_for, kill).await
}

async fn outage(
    system: &mut System,
    service: Service,
    down_for: Duration,
    kill: bool,
) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    under_load(Duration::from_millis(1500)).await;
    let decided = some_decided(system).await?;
    let started = Instant::now();
    if kill {
        system.services.kill(service).await?;
    } else {
        system.services.stop(service).await?;
    }
    println!(
        "    {} {service} ({:.1} s)",
        if kill { "killed" } else { "stopped" },
        started.elapsed().as_secs_f64()
    );
    // No 202 may be given while the broker or Redis is down; PostgreSQL is not on that path.
    let refuses = service != Service::Postgres;
    system.ledger.lock().expect("ledger").mark_outage(refuses);
    let down_since = Instant::now();
    let (mut probes, mut sold_out, mut slowest) = (0, 0, Duration::ZERO);
    while down_since.elapsed() < down_for {
        let sent = Instant::now();
        let answer = system.order_answer(system.probes[0]).await;
        let took = sent.elapsed();
        probes += 1;
        match (&answer, refuses) {
            (Reply::Refused { .. }, true) => slowest = slowest.max(took),
            // A sold-out product is answered from memory, final, with nothing to publish.
            (Reply::SoldOut, _) => sold_out += 1,
            // Deciding pauses while PostgreSQL is down: the bounded queues may fill.
            (Reply::Accepted(_) | Reply::Refused { queue_full: true }, false) => {}
            _ => violations.push(format!(
                "{service} down: addToCart answered {answer:?} after {took:?}"
            )),
        }
        if refuses && took > Duration::from_secs(2) {
            violations.push(format!("{service} down: a 503 took {took:?}"));
        }
        // Reads of decided transactions fall back to whichever store is up.
        if let Some(id) = decided {
            match system.api.transaction_json(id, Duration::ZERO).await {
                Ok(view) if view["status"] == "succeeded" || view["status"] == "rejected" => {}
                Ok(view) => violations.push(format!(
                    "{service} down: GET of decided {id} answered it {}",
                    view["status"]
                )),
                Err(err) => {
                    violations.push(format!("{service} down: GET of decided {id}: {err:#}"))
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    system.ledger.lock().expect("ledger").mark_outage(false);
    if refuses {
        println!(
            "    {probes} probes while down: {} 503 with Retry-After (slowest {} ms), {sold_out} sold out (200, final), no 202",
            probes - sold_out,
            slowest.as_millis()
        );
    } else {
        println!("    {probes} probes while down: addToCart answered 202, reads served from Redis");
    }
    let started = Instant::now();
    system.services.start(service).await?;
    println!(
        "    started {service} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let back = Instant::now();
    // Recovery: a fresh request is accepted and decided again.
    let recovered = loop {
        if let Some(id) = system.order(system.probes[0]).await {
            invariants::wait_decided(&system.pool, &[id], Duration::from_secs(60)).await?;
            break back.elapsed();
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(90),
            "allot did not recover within 90 s of {service} coming back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "    accepting and deciding again {:.2} s after {service} was back",
        recovered.as_secs_f64()
    );
    Ok(violations)
}

/// An id decided before the fault, to read during it.
async fn some_decided(system: &System) -> Result<Option<Uuid>> {
    let ids: Vec<Uuid> = system
        .ledger
        .lock()
        .expect("ledger")
        .accepted
        .keys()
        .take(200)
        .copied()
        .collect();
    Ok(sqlx::query_scalar(
        "SELECT id FROM transactions WHERE id = ANY($1) \
             AND status IN ('succeeded', 'rejected') \
             ORDER BY product_id IS NULL DESC LIMIT 1",
    )
    .bind(&ids)
    .fetch_optional(&system.pool)
    .await?)
}
