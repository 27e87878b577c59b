//! Batch envelopes: the worker decides the items of a message in order, exactly as if they had
//! come one by one; a bad item is set aside alone; a duplicated or redelivered message, or an
//! item carried by two messages, is decided once.

use crate::helpers::*;
use allot_shared::{SystemClock, TransactionId};
use reqwest::StatusCode;
use sqlx::PgPool;
use std::sync::Arc;

fn json_of(request: &allot_shared::PurchaseRequest) -> Vec<u8> {
    request.to_json()
}

/// Starts the worker and waits until every one of `ids` is decided (published straight to the
/// queue, they have no pending status: the API answers 404 until then).
async fn start_and_wait(app: &mut TestApp, ids: &[TransactionId]) -> Vec<serde_json::Value> {
    app.start_worker(Arc::new(SystemClock));
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    wait_for("every request to be decided", || async {
        let decided: i64 =
            sqlx::query_scalar("SELECT count(*) FROM transactions WHERE id = ANY($1)")
                .bind(&uuids)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        (decided == ids.len() as i64).then_some(())
    })
    .await;
    let mut views = Vec::new();
    for id in ids {
        views.push(app.wait_final(*id).await);
    }
    wait_for("the queues to drain", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    views
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_envelope_with_a_bad_item_decides_its_batch_mates_in_order(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("envelope", 5).await;
    let (first, last) = (request(1, product, 2), request(2, product, 2));
    let bad = br#"{"transaction_id":"not a uuid","quantity":0}"#;
    app.publish_envelope(
        partition_of(product),
        &[&json_of(&first), bad, &json_of(&last)],
        "envelope-1",
    )
    .await;

    let views = start_and_wait(&mut app, &[first.transaction_id, last.transaction_id]).await;
    assert_eq!(views[0]["order_number"], format!("{}-00001", today()));
    assert_eq!(views[1]["order_number"], format!("{}-00002", today()));
    assert_eq!(app.product_stock(product).await, 1);
    let (message_id, body): (Option<String>, Vec<u8>) =
        sqlx::query_as("SELECT message_id, body FROM dead_letters")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        message_id.as_deref(),
        Some("envelope-1#1"),
        "the item alone"
    );
    assert_eq!(body, bad.to_vec());
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 2);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_duplicated_envelope_is_decided_once(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("duplicated", 10).await;
    let requests: Vec<_> = (1..=3).map(|user| request(user, product, 1)).collect();
    let jsons: Vec<Vec<u8>> = requests.iter().map(json_of).collect();
    let items: Vec<&[u8]> = jsons
        .iter()
        .map(Vec::as_slice)
        .chain([b"17".as_slice()])
        .collect();
    for _ in 0..2 {
        app.publish_envelope(partition_of(product), &items, "twice")
            .await;
    }

    let ids: Vec<_> = requests.iter().map(|r| r.transaction_id).collect();
    let views = start_and_wait(&mut app, &ids).await;
    let numbers: Vec<_> = views.iter().map(|v| v["order_number"].clone()).collect();
    let expected: Vec<_> = (1..=3)
        .map(|n| serde_json::json!(format!("{}-{n:05}", today())))
        .collect();
    assert_eq!(numbers, expected, "each request sold once, in order");
    assert_eq!(app.product_stock(product).await, 7);
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2, 3]);
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 3);
    assert_eq!(
        app.count("SELECT count(*) FROM dead_letters").await,
        1,
        "the bad item's dead letter is recorded once"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_item_carried_by_two_envelopes_is_decided_once(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("shared item", 2).await;
    let (a, b, c) = (
        request(1, product, 1),
        request(2, product, 1),
        request(3, product, 1),
    );
    let partition = partition_of(product);
    app.publish_envelope(partition, &[&json_of(&a), &json_of(&b)], "first")
        .await;
    app.publish_envelope(partition, &[&json_of(&b), &json_of(&c)], "second")
        .await;

    let views = start_and_wait(
        &mut app,
        &[a.transaction_id, b.transaction_id, c.transaction_id],
    )
    .await;
    assert_eq!(views[0]["status"], "succeeded");
    assert_eq!(views[1]["status"], "succeeded");
    assert_eq!(
        views[2]["status"], "rejected",
        "b took the last unit once, not twice"
    );
    assert_eq!(views[2]["reason"], "out_of_stock");
    assert_eq!(app.product_stock(product).await, 0);
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2]);
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 3);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn concurrent_requests_share_messages_and_are_each_decided_once(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("burst", 150).await;
    let ids = futures::future::join_all((1..=200).map(|user| app.buy(user, product, 1))).await;
    let messages = app.queue_depth(partition_of(product)).await;
    assert!(
        (1..200).contains(&messages),
        "200 concurrent requests of one partition travel in fewer messages ({messages})"
    );
    let views = start_and_wait(&mut app, &ids).await;
    let sold = views.iter().filter(|v| v["status"] == "succeeded").count();
    assert_eq!(sold, 150);
    assert_eq!(app.product_stock(product).await, 0);
    assert_eq!(
        order_seqs(&app.pool, &today()).await,
        (1..=150).collect::<Vec<i64>>()
    );
    app.shutdown().await;
}

/// Refused publishes (`allot_api_publishes_total{result="refused"}`): messages, not requests.
async fn refused_messages(app: &TestApp) -> f64 {
    let metrics = app.get("/metrics").await.text().await.unwrap();
    sample(&metrics, r#"allot_api_publishes_total{result="refused"}"#)
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_message_refused_by_the_queue_bound_refuses_every_request_in_it(pool: PgPool) {
    let mut app = spawn_app(
        pool,
        Options {
            queue_max_length: 2,
            ..Options::without_worker()
        },
    )
    .await;
    let product = app.create_product("bounded", 100).await;
    let accepted = [app.buy(1, product, 1).await, app.buy(2, product, 1).await];
    assert_eq!(app.queue_depth(partition_of(product)).await, 2, "full");

    // Concurrent requests share messages; rounds until one refused message carried several
    // (requests refused > messages refused), each round checked in full.
    let mut refused_requests = 0.0;
    let mut rounds = 0;
    while refused_requests <= refused_messages(&app).await {
        rounds += 1;
        assert!(rounds <= 5, "no refused message carried several requests");
        let answers =
            futures::future::join_all((0..20).map(|user| app.add_to_cart(100 + user, product, 1)))
                .await;
        for response in answers {
            assert_eq!(response.headers()["retry-after"], "1");
            assert_error(response, StatusCode::SERVICE_UNAVAILABLE, "queue_full").await;
            refused_requests += 1.0;
        }
        assert_eq!(
            app.redis_key_count().await,
            accepted.len(),
            "refused requests leave no pending status"
        );
        assert_eq!(app.total_queue_depth().await, 2, "and nothing in the queue");
    }

    // Only the two accepted requests are ever decided.
    let views = start_and_wait(&mut app, &accepted).await;
    assert!(views.iter().all(|view| view["status"] == "succeeded"));
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 2);
    assert_eq!(app.product_stock(product).await, 98);
    app.shutdown().await;
}
