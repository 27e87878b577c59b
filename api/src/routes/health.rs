//! `/healthz`: the process is alive. `/readyz`: it can take orders (broker, database and Redis
//! all reachable); load balancers and `deploy/local.sh` wait on it. `/metrics`: Prometheus.

use crate::observe;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

#[utoipa::path(get, path = "/healthz", tag = crate::openapi::OPERATIONS,
    summary = "Liveness: the process runs",
    responses((status = 200, description = "The process runs", body = Object, example = json!({"status": "ok"}))))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = crate::openapi::OPERATIONS,
    summary = "Readiness: the database, Redis and the broker are reachable",
    responses(
        (status = 200, description = "Database, Redis and broker reachable", body = Object,
            example = json!({"status": "ready", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}})),
        (status = 503, description = "Something is unreachable; `checks` says what", body = Object,
            example = json!({"status": "not_ready", "checks": {"database": "ok", "redis": "unavailable", "broker": "ok"}})),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    let redis = state.statuses.ping().await.is_ok();
    let broker = state.publisher.is_connected();
    let ready = database && redis && broker;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {"database": word(database), "redis": word(redis), "broker": word(broker)},
        })),
    )
}

#[utoipa::path(get, path = "/metrics", tag = crate::openapi::OPERATIONS,
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    observe::render(&state.metrics)
}
