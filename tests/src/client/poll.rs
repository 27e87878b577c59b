//! Following many accepted transactions over HTTP until each is final (or a deadline passed),
//! as a crowd of clients would.

use super::{Api, Transaction};
use futures::StreamExt as _;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::{Instant, sleep_until, timeout_at};
use uuid::Uuid;

/// Pause between two polling rounds over the still-pending transactions.
const POLL_PAUSE: Duration = Duration::from_millis(100);

/// What polling saw.
#[derive(Debug, Default)]
pub struct Polled {
    /// Decided transactions by id.
    pub finals: HashMap<Uuid, Transaction>,
    /// Transactions not seen decided before the deadline.
    pub pending: Vec<Uuid>,
    /// For transactions whose last poll failed: why.
    pub last_errors: HashMap<Uuid, String>,
    /// Time from `since` until every transaction was seen decided.
    pub all_decided_after: Option<Duration>,
}

/// Polls the still-pending transactions round after round (at most `max_in_flight` requests at
/// once), with a short pause between rounds, until all are decided or `deadline` passed.
pub async fn poll_until_final(
    api: &Api,
    ids: Vec<Uuid>,
    max_in_flight: usize,
    since: Instant,
    deadline: Instant,
) -> Polled {
    let mut polled = Polled {
        pending: ids,
        ..Polled::default()
    };
    while !polled.pending.is_empty() && Instant::now() < deadline {
        poll_round(api, &mut polled, max_in_flight, deadline).await;
        if !polled.pending.is_empty() {
            sleep_until((Instant::now() + POLL_PAUSE).min(deadline)).await;
        }
    }
    if polled.pending.is_empty() {
        polled.all_decided_after = Some(since.elapsed());
    }
    polled
}

/// Polls every pending transaction once (never past the deadline) and moves the decided ones
/// to `finals`.
async fn poll_round(api: &Api, polled: &mut Polled, max_in_flight: usize, deadline: Instant) {
    let mut answers = futures::stream::iter(polled.pending.clone())
        .map(|id| async move { (id, api.transaction(id).await) })
        .buffer_unordered(max_in_flight);
    while let Ok(Some((id, answer))) = timeout_at(deadline, answers.next()).await {
        match answer {
            Ok(transaction) => {
                polled.last_errors.remove(&id);
                if transaction.is_final() {
                    polled.finals.insert(id, transaction);
                }
            }
            Err(error) => {
                polled.last_errors.insert(id, format!("{error:#}"));
            }
        }
    }
    polled.pending.retain(|id| !polled.finals.contains_key(id));
}
