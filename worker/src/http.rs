//! The worker's small HTTP server, for operators and orchestrators: `/healthz` (the process
//! runs), `/readyz` (database, Redis and broker reachable), `/partitions` (which partitions
//! this worker owns and decides, see [`crate::seats`]) and `/metrics` (Prometheus text). It
//! listens on `ALLOT_WORKER_HTTP_ADDR` and serves nothing else.

use crate::seats::{Seats, SeatsView};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the health checks look at.
#[derive(Clone)]
pub struct Health {
    pub pool: PgPool,
    pub redis: ConnectionManager,
    /// Set while a RabbitMQ session is consuming (cleared when its connection is found down).
    pub broker_up: Arc<AtomicBool>,
    /// This worker's seats in the partitions' lines.
    pub seats: Arc<Seats>,
    pub metrics: PrometheusHandle,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/partitions", get(partitions))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(health): State<Health>) -> (StatusCode, Json<Value>) {
    let database = sqlx::query("SELECT 1").execute(&health.pool).await.is_ok();
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut health.redis.clone())
        .await
        .is_ok();
    let broker = health.broker_up.load(Ordering::Relaxed);
    let ready = database && redis && broker;
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {"database": word(database), "redis": word(redis), "broker": word(broker)},
        })),
    )
}

/// `{"worker": "w-…", "workers": 3, "owned": [0, 4, …], "active": [0, 4, …], "subscribed": 16}`.
async fn partitions(State(health): State<Health>) -> Json<SeatsView> {
    Json(health.seats.view())
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(allot_shared::metrics::CONTENT_TYPE),
        )],
        health.metrics.render(),
    )
}
