//! The printed outcome of one size: [`SizeReport`] counts what was accepted and decided,
//! measures the accept throughput and prints one table row with the violations listed under it.

use std::time::Duration;

use crate::check::Observation;
use allot_tests::client::wire::{REJECTED, SUCCEEDED};

/// The outcome of one size, as printed.
#[derive(Debug)]
pub struct SizeReport {
    n: usize,
    accepted: usize,
    succeeded: usize,
    rejected: usize,
    accept_rate: Option<f64>,
    decided_secs: Option<f64>,
    violations: Vec<String>,
}

impl SizeReport {
    pub fn new(observation: &Observation, last_answer: Duration, violations: Vec<String>) -> Self {
        let count_status = |status: &str| {
            (observation.polled.finals.values())
                .filter(|tx| tx.status == status)
                .count()
        };
        SizeReport {
            n: observation.n,
            accepted: (observation.accepts.iter())
                .filter(|a| a.outcome.is_ok())
                .count(),
            succeeded: count_status(SUCCEEDED),
            rejected: count_status(REJECTED),
            accept_rate: rate(observation.n, last_answer),
            decided_secs: observation
                .polled
                .all_decided_after
                .map(|d| d.as_secs_f64()),
            violations,
        }
    }

    /// A size that could not be run at all (e.g. the product could not be created).
    pub fn setup_failure(n: usize, error: &anyhow::Error) -> Self {
        SizeReport {
            n,
            accepted: 0,
            succeeded: 0,
            rejected: 0,
            accept_rate: None,
            decided_secs: None,
            violations: vec![format!("run aborted: {error:#}")],
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub const HEADER: &str =
        "     n  accepted  succeeded  rejected  accept req/s  decided (s)  result";

    fn row(&self) -> String {
        let optional = |value: Option<f64>, precision: usize| {
            value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
        };
        format!(
            "{:>6}  {:>8}  {:>9}  {:>8}  {:>12}  {:>11}  {}",
            self.n,
            self.accepted,
            self.succeeded,
            self.rejected,
            optional(self.accept_rate, 1),
            optional(self.decided_secs, 2),
            if self.passed() { "OK" } else { "FAIL" },
        )
    }

    pub fn print(&self) {
        println!("{}", self.row());
        for violation in &self.violations {
            println!("        - {violation}");
        }
    }
}

/// Requests per second, if the duration allows computing it.
fn rate(requests: usize, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| requests as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::good_observation;

    #[test]
    fn report_rows_line_up_with_the_header() {
        let observation = good_observation(10);
        let report = SizeReport::new(&observation, Duration::from_millis(250), Vec::new());
        assert_eq!(
            (report.accepted, report.succeeded, report.rejected),
            (10, 5, 5)
        );
        assert_eq!(report.accept_rate, Some(40.0));
        let row = report.row();
        assert_eq!(row.len(), SizeReport::HEADER.len() - 4, "{row}");
        assert!(row.ends_with("  OK"), "{row}");
        let failed = SizeReport::setup_failure(10, &anyhow::anyhow!("no server"));
        assert!(!failed.passed());
        assert!(failed.row().ends_with("FAIL"), "{}", failed.row());
    }

    #[test]
    fn rates_need_elapsed_time() {
        assert_eq!(rate(10, Duration::ZERO), None);
        assert_eq!(rate(10, Duration::from_secs(2)), Some(5.0));
    }
}
