//! `GET /api/v1/transaction/{id}/events`: a watcher sees the transaction pending at once, then
//! its final status, and the stream ends by itself; bad and unknown ids get plain JSON errors.

use crate::helpers::{DEADLINE, Options, assert_error, spawn_app, today};
use allot_shared::SystemClock;
use reqwest::StatusCode;
use serde_json::Value;
use std::sync::Arc;

/// Reads `text/event-stream` events (`event:` name and `data:` JSON) until the server ends the
/// stream, within the test deadline.
async fn read_events(mut response: reqwest::Response) -> Vec<(String, Value)> {
    let read = async {
        let mut text = String::new();
        while let Some(chunk) = response.chunk().await.expect("the stream reads") {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        text
    };
    let text = tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the stream ends once the transaction is final");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {block:?}"))
                    .trim()
                    .to_owned()
            };
            (
                field("event:"),
                serde_json::from_str(&field("data:")).unwrap(),
            )
        })
        .collect()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_watcher_sees_pending_then_the_order_number_and_the_stream_ends(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("watched", 1).await;
    let id = app.buy(7, product, 1).await;
    let response = app.get(&format!("/api/v1/transaction/{id}/events")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // The worker starts only now: the watcher must see the pending state first.
    let events = tokio::spawn(read_events(response));
    app.start_worker(Arc::new(SystemClock));
    let events = events.await.unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "status");
    assert_eq!(events[0].1["status"], "pending");
    assert_eq!(events[0].1["transaction_id"], id.to_string());
    assert_eq!(events[1].0, "status");
    assert_eq!(events[1].1["status"], "succeeded");
    assert_eq!(events[1].1["order_number"], format!("{}-00001", today()));
    assert_eq!(
        events[1].1,
        app.transaction(id).await,
        "the same view as a GET"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn watching_a_decided_transaction_sends_it_once_and_ends(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let id = app.buy(7, 424242, 1).await;
    let decided = app.wait_final(id).await;
    let events = read_events(app.get(&format!("/api/v1/transaction/{id}/events")).await).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1, decided);
    assert_eq!(decided["reason"], "unknown_product");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn watching_a_bad_or_unknown_id_is_a_json_error(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    assert_error(
        app.get("/api/v1/transaction/not-a-uuid/events").await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    )
    .await;
    let unknown = uuid::Uuid::now_v7();
    assert_error(
        app.get(&format!("/api/v1/transaction/{unknown}/events"))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    app.shutdown().await;
}
