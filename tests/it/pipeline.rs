//! The order pipeline end to end, and the faults it must shrug off: batch atomicity,
//! redelivered and duplicated messages, two deciders on one partition, restocks during a sale,
//! day rollover and time zones, unparseable messages, a worker that starts late.
//!
//! Promises are checked against PostgreSQL, not only through the HTTP answers.

use crate::helpers::{
    Options, assert_promises_hold, clock_at, insert_product, order_seqs, partition_of, process,
    request, spawn_app, stock_of, today, wait_for,
};
use allot_shared::{Clock, ManualClock, PurchaseRequest, SystemClock};
use allot_worker::decider::Decider;
use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Makes the database fail every batch that stores an outcome of user 666 with a transient
/// error (a serialization failure, as a busy or restarting server gives): every such batch
/// rolls back and is retried, never set aside.
async fn refuse_outcomes_of_user_666(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_666() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.user_id = 666 THEN RAISE EXCEPTION 'refused for the test' \
         USING ERRCODE = 'serialization_failure'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_666 BEFORE INSERT ON transactions FOR EACH ROW EXECUTE FUNCTION refuse_666();",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn accept_outcomes_of_user_666(pool: &PgPool) {
    sqlx::raw_sql("DROP TRIGGER refuse_666 ON transactions")
        .execute(pool)
        .await
        .unwrap();
}

fn order_number_of(view: &Value) -> String {
    view["order_number"]
        .as_str()
        .unwrap_or_else(|| panic!("no order number in {view}"))
        .to_owned()
}

// --- The promises, end to end -------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_flash_sale_sells_exactly_the_stock_with_gapless_numbers(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("last units", 5).await;

    let ids = join_all((1..=20).map(|user| app.buy(user, product, 1))).await;
    let views = join_all(ids.iter().map(|&id| app.wait_final(id))).await;

    let (won, lost): (Vec<&Value>, Vec<&Value>) =
        views.iter().partition(|v| v["status"] == "succeeded");
    assert_eq!(won.len(), 5);
    assert!(lost.iter().all(|v| v["status"] == "rejected"
        && v["reason"] == "out_of_stock"
        && v.get("order_number").is_none()));
    let numbers: BTreeSet<String> = won.iter().map(|v| order_number_of(v)).collect();
    let expected: BTreeSet<String> = (1..=5).map(|seq| format!("{}-{seq:05}", today())).collect();
    assert_eq!(numbers, expected, "numbers are today's 00001..00005");
    for (id, view) in ids.iter().zip(&views) {
        assert_eq!(view["transaction_id"], id.to_string());
        assert_eq!(view["product_id"], product);
        assert_eq!(view["quantity"], 1);
        assert!(view["decided_at"].is_string());
    }

    assert_eq!(app.product_stock(product).await, 0);
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 20);
    assert_eq!(
        app.count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
            .await,
        5
    );
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2, 3, 4, 5]);
    assert_promises_hold(&app).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn requests_for_an_unknown_product_are_rejected_and_recorded(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let id = app.buy(3, 424_242, 2).await;
    let view = app.wait_final(id).await;
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["reason"], "unknown_product");
    assert!(view.get("order_number").is_none());
    assert_eq!(
        app.count("SELECT count(*) FROM transactions WHERE reason = 'unknown_product'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM order_counters").await,
        0,
        "no number for a rejection"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn requests_accepted_while_no_worker_runs_are_decided_once_one_starts(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("queued", 3).await;
    let ids = join_all((1..=6).map(|user| app.buy(user, product, 1))).await;
    // Concurrent requests of one partition share messages (batch envelopes): 1 to 6 of them.
    let depth = app.queue_depth(partition_of(product)).await;
    assert!((1..=6).contains(&depth), "6 requests in {depth} messages");
    assert_eq!(app.transaction(ids[0]).await["status"], "pending");

    app.start_worker(Arc::new(SystemClock));
    let views = join_all(ids.iter().map(|&id| app.wait_final(id))).await;
    assert_eq!(
        views.iter().filter(|v| v["status"] == "succeeded").count(),
        3
    );
    wait_for("the queue to drain", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 6);
    app.shutdown().await;
}

// --- Batches --------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_batch_is_committed_all_or_nothing(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let decider = app.decider(Arc::new(SystemClock), chrono_tz::UTC);
    let product = insert_product(&app.pool, 10).await;
    let partition = partition_of(product);
    let batch: Vec<PurchaseRequest> = [1, 2, 666, 4, 5]
        .iter()
        .map(|&user| request(user, product, 1))
        .collect();

    // Make the database refuse the batch's third row, as a crash or a constraint would.
    refuse_outcomes_of_user_666(&app.pool).await;
    let err = process(&decider, partition, &batch)
        .await
        .expect_err("the batch fails");
    assert!(
        format!("{err:?}").contains("refused for the test"),
        "{err:?}"
    );
    assert_eq!(stock_of(&app.pool, product).await, 10, "no stock taken");
    assert_eq!(
        app.count("SELECT count(*) FROM transactions").await,
        0,
        "no outcome stored"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM order_counters").await,
        0,
        "no number used"
    );
    assert_eq!(app.redis_key_count().await, 0, "no status published");

    // Once the cause is gone the same batch goes through, exactly once.
    accept_outcomes_of_user_666(&app.pool).await;
    let outcome = process(&decider, partition, &batch).await.unwrap();
    assert_eq!(
        (outcome.succeeded, outcome.rejected, outcome.replayed),
        (5, 0, 0)
    );
    assert_eq!(stock_of(&app.pool, product).await, 5);
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(app.redis_key_count().await, 5);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_batch_that_cannot_commit_stays_unacked_and_is_redelivered(pool: PgPool) {
    let mut app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("redelivered", 3).await;
    refuse_outcomes_of_user_666(&app.pool).await;
    let id = app.buy(666, product, 1).await;
    // The worker keeps retrying the batch; it must not ack it. Wait until it has tried.
    wait_for("the worker to receive the message", || async {
        (app.queue_depth(partition_of(product)).await == 0).then_some(())
    })
    .await;
    app.stop_worker().await;
    // With the worker's channel closed, RabbitMQ puts the unacked message back.
    wait_for("the unacked message to return to its queue", || async {
        (app.queue_depth(partition_of(product)).await == 1).then_some(())
    })
    .await;
    assert_eq!(app.transaction(id).await["status"], "pending");
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 0);

    accept_outcomes_of_user_666(&app.pool).await;
    app.start_worker(Arc::new(SystemClock));
    let view = app.wait_final(id).await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(order_number_of(&view), format!("{}-00001", today()));
    assert_eq!(app.product_stock(product).await, 2);
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 1);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_redelivered_batch_is_replayed_not_decided_again(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let decider = app.decider(Arc::new(SystemClock), chrono_tz::UTC);
    let product = insert_product(&app.pool, 2).await;
    let batch: Vec<PurchaseRequest> = (1..=3).map(|user| request(user, product, 1)).collect();

    let first = process(&decider, partition_of(product), &batch)
        .await
        .unwrap();
    assert_eq!((first.succeeded, first.rejected, first.replayed), (2, 1, 0));
    let statuses_before = join_all(batch.iter().map(|r| app.transaction(r.transaction_id))).await;

    // The crash-between-commit-and-ack case: the same messages come again.
    let again = process(&decider, partition_of(product), &batch)
        .await
        .unwrap();
    assert_eq!((again.succeeded, again.rejected, again.replayed), (0, 0, 3));
    assert_eq!(stock_of(&app.pool, product).await, 0);
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 3);
    assert_eq!(app.count("SELECT last_seq FROM order_counters").await, 2);
    let statuses_after = join_all(batch.iter().map(|r| app.transaction(r.transaction_id))).await;
    assert_eq!(
        statuses_before, statuses_after,
        "the replay republishes the same statuses"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_message_published_twice_is_decided_once(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("twice", 5).await;
    let duplicate = request(9, product, 2);
    // A publisher retrying after a lost confirm sends the same message again.
    app.publish_raw(partition_of(product), &duplicate.to_json(), None)
        .await;
    app.publish_raw(partition_of(product), &duplicate.to_json(), None)
        .await;
    let view = app.wait_final(duplicate.transaction_id).await;
    wait_for("the queue to drain", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    // A later request proves both copies were consumed before it.
    let after = app.buy(10, product, 1).await;
    app.wait_final(after).await;

    assert_eq!(view["status"], "succeeded");
    assert_eq!(order_number_of(&view), format!("{}-00001", today()));
    assert_eq!(app.product_stock(product).await, 2, "5 - 2 (once) - 1");
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2]);
    assert_promises_hold(&app).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn two_deciders_on_one_partition_never_oversell_or_decide_twice(pool: PgPool) {
    // A split brain: several workers believe they own the partition and receive batches of
    // it at once. PostgreSQL, not RabbitMQ, must keep the promises.
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = insert_product(&app.pool, 10).await;
    let requests: Vec<PurchaseRequest> = (1..=45).map(|user| request(user, product, 1)).collect();
    let decider = || app.decider(Arc::new(SystemClock), chrono_tz::UTC);
    let partition = partition_of(product);

    let until_done = |decider: Decider, batch: Vec<PurchaseRequest>| async move {
        // A loser of a race (duplicate transaction id) rolls back; the consumer loop retries.
        for _ in 0..50 {
            if process(&decider, partition, &batch).await.is_ok() {
                return;
            }
        }
        panic!("a batch kept failing");
    };
    // A and B overlap (the transaction ids must refuse a second decision); C shares only the
    // product (its row lock must stop a second reader of the same stock).
    tokio::join!(
        until_done(decider(), requests[0..20].to_vec()),
        until_done(decider(), requests[10..30].to_vec()),
        until_done(decider(), requests[30..45].to_vec()),
    );

    assert_eq!(
        app.count("SELECT count(*) FROM transactions").await,
        45,
        "each id decided once"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
            .await,
        10
    );
    assert_eq!(stock_of(&app.pool, product).await, 0);
    assert_eq!(
        order_seqs(&app.pool, &today()).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_promises_hold(&app).await;
    app.shutdown().await;
}

// --- Restock during a sale ------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_restock_during_a_sale_loses_no_update(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("restocked", 10).await;
    let restock = || async {
        let response = app
            .post_admin(
                &format!("/api/v1/products/{product}/restock"),
                &serde_json::json!({"quantity": 5}),
            )
            .await;
        assert_eq!(response.status(), reqwest::StatusCode::OK);
    };
    let buys = join_all((1..=150).map(|user| app.buy(user, product, 1)));
    let restocks = join_all((0..4).map(|_| restock()));
    let (ids, _) = tokio::join!(buys, restocks);
    let views = join_all(ids.iter().map(|&id| app.wait_final(id))).await;

    let sold = views.iter().filter(|v| v["status"] == "succeeded").count() as i64;
    let left = app.product_stock(product).await;
    assert!(left >= 0);
    assert_eq!(
        sold + left,
        10 + 4 * 5,
        "every unit is either sold or still there"
    );
    assert_eq!(
        order_seqs(&app.pool, &today()).await,
        (1..=sold).collect::<Vec<_>>()
    );
    assert_promises_hold(&app).await;
    app.shutdown().await;
}

// --- Days and time zones ----------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn order_numbers_start_again_at_one_on_a_new_day(pool: PgPool) {
    let clock = clock_at("2026-03-14T23:59:59Z");
    let app = spawn_app(
        pool,
        Options {
            clock: Some(clock.clone()),
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("midnight", 10).await;

    let before = [app.buy(1, product, 1).await, app.buy(2, product, 1).await];
    let mut numbers = Vec::new();
    for id in before {
        let view = app.wait_final(id).await;
        assert_eq!(view["decided_at"], "2026-03-14T23:59:59Z");
        numbers.push(order_number_of(&view));
    }
    clock.set("2026-03-15T00:00:01Z".parse().unwrap());
    for user in [3, 4] {
        let id = app.buy(user, product, 1).await;
        numbers.push(order_number_of(&app.wait_final(id).await));
    }
    assert_eq!(
        numbers,
        [
            "20260314-00001",
            "20260314-00002",
            "20260315-00001",
            "20260315-00002"
        ]
    );
    assert_promises_hold(&app).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_day_of_an_order_number_is_taken_in_the_configured_time_zone(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    // 15:30 UTC on the 14th is already 00:30 on the 15th in Tokyo (UTC+9).
    let clock: Arc<dyn Clock> = Arc::new(clock_at("2026-03-14T15:30:00Z"));
    let tokyo = app.decider(clock.clone(), chrono_tz::Asia::Tokyo);
    let utc = app.decider(clock, chrono_tz::UTC);
    let product = insert_product(&app.pool, 10).await;
    let in_tokyo = request(1, product, 1);
    let in_utc = request(2, product, 1);
    process(
        &tokyo,
        partition_of(product),
        std::slice::from_ref(&in_tokyo),
    )
    .await
    .unwrap();
    process(&utc, partition_of(product), std::slice::from_ref(&in_utc))
        .await
        .unwrap();
    assert_eq!(
        order_number_of(&app.transaction(in_tokyo.transaction_id).await),
        "20260315-00001"
    );
    assert_eq!(
        order_number_of(&app.transaction(in_utc.transaction_id).await),
        "20260314-00001"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn order_numbers_grow_past_five_digits(pool: PgPool) {
    let clock = ManualClock::new("2026-03-14T12:00:00Z".parse::<DateTime<Utc>>().unwrap());
    let app = spawn_app(
        pool,
        Options {
            clock: Some(clock),
            ..Options::default()
        },
    )
    .await;
    sqlx::query("INSERT INTO order_counters (day, last_seq) VALUES ('2026-03-14', 99999)")
        .execute(&app.pool)
        .await
        .unwrap();
    let product = app.create_product("popular", 1).await;
    let id = app.buy(1, product, 1).await;
    assert_eq!(
        order_number_of(&app.wait_final(id).await),
        "20260314-100000"
    );
    app.shutdown().await;
}

// --- Poison -----------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_unparseable_message_is_set_aside_and_the_partition_keeps_moving(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("after poison", 1).await;
    app.publish_raw(partition_of(product), b"{not json at all", None)
        .await;
    let id = app.buy(1, product, 1).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    let (body, error): (Vec<u8>, String) = sqlx::query_as("SELECT body, error FROM dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(body, b"{not json at all");
    assert!(!error.is_empty());
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 1);
    app.shutdown().await;
}
