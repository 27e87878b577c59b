//! Unit and property tests of the decision core, against a straightforward sequential model.

use super::*;
use allot_shared::{Lines, PurchaseRequest, Quantity, UserId};
use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use std::collections::HashSet;

mod envelopes;
mod holds;
mod orders;
mod shards;

/// The core on orders alone, decided at the epoch: what the tests of orders (without holds)
/// need. Shadows [`super::decide`] in these tests.
fn decide(state: &mut PartitionState, orders: &[Order]) -> OrderDecisions {
    let requests: Vec<Request> = orders.iter().cloned().map(Request::Order).collect();
    OrderDecisions(super::decide(state, &requests, micros(0)))
}

/// [`Decisions`] of orders alone.
struct OrderDecisions(Decisions);

impl OrderDecisions {
    fn sold(&self) -> i64 {
        self.0.sold()
    }

    fn number(&self, day: NaiveDate, first_seq: i64) -> Vec<Decided> {
        self.0.number(day, first_seq).orders
    }
}

fn day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()
}

/// A one-line request of user 1, accepted at the epoch.
fn request(id: u128, product: i64, quantity: i64) -> Order {
    Order::from(PurchaseRequest {
        transaction_id: TransactionId(uuid::Uuid::from_u128(id)),
        user_id: UserId::try_from(1).unwrap(),
        product_id: ProductId::try_from(product).unwrap(),
        quantity: Quantity::try_from(quantity).unwrap(),
        created_at: DateTime::<Utc>::UNIX_EPOCH,
    })
}

/// An order of `user` with `lines` (product, quantity), accepted `at` microseconds after the
/// epoch.
fn order(id: u128, user: i64, lines: &[(i64, i64)], at: i64) -> Order {
    Order {
        transaction_id: TransactionId(uuid::Uuid::from_u128(id)),
        user_id: UserId::try_from(user).unwrap(),
        lines: Lines::new(
            lines
                .iter()
                .map(|&(product, quantity)| Line {
                    product_id: ProductId::try_from(product).unwrap(),
                    quantity: Quantity::try_from(quantity).unwrap(),
                })
                .collect(),
        )
        .unwrap(),
        created_at: micros(at),
        hold: None,
        slot: None,
        shard: None,
    }
}

fn micros(at: i64) -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::microseconds(at)
}

fn user(id: i64) -> UserId {
    UserId::try_from(id).unwrap()
}

fn rejected(reason: RejectReason) -> Outcome {
    Outcome::rejected(reason)
}

fn product(id: i64) -> ProductId {
    ProductId::try_from(id).unwrap()
}

fn state(stock: &[(i64, i64)]) -> PartitionState {
    PartitionState {
        stock: stock
            .iter()
            .map(|&(id, units)| (product(id), units))
            .collect(),
        ..PartitionState::default()
    }
}

fn succeeded(seq: i64) -> Outcome {
    Outcome::Succeeded(OrderNumber { day: day(), seq })
}

#[test]
fn sells_until_the_stock_is_gone_then_rejects() {
    let mut state = state(&[(1, 2)]);
    let batch = [request(1, 1, 1), request(2, 1, 1), request(3, 1, 1)];
    let decisions = decide(&mut state, &batch);
    assert_eq!(decisions.sold(), 2);
    let outcomes: Vec<_> = decisions
        .number(day(), 41)
        .into_iter()
        .map(|d| d.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            succeeded(41),
            succeeded(42),
            rejected(RejectReason::OutOfStock)
        ]
    );
    assert_eq!(state.stock[&product(1)], 0);
}

#[test]
fn a_large_request_that_does_not_fit_leaves_the_stock_to_smaller_ones() {
    let mut state = state(&[(1, 3)]);
    let batch = [request(1, 1, 5), request(2, 1, 3)];
    let decided = decide(&mut state, &batch).number(day(), 1);
    assert_eq!(decided[0].outcome, rejected(RejectReason::OutOfStock));
    assert_eq!(decided[1].outcome, succeeded(1));
    assert_eq!(state.stock[&product(1)], 0);
}

#[test]
fn unknown_products_are_rejected_without_touching_other_stock() {
    let mut state = state(&[(1, 1)]);
    let decided = decide(&mut state, &[request(1, 9, 1)]).number(day(), 1);
    assert_eq!(decided[0].outcome, rejected(RejectReason::UnknownProduct));
    assert_eq!(state.stock[&product(1)], 1);
}

#[test]
fn a_stored_outcome_is_replayed_not_decided_again() {
    let mut state = state(&[(1, 5)]);
    let earlier = request(7, 1, 1);
    state.decided.insert(earlier.transaction_id, succeeded(3));
    let decisions = decide(&mut state, &[earlier]);
    assert_eq!(decisions.sold(), 0);
    assert_eq!(
        decisions.number(day(), 100),
        [Decided {
            outcome: succeeded(3),
            fresh: false
        }]
    );
    assert_eq!(state.stock[&product(1)], 5);
}

#[test]
fn a_duplicate_within_the_batch_gets_the_first_copy_outcome() {
    let mut state = state(&[(1, 5)]);
    let decisions = decide(&mut state, &[request(7, 1, 2), request(7, 1, 2)]);
    assert_eq!(decisions.sold(), 1);
    assert_eq!(
        decisions.number(day(), 1),
        [
            Decided {
                outcome: succeeded(1),
                fresh: true
            },
            Decided {
                outcome: succeeded(1),
                fresh: false
            }
        ]
    );
    assert_eq!(state.stock[&product(1)], 3);
}

/// A batch of random requests over a few products, with some ids repeated.
fn batch_strategy() -> impl Strategy<Value = (Vec<(i64, i64)>, Vec<Order>)> {
    let stock = prop::collection::vec(0..20i64, 1..5).prop_map(|units| {
        units
            .into_iter()
            .enumerate()
            .map(|(i, u)| (i as i64 + 1, u))
            .collect()
    });
    // Product ids 1..=6 so that some requests name products that do not exist.
    let requests = prop::collection::vec((0..40u128, 1..=6i64, 1..=4i64), 0..80).prop_map(|raw| {
        raw.into_iter()
            .map(|(id, p, q)| request(id, p, q))
            .collect()
    });
    (stock, requests)
}

proptest! {
    /// Against a sequential model: each first occurrence of an id succeeds exactly when its
    /// product exists and has its quantity left; stock never goes below zero and drops by
    /// exactly the units sold; new numbers are first..first+sold-1 in arrival order.
    #[test]
    fn matches_the_sequential_model((stock, batch) in batch_strategy(), first_seq in 1..1000i64) {
        let mut state = state(&stock);
        let initial = state.stock.clone();
        let decisions = decide(&mut state, &batch);
        let decided = decisions.number(day(), first_seq);
        prop_assert_eq!(decided.len(), batch.len());

        let mut model_stock = initial.clone();
        let mut seen = HashMap::new();
        let mut next_seq = first_seq;
        for (request, got) in batch.iter().zip(&decided) {
            if let Some(first) = seen.get(&request.transaction_id) {
                prop_assert_eq!(got, &Decided { outcome: *first, fresh: false });
                continue;
            }
            let line = request.lines[0];
            let expected = match model_stock.get_mut(&line.product_id) {
                None => rejected(RejectReason::UnknownProduct),
                Some(units) if *units >= line.quantity.get() => {
                    *units -= line.quantity.get();
                    next_seq += 1;
                    succeeded(next_seq - 1)
                }
                Some(_) => rejected(RejectReason::OutOfStock),
            };
            prop_assert_eq!(got, &Decided { outcome: expected, fresh: true });
            seen.insert(request.transaction_id, expected);
        }
        prop_assert_eq!(&state.stock, &model_stock);
        prop_assert!(state.stock.values().all(|&units| units >= 0));
        prop_assert_eq!(decisions.sold(), next_seq - first_seq);

        let sold_units: i64 = batch.iter().zip(&decided)
            .filter(|(_, d)| d.fresh && matches!(d.outcome, Outcome::Succeeded(_)))
            .map(|(r, _)| r.lines[0].quantity.get())
            .sum();
        let stock_drop: i64 = initial.values().sum::<i64>() - state.stock.values().sum::<i64>();
        prop_assert_eq!(sold_units, stock_drop);
    }

    /// With quantity 1, the units sold of each product are exactly min(demand, stock), and the
    /// first `stock` distinct requests are the ones that succeed.
    #[test]
    fn unit_requests_sell_min_of_demand_and_stock(units in 0..50i64, demand in 0..100u128) {
        let mut state = state(&[(1, units)]);
        let batch: Vec<_> = (0..demand).map(|id| request(id, 1, 1)).collect();
        let decided = decide(&mut state, &batch).number(day(), 1);
        let winners: Vec<usize> = decided.iter().enumerate()
            .filter(|(_, d)| matches!(d.outcome, Outcome::Succeeded(_)))
            .map(|(i, _)| i)
            .collect();
        let expected = units.min(demand as i64) as usize;
        prop_assert_eq!(winners, (0..expected).collect::<Vec<_>>());
        prop_assert_eq!(state.stock[&product(1)], units - expected as i64);
    }

    /// Deciding a batch again with its stored outcomes (a redelivery after a crash between
    /// commit and ack) changes nothing and replays the same outcomes.
    #[test]
    fn a_redelivered_batch_is_replayed_exactly((stock, batch) in batch_strategy()) {
        let mut state = state(&stock);
        let first = decide(&mut state, &batch).number(day(), 1);
        let stock_after_first = state.stock.clone();
        for (request, decided) in batch.iter().zip(&first) {
            state.decided.insert(request.transaction_id, decided.outcome);
        }
        let again = decide(&mut state, &batch);
        prop_assert_eq!(again.sold(), 0);
        let replayed: Vec<Outcome> = again.number(day(), 1).iter().map(|d| d.outcome).collect();
        let original: Vec<Outcome> = first.iter().map(|d| d.outcome).collect();
        prop_assert_eq!(replayed, original);
        prop_assert_eq!(&state.stock, &stock_after_first);
    }

    /// Order numbers handed out across consecutive batches of a day are unique and gapless.
    #[test]
    fn numbers_are_gapless_across_batches(batches in prop::collection::vec(batch_strategy(), 1..6)) {
        let mut next_seq = 1;
        let mut numbers = HashSet::new();
        for (index, (stock, batch)) in batches.into_iter().enumerate() {
            // Fresh ids per batch so that every batch decides something new.
            let batch: Vec<_> = batch.into_iter().map(|mut r| {
                r.transaction_id = TransactionId(uuid::Uuid::from_u128(r.transaction_id.0.as_u128() + 1000 * index as u128));
                r
            }).collect();
            let mut state = state(&stock);
            let decisions = decide(&mut state, &batch);
            for d in decisions.number(day(), next_seq) {
                if let (Outcome::Succeeded(number), true) = (d.outcome, d.fresh) {
                    prop_assert!(numbers.insert(number.seq), "duplicate number {}", number);
                }
            }
            next_seq += decisions.sold();
        }
        prop_assert_eq!(numbers.len() as i64, next_seq - 1);
        prop_assert!((1..next_seq).all(|seq| numbers.contains(&seq)));
    }
}
