//! `GET /api/v1/stats`: the live counter of the web page. One primary-key read of the daily
//! order counter the workers keep, so it stays cheap however often it is asked and however
//! many transactions exist.

use crate::error::ApiError;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Stats {
    /// The latest day with an order (in the workers' `ALLOT_TIMEZONE`); `null` before the first.
    pub order_day: Option<NaiveDate>,
    /// Orders (successful purchases) decided on that day: its last order number.
    pub orders: i64,
}

#[utoipa::path(get, path = "/api/v1/stats", tag = crate::openapi::OPERATIONS,
    summary = "The number of orders of the latest day with orders",
    responses((status = 200, description = "Orders decided on the latest day with orders", body = Stats)))]
pub async fn stats(State(state): State<AppState>) -> Result<Json<Stats>, ApiError> {
    let latest: Option<(NaiveDate, i64)> =
        sqlx::query_as("SELECT day, last_seq FROM order_counters ORDER BY day DESC LIMIT 1")
            .fetch_optional(&state.pool)
            .await?;
    Ok(Json(Stats {
        order_day: latest.map(|(day, _)| day),
        orders: latest.map_or(0, |(_, orders)| orders),
    }))
}
