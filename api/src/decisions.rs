//! Decisions pushed, not polled. The worker announces each committed batch's statuses on a Redis
//! channel ([`decisions_channel`]); a listener task of the API receives them and wakes whoever
//! waits on those ids: a request with `Prefer: wait=N`, an SSE watcher, a checkout or cancel
//! waiting for its decision. A status that is not the one waited for (a hold granted, when the
//! watcher waits for its end) wakes the waiter, which registers again.
//!
//! Notifications only make answers come sooner; the store stays the truth. A waiter re-reads
//! the store every [`RECHECK_LISTENING`] while the listener is subscribed, every
//! [`RECHECK_DEAF`] while it is not (Redis restarting), and once more at its deadline, so a lost
//! notification delays an answer and never changes it.

use crate::state::AppState;
use allot_shared::status_store::decisions_channel;
use allot_shared::{Status, TransactionId, TransactionView};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How often a waiter re-reads the store while notifications flow.
pub const RECHECK_LISTENING: Duration = Duration::from_secs(1);
/// How often a waiter re-reads the store while the listener is not subscribed.
pub const RECHECK_DEAF: Duration = Duration::from_millis(100);
/// The longest `Prefer: wait=N` honoured, in seconds.
pub const MAX_WAIT_SECS: u64 = 10;

/// Who waits on which transaction, and whether notifications arrive.
#[derive(Default)]
pub struct Decisions {
    waiters: Mutex<HashMap<TransactionId, Vec<oneshot::Sender<TransactionView>>>>,
    listening: AtomicBool,
}

/// One waiter's registration; dropping it unregisters.
pub struct Waiter {
    decisions: Arc<Decisions>,
    id: TransactionId,
    decided: Option<oneshot::Receiver<TransactionView>>,
}

impl Decisions {
    /// Registers interest in `id`'s decision. Register before the store is read (or the request
    /// published), so that no notification can slip between the two.
    pub fn wait_for(self: &Arc<Self>, id: TransactionId) -> Waiter {
        Waiter {
            decisions: self.clone(),
            id,
            decided: Some(self.register(id)),
        }
    }

    fn register(&self, id: TransactionId) -> oneshot::Receiver<TransactionView> {
        let (sender, receiver) = oneshot::channel();
        self.lock().entry(id).or_default().push(sender);
        receiver
    }

    /// Whether the listener is subscribed.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TransactionId, Vec<oneshot::Sender<TransactionView>>>>
    {
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes the waiters of every final view in `payload` (one announcement: a JSON array).
    fn announce(&self, payload: &[u8]) {
        if self.lock().is_empty() {
            return; // nobody waits: not even worth parsing
        }
        let views: Vec<TransactionView> = match serde_json::from_slice(payload) {
            Ok(views) => views,
            Err(err) => {
                tracing::warn!(error = %err, "ignoring an unreadable decision announcement");
                return;
            }
        };
        let mut waiters = self.lock();
        for view in views {
            if view.status == Status::Pending {
                continue;
            }
            if let Some(senders) = waiters.remove(&view.transaction_id) {
                for sender in senders {
                    let _ = sender.send(view.clone());
                }
            }
        }
    }

    /// Listens for announcements on `prefix`'s channel for as long as the API runs,
    /// resubscribing with a capped backoff when the connection drops.
    pub fn spawn_listener(
        self: Arc<Self>,
        client: redis::Client,
        prefix: &str,
    ) -> tokio::task::JoinHandle<()> {
        let channel = decisions_channel(prefix);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            self.listening.store(true, Ordering::Relaxed);
                            pause = Duration::from_millis(100);
                            let mut messages = pubsub.into_on_message();
                            while let Some(message) = messages.next().await {
                                self.announce(message.get_payload_bytes());
                            }
                            self.listening.store(false, Ordering::Relaxed);
                            tracing::warn!("lost the decision notifications; resubscribing");
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "could not subscribe to decision notifications")
                        }
                    },
                    Err(err) => {
                        tracing::warn!(error = %err, retry_in = ?pause, "decision notifications unavailable; retrying")
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        })
    }
}

/// What woke a waiter.
#[derive(Debug)]
pub enum Wake {
    /// A notification: the transaction as announced.
    Notified(Box<TransactionView>),
    /// Time to re-read the store (a notification may have been lost), or the deadline.
    Recheck,
    /// The server is shutting down.
    Stopped,
}

impl Waiter {
    /// The transaction waited on.
    pub fn transaction_id(&self) -> TransactionId {
        self.id
    }

    /// Waits until the transaction is decided (no longer `pending`: held, or final), or
    /// `deadline` (`None`).
    pub async fn until_decided(
        mut self,
        state: &AppState,
        deadline: Instant,
    ) -> Option<TransactionView> {
        self.until(state, deadline, |view| view.status != Status::Pending)
            .await
    }

    /// Waits until the transaction's status satisfies `done` (its view), or `deadline`
    /// (`None`), re-reading the store as the module documentation says.
    pub async fn until(
        &mut self,
        state: &AppState,
        deadline: Instant,
        done: impl Fn(&TransactionView) -> bool,
    ) -> Option<TransactionView> {
        loop {
            match self.next(state, deadline).await {
                Wake::Notified(view) if done(&view) => return Some(*view),
                Wake::Stopped => return None,
                Wake::Notified(_) | Wake::Recheck => {}
            }
            if let Ok(view) = crate::routes::read_transaction(state, self.id).await
                && done(&view)
            {
                return Some(view);
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Waits for the next notification about the transaction, or the next time to re-read the
    /// store ([`RECHECK_LISTENING`], [`RECHECK_DEAF`], or `deadline`, whichever comes first).
    /// After a notification the waiter is registered again, for the next one.
    pub async fn next(&mut self, state: &AppState, deadline: Instant) -> Wake {
        let recheck = if self.decisions.is_listening() {
            RECHECK_LISTENING
        } else {
            RECHECK_DEAF
        };
        let wake = (Instant::now() + recheck).min(deadline);
        let notified = async {
            match self.decided.as_mut() {
                Some(receiver) => receiver.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            view = notified => match view {
                Some(view) => {
                    self.decided = Some(self.decisions.register(self.id));
                    Wake::Notified(Box::new(view))
                }
                None => {
                    self.decided = None;
                    Wake::Recheck
                }
            },
            () = tokio::time::sleep_until(wake) => Wake::Recheck,
            () = state.shutdown.cancelled() => Wake::Stopped,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self.decisions.lock();
        if let Some(senders) = waiters.get_mut(&self.id) {
            senders.retain(|sender| !sender.is_closed());
            if senders.is_empty() {
                waiters.remove(&self.id);
            }
        }
    }
}

/// The `wait` preference of a request (RFC 7240: `Prefer: wait=N`, N in seconds), capped at
/// [`MAX_WAIT_SECS`]; `None` when absent or unreadable (an unknown preference is ignored).
pub fn preferred_wait(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([',', ';']))
        .filter_map(|token| {
            let (name, value) = token.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("wait")
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())?
        })
        .next()
        .map(|secs| secs.min(MAX_WAIT_SECS))
}

/// The `Preference-Applied` header of a wait that was honoured.
pub fn preference_applied(secs: u64) -> (axum::http::HeaderName, axum::http::HeaderValue) {
    (
        axum::http::HeaderName::from_static("preference-applied"),
        axum::http::HeaderValue::from_str(&format!("wait={secs}"))
            .expect("a number is a valid header value"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn prefer(value: &str) -> Option<u64> {
        let mut headers = HeaderMap::new();
        headers.insert("prefer", value.parse().unwrap());
        preferred_wait(&headers)
    }

    #[test]
    fn reads_the_wait_preference() {
        assert_eq!(prefer("wait=5"), Some(5));
        assert_eq!(prefer("respond-async, wait=3"), Some(3));
        assert_eq!(prefer("handling=lenient; wait = 2"), Some(2));
        assert_eq!(prefer("wait=600"), Some(MAX_WAIT_SECS));
        assert_eq!(prefer("wait=soon"), None);
        assert_eq!(prefer("respond-async"), None);
        assert_eq!(preferred_wait(&HeaderMap::new()), None);
    }
}
