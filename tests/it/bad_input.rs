//! Regressions of bad input that used to be accepted or answered outside the error shape:
//! bodies that are JSON but not objects (serde's positional form wrote), path ids that are not
//! UTF-8 once decoded (axum's plain-text 400), unknown files under the docs (a bare 404).
//! The generated sweep (`sweep/`) tries many more; these pin the cases that were found.

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, spawn_app};
use reqwest::{Method, StatusCode};

const JSON: (&str, &str) = ("content-type", "application/json");

/// Everything a refused request could have written: products (and their stock), decided
/// transactions, queued messages, Redis keys.
async fn written(app: &TestApp) -> (i64, i64, i64, u32, usize) {
    (
        app.count("SELECT count(*) FROM products").await,
        app.count("SELECT coalesce(sum(stock), 0)::bigint FROM products")
            .await,
        app.count("SELECT count(*) FROM transactions").await,
        app.total_queue_depth().await,
        app.redis_key_count().await,
    )
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_body_in_serde_positional_form_is_refused_with_422_and_writes_nothing(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = ("authorization", bearer.as_str());
    let restock = format!("/api/v1/products/{id}/restock");
    let before = written(&app).await;

    for (path, body) in [
        ("/api/v1/order/addToCart", format!("[7, {id}, 1]")),
        ("/api/v1/order/addToCart", format!(" \n[7, {id}, 1]")),
        ("/api/v1/products", r#"["name", 5]"#.to_owned()),
        (restock.as_str(), "[5]".to_owned()),
        (restock.as_str(), "5".to_owned()),
        (restock.as_str(), r#""quantity""#.to_owned()),
        (restock.as_str(), "true".to_owned()),
        (restock.as_str(), "null".to_owned()),
    ] {
        let response = app
            .send(Method::POST, path, &[JSON, auth], body.clone())
            .await;
        let message =
            assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        assert_eq!(
            message, "the body must be a JSON object",
            "POST {path} {body}"
        );
        assert_eq!(
            written(&app).await,
            before,
            "written after POST {path} {body}"
        );
    }
    // Malformed JSON stays 400, whatever it starts with.
    for body in ["[7, 1", "7 7", "nul", "[7, 1, 1] x"] {
        let response = app
            .send(Method::POST, "/api/v1/order/addToCart", &[JSON], body)
            .await;
        assert_error(response, StatusCode::BAD_REQUEST, "malformed_json").await;
    }
    assert_eq!(written(&app).await, before);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn only_application_json_is_taken_as_json(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;
    let body = format!(r#"{{"user_id": 7, "product_id": {id}, "quantity": 1}}"#);
    let before = written(&app).await;

    for headers in [
        &[("content-type", "application/merge-patch+json")][..],
        &[("content-type", "application/jsonx")],
        &[("content-type", "text/json")],
        &[
            ("content-type", "application/json"),
            ("content-type", "text/plain"),
        ],
    ] {
        let response = app
            .send(
                Method::POST,
                "/api/v1/order/addToCart",
                headers,
                body.clone(),
            )
            .await;
        assert_error(
            response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        assert_eq!(written(&app).await, before, "written with {headers:?}");
    }
    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let response = app
            .send(
                Method::POST,
                "/api/v1/order/addToCart",
                &[("content-type", content_type)],
                body.clone(),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{content_type}");
    }

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_path_id_that_is_not_utf8_is_400_invalid_id_in_the_error_shape(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.create_product("Widget", 5).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let before = written(&app).await;

    for raw in ["%FF", "%C3%28", "1%80", "%ED%A0%80"] {
        for (method, path, body) in [
            (Method::GET, format!("/api/v1/products/{raw}"), ""),
            (Method::GET, format!("/api/v1/transaction/{raw}"), ""),
            (Method::GET, format!("/api/v1/transaction/{raw}/events"), ""),
            (
                Method::POST,
                format!("/api/v1/products/{raw}/restock"),
                r#"{"quantity": 5}"#,
            ),
        ] {
            let response = app
                .send(
                    method.clone(),
                    &path,
                    &[JSON, ("authorization", bearer.as_str())],
                    body,
                )
                .await;
            assert_error(response, StatusCode::BAD_REQUEST, "invalid_id").await;
        }
    }
    assert_eq!(written(&app).await, before);
    assert_eq!(app.product_stock(id).await, 5);

    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn unknown_files_under_the_docs_are_404_not_found_in_the_error_shape(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;

    for path in [
        "/docs/nope",
        "/docs/nope.js",
        "/docs/swagger-ui.css/x",
        "/docs/%FF",
        "/api-docs/nope",
        "/api-docs/openapi.json/x",
        "/api-docs/",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "GET {path}");
        assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    for (method, path) in [
        (Method::POST, "/docs/swagger-ui.css"),
        (Method::DELETE, "/docs/"),
        (Method::POST, "/api-docs/openapi.json"),
        (Method::POST, "/"),
    ] {
        let response = app.send(method.clone(), path, &[JSON], "{}").await;
        assert_error(
            response,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
    }
    // The files themselves are still served as they are.
    let response = app.get("/docs/swagger-ui.css").await;
    assert_eq!(response.status(), StatusCode::OK);

    app.shutdown().await;
}
