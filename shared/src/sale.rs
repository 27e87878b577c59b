//! Whether a product is on sale at a given moment: its sale window and its pauses. One pure rule,
//! used by the API (to answer a request outside the window or during a pause at once, from its
//! catalogue snapshot) and by the worker (on what reaches it, from the product row it locked),
//! so both judge alike.
//!
//! A request is judged at the time the API accepted it (its `created_at`), not when it is
//! decided: a request accepted one microsecond before the window closes is sold if stock
//! allows, however long its message waited; one accepted at the closing time is not.

use crate::outcome::RejectReason;
use chrono::{DateTime, Utc};

/// A product's sale window and pauses, as far as they matter for the requests being judged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sale {
    /// On sale from this time on (inclusive); `None`: no lower bound.
    pub starts_at: Option<DateTime<Utc>>,
    /// On sale until this time (exclusive); `None`: no upper bound.
    pub ends_at: Option<DateTime<Utc>>,
    /// Paused since this time, and still paused; `None`: not paused now.
    pub paused_since: Option<DateTime<Utc>>,
    /// Closed pauses `[paused_at, resumed_at)`. The worker loads only those that can cover a
    /// request of the batch; the API needs none (it judges the present).
    pub pauses: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Sale {
    /// Why a request accepted `at` is not on sale, or `None` if it is. The window comes first
    /// (`not_started`, `ended`), then the pause (`paused`).
    pub fn closed_at(&self, at: DateTime<Utc>) -> Option<RejectReason> {
        if self.starts_at.is_some_and(|starts| at < starts) {
            return Some(RejectReason::NotStarted);
        }
        if self.ends_at.is_some_and(|ends| at >= ends) {
            return Some(RejectReason::Ended);
        }
        let paused_now = self.paused_since.is_some_and(|since| since <= at);
        let paused_then = self
            .pauses
            .iter()
            .any(|&(paused, resumed)| paused <= at && at < resumed);
        (paused_now || paused_then).then_some(RejectReason::Paused)
    }

    /// Whether there is anything to judge (a window bound or a pause).
    pub fn is_restricted(&self) -> bool {
        self.starts_at.is_some()
            || self.ends_at.is_some()
            || self.paused_since.is_some()
            || !self.pauses.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proptest::prelude::*;

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::microseconds(micros)
    }

    #[test]
    fn the_window_includes_its_start_and_excludes_its_end() {
        let sale = Sale {
            starts_at: Some(at(100)),
            ends_at: Some(at(200)),
            ..Sale::default()
        };
        assert_eq!(sale.closed_at(at(99)), Some(RejectReason::NotStarted));
        assert_eq!(sale.closed_at(at(100)), None);
        assert_eq!(sale.closed_at(at(199)), None);
        assert_eq!(sale.closed_at(at(200)), Some(RejectReason::Ended));
        assert_eq!(Sale::default().closed_at(at(0)), None);
    }

    #[test]
    fn a_pause_covers_from_its_start_to_its_resume() {
        let sale = Sale {
            paused_since: Some(at(500)),
            pauses: vec![(at(100), at(200))],
            ..Sale::default()
        };
        assert_eq!(sale.closed_at(at(99)), None);
        assert_eq!(sale.closed_at(at(100)), Some(RejectReason::Paused));
        assert_eq!(sale.closed_at(at(199)), Some(RejectReason::Paused));
        assert_eq!(sale.closed_at(at(200)), None);
        assert_eq!(sale.closed_at(at(499)), None);
        assert_eq!(sale.closed_at(at(500)), Some(RejectReason::Paused));
    }

    #[test]
    fn the_window_is_named_before_the_pause() {
        let sale = Sale {
            starts_at: Some(at(100)),
            ends_at: Some(at(200)),
            paused_since: Some(at(0)),
            ..Sale::default()
        };
        assert_eq!(sale.closed_at(at(50)), Some(RejectReason::NotStarted));
        assert_eq!(sale.closed_at(at(150)), Some(RejectReason::Paused));
        assert_eq!(sale.closed_at(at(250)), Some(RejectReason::Ended));
    }

    proptest! {
        /// Against the definition: on sale iff inside every bound and inside no pause.
        #[test]
        fn matches_the_definition(
            starts in proptest::option::of(0..1000i64),
            length in proptest::option::of(1..1000i64),
            paused in proptest::option::of(0..2000i64),
            pauses in proptest::collection::vec((0..2000i64, 1..200i64), 0..4),
            t in 0..2000i64,
        ) {
            let sale = Sale {
                starts_at: starts.map(at),
                ends_at: length.map(|length| at(starts.unwrap_or(0) + length)),
                paused_since: paused.map(at),
                pauses: pauses.iter().map(|&(from, length)| (at(from), at(from + length))).collect(),
            };
            let in_window = sale.starts_at.is_none_or(|s| s <= at(t)) && sale.ends_at.is_none_or(|e| at(t) < e);
            let in_pause = paused.is_some_and(|p| p <= t)
                || pauses.iter().any(|&(from, length)| from <= t && t < from + length);
            prop_assert_eq!(sale.closed_at(at(t)).is_none(), in_window && !in_pause);
        }
    }
}
