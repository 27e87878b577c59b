//! The HTTP contract of `allot-api`: exact status codes and exact bodies for every endpoint,
//! one error shape for every failure, and for every refused write: nothing half-written (no
//! row, no queued message, no pending status left in Redis). One file per endpoint or concern:
//! [`orders`] (`addToCart`, accepted and refused), [`transactions`] (following one),
//! [`products`] (the catalogue), [`routing`] (unknown paths, wrong methods), [`health`].
//! Where one shape repeats, the cases are a table and the shape is written once, below.

mod health;
mod orders;
mod products;
mod routing;
mod transactions;

use crate::helpers::{TestApp, assert_error};
use chrono::{DateTime, Utc};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;

const ADD_TO_CART: &str = "/api/v1/order/addToCart";
const PRODUCTS: &str = "/api/v1/products";
/// `products::MAX_STOCK`.
const MAX_STOCK: i64 = 1_000_000_000_000;
/// The API's default `ALLOT_MAX_QUANTITY`.
const MAX_QUANTITY: i64 = 10;

/// Sends `body` as is, with the given Content-Type (or none).
async fn send_raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Response {
    let mut request = app
        .client
        .request(method, app.url(path))
        .body(body.to_owned());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.expect("the request is answered")
}

/// POSTs a raw JSON body to `addToCart`.
async fn post_order_json(app: &TestApp, body: &str) -> Response {
    send_raw(
        app,
        Method::POST,
        ADD_TO_CART,
        Some("application/json"),
        body,
    )
    .await
}

/// Asserts an error answer: exactly `status` (`context` names the request if not), and the one
/// error shape with `code` (see [`assert_error`]). Returns the message.
async fn assert_refused(
    response: Response,
    status: StatusCode,
    code: &str,
    context: &str,
) -> String {
    assert_eq!(response.status(), status, "{context}");
    assert_error(response, status, code).await
}

/// Nothing of an order was written anywhere: no decided row, no queued message, no status key.
async fn assert_no_order_written(app: &TestApp, context: &str) {
    assert_eq!(
        app.count("SELECT count(*) FROM transactions").await,
        0,
        "transactions after {context}"
    );
    assert_eq!(
        app.total_queue_depth().await,
        0,
        "queued messages after {context}"
    );
    assert_eq!(app.redis_key_count().await, 0, "Redis keys after {context}");
}

/// POSTs `body` to `addToCart`, asserts the exact error, and that nothing was written.
async fn assert_order_refused(app: &TestApp, body: &str, status: StatusCode, code: &str) -> String {
    let response = post_order_json(app, body).await;
    let message = assert_refused(
        response,
        status,
        code,
        &format!("addToCart with body {body}"),
    )
    .await;
    assert_no_order_written(app, &format!("refused body {body}")).await;
    message
}

/// A product as the API shows it.
async fn product_json(app: &TestApp, id: i64) -> Value {
    let response = app.get(&format!("{PRODUCTS}/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK, "GET product {id}");
    response.json().await.unwrap()
}

async fn product_count(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM products").await
}

/// POSTs `body` to `path` with the admin token, asserts the exact error, and that no product
/// was created.
async fn assert_admin_refused(
    app: &TestApp,
    path: &str,
    body: &Value,
    status: StatusCode,
    code: &str,
    products_before: i64,
) -> String {
    let response = app.post_admin(path, body).await;
    let message = assert_refused(
        response,
        status,
        code,
        &format!("POST {path} with body {body}"),
    )
    .await;
    assert_eq!(
        product_count(app).await,
        products_before,
        "products after refused body {body}"
    );
    message
}

fn assert_keys(value: &Value, keys: &[&str]) {
    let actual: BTreeSet<&str> = value
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(actual, expected, "keys of {value}");
}

fn timestamp(value: &Value, field: &str) -> DateTime<Utc> {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is a string in {value}"))
        .parse()
        .expect("an RFC 3339 timestamp")
}
