//! Poison and duplicate delivery through a real broker: a message that fails every time is set
//! aside with its reason (and its transaction rejected as `unprocessable`) while its partition
//! keeps moving; an unparseable message that still names a transaction ends that transaction
//! as rejected; copies of one message delivered together are decided once.

use crate::helpers::{Options, curse, partition_of, request, sample, spawn_app, today};
use allot_shared::SystemClock;
use serde_json::json;
use sqlx::PgPool;
use std::sync::Arc;

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_message_that_fails_every_time_is_set_aside_and_its_partition_moves_on(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let good = app.create_product("good", 3).await;
    // Products of one partition: the cursed one shares the good one's queue.
    let mut cursed = app.create_product("cursed", 5).await;
    while partition_of(cursed) != partition_of(good) {
        cursed = app.create_product("cursed", 5).await;
    }
    curse(&app.pool, cursed).await;
    // Queued before the worker starts, so they arrive as one batch that keeps failing.
    let before = app.buy(1, good, 1).await;
    let poisoned = app.buy(2, cursed, 1).await;
    let after = app.buy(3, good, 1).await;
    app.start_worker(Arc::new(SystemClock));

    let view = app.wait_final(poisoned).await;
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["reason"], "unprocessable");
    assert_eq!(
        app.wait_final(before).await["order_number"],
        format!("{}-00001", today())
    );
    assert_eq!(
        app.wait_final(after).await["order_number"],
        format!("{}-00002", today())
    );
    assert_eq!(app.product_stock(good).await, 1);
    assert_eq!(
        app.product_stock(cursed).await,
        5,
        "nothing sold from the cursed product"
    );
    let (message_id, body, error): (Option<String>, Vec<u8>, String) =
        sqlx::query_as("SELECT message_id, body, error FROM dead_letters")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // The item alone, under its envelope's message id and its place in it.
    let message_id = message_id.expect("an envelope item has an id");
    assert!(message_id.contains('#'), "{message_id}");
    let item: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(item["transaction_id"], poisoned.to_string());
    assert!(error.contains("is cursed"), "the reason is kept: {error}");
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 3);
    // Operators see it: one message set aside, on the worker's /metrics.
    let base = app.worker_address.clone().unwrap();
    let metrics = app
        .client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sample(&metrics, "allot_worker_set_aside_total"), 1.0);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_unparseable_message_naming_a_transaction_ends_it_rejected(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("unreadable", 2).await;
    let id = allot_shared::TransactionId::new();
    let body = json!({"transaction_id": id, "user_id": 4, "product_id": product, "quantity": 1,
                      "created_at": "not a time"});
    app.publish_raw(
        partition_of(product),
        body.to_string().as_bytes(),
        Some(&id.to_string()),
    )
    .await;
    let next = app.buy(5, product, 1).await;
    assert_eq!(app.wait_final(next).await["status"], "succeeded");

    let view = app.wait_final(id).await;
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["reason"], "unprocessable");
    assert_eq!(view["user_id"], 4);
    let error: String = sqlx::query_scalar("SELECT error FROM dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!error.is_empty(), "the parse error is kept");
    assert_eq!(
        app.product_stock(product).await,
        1,
        "only the valid request sold"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn copies_of_a_message_delivered_together_are_decided_once(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("copies", 10).await;
    let duplicated = request(6, product, 3);
    let id = duplicated.transaction_id.to_string();
    // A publisher retrying after lost confirms: three copies, queued before any worker runs,
    // so they are delivered in one batch.
    for _ in 0..3 {
        app.publish_raw(partition_of(product), &duplicated.to_json(), Some(&id))
            .await;
    }
    let other = app.buy(7, product, 1).await;
    app.start_worker(Arc::new(SystemClock));

    // Published without a pending status (not through the API), it answers 404 until it is
    // decided: wait for the request queued behind it first.
    assert_eq!(
        app.wait_final(other).await["order_number"],
        format!("{}-00002", today())
    );
    let view = app.wait_final(duplicated.transaction_id).await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["order_number"], format!("{}-00001", today()));
    assert_eq!(app.product_stock(product).await, 6, "10 - 3 (once) - 1");
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 2);
    assert_eq!(app.count("SELECT last_seq FROM order_counters").await, 2);
    // Delivered again later (say after a crash between commit and ack): replayed, not decided.
    app.publish_raw(partition_of(product), &duplicated.to_json(), Some(&id))
        .await;
    let last = app.buy(8, product, 1).await;
    assert_eq!(
        app.wait_final(last).await["order_number"],
        format!("{}-00003", today())
    );
    assert_eq!(app.transaction(duplicated.transaction_id).await, view);
    assert_eq!(app.product_stock(product).await, 5);
    app.shutdown().await;
}
