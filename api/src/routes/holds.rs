//! Settling a hold: `POST /api/v1/transaction/{id}/checkout` and `.../cancel`, by the holder
//! (its token, or anonymously by id as reads are) or staff.
//!
//! Neither changes anything here: each is a [`Command`] published to the hold's partition
//! queue, through the same intake as purchases, and decided by the partition's serial consumer
//! in the same database transaction, under the same row locks, as the requests that took the
//! hold's units (see the worker's `core`). So a checkout and the hold's expiry (or a cancel)
//! are decided once, in the order the consumer takes them, and a unit is never both released
//! and sold. The handler then waits for the decision (the hold's notification, with the usual
//! re-reads), reads what the command did from `hold_commands` and answers it:
//!
//! - `200` with the transaction: `succeeded` with its order number (checkout), or `rejected`
//!   `cancelled` (cancel);
//! - `409 hold_expired`: the hold expired before the command was decided (its units went back);
//! - `409 not_held`: the transaction was not held (still pending, already checked out or
//!   cancelled by an earlier command, or not a hold);
//! - `202` with `Location` if the decision takes longer than the wait (`Prefer: wait=N`, 10 s
//!   without it): the command is stored and will be decided; follow the transaction.

use crate::buyers::{self, Caller};
use crate::decisions::{MAX_WAIT_SECS, Wake, preference_applied, preferred_wait};
use crate::error::{ApiError, ErrorBody};
use crate::extract;
use crate::routes::{Accepted, read_transaction};
use crate::state::AppState;
use allot_shared::{
    Command, CommandId, CommandKind, CommandOutcome, RejectReason, Status, TransactionId,
    TransactionView, stored,
};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tokio::time::Instant;

#[utoipa::path(post, path = "/api/v1/transaction/{id}/checkout", tag = crate::openapi::HOLDS,
    summary = "Check out a hold: confirm it, with its order number",
    description = "Confirms a `held` transaction (one bought with `hold_seconds`): it becomes `succeeded` and gets its \
        order number now, if its `expires_at` has not passed when the worker decides the checkout. The checkout is decided \
        in the hold's serial path, against its expiry and any cancel: once, either way. By the holder (its token; anonymous \
        holds by anyone holding the id, as reads) or staff. No body. The answer waits for the decision, up to `Prefer: wait=N` \
        (10 s without it): `200` with the succeeded transaction; `409 hold_expired` if the hold expired first (its units \
        are back on sale); `409 not_held` if it is not held (still `pending`, already checked out or cancelled, or not a \
        hold; the message says its status); `202` with `Location` if the decision takes longer than the wait: the checkout \
        is stored and will be decided, follow the transaction. `503`: not accepted, nothing changed; retry.",
    params(("id" = uuid::Uuid, Path, description = "The held transaction's id"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): wait for the decision at most N seconds (capped at 10; 10 without it); `wait=0` answers `202` as soon as the checkout is stored")),
    security((), ("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Checked out: the transaction, `succeeded` with its order number", body = TransactionView),
        (status = 202, description = "Stored, not decided within the wait: follow the transaction", body = Accepted,
            headers(("location" = String, description = "/api/v1/transaction/{id}"))),
        (status = 400, description = "`invalid_id`: not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid, or no token while `ALLOT_ANONYMOUS_BUYERS` is false", body = ErrorBody),
        (status = 404, description = "`not_found`: no such transaction, or another buyer's", body = ErrorBody),
        (status = 409, description = "`hold_expired`: the hold expired first; or `not_held`: the transaction is not held (its status in the message)", body = ErrorBody),
        (status = 503, description = "Not accepted, nothing changed: retry after `Retry-After`. The code says why: `queue_full` (the hold's partition queue is at its bound), `broker_unavailable` (RabbitMQ unreachable or did not confirm in time), `redis_unavailable` (Redis unreachable: the status store or the shared queue bound), `timeout` (the request took longer than the server's request timeout)", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(transaction_id = %raw_id))]
pub async fn checkout(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    settle(&state, &caller, &raw_id, &headers, CommandKind::Checkout).await
}

#[utoipa::path(post, path = "/api/v1/transaction/{id}/cancel", tag = crate::openapi::HOLDS,
    summary = "Cancel a hold: give its units back",
    description = "Releases a `held` transaction: it becomes `rejected` with reason `cancelled`, and its units (and its \
        slot's place) are back on sale. Decided in the hold's serial path, once, against a checkout or the expiry. By the \
        holder or staff. No body. Answers like checkout: `200` with the cancelled transaction, `409 hold_expired` if it \
        expired first (its units are back all the same), `409 not_held` if it is not held, `202` if the decision takes \
        longer than the wait.",
    params(("id" = uuid::Uuid, Path, description = "The held transaction's id"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): wait for the decision at most N seconds (capped at 10; 10 without it)")),
    security((), ("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Cancelled: the transaction, `rejected` with reason `cancelled`", body = TransactionView),
        (status = 202, description = "Stored, not decided within the wait: follow the transaction", body = Accepted,
            headers(("location" = String, description = "/api/v1/transaction/{id}"))),
        (status = 400, description = "`invalid_id`: not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid, or no token while `ALLOT_ANONYMOUS_BUYERS` is false", body = ErrorBody),
        (status = 404, description = "`not_found`: no such transaction, or another buyer's", body = ErrorBody),
        (status = 409, description = "`hold_expired`: the hold expired first; or `not_held`: the transaction is not held (its status in the message)", body = ErrorBody),
        (status = 503, description = "Not accepted, nothing changed: retry after `Retry-After`. The code says why: `queue_full` (the hold's partition queue is at its bound), `broker_unavailable` (RabbitMQ unreachable or did not confirm in time), `redis_unavailable` (Redis unreachable: the status store or the shared queue bound), `timeout` (the request took longer than the server's request timeout)", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(transaction_id = %raw_id))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    settle(&state, &caller, &raw_id, &headers, CommandKind::Cancel).await
}

/// The path of a checkout or cancel; see the module documentation.
async fn settle(
    state: &AppState,
    caller: &Caller,
    raw_id: &str,
    headers: &HeaderMap,
    kind: CommandKind,
) -> Result<Response, ApiError> {
    let id = extract::transaction_id(raw_id)?;
    if let Caller::Anonymous = caller {
        buyers::require_anonymous_allowed(state)?;
    }
    let view = read_transaction(state, id).await?;
    buyers::authorize_read(state, caller, id, view.user_id)?;
    if view.status != Status::Held {
        return Err(not_settleable(&view));
    }
    let route = view
        .lines()
        .iter()
        .map(|line| line.product_id)
        .min()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("held transaction {id} has no line")))?;
    let prefer = preferred_wait(headers);
    let wait = Duration::from_secs(prefer.unwrap_or(MAX_WAIT_SECS));
    let command = Command {
        kind,
        command_id: CommandId::new(),
        transaction_id: id,
        created_at: state.clock.now(),
    };
    let command_id = command.command_id;
    // Registered before the publish, so the decision cannot be announced before we listen.
    let mut waiter = state.decisions.wait_for(id);
    state
        .intake
        .accept_command(command, route)
        .await
        .map_err(super::orders::refusal_error)?;
    tracing::info!(%command_id, command = kind.as_str(), "hold command accepted");
    let deadline = Instant::now() + wait;
    let decided = loop {
        if let Some(outcome) = decided(state, command_id).await {
            break Some(outcome);
        }
        if Instant::now() >= deadline {
            break None;
        }
        if let Wake::Stopped = waiter.next(state, deadline).await {
            break None;
        }
    };
    let mut response = match decided {
        Some(outcome) => answer(state, id, outcome).await?,
        None => {
            let accepted = Accepted {
                transaction_id: id,
                status: Status::Held,
            };
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, format!("/api/v1/transaction/{id}"))],
                Json(accepted),
            )
                .into_response()
        }
    };
    if let Some(secs) = prefer {
        let (name, value) = preference_applied(secs);
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// What the worker did with the command, once it is recorded (`None` until then, or while the
/// database cannot be read: the wait goes on).
async fn decided(state: &AppState, command: CommandId) -> Option<CommandOutcome> {
    match stored::command_outcome(&state.pool, command).await {
        Ok(outcome) => outcome,
        Err(err) => {
            tracing::warn!(error = %format_args!("{err:#}"), "cannot read a hold command's outcome yet");
            None
        }
    }
}

/// The answer to a decided command: the settled transaction (from PostgreSQL, which has it
/// before Redis does), or why nothing was settled.
async fn answer(
    state: &AppState,
    id: TransactionId,
    outcome: CommandOutcome,
) -> Result<Response, ApiError> {
    let view = stored::fetch_one(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a settled hold {id} is not stored")))?
        .to_view()?;
    match outcome {
        CommandOutcome::Confirmed | CommandOutcome::Cancelled => Ok(Json(view).into_response()),
        CommandOutcome::Expired => Err(expired(id)),
        CommandOutcome::NotHeld | CommandOutcome::Withdrawn => Err(not_settleable(&view)),
    }
}

fn expired(id: TransactionId) -> ApiError {
    ApiError::HoldExpired(format!(
        "the hold {id} expired before it was settled; its units are back on sale"
    ))
}

/// The `409` of a transaction that is not held, naming its status.
fn not_settleable(view: &TransactionView) -> ApiError {
    let id = view.transaction_id;
    match (view.status, view.reason, &view.order_number) {
        (Status::Rejected, Some(RejectReason::Expired), _) => expired(id),
        (Status::Succeeded, _, Some(number)) => ApiError::NotHeld(format!(
            "transaction {id} is succeeded (order {number}), not held"
        )),
        (Status::Rejected, Some(reason), _) => ApiError::NotHeld(format!(
            "transaction {id} is rejected ({}), not held",
            reason.as_str()
        )),
        (status, ..) => {
            ApiError::NotHeld(format!("transaction {id} is {}, not held", status.as_str()))
        }
    }
}
