//! The promises, checked against PostgreSQL (and Redis for the statuses), never against the
//! HTTP answers alone. Every check runs over everything since the start of the run: the kit's
//! [`invariants`], given what the sale knows (every 202, the demand and supply per product),
//! and the chaos test's own, request by request against what each client was told.

use crate::load::{Ledger, Said};
use allot_tests::invariants::{self, Outcome, Statuses};
use anyhow::Result;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// What is known about the products when checking.
pub struct Catalogue {
    /// Initial stock plus every restock, per sale product.
    pub supply: BTreeMap<i64, i64>,
    /// The product the poison fault makes undecidable; its requests must all be `unprocessable`.
    pub cursed: i64,
    pub cursed_stock: i64,
    /// Initial stock plus every restock, per shop product (bought in orders of two and in
    /// holds): `stock + held + sold` must equal it, whatever the demand.
    pub conserved: BTreeMap<i64, i64>,
}

/// What the checks counted.
#[derive(Debug, Default)]
pub struct Summary {
    pub accepted: usize,
    pub succeeded: i64,
    pub rejected: i64,
    pub orders_today: i64,
    pub dead_letters: i64,
    pub redis_checked: usize,
    pub lost: LostAnswers,
    /// Holds answered checked out, and cancelled, since the start.
    pub checked_out: usize,
    pub cancelled: usize,
}

/// What became of the requests whose answer never reached their client.
#[derive(Debug, Default)]
pub struct LostAnswers {
    /// Requests without an answer (the API down, or killed while serving them).
    pub lost: usize,
    /// Of them, in flight across a `kill -9` of the API.
    pub cut: usize,
    /// Of those, decided by a worker: sold, or rejected.
    pub sold: usize,
    pub rejected: usize,
    /// Of those, withdrawn by the API (`not_accepted`) before it died.
    pub withdrawn: usize,
    /// 503s withdrawn in PostgreSQL (`not_accepted`): a publish the broker may have stored.
    pub refused_withdrawn: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accepted ids each with exactly one final outcome ({} succeeded, {} rejected in PostgreSQL); \
             order numbers 1..{} gapless; {} dead letters; {} Redis statuses match; \
             no refused request sold ({} 503s withdrawn); {} answers lost, {} of them cut by an API kill -9 \
             (each at most one outcome: {} sold, {} rejected, {} withdrawn, {} none); \
             shop products and slot conserved (stock + held + sold == supply; {} holds checked out, \
             {} cancelled, each so in PostgreSQL)",
            self.accepted,
            self.succeeded,
            self.rejected,
            self.orders_today,
            self.dead_letters,
            self.redis_checked,
            self.lost.refused_withdrawn,
            self.lost.lost,
            self.lost.cut,
            self.lost.sold,
            self.lost.rejected,
            self.lost.withdrawn,
            (self.lost.cut)
                .saturating_sub(self.lost.sold + self.lost.rejected + self.lost.withdrawn),
            self.checked_out,
            self.cancelled,
        )
    }
}

/// Runs every check; returns the counts and the violations found.
pub async fn check_all(
    pool: &PgPool,
    redis: &mut redis::aio::ConnectionManager,
    redis_prefix: &str,
    ledger: &Ledger,
    catalogue: &Catalogue,
) -> Result<(Summary, Vec<String>)> {
    let mut violations = ledger.violations.clone();
    let mut summary = Summary {
        accepted: ledger.accepted.len(),
        ..Summary::default()
    };
    let ids: Vec<Uuid> = ledger.accepted.keys().copied().collect();

    // Every 202 id: exactly one final outcome, for its product, never withdrawn.
    let (rows, accepted) = invariants::accepted_decided_once(pool, &ledger.accepted).await?;
    violations.extend(accepted);
    for row in &rows {
        if row.product_id == catalogue.cursed && row.reason.as_deref() != Some("unprocessable") {
            violations.push(format!(
                "{} for the cursed product ended {} {:?}, not rejected as unprocessable",
                row.id, row.status, row.reason
            ));
        }
    }

    // Nothing sold that a client was not told about, request by request (each has its own
    // user id): every success is a 202 id or a request whose answer a kill -9 cut.
    let stored = invariants::every_outcome(pool).await?;
    summary.succeeded = stored
        .iter()
        .filter(|row| row.status == "succeeded")
        .count() as i64;
    summary.rejected = stored.len() as i64 - summary.succeeded;
    let lost = check_requests(ledger, &stored, &mut violations);
    summary.lost = lost.summary;

    // No stock below zero; units sold == min(demand, supply) per sale product (demand: the
    // 202s, and the requests a kill cut that a worker decided); the cursed product sold nothing.
    violations.extend(invariants::stock_never_negative(pool).await?);
    let mut demand = ledger.demand.clone();
    for (product, cut) in &lost.demand {
        *demand.entry(*product).or_default() += cut;
    }
    violations.extend(invariants::sold_within_supply(pool, &catalogue.supply, &demand).await?);
    let cursed_sold = invariants::sold_by_product(pool)
        .await?
        .get(&catalogue.cursed)
        .copied()
        .unwrap_or(0);
    let cursed_stock = invariants::stock_by_product(pool)
        .await?
        .get(&catalogue.cursed)
        .copied();
    if cursed_sold != 0 || cursed_stock != Some(catalogue.cursed_stock) {
        violations.push(format!("the cursed product sold {cursed_sold} units"));
    }

    // The shop: orders of two products all or nothing, holds counted once (held, sold or
    // back), the slot's places equal to its bookings; every hold answered checked out is sold,
    // every one answered cancelled is released.
    violations.extend(invariants::conserved(pool, &catalogue.conserved).await?);
    violations.extend(invariants::holds_consistent(pool).await?);
    let settled: Vec<Uuid> = ledger
        .checked_out
        .iter()
        .chain(&ledger.cancelled)
        .copied()
        .collect();
    let ended: HashMap<Uuid, (String, Option<String>)> =
        sqlx::query_as::<_, (Uuid, String, Option<String>)>(
            "SELECT id, status, reason FROM transactions WHERE id = ANY($1)",
        )
        .bind(&settled)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, status, reason)| (id, (status, reason)))
        .collect();
    for (ids, expected) in [
        (&ledger.checked_out, ("succeeded", None)),
        (&ledger.cancelled, ("rejected", Some("cancelled"))),
    ] {
        for id in ids {
            let found = ended.get(id);
            if found.map(|(s, r)| (s.as_str(), r.as_deref())) != Some(expected) {
                violations.push(format!(
                    "hold {id} was answered {expected:?} but is {found:?}"
                ));
            }
        }
    }
    summary.checked_out = ledger.checked_out.len();
    summary.cancelled = ledger.cancelled.len();

    let (numbered, numbers) = invariants::order_numbers(pool).await?;
    violations.extend(numbers);
    summary.orders_today = numbered.latest_day;
    summary.dead_letters = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await?;
    let decided: Vec<Uuid> = ids.iter().chain(&lost.decided).copied().collect();
    let statuses = Statuses {
        redis,
        prefix: redis_prefix,
    };
    let (matched, wrong) =
        invariants::redis_matches_postgres(pool, statuses, Some(&decided)).await?;
    summary.redis_checked = matched;
    violations.extend(wrong);
    Ok((summary, violations))
}

/// What the rows of the requests without a 202 showed.
struct Unaccepted {
    summary: LostAnswers,
    /// Requests cut by a kill that a worker decided, per product: demand the 202s do not show.
    demand: HashMap<i64, u64>,
    /// Their ids (their statuses in Redis must be the stored ones).
    decided: Vec<Uuid>,
}

/// The rows of requests that got no 202, against what their clients were told (by user id,
/// one per request): no request answered 503 was sold, none answered sold-out or 422 was
/// recorded, and a request whose answer was lost may have been decided (or withdrawn) only if
/// a `kill -9` of the API cut it. And no request has two outcomes.
fn check_requests(ledger: &Ledger, stored: &[Outcome], violations: &mut Vec<String>) -> Unaccepted {
    let mut found = Unaccepted {
        summary: LostAnswers {
            lost: (ledger.requests.values())
                .filter(|request| matches!(request.said, Said::Lost { .. }))
                .count(),
            cut: (ledger.requests.values())
                .filter(|request| matches!(request.said, Said::Lost { sent, gave_up } if ledger.cut_by_kill(sent, gave_up)))
                .count(),
            ..LostAnswers::default()
        },
        demand: HashMap::new(),
        decided: Vec::new(),
    };
    let mut broken: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut outcomes: HashMap<i64, usize> = HashMap::new();
    for row in stored {
        *outcomes.entry(row.user_id).or_default() += 1;
        if ledger.accepted.contains_key(&row.id) {
            continue; // checked above, id by id
        }
        let sold = row.status == "succeeded";
        let withdrawn = row.reason.as_deref() == Some("not_accepted");
        let what = format!(
            "{} {} {:?} (user {})",
            row.id, row.status, row.reason, row.user_id
        );
        let request = ledger.requests.get(&row.user_id);
        if request.is_some_and(|request| request.product != row.product_id) {
            broken
                .entry("requests were recorded for another product than requested")
                .or_default()
                .push(what.clone());
        }
        match request.map(|request| request.said) {
            Some(Said::Refused) if sold => broken
                .entry("requests answered 503 were sold")
                .or_default()
                .push(what),
            Some(Said::Refused) => found.summary.refused_withdrawn += usize::from(withdrawn),
            Some(Said::SoldOut) => broken
                .entry("requests answered sold out (200, final) were recorded")
                .or_default()
                .push(what),
            Some(Said::Invalid) => broken
                .entry("requests answered 422 were recorded")
                .or_default()
                .push(what),
            Some(Said::Lost { sent, gave_up }) if ledger.cut_by_kill(sent, gave_up) => {
                if withdrawn {
                    found.summary.withdrawn += 1;
                } else {
                    if sold {
                        found.summary.sold += 1;
                    } else {
                        found.summary.rejected += 1;
                    }
                    *found.demand.entry(row.product_id).or_default() += 1;
                    found.decided.push(row.id);
                }
            }
            Some(Said::Lost { .. }) => broken
                .entry("requests whose answer was lost while no API was killed were recorded")
                .or_default()
                .push(what),
            Some(Said::Accepted(_) | Said::Unexpected) => {} // two outcomes: counted below; unexpected: reported
            None if sold => broken
                .entry("successes belong to no request a client sent")
                .or_default()
                .push(what),
            None => {}
        }
    }
    for (user, n) in outcomes {
        if n > 1 {
            broken
                .entry("requests have more than one outcome")
                .or_default()
                .push(format!("user {user}: {n}"));
        }
    }
    for (what, examples) in broken {
        violations.push(format!(
            "{} {what}, e.g. {}",
            examples.len(),
            examples[..examples.len().min(3)].join(", ")
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Request;
    use std::time::{Duration, Instant};

    fn row(user: i64, status: &str, reason: Option<&str>) -> Outcome {
        Outcome {
            id: Uuid::new_v4(),
            user_id: user,
            product_id: 1,
            status: status.into(),
            reason: reason.map(str::to_owned),
        }
    }

    fn said(ledger: &mut Ledger, user: i64, said: Said) {
        ledger.requests.insert(user, Request { product: 1, said });
    }

    /// Each kind of broken promise is found; what is allowed is counted, not reported.
    #[test]
    fn requests_are_judged_by_what_their_client_was_told() {
        let start = Instant::now();
        let later = start + Duration::from_secs(10);
        let mut ledger = Ledger::default();
        ledger.api_killed(
            start + Duration::from_secs(5),
            start + Duration::from_secs(6),
        );
        let cut = Said::Lost {
            sent: start + Duration::from_secs(4),
            gave_up: start + Duration::from_secs(5),
        };
        let not_cut = Said::Lost {
            sent: start,
            gave_up: start + Duration::from_secs(1),
        };
        said(&mut ledger, 1, Said::Refused);
        said(&mut ledger, 2, Said::Refused);
        said(&mut ledger, 3, Said::SoldOut);
        said(&mut ledger, 4, Said::Invalid);
        said(&mut ledger, 5, cut);
        said(&mut ledger, 6, cut);
        said(&mut ledger, 7, not_cut);
        said(&mut ledger, 8, cut);
        said(
            &mut ledger,
            9,
            Said::Lost {
                sent: later,
                gave_up: later,
            },
        );
        let stored = [
            row(1, "succeeded", None),
            row(2, "rejected", Some("not_accepted")),
            row(3, "rejected", Some("out_of_stock")),
            row(4, "succeeded", None),
            row(5, "succeeded", None),
            row(6, "rejected", Some("not_accepted")),
            row(7, "succeeded", None),
            row(8, "rejected", Some("out_of_stock")),
            row(8, "succeeded", None),
            row(100, "succeeded", None),
        ];
        let mut violations = Vec::new();
        let found = check_requests(&ledger, &stored, &mut violations);
        let has = |what: &str| violations.iter().any(|v| v.contains(what));
        assert!(has("1 requests answered 503 were sold"), "{violations:#?}");
        assert!(has(
            "1 requests answered sold out (200, final) were recorded"
        ));
        assert!(has("1 requests answered 422 were recorded"));
        assert!(has(
            "1 requests whose answer was lost while no API was killed were recorded"
        ));
        assert!(has("1 requests have more than one outcome, e.g. user 8: 2"));
        assert!(has("1 successes belong to no request a client sent"));
        assert_eq!(violations.len(), 6, "{violations:#?}");
        assert_eq!(found.summary.lost, 5);
        assert_eq!(found.summary.cut, 3);
        assert_eq!(
            (
                found.summary.sold,
                found.summary.rejected,
                found.summary.withdrawn
            ),
            (2, 1, 1)
        );
        assert_eq!(found.summary.refused_withdrawn, 1);
        assert_eq!(found.demand.get(&1), Some(&3));
        assert_eq!(found.decided.len(), 3);
    }

    /// Nothing to report when every row is what its client was told.
    #[test]
    fn a_clean_ledger_has_no_violations() {
        let mut ledger = Ledger::default();
        let id = Uuid::new_v4();
        ledger.accept(id, 1);
        said(&mut ledger, 1, Said::Accepted(id));
        said(&mut ledger, 2, Said::Refused);
        let mut accepted = row(1, "succeeded", None);
        accepted.id = id;
        let mut violations = Vec::new();
        let found = check_requests(&ledger, &[accepted], &mut violations);
        assert!(violations.is_empty(), "{violations:#?}");
        assert_eq!(found.summary.cut, 0);
    }
}
