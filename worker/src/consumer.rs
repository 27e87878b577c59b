//! The path of a partition's batches, top-down in [`consume_partition`]: take the deliveries
//! that have arrived, unpack their batch envelopes into items, decide and commit them (one
//! PostgreSQL transaction around the pure core), publish their statuses (Redis), ack. Never an
//! ack before the commit. A failed attempt is retried, split or set aside as the pure
//! [`retry::next_step`] says.
//!
//! Beside it: [`crate::broker`] (all of AMQP), [`crate::decider`] (the steps of a batch, with
//! all SQL in [`crate::persist`] and the decisions in [`crate::core`]).

use crate::broker::{self, Subscription};
use crate::decider::{Decider, Item};
use crate::retry::{self, Attempts, Step};
use allot_shared::PartitionId;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Consumes `partition` through its `subscription` until `shutdown` is cancelled (`Ok`; the
/// worker stops, or steps back from the partition, see [`crate::seats`]) or the connection fails
/// (`Err`). A batch being processed is finished (committed and acked) first; one still failing
/// when shutdown comes is left unacked, to be redelivered.
pub async fn consume_partition(
    mut subscription: Subscription,
    partition: PartitionId,
    decider: Arc<Decider>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        // 1. Take the deliveries that have arrived, up to a batch.
        let deliveries = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            batch = subscription.next_batch() => batch?,
        };
        // 2. Unpack their envelopes into items, in arrival order.
        let items = broker::items_of(&deliveries);

        // The whole batch is one piece; a piece that keeps failing is split into its items.
        let mut pieces = vec![Piece::new(0..items.len())]; // a stack: the next piece is last
        while let Some(piece) = pieces.pop() {
            let batch = &items[piece.range.clone()];
            // 3. Decide and commit, in one PostgreSQL transaction; 4. publish the statuses.
            let attempt = match decider.decide_and_commit(partition, batch).await {
                Ok(committed) => decider.publish_statuses(partition, &committed.views).await,
                Err(err) => Err(err),
            };
            let Err(err) = attempt else { continue };
            let failure = retry::classify(&err);
            let attempts = piece.attempts.and(failure);
            match retry::next_step(failure, attempts, batch.len()) {
                Step::Retry { after } => {
                    tracing::warn!(%partition, size = batch.len(), ?failure, error = %format_args!("{err:#}"), retry_in = ?after, "batch failed; it will be retried");
                    if !pause(after, &shutdown).await {
                        return Ok(()); // unacked: it will be redelivered
                    }
                    pieces.push(Piece { attempts, ..piece });
                }
                Step::Split => {
                    tracing::warn!(%partition, size = batch.len(), error = %format_args!("{err:#}"), "batch keeps failing; retrying it item by item");
                    pieces.extend(piece.range.rev().map(|index| Piece::new(index..index + 1)));
                }
                Step::SetAside => {
                    for item in batch {
                        let reason = format!("{err:#}");
                        if !set_aside(&decider, partition, item, &reason, &shutdown).await {
                            return Ok(()); // unacked: it will be redelivered
                        }
                    }
                }
            }
        }

        // 5. Every item is committed (or set aside) and published: ack them all at once.
        subscription.ack(&deliveries).await;
    }
}

/// Consecutive items of a batch tried as one, and how they failed so far.
struct Piece {
    range: Range<usize>,
    attempts: Attempts,
}

impl Piece {
    fn new(range: Range<usize>) -> Self {
        Self {
            range,
            attempts: Attempts::default(),
        }
    }
}

/// Sets `item` aside, retrying (the database may be down) until it is recorded. `false` if
/// shutdown came first.
async fn set_aside(
    decider: &Decider,
    partition: PartitionId,
    item: &Item<'_>,
    reason: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut failed = 0;
    loop {
        let err = match decider.set_aside(partition, item, reason).await {
            Ok(()) => {
                crate::monitor::record_set_aside();
                return true;
            }
            Err(err) => err,
        };
        failed += 1;
        let after = retry::pause(failed);
        tracing::warn!(%partition, error = %format_args!("{err:#}"), retry_in = ?after, "could not set an item aside; retrying");
        if !pause(after, shutdown).await {
            return false;
        }
    }
}

/// Sleeps `duration`; `false` if shutdown came first.
async fn pause(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(duration) => true,
    }
}
