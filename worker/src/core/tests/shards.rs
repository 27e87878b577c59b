//! A product spread over several partitions, against one sequential decider of its whole stock.
//!
//! The system is simulated as the decider runs it ([`crate::decider::commit_batches`]): each
//! shard's partition has a queue of purchases; at each step some partitions' next batches are
//! committed together (a group), in an order proptest picks. An attempt locks the shares the
//! batches need (their own shards', unless escalated: then every share), decides with
//! [`try_decide`], and on an [`Escalation`] is thrown away and made again with the product held
//! as asked; a successful attempt is rebalanced and its shares written back.
//!
//! The model is one decider of the product's whole stock, deciding the same requests in the
//! order their groups committed: a purchase sells iff the total at its turn covers it. The
//! system must give every request the model's outcome (never oversell: no share below zero and
//! the shares' sum is exactly the model's stock after every commit; never undersell: no
//! `out_of_stock` while the total covered the quantity), and decide `out_of_stock` only in an
//! attempt that held every share.

use super::*;
use allot_shared::Shard;
use std::collections::{BTreeMap, BTreeSet};

const PRODUCT: i64 = 1;

/// One purchase waiting in its partition's queue: its quantity, and whether it names its shard
/// (`false`: a message of an earlier version, or staff's purchase routed to the product's own
/// partition, which needs the whole product).
#[derive(Debug, Clone)]
struct Purchase {
    quantity: i64,
    names_shard: bool,
}

/// A step: these partitions (by shard, in this order) commit their next batches of these sizes
/// together.
type Step = Vec<(usize, usize)>;

#[derive(Debug, Clone)]
struct Scenario {
    shares: Vec<i64>,
    queues: Vec<Vec<Purchase>>,
    steps: Vec<Step>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (2..=5usize).prop_flat_map(|shards| {
        let purchase =
            (1..=3i64, prop::bool::weighted(0.95)).prop_map(|(quantity, names_shard)| Purchase {
                quantity,
                names_shard,
            });
        let step = prop::collection::vec((0..shards, 1..=4usize), 1..=shards);
        (
            prop::collection::vec(0..12i64, shards),
            prop::collection::vec(prop::collection::vec(purchase, 0..15), shards),
            prop::collection::vec(step, 1..60),
        )
            .prop_map(|(shares, queues, steps)| Scenario {
                shares,
                queues,
                steps,
            })
    })
}

fn product() -> ProductId {
    ProductId::try_from(PRODUCT).unwrap()
}

/// The purchase `n` of `shard`, as the API would send it.
fn purchase(shard: usize, n: usize, purchase: &Purchase) -> Request {
    let mut order = request((shard * 1000 + n + 1) as u128, PRODUCT, purchase.quantity);
    order.shard = purchase.names_shard.then_some(Shard(shard as u16));
    Request::Order(order)
}

/// What the database holds: every share's units.
type Database = BTreeMap<Shard, i64>;

/// The state an attempt locks: the shares of `own` shards in [`ShareMode::Own`], every share
/// otherwise.
fn lock(db: &Database, mode: ShareMode, own: &BTreeSet<Shard>) -> PartitionState {
    let units = db
        .iter()
        .filter(|(shard, _)| mode != ShareMode::Own || own.contains(shard))
        .map(|(&shard, &units)| (shard, units))
        .collect();
    PartitionState {
        stock: HashMap::from([(product(), 0)]),
        shares: HashMap::from([(product(), Shares { mode, units })]),
        ..PartitionState::default()
    }
}

/// Commits one group of batches as the decider does; returns each request's outcome (in the
/// group's order) and the mode of the attempt that committed.
fn commit_group(db: &mut Database, batches: &[Vec<Request>]) -> (Vec<Outcome>, ShareMode) {
    let own: BTreeSet<Shard> = batches
        .iter()
        .flatten()
        .filter_map(|request| match request {
            Request::Order(order) => order.shard,
            Request::Command(_) => None,
        })
        .collect();
    let whole = batches.iter().flatten().any(|request| match request {
        Request::Order(order) => order.shard.is_none(),
        Request::Command(_) => true,
    });
    let mut mode = match whole {
        true => ShareMode::Exclusive,
        false => ShareMode::Own,
    };
    loop {
        let mut state = lock(db, mode, &own);
        let decided: Result<Vec<Decisions>, Escalation> = batches
            .iter()
            .map(|batch| try_decide(&mut state, batch, micros(0)))
            .collect();
        match decided {
            Ok(decisions) => {
                rebalance(&mut state);
                for (shard, units) in &state.shares[&product()].units {
                    db.insert(*shard, *units);
                }
                let outcomes = decisions
                    .iter()
                    .flat_map(|decisions| decisions.number(day(), 1).orders)
                    .map(|decided| decided.outcome)
                    .collect();
                return (outcomes, mode);
            }
            Err(escalation) => {
                assert_eq!(escalation.product, product());
                assert!(
                    escalation.mode > mode,
                    "an escalation asks for more than held: {:?} after {mode:?}",
                    escalation.mode
                );
                mode = escalation.mode;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn shares_decide_as_one_sequential_decider_of_their_sum(scenario in scenario()) {
        let mut db: Database = scenario
            .shares
            .iter()
            .enumerate()
            .map(|(shard, &units)| (Shard(shard as u16), units))
            .collect();
        let mut total: i64 = scenario.shares.iter().sum();
        let mut next = vec![0usize; scenario.queues.len()];
        for step in &scenario.steps {
            let mut batches = Vec::new();
            let mut quantities = Vec::new();
            let mut taken = BTreeSet::new();
            for &(shard, size) in step {
                if !taken.insert(shard) {
                    continue; // one batch per partition in a group
                }
                let queue = &scenario.queues[shard];
                let end = (next[shard] + size).min(queue.len());
                let batch: Vec<Request> = (next[shard]..end)
                    .map(|n| purchase(shard, n, &queue[n]))
                    .collect();
                quantities.extend(queue[next[shard]..end].iter().map(|p| p.quantity));
                next[shard] = end;
                if !batch.is_empty() {
                    batches.push(batch);
                }
            }
            if batches.is_empty() {
                continue;
            }
            let (outcomes, mode) = commit_group(&mut db, &batches);
            prop_assert_eq!(outcomes.len(), quantities.len());
            for (outcome, quantity) in outcomes.iter().zip(&quantities) {
                // The sequential decider of the whole stock, at this request's turn.
                let sells = total >= *quantity;
                match outcome {
                    Outcome::Succeeded(_) => {
                        prop_assert!(sells, "sold {quantity} with {total} left: oversold");
                        total -= quantity;
                    }
                    Outcome::Rejected(rejection) => {
                        prop_assert_eq!(rejection.reason, RejectReason::OutOfStock);
                        prop_assert!(!sells, "refused {quantity} with {total} left: undersold");
                        prop_assert!(mode >= ShareMode::Pooled, "refused without every share held");
                    }
                    Outcome::Held { .. } => prop_assert!(false, "no hold was asked for"),
                }
            }
            prop_assert!(db.values().all(|&units| units >= 0), "a share below zero: {db:?}");
            prop_assert_eq!(db.values().sum::<i64>(), total, "the shares are the stock");
        }
    }
}

#[test]
fn a_short_share_takes_from_the_others_and_they_are_split_again() {
    let mut db: Database = BTreeMap::from([(Shard(0), 0), (Shard(1), 1), (Shard(2), 5)]);
    let batch = vec![
        purchase(
            0,
            0,
            &Purchase {
                quantity: 3,
                names_shard: true,
            },
        ),
        purchase(
            0,
            1,
            &Purchase {
                quantity: 3,
                names_shard: true,
            },
        ),
        purchase(
            0,
            2,
            &Purchase {
                quantity: 1,
                names_shard: true,
            },
        ),
    ];
    let (outcomes, mode) = commit_group(&mut db, &[batch]);
    assert_eq!(mode, ShareMode::Pooled);
    assert!(matches!(outcomes[0], Outcome::Succeeded(_)));
    assert!(matches!(outcomes[1], Outcome::Succeeded(_)));
    assert_eq!(outcomes[2], rejected(RejectReason::OutOfStock));
    assert_eq!(db.values().sum::<i64>(), 0);
}

#[test]
fn an_own_share_that_covers_its_batch_is_decided_alone_and_kept() {
    let mut db: Database = BTreeMap::from([(Shard(0), 2), (Shard(1), 7)]);
    let batch = vec![purchase(
        1,
        0,
        &Purchase {
            quantity: 3,
            names_shard: true,
        },
    )];
    let (outcomes, mode) = commit_group(&mut db, &[batch]);
    assert_eq!(mode, ShareMode::Own);
    assert!(matches!(outcomes[0], Outcome::Succeeded(_)));
    assert_eq!(db, BTreeMap::from([(Shard(0), 2), (Shard(1), 4)]));
}

#[test]
fn holds_orders_of_several_products_and_limited_products_need_the_product_row() {
    let locked = |mode| PartitionState {
        stock: HashMap::from([(product(), 0), (ProductId::try_from(2).unwrap(), 5)]),
        shares: HashMap::from([(
            product(),
            Shares {
                mode,
                units: BTreeMap::from([(Shard(0), 4), (Shard(1), 4)]),
            },
        )]),
        ..PartitionState::default()
    };
    let exclusive = Err(Escalation {
        product: product(),
        mode: ShareMode::Exclusive,
    });
    let mut hold = request(1, PRODUCT, 1);
    hold.shard = Some(Shard(0));
    hold.hold = Some(allot_shared::HoldSeconds::try_from(60).unwrap());
    let several = order(2, 1, &[(PRODUCT, 1), (2, 1)], 0);
    for order in [hold, several] {
        let requests = [Request::Order(order)];
        let decided = try_decide(&mut locked(ShareMode::Pooled), &requests, micros(0));
        assert_eq!(decided.map(|d| d.sold()), exclusive);
        assert!(try_decide(&mut locked(ShareMode::Exclusive), &requests, micros(0)).is_ok());
    }
    let mut limited = locked(ShareMode::Own);
    limited.rules.insert(
        product(),
        Rules {
            max_per_buyer: Some(2),
            ..Rules::default()
        },
    );
    let mut purchase = request(3, PRODUCT, 1);
    purchase.shard = Some(Shard(0));
    let decided = try_decide(&mut limited, &[Request::Order(purchase)], micros(0));
    assert_eq!(decided.map(|d| d.sold()), exclusive);
}
