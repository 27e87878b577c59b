//! How several worker instances share the partitions evenly.
//!
//! Every worker holds a *seat* in the line of every partition queue: one consumer per
//! partition, on a channel of its own. The queues have single-active-consumer, so RabbitMQ
//! delivers each partition to one seat at a time, the first in its line, and when that seat's
//! consumer goes (its worker stops, dies, or its connection drops) it hands the partition to
//! the next seat in line at once. That makes one decider per partition and a take-over without
//! a gap, but not an even spread: the line is in order of arrival, so the first worker to start
//! would decide every partition, and a worker that restarts would join every line at the back
//! and decide nothing.
//!
//! On RabbitMQ 3.10.8 the broker cannot be asked to move a partition: with
//! single-active-consumer a quorum queue ignores consumer priorities (its `rabbit_fifo`
//! activates the first waiting consumer in order of arrival; a higher priority takes over only
//! from RabbitMQ 4.0), and it never tells an AMQP 0-9-1 consumer that it became the active one
//! (the activation only updates the broker's own consumer metrics). What a worker
//! can do is leave a line and join it again at the back: closing its consumer's channel (after
//! the batch in hand is decided and acked; the deliveries prefetched but not taken go back to
//! the queue, to be delivered first to the next seat) makes RabbitMQ activate the next seat in
//! line in the same step, and the fresh consumer waits behind everybody. So the workers agree on
//! who *should* decide each partition and the others step back:
//!
//! 1. **Who is there.** Each worker whose broker session consumes renews its entry in a list
//!    in Redis every second ([`crate::membership`]); a worker that stops leaves it, a worker
//!    killed drops out after a 5 s lease.
//! 2. **Who owns what.** Every worker computes the same even assignment from that list
//!    ([`crate::spread::assign`]: 16 partitions over 3 workers are 6, 5 and 5).
//! 3. **Stepping back.** When the list changes, every worker leaves and rejoins the lines of
//!    the partitions it does not own. A worker joins the list only once its seats are all in
//!    their lines, so after the others stepped back the owner is first in line.
//! 4. **Self-correction.** A worker that receives a partition it does not own decides that
//!    batch and then steps back ([`crate::spread::should_yield`], at most once a second per
//!    partition). That corrects a line left in the wrong order by a race (an owner that was
//!    itself rejoining), and while an owner that died is still listed the partition keeps
//!    being decided by whoever RabbitMQ hands it to, one batch per hand-over.
//!
//! Deciding never pauses for this: a seat steps back only between batches, and RabbitMQ hands
//! the partition on in the step that closes the seat. A worker that restarts is back in the
//! list within a second of consuming and gets its share back within a second more. Should two
//! seats ever decide one partition at once (a connection that dropped with a batch in hand),
//! the row locks and the transaction id's primary key keep every promise, as before.
//!
//! What a worker knows of its seats is served at `GET /partitions` and exported as metrics:
//! the partitions it owns, and those it is *active* on: RabbitMQ delivered to its current
//! consumer, which is therefore first in line (a seat stays active until it is closed; an idle
//! partition shows as active only from its next delivery, since RabbitMQ does not say).

use crate::broker::{self, BatchSettings};
use crate::consumer::consume_partition;
use crate::decider::Decider;
use crate::membership::{self, Member, Membership};
use crate::spread::{self, Ownership};
use allot_shared::PartitionId;
use allot_shared::amqp::Topology;
use anyhow::Context;
use lapin::Connection;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The least time between two hand-overs of one partition by one worker, when it is handed a
/// partition it does not own.
pub const YIELD_COOLDOWN: Duration = Duration::from_secs(1);
/// How long opening a seat's channel and subscribing may take (a node that accepts the
/// connection but cannot serve its queues must not hold the session).
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// This worker's seats, one per partition: shared by the session's tasks and the HTTP server.
pub struct Seats {
    /// This worker's id in the list of workers.
    worker: String,
    seats: Vec<Mutex<Seat>>,
    /// Live workers in the last list read (0 before the first).
    workers: AtomicUsize,
    /// Woken when a seat subscribes (the session joins the list once all have).
    subscribed: Notify,
}

#[derive(Debug)]
struct Seat {
    ownership: Ownership,
    /// Its consumer is in the queue's line.
    subscribed: bool,
    /// RabbitMQ delivered to its current consumer.
    active: bool,
    /// Cancelled to step back after the batch in hand (the current consumer's).
    step_back: Option<CancellationToken>,
    last_step_back: Option<Instant>,
}

/// What `GET /partitions` answers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SeatsView {
    /// This worker's id.
    pub worker: String,
    /// Live workers in the last list read (0 before the first).
    pub workers: usize,
    /// The partitions assigned to this worker.
    pub owned: Vec<u16>,
    /// The partitions RabbitMQ delivers to this worker's consumers.
    pub active: Vec<u16>,
    /// The partitions whose consumer is in its queue's line.
    pub subscribed: usize,
}

impl Seats {
    pub fn new(worker: String, partitions: u16) -> Self {
        let seats = (0..partitions)
            .map(|_| {
                Mutex::new(Seat {
                    ownership: Ownership::Unknown,
                    subscribed: false,
                    active: false,
                    step_back: None,
                    last_step_back: None,
                })
            })
            .collect();
        Self {
            worker,
            seats,
            workers: AtomicUsize::new(0),
            subscribed: Notify::new(),
        }
    }

    pub fn worker(&self) -> &str {
        &self.worker
    }

    fn seat(&self, partition: PartitionId) -> std::sync::MutexGuard<'_, Seat> {
        self.seats[usize::from(partition.0)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn subscribed_to(&self, partition: PartitionId, step_back: CancellationToken) {
        let mut seat = self.seat(partition);
        seat.subscribed = true;
        seat.active = false;
        seat.step_back = Some(step_back);
        drop(seat);
        record_active(partition, false);
        self.subscribed.notify_waiters();
    }

    fn unsubscribed(&self, partition: PartitionId) {
        let mut seat = self.seat(partition);
        seat.subscribed = false;
        seat.active = false;
        seat.step_back = None;
        drop(seat);
        record_active(partition, false);
    }

    /// RabbitMQ delivered a batch of `partition` to this worker: it is active there. Steps back
    /// after this batch if another worker owns it (see the module documentation, point 4).
    pub fn delivered(&self, partition: PartitionId) {
        let mut seat = self.seat(partition);
        let newly = !seat.active;
        seat.active = true;
        let since = seat.last_step_back.map(|at| at.elapsed());
        if spread::should_yield(seat.ownership, since, YIELD_COOLDOWN)
            && let Some(step_back) = seat.step_back.take()
        {
            seat.last_step_back = Some(Instant::now());
            step_back.cancel();
            tracing::info!(worker = %self.worker, %partition, "handed a partition this worker does not own; stepping back after this batch");
        }
        drop(seat);
        if newly {
            record_active(partition, true);
        }
    }

    /// Applies a new list of live workers: computes the assignment, and steps back from every
    /// partition another worker owns (point 3). Returns how many this worker owns.
    pub fn apply(&self, members: &[Member]) -> usize {
        let mut workers: Vec<&str> = members.iter().map(|m| m.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        let partitions = u16::try_from(self.seats.len()).expect("at most 1024 partitions");
        let owners = spread::assign(&workers, partitions);
        let me = workers.iter().position(|w| *w == self.worker);
        let mut owned = 0;
        let mut stepped_back = 0;
        for (index, owner) in owners.iter().enumerate() {
            let mine = owner.is_some() && *owner == me;
            let mut seat = self.seats[index]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            seat.ownership = if mine {
                owned += 1;
                Ownership::Owned
            } else {
                Ownership::NotOwned
            };
            if !mine && let Some(step_back) = seat.step_back.take() {
                seat.last_step_back = Some(Instant::now());
                step_back.cancel();
                stepped_back += 1;
            }
        }
        self.workers.store(workers.len(), Ordering::Relaxed);
        metrics::gauge!("allot_worker_instances").set(workers.len() as f64);
        metrics::gauge!("allot_worker_partitions_owned").set(owned as f64);
        tracing::info!(
            worker = %self.worker,
            workers = workers.len(),
            owned,
            stepped_back,
            "the list of workers changed; partitions reassigned"
        );
        owned
    }

    /// The session ended (its seats closed or aborted with the connection, this worker no
    /// longer listed): forgets the seats and the assignment.
    pub fn session_ended(&self) {
        for (index, seat) in self.seats.iter().enumerate() {
            let mut seat = seat
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let was_active = seat.active;
            seat.ownership = Ownership::Unknown;
            seat.subscribed = false;
            seat.active = false;
            seat.step_back = None;
            drop(seat);
            if was_active {
                let partition = u16::try_from(index).expect("at most 1024 partitions");
                record_active(PartitionId(partition), false);
            }
        }
        self.workers.store(0, Ordering::Relaxed);
        metrics::gauge!("allot_worker_partitions_owned").set(0.0);
        metrics::gauge!("allot_worker_instances").set(0.0);
    }

    fn all_subscribed(&self) -> bool {
        self.seats.iter().all(|seat| {
            seat.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .subscribed
        })
    }

    /// What `GET /partitions` answers.
    pub fn view(&self) -> SeatsView {
        let mut owned = Vec::new();
        let mut active = Vec::new();
        let mut subscribed = 0;
        for (index, seat) in self.seats.iter().enumerate() {
            let seat = seat
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let partition = u16::try_from(index).expect("at most 1024 partitions");
            if seat.ownership == Ownership::Owned {
                owned.push(partition);
            }
            if seat.active {
                active.push(partition);
            }
            subscribed += usize::from(seat.subscribed);
        }
        SeatsView {
            worker: self.worker.clone(),
            workers: self.workers.load(Ordering::Relaxed),
            owned,
            active,
            subscribed,
        }
    }
}

fn record_active(partition: PartitionId, active: bool) {
    metrics::gauge!("allot_worker_partition_active", "partition" => partition.to_string())
        .set(if active { 1.0 } else { 0.0 });
}

/// What a seat needs, the same for every partition of a session.
#[derive(Clone)]
pub struct SeatContext {
    pub connection: Arc<Connection>,
    pub topology: Topology,
    pub settings: BatchSettings,
    pub decider: Arc<Decider>,
    pub seats: Arc<Seats>,
    /// Cancelled when the session ends.
    pub stop: CancellationToken,
}

/// Holds `partition`'s seat for the session: subscribes on a channel of its own and consumes;
/// when asked to step back, finishes the batch in hand, closes the channel (RabbitMQ hands the
/// partition to the next seat in line) and subscribes again, at the back of the line. `Ok` when
/// the session stops, `Err` when the connection fails.
pub async fn hold_seat(context: SeatContext, partition: PartitionId) -> anyhow::Result<()> {
    let SeatContext {
        connection,
        topology,
        settings,
        decider,
        seats,
        stop,
    } = context;
    let mut turn = 0u64;
    loop {
        turn += 1;
        let step_back = stop.child_token();
        let tag = format!("allot-worker-{}-{partition}-{turn}", seats.worker());
        let on_delivery: broker::OnDelivery = {
            let seats = seats.clone();
            Arc::new(move || seats.delivered(partition))
        };
        let subscribe = async {
            let channel = connection
                .create_channel()
                .await
                .with_context(|| format!("failed to open a channel for partition {partition}"))?;
            let subscription =
                broker::subscribe(&channel, &topology, partition, settings, &tag, on_delivery)
                    .await?;
            anyhow::Ok((channel, subscription))
        };
        let (channel, subscription) = tokio::time::timeout(SETUP_TIMEOUT, subscribe)
            .await
            .with_context(|| {
                format!("subscribing to partition {partition} took over {SETUP_TIMEOUT:?}")
            })??;
        seats.subscribed_to(partition, step_back.clone());
        let consumed = consume_partition(subscription, partition, decider.clone(), step_back).await;
        seats.unsubscribed(partition);
        if consumed.is_err() || stop.is_cancelled() {
            // The connection is closed by the session.
            return consumed;
        }
        // Stepping back: closing the channel cancels the consumer and returns what was
        // prefetched; RabbitMQ activates the next seat in line.
        match tokio::time::timeout(SETUP_TIMEOUT, channel.close(200, "stepping back".into())).await
        {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("failed to step back from partition {partition}")));
            }
            Err(_elapsed) => anyhow::bail!(
                "stepping back from partition {partition} took over {SETUP_TIMEOUT:?}"
            ),
        }
        metrics::counter!("allot_worker_handovers_total").increment(1);
        tracing::debug!(worker = %seats.worker(), %partition, "stepped back; joining the line again");
    }
}

/// Keeps this worker's entry in the list of workers while the session consumes, and applies
/// every new list to the seats. Joins only once every seat is in its line; leaves when `stop`
/// is cancelled.
pub async fn keep_listed(
    seats: Arc<Seats>,
    membership: Arc<Membership>,
    me: Member,
    stop: CancellationToken,
) {
    loop {
        let notified = seats.subscribed.notified();
        if seats.all_subscribed() {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = notified => {}
        }
    }
    let mut last: Option<Vec<Member>> = None;
    let mut beat = tokio::time::interval(membership::BEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = beat.tick() => {}
        }
        match membership.beat(&me).await {
            Ok(members) if last.as_ref() != Some(&members) => {
                seats.apply(&members);
                last = Some(members);
            }
            Ok(_) => {}
            // The last list stays applied; if this goes on, the others drop this worker after
            // the lease and take its partitions as theirs (it keeps deciding what RabbitMQ
            // gives it: its seats stay in their lines).
            Err(err) => {
                tracing::warn!(error = %err, "could not renew this worker's entry in the list of workers");
            }
        }
    }
    membership.leave(&me).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(worker: &str) -> Member {
        Member {
            worker: worker.into(),
            session: 1,
        }
    }

    /// Seats of worker `me` over `partitions`, every one subscribed; the tokens to watch.
    fn subscribed(me: &str, partitions: u16) -> (Seats, Vec<CancellationToken>) {
        let seats = Seats::new(me.into(), partitions);
        let tokens: Vec<CancellationToken> = (0..partitions)
            .map(|p| {
                let token = CancellationToken::new();
                seats.subscribed_to(PartitionId(p), token.clone());
                token
            })
            .collect();
        (seats, tokens)
    }

    #[test]
    fn a_new_list_steps_back_from_exactly_the_partitions_others_own() {
        let (seats, tokens) = subscribed("b", 16);
        assert!(seats.all_subscribed());
        let owned = seats.apply(&[member("a"), member("b"), member("c")]);
        let view = seats.view();
        assert_eq!(view.owned.len(), owned);
        assert!((5..=6).contains(&owned));
        assert_eq!(view.workers, 3);
        for (p, token) in tokens.iter().enumerate() {
            let mine = view.owned.contains(&(p as u16));
            assert_eq!(token.is_cancelled(), !mine, "partition {p}");
        }
        // The same assignment as every other worker computes.
        let owners = spread::assign(&["a", "b", "c"], 16);
        let expected: Vec<u16> = (0..16u16)
            .filter(|&p| owners[usize::from(p)] == Some(1))
            .collect();
        assert_eq!(view.owned, expected);
    }

    #[test]
    fn a_worker_listed_twice_across_sessions_counts_once() {
        let (seats, _) = subscribed("b", 16);
        let old = Member {
            worker: "b".into(),
            session: 1,
        };
        let new = Member {
            worker: "b".into(),
            session: 2,
        };
        assert_eq!(seats.apply(&[member("a"), old, new]), 8);
        assert_eq!(seats.view().workers, 2);
    }

    #[test]
    fn a_delivery_of_a_partition_another_owns_steps_back_once_a_second() {
        let (seats, _) = subscribed("b", 4);
        assert_eq!(seats.apply(&[member("a"), member("b")]), 2);
        let theirs = (0..4u16)
            .find(|p| !seats.view().owned.contains(p))
            .map(PartitionId)
            .unwrap();
        // Joined again after the list changed; then handed the partition by RabbitMQ.
        let token = CancellationToken::new();
        seats.subscribed_to(theirs, token.clone());
        seats.seat(theirs).last_step_back = None;
        seats.delivered(theirs);
        assert!(token.is_cancelled(), "steps back after the batch in hand");
        assert_eq!(seats.view().active, vec![theirs.0]);
        // Back in line and handed it again at once: decides, does not step back this time.
        let again = CancellationToken::new();
        seats.subscribed_to(theirs, again.clone());
        seats.delivered(theirs);
        assert!(!again.is_cancelled(), "at most once a second");
    }

    #[test]
    fn deliveries_of_owned_partitions_or_before_any_list_never_step_back() {
        let (seats, tokens) = subscribed("b", 4);
        for p in 0..4 {
            seats.delivered(PartitionId(p)); // no list yet: ownership unknown
        }
        assert!(tokens.iter().all(|t| !t.is_cancelled()));
        assert_eq!(seats.view().active, vec![0, 1, 2, 3]);
        seats.apply(&[member("b")]);
        for p in 0..4 {
            seats.delivered(PartitionId(p));
        }
        assert!(tokens.iter().all(|t| !t.is_cancelled()), "it owns them all");
        seats.session_ended();
        let view = seats.view();
        assert_eq!((view.workers, view.subscribed), (0, 0));
        assert!(view.owned.is_empty() && view.active.is_empty());
    }
}
