//! Faults of allot's own processes: a worker killed (SIGKILL) or restarted (SIGTERM), the API
//! restarted (SIGTERM).

use super::under_load;
use crate::apps::Role;
use crate::check;
use crate::system::System;
use anyhow::Result;
use std::time::{Duration, Instant};

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
    for (n, &product) in system.probes.iter().enumerate() {
        loop {
            if let Some(id) = system.order(3 + n as i64, product).await {
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
    Ok(check::wait_decided(&system.pool, &ids, left)
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
