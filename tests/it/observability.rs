//! What operators see: Prometheus metrics on both servers that really move with the traffic,
//! the worker's health endpoints, and the request id on every response.

use crate::helpers::{Options, TestApp, sample, spawn_app, today};
use allot_shared::SystemClock;
use allot_shared::partition::partition_for;
use allot_shared::{ProductId, Status, TransactionId};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn metrics_of(app: &TestApp, base: &str) -> String {
    let response = app
        .client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

async fn api_metrics(app: &TestApp) -> String {
    metrics_of(app, &app.address).await
}

async fn worker_metrics(app: &TestApp) -> String {
    metrics_of(app, app.worker_address.as_deref().expect("a worker runs")).await
}

const ACCEPTED: &str =
    r#"allot_api_requests_total{method="POST",route="/api/v1/order/addToCart",status="202"}"#;
const CONFIRMED: &str = r#"allot_api_publishes_total{result="confirmed"}"#;
const ACCEPT_LATENCY: &str = r#"allot_api_accept_duration_seconds_count{status="202"}"#;
const PRODUCT_404: &str =
    r#"allot_api_requests_total{method="GET",route="/api/v1/products/{id}",status="404"}"#;
const UNMATCHED: &str = r#"allot_api_requests_total{method="GET",route="unmatched",status="404"}"#;
const SUCCEEDED: &str = r#"allot_worker_decisions_total{outcome="succeeded"}"#;
const REJECTED: &str = r#"allot_worker_decisions_total{outcome="rejected"}"#;
const BATCHES: &str = "allot_worker_batch_size_count";
const COMMITS: &str = "allot_worker_commit_duration_seconds_count";

// The integration tests may share one process (cargo test), and so one metrics registry: the
// assertions are on increases, at least by what this test caused.

/// Whether `metrics` has the sample `series` (`name{labels}` exactly as rendered).
fn has_series(metrics: &str, series: &str) -> bool {
    metrics.lines().any(|line| {
        line.strip_prefix(series)
            .is_some_and(|rest| rest.starts_with(' '))
    })
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_counters_of_the_readme_are_exported_before_anything_happened(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    // Before any order, publish or decision: each series is there (at 0 in a process of its
    // own, as under nextest), so rates and alerts have a series from the start.
    let api = api_metrics(&app).await;
    for series in [
        r#"allot_api_publishes_total{result="confirmed"}"#,
        r#"allot_api_publishes_total{result="refused"}"#,
        r#"allot_api_publishes_total{result="failed"}"#,
    ] {
        assert!(
            has_series(&api, series),
            "API /metrics has {series}:\n{api}"
        );
    }
    let worker = worker_metrics(&app).await;
    for series in [
        r#"allot_worker_decisions_total{outcome="succeeded"}"#,
        r#"allot_worker_decisions_total{outcome="rejected"}"#,
        r#"allot_worker_decisions_total{outcome="replayed"}"#,
        r#"allot_worker_decisions_total{outcome="dead_lettered"}"#,
        "allot_worker_set_aside_total",
        BATCHES,
        COMMITS,
    ] {
        assert!(
            has_series(&worker, series),
            "worker /metrics has {series}:\n{worker}"
        );
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn api_metrics_count_requests_by_route_and_status_publishes_and_accept_latency(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("metered", 5).await;
    let before = api_metrics(&app).await;
    let id = app.buy(1, product, 1).await;
    app.buy(2, product, 1).await;
    assert_eq!(
        app.get("/api/v1/products/999999").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get("/no/such/path").await.status(),
        StatusCode::NOT_FOUND
    );
    app.wait_final(id).await;
    let after = api_metrics(&app).await;
    for (series, at_least) in [
        (ACCEPTED, 2.0),
        (CONFIRMED, 2.0),
        (ACCEPT_LATENCY, 2.0),
        (PRODUCT_404, 1.0),
        (UNMATCHED, 1.0),
    ] {
        let increase = sample(&after, series) - sample(&before, series);
        assert!(
            increase >= at_least,
            "{series} rose by {increase}, expected {at_least}"
        );
    }
    assert!(
        after.contains("# TYPE allot_api_accept_duration_seconds histogram"),
        "accept latency is a histogram"
    );
    assert!(after.contains(r#"allot_api_accept_duration_seconds_bucket{status="202",le="0.005"}"#));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn worker_metrics_count_decisions_by_outcome_batches_and_commit_latency(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("metered", 1).await;
    let before = worker_metrics(&app).await;
    let sold = app.buy(1, product, 1).await;
    assert_eq!(app.wait_final(sold).await["status"], "succeeded");
    let refused = app.buy(2, product, 1).await;
    assert_eq!(app.wait_final(refused).await["status"], "rejected");
    let after = worker_metrics(&app).await;
    for (series, at_least) in [
        (SUCCEEDED, 1.0),
        (REJECTED, 1.0),
        (BATCHES, 1.0),
        (COMMITS, 1.0),
    ] {
        let increase = sample(&after, series) - sample(&before, series);
        assert!(
            increase >= at_least,
            "{series} rose by {increase}, expected {at_least}"
        );
    }
    assert!(after.contains("# TYPE allot_worker_batch_size histogram"));
    assert!(after.contains("# TYPE allot_worker_commit_duration_seconds histogram"));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_queue_depth_gauge_shows_what_waits_in_each_partition(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("queued", 10).await;
    for user in 1..=3 {
        app.buy(user, product, 1).await;
    }
    let partition = partition_for(
        ProductId::try_from(product).unwrap(),
        crate::helpers::PARTITIONS,
    );
    let connection =
        allot_shared::amqp::connect(&app.api_config.common.amqp_url, "allot-tests-monitor")
            .await
            .unwrap();
    let stop = CancellationToken::new();
    let watching = tokio::spawn({
        let topology = app.api_config.common.topology();
        let stop = stop.clone();
        async move { allot_worker::monitor::watch_queue_depths(&connection, topology, stop).await }
    });
    let series = format!("allot_queue_depth{{partition=\"{partition}\"}}");
    let handle = allot_shared::metrics::install();
    crate::helpers::wait_for("the depth gauge to read 3", || {
        let rendered = handle.render();
        let series = series.clone();
        async move { (sample(&rendered, &series) == 3.0).then_some(()) }
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), watching)
        .await
        .unwrap()
        .unwrap();
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_worker_answers_health_and_readiness(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let base = app.worker_address.clone().unwrap();
    let health = app
        .client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    // Ready only once its RabbitMQ session consumes, which happens a moment after start.
    let ready = crate::helpers::wait_for("the worker to be ready", || {
        let request = app.client.get(format!("{base}/readyz")).send();
        async move {
            let response = request.await.ok()?;
            (response.status() == StatusCode::OK).then_some(response)
        }
    })
    .await;
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"status": "ready", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}})
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_worker_without_a_broker_is_alive_but_not_ready(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    // Nothing listens on port 1: the worker keeps trying to connect and never consumes.
    app.worker_config.common.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    app.start_worker(Arc::new(SystemClock));
    let base = app.worker_address.clone().unwrap();
    let health = crate::helpers::wait_for("the worker's HTTP server", || {
        let request = app.client.get(format!("{base}/healthz")).send();
        async move { request.await.ok() }
    })
    .await;
    assert_eq!(health.status(), StatusCode::OK);
    let ready = app
        .client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"status": "not_ready", "checks": {"database": "ok", "redis": "ok", "broker": "unavailable"}})
    );
    app.shutdown().await;
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn every_response_carries_a_request_id_kept_from_the_client_when_sane(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    // None sent: a fresh UUID, different each time, on successes and errors alike.
    let first = request_id(&app.get("/healthz").await);
    let second = request_id(&app.get("/no/such/path").await);
    for id in [&first, &second] {
        uuid::Uuid::parse_str(id).expect("a generated request id is a UUID");
    }
    assert_ne!(first, second);
    // A sane one is kept; one that could forge log lines is replaced.
    let kept = app
        .client
        .get(app.url("/api/v1/products"))
        .header("x-request-id", "checkout-42.a_b:c")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&kept), "checkout-42.a_b:c");
    let replaced = app
        .client
        .get(app.url("/api/v1/products"))
        .header("x-request-id", "x\" injected=\"1")
        .send()
        .await
        .unwrap();
    uuid::Uuid::parse_str(&request_id(&replaced)).expect("an insane request id is replaced");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn stats_count_the_orders_of_the_day(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let empty = app.get("/api/v1/stats").await;
    assert_eq!(empty.status(), StatusCode::OK);
    assert_eq!(
        empty.json::<Value>().await.unwrap(),
        json!({"order_day": null, "orders": 0})
    );
    let product = app.create_product("counted", 2).await;
    let mut ids: Vec<TransactionId> = Vec::new();
    for user in 1..=3 {
        ids.push(app.buy(user, product, 1).await);
    }
    for id in ids {
        let status = app.wait_final(id).await["status"].clone();
        assert_ne!(status, json!(Status::Pending.as_str()));
    }
    let day = today();
    let day = format!("{}-{}-{}", &day[0..4], &day[4..6], &day[6..8]);
    let stats: Value = app.get("/api/v1/stats").await.json().await.unwrap();
    assert_eq!(
        stats,
        json!({"order_day": day, "orders": 2}),
        "two sold, one rejected"
    );
    app.shutdown().await;
}
