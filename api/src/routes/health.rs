//! `/healthz`: the process is alive. `/readyz`: it can take orders (broker, database and Redis
//! all reachable); load balancers and `deploy/local.sh` wait on it.

use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

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
