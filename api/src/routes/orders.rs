//! Buying: `POST /api/v1/order/addToCart` and `GET /api/v1/transaction/{id}`; [`accept`], the
//! path every request to buy takes once validated and its buyer resolved (addToCart, and orders
//! of several products in [`super::baskets`]), with or without an `Idempotency-Key`.

use crate::buyers::{self, Caller, pending};
use crate::catalogue::FinalAnswer;
use crate::decisions::{Waiter, preference_applied, preferred_wait};
use crate::error::{ApiError, ErrorBody, Unavailability};
use crate::extract::{self, AppJson};
use crate::idempotency::{self, Failed, Fingerprint, IdempotencyKey, Remembered, Settled};
use crate::intake::Refusal;
use crate::state::AppState;
use allot_shared::stored;
use allot_shared::{
    HoldSeconds, Order, ProductId, PurchaseRequest, Quantity, SlotId, Status, TransactionId,
    TransactionView, UserId,
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
    /// The buyer: 1 to 10^15 - 1 without a token (an anonymous buyer, while
    /// `ALLOT_ANONYMOUS_BUYERS` is true); with a buyer's token leave it out, or send the
    /// token's account id (10^15 and up; another id is `403`); with the staff token any buyer.
    #[serde(default)]
    #[schema(value_type = Option<i64>, format = Int64, minimum = 1, maximum = 999_999_999_999_999_i64)]
    pub user_id: Option<UserId>,
    pub product_id: ProductId,
    pub quantity: Quantity,
    /// Hold the units for this many seconds instead of buying them at once: 1 to this server's
    /// `ALLOT_MAX_HOLD_SECONDS`. The transaction is then `held` (no order number yet) until it
    /// is checked out (`POST /api/v1/transaction/{id}/checkout`), cancelled, or expires.
    #[serde(default)]
    #[schema(value_type = Option<i64>, format = Int64, minimum = 1, maximum = 3600)]
    pub hold_seconds: Option<i64>,
    /// A capacity counter (delivery slot, `GET /api/v1/slots`) to take one place of as well,
    /// all or nothing.
    #[serde(default)]
    #[schema(value_type = Option<i64>, format = Int64, minimum = 1)]
    pub slot_id: Option<SlotId>,
}

/// Checks a request's `hold_seconds` (1 to `ALLOT_MAX_HOLD_SECONDS`).
pub fn hold_of(
    state: &AppState,
    hold_seconds: Option<i64>,
) -> Result<Option<HoldSeconds>, ApiError> {
    let Some(secs) = hold_seconds else {
        return Ok(None);
    };
    if !(1..=state.max_hold_seconds).contains(&secs) {
        return Err(ApiError::InvalidBody(format!(
            "hold_seconds must be between 1 and {}, got {secs}",
            state.max_hold_seconds
        )));
    }
    HoldSeconds::try_from(secs)
        .map(Some)
        .map_err(ApiError::InvalidBody)
}

/// Checks that `slot` exists (one primary-key read, only for orders that name a slot):
/// `422 unknown_slot` if not, `503` if the database cannot say. Whether it has a place left, or
/// has ended, is the worker's to decide, under the slot's row lock.
pub async fn check_slot(state: &AppState, slot: Option<SlotId>) -> Result<(), ApiError> {
    let Some(slot) = slot else {
        return Ok(());
    };
    let found: Option<i64> = sqlx::query_scalar("SELECT id FROM slots WHERE id = $1")
        .bind(slot.get())
        .fetch_optional(&state.pool)
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "cannot check a slot: the database is unavailable");
            ApiError::unavailable(
                Unavailability::DatabaseUnavailable,
                "the database is unavailable; the request was not accepted, try again",
                1,
            )
        })?;
    match found {
        Some(_) => Ok(()),
        None => Err(ApiError::UnknownSlot(format!("no slot {slot}"))),
    }
}

/// The 202 answer: the id to poll.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Accepted {
    pub transaction_id: TransactionId,
    pub status: Status,
}

/// The operation names an `Idempotency-Key`'s [`Fingerprint`] is taken under: one key used on
/// both endpoints is two different requests (`422 idempotency_key_reused`).
pub const ADD_TO_CART: &str = "addToCart";
/// See [`ADD_TO_CART`].
pub const ORDERS: &str = "orders";

/// Validates, resolves the buyer ([`buyers::resolve`]), then [`accept`]s: a request for a
/// product sold out, outside its sale window or paused is answered at once with its final
/// outcome (see [`crate::catalogue`]); otherwise the [`crate::intake`] answers once the broker
/// confirmed the message that carries it (202), or refused it (503 with `Retry-After`; nothing
/// was accepted). With `Prefer: wait=N` an accepted request's answer is held until it is decided
/// (200 with the final transaction) or N seconds passed (202).
#[utoipa::path(post, path = "/api/v1/order/addToCart", tag = crate::openapi::ORDERS,
    request_body = AddToCart,
    params(("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): hold the answer until the transaction is final, at most N seconds (capped at 10)"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 257, description = "A key for safe retries (IETF httpapi draft): 1 to 255 printable ASCII characters, bare or as a quoted string (`\"...\"`). The same key with the same request from the same buyer makes one transaction and gets the same answer for 24 hours (marked `Idempotent-Replayed: true`); with another request, `422 idempotency_key_reused`; while the first is still being accepted, `409 idempotency_key_in_flight`. A refused attempt (`503`) leaves the key free.")),
    security((), ("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Final at once: sold out, or outside the product's sale window, or paused (rejected `out_of_stock`, `not_started`, `ended` or `paused`; nothing recorded; a `FinalAnswer`), or, with `Prefer: wait`, the transaction decided within the wait (a `TransactionView`, with `Preference-Applied`)", body = FinalAnswer,
            headers(("idempotent-replayed" = String, description = "`true` on the answer of an earlier request with the same `Idempotency-Key`"))),
        (status = 202, description = "Accepted: RabbitMQ confirmed the request; poll the transaction", body = Accepted,
            headers(("location" = String, description = "/api/v1/transaction/{id}"),
                ("idempotent-replayed" = String, description = "`true` on the answer of an earlier request with the same `Idempotency-Key`"))),
        (status = 400, description = "`malformed_json`, or `invalid_idempotency_key` (empty, longer than 255 characters, not printable ASCII, or sent twice)", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid (forged, expired, revoked), or no token while `ALLOT_ANONYMOUS_BUYERS` is false", body = ErrorBody),
        (status = 403, description = "`user_mismatch`: the body's `user_id` is not the token's account", body = ErrorBody),
        (status = 409, description = "`idempotency_key_in_flight`: a request with this `Idempotency-Key` is still being accepted; retry after `Retry-After`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: missing, unknown or out-of-range field (an account's `user_id`, 10^15 and up, without its token); or `idempotency_key_reused`: this `Idempotency-Key` came with another request", body = ErrorBody),
        (status = 503, description = "Not accepted: retry after `Retry-After`. The code says why: `queue_full` (the product's partition queue is at its bound), `broker_unavailable` (RabbitMQ unreachable or did not confirm in time), `redis_unavailable` (Redis unreachable: the status store, the shared queue bound or the Idempotency-Key store), `database_unavailable` (PostgreSQL unreachable while a named slot or the retry of an Idempotency-Key is looked up), `timeout` (the request took longer than the server's request timeout)", body = ErrorBody),
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
        final transaction and `Preference-Applied`, or the usual `202` once N seconds passed. \
        Who buys: the token's account with a buyer's token (`Authorization: Bearer <token>` from \
        `POST /api/v1/auth/login`); without a token the body's `user_id`, while `ALLOT_ANONYMOUS_BUYERS` is true \
        (else `401`). With `Idempotency-Key`, a retry of the same request makes no second transaction.")]
#[tracing::instrument(skip_all, fields(product_id = %body.product_id, transaction_id))]
pub async fn add_to_cart(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<AddToCart>,
) -> Result<Response, ApiError> {
    if body.quantity.get() > state.max_quantity {
        return Err(ApiError::InvalidBody(format!(
            "quantity must be at most {}, got {}",
            state.max_quantity, body.quantity
        )));
    }
    let hold = hold_of(&state, body.hold_seconds)?;
    let user_id = buyers::resolve(&state, &caller, body.user_id)?;
    check_slot(&state, body.slot_id).await?;
    let request = PurchaseRequest {
        transaction_id: TransactionId::new(),
        user_id,
        product_id: body.product_id,
        quantity: body.quantity,
        created_at: state.clock.now(),
    };
    let mut order = Order::from(request);
    order.hold = hold;
    order.slot = body.slot_id;
    accept(&state, &headers, ADD_TO_CART, order).await
}

/// The path of a validated request to buy, for addToCart and orders alike (`operation` is
/// [`ADD_TO_CART`] or [`ORDERS`]), once its buyer is resolved: answered at once if the
/// catalogue snapshot knows it cannot be served (`200`, final, nothing recorded); otherwise
/// accepted through the intake (`202` with `Location`, or `503`), and with `Prefer: wait=N`
/// held until it is decided (`200` with the transaction) or N seconds passed. With an
/// `Idempotency-Key` all of it runs at most once per key, buyer and request ([`accept_once`]).
///
/// An anonymous request without a key does no I/O here but the intake's: the key and the
/// buyer's kind are read from what the request carries.
pub async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    operation: &'static str,
    mut order: Order,
) -> Result<Response, ApiError> {
    let wait = preferred_wait(headers);
    state.catalogue.assign_shard(&mut order);
    if let Some(key) = idempotency::key_of(headers)? {
        return accept_once(state, key, operation, order, wait).await;
    }
    if let Some((product, reason)) = state.catalogue.refusal(&order) {
        let answer = FinalAnswer::new(&order, reason, product);
        return Ok((StatusCode::OK, Json(answer)).into_response());
    }
    let id = order.transaction_id;
    tracing::Span::current().record("transaction_id", tracing::field::display(id));
    // Registered before the publish, so the decision cannot be announced before we listen.
    let waiter = wait.map(|_| state.decisions.wait_for(id));
    send(state, order).await.map_err(refusal_error)?;
    answer_accepted(state, id, wait, waiter, false).await
}

/// [`accept`] with an `Idempotency-Key`: the same answer for the same request (the same
/// operation and lines; the buyer scopes the key), one transaction at most (see
/// [`crate::idempotency`]).
async fn accept_once(
    state: &AppState,
    key: IdempotencyKey,
    operation: &'static str,
    order: Order,
    wait: Option<u64>,
) -> Result<Response, ApiError> {
    // A request without a hold or a slot keeps the fingerprint it had before they existed.
    let fingerprint = match (order.hold, order.slot) {
        (None, None) => Fingerprint::of(operation, &order.lines.as_slice()),
        (hold, slot) => Fingerprint::of(operation, &(order.lines.as_slice(), hold, slot)),
    };
    let (user_id, candidate) = (order.user_id, order.transaction_id);
    let waiter = wait.map(|_| state.decisions.wait_for(candidate));
    let work_state = state.clone();
    let settled = idempotency::once(
        state,
        user_id,
        key,
        fingerprint,
        candidate,
        move |attempt| async move {
            let mut order = order;
            // Only a first attempt may answer at once: a retaken one may have reached the
            // broker already, and must go the same way again.
            if attempt.first
                && let Some((product, reason)) = work_state.catalogue.refusal(&order)
            {
                let answer = FinalAnswer::new(&order, reason, product);
                let json = serde_json::to_string(&answer).map_err(anyhow::Error::from);
                let json = json.map_err(|err| Failed::nothing_sent(err.into()))?;
                return Ok(Remembered::Final(json));
            }
            order.transaction_id = attempt.transaction_id;
            send(&work_state, order).await.map_err(|refusal| Failed {
                nothing_sent: nothing_sent(&refusal),
                error: refusal_error(refusal),
            })?;
            Ok(Remembered::Accepted(attempt.transaction_id))
        },
    )
    .await?;
    answer_settled(state, settled, wait, waiter).await
}

/// The answer of a keyed request, fresh or replayed.
async fn answer_settled(
    state: &AppState,
    settled: Settled,
    wait: Option<u64>,
    waiter: Option<Waiter>,
) -> Result<Response, ApiError> {
    let (remembered, replayed) = match settled {
        Settled::Fresh(remembered) => (remembered, false),
        Settled::Replayed(remembered) => (remembered, true),
    };
    match remembered {
        Remembered::Final(json) => {
            let mut response = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response();
            if replayed {
                mark_replayed(&mut response);
            }
            Ok(response)
        }
        Remembered::Accepted(id) => {
            tracing::Span::current().record("transaction_id", tracing::field::display(id));
            // The waiter was registered on the candidate id; a replayed or retaken id needs
            // its own (a notification missed meanwhile is caught by the waiter's re-reads).
            let waiter = match waiter {
                Some(waiter) if waiter.transaction_id() == id => Some(waiter),
                _ => wait.map(|_| state.decisions.wait_for(id)),
            };
            answer_accepted(state, id, wait, waiter, replayed).await
        }
    }
}

/// `202` with the transaction's `Location`, or with `Prefer: wait` its final state (`200`)
/// if it is decided within the wait.
async fn answer_accepted(
    state: &AppState,
    id: TransactionId,
    wait: Option<u64>,
    waiter: Option<Waiter>,
    replayed: bool,
) -> Result<Response, ApiError> {
    if let (Some(secs), Some(waiter)) = (wait, waiter) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        // A replayed transaction may be decided long since: no need to wait for a re-read.
        let decided = match replayed {
            true => read_transaction(state, id)
                .await
                .ok()
                .filter(|view| view.status != Status::Pending),
            false => None,
        };
        let decided = match decided {
            Some(view) => Some(view),
            None => waiter.until_decided(state, deadline).await,
        };
        if let Some(view) = decided {
            let mut response =
                (StatusCode::OK, [preference_applied(secs)], Json(view)).into_response();
            if replayed {
                mark_replayed(&mut response);
            }
            return Ok(response);
        }
    }
    let location = format!("/api/v1/transaction/{id}");
    let accepted = Accepted {
        transaction_id: id,
        status: Status::Pending,
    };
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(accepted),
    )
        .into_response();
    if replayed {
        mark_replayed(&mut response);
    }
    Ok(response)
}

fn mark_replayed(response: &mut Response) {
    response.headers_mut().insert(
        idempotency::REPLAYED.clone(),
        axum::http::HeaderValue::from_static("true"),
    );
}

/// Hands `order` to the intake; an account's purchase is first indexed as pending (for its
/// history), and unindexed if refused. Anonymous purchases do no more than the intake does.
async fn send(state: &AppState, order: Order) -> Result<(), Refusal> {
    let (user, id) = (order.user_id, order.transaction_id);
    if buyers::is_account(user) {
        pending::note(state, user, id).await.map_err(|err| {
            tracing::warn!(error = %format_args!("{err:#}"), "refusing a request: Redis is unavailable");
            Refusal::StoreUnavailable
        })?;
    }
    let accepted = state.intake.accept(order).await;
    if accepted.is_err() {
        pending::forget(state, user, id).await;
    }
    accepted
}

/// Whether nothing of a refused request can have reached the broker (the queue was full, Redis
/// refused first, the queue does not exist); `false` when the broker may have stored it
/// unconfirmed (it was withdrawn, or could not be): see [`Failed`].
fn nothing_sent(refusal: &Refusal) -> bool {
    !matches!(refusal, Refusal::BrokerUnavailable)
}

pub(super) fn refusal_error(refusal: Refusal) -> ApiError {
    let retry_after = refusal.retry_after_secs();
    match refusal {
        Refusal::QueueFull => ApiError::unavailable(
            Unavailability::QueueFull,
            "too many pending orders for this product's partition; the request was not accepted, try again",
            retry_after,
        ),
        Refusal::BrokerUnavailable => ApiError::unavailable(
            Unavailability::BrokerUnavailable,
            "the order queue is unavailable; the request was not accepted, try again",
            retry_after,
        ),
        Refusal::StoreUnavailable => ApiError::unavailable(
            Unavailability::RedisUnavailable,
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
    security((), ("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "The transaction: `pending`, or final with its order number or reason", body = TransactionView),
        (status = 400, description = "`invalid_id`: not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid, or no token while `ALLOT_ANONYMOUS_BUYERS` is false", body = ErrorBody),
        (status = 404, description = "`not_found`: allot never accepted this id, or the caller may not read it (another buyer's; an account's without its token)", body = ErrorBody),
        (status = 503, description = "`redis_unavailable`: Redis is down and the transaction is not decided (or `timeout`); retry after `Retry-After`", body = ErrorBody),
    ),
    summary = "Follow a purchase request",
    description = "The transaction: `pending` until it is decided, then `succeeded` with its order number \
        or `rejected` with its reason, and final from then on. `404` if allot never accepted this id; an id \
        answered `202` never becomes `404`. `503` if the status store is unavailable and the transaction is \
        not decided yet: try again. With `Prefer: wait=N` (at most 10 s) a pending answer is held until the \
        transaction is final or N seconds passed. Who may read it: staff any transaction, a buyer (token) its \
        own, anyone holding the id an anonymous buyer's (while `ALLOT_ANONYMOUS_BUYERS` is true); any other is \
        `404`, like an unknown id.")]
#[tracing::instrument(skip_all, fields(transaction_id = %raw_id))]
pub async fn get_transaction(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = extract::transaction_id(&raw_id)?;
    if let Caller::Anonymous = caller {
        buyers::require_anonymous_allowed(&state)?;
    }
    let Some(secs) = preferred_wait(&headers) else {
        let view = read_transaction(&state, id).await?;
        buyers::authorize_read(&state, &caller, id, view.user_id)?;
        return Ok(Json(view).into_response());
    };
    let waiter = state.decisions.wait_for(id);
    let view = read_transaction(&state, id).await?;
    buyers::authorize_read(&state, &caller, id, view.user_id)?;
    let view = if view.status == Status::Pending {
        let deadline = Instant::now() + Duration::from_secs(secs);
        waiter.until_decided(&state, deadline).await.unwrap_or(view)
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
            Unavailability::RedisUnavailable,
            "the status store is unavailable; try again",
            1,
        )),
    }
}
