//! The OpenAPI document, the docs page and the web page: the served document lists exactly the
//! router's routes and methods, documents every error in our one shape, and the pages are
//! served from the binary.

use crate::helpers::{Options, TestApp, assert_error, resolve_schema, sample, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;

/// Every operation of the JSON API, as the router registers it.
const OPERATIONS: &[(&str, &str)] = &[
    ("GET", "/api/v1/orders/history"),
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products/{id}"),
    ("GET", "/api/v1/slots"),
    ("GET", "/api/v1/slots/{id}"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/transaction/{id}"),
    ("GET", "/api/v1/transaction/{id}/events"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/readyz"),
    ("PATCH", "/api/v1/products/{id}"),
    ("PATCH", "/api/v1/slots/{id}"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/logout"),
    ("POST", "/api/v1/order/addToCart"),
    ("POST", "/api/v1/orders"),
    ("POST", "/api/v1/products"),
    ("POST", "/api/v1/products/{id}/restock"),
    ("POST", "/api/v1/slots"),
    ("POST", "/api/v1/transaction/{id}/cancel"),
    ("POST", "/api/v1/transaction/{id}/checkout"),
    ("POST", "/api/v1/users"),
];
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

async fn document(app: &TestApp) -> Value {
    let response = app.get("/api-docs/openapi.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("the document is JSON")
}

/// A concrete path for a templated one: a valid product id, a fresh (unknown) transaction id.
fn concrete(path: &str) -> String {
    path.replace("{id}/restock", "1/restock")
        .replace("products/{id}", "products/1")
        .replace("slots/{id}", "slots/1")
        .replace("{id}", &uuid::Uuid::now_v7().to_string())
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_document_lists_exactly_the_routes_and_methods_the_server_has(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "OpenAPI 3.1"
    );
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // Each documented operation is routed (never the fallback's 404 or 405), and every other
    // method on a documented path is 405: the server has exactly the documented methods.
    let paths: BTreeSet<&str> = OPERATIONS.iter().map(|(_, path)| *path).collect();
    for path in paths {
        for method in METHODS {
            let response = app
                .client
                .request(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    app.url(&concrete(path)),
                )
                .send()
                .await
                .unwrap();
            let status = response.status();
            if OPERATIONS.contains(&(method, path)) {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                if status == StatusCode::NOT_FOUND {
                    assert_error(response, status, "not_found").await;
                    // Routed, not the fallback's 404 (no message is read to tell): the router
                    // counts it under its route template, the fallback under `unmatched`.
                    let metrics = app.get("/metrics").await.text().await.unwrap();
                    let series = format!(
                        r#"allot_api_requests_total{{method="{method}",route="{path}",status="404"}}"#
                    );
                    let counted = sample(&metrics, &series);
                    assert!(
                        counted >= 1.0,
                        "{method} {path} is routed: {series} {counted}"
                    );
                }
            } else {
                assert_error(
                    response,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                )
                .await;
            }
        }
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn every_documented_error_has_the_one_error_shape(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let doc = document(&app).await;
    let error_ref = "#/components/schemas/ErrorBody";
    let mut errors = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('4') || (status.starts_with('5') && path.starts_with("/api"))
                {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, error_ref, "{method} {path} {status}");
                    errors += 1;
                }
            }
        }
    }
    assert!(errors >= 20, "the error statuses are documented ({errors})");
    let detail = &doc["components"]["schemas"]["ErrorDetail"]["required"];
    assert_eq!(detail, &serde_json::json!(["code", "message"]));
    // The staff endpoints say they need the bearer token, and the scheme is declared.
    assert_eq!(
        doc["paths"]["/api/v1/products"]["post"]["security"],
        serde_json::json!([{"admin_token": []}])
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_docs_page_and_its_assets_are_served_from_the_binary(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let page = app.get("/docs/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "Swagger UI's page");
    for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"] {
        let response = app.get(asset).await;
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        assert!(response.bytes().await.unwrap().len() > 10_000, "{asset}");
    }
    let config = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(config.status(), StatusCode::OK);
    let config = config.text().await.unwrap();
    assert!(config.contains("/api-docs/openapi.json"), "{config}");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_web_page_is_served_at_the_root(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let response = app.get("/").await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "text/html; charset=utf-8");
    let html = response.text().await.unwrap();
    for needle in [
        "/api/v1/products?limit=1000&after=",
        "/api/v1/order/addToCart",
        "/api/v1/orders",
        "/api/v1/stats",
        "/events",
        "id=\"user-id\"",
        "/api/v1/users",
        "/api/v1/auth/login",
        "/api/v1/auth/logout",
        "/api/v1/orders/history",
        "Idempotency-Key",
        "id=\"basket\"",
        "sale_starts_at",
    ] {
        assert!(html.contains(needle), "the page uses {needle}");
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_document_states_the_limits_the_server_enforces_configured_ones_included(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(
        pool,
        Options {
            max_quantity: 3,
            ..Options::without_worker()
        },
    )
    .await;
    let doc = document(&app).await;
    let add_to_cart = resolve_schema(
        &doc,
        &doc["paths"]["/api/v1/order/addToCart"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"],
    );
    let quantity = &add_to_cart["properties"]["quantity"];
    assert_eq!(quantity["minimum"], 1, "{quantity}");
    assert_eq!(quantity["maximum"], 3, "the configured maximum: {quantity}");

    let hold = &add_to_cart["properties"]["hold_seconds"];
    assert_eq!(hold["minimum"], 1, "{hold}");
    assert_eq!(hold["maximum"], 3600, "ALLOT_MAX_HOLD_SECONDS: {hold}");

    // Every field of addToCart at its documented minimum, then at its maximum, is accepted;
    // one past either, in any field, is refused. (`slot_id` names a slot, which must exist: it
    // is left out, as an optional field may be.)
    let fields: Vec<(&str, i128, i128)> = add_to_cart["properties"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.as_str() != "slot_id")
        .map(|(name, schema)| {
            let schema = resolve_schema(&doc, schema);
            let bound = |key: &str| {
                schema[key]
                    .as_i64()
                    .map(i128::from)
                    .unwrap_or_else(|| panic!("{name} has an integer {key}: {schema}"))
            };
            (name.as_str(), bound("minimum"), bound("maximum"))
        })
        .collect();
    let body = |pick: &dyn Fn(&str, i128, i128) -> i128| {
        let fields: Vec<String> = fields
            .iter()
            .map(|&(name, min, max)| format!("\"{name}\": {}", pick(name, min, max)))
            .collect();
        format!("{{{}}}", fields.join(", "))
    };
    for valid in [body(&|_, min, _| min), body(&|_, _, max| max)] {
        let response = app
            .send(
                Method::POST,
                "/api/v1/order/addToCart",
                &[("content-type", "application/json")],
                valid.clone(),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{valid}");
    }
    for &(field, _, _) in &fields {
        for past in [
            body(&|name, min, _| if name == field { min - 1 } else { min }),
            body(&|name, min, max| if name == field { max + 1 } else { min }),
        ] {
            let response = app
                .send(
                    Method::POST,
                    "/api/v1/order/addToCart",
                    &[("content-type", "application/json")],
                    past.clone(),
                )
                .await;
            assert_eq!(
                response.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{past}"
            );
            assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        }
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn every_operation_is_described_for_api_users(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let doc = document(&app).await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let summary = operation["summary"].as_str().unwrap_or_default();
            assert!(!summary.is_empty(), "{method} {path} has a summary");
            let description = operation["description"].as_str().unwrap_or_default();
            // What rustdoc means, not what an API user reads.
            for internal in ["[`", "crate::", "newtype", "Self"] {
                assert!(
                    !summary.contains(internal) && !description.contains(internal),
                    "{method} {path} mentions {internal:?}: {summary} {description}"
                );
            }
        }
    }
    // The event stream is documented as a stream, not as one JSON document.
    let events = &doc["paths"]["/api/v1/transaction/{id}/events"]["get"]["responses"]["200"];
    let content = events["content"].as_object().unwrap();
    assert_eq!(
        content.keys().collect::<Vec<_>>(),
        ["text/event-stream"],
        "{events}"
    );
    assert_eq!(content["text/event-stream"]["schema"]["type"], "string");
    let description = events["description"].as_str().unwrap();
    assert!(
        description.contains("event: status") && description.contains("data:"),
        "{description}"
    );
    app.shutdown().await;
}

/// Every reason of a 503 has its code in the document: the error body's `code` lists them all,
/// and each operation's 503 names the codes it answers with.
#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn every_503_reason_has_a_documented_code(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let doc = document(&app).await;
    let code = doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["description"]
        .as_str()
        .expect("the error code is described");
    let all: Vec<&str> = allot_tests::client::Unavailable::ALL
        .iter()
        .map(|reason| reason.code())
        .collect();
    for reason in &all {
        assert!(
            code.contains(&format!("`{reason}`")),
            "{reason} in {code:?}"
        );
    }
    let described = |path: &str, method: &str| {
        doc["paths"][path][method]["responses"]["503"]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} documents its 503"))
            .to_owned()
    };
    let add_to_cart = described("/api/v1/order/addToCart", "post");
    for reason in &all {
        assert!(
            add_to_cart.contains(&format!("`{reason}`")),
            "{reason} in {add_to_cart:?}"
        );
    }
    let orders = described("/api/v1/orders", "post");
    for reason in &all {
        assert!(
            orders.contains(&format!("`{reason}`")),
            "{reason} in {orders:?}"
        );
    }
    for path in [
        "/api/v1/transaction/{id}",
        "/api/v1/transaction/{id}/events",
    ] {
        let description = described(path, "get");
        assert!(
            description.contains("`redis_unavailable`"),
            "{path}: {description:?}"
        );
        assert!(
            !description.contains("`unavailable`"),
            "{path}: {description:?}"
        );
    }
    // Every other operation's 503 in the error shape names at least one reason's code, and no
    // code that is not one.
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = 0;
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().expect("operations") {
            let Some(description) = operation["responses"]["503"]["description"].as_str() else {
                continue;
            };
            if path == "/readyz" {
                continue; // the readiness report, not an error
            }
            documented += 1;
            assert!(
                all.iter()
                    .any(|reason| description.contains(&format!("`{reason}`"))),
                "{method} {path}: {description:?}"
            );
            assert!(
                !description.contains("`unavailable`"),
                "{method} {path}: {description:?}"
            );
        }
    }
    assert!(documented >= 10, "{documented} operations document a 503");
    app.shutdown().await;
}
