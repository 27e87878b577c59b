//! Judging one size's run: [`Observation`] is everything the run saw, [`check`] compares it with
//! the contract (all accepted, exactly the stock sold, the rest rejected as out of stock, every
//! transaction echoing its request, order numbers on the sales only, sold out at the end) and
//! returns every violation, instances of one kind of problem [`grouped`] into one line.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use chrono::NaiveDate;
use uuid::Uuid;

use crate::client::{Accept, Polled};
use crate::order_number::check_order_numbers;
use allot_tests::client::Transaction;
use allot_tests::client::wire::{OUT_OF_STOCK, REJECTED, SUCCEEDED};

/// How many instances a grouped violation quotes.
const MAX_EXAMPLES: usize = 3;

/// Everything [`check`] judges for one size.
#[derive(Debug)]
pub struct Observation {
    pub n: usize,
    pub product_id: i64,
    pub stock: usize,
    pub accepts: Vec<Accept>,
    pub polled: Polled,
    /// The product's stock read after all transactions were decided.
    pub final_stock: Result<i64, String>,
    /// Dates an order number may carry: today at the start and at the end of the run.
    pub valid_dates: [NaiveDate; 2],
    pub deadline: Duration,
}

/// Checks one size's observation against the contract and returns every violation found.
/// Problems of the same kind with individual instances are grouped into one line.
pub fn check(observation: &Observation) -> Vec<String> {
    let mut violations = check_accepts(observation);
    violations.extend(check_pending(observation));
    violations.extend(check_decisions(observation));
    violations.extend(check_final_stock(observation));
    violations
}

/// Every request was answered with a valid `202`, each with its own transaction.
fn check_accepts(observation: &Observation) -> Vec<String> {
    let Observation { n, accepts, .. } = observation;
    let mut violations = Vec::new();
    if accepts.len() != *n {
        violations.push(format!(
            "{} answers recorded for {n} requests",
            accepts.len()
        ));
    }
    let mut not_accepted = Vec::new();
    let mut requester = HashMap::new();
    let mut shared_ids = Vec::new();
    for accept in accepts.iter().filter(|accept| !accept.sold_out) {
        match &accept.outcome {
            Err(why) => not_accepted.push(format!("user {}: {why}", accept.user_id)),
            Ok(id) => {
                if let Some(first) = requester.insert(*id, accept.user_id) {
                    shared_ids.push(format!("{id} (users {first} and {})", accept.user_id));
                }
            }
        }
    }
    violations.extend(grouped(
        "requests not accepted with a valid 202",
        &not_accepted,
    ));
    violations.extend(grouped(
        "transaction ids returned for several requests",
        &shared_ids,
    ));
    violations
}

/// Every accepted transaction was decided before the deadline.
fn check_pending(observation: &Observation) -> Option<String> {
    let Observation {
        polled, deadline, ..
    } = observation;
    if polled.pending.is_empty() {
        return None;
    }
    let mut line = format!(
        "{} of {} accepted transactions still pending {}s after the release",
        polled.pending.len(),
        polled.pending.len() + polled.finals.len(),
        deadline.as_secs()
    );
    let failing: Vec<String> = (polled.pending.iter())
        .filter_map(|id| Some(format!("{id}: {}", polled.last_errors.get(id)?)))
        .collect();
    if let Some(errors) = grouped("; their last poll failed", &failing) {
        line.push_str(&errors);
    }
    Some(line)
}

/// The decided transactions: as many successes as there was stock, all others rejected as out of
/// stock, each echoing its request, order numbers exactly on the successes, and those valid.
fn check_decisions(observation: &Observation) -> Vec<String> {
    let Observation {
        n,
        product_id,
        stock,
        accepts,
        polled,
        valid_dates,
        ..
    } = observation;
    let mut wrong_echo = Vec::new();
    let mut unknown_status = Vec::new();
    let mut wrong_reason = Vec::new();
    let mut missing_order_number = Vec::new();
    let mut rejected_with_order_number = Vec::new();
    let mut order_numbers = Vec::new();
    // A sold-out answer is a final out_of_stock rejection, just not a recorded one.
    let (mut succeeded, mut rejected) = (0, accepts.iter().filter(|a| a.sold_out).count());
    let mut seen = HashSet::new();
    for accept in accepts {
        let Ok(id) = &accept.outcome else { continue };
        let Some(tx) = polled.finals.get(id).filter(|_| seen.insert(*id)) else {
            continue;
        };
        wrong_echo.extend(echo_mismatches(*id, tx, accept.user_id, *product_id));
        match tx.status.as_str() {
            SUCCEEDED => {
                succeeded += 1;
                match &tx.order_number {
                    Some(number) => order_numbers.push((id, number.as_str())),
                    None => missing_order_number.push(id.to_string()),
                }
            }
            REJECTED => {
                rejected += 1;
                if tx.reason.as_deref() != Some(OUT_OF_STOCK) {
                    wrong_reason.push(format!("{id}: {:?}", tx.reason));
                }
                if let Some(number) = &tx.order_number {
                    rejected_with_order_number.push(format!("{id}: {number}"));
                }
            }
            other => unknown_status.push(format!("{id}: {other:?}")),
        }
    }

    let mut violations = Vec::new();
    if succeeded != *stock {
        violations.push(format!(
            "{succeeded} transactions succeeded, expected {stock} (the stock)"
        ));
    }
    if rejected != n - stock {
        violations.push(format!(
            "{rejected} transactions rejected, expected {}",
            n - stock
        ));
    }
    let groups = [
        ("transactions with an unknown status", unknown_status),
        ("transactions not echoing their request", wrong_echo),
        (
            "rejections with a reason other than \"out_of_stock\"",
            wrong_reason,
        ),
        (
            "succeeded transactions without an order_number",
            missing_order_number,
        ),
        (
            "rejected transactions with an order_number",
            rejected_with_order_number,
        ),
    ];
    for (kind, instances) in groups {
        violations.extend(grouped(kind, &instances));
    }
    violations.extend(check_order_numbers(&order_numbers, valid_dates));
    violations
}

/// How a decided transaction differs from the request that created it.
fn echo_mismatches(id: Uuid, tx: &Transaction, user_id: i64, product_id: i64) -> Vec<String> {
    let mut mismatches = Vec::new();
    if Uuid::parse_str(&tx.transaction_id).ok() != Some(id) {
        mismatches.push(format!("{id}: transaction_id {:?}", tx.transaction_id));
    }
    let fields = [
        ("user_id", tx.user_id, user_id),
        ("product_id", tx.product_id, product_id),
        ("quantity", tx.quantity, 1),
    ];
    for (field, got, expected) in fields {
        if got != expected {
            mismatches.push(format!("{id}: {field} {got} instead of {expected}"));
        }
    }
    mismatches
}

/// The product is sold out at the end.
fn check_final_stock(observation: &Observation) -> Option<String> {
    let Observation {
        product_id,
        final_stock,
        ..
    } = observation;
    match final_stock {
        Ok(0) => None,
        Ok(left) => Some(format!(
            "product {product_id} shows stock {left} at the end, expected 0"
        )),
        Err(why) => Some(format!(
            "could not read product {product_id} at the end: {why}"
        )),
    }
}

/// One violation line for instances of one kind of problem: the count and a few examples.
pub fn grouped(kind: &str, instances: &[String]) -> Option<String> {
    if instances.is_empty() {
        return None;
    }
    let shown = instances.len().min(MAX_EXAMPLES);
    let mut line = format!(
        "{kind} ({}): {}",
        instances.len(),
        instances[..shown].join("; ")
    );
    if instances.len() > shown {
        let _ = write!(line, "; and {} more", instances.len() - shown);
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{date, good_observation, tx_mut};

    fn assert_single_violation(observation: &Observation, needle: &str) {
        let violations = check(observation);
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(violations[0].contains(needle), "{violations:#?}");
    }

    #[test]
    fn a_correct_run_has_no_violations() {
        for n in [2, 3, 10, 101] {
            let observation = good_observation(n);
            assert_eq!(check(&observation), Vec::<String>::new(), "n = {n}");
        }
    }

    #[test]
    fn failed_accepts_are_violations() {
        let mut observation = good_observation(10);
        let id = *observation.accepts[9].outcome.as_ref().expect("accepted");
        observation.polled.finals.remove(&id);
        observation.accepts[9].outcome = Err("HTTP 503 Service Unavailable".to_owned());
        let violations = check(&observation);
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(violations[0].contains("not accepted with a valid 202 (1): user 10: HTTP 503"));
        assert!(violations[1].contains("4 transactions rejected, expected 5"));
    }

    #[test]
    fn shared_transaction_ids_are_violations() {
        let mut observation = good_observation(4);
        let id = *observation.accepts[2].outcome.as_ref().expect("accepted");
        let other = *observation.accepts[3].outcome.as_ref().expect("accepted");
        observation.polled.finals.remove(&other);
        observation.accepts[3].outcome = Ok(id);
        let violations = check(&observation);
        assert!(
            violations
                .iter()
                .any(|v| v.contains("transaction ids returned for several requests (1)")),
            "{violations:#?}"
        );
    }

    #[test]
    fn pending_transactions_at_the_deadline_are_a_violation() {
        let mut observation = good_observation(10);
        for i in [7, 8, 9] {
            let id = *observation.accepts[i].outcome.as_ref().expect("accepted");
            observation.polled.finals.remove(&id);
            observation.polled.pending.push(id);
        }
        let stuck = observation.polled.pending[0];
        (observation.polled.last_errors).insert(stuck, "HTTP 500 Internal Server Error".into());
        observation.polled.all_decided_after = None;
        let violations = check(&observation);
        assert!(
            violations[0].starts_with("3 of 10 accepted transactions still pending 120s"),
            "{violations:#?}"
        );
        assert!(
            violations[0].contains("last poll failed (1)"),
            "{violations:#?}"
        );
        assert!(violations[1].contains("2 transactions rejected, expected 5"));
        assert_eq!(violations.len(), 2, "{violations:#?}");
    }

    #[test]
    fn overselling_is_a_violation() {
        let mut observation = good_observation(4);
        let tx = tx_mut(&mut observation, 3);
        tx.status = SUCCEEDED.to_owned();
        tx.reason = None;
        tx.order_number = Some("20250314-00003".to_owned());
        let violations = check(&observation);
        assert_eq!(
            violations,
            [
                "3 transactions succeeded, expected 2 (the stock)",
                "1 transactions rejected, expected 2",
            ]
        );
    }

    #[test]
    fn wrong_rejection_reasons_are_violations() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 3).reason = Some("sold_out".to_owned());
        tx_mut(&mut observation, 2).reason = None;
        let violations = check(&observation);
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(
            violations[0].starts_with("rejections with a reason other than \"out_of_stock\" (2)")
        );
    }

    #[test]
    fn echo_mismatches_are_violations() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 0).user_id = 99;
        tx_mut(&mut observation, 1).product_id = 7;
        tx_mut(&mut observation, 2).quantity = 2;
        tx_mut(&mut observation, 3).transaction_id = Uuid::nil().to_string();
        let violations = check(&observation);
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(
            violations[0].starts_with("transactions not echoing their request (4)"),
            "{violations:#?}"
        );
        assert!(violations[0].contains("user_id 99 instead of 1"));
    }

    #[test]
    fn transaction_ids_are_compared_as_uuids() {
        let mut observation = good_observation(2);
        let tx = tx_mut(&mut observation, 0);
        tx.transaction_id = tx.transaction_id.to_uppercase();
        assert_eq!(check(&observation), Vec::<String>::new());
    }

    #[test]
    fn order_number_presence_is_checked() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 0).order_number = None;
        tx_mut(&mut observation, 3).order_number = Some("20250314-00009".to_owned());
        let violations = check(&observation);
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(violations[0].starts_with("succeeded transactions without an order_number (1)"));
        assert!(violations[1].starts_with("rejected transactions with an order_number (1)"));
    }

    #[test]
    fn bad_order_numbers_are_violations() {
        let mut observation = good_observation(8);
        tx_mut(&mut observation, 0).order_number = Some("2025-03-14-1".to_owned());
        tx_mut(&mut observation, 1).order_number = Some("20250313-00002".to_owned());
        tx_mut(&mut observation, 2).order_number = Some("20250314-00004".to_owned());
        let violations = check(&observation);
        assert_eq!(violations.len(), 3, "{violations:#?}");
        assert!(violations[0].starts_with("malformed order numbers (1)"));
        assert!(violations[1].starts_with("order numbers not dated 20250314 (1)"));
        assert!(violations[2].contains("20250314-00004 given to 2 transactions"));
    }

    #[test]
    fn order_numbers_may_carry_the_date_at_either_end_of_the_run() {
        let mut observation = good_observation(4);
        observation.valid_dates = [date(2025, 3, 13), date(2025, 3, 14)];
        tx_mut(&mut observation, 0).order_number = Some("20250313-00007".to_owned());
        assert_eq!(check(&observation), Vec::<String>::new());
    }

    #[test]
    fn remaining_stock_is_a_violation() {
        let mut observation = good_observation(4);
        observation.final_stock = Ok(1);
        assert_single_violation(&observation, "shows stock 1 at the end, expected 0");
        observation.final_stock = Err("HTTP 404 Not Found".to_owned());
        assert_single_violation(&observation, "could not read product 42 at the end");
    }

    #[test]
    fn unknown_statuses_are_violations() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 3).status = "cancelled".to_owned();
        let violations = check(&observation);
        assert!(
            violations
                .iter()
                .any(|v| v.starts_with("transactions with an unknown status (1)")),
            "{violations:#?}"
        );
    }

    #[test]
    fn grouping_quotes_a_few_examples() {
        assert_eq!(grouped("things", &[]), None);
        let items: Vec<String> = (1..=5).map(|i| i.to_string()).collect();
        assert_eq!(
            grouped("things", &items).as_deref(),
            Some("things (5): 1; 2; 3; and 2 more")
        );
    }
}
