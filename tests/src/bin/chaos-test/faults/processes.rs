//! Faults of allot's own processes: a worker killed (SIGKILL) or restarted (SIGTERM), the API
//! restarted (SIGTERM).

use super::under_load;
use crate::apps::Role;
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
        let killed_at = chrono::Utc::now();
        system.kill(victim).await?;
        let took =
            every_partition_decides_after(system, killed_at, Duration::from_secs(30)).await?;
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

/// Waits until every partition committed a decision after `since`.
async fn every_partition_decides_after(
    system: &System,
    since: chrono::DateTime<chrono::Utc>,
    deadline: Duration,
) -> Result<Option<Duration>> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        let partitions: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT partition) FROM transactions WHERE decided_at > $1",
        )
        .bind(since)
        .fetch_one(&system.pool)
        .await?;
        if partitions >= i64::from(crate::system::PARTITIONS) {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(None)
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
