//! `GET /api/v1/transaction/{id}/events`: watch a transaction instead of polling it. A
//! Server-Sent Events stream that sends the transaction at once (event `status`), again each
//! time its status changes, and ends once it is final. Bounded: it also ends after
//! [`WATCH_LIMIT`] or when the server shuts down; a client (EventSource) then reconnects.
//!
//! The stream reads the same store as `GET /api/v1/transaction/{id}`, every [`CHECK_EVERY`]:
//! one Redis `GET` per watcher and check, cheap next to the polling it replaces.

use crate::error::{ApiError, ErrorBody};
use crate::routes::orders;
use crate::state::AppState;
use allot_shared::{Status, TransactionId, TransactionView};
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use std::time::Duration;
use tokio::time::Instant;

/// The longest one stream lasts.
pub const WATCH_LIMIT: Duration = Duration::from_secs(60);
/// How often the status is read while it is pending.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

#[utoipa::path(get, path = "/api/v1/transaction/{id}/events", tag = crate::openapi::ORDERS,
    summary = "Watch a purchase request until it is final (Server-Sent Events)",
    params(("id" = uuid::Uuid, Path, description = "The transaction id")),
    responses(
        (status = 200, description = "A stream of Server-Sent Events (`text/event-stream`), not one JSON document. \
            Each event is `event: status` with one `data:` line holding the transaction as JSON (the `TransactionView` \
            schema, as `GET /api/v1/transaction/{id}` answers it): one at once, another each time the status changes. \
            The stream ends after the final status, or after 60 s (an `EventSource` then reconnects); comment lines \
            (`:`) keep the connection alive.",
            content_type = "text/event-stream", body = String,
            example = json!("event: status\ndata: {\"transaction_id\":\"0191b3c4-8f2e-7000-8000-000000000000\",\"status\":\"succeeded\",\"user_id\":7,\"product_id\":1,\"quantity\":1,\"order_number\":\"20261122-00001\",\"created_at\":\"2026-11-22T02:28:41.098247Z\",\"decided_at\":\"2026-11-22T02:28:41.106334Z\"}\n\n")),
        (status = 400, description = "`invalid_id`: not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: allot never accepted this id", body = ErrorBody),
        (status = 503, description = "`unavailable`: Redis is down and the transaction is not decided", body = ErrorBody),
    ))]
pub async fn transaction_events(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, axum::Error>>>, ApiError> {
    // Errors (bad id, unknown id) are answered before the stream starts, as plain JSON errors.
    let first = lookup(&state, &raw_id).await?;
    let watch = Watch {
        deadline: Instant::now() + WATCH_LIMIT,
        id: first.transaction_id,
        last: None,
        next: Some(first),
        state,
    };
    Ok(
        Sse::new(futures::stream::unfold(watch, Watch::next_event))
            .keep_alive(KeepAlive::default()),
    )
}

/// One watcher's progress.
struct Watch {
    state: AppState,
    id: TransactionId,
    /// The view to send next, if already known.
    next: Option<TransactionView>,
    /// The last status sent; `Some(final)` ends the stream.
    last: Option<Status>,
    deadline: Instant,
}

impl Watch {
    /// The next `status` event: the next view whose status differs from the last one sent.
    async fn next_event(mut self) -> Option<(Result<Event, axum::Error>, Self)> {
        if self.last.is_some_and(|status| status != Status::Pending) {
            return None;
        }
        loop {
            if let Some(view) = self.next.take()
                && Some(view.status) != self.last
            {
                self.last = Some(view.status);
                let event = Event::default()
                    .event("status")
                    .json_data(&view)
                    .map_err(axum::Error::new);
                return Some((event, self));
            }
            tokio::select! {
                () = self.state.shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(self.deadline) => return None,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            // A failed read (Redis down, transaction still pending) is retried at the next check.
            self.next = lookup(&self.state, &self.id.to_string()).await.ok();
        }
    }
}

/// The transaction as `GET /api/v1/transaction/{id}` answers it.
async fn lookup(state: &AppState, raw_id: &str) -> Result<TransactionView, ApiError> {
    orders::get_transaction(State(state.clone()), Path(raw_id.to_owned()))
        .await
        .map(|json| json.0)
}
