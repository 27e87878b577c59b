//! allot's source of time, injectable so tests can cross midnight on demand.
//!
//! Every time allot records is cut to microseconds, PostgreSQL's precision, so a status reads
//! exactly the same whether it is served from Redis or from the database.

use chrono::{DateTime, SubsecRound, Utc};
use std::sync::{Arc, Mutex};

/// Tells the current time, to the microsecond. Order numbers take their day from it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// `time` cut to the microsecond, the precision PostgreSQL stores.
pub fn to_stored_precision(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(6)
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        to_stored_precision(Utc::now())
    }
}

/// A clock that stands still until told to move; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(to_stored_precision(start))))
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().expect("clock lock poisoned") = to_stored_precision(now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock lock poisoned")
    }
}
