//! Sale windows and pauses: a request is judged at the time the API accepted it
//! (`created_at`), on sale iff `sale_starts_at <= created_at < sale_ends_at` and the product was
//! not paused then. The API answers at once from its catalogue snapshot; the worker judges
//! again, from the locked product row, whatever reaches it, so the edges are exact either way.
//! The API's clock is a manual one here, so the edges are exact to the microsecond. Staff change
//! windows, limits and pauses with `PATCH /api/v1/products/{id}` (merge-patch).

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, clock_at, spawn_app, wait_for};
use allot_shared::{ManualClock, SystemClock};
use chrono::{DateTime, TimeDelta, Utc};
use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;

const OPENS: &str = "2026-12-01T13:00:00Z";
const CLOSES: &str = "2026-12-01T14:00:00Z";

fn time(rfc3339: &str) -> DateTime<Utc> {
    rfc3339.parse().unwrap()
}

fn micro() -> TimeDelta {
    TimeDelta::microseconds(1)
}

/// A product on sale from [`OPENS`] until [`CLOSES`], set through the API.
async fn windowed_product(app: &TestApp, stock: i64) -> i64 {
    let product = app.create_product("window", stock).await;
    let response = app
        .patch_product(
            product,
            &json!({"sale_starts_at": OPENS, "sale_ends_at": CLOSES}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"id": product, "name": "window", "stock": stock,
               "sale_starts_at": OPENS, "sale_ends_at": CLOSES})
    );
    product
}

/// Everything a request answered at once could have written.
async fn written(app: &TestApp) -> (i64, u32, usize) {
    (
        app.count("SELECT count(*) FROM transactions").await,
        app.total_queue_depth().await,
        app.redis_key_count().await,
    )
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn at_the_edges_of_a_window_the_api_answers_at_once_or_the_request_is_sold(pool: PgPool) {
    let clock = clock_at("2026-12-01T12:00:00Z");
    let app = spawn_app(
        pool,
        Options {
            api_clock: Some(clock.clone()),
            sold_out_refresh_ms: 100,
            ..Options::default()
        },
    )
    .await;
    let product = windowed_product(&app, 10).await;
    let before = written(&app).await;

    clock.set(time(OPENS) - micro());
    let response = app.add_to_cart(1, product, 1).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "rejected", "reason": "not_started", "user_id": 1,
               "product_id": product, "quantity": 1, "final": true})
    );
    clock.set(time(CLOSES));
    let response = app.add_to_cart(2, product, 1).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["reason"], "ended");
    let response = app.place_order(2, &[(product, 1)]).await;
    assert_eq!(response.json::<Value>().await.unwrap()["reason"], "ended");
    assert_eq!(written(&app).await, before, "nothing recorded or enqueued");

    // The first and the last microsecond of the window are on sale.
    let mut sold = Vec::new();
    for at in [time(OPENS), time(CLOSES) - micro()] {
        clock.set(at);
        let id = app.buy(3, product, 1).await;
        let view = app.wait_final(id).await;
        assert_eq!(view["status"], "succeeded", "accepted at {at}");
        assert_eq!(
            view["created_at"]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap(),
            at
        );
        sold.push(id);
    }
    assert_eq!(app.product_stock(product).await, 8);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_worker_judges_each_request_at_its_acceptance_time(pool: PgPool) {
    // No snapshot (the short-circuit is off) and no worker yet: every request is accepted,
    // and decided later, when the API's clock is long past the window.
    let clock = clock_at("2026-12-01T12:00:00Z");
    let mut app = spawn_app(
        pool,
        Options {
            api_clock: Some(clock.clone()),
            ..Options::without_worker()
        },
    )
    .await;
    let product = windowed_product(&app, 10).await;
    let edges = [
        (time(OPENS) - micro(), "not_started"),
        (time(OPENS), "succeeded"),
        (time(CLOSES) - micro(), "succeeded"),
        (time(CLOSES), "ended"),
    ];
    let mut ids = Vec::new();
    for (at, _) in edges {
        clock.set(at);
        ids.push(app.buy(1, product, 1).await);
        ids.push(app.order(2, &[(product, 1)]).await);
    }
    clock.set(time(CLOSES) + TimeDelta::hours(5));
    app.start_worker(Arc::new(SystemClock));
    for (pair, (at, expected)) in ids.chunks(2).zip(edges) {
        for &id in pair {
            let view = app.wait_final(id).await;
            let got = view["reason"]
                .as_str()
                .unwrap_or(view["status"].as_str().unwrap());
            assert_eq!(got, expected, "accepted at {at}: {view}");
        }
    }
    assert_eq!(app.product_stock(product).await, 6);
    app.shutdown().await;
}

/// Pauses or resumes `product` at the API clock's time; returns the product.
async fn pause(app: &TestApp, product: i64, paused: bool) -> Value {
    let response = app.patch_product(product, &json!({"paused": paused})).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_request_accepted_during_a_pause_is_refused_even_when_decided_after_it(pool: PgPool) {
    let clock = clock_at("2026-12-01T12:00:00Z");
    let t = |seconds: i64| time("2026-12-01T12:00:00Z") + TimeDelta::seconds(seconds);
    let mut app = spawn_app(
        pool,
        Options {
            api_clock: Some(clock.clone()),
            ..Options::without_worker()
        },
    )
    .await;
    let product = app.create_product("paused", 10).await;

    let before_pause = app.buy(1, product, 1).await;
    clock.set(t(1));
    let paused = pause(&app, product, true).await;
    assert_eq!(paused["paused_at"], "2026-12-01T12:00:01Z");
    assert_eq!(
        app.get(&format!("/api/v1/products/{product}"))
            .await
            .json::<Value>()
            .await
            .unwrap(),
        paused
    );
    // Paused again: still paused since the first time.
    clock.set(t(2));
    assert_eq!(pause(&app, product, true).await, paused);
    let at_pause = {
        clock.set(t(1));
        app.buy(2, product, 1).await
    };
    clock.set(t(2));
    let during = app.order(3, &[(product, 1)]).await;
    clock.set(t(3));
    let resumed = pause(&app, product, false).await;
    assert!(resumed.get("paused_at").is_none(), "{resumed}");
    let after = app.buy(4, product, 1).await;
    let closed: (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT paused_at, resumed_at FROM product_pauses WHERE product_id = $1")
            .bind(product)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(closed, (t(1), t(3)));

    // Decided only now, after the resume: each by the time it was accepted.
    app.start_worker(Arc::new(SystemClock));
    let expected = [
        (before_pause, "succeeded"),
        (at_pause, "paused"),
        (during, "paused"),
        (after, "succeeded"),
    ];
    for (id, expected) in expected {
        let view = app.wait_final(id).await;
        let got = view["reason"]
            .as_str()
            .unwrap_or(view["status"].as_str().unwrap());
        assert_eq!(got, expected, "{view}");
    }

    // A pause during a running sale: what is accepted while paused is refused.
    clock.set(t(10));
    pause(&app, product, true).await;
    let while_paused = join_all((0..5).map(|user| app.buy(10 + user, product, 1))).await;
    clock.set(t(11));
    pause(&app, product, false).await;
    let resumed_again = app.buy(20, product, 1).await;
    for id in while_paused {
        assert_eq!(app.wait_final(id).await["reason"], "paused");
    }
    assert_eq!(app.wait_final(resumed_again).await["status"], "succeeded");
    assert_eq!(app.product_stock(product).await, 7);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn while_paused_the_api_answers_at_once_and_a_resume_reopens_at_once(pool: PgPool) {
    let app = spawn_app(
        pool,
        Options {
            sold_out_refresh_ms: 100,
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("flash", 5).await;
    let id = app.buy(1, product, 1).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");

    pause(&app, product, true).await;
    let before = written(&app).await;
    for user in 2..6 {
        let response = app.add_to_cart(user, product, 1).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({"status": "rejected", "reason": "paused", "user_id": user,
                   "product_id": product, "quantity": 1, "final": true})
        );
    }
    assert_eq!(written(&app).await, before, "nothing recorded or enqueued");
    pause(&app, product, false).await;
    let id = app.buy(6, product, 1).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    assert_eq!(app.product_stock(product).await, 3);
    app.shutdown().await;
}

/// The product as PostgreSQL holds it, every column.
async fn row(app: &TestApp, product: i64) -> String {
    sqlx::query_scalar("SELECT p::text FROM products p WHERE id = $1")
        .bind(product)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn staff_change_limits_and_windows_with_merge_patch_semantics(pool: PgPool) {
    let owned = spawn_app(pool, Options::without_worker()).await;
    let app = &owned;
    let response = app
        .post_admin(
            "/api/v1/products",
            &json!({"name": "drop", "stock": 5, "max_per_buyer": 2,
                    "sale_starts_at": "2030-01-01T00:00:00+02:00"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_i64().unwrap();
    assert_eq!(
        created,
        json!({"id": id, "name": "drop", "stock": 5, "max_per_buyer": 2,
               "sale_starts_at": "2029-12-31T22:00:00Z"})
    );

    // Absent: unchanged; a value: set (to the microsecond); null: cleared.
    let patch = |body: Value| async move {
        let response = app.patch_product(id, &body).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        response.json::<Value>().await.unwrap()
    };
    assert_eq!(patch(json!({})).await, created);
    assert_eq!(
        patch(json!({"sale_ends_at": "2030-02-01T00:00:00.1234567Z"})).await,
        json!({"id": id, "name": "drop", "stock": 5, "max_per_buyer": 2,
               "sale_starts_at": "2029-12-31T22:00:00Z",
               "sale_ends_at": "2030-02-01T00:00:00.123456Z"})
    );
    assert_eq!(
        patch(json!({"max_per_buyer": null, "sale_starts_at": null})).await,
        json!({"id": id, "name": "drop", "stock": 5,
               "sale_ends_at": "2030-02-01T00:00:00.123456Z"})
    );
    let listed: Value = app.get("/api/v1/products").await.json().await.unwrap();
    assert_eq!(
        listed["products"][0],
        json!({"id": id, "name": "drop", "stock": 5,
               "sale_ends_at": "2030-02-01T00:00:00.123456Z"})
    );

    // Refused, and nothing changes.
    let stored = row(app, id).await;
    for (body, expected) in [
        (
            json!({"sale_starts_at": "2030-02-01T00:00:00.123456Z"}),
            "must be before sale_ends_at",
        ),
        (
            json!({"sale_starts_at": "2030-03-01T00:00:00Z", "sale_ends_at": "2030-01-01T00:00:00Z"}),
            "must be before sale_ends_at",
        ),
        (json!({"paused": null}), "paused must be true or false"),
        (json!({"paused": "yes"}), "invalid type"),
        (
            json!({"max_per_buyer": 0}),
            "max_per_buyer must be between 1 and",
        ),
        (
            json!({"max_per_buyer": -3}),
            "max_per_buyer must be between 1 and",
        ),
        (
            json!({"max_per_buyer": 1_000_000_000_001_i64}),
            "max_per_buyer must be between 1 and",
        ),
        (json!({"max_per_buyer": "2"}), "invalid type"),
        (json!({"max_per_buyer": 1.5}), "invalid type"),
        (json!({"sale_starts_at": "tomorrow"}), "sale_starts_at"),
        (json!({"sale_starts_at": "2030-01-01"}), "sale_starts_at"),
        (
            json!({"sale_starts_at": "2030-01-01T00:00:00"}),
            "sale_starts_at",
        ),
        (json!({"sale_starts_at": 1_900_000_000}), "invalid type"),
        (
            json!({"sale_starts_at": "0000-01-01T00:00:00Z"}),
            "between the years 1 and 9999",
        ),
        (
            json!({"sale_ends_at": "+10000-01-01T00:00:00Z"}),
            "sale_ends_at",
        ),
        (json!({"stock": 7}), "unknown field `stock`"),
        (json!({"name": "renamed"}), "unknown field `name`"),
    ] {
        let response = app.patch_product(id, &body).await;
        let message =
            assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        assert!(message.contains(expected), "{body}: {message}");
        assert_eq!(row(app, id).await, stored, "changed by {body}");
    }
    let path = format!("/api/v1/products/{id}");
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let json = ("content-type", "application/json");
    for (headers, path, body, status, code) in [
        (
            vec![json],
            path.clone(),
            r#"{"paused": true}"#,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            vec![json, ("authorization", "Bearer wrong")],
            path.clone(),
            r#"{"paused": true}"#,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            vec![json, ("authorization", &bearer)],
            "/api/v1/products/999999".to_owned(),
            r#"{"paused": true}"#,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            vec![json, ("authorization", &bearer)],
            "/api/v1/products/abc".to_owned(),
            r#"{"paused": true}"#,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            vec![json, ("authorization", &bearer)],
            path.clone(),
            r#"{"paused": tru"#,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            vec![json, ("authorization", &bearer)],
            path.clone(),
            r#"[true]"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            vec![json, ("authorization", &bearer)],
            path.clone(),
            r#"{"paused": true, "paused": false}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            vec![
                ("content-type", "application/merge-patch+json"),
                ("authorization", &bearer),
            ],
            path.clone(),
            r#"{"paused": true}"#,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ] {
        let response = app.send(Method::PATCH, &path, &headers, body).await;
        assert_error(response, status, code).await;
        assert_eq!(
            row(app, id).await,
            stored,
            "changed by {body} with {headers:?}"
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM product_pauses").await, 0);

    // A product created with a window that ends before it starts is not created.
    let products = app.count("SELECT count(*) FROM products").await;
    let response = app
        .post_admin(
            "/api/v1/products",
            &json!({"name": "bad", "stock": 1, "sale_starts_at": "2030-01-01T00:00:00Z",
                    "sale_ends_at": "2030-01-01T00:00:00Z"}),
        )
        .await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    assert_eq!(app.count("SELECT count(*) FROM products").await, products);
    owned.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn another_instance_learns_a_window_at_its_next_refresh(pool: PgPool) {
    let clock: ManualClock = clock_at("2026-12-01T12:00:00Z");
    let app = spawn_app(
        pool,
        Options {
            api_clock: Some(clock.clone()),
            sold_out_refresh_ms: 100,
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("later", 5).await;
    // As another instance's PATCH would: only the database changes.
    sqlx::query("UPDATE products SET sale_starts_at = $2 WHERE id = $1")
        .bind(product)
        .bind(time(OPENS))
        .execute(&app.pool)
        .await
        .unwrap();
    let accepted = std::sync::atomic::AtomicI64::new(0);
    wait_for("the window to reach the snapshot", || async {
        let response = app.add_to_cart(1, product, 1).await;
        match response.status() {
            StatusCode::OK => {
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["reason"], "not_started");
                Some(())
            }
            StatusCode::ACCEPTED => {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                None
            }
            other => panic!("{other}"),
        }
    })
    .await;
    // Whatever was accepted before the snapshot knew was refused by the worker, from the row.
    let accepted = accepted.into_inner();
    wait_for("the accepted requests to be decided", || async {
        let decided = app.count("SELECT count(*) FROM transactions").await;
        (decided == accepted).then_some(())
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM transactions WHERE reason = 'not_started'")
            .await,
        accepted
    );
    let sold = app
        .count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
        .await;
    assert_eq!(sold, 0, "nothing sold before the window opens");
    assert_eq!(app.product_stock(product).await, 5);
    app.shutdown().await;
}
