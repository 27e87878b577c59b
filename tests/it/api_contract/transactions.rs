//! `GET /api/v1/transaction/{id}`: malformed and unknown ids, and the same decided body from
//! PostgreSQL when Redis lost the status.

use super::{assert_keys, assert_refused, timestamp};
use crate::helpers::{Options, assert_error, spawn_app};
use allot_shared::TransactionId;
use allot_shared::status_store::transaction_key;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn get_transaction_refuses_malformed_ids_with_400(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for id in ["not-a-uuid", "123", "0191b3c4-8f2e-7000-8000-00000000000g"] {
        let response = app.get(&format!("/api/v1/transaction/{id}")).await;
        let context = format!("GET transaction {id}");
        assert_refused(response, StatusCode::BAD_REQUEST, "invalid_id", &context).await;
    }
    assert_eq!(app.redis_key_count().await, 0);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn get_transaction_answers_404_for_an_unknown_id(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let unknown = TransactionId::new();
    let response = app.get(&format!("/api/v1/transaction/{unknown}")).await;
    assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.redis_key_count().await, 0, "a lookup writes nothing");

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn get_transaction_answers_from_postgres_when_redis_lost_the_status(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            worker: true,
            ..Options::default()
        },
    )
    .await;
    let product_id = app.create_product("Gadget", 5).await;

    let id = app.buy(7, product_id, 2).await;
    let decided = app.wait_final(id).await;
    assert_keys(
        &decided,
        &[
            "transaction_id",
            "status",
            "user_id",
            "product_id",
            "quantity",
            "order_number",
            "created_at",
            "decided_at",
        ],
    );
    assert_eq!(decided["status"], "succeeded");
    assert_eq!(decided["transaction_id"], json!(id.to_string()));
    assert_eq!(decided["user_id"], 7);
    assert_eq!(decided["product_id"], json!(product_id));
    assert_eq!(decided["quantity"], 2);
    let order_number = decided["order_number"].as_str().expect("an order number");
    assert!(
        order_number.len() >= 14 && order_number.as_bytes()[8] == b'-',
        "order number {order_number}"
    );
    assert!(timestamp(&decided, "created_at") <= timestamp(&decided, "decided_at"));
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 1);

    let key = transaction_key(&app.api_config.common.redis_prefix, id);
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the decided status was in Redis");
    assert_eq!(app.redis_key_count().await, 0);

    let response = app.get(&format!("/api/v1/transaction/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let from_postgres: Value = response.json().await.unwrap();
    assert_eq!(
        from_postgres, decided,
        "the same body, read from PostgreSQL"
    );

    app.shutdown().await;
}
