//! `GET /api/v1/transaction/{id}/events`: watch a transaction instead of polling it. A
//! Server-Sent Events stream that sends the transaction at once (event `status`), again each
//! time its status changes (a hold: `pending`, `held`, then its end), and ends once it is final.
//! Bounded: it also ends after [`WATCH_LIMIT`] or when the server shuts down; a client
//! (EventSource) then reconnects.
//!
//! The stream is woken by the worker's decision notifications ([`crate::decisions`]), with the
//! same fallback to reading the store as `Prefer: wait`.

use crate::buyers::{self, Caller};
use crate::error::{ApiError, ErrorBody};
use crate::extract;
use crate::routes::read_transaction;
use crate::state::AppState;
use allot_shared::TransactionView;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use std::time::Duration;
use tokio::time::Instant;

/// The longest one stream lasts.
pub const WATCH_LIMIT: Duration = Duration::from_secs(60);

#[utoipa::path(get, path = "/api/v1/transaction/{id}/events", tag = crate::openapi::ORDERS,
    summary = "Watch a purchase request until it is final (Server-Sent Events)",
    params(("id" = uuid::Uuid, Path, description = "The transaction id")),
    security((), ("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "A stream of Server-Sent Events (`text/event-stream`), not one JSON document. \
            Each event is `event: status` with one `data:` line holding the transaction as JSON (the `TransactionView` \
            schema, as `GET /api/v1/transaction/{id}` answers it): one at once, another each time the status changes \
            (a hold shows `held` with its `expires_at`, then `succeeded` or `rejected`). The stream ends after the final \
            status (`succeeded` or `rejected`), or after 60 s (an `EventSource` then reconnects); comment lines \
            (`:`) keep the connection alive.",
            content_type = "text/event-stream", body = String,
            example = json!("event: status\ndata: {\"transaction_id\":\"0191b3c4-8f2e-7000-8000-000000000000\",\"status\":\"succeeded\",\"user_id\":7,\"product_id\":1,\"quantity\":1,\"order_number\":\"20261122-00001\",\"created_at\":\"2026-11-22T02:28:41.098247Z\",\"decided_at\":\"2026-11-22T02:28:41.106334Z\"}\n\n")),
        (status = 400, description = "`invalid_id`: not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid, or no token while `ALLOT_ANONYMOUS_BUYERS` is false", body = ErrorBody),
        (status = 404, description = "`not_found`: allot never accepted this id, or the caller may not read it (as `GET /api/v1/transaction/{id}`)", body = ErrorBody),
        (status = 503, description = "`redis_unavailable`: Redis is down and the transaction is not decided (or `timeout`); retry after `Retry-After`", body = ErrorBody),
    ))]
pub async fn transaction_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw_id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, axum::Error>>>, ApiError> {
    let id = extract::transaction_id(&raw_id)?;
    if let Caller::Anonymous = caller {
        buyers::require_anonymous_allowed(&state)?;
    }
    // Registered before the first read, so the decision cannot slip between the two.
    let waiter = state.decisions.wait_for(id);
    // Errors (unknown id, Redis down) are answered before the stream starts, as JSON errors.
    let first = read_transaction(&state, id).await?;
    buyers::authorize_read(&state, &caller, id, first.user_id)?;
    let deadline = Instant::now() + WATCH_LIMIT;
    let first_event = futures::stream::once(std::future::ready(status_event(&first)));
    // Then every change of status, until a final one (or the deadline).
    let changes = futures::stream::unfold((Some(waiter), first.status), move |(waiter, shown)| {
        let state = state.clone();
        async move {
            let mut waiter = waiter.filter(|_| !shown.is_final())?;
            let view = waiter
                .until(&state, deadline, |view| view.status != shown)
                .await?;
            let status = view.status;
            Some((status_event(&view), (Some(waiter), status)))
        }
    });
    Ok(Sse::new(first_event.chain(changes)).keep_alive(KeepAlive::default()))
}

fn status_event(view: &TransactionView) -> Result<Event, axum::Error> {
    Event::default()
        .event("status")
        .json_data(view)
        .map_err(axum::Error::new)
}
