//! The catalogue: creating (staff), reading, listing and restocking (staff) products; the
//! bearer token; every refusal leaves the catalogue as it was.

use super::{
    MAX_STOCK, PRODUCTS, assert_admin_refused, assert_keys, assert_refused, product_count,
    product_json, send_raw,
};
use crate::helpers::TestApp;
use crate::helpers::{ADMIN_TOKEN, Options, assert_error, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every `Authorization` a staff endpoint must refuse: none, a wrong token, the right token
/// under another scheme, an empty bearer token, the bare token without a scheme.
fn not_the_token() -> Vec<Option<String>> {
    vec![
        None,
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some(format!("Basic {ADMIN_TOKEN}")),
        Some("Bearer ".to_owned()),
        Some(ADMIN_TOKEN.to_owned()),
    ]
}

/// POSTs `body` to the staff endpoint `path` with `authorization` and asserts `401
/// unauthorized` with the challenge `WWW-Authenticate: Bearer`, in the one error shape.
async fn assert_unauthorized(app: &TestApp, path: &str, body: &Value, authorization: Option<&str>) {
    let mut request = app.client.post(app.url(path)).json(body);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "POST {path} with Authorization {authorization:?}"
    );
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        challenge.as_deref(),
        Some("Bearer"),
        "POST {path} with Authorization {authorization:?}"
    );
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn create_product_requires_the_bearer_token(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let body = json!({"name": "Widget", "stock": 5});

    for authorization in not_the_token() {
        let authorization = authorization.as_deref();
        assert_unauthorized(&app, PRODUCTS, &body, authorization).await;
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
        let context = format!("GET product {raw}");
        assert_refused(response, StatusCode::BAD_REQUEST, "invalid_id", &context).await;
    }

    app.shutdown().await;
}

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
        let context = format!("GET products?{query}");
        assert_refused(response, StatusCode::BAD_REQUEST, "invalid_query", &context).await;
    }
    // The bounds themselves are fine.
    for query in ["limit=1", "limit=1000"] {
        let response = app.get(&format!("{PRODUCTS}?{query}")).await;
        assert_eq!(response.status(), StatusCode::OK, "GET products?{query}");
    }

    app.shutdown().await;
}

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

    // The same table as creating a product: no token and a wrong one among them.
    for authorization in not_the_token() {
        let authorization = authorization.as_deref();
        assert_unauthorized(&app, &path, &json!({"quantity": 3}), authorization).await;
        assert_eq!(
            app.product_stock(id).await,
            5,
            "stock after Authorization {authorization:?}"
        );
    }
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
        let context = format!("restock product {raw}");
        assert_refused(response, StatusCode::BAD_REQUEST, "invalid_id", &context).await;
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
