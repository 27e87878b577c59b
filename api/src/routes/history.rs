//! `GET /api/v1/orders/history`: a buyer's own transactions, newest first, a page at a time.
//!
//! Decided transactions come from PostgreSQL (index `transactions (user_id, id DESC)`);
//! an account's pending ones from Redis ([`crate::buyers::pending`]), so a purchase shows in
//! its buyer's history from its `202` on. Redis is read first: a transaction decided between
//! the two reads is then found by the second, never lost between them.
//!
//! Pages are keyed by transaction id (UUIDv7: acceptance order, immutable), so paging never
//! repeats or skips a transaction, whatever is bought or decided meanwhile; a transaction
//! decided after its page was read keeps its place on later reads.

use crate::buyers::{self, Caller, pending};
use crate::error::{ApiError, ErrorBody, Unavailability};
use crate::extract::AppQuery;
use crate::state::AppState;
use allot_shared::{TransactionId, TransactionView, UserId, stored};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The largest page.
pub const MAX_LIMIT: i64 = 100;
/// The page size without `limit`.
pub const DEFAULT_LIMIT: i64 = 20;

/// `GET /api/v1/orders/history?limit=&after=&user_id=`
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Page size, 1..=100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Only transactions older than this one: the previous page's `next_after`.
    #[param(value_type = Option<uuid::Uuid>)]
    pub after: Option<TransactionId>,
    /// Whose history: staff name any buyer; a buyer may only name itself (the default).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub user_id: Option<UserId>,
}

/// One page of a buyer's history.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryPage {
    /// Newest first; each exactly as `GET /api/v1/transaction/{id}` shows it (items, status,
    /// order number or reason, times).
    pub transactions: Vec<TransactionView>,
    /// Pass as `after` for the next page; `null` on the last page.
    #[schema(value_type = Option<uuid::Uuid>)]
    pub next_after: Option<TransactionId>,
}

#[utoipa::path(get, path = "/api/v1/orders/history", tag = crate::openapi::BUYERS,
    summary = "A buyer's transactions, newest first, a page at a time",
    description = "The transactions of the token's account, newest first (by transaction id, which follows \
        acceptance time), pending ones included (an account's purchases are listed from their `202` on), each as \
        `GET /api/v1/transaction/{id}` shows it. Keyset pages: pass `next_after` as `after` for the next one; no \
        transaction is repeated or skipped across pages. Staff (admin token) read any buyer's with `user_id=` \
        (an anonymous buyer's history lists its decided transactions only). A buyer can read only its own: \
        another `user_id` is `403 user_mismatch`.",
    params(HistoryQuery),
    security(("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "One page", body = HistoryPage),
        (status = 400, description = "`invalid_query`: a malformed or unknown parameter, or staff without `user_id`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or one that is not valid", body = ErrorBody),
        (status = 403, description = "`user_mismatch`: a buyer's token and another buyer's `user_id`", body = ErrorBody),
        (status = 503, description = "`redis_unavailable` (Redis, which lists the pending transactions, cannot be reached) or `database_unavailable` (PostgreSQL cannot be reached), or `timeout`; retry after `Retry-After`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    AppQuery(query): AppQuery<HistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    let user = match (&caller, query.user_id) {
        (Caller::Anonymous, _) => {
            return Err(ApiError::Unauthenticated(
                "the history needs a buyer's token: Authorization: Bearer <token>".into(),
            ));
        }
        (Caller::Staff, Some(user)) => user,
        (Caller::Staff, None) => {
            return Err(ApiError::InvalidQuery(
                "staff read a buyer's history with user_id=<id>".into(),
            ));
        }
        (Caller::Buyer(_), named) => buyers::resolve(&state, &caller, named)?,
    };
    let pending = pending::read(&state, user).await.map_err(|err| {
        tracing::warn!(error = %format_args!("{err:#}"), "Redis unavailable; cannot list pending transactions");
        ApiError::unavailable(
            Unavailability::RedisUnavailable,
            "the status store is unavailable; try again",
            1,
        )
    })?;
    let decided = stored::fetch_of_user(&state.pool, user, query.after, limit + 1)
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "the database is unavailable");
            ApiError::unavailable(
                Unavailability::DatabaseUnavailable,
                "the database is unavailable; try again",
                1,
            )
        })?;
    let mut page: BTreeMap<TransactionId, TransactionView> = pending
        .into_iter()
        .filter(|view| query.after.is_none_or(|after| view.transaction_id < after))
        .map(|view| (view.transaction_id, view))
        .collect();
    for row in decided {
        let view = row.to_view()?;
        page.insert(view.transaction_id, view);
    }
    let mut transactions: Vec<TransactionView> = page.into_values().rev().collect();
    let limit = limit as usize;
    let next_after = (transactions.len() > limit).then(|| transactions[limit - 1].transaction_id);
    transactions.truncate(limit);
    Ok(Json(HistoryPage {
        transactions,
        next_after,
    }))
}
