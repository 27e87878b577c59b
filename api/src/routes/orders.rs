//! Buying: `POST /api/v1/order/addToCart` and `GET /api/v1/transaction/{id}`; [`accept`], the
//! path every request to buy takes once validated (addToCart, and orders of several products
//! in [`super::baskets`]).

use crate::catalogue::FinalAnswer;
use crate::decisions::{preference_applied, preferred_wait};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{self, AppJson};
use crate::intake::Refusal;
use crate::state::AppState;
use allot_shared::stored;
use allot_shared::{
    Order, ProductId, PurchaseRequest, Quantity, Status, TransactionId, TransactionView, UserId,
};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;

/// A purchase request: who buys how many units of which product. Every field is a positive
/// integer; `quantity` is at most the server's `ALLOT_MAX_QUANTITY`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddToCart {
    pub user_id: UserId,
    pub product_id: ProductId,
    pub quantity: Quantity,
}

/// The 202 answer: the id to poll.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Accepted {
    pub transaction_id: TransactionId,
    pub status: Status,
}

/// Validates, then [`accept`]s: a request for a product sold out, outside its sale window or
/// paused is answered at once with its final outcome (see [`crate::catalogue`]); otherwise the
/// [`crate::intake`] answers once the broker confirmed the message that carries it (202), or
/// refused it (503 with `Retry-After`; nothing was accepted). With `Prefer: wait=N` an accepted
/// request's answer is held until it is decided (200 with the final transaction) or N seconds
/// passed (202).
#[utoipa::path(post, path = "/api/v1/order/addToCart", tag = crate::openapi::ORDERS,
    request_body = AddToCart,
    params(("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): hold the answer until the transaction is final, at most N seconds (capped at 10)")),
    responses(
        (status = 200, description = "Final at once: sold out, or outside the product's sale window, or paused (rejected `out_of_stock`, `not_started`, `ended` or `paused`; nothing recorded; a `FinalAnswer`), or, with `Prefer: wait`, the transaction decided within the wait (a `TransactionView`, with `Preference-Applied`)", body = FinalAnswer),
        (status = 202, description = "Accepted: RabbitMQ confirmed the request; poll the transaction", body = Accepted,
            headers(("location" = String, description = "/api/v1/transaction/{id}"))),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: missing, unknown or out-of-range field", body = ErrorBody),
        (status = 503, description = "`unavailable`: not accepted, retry after `Retry-After`", body = ErrorBody),
    ),
    summary = "Ask to buy units of a product",
    description = "Answers `202` with a transaction id once the request is stored for processing; \
        follow it with `GET /api/v1/transaction/{id}` (or watch its `/events`) until it is `succeeded` \
        with an order number or `rejected` with a reason. From a `202` on, the request reaches exactly \
        one final outcome. A product already sold out, outside its sale window or paused is answered `200` \
        at once with the final rejection (`out_of_stock`, `not_started`, `ended`, `paused`), and nothing is \
        recorded. A product with a `max_per_buyer` refuses units past it (`limit_exceeded`, decided by the \
        worker). `503` with `Retry-After` means the request was not \
        accepted and will not be sold: retry later. Bad input is refused with a 4xx and nothing is recorded. \
        With `Prefer: wait=N` (at most 10 s) the answer is held until the request is decided: `200` with the \
        final transaction and `Preference-Applied`, or the usual `202` once N seconds passed.")]
#[tracing::instrument(skip_all, fields(product_id = %body.product_id, transaction_id))]
pub async fn add_to_cart(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(body): AppJson<AddToCart>,
) -> Result<Response, ApiError> {
    if body.quantity.get() > state.max_quantity {
        return Err(ApiError::InvalidBody(format!(
            "quantity must be at most {}, got {}",
            state.max_quantity, body.quantity
        )));
    }
    // The buyer: the body's user_id (buyer tokens will resolve it here).
    let user_id = body.user_id;
    let request = PurchaseRequest {
        transaction_id: TransactionId::new(),
        user_id,
        product_id: body.product_id,
        quantity: body.quantity,
        created_at: state.clock.now(),
    };
    accept(&state, &headers, Order::from(request)).await
}

/// The path of a validated request to buy, for addToCart and orders alike: answered at once
/// if the catalogue snapshot knows it cannot be served (`200`, final, nothing recorded);
/// otherwise accepted through the intake (`202` with `Location`, or `503`), and with
/// `Prefer: wait=N` held until it is decided (`200` with the transaction) or N seconds passed.
pub async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    order: Order,
) -> Result<Response, ApiError> {
    if let Some((product, reason)) = state.catalogue.refusal(&order) {
        let answer = FinalAnswer::new(&order, reason, product);
        return Ok((StatusCode::OK, Json(answer)).into_response());
    }
    let id = order.transaction_id;
    tracing::Span::current().record("transaction_id", tracing::field::display(id));
    let wait = preferred_wait(headers);
    // Registered before the publish, so the decision cannot be announced before we listen.
    let waiter = wait.map(|_| state.decisions.wait_for(id));
    state.intake.accept(order).await.map_err(refusal_error)?;

    if let (Some(secs), Some(waiter)) = (wait, waiter) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        if let Some(view) = waiter.until_final(state, deadline).await {
            return Ok((StatusCode::OK, [preference_applied(secs)], Json(view)).into_response());
        }
    }
    let location = format!("/api/v1/transaction/{id}");
    let accepted = Accepted {
        transaction_id: id,
        status: Status::Pending,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(accepted),
    )
        .into_response())
}

fn refusal_error(refusal: Refusal) -> ApiError {
    let retry_after = refusal.retry_after_secs();
    match refusal {
        Refusal::QueueFull => ApiError::unavailable(
            "too many pending orders for this product's partition; the request was not accepted, try again",
            retry_after,
        ),
        Refusal::BrokerUnavailable => ApiError::unavailable(
            "the order queue is unavailable; the request was not accepted, try again",
            retry_after,
        ),
        Refusal::StoreUnavailable => ApiError::unavailable(
            "the status store is unavailable; the request was not accepted, try again",
            retry_after,
        ),
        Refusal::Unroutable(queue) => {
            ApiError::Internal(anyhow::anyhow!("queue {queue} does not exist"))
        }
    }
}

/// The status of a transaction: from Redis, or from PostgreSQL when Redis has none (or is
/// down). 404 only when neither knows it and Redis answered; if Redis is down and the
/// database has no decided row, the transaction may still be pending, so 503. With
/// `Prefer: wait=N`, a pending transaction's answer is held until it is final or N seconds
/// passed.
#[utoipa::path(get, path = "/api/v1/transaction/{id}", tag = crate::openapi::ORDERS,
    params(("id" = uuid::Uuid, Path, description = "The transaction id"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): hold a pending answer until the transaction is final, at most N seconds (capped at 10)")),
    responses(
        (status = 200, description = "The transaction: `pending`, or final with its order number or reason", body = TransactionView),
        (status = 400, description = "`invalid_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: allot never accepted this id", body = ErrorBody),
        (status = 503, description = "`unavailable`: Redis is down and the transaction is not decided", body = ErrorBody),
    ),
    summary = "Follow a purchase request",
    description = "The transaction: `pending` until it is decided, then `succeeded` with its order number \
        or `rejected` with its reason, and final from then on. `404` if allot never accepted this id; an id \
        answered `202` never becomes `404`. `503` if the status store is unavailable and the transaction is \
        not decided yet: try again. With `Prefer: wait=N` (at most 10 s) a pending answer is held until the \
        transaction is final or N seconds passed.")]
#[tracing::instrument(skip_all, fields(transaction_id = %raw_id))]
pub async fn get_transaction(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = extract::transaction_id(&raw_id)?;
    let Some(secs) = preferred_wait(&headers) else {
        return Ok(Json(read_transaction(&state, id).await?).into_response());
    };
    let waiter = state.decisions.wait_for(id);
    let view = read_transaction(&state, id).await?;
    let view = if view.status == Status::Pending {
        let deadline = Instant::now() + Duration::from_secs(secs);
        waiter.until_final(&state, deadline).await.unwrap_or(view)
    } else {
        view
    };
    Ok(([preference_applied(secs)], Json(view)).into_response())
}

/// The transaction as `GET /api/v1/transaction/{id}` answers it (without waiting).
pub async fn read_transaction(
    state: &AppState,
    id: TransactionId,
) -> Result<TransactionView, ApiError> {
    let redis_answered = match state.statuses.get(id).await {
        Ok(Some(view)) => return Ok(view),
        Ok(None) => true,
        Err(err) => {
            tracing::warn!(error = %format_args!("{err:#}"), "Redis unavailable; reading the status from PostgreSQL");
            false
        }
    };
    match stored::fetch_one(&state.pool, id).await? {
        Some(row) => Ok(row.to_view()?),
        None if redis_answered => Err(ApiError::NotFound(format!("no transaction {id}"))),
        None => Err(ApiError::unavailable(
            "the status store is unavailable; try again",
            1,
        )),
    }
}
