//! Faults in what reaches the queues: a flood against the bounded queues, poison messages,
//! duplicated messages.

use crate::apps::Role;
use crate::load::Load;
use crate::system::System;
use allot_shared::{ProductId, PurchaseRequest, Quantity, TransactionId, UserId};
use allot_tests::invariants;
use anyhow::{Context as _, Result};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Extra clients of the flood fault.
const FLOOD_CLIENTS: usize = 64;

/// Fault 6 of the issue: A flood with the workers stopped: the bounded queues fill, the broker refuses publishes
/// and the API answers 503 (queue full) instead of growing a queue; nothing is dropped.
pub async fn flood(system: &mut System, max_length: i64) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    system.terminate(Role::WorkerA).await?;
    system.terminate(Role::WorkerB).await?;
    let before = system.ledger.lock().expect("ledger").queue_full;
    let flood = Load::start(
        system.apis.clone(),
        system.ledger.clone(),
        system.users.clone(),
        system.products.clone(),
        FLOOD_CLIENTS,
    );
    let started = Instant::now();
    let broker = system.broker().await?;
    let mut deepest = 0;
    loop {
        deepest = deepest.max(broker.deepest().await?);
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
    deepest = deepest.max(broker.deepest().await?);
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
    let body = serde_json::json!({"transaction_id": salvageable, "user_id": system.users.next(), "product_id": cursed,
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
    for _ in 0..10 {
        if let Some(id) = system.order(cursed).await {
            ids.push(id);
        }
    }
    let took = invariants::wait_decided(&system.pool, &ids, Duration::from_secs(120)).await?;
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
         WHERE id = ANY($1) AND reason IS DISTINCT FROM 'unprocessable' \
           AND product_id IS NOT NULL AND hold_seconds IS NULL LIMIT 100",
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
            user_id: UserId::try_from(system.users.next()).map_err(anyhow::Error::msg)?,
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
