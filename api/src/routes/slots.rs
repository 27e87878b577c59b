//! Capacity counters ("slots"): staff create them and change them (bearer token); anyone lists
//! them and reads one, each with its capacity, the places taken (succeeded orders), held (open
//! holds) and remaining. An order (or addToCart) naming a `slot_id` takes one place of it as well
//! as its products' units, all or nothing; the worker decides it under the slot's row lock, like
//! a product's stock.
//!
//! A slot's `starts_at` and `ends_at` are its window (a delivery window, say): an order accepted
//! at or after `ends_at` is refused `slot_ended`; `starts_at` is shown, and must come before the
//! end. Lowering the capacity below what is taken and held refuses new orders (`remaining` is 0)
//! and cancels nothing.

use super::keyset;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{self, Admin, AppJson, AppPath, AppQuery};
use crate::routes::products::{MAX_STOCK, checked_name, checked_time};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

/// A slot as clients see it. The window appears only when set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Slot {
    pub id: i64,
    pub name: String,
    /// Places in all.
    pub capacity: i64,
    /// Places of succeeded orders.
    pub taken: i64,
    /// Places of open holds.
    pub held: i64,
    /// Places left for new orders: `capacity - taken - held`, never below 0.
    pub remaining: i64,
    /// When the slot's window (a delivery window) begins; present only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub starts_at: Option<DateTime<Utc>>,
    /// When it ends (exclusive): an order accepted at or after it is refused `slot_ended`;
    /// present only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub ends_at: Option<DateTime<Utc>>,
}

/// The columns of [`Slot`], for `SELECT` and `RETURNING`.
macro_rules! slot_columns {
    () => {
        "id, name, capacity, taken, held, greatest(capacity - taken - held, 0) AS remaining, \
         starts_at, ends_at"
    };
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSlot {
    /// 1 to 200 characters, no control characters, not only whitespace; stored without
    /// leading and trailing whitespace.
    #[schema(
        example = "Tuesday 10:00-12:00",
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub name: String,
    /// Places, 0 to 10^12.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64, example = 20)]
    pub capacity: i64,
    /// When the slot's window begins (RFC 3339, kept to the microsecond); absent or `null`:
    /// none.
    #[serde(default)]
    pub starts_at: Option<DateTime<Utc>>,
    /// When it ends (exclusive), after `starts_at`: orders accepted from then on are refused
    /// `slot_ended`; absent or `null`: no end.
    #[serde(default)]
    pub ends_at: Option<DateTime<Utc>>,
}

/// A change of a slot, with JSON merge-patch semantics (RFC 7396): a field left out stays as it
/// is, `null` clears it (the window's times; `name` and `capacity` cannot be cleared), a value
/// sets it.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlotPatch {
    /// A new name, as at creation.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, max_length = 200, example = "Tuesday 10:00-12:30")]
    pub name: Option<Option<String>>,
    /// A new capacity, 0 to 10^12. Below the places taken and held, new orders are refused
    /// and none is cancelled.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = i64, minimum = 0, maximum = 1_000_000_000_000_i64, example = 25)]
    pub capacity: Option<Option<i64>>,
    /// When the window begins; `null`: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub starts_at: Option<Option<DateTime<Utc>>>,
    /// When it ends (exclusive), after the start; `null`: no end.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub ends_at: Option<Option<DateTime<Utc>>>,
}

/// A field that is present: `Some(None)` for `null`, `Some(Some(value))` for a value.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// `GET /api/v1/slots?limit=&after=`: keyset pagination by id.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SlotQuery {
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only slots with a larger id (the previous page's `next_after`).
    pub after: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotPage {
    pub slots: Vec<Slot>,
    /// Pass as `after` to get the next page; `null` on the last page.
    pub next_after: Option<i64>,
}

fn checked_capacity(capacity: i64) -> Result<i64, ApiError> {
    if (0..=MAX_STOCK).contains(&capacity) {
        Ok(capacity)
    } else {
        Err(ApiError::InvalidBody(format!(
            "capacity must be between 0 and {MAX_STOCK}, got {capacity}"
        )))
    }
}

/// A slot's window: when it starts and ends, each if set.
type Window = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The window, checked: times within the years 1 to 9999, the start before the end.
fn checked_window(
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
) -> Result<Window, ApiError> {
    let starts_at = checked_time("starts_at", starts_at)?;
    let ends_at = checked_time("ends_at", ends_at)?;
    if let (Some(starts), Some(ends)) = (starts_at, ends_at)
        && starts >= ends
    {
        return Err(ApiError::InvalidBody(format!(
            "starts_at ({}) must be before ends_at ({})",
            starts.to_rfc3339(),
            ends.to_rfc3339()
        )));
    }
    Ok((starts_at, ends_at))
}

#[utoipa::path(post, path = "/api/v1/slots", tag = crate::openapi::SLOTS,
    summary = "Create a capacity counter, such as a delivery slot (staff)",
    description = "A slot of `capacity` places, optionally with a window (`starts_at`, `ends_at`: a delivery window). \
        An order or addToCart naming its `slot_id` takes one place as well as its units, all or nothing; a full slot \
        refuses it (`slot_full`), and one whose `ends_at` has passed when the order is accepted refuses it (`slot_ended`).",
    request_body = NewSlot,
    security(("admin_token" = [])),
    responses(
        (status = 201, description = "Created", body = Slot),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong admin token", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    ))]
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<NewSlot>,
) -> Result<(StatusCode, Json<Slot>), ApiError> {
    let name = checked_name(&body.name)?;
    let capacity = checked_capacity(body.capacity)?;
    let (starts_at, ends_at) = checked_window(body.starts_at, body.ends_at)?;
    let slot: Slot = sqlx::query_as(concat!(
        "INSERT INTO slots (name, capacity, starts_at, ends_at) VALUES ($1, $2, $3, $4) RETURNING ",
        slot_columns!()
    ))
    .bind(name)
    .bind(capacity)
    .bind(starts_at)
    .bind(ends_at)
    .fetch_one(&state.pool)
    .await?;
    tracing::info!(slot_id = slot.id, capacity, "slot created");
    Ok((StatusCode::CREATED, Json(slot)))
}

#[utoipa::path(get, path = "/api/v1/slots", tag = crate::openapi::SLOTS,
    summary = "List the slots with their capacity, taken, held and remaining places, a page at a time",
    params(SlotQuery),
    responses(
        (status = 200, description = "One page of slots in id order (one query)", body = SlotPage),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    AppQuery(query): AppQuery<SlotQuery>,
) -> Result<Json<SlotPage>, ApiError> {
    let limit = keyset::limit(query.limit)?;
    let slots: Vec<Slot> = sqlx::query_as(concat!(
        "SELECT ",
        slot_columns!(),
        " FROM slots WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(query.after.unwrap_or(0))
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let next_after = keyset::next_after(&slots, limit, |slot| slot.id);
    Ok(Json(SlotPage { slots, next_after }))
}

#[utoipa::path(get, path = "/api/v1/slots/{id}", tag = crate::openapi::SLOTS,
    summary = "Read a slot and its places",
    params(("id" = i64, Path, minimum = 1, description = "The slot id")),
    responses(
        (status = 200, description = "The slot: capacity, taken, held, remaining", body = Slot),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    AppPath(raw_id): AppPath<String>,
) -> Result<Json<Slot>, ApiError> {
    let id = extract::slot_id(&raw_id)?;
    let slot: Option<Slot> = sqlx::query_as(concat!(
        "SELECT ",
        slot_columns!(),
        " FROM slots WHERE id = $1"
    ))
    .bind(id.get())
    .fetch_optional(&state.pool)
    .await?;
    slot.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no slot {id}")))
}

/// Changes a slot under its row lock (the lock every decision about it takes), so that no
/// order is decided against half a change.
#[utoipa::path(patch, path = "/api/v1/slots/{id}", tag = crate::openapi::SLOTS,
    summary = "Change a slot's capacity, name or window (staff)",
    description = "JSON merge-patch semantics (RFC 7396), sent as `application/json`: a field left out stays as it is, \
        `null` clears a window time, a value sets it (`name` and `capacity` cannot be `null`). A capacity below the places \
        taken and held refuses new orders (`remaining` 0) and cancels none. Applies to orders decided from now on.",
    params(("id" = i64, Path, minimum = 1, description = "The slot id")),
    request_body = SlotPatch,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The slot as it now is", body = Slot),
        (status = 400, description = "`invalid_id` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "`not_found`: no such slot", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: unknown field, wrong type, `null` name or capacity, a capacity out of range, a time that is not RFC 3339 or outside the years 1 to 9999, a start not before the end", body = ErrorBody),
    ))]
pub async fn update(
    _: Admin,
    State(state): State<AppState>,
    AppPath(raw_id): AppPath<String>,
    AppJson(body): AppJson<SlotPatch>,
) -> Result<Json<Slot>, ApiError> {
    let id = extract::slot_id(&raw_id)?;
    let name = match &body.name {
        Some(None) => return Err(ApiError::InvalidBody("name may not be null".into())),
        Some(Some(name)) => Some(checked_name(name)?.to_owned()),
        None => None,
    };
    let capacity = match body.capacity {
        Some(None) => return Err(ApiError::InvalidBody("capacity may not be null".into())),
        Some(Some(capacity)) => Some(checked_capacity(capacity)?),
        None => None,
    };
    let mut tx = state.pool.begin().await?;
    let current: Option<Slot> = sqlx::query_as(concat!(
        "SELECT ",
        slot_columns!(),
        " FROM slots WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Err(ApiError::NotFound(format!("no slot {id}")));
    };
    let (starts_at, ends_at) = checked_window(
        body.starts_at.unwrap_or(current.starts_at),
        body.ends_at.unwrap_or(current.ends_at),
    )?;
    let slot: Slot = sqlx::query_as(concat!(
        "UPDATE slots SET name = $2, capacity = $3, starts_at = $4, ends_at = $5 WHERE id = $1 ",
        "RETURNING ",
        slot_columns!()
    ))
    .bind(id.get())
    .bind(name.unwrap_or(current.name))
    .bind(capacity.unwrap_or(current.capacity))
    .bind(starts_at)
    .bind(ends_at)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(slot_id = slot.id, capacity = slot.capacity, "slot changed");
    Ok(Json(slot))
}
