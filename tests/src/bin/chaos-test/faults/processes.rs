//! Faults of allot's own processes: a worker killed (SIGKILL) or restarted (SIGTERM), the API
//! restarted (SIGTERM) or killed (SIGKILL) while messages are in flight.

use super::under_load;
use crate::apps::Role;
use crate::load::Load;
use crate::system::System;
use allot_tests::invariants;
use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Extra clients of the API crash fault. They buy the probe products, which never sell out, so
/// every partition's lane has a message awaiting its confirm at almost any moment.
const CRASH_CLIENTS: usize = 32;

/// Fault 1 and 2 of the issue: Two workers; `kill -9` one mid-sale (alternating), check that the other takes
/// its partitions over within seconds, then bring it back (it joins as a standby).
pub async fn worker_crash(system: &mut System, rounds: usize) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    for round in 0..rounds {
        let victim = if round % 2 == 0 {
            Role::WorkerA
        } else {
            Role::WorkerB
        };
        under_load(Duration::from_millis(1500)).await;
        system.kill(victim).await?;
        let took = every_partition_decides(system, Duration::from_secs(30)).await?;
        match took {
            Some(took) => println!(
                "    every partition deciding again {:.2} s after the kill",
                took.as_secs_f64()
            ),
            None => violations.push(format!(
                "round {round}: partitions not taken over within 30 s"
            )),
        }
        system.spawn(victim).await?;
    }
    Ok(violations)
}

/// Sends one request to every partition (a probe product each; the sale's own products may be
/// sold out and answered by the API alone) and waits until all of them are decided: how long
/// the surviving worker took to take the partitions over, or `None` past `deadline`.
async fn every_partition_decides(system: &System, deadline: Duration) -> Result<Option<Duration>> {
    let started = Instant::now();
    let mut ids = Vec::new();
    for &product in &system.probes {
        loop {
            if let Some(id) = system.order(product).await {
                ids.push(id);
                break;
            }
            if started.elapsed() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let left = deadline.saturating_sub(started.elapsed());
    Ok(invariants::wait_decided(&system.pool, &ids, left)
        .await
        .ok()
        .map(|_| started.elapsed()))
}

/// Fault 2 and 8 of the issue: A rolling restart of the workers with SIGTERM: each finishes (or leaves unacked)
/// its batch and exits 0; it comes back as a standby.
pub async fn worker_rolling_restart(system: &mut System) -> Result<Vec<String>> {
    for role in [Role::WorkerA, Role::WorkerB] {
        under_load(Duration::from_millis(1500)).await;
        system.terminate(role).await?;
        under_load(Duration::from_millis(500)).await;
        system.spawn(role).await?;
    }
    Ok(Vec::new())
}

/// Fault 8 of the issue: SIGTERM to the API during the sale: it stops accepting, finishes what it confirmed and
/// exits 0; every 202 it gave is decided. Then it comes back.
pub async fn api_restart(system: &mut System) -> Result<Vec<String>> {
    under_load(Duration::from_millis(1500)).await;
    system.terminate(Role::Api).await?;
    under_load(Duration::from_millis(500)).await;
    system.spawn(Role::Api).await?;
    let took = system.wait_ready(Duration::from_secs(60)).await?;
    println!("    API ready again after {:.2} s", took.as_secs_f64());
    Ok(Vec::new())
}

/// The "kill -9 of the API while batches are in flight": `kill -9` the API `kills`
/// times while extra clients buy the probe products (which never sell out, so each partition's
/// lane keeps a message awaiting its confirm), start it again each time and wait until it is
/// ready. The requests in flight across a kill lose their answer; after the phase the checks
/// prove, request by request (each has its own user id), that each of them ended in at most one
/// outcome, that every 202 is decided once and that nothing refused was sold. Here: that the
/// kills did cut messages in flight (requests whose answer was lost, decided by a worker after
/// all), and that nothing is left in a queue.
pub async fn api_crash(system: &mut System, kills: usize) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let load = Load::start(
        system.api.clone(),
        system.ledger.clone(),
        system.users.clone(),
        Arc::from(system.probes.clone()),
        CRASH_CLIENTS,
    );
    let mut cut = Vec::new();
    for round in 0..kills {
        // A different moment of the lanes' publish-confirm cycles each time.
        under_load(Duration::from_millis(700 + 250 * (round % 4) as u64)).await;
        let before = Instant::now();
        system.kill(Role::Api).await?;
        let after = Instant::now();
        (system.ledger.lock().expect("ledger")).api_killed(before, after);
        system.spawn(Role::Api).await?;
        let ready = system.wait_ready(Duration::from_secs(60)).await?;
        // Every request cut by the kill was told so at once (connection reset), long before the
        // API was ready again.
        let in_flight = (system.ledger.lock().expect("ledger")).cut_by(before, after);
        println!(
            "    {} requests in flight lost their answer; API ready again after {:.2} s",
            in_flight.len(),
            ready.as_secs_f64()
        );
        cut.extend(in_flight);
    }
    under_load(Duration::from_millis(500)).await;
    load.stop().await;

    // Whatever reached the broker is decided: the queues empty.
    let broker = system.broker().await?;
    let started = Instant::now();
    while broker.deepest().await? > 0 {
        if started.elapsed() > Duration::from_secs(60) {
            violations.push("the partition queues were not empty 60 s after the last kill".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.close().await;
    // A kill that caught messages in flight leaves requests without an answer that a worker
    // decided (their message was in the broker when the API died). The last batch may still be
    // committing: wait a little for the first.
    let mut decided: i64 = 0;
    while decided == 0 && started.elapsed() < Duration::from_secs(70) {
        decided = sqlx::query_scalar(
            "SELECT count(*) FROM transactions WHERE user_id = ANY($1) AND reason IS DISTINCT FROM 'not_accepted'",
        )
        .bind(&cut)
        .fetch_one(&system.pool)
        .await?;
        if decided == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "    {} requests cut by {kills} kills, {decided} of them decided by a worker (their message was in the broker)",
        cut.len()
    );
    if decided == 0 {
        violations.push(format!(
            "none of the {} requests cut by the kills reached a worker: no kill caught a message in flight",
            cut.len()
        ));
    }
    Ok(violations)
}
