//! The retry policy: what the consumer loop does when an attempt at a batch failed. A pure
//! function, [`next_step`], of the failure's kind, the batch's failures so far and its size,
//! unit-tested below like the core; the loop only carries out the [`Step`] it returns.
//!
//! A transient failure (PostgreSQL restarting, a dropped connection, a pool timeout, Redis
//! away) is retried forever, with a capped backoff: setting requests aside because PostgreSQL
//! is down would turn an outage into lost sales. A deterministic one (a row the database
//! refuses to write) comes back every time, so after [`DETERMINISTIC_ATTEMPTS`] a batch is
//! split and its items are tried alone, in order, and an item that still fails is set aside
//! (dead letter, transaction rejected as `unprocessable`), so that the partition moves on.
//! Only a failure the database itself reports as being about the data (SQLSTATE classes 22, 23
//! and P0) or a stored row that cannot be read counts as deterministic ([`classify`]).

use std::time::Duration;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connection, I/O, pool, server shutdown, serialization or Redis trouble: retry.
    Transient,
    /// The same input fails the same way every time.
    Deterministic,
}

/// What to do next with a batch whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try the same batch again after this pause.
    Retry { after: Duration },
    /// Try each of its items alone, in order, each with no failures counted yet.
    Split,
    /// Set its item aside (a batch of one, or an item of a split batch).
    SetAside,
}

/// How often a batch, or a single item once a batch was split, may fail deterministically
/// before it is split, or set aside.
pub const DETERMINISTIC_ATTEMPTS: u32 = 3;
/// The pause after a first failure; it doubles with each failure that follows.
pub const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between two attempts.
pub const MAX_PAUSE: Duration = Duration::from_secs(2);

/// How a batch (or, once split, one item) has failed so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    /// Failed attempts of either kind: they set the pause.
    pub failed: u32,
    /// Of those, the deterministic ones: they end the retrying.
    pub deterministic: u32,
}

impl Attempts {
    /// These attempts and one more that failed with `failure`.
    #[must_use]
    pub fn and(self, failure: Failure) -> Self {
        Self {
            failed: self.failed.saturating_add(1),
            deterministic: self
                .deterministic
                .saturating_add(u32::from(failure == Failure::Deterministic)),
        }
    }
}

/// The step after a failed attempt at a batch of `batch_len` items; `attempts` counts its
/// failures so far, this one (of kind `failure`) included.
pub fn next_step(failure: Failure, attempts: Attempts, batch_len: usize) -> Step {
    if failure == Failure::Deterministic && attempts.deterministic >= DETERMINISTIC_ATTEMPTS {
        if batch_len > 1 {
            Step::Split
        } else {
            Step::SetAside
        }
    } else {
        Step::Retry {
            after: pause(attempts.failed),
        }
    }
}

/// The pause after the `failed`-th failure in a row: [`FIRST_PAUSE`], doubled with each
/// further failure, at most [`MAX_PAUSE`].
pub fn pause(failed: u32) -> Duration {
    let doublings = failed.saturating_sub(1).min(16);
    (FIRST_PAUSE * 2u32.pow(doublings)).min(MAX_PAUSE)
}

/// Classifies the error of a failed attempt by the first database or Redis error in its chain.
/// An error with neither (a stored row that does not convert, a value that does not serialise)
/// comes from the data, so it is deterministic.
pub fn classify(err: &anyhow::Error) -> Failure {
    for cause in err.chain() {
        if let Some(db) = cause.downcast_ref::<sqlx::Error>() {
            return classify_sqlx(db);
        }
        if cause.downcast_ref::<redis::RedisError>().is_some() {
            return Failure::Transient;
        }
    }
    Failure::Deterministic
}

fn classify_sqlx(err: &sqlx::Error) -> Failure {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 22 data exception, 23 integrity constraint violation, P0 raised by PL/pgSQL.
            if ["22", "23", "P0"]
                .iter()
                .any(|class| code.starts_with(class))
            {
                Failure::Deterministic
            } else {
                Failure::Transient
            }
        }
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => Failure::Deterministic,
        _ => Failure::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Failure::{Deterministic, Transient};

    /// The attempts after `failures`, in order.
    fn after(failures: &[Failure]) -> Attempts {
        failures
            .iter()
            .fold(Attempts::default(), |attempts, &failure| {
                attempts.and(failure)
            })
    }

    /// The step after `failures` (the last one being decided on) of a batch of `len` items.
    fn step(failures: &[Failure], len: usize) -> Step {
        next_step(*failures.last().unwrap(), after(failures), len)
    }

    fn retry(millis: u64) -> Step {
        Step::Retry {
            after: Duration::from_millis(millis),
        }
    }

    #[test]
    fn transient_failures_are_retried_forever_with_a_capped_backoff() {
        let mut failures = Vec::new();
        let mut pauses = Vec::new();
        for _ in 0..1000 {
            failures.push(Transient);
            match step(&failures, 500) {
                Step::Retry { after } => pauses.push(after.as_millis()),
                other => panic!("a transient failure must be retried, got {other:?}"),
            }
        }
        assert_eq!(pauses[..7], [50, 100, 200, 400, 800, 1600, 2000]);
        assert!(pauses[7..].iter().all(|&pause| pause == 2000));
        assert_eq!(step(&failures, 1), retry(2000), "alone too");
    }

    #[test]
    fn a_batch_failing_deterministically_is_retried_then_split() {
        assert_eq!(step(&[Deterministic], 2), retry(50));
        assert_eq!(step(&[Deterministic, Deterministic], 2), retry(100));
        assert_eq!(step(&[Deterministic; 3], 2), Step::Split);
        assert_eq!(step(&[Deterministic; 3], 500), Step::Split);
    }

    #[test]
    fn an_item_failing_deterministically_alone_is_retried_then_set_aside() {
        assert_eq!(step(&[Deterministic], 1), retry(50));
        assert_eq!(step(&[Deterministic, Deterministic], 1), retry(100));
        assert_eq!(step(&[Deterministic; 3], 1), Step::SetAside);
        // An envelope with no items has nothing to split; nothing is set aside either.
        assert_eq!(step(&[Deterministic; 3], 0), Step::SetAside);
    }

    #[test]
    fn transient_failures_between_deterministic_ones_neither_count_nor_end_the_retrying() {
        let failures = [Deterministic, Transient, Deterministic, Transient];
        assert_eq!(
            step(&failures, 1),
            retry(400),
            "the pause counts every failure"
        );
        assert_eq!(after(&failures).deterministic, 2);
        let failures = [
            Deterministic,
            Transient,
            Transient,
            Deterministic,
            Deterministic,
        ];
        assert_eq!(step(&failures, 1), Step::SetAside);
        assert_eq!(step(&failures, 2), Step::Split);
        // A transient failure after the limit is still only retried: an outage is not poison.
        let failures = [Deterministic, Deterministic, Deterministic, Transient];
        assert_eq!(step(&failures, 1), retry(400));
    }

    #[test]
    fn the_pause_does_not_overflow() {
        assert_eq!(pause(0), FIRST_PAUSE);
        assert_eq!(pause(u32::MAX), MAX_PAUSE);
        let many = Attempts {
            failed: u32::MAX,
            deterministic: u32::MAX,
        };
        assert_eq!(many.and(Deterministic), many);
    }

    #[test]
    fn errors_without_a_database_or_redis_cause_are_deterministic() {
        let err = anyhow::anyhow!("a stored row is inconsistent");
        assert_eq!(classify(&err), Deterministic);
        let err = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("failed to begin");
        assert_eq!(classify(&err), Transient);
        let err = anyhow::Error::new(sqlx::Error::Io(std::io::Error::other("reset")));
        assert_eq!(classify(&err), Transient);
    }
}
