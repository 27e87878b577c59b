//! The HTTP contract of `allot-api`: exact status codes and exact bodies for every endpoint,
//! one error shape for every failure, and for every refused write: nothing half-written (no
//! row, no queued message, no pending status left in Redis).

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, spawn_app};
use allot_shared::partition::partition_for;
use allot_shared::status_store::transaction_key;
use allot_shared::{ProductId, TransactionId};
use chrono::{DateTime, Utc};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
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
    assert_eq!(response.status(), status, "addToCart with body {body}");
    let message = assert_error(response, status, code).await;
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
    assert_eq!(response.status(), status, "POST {path} with body {body}");
    let message = assert_error(response, status, code).await;
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

// ---------------------------------------------------------------------------------------------
// addToCart: accepted
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_accepts_a_valid_order_and_shows_it_pending(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product_id = app.create_product("Widget", 5).await;

    let before = Utc::now();
    let id = app.buy(42, product_id, 3).await;
    let after = Utc::now();

    let response = app.get(&format!("/api/v1/transaction/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let view: Value = response.json().await.unwrap();
    assert_keys(
        &view,
        &[
            "transaction_id",
            "status",
            "user_id",
            "product_id",
            "quantity",
            "created_at",
        ],
    );
    let created_at = timestamp(&view, "created_at");
    assert!(
        before <= created_at && created_at <= after,
        "created_at {created_at} is between {before} and {after}"
    );
    assert_eq!(
        view,
        json!({
            "transaction_id": id.to_string(),
            "status": "pending",
            "user_id": 42,
            "product_id": product_id,
            "quantity": 3,
            "created_at": view["created_at"],
        })
    );

    // Exactly one message, in the product's partition queue; exactly one status key, its own.
    let partition = partition_for(ProductId::try_from(product_id).unwrap(), 4);
    assert_eq!(app.queue_depth(partition).await, 1);
    assert_eq!(app.total_queue_depth().await, 1);
    assert_eq!(app.redis_key_count().await, 1);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(transaction_key(&app.api_config.common.redis_prefix, id))
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert_eq!(
        exists, 1,
        "the pending status is stored under the transaction's key"
    );
    // Nothing is decided without a worker, and the stock is untouched.
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 0);
    assert_eq!(app.product_stock(product_id).await, 5);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_accepts_the_maximum_quantity(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    assert_eq!(
        app.api_config.max_quantity, MAX_QUANTITY,
        "the tests assume the default maximum"
    );

    let id = app.buy(1, 1, MAX_QUANTITY).await;
    assert_eq!(app.transaction(id).await["quantity"], json!(MAX_QUANTITY));
    assert_eq!(app.total_queue_depth().await, 1);
    assert_eq!(app.redis_key_count().await, 1);

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// addToCart: refused, nothing written
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_malformed_json_with_400(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for body in [
        "",
        "{",
        r#"{"user_id": 1, "product_id": 1, "quantity": 1"#,
        r#"{"user_id": 1, "product_id": 1, "quantity": 1,}"#,
        "not json",
        r#"{user_id: 1}"#,
    ] {
        assert_order_refused(&app, body, StatusCode::BAD_REQUEST, "malformed_json").await;
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_wrong_types_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for field in ["user_id", "product_id", "quantity"] {
        for wrong in [
            json!("7"),
            json!(1.5),
            Value::Null,
            json!([1]),
            json!(true),
            json!({"value": 1}),
        ] {
            let mut body = json!({"user_id": 1, "product_id": 1, "quantity": 1});
            body[field] = wrong;
            assert_order_refused(
                &app,
                &body.to_string(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            )
            .await;
        }
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_missing_and_unknown_fields_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for missing in ["user_id", "product_id", "quantity"] {
        let mut body = json!({"user_id": 1, "product_id": 1, "quantity": 1});
        body.as_object_mut().unwrap().remove(missing);
        let message = assert_order_refused(
            &app,
            &body.to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
        assert!(
            message.contains(missing),
            "the message {message:?} names the missing field {missing}"
        );
    }
    assert_order_refused(&app, "{}", StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    let message = assert_order_refused(
        &app,
        r#"{"user_id": 1, "product_id": 1, "quantity": 1, "coupon": "FREE"}"#,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;
    assert!(
        message.contains("coupon"),
        "the message {message:?} names the unknown field"
    );

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_zero_negative_and_huge_numbers_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for field in ["user_id", "product_id", "quantity"] {
        for bad in [
            "0",
            "-1",
            "-9223372036854775808",
            "9223372036854775808",
            "18446744073709551616",
            "1e30",
        ] {
            let mut fields = vec![("user_id", "1"), ("product_id", "1"), ("quantity", "1")];
            for (name, value) in &mut fields {
                if *name == field {
                    *value = bad;
                }
            }
            let body = format!(
                "{{{}}}",
                fields
                    .iter()
                    .map(|(name, value)| format!("\"{name}\": {value}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            assert_order_refused(
                &app,
                &body,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            )
            .await;
        }
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_a_quantity_above_the_maximum_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    assert_eq!(
        app.api_config.max_quantity, MAX_QUANTITY,
        "the tests assume the default maximum"
    );

    for quantity in [MAX_QUANTITY + 1, 1_000, i64::MAX] {
        let body = json!({"user_id": 1, "product_id": 1, "quantity": quantity}).to_string();
        let message = assert_order_refused(
            &app,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
        assert!(
            message.contains("at most 10"),
            "the message {message:?} states the maximum"
        );
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_a_body_that_is_not_an_object_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for body in [
        r#"[{"user_id": 1, "product_id": 1, "quantity": 1}]"#,
        "[]",
        r#""user_id=1&product_id=1&quantity=1""#,
        "42",
        "null",
    ] {
        assert_order_refused(&app, body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_a_body_not_declared_as_json_with_415(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let valid = r#"{"user_id": 1, "product_id": 1, "quantity": 1}"#;

    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let response = send_raw(&app, Method::POST, ADD_TO_CART, content_type, valid).await;
        assert_eq!(
            response.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type {content_type:?}"
        );
        assert_error(
            response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        assert_no_order_written(&app, &format!("Content-Type {content_type:?}")).await;
    }
    // No Content-Type and no body either.
    let response = send_raw(&app, Method::POST, ADD_TO_CART, None, "").await;
    assert_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    assert_no_order_written(&app, "an empty body without Content-Type").await;

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn add_to_cart_refuses_an_oversized_body_with_413_and_keeps_serving(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let body = json!({"user_id": 1, "product_id": 1, "quantity": 1, "name": "x".repeat(20 * 1024)})
        .to_string();
    assert!(body.len() > 16 * 1024);
    assert_order_refused(
        &app,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;

    // The server still takes a valid order afterwards.
    let id = app.buy(1, 1, 1).await;
    assert_eq!(app.transaction(id).await["status"], "pending");
    assert_eq!(app.total_queue_depth().await, 1);
    assert_eq!(app.redis_key_count().await, 1);

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GET /api/v1/transaction/{id}
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn get_transaction_refuses_malformed_ids_with_400(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for id in ["not-a-uuid", "123", "0191b3c4-8f2e-7000-8000-00000000000g"] {
        let response = app.get(&format!("/api/v1/transaction/{id}")).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "GET transaction {id}"
        );
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_id").await;
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

// ---------------------------------------------------------------------------------------------
// Products: authentication
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn create_product_requires_the_bearer_token(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let body = json!({"name": "Widget", "stock": 5});

    let wrong_token = format!("{ADMIN_TOKEN}x");
    let basic = format!("Basic {ADMIN_TOKEN}");
    let bearer_wrong = format!("Bearer {wrong_token}");
    let bearer_empty = "Bearer ".to_owned();
    for authorization in [
        None,
        Some(bearer_wrong.as_str()),
        Some(basic.as_str()),
        Some(bearer_empty.as_str()),
        Some(ADMIN_TOKEN),
    ] {
        let mut request = app.client.post(app.url(PRODUCTS)).json(&body);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "Authorization {authorization:?}"
        );
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            challenge.as_deref(),
            Some("Bearer"),
            "Authorization {authorization:?}"
        );
        assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert_eq!(
            product_count(&app).await,
            0,
            "no product created with Authorization {authorization:?}"
        );
    }

    // The token is checked before the body is read: a bad body without a token is still 401.
    let response = send_raw(&app, Method::POST, PRODUCTS, Some("application/json"), "{").await;
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(product_count(&app).await, 0);

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Products: create and read
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn create_product_answers_201_with_the_product(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let response = app
        .post_admin(PRODUCTS, &json!({"name": "Widget", "stock": 5}))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_i64().expect("an integer id");
    assert!(id > 0);
    assert_eq!(created, json!({"id": id, "name": "Widget", "stock": 5}));
    assert_eq!(product_json(&app, id).await, created);

    // Boundaries: a 200-character name (characters, not bytes), zero stock, the maximum stock;
    // surrounding whitespace is trimmed.
    let long_name = "é".repeat(200);
    for (name, stored_name, stock) in [
        (long_name.as_str(), long_name.as_str(), 0),
        ("  Spaced  ", "Spaced", MAX_STOCK),
    ] {
        let response = app
            .post_admin(PRODUCTS, &json!({"name": name, "stock": stock}))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "name {name:?}, stock {stock}"
        );
        let created: Value = response.json().await.unwrap();
        let id = created["id"].as_i64().expect("an integer id");
        assert_eq!(
            created,
            json!({"id": id, "name": stored_name, "stock": stock})
        );
        assert_eq!(product_json(&app, id).await, created);
    }
    assert_eq!(product_count(&app).await, 3);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn create_product_refuses_invalid_bodies_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let bodies = [
        json!({"name": "", "stock": 5}),
        json!({"name": "   ", "stock": 5}),
        json!({"name": "\t\n", "stock": 5}),
        json!({"name": "x".repeat(201), "stock": 5}),
        json!({"name": "é".repeat(201), "stock": 5}),
        // The limits hold for the name as sent, as the document states them: padding does
        // not get a name past the length, nor a tab past the control characters.
        json!({"name": format!(" {}", "x".repeat(200)), "stock": 5}),
        json!({"name": "\tWidget", "stock": 5}),
        json!({"name": "Widget\n", "stock": 5}),
        // PostgreSQL text cannot store NUL (the insert failed: a 500); no control
        // character belongs in a name.
        json!({"name": "Wid\u{0}get", "stock": 5}),
        json!({"name": "Wid\u{7}get", "stock": 5}),
        json!({"name": "Widget", "stock": -1}),
        json!({"name": "Widget", "stock": MAX_STOCK + 1}),
        json!({"name": "Widget", "stock": i64::MAX}),
        json!({"name": "Widget", "stock": 1.5}),
        json!({"name": "Widget", "stock": "5"}),
        json!({"name": 5, "stock": 5}),
        json!({"name": null, "stock": 5}),
        json!({"name": "Widget", "stock": 5, "price": 10}),
        json!({"name": "Widget"}),
        json!({"stock": 5}),
        json!({}),
        json!([]),
    ];
    for body in &bodies {
        assert_admin_refused(
            &app,
            PRODUCTS,
            body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            0,
        )
        .await;
    }
    let response = app
        .client
        .post(app.url(PRODUCTS))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::BAD_REQUEST, "malformed_json").await;
    assert_eq!(product_count(&app).await, 0);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn get_product_answers_200_404_or_400(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;

    let response = app.get(&format!("{PRODUCTS}/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"id": id, "name": "Widget", "stock": 5}));

    let response = app.get(&format!("{PRODUCTS}/{}", id + 1000)).await;
    assert_error(response, StatusCode::NOT_FOUND, "not_found").await;

    for raw in ["abc", "0", "-1", "1.5", "9223372036854775808"] {
        let response = app.get(&format!("{PRODUCTS}/{raw}")).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "GET product {raw}"
        );
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_id").await;
    }

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Products: list
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn list_products_is_empty_without_products(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    let response = app.get(PRODUCTS).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"products": [], "next_after": null}));

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn list_products_pages_through_every_product_once_in_id_order(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let mut expected = Vec::new();
    for n in 1..=5 {
        let name = format!("Product {n}");
        let id = app.create_product(&name, n * 10).await;
        expected.push(json!({"id": id, "name": name, "stock": n * 10}));
    }

    // The first page: two products, and where to continue.
    let response = app.get(&format!("{PRODUCTS}?limit=2")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let first: Value = response.json().await.unwrap();
    assert_eq!(
        first,
        json!({"products": expected[..2], "next_after": expected[1]["id"]})
    );

    // Follow the pages to the end.
    let mut collected: Vec<Value> = first["products"].as_array().unwrap().clone();
    let mut after = first["next_after"].clone();
    let mut pages = 1;
    while !after.is_null() {
        pages += 1;
        assert!(pages <= 5, "pagination ends");
        let response = app.get(&format!("{PRODUCTS}?limit=2&after={after}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.unwrap();
        let products = page["products"].as_array().expect("a products array");
        assert!(products.len() <= 2);
        assert_keys(&page, &["products", "next_after"]);
        collected.extend(products.iter().cloned());
        after = page["next_after"].clone();
    }
    assert_eq!(
        collected, expected,
        "every product exactly once, in id order"
    );
    assert_eq!(pages, 3);

    // Without a limit, everything on one page.
    let response = app.get(PRODUCTS).await;
    assert_eq!(response.status(), StatusCode::OK);
    let all: Value = response.json().await.unwrap();
    assert_eq!(all, json!({"products": expected, "next_after": null}));

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn list_products_refuses_bad_query_parameters_with_400(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    app.create_product("Widget", 5).await;

    for query in [
        "limit=0",
        "limit=-1",
        "limit=1001",
        "limit=abc",
        "limit=1.5",
        "after=abc",
        "foo=1",
        "limit=2&foo=1",
    ] {
        let response = app.get(&format!("{PRODUCTS}?{query}")).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "GET products?{query}"
        );
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    // The bounds themselves are fine.
    for query in ["limit=1", "limit=1000"] {
        let response = app.get(&format!("{PRODUCTS}?{query}")).await;
        assert_eq!(response.status(), StatusCode::OK, "GET products?{query}");
    }

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Products: restock
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn restock_adds_to_the_stock(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;

    let response = app
        .post_admin(&format!("{PRODUCTS}/{id}/restock"), &json!({"quantity": 3}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"id": id, "name": "Widget", "stock": 8}));
    assert_eq!(app.product_stock(id).await, 8);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn restock_requires_the_bearer_token(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;
    let path = format!("{PRODUCTS}/{id}/restock");

    let response = app.post_json(&path, &json!({"quantity": 3})).await;
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(app.product_stock(id).await, 5);

    let response = app
        .client
        .post(app.url(&path))
        .bearer_auth("wrong-token")
        .json(&json!({"quantity": 3}))
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(app.product_stock(id).await, 5);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn restock_of_an_unknown_or_malformed_product_is_refused(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;

    let response = app
        .post_admin(
            &format!("{PRODUCTS}/{}/restock", id + 1000),
            &json!({"quantity": 3}),
        )
        .await;
    assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    for raw in ["abc", "0", "-1"] {
        let response = app
            .post_admin(
                &format!("{PRODUCTS}/{raw}/restock"),
                &json!({"quantity": 3}),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "restock product {raw}"
        );
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_id").await;
    }
    assert_eq!(app.product_stock(id).await, 5);
    assert_eq!(product_count(&app).await, 1);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn restock_refuses_invalid_quantities_with_422(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;
    let path = format!("{PRODUCTS}/{id}/restock");

    for body in [
        json!({"quantity": 0}),
        json!({"quantity": -1}),
        json!({"quantity": MAX_STOCK + 1}),
        json!({"quantity": 1.5}),
        json!({"quantity": "3"}),
        json!({"quantity": null}),
        json!({}),
        json!({"quantity": 3, "note": "x"}),
    ] {
        assert_admin_refused(
            &app,
            &path,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            1,
        )
        .await;
        assert_eq!(
            app.product_stock(id).await,
            5,
            "stock after refused body {body}"
        );
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn restock_refuses_to_exceed_the_maximum_stock(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", MAX_STOCK - 5).await;
    let path = format!("{PRODUCTS}/{id}/restock");

    for quantity in [6, MAX_STOCK] {
        assert_admin_refused(
            &app,
            &path,
            &json!({"quantity": quantity}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            1,
        )
        .await;
        assert_eq!(
            app.product_stock(id).await,
            MAX_STOCK - 5,
            "stock after restocking {quantity}"
        );
    }

    // Up to the maximum exactly is fine.
    let response = app.post_admin(&path, &json!({"quantity": 5})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"id": id, "name": "Widget", "stock": MAX_STOCK})
    );
    assert_admin_refused(
        &app,
        &path,
        &json!({"quantity": 1}),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        1,
    )
    .await;
    assert_eq!(app.product_stock(id).await, MAX_STOCK);

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

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
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "GET {path}");
        assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
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
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_error(
            response,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
    }
    assert_eq!(product_count(&app).await, 1);
    assert_eq!(app.product_stock(id).await, 5);
    assert_no_order_written(&app, "requests with wrong methods").await;

    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Queue full
// ---------------------------------------------------------------------------------------------

/// With a partition queue at its length limit, further orders for its products are refused with
/// 503 and `Retry-After`, nothing of them stays behind, and the queue holds only accepted ones.
///
/// A quorum queue's own length check is loose (RabbitMQ 3.10 with `x-max-length` 2 accepts the
/// third order every time), so the API keeps its own bound (`api/src/backlog.rs`), exact for a
/// single instance below 5 and a fifth below the limit above it: the third order is refused.
#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_full_partition_queue_refuses_orders_with_503_and_leaves_nothing_behind(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(
        pool,
        Options {
            queue_max_length: 2,
            ..Options::without_worker()
        },
    )
    .await;
    let product_id = app.create_product("Hot item", 100).await;
    let partition = partition_for(ProductId::try_from(product_id).unwrap(), 4);

    app.buy(1, product_id, 1).await;
    app.buy(2, product_id, 1).await;
    assert_eq!(app.queue_depth(partition).await, 2);

    const EXTRA: i64 = 6;
    let accepted = 2u32;
    let mut refused = 0;
    for user in 0..EXTRA {
        let response = app.add_to_cart(100 + user, product_id, 1).await;
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "extra order {user} ({accepted} accepted so far)"
        );
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            retry_after.as_deref(),
            Some("1"),
            "Retry-After of a refusal because the queue is full"
        );
        assert_error(response, StatusCode::SERVICE_UNAVAILABLE, "queue_full").await;
        refused += 1;
    }
    assert_eq!(refused, EXTRA, "every order past the limit is refused");

    assert_eq!(
        app.queue_depth(partition).await,
        accepted,
        "the queue holds exactly the accepted orders"
    );
    assert_eq!(app.total_queue_depth().await, accepted);
    assert_eq!(
        app.redis_key_count().await,
        accepted as usize,
        "refused orders leave no pending status"
    );
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 0);

    // Other partitions are not affected.
    let other = app.create_product("Other item", 100).await;
    assert_ne!(
        partition_for(ProductId::try_from(other).unwrap(), 4),
        partition,
        "consecutive products are on different partitions"
    );
    app.buy(3, other, 1).await;
    assert_eq!(app.total_queue_depth().await, accepted + 1);

    app.shutdown().await;
}
