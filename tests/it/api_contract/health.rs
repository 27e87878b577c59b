//! Health: `/healthz` while the process runs, `/readyz` with the state of each dependency.

use crate::helpers::{Options, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn healthz_answers_ok(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let response = app.get("/healthz").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"status": "ok"}));

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn readyz_answers_ready_with_every_check_ok(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let response = app.get("/readyz").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}})
    );

    app.shutdown().await;
}
