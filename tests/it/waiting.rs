//! `Prefer: wait=N` (RFC 7240): the answer is held until the transaction is final (200, with
//! `Preference-Applied`) or N seconds passed (the usual pending answer). Decisions are pushed
//! by the worker; a lost notification only delays the answer until the next read of the store.

use crate::helpers::*;
use allot_shared::status_store::transaction_key;
use allot_shared::{Outcome, RejectReason, SystemClock, TransactionView};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};

async fn add_to_cart_waiting(app: &TestApp, product: i64, prefer: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/order/addToCart"))
        .header("prefer", prefer)
        .json(&json!({"user_id": 1, "product_id": product, "quantity": 1}))
        .send()
        .await
        .unwrap()
}

fn applied(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("preference-applied")
        .map(|value| value.to_str().unwrap().to_owned())
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_with_prefer_wait_answers_with_the_decision(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("synchronous", 1).await;

    let response = add_to_cart_waiting(&app, product, "wait=5").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(applied(&response).as_deref(), Some("wait=5"));
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["order_number"], format!("{}-00001", today()));
    let id: allot_shared::TransactionId =
        allot_shared::TransactionId(view["transaction_id"].as_str().unwrap().parse().unwrap());
    assert_eq!(app.transaction(id).await, view, "the same answer as a poll");

    let response = add_to_cart_waiting(&app, product, "respond-async, wait=5").await;
    assert_eq!(response.status(), StatusCode::OK);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["reason"], "out_of_stock");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn prefer_wait_gives_the_pending_answer_when_the_wait_runs_out(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("undecided", 1).await;

    let started = Instant::now();
    let response = add_to_cart_waiting(&app, product, "wait=1").await;
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(
        waited >= Duration::from_secs(1),
        "held for the wait ({waited:?})"
    );
    assert!(waited < Duration::from_secs(5), "not longer ({waited:?})");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    let id = body["transaction_id"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let response = app
        .client
        .get(app.url(&format!("/api/v1/transaction/{id}")))
        .header("prefer", "wait=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(applied(&response).as_deref(), Some("wait=1"));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "pending");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_waiting_poll_is_answered_when_the_worker_decides(pool: PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("later", 1).await;
    let id = app.buy(1, product, 1).await;

    let poll = app
        .client
        .get(app.url(&format!("/api/v1/transaction/{id}")))
        .header("prefer", "wait=10")
        .send();
    let started = Instant::now();
    let (response, ()) = tokio::join!(poll, async {
        tokio::time::sleep(Duration::from_millis(300)).await; // the poll is waiting by now
        app.start_worker(std::sync::Arc::new(SystemClock));
    });
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered at the decision, not at the end of the wait ({:?})",
        started.elapsed()
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_lost_notification_delays_the_answer_and_never_changes_it(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("silent", 1).await;
    let id = app.buy(1, product, 1).await;
    let pending: TransactionView = serde_json::from_value(app.transaction(id).await).unwrap();

    let poll = app
        .client
        .get(app.url(&format!("/api/v1/transaction/{id}")))
        .header("prefer", "wait=5")
        .send();
    // The final status reaches the store without any announcement, as when the notification
    // was lost: the waiter finds it at its next read of the store.
    let mut decided = pending.clone();
    decided.set_outcome(Outcome::rejected(RejectReason::OutOfStock));
    decided.decided_at = Some(chrono::Utc::now());
    let write = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut redis = app.redis.clone();
        let _: () = redis::cmd("SET")
            .arg(transaction_key(&app.api_config.common.redis_prefix, id))
            .arg(serde_json::to_string(&decided).unwrap())
            .query_async(&mut redis)
            .await
            .unwrap();
    };
    let started = Instant::now();
    let (response, ()) = tokio::join!(poll, write);
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["reason"], "out_of_stock");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "found at a re-read of the store, before the wait ran out ({:?})",
        started.elapsed()
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn prefer_wait_is_capped_at_ten_seconds(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("never decided", 1).await;

    let started = Instant::now();
    let response = add_to_cart_waiting(&app, product, "wait=600").await;
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::ACCEPTED, "still pending");
    assert_eq!(applied(&response), None, "the wait ran out");
    assert!(
        waited >= Duration::from_secs(10),
        "held for the cap ({waited:?})"
    );
    assert!(
        waited < Duration::from_secs(14),
        "not for the 600 s asked ({waited:?})"
    );
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "pending");
    app.shutdown().await;
}
