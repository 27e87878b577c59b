//! The consumer loop of one partition: take what has arrived (up to a batch), unpack the batch
//! envelopes into their items, in order, let the [`Decider`] process them, retrying until it
//! succeeds (or setting aside, alone, an item that fails every time, see [`crate::poison`]),
//! then ack the whole batch at once (`multiple`). Never an ack before the commit. The AMQP side
//! is [`crate::broker`].

use crate::broker::{self, BatchSettings};
use crate::decider::{Decider, Item};
use crate::poison::{Failure, classify};
use allot_shared::PartitionId;
use allot_shared::amqp::Topology;
use lapin::Channel;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Consumes `partition` on its own `channel` until `shutdown` is cancelled (`Ok`) or the
/// connection fails (`Err`). A batch being processed is finished (committed and acked) first;
/// one still failing is left unacked for redelivery.
pub async fn consume_partition(
    channel: Channel,
    topology: Topology,
    partition: PartitionId,
    decider: Arc<Decider>,
    settings: BatchSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut subscription = broker::subscribe(&channel, &topology, partition, settings).await?;
    loop {
        let deliveries = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            batch = subscription.next_batch() => batch?,
        };
        let items = broker::items_of(&deliveries);
        if !process_until_done(&decider, partition, &items, &shutdown).await {
            return Ok(()); // shutting down with the batch unacked: it will be redelivered
        }
        subscription.ack(&deliveries).await;
    }
}

/// How often a batch, or a single message once a batch was split, may fail deterministically
/// before it is split, or set aside.
const DETERMINISTIC_ATTEMPTS: u32 = 3;
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// How a series of attempts ended.
enum Attempts {
    Decided,
    ShuttingDown,
    /// Failed deterministically [`DETERMINISTIC_ATTEMPTS`] times; the last error.
    KeepsFailing(anyhow::Error),
}

/// Processes a batch until it is decided. Transient failures are retried forever with a
/// capped backoff; a batch that keeps failing deterministically is split and retried request
/// by request (in order), and a request that still keeps failing is set aside (dead letter,
/// transaction rejected as `unprocessable`), so the partition moves on. Returns `false` if
/// shutdown came first: the batch stays unacked and is redelivered.
async fn process_until_done(
    decider: &Decider,
    partition: PartitionId,
    messages: &[Item<'_>],
    shutdown: &CancellationToken,
) -> bool {
    let err = match attempt(decider, partition, messages, shutdown).await {
        Attempts::Decided => return true,
        Attempts::ShuttingDown => return false,
        Attempts::KeepsFailing(err) => err,
    };
    if messages.len() > 1 {
        tracing::warn!(%partition, size = messages.len(), error = %format_args!("{err:#}"), "batch keeps failing; retrying it message by message");
    }
    for message in messages {
        let err = if messages.len() == 1 {
            format!("{err:#}")
        } else {
            match attempt(decider, partition, std::slice::from_ref(message), shutdown).await {
                Attempts::Decided => continue,
                Attempts::ShuttingDown => return false,
                Attempts::KeepsFailing(err) => format!("{err:#}"),
            }
        };
        if !set_aside_until_done(decider, partition, message, &err, shutdown).await {
            return false;
        }
    }
    true
}

/// Tries `messages` as one batch until it is decided, shutdown comes, or it failed
/// deterministically [`DETERMINISTIC_ATTEMPTS`] times.
async fn attempt(
    decider: &Decider,
    partition: PartitionId,
    messages: &[Item<'_>],
    shutdown: &CancellationToken,
) -> Attempts {
    let mut pause = Duration::from_millis(50);
    let mut deterministic = 0;
    loop {
        let err = match decider.process_batch(partition, messages).await {
            Ok(_) => return Attempts::Decided,
            Err(err) => err,
        };
        let failure = classify(&err);
        if failure == Failure::Deterministic {
            deterministic += 1;
            if deterministic >= DETERMINISTIC_ATTEMPTS {
                return Attempts::KeepsFailing(err);
            }
        }
        tracing::warn!(%partition, ?failure, error = %format_args!("{err:#}"), retry_in = ?pause, "batch failed; it will be retried");
        if !pause_or_shutdown(&mut pause, shutdown).await {
            return Attempts::ShuttingDown;
        }
    }
}

/// Sets `message` aside, retrying (the database may be down) until it is recorded. `false` if
/// shutdown came first.
async fn set_aside_until_done(
    decider: &Decider,
    partition: PartitionId,
    message: &Item<'_>,
    reason: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut pause = Duration::from_millis(50);
    loop {
        match decider.set_aside(partition, message, reason).await {
            Ok(()) => {
                crate::monitor::record_set_aside();
                return true;
            }
            Err(err) => {
                tracing::warn!(%partition, error = %format_args!("{err:#}"), retry_in = ?pause, "could not set a message aside; retrying");
            }
        }
        if !pause_or_shutdown(&mut pause, shutdown).await {
            return false;
        }
    }
}

/// Sleeps `pause` (then doubles it, up to [`MAX_PAUSE`]); `false` if shutdown came first.
async fn pause_or_shutdown(pause: &mut Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => return false,
        () = tokio::time::sleep(*pause) => {}
    }
    *pause = (*pause * 2).min(MAX_PAUSE);
    true
}
