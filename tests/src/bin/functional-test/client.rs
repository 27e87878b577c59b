//! Releasing all `addToCart` requests of a size at the same moment ([`fire`]) through the kit's
//! client, which judges each answer (a valid `202`, the sold-out answer, or what else it was).

use std::sync::Arc;
use std::time::Duration;

use allot_tests::client::{Answer, Api, Order};
use anyhow::{Context as _, Result};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

pub use allot_tests::client::Polled;

/// The answer to one `addToCart` request.
#[derive(Debug)]
pub struct Accept {
    pub user_id: i64,
    /// The accepted transaction, or why the answer was not a valid `202`.
    pub outcome: Result<Uuid, String>,
    /// The answer was allot's final `out_of_stock` for a product already sold out (`200`,
    /// nothing recorded): a valid outcome, though not an acceptance.
    pub sold_out: bool,
}

/// Result of releasing all requests of one size.
pub struct Fired {
    pub release: Instant,
    pub accepts: Vec<Accept>,
    /// Time from the release until the last request was answered (successfully or not).
    pub last_answer: Duration,
}

/// Prepares one `addToCart` request per user, releases them all at the same moment and collects
/// the answers. At most `max_in_flight` requests are on the wire at once.
pub async fn fire(
    api: &Api,
    product_id: i64,
    user_ids: &[i64],
    max_in_flight: usize,
) -> Result<Fired> {
    let (release_tx, release_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut tasks = JoinSet::new();
    for &user_id in user_ids {
        let order = Order {
            user_id,
            product_id,
            quantity: 1,
        };
        let api = api.clone();
        let mut released = release_rx.clone();
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let (outcome, sold_out) = match submit(&api, order, &mut released, &permits).await {
                Ok(Answer::Accepted(id)) => (Ok(id), false),
                Ok(Answer::SoldOut) => (Err("sold out".to_owned()), true),
                Ok(other) => (Err(other.describe()), false),
                Err(why) => (Err(why), false),
            };
            let accept = Accept {
                user_id,
                outcome,
                sold_out,
            };
            (accept, Instant::now())
        });
    }

    let release = Instant::now();
    release_tx.send_replace(true);
    let mut accepts = Vec::with_capacity(user_ids.len());
    let mut last_answer = Duration::ZERO;
    while let Some(joined) = tasks.join_next().await {
        let (accept, answered_at) = joined.context("an addToCart task failed")?;
        last_answer = last_answer.max(answered_at.saturating_duration_since(release));
        accepts.push(accept);
    }
    Ok(Fired {
        release,
        accepts,
        last_answer,
    })
}

/// Waits for the release, then sends one `addToCart` request under a permit.
async fn submit(
    api: &Api,
    order: Order,
    released: &mut watch::Receiver<bool>,
    permits: &Semaphore,
) -> Result<Answer, String> {
    (released.wait_for(|&go| go).await).map_err(|_| "the release signal was lost".to_owned())?;
    let _permit = (permits.acquire().await).map_err(|_| "the request limiter closed".to_owned())?;
    Ok(api.add_to_cart(order).await)
}
