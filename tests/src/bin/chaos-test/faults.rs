//! The faults, one function each, injected while the sale's load runs (see [`System::begin`]).
//! Each prints what it did and what it measured, and returns the violations it saw itself
//! (the promises are checked afterwards by [`crate::check`]).

use crate::api::Answer;
use crate::apps::Role;
use crate::check;
use crate::load::Load;
use crate::services::Service;
use crate::system::System;
use allot_shared::{ProductId, PurchaseRequest, Quantity, TransactionId, UserId};
use anyhow::{Context as _, Result};
use reqwest::StatusCode;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Extra clients of the flood fault.
const FLOOD_CLIENTS: usize = 64;

/// Lets the load run for a while.
async fn under_load(duration: Duration) {
    tokio::time::sleep(duration).await;
}

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

/// Fault 3 of the issue: RabbitMQ stopped during the sale: 503 + Retry-After quickly and never 202 while it is
/// down; API and workers reconnect by themselves once it is back.
pub async fn broker_restart(system: &mut System, down_for: Duration) -> Result<Vec<String>> {
    outage(system, Service::RabbitMq, down_for, false).await
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
    if kill {
        system.services.kill(service).await?;
    } else {
        system.services.stop(service).await?;
    }
    // No 202 may be given while the broker or Redis is down; PostgreSQL is not on that path.
    let refuses = service != Service::Postgres;
    system.ledger.lock().expect("ledger").mark_outage(refuses);
    let down_since = Instant::now();
    let (mut probes, mut slowest) = (0, Duration::ZERO);
    while down_since.elapsed() < down_for {
        let sent = Instant::now();
        let answer = system.api.add_to_cart(1, system.products[0], 1).await;
        let took = sent.elapsed();
        probes += 1;
        match (&answer, refuses) {
            (Answer::Refused { .. }, true) => slowest = slowest.max(took),
            (Answer::Accepted(_), false) => {}
            _ => violations.push(format!(
                "{service:?} down: addToCart answered {answer:?} after {took:?}"
            )),
        }
        if refuses && took > Duration::from_secs(2) {
            violations.push(format!("{service:?} down: a 503 took {took:?}"));
        }
        system
            .ledger
            .lock()
            .expect("ledger")
            .record(system.products[0], sent, answer);
        // Reads of decided transactions fall back to whichever store is up.
        if let Some(id) = decided {
            match system.api.transaction(id).await {
                Ok((StatusCode::OK, body)) if body["status"] != "pending" => {}
                other => violations.push(format!(
                    "{service:?} down: GET of decided {id} answered {other:?}"
                )),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    system.ledger.lock().expect("ledger").mark_outage(false);
    if refuses {
        println!(
            "    {probes} probes while down: all 503 with Retry-After, slowest {} ms",
            slowest.as_millis()
        );
    } else {
        println!("    {probes} probes while down: addToCart answered 202, reads served from Redis");
    }
    system.services.start(service).await?;
    let back = Instant::now();
    // Recovery: a fresh request is accepted and decided again.
    let recovered = loop {
        let sent = Instant::now();
        let answer = system.api.add_to_cart(2, system.products[0], 1).await;
        let id = match &answer {
            Answer::Accepted(id) => Some(*id),
            _ => None,
        };
        system
            .ledger
            .lock()
            .expect("ledger")
            .record(system.products[0], sent, answer);
        if let Some(id) = id {
            check::wait_decided(&system.pool, &[id], Duration::from_secs(60)).await?;
            break back.elapsed();
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(90),
            "allot did not recover within 90 s of {service:?} coming back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "    accepting and deciding again {:.2} s after {service:?} was back",
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
    Ok(
        sqlx::query_scalar("SELECT id FROM transactions WHERE id = ANY($1) LIMIT 1")
            .bind(&ids)
            .fetch_optional(&system.pool)
            .await?,
    )
}

/// Fault 6 of the issue: A flood with the workers stopped: the bounded queues fill, the broker refuses publishes
/// and the API answers 503 (queue full) instead of growing a queue; nothing is dropped.
pub async fn flood(system: &mut System, max_length: i64) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    system.terminate(Role::WorkerA).await?;
    system.terminate(Role::WorkerB).await?;
    let before = system.ledger.lock().expect("ledger").queue_full;
    let flood = Load::start(
        system.api.clone(),
        system.ledger.clone(),
        system.products.clone(),
        FLOOD_CLIENTS,
        900_000_000_000,
    );
    let started = Instant::now();
    let broker = system.broker().await?;
    let mut deepest = 0;
    loop {
        deepest = deepest.max(broker.deepest_queue().await?);
        let refused = system.ledger.lock().expect("ledger").queue_full - before;
        if refused >= 50 || started.elapsed() > Duration::from_secs(60) {
            println!(
                "    {refused} publishes refused by full queues; deepest queue {deepest} (limit {max_length})"
            );
            if refused == 0 {
                violations.push("the flood filled no queue".into());
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    flood.stop().await;
    deepest = deepest.max(broker.deepest_queue().await?);
    // A quorum queue applies the limit as publishes are committed, so publishes already in
    // flight when it is reached still get in: at most one per concurrent request.
    let in_flight = (system.clients + FLOOD_CLIENTS) as i64;
    if i64::from(deepest) > max_length + in_flight {
        violations.push(format!(
            "a queue held {deepest} messages, over its limit {max_length} plus {in_flight} in flight"
        ));
    }
    broker.close().await;
    system.spawn(Role::WorkerA).await?;
    system.spawn(Role::WorkerB).await?;
    Ok(violations)
}

/// Fault 7 of the issue: Poison: an unparseable message, one whose id can be read but not its timestamp, and
/// requests for a product whose row the database refuses to write (every batch holding one
/// fails the same way). They are set aside with their reason; the partition moves on.
pub async fn poison(system: &mut System) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let cursed = system.catalogue.cursed;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION chaos_curse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF OLD.id = {cursed} THEN RAISE EXCEPTION 'chaos: product {cursed} cannot be written'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER chaos_curse BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION chaos_curse();"
    )))
    .execute(&system.pool)
    .await
    .context("installing the curse")?;
    let letters_before: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&system.pool)
        .await?;

    let broker = system.broker().await?;
    let partition = broker.partition_of(cursed)?;
    broker
        .publish(partition, b"\x00chaos: not even JSON", None)
        .await?;
    let salvageable = TransactionId::new().0;
    let body = serde_json::json!({"transaction_id": salvageable, "user_id": 7, "product_id": cursed,
                                  "quantity": 1, "created_at": "not a time"});
    broker
        .publish(
            partition,
            body.to_string().as_bytes(),
            Some(&salvageable.to_string()),
        )
        .await?;
    broker.close().await;
    system
        .ledger
        .lock()
        .expect("ledger")
        .accept(salvageable, cursed);

    let mut ids = vec![salvageable];
    for user in 0..10 {
        let sent = Instant::now();
        let answer = system.api.add_to_cart(500 + user, cursed, 1).await;
        if let Answer::Accepted(id) = &answer {
            ids.push(*id);
        }
        system
            .ledger
            .lock()
            .expect("ledger")
            .record(cursed, sent, answer);
    }
    let took = check::wait_decided(&system.pool, &ids, Duration::from_secs(120)).await?;
    let letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&system.pool)
        .await?;
    let unprocessable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transactions WHERE id = ANY($1) AND reason = 'unprocessable'",
    )
    .bind(&ids)
    .fetch_one(&system.pool)
    .await?;
    let with_reason: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters WHERE error LIKE '%cannot be written%'",
    )
    .fetch_one(&system.pool)
    .await?;
    println!(
        "    {} poison messages set aside in {:.1} s: {} new dead letters ({with_reason} with the database's reason), {unprocessable} transactions rejected as unprocessable",
        ids.len() + 1,
        took.as_secs_f64(),
        letters - letters_before
    );
    if letters - letters_before < ids.len() as i64 + 1 {
        violations.push(format!(
            "only {} dead letters for {} poison messages",
            letters - letters_before,
            ids.len() + 1
        ));
    }
    if unprocessable != ids.len() as i64 {
        violations.push(format!(
            "{unprocessable} of {} poison transactions rejected as unprocessable",
            ids.len()
        ));
    }
    sqlx::raw_sql("DROP TRIGGER chaos_curse ON products; DROP FUNCTION chaos_curse();")
        .execute(&system.pool)
        .await?;
    Ok(violations)
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

/// Fault 9 of the issue: Duplicates: already decided messages published again (a publisher retry after a lost
/// confirm), and fresh ones published twice. Each is decided once.
pub async fn duplicates(system: &mut System) -> Result<Vec<String>> {
    let ids: Vec<Uuid> = system
        .ledger
        .lock()
        .expect("ledger")
        .accepted
        .keys()
        .copied()
        .collect();
    let rows: Vec<(Uuid, i64, i64, i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT id, user_id, product_id, quantity, created_at FROM transactions \
         WHERE id = ANY($1) AND reason IS DISTINCT FROM 'unprocessable' LIMIT 100",
    )
    .bind(&ids)
    .fetch_all(&system.pool)
    .await?;
    let broker = system.broker().await?;
    for (id, user, product, quantity, created_at) in &rows {
        let request = PurchaseRequest {
            transaction_id: TransactionId(*id),
            user_id: UserId::try_from(*user).map_err(anyhow::Error::msg)?,
            product_id: ProductId::try_from(*product).map_err(anyhow::Error::msg)?,
            quantity: Quantity::try_from(*quantity).map_err(anyhow::Error::msg)?,
            created_at: *created_at,
        };
        broker
            .publish(
                broker.partition_of(*product)?,
                &request.to_json(),
                Some(&id.to_string()),
            )
            .await?;
    }
    let fresh = 20;
    for n in 0..fresh {
        let product = system.products[n % system.products.len()];
        let request = PurchaseRequest {
            transaction_id: TransactionId::new(),
            user_id: UserId::try_from(800_000_000 + n as i64).map_err(anyhow::Error::msg)?,
            product_id: ProductId::try_from(product).map_err(anyhow::Error::msg)?,
            quantity: Quantity::try_from(1).map_err(anyhow::Error::msg)?,
            created_at: chrono::Utc::now(),
        };
        let id = request.transaction_id.to_string();
        for _ in 0..2 {
            broker
                .publish(broker.partition_of(product)?, &request.to_json(), Some(&id))
                .await?;
        }
        system
            .ledger
            .lock()
            .expect("ledger")
            .accept(request.transaction_id.0, product);
    }
    broker.close().await;
    println!(
        "    republished {} decided messages, published {fresh} fresh ones twice",
        rows.len()
    );
    Ok(Vec::new())
}
