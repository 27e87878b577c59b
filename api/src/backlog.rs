//! The API's own bound on each partition queue, below RabbitMQ's `x-max-length`.
//!
//! The partition queues are bounded by the broker (`x-max-length` with `reject-publish`), and a
//! refused publish becomes a 503. But a quorum queue applies that limit loosely, and in a chaos
//! test run against RabbitMQ 3.10.8 one message published just as its queue reached the limit
//! was confirmed and never stored: a 202 for a request no worker ever saw. So the API does not
//! lean on the broker's limit; it refuses first, and the broker's limit stays as the backstop.
//!
//! Per partition it keeps an estimate of the queue's depth: the depth last read from the broker
//! (a passive declare every [`POLL_EVERY`], see [`crate::publisher`]), plus this API's publishes
//! still awaiting their confirm, plus those confirmed since that read was sent. (A read only
//! replaces what was confirmed before it was sent: a publish still on its way when the broker
//! answered may not be in the answer, and it stays counted.) A publish reserves a place (one
//! per message, whatever the number of requests it carries) before it is sent and gives it back
//! if the broker refused it; it is refused at once when the estimate reaches the limit minus a
//! margin of a fifth (the margin absorbs what the estimate cannot see: other API instances'
//! publishes between two reads).

use allot_shared::PartitionId;
use std::sync::Mutex;
use std::time::Duration;

/// How often the publisher reads the depth of every partition queue.
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// The depth estimates of every partition queue.
#[derive(Debug)]
pub struct Backlog {
    /// Estimates above this refuse further publishes.
    bound: i64,
    partitions: Vec<Mutex<Estimate>>,
}

#[derive(Debug, Default)]
struct Estimate {
    /// The depth the broker reported at the last read.
    read: i64,
    /// Places reserved whose publish is still on its way (no confirm yet).
    in_flight: i64,
    /// Places kept (confirmed, or perhaps stored) since the last read was sent.
    kept: i64,
}

impl Estimate {
    fn depth(&self) -> i64 {
        self.read + self.in_flight + self.kept
    }
}

/// A reserved place in a partition queue; given back when dropped unless [`Place::keep`] was
/// called (the broker stored the message, or may have).
#[must_use]
pub struct Place<'a> {
    estimate: &'a Mutex<Estimate>,
    kept: bool,
}

impl Place<'_> {
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut estimate = lock(self.estimate);
        estimate.in_flight -= 1;
        if self.kept {
            estimate.kept += 1;
        }
    }
}

fn lock(estimate: &Mutex<Estimate>) -> std::sync::MutexGuard<'_, Estimate> {
    estimate
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A depth read on its way: what it will replace.
pub struct Read {
    partition: PartitionId,
    /// Places kept before the read was sent: the broker's answer counts them.
    kept: i64,
}

impl Backlog {
    /// Estimates for `partitions` queues whose broker limit is `max_length`.
    pub fn new(partitions: u16, max_length: i64) -> Backlog {
        Backlog {
            bound: max_length - max_length / 5,
            partitions: (0..partitions).map(|_| Mutex::default()).collect(),
        }
    }

    fn of(&self, partition: PartitionId) -> &Mutex<Estimate> {
        &self.partitions[usize::from(partition.0)]
    }

    /// The estimated depth of `partition`'s queue.
    pub fn estimate(&self, partition: PartitionId) -> i64 {
        lock(self.of(partition)).depth()
    }

    /// Reserves a place in `partition`'s queue, or `None` if it is (estimated) full.
    pub fn reserve(&self, partition: PartitionId) -> Option<Place<'_>> {
        let cell = self.of(partition);
        let mut estimate = lock(cell);
        if estimate.depth() >= self.bound {
            return None;
        }
        estimate.in_flight += 1;
        Some(Place {
            estimate: cell,
            kept: false,
        })
    }

    /// Call just before sending a passive declare of `partition`'s queue.
    pub fn begin_read(&self, partition: PartitionId) -> Read {
        let estimate = lock(self.of(partition));
        Read {
            partition,
            kept: estimate.kept,
        }
    }

    /// Records the depth the broker answered to `read` (`None` if the read failed: the
    /// estimate stays as it is until the next read). A message confirmed while the read was on
    /// its way may be counted twice until the next read: the estimate errs on the full side,
    /// never on the empty one.
    pub fn end_read(&self, read: Read, depth: Option<i64>) {
        let mut estimate = lock(self.of(read.partition));
        if let Some(depth) = depth {
            estimate.read = depth;
            estimate.kept -= read.kept;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PartitionId = PartitionId(1);

    #[test]
    fn refuses_at_the_bound_and_gives_back_what_was_refused() {
        let backlog = Backlog::new(4, 10); // bound 8
        let places: Vec<_> = (0..8).map(|_| backlog.reserve(P).unwrap()).collect();
        assert!(backlog.reserve(P).is_none());
        assert_eq!(backlog.estimate(P), 8, "a refusal reserves nothing");
        assert!(
            backlog.reserve(PartitionId(0)).is_some(),
            "partitions are separate"
        );
        drop(places); // none kept: every publish was refused by the broker
        assert_eq!(backlog.estimate(P), 0);
    }

    #[test]
    fn a_read_replaces_what_was_kept_before_it_was_sent() {
        let backlog = Backlog::new(4, 10);
        for _ in 0..3 {
            backlog.reserve(P).unwrap().keep();
        }
        let read = backlog.begin_read(P);
        backlog.reserve(P).unwrap().keep(); // confirmed while the read was on its way
        backlog.end_read(read, Some(2)); // a worker took one of the three
        assert_eq!(backlog.estimate(P), 3);
    }

    #[test]
    fn a_publish_in_flight_during_a_read_still_counts_after_it() {
        let backlog = Backlog::new(4, 10);
        backlog.reserve(P).unwrap().keep();
        let second = backlog.reserve(P).unwrap(); // sent, not yet confirmed
        let read = backlog.begin_read(P);
        backlog.end_read(read, Some(1)); // the broker had only the first
        assert_eq!(backlog.estimate(P), 2, "the second is still counted");
        second.keep();
        assert_eq!(backlog.estimate(P), 2);
        let read = backlog.begin_read(P);
        backlog.end_read(read, Some(2));
        assert_eq!(backlog.estimate(P), 2);
    }

    #[test]
    fn a_refused_publish_is_given_back_once_and_a_failed_read_changes_nothing() {
        let backlog = Backlog::new(4, 10);
        let refused = backlog.reserve(P).unwrap();
        let read = backlog.begin_read(P);
        backlog.end_read(read, Some(0)); // the broker did not store it
        drop(refused);
        assert_eq!(backlog.estimate(P), 0);
        backlog.reserve(P).unwrap().keep();
        let read = backlog.begin_read(P);
        backlog.end_read(read, None); // a failed read keeps the estimate
        assert_eq!(backlog.estimate(P), 1);
    }

    #[test]
    fn small_limits_are_kept_exactly() {
        let backlog = Backlog::new(1, 2);
        backlog.reserve(PartitionId(0)).unwrap().keep();
        backlog.reserve(PartitionId(0)).unwrap().keep();
        assert!(backlog.reserve(PartitionId(0)).is_none());
    }
}
