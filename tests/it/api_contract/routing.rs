//! Routing: unknown paths are `404 not_found` and wrong methods `405 method_not_allowed`, in
//! the one error shape, and neither writes anything.

use super::{
    ADD_TO_CART, PRODUCTS, assert_no_order_written, assert_refused, product_count, send_raw,
};
use crate::helpers::{Options, assert_error, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn unknown_paths_answer_404_in_the_error_shape(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    // (`/` is the web page: tests/it/docs.rs.)
    for path in [
        "/index.html",
        "/nope",
        "/api/v1/nope",
        "/api/v2/order/addToCart",
        "/api/v1/transaction",
    ] {
        let response = app.get(path).await;
        let context = format!("GET {path}");
        assert_refused(response, StatusCode::NOT_FOUND, "not_found", &context).await;
    }
    let response = app
        .post_json(
            "/api/v1/order/nope",
            &json!({"user_id": 1, "product_id": 1, "quantity": 1}),
        )
        .await;
    assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    assert_no_order_written(&app, "a POST to an unknown path").await;

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn wrong_methods_answer_405_in_the_error_shape(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;

    let product = format!("{PRODUCTS}/{id}");
    let restock = format!("{PRODUCTS}/{id}/restock");
    for (method, path) in [
        (Method::DELETE, PRODUCTS),
        (Method::PUT, PRODUCTS),
        (Method::GET, ADD_TO_CART),
        (Method::PUT, ADD_TO_CART),
        (Method::DELETE, product.as_str()),
        (
            Method::POST,
            "/api/v1/transaction/0191b3c4-8f2e-7000-8000-000000000000",
        ),
        (Method::GET, restock.as_str()),
        (Method::POST, "/healthz"),
    ] {
        let response = send_raw(&app, method.clone(), path, Some("application/json"), "{}").await;
        let context = format!("{method} {path}");
        let status = StatusCode::METHOD_NOT_ALLOWED;
        assert_refused(response, status, "method_not_allowed", &context).await;
    }
    assert_eq!(product_count(&app).await, 1);
    assert_eq!(app.product_stock(id).await, 5);
    assert_no_order_written(&app, "requests with wrong methods").await;

    app.shutdown().await;
}
