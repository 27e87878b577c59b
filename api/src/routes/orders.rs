//! Buying: `POST /api/v1/order/addToCart` and `GET /api/v1/transaction/{id}`.

use crate::error::{ApiError, ErrorBody};
use crate::extract::{self, AppJson};
use crate::publisher::PublishError;
use crate::sold_out::SoldOutAnswer;
use crate::state::AppState;
use allot_shared::stored::{self, Withdrawal};
use allot_shared::{Clock, SystemClock};
use allot_shared::{
    ProductId, PurchaseRequest, Quantity, Status, TransactionId, TransactionView, UserId,
};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

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

/// Validates; answers a request for a sold-out product at once with its final outcome (see
/// [`crate::sold_out`]); otherwise records the transaction as pending, publishes it and waits
/// for the broker's confirm; only then answers 202. If the request cannot be confirmed it is
/// not accepted: 503 with `Retry-After`, and its pending record is removed. If the broker may
/// have stored it anyway (no confirm in time, or the connection dropped after sending), the
/// request is also withdrawn in PostgreSQL so that no worker can sell it, unless a worker
/// already did, in which case it was accepted after all and is answered 202.
#[utoipa::path(post, path = "/api/v1/order/addToCart", tag = crate::openapi::ORDERS,
    request_body = AddToCart,
    responses(
        (status = 200, description = "Sold out: rejected `out_of_stock` at once, final, nothing recorded", body = SoldOutAnswer),
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
        one final outcome. A product already sold out is answered `200` at once with the final rejection \
        (`out_of_stock`), and nothing is recorded. `503` with `Retry-After` means the request was not \
        accepted and will not be sold: retry later. Bad input is refused with a 4xx and nothing is recorded.")]
#[tracing::instrument(skip_all, fields(product_id = %body.product_id, transaction_id))]
pub async fn add_to_cart(
    State(state): State<AppState>,
    AppJson(body): AppJson<AddToCart>,
) -> Result<Response, ApiError> {
    if body.quantity.get() > state.max_quantity {
        return Err(ApiError::InvalidBody(format!(
            "quantity must be at most {}, got {}",
            state.max_quantity, body.quantity
        )));
    }
    if state.sold_out.contains(body.product_id) {
        let answer = SoldOutAnswer::new(body.user_id, body.product_id, body.quantity);
        return Ok((StatusCode::OK, Json(answer)).into_response());
    }
    let request = PurchaseRequest {
        transaction_id: TransactionId::new(),
        user_id: body.user_id,
        product_id: body.product_id,
        quantity: body.quantity,
        created_at: SystemClock.now(),
    };
    tracing::Span::current().record(
        "transaction_id",
        tracing::field::display(request.transaction_id),
    );

    // Pending first, then the publish; not both at once. Running them concurrently gained no
    // throughput with the CPU saturated (docs/benchmarks.md), and it turned every Redis
    // timeout under overload into a confirmed message that had to be withdrawn in PostgreSQL,
    // which exhausted the pool and cascaded into seconds-long 503s.
    state
        .statuses
        .record_pending(&TransactionView::pending(&request))
        .await
        .map_err(|err| {
            tracing::warn!(error = %format_args!("{err:#}"), "refusing a request: Redis is unavailable");
            ApiError::unavailable(
                "the status store is unavailable; the request was not accepted, try again",
                1,
            )
        })?;
    if let Err(err) = state.publisher.publish(&request).await {
        if err.is_ambiguous()
            && withdraw(&state, &request).await == Some(Withdrawal::AlreadyDecided)
        {
            tracing::info!("unconfirmed publish was stored and decided after all: accepted");
        } else {
            state.statuses.forget(request.transaction_id).await;
            return Err(publish_error(err));
        }
    }

    let location = format!("/api/v1/transaction/{}", request.transaction_id);
    let accepted = Accepted {
        transaction_id: request.transaction_id,
        status: Status::Pending,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(accepted),
    )
        .into_response())
}

/// Withdraws a request whose publish may have reached the broker unconfirmed (see
/// [`stored::withdraw`]). `None` if the database could not be asked: the 503 then stays
/// ambiguous, the one case where a refused request may still be decided.
async fn withdraw(state: &AppState, request: &PurchaseRequest) -> Option<Withdrawal> {
    let partition = state.publisher.partition_of(request.product_id);
    match stored::withdraw(&state.pool, request, partition, SystemClock.now()).await {
        Ok(withdrawal) => Some(withdrawal),
        Err(err) => {
            tracing::error!(error = %err, "could not withdraw an unconfirmed request; it may still be decided");
            None
        }
    }
}

fn publish_error(err: PublishError) -> ApiError {
    tracing::warn!(error = %err, "refusing a request: the broker did not confirm it");
    match err {
        PublishError::QueueFull => ApiError::unavailable(
            "too many pending orders for this product's partition; the request was not accepted, try again",
            1,
        ),
        PublishError::Timeout
        | PublishError::Disconnected
        | PublishError::Unreachable(_)
        | PublishError::ConfirmLost(_) => ApiError::unavailable(
            "the order queue is unavailable; the request was not accepted, try again",
            2,
        ),
        PublishError::Unroutable(queue) => {
            ApiError::Internal(anyhow::anyhow!("queue {queue} does not exist"))
        }
    }
}

/// The status of a transaction: from Redis, or from PostgreSQL when Redis has none (or is
/// down). 404 only when neither knows it and Redis answered; if Redis is down and the
/// database has no decided row, the transaction may still be pending, so 503.
#[utoipa::path(get, path = "/api/v1/transaction/{id}", tag = crate::openapi::ORDERS,
    params(("id" = uuid::Uuid, Path, description = "The transaction id")),
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
        not decided yet: try again.")]
#[tracing::instrument(skip_all, fields(transaction_id = %raw_id))]
pub async fn get_transaction(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
) -> Result<Json<TransactionView>, ApiError> {
    let id = extract::transaction_id(&raw_id)?;
    let redis_answered = match state.statuses.get(id).await {
        Ok(Some(view)) => return Ok(Json(view)),
        Ok(None) => true,
        Err(err) => {
            tracing::warn!(error = %format_args!("{err:#}"), "Redis unavailable; reading the status from PostgreSQL");
            false
        }
    };
    match stored::fetch_one(&state.pool, id).await? {
        Some(row) => Ok(Json(row.to_view()?)),
        None if redis_answered => Err(ApiError::NotFound(format!("no transaction {id}"))),
        None => Err(ApiError::unavailable(
            "the status store is unavailable; try again",
            1,
        )),
    }
}
