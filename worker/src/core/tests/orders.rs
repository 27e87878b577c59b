//! Orders of several lines, per-buyer limits, sale windows and pauses, against a sequential
//! model written on plain integers: each order, in arrival order, is checked line by line
//! (unknown product, outside the window, paused, past the buyer's limit, short of stock: the
//! first failing line names the rejection), and takes every line's units or none.

use super::*;
use allot_shared::sale::Sale;
use proptest::sample::Index;

/// A product's rules in the model's terms (times in microseconds after the epoch).
#[derive(Debug, Clone, Default)]
struct ModelRules {
    limit: Option<i64>,
    starts: Option<i64>,
    ends: Option<i64>,
    paused_since: Option<i64>,
    pauses: Vec<(i64, i64)>,
}

impl ModelRules {
    fn to_rules(&self) -> Rules {
        Rules {
            max_per_buyer: self.limit,
            sale: Sale {
                starts_at: self.starts.map(micros),
                ends_at: self.ends.map(micros),
                paused_since: self.paused_since.map(micros),
                pauses: self
                    .pauses
                    .iter()
                    .map(|&(from, to)| (micros(from), micros(to)))
                    .collect(),
            },
        }
    }
}

/// One order of the model: id, user, lines (product, quantity), accepted at.
type ModelOrder = (u128, i64, Vec<(i64, i64)>, i64);

/// The raw material of one batch: stock of products 1..=n (product n + 1 does not exist),
/// their rules, what buyers bought before, and the orders.
#[derive(Debug, Clone)]
struct Scenario {
    stock: Vec<i64>,
    rules: Vec<ModelRules>,
    /// (product index, user, units) bought before the batch; kept within the limit.
    bought: Vec<(Index, i64, i64)>,
    /// (id, user, lines, accepted at)
    orders: Vec<ModelOrder>,
}

fn rules() -> impl Strategy<Value = ModelRules> {
    (
        prop::option::weighted(0.5, 1..5i64),
        prop::option::weighted(0.3, 0..50i64),
        prop::option::weighted(0.3, 1..60i64),
        prop::option::weighted(0.2, 0..100i64),
        prop::collection::vec((0..100i64, 1..30i64), 0..3),
    )
        .prop_map(|(limit, starts, length, paused_since, pauses)| ModelRules {
            limit,
            starts,
            ends: length.map(|length| starts.unwrap_or(0) + length),
            paused_since,
            pauses: pauses
                .into_iter()
                .map(|(from, length)| (from, from + length))
                .collect(),
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    prop::collection::vec(0..15i64, 1..6).prop_flat_map(|stock| {
        let products = stock.len();
        let line = (1..=products as i64 + 1, 1..=4i64);
        let order = (
            0..40u128,
            1..=3i64,
            prop::collection::vec(line, 1..=4),
            0..100i64,
        )
            .prop_map(|(id, user, mut lines, at)| {
                let mut seen = HashSet::new();
                lines.retain(|&(product, _)| seen.insert(product));
                (id, user, lines, at)
            });
        (
            Just(stock),
            prop::collection::vec(rules(), products),
            prop::collection::vec((any::<Index>(), 1..=3i64, 1..4i64), 0..6),
            prop::collection::vec(order, 0..50),
        )
            .prop_map(|(stock, rules, bought, orders)| Scenario {
                stock,
                rules,
                bought,
                orders,
            })
    })
}

/// The core's state for a scenario.
fn initial_state(scenario: &Scenario) -> PartitionState {
    let mut state = PartitionState::default();
    for (index, (&units, rules)) in scenario.stock.iter().zip(&scenario.rules).enumerate() {
        let id = product(index as i64 + 1);
        state.stock.insert(id, units);
        let rules = rules.to_rules();
        if rules != Rules::default() {
            state.rules.insert(id, rules);
        }
    }
    for (index, user_id, units) in bought_before(scenario) {
        state
            .bought
            .insert((product(index as i64 + 1), user(user_id)), units);
    }
    state
}

/// What buyers bought before, within each limited product's limit: (product index, user,
/// units), each pair once.
fn bought_before(scenario: &Scenario) -> Vec<(usize, i64, i64)> {
    let mut seen = HashSet::new();
    scenario
        .bought
        .iter()
        .filter_map(|(index, user, units)| {
            let at = index.index(scenario.stock.len());
            let limit = scenario.rules[at].limit?;
            seen.insert((at, *user))
                .then_some((at, *user, (*units).min(limit)))
        })
        .collect()
}

fn orders_of(scenario: &Scenario) -> Vec<Order> {
    scenario
        .orders
        .iter()
        .map(|(id, user, lines, at)| order(*id, *user, lines, *at))
        .collect()
}

/// The sequential model.
struct Model {
    stock: HashMap<i64, i64>,
    rules: HashMap<i64, ModelRules>,
    bought: HashMap<(i64, i64), i64>,
    decided: HashMap<u128, Outcome>,
    next_seq: i64,
}

impl Model {
    fn new(scenario: &Scenario, first_seq: i64) -> Self {
        let mut model = Model {
            stock: HashMap::new(),
            rules: HashMap::new(),
            bought: HashMap::new(),
            decided: HashMap::new(),
            next_seq: first_seq,
        };
        for (index, (&units, rules)) in scenario.stock.iter().zip(&scenario.rules).enumerate() {
            model.stock.insert(index as i64 + 1, units);
            model.rules.insert(index as i64 + 1, rules.clone());
        }
        for (at, user, units) in bought_before(scenario) {
            model.bought.insert((at as i64 + 1, user), units);
        }
        model
    }

    fn reason(&self, user: i64, product: i64, quantity: i64, at: i64) -> Option<RejectReason> {
        let Some(&stock) = self.stock.get(&product) else {
            return Some(RejectReason::UnknownProduct);
        };
        let rules = &self.rules[&product];
        if rules.starts.is_some_and(|starts| at < starts) {
            return Some(RejectReason::NotStarted);
        }
        if rules.ends.is_some_and(|ends| at >= ends) {
            return Some(RejectReason::Ended);
        }
        if rules.paused_since.is_some_and(|since| since <= at)
            || rules.pauses.iter().any(|&(from, to)| from <= at && at < to)
        {
            return Some(RejectReason::Paused);
        }
        if let Some(limit) = rules.limit {
            let bought = self.bought.get(&(product, user)).copied().unwrap_or(0);
            if bought + quantity > limit {
                return Some(RejectReason::LimitExceeded);
            }
        }
        if stock < quantity {
            return Some(RejectReason::OutOfStock);
        }
        None
    }

    /// The outcome of one order and whether it is new.
    fn apply(&mut self, id: u128, user: i64, lines: &[(i64, i64)], at: i64) -> (Outcome, bool) {
        if let Some(&outcome) = self.decided.get(&id) {
            return (outcome, false);
        }
        let first_failing = lines.iter().find_map(|&(product, quantity)| {
            self.reason(user, product, quantity, at)
                .map(|reason| (product, reason))
        });
        let outcome = match first_failing {
            Some((product_id, reason)) => Outcome::Rejected(Rejection {
                slot: None,
                reason,
                product: (lines.len() > 1).then(|| product(product_id)),
            }),
            None => {
                for &(product, quantity) in lines {
                    *self.stock.get_mut(&product).unwrap() -= quantity;
                    if self.rules[&product].limit.is_some() {
                        *self.bought.entry((product, user)).or_insert(0) += quantity;
                    }
                }
                self.next_seq += 1;
                succeeded(self.next_seq - 1)
            }
        };
        self.decided.insert(id, outcome);
        (outcome, true)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every order gets the model's outcome; stock never goes below zero; no buyer goes past a
    /// limit; the stock falls by exactly the units of the succeeded orders' lines, a rejected
    /// order takes nothing; the buyers' units rise by exactly what they bought of limited
    /// products; a rejection names its product on orders of several lines only.
    #[test]
    fn orders_limits_and_windows_match_the_sequential_model(
        scenario in scenario(),
        first_seq in 1..1000i64,
    ) {
        let mut state = initial_state(&scenario);
        let before = state.clone();
        let orders = orders_of(&scenario);
        let decisions = decide(&mut state, &orders);
        let decided = decisions.number(day(), first_seq);
        prop_assert_eq!(decided.len(), orders.len());

        let mut model = Model::new(&scenario, first_seq);
        let mut taken: HashMap<ProductId, i64> = HashMap::new();
        let mut bought: HashMap<(ProductId, UserId), i64> = HashMap::new();
        for ((id, user_id, lines, at), got) in scenario.orders.iter().zip(&decided) {
            let (expected, fresh) = model.apply(*id, *user_id, lines, *at);
            prop_assert_eq!(got, &Decided { outcome: expected, fresh });
            if fresh && matches!(expected, Outcome::Succeeded(_)) {
                for &(product_id, quantity) in lines {
                    *taken.entry(product(product_id)).or_default() += quantity;
                    if state.rules.get(&product(product_id)).is_some_and(|r| r.max_per_buyer.is_some()) {
                        *bought.entry((product(product_id), user(*user_id))).or_default() += quantity;
                    }
                }
            }
            if let (Outcome::Rejected(rejection), true) = (expected, fresh) {
                prop_assert_eq!(rejection.product.is_some(), lines.len() > 1);
            }
        }
        prop_assert_eq!(decisions.sold(), model.next_seq - first_seq);
        for (id, &units) in &state.stock {
            prop_assert!(units >= 0, "product {} oversold", id);
            prop_assert_eq!(units, model.stock[&id.get()]);
            prop_assert_eq!(before.stock[id] - units, taken.get(id).copied().unwrap_or(0));
        }
        for (&(product_id, user_id), &units) in &state.bought {
            let limit = state.rules[&product_id].max_per_buyer.expect("tracked only with a limit");
            let had = before.bought.get(&(product_id, user_id)).copied().unwrap_or(0);
            prop_assert!(units <= limit.max(had), "buyer {} has {} of {} (limit {})", user_id, units, product_id, limit);
            prop_assert_eq!(units - had, bought.get(&(product_id, user_id)).copied().unwrap_or(0));
            prop_assert_eq!(units, model.bought[&(product_id.get(), user_id.get())]);
        }
    }

    /// The order in which an order lists its products changes nothing but which product a
    /// rejection names: the same orders succeed, with the same numbers, and the same units are
    /// taken.
    #[test]
    fn the_order_of_the_lines_does_not_change_what_is_sold(scenario in scenario()) {
        let orders = orders_of(&scenario);
        let reversed: Vec<Order> = scenario
            .orders
            .iter()
            .map(|(id, user, lines, at)| {
                let lines: Vec<(i64, i64)> = lines.iter().rev().copied().collect();
                order(*id, *user, &lines, *at)
            })
            .collect();
        let mut forward_state = initial_state(&scenario);
        let mut reversed_state = initial_state(&scenario);
        let forward = decide(&mut forward_state, &orders).number(day(), 1);
        let backward = decide(&mut reversed_state, &reversed).number(day(), 1);
        for (a, b) in forward.iter().zip(&backward) {
            match (a.outcome, b.outcome) {
                (Outcome::Succeeded(x), Outcome::Succeeded(y)) => prop_assert_eq!(x, y),
                (Outcome::Rejected(_), Outcome::Rejected(_)) => {}
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert_eq!(a.fresh, b.fresh);
        }
        prop_assert_eq!(forward_state.stock, reversed_state.stock);
        prop_assert_eq!(forward_state.bought, reversed_state.bought);
    }
}

#[test]
fn an_order_is_all_or_nothing_and_names_the_first_line_that_cannot_be_served() {
    let mut state = state(&[(1, 5), (2, 1), (3, 5)]);
    let batch = [
        order(1, 1, &[(1, 2), (2, 2), (3, 1)], 0),
        order(2, 1, &[(3, 1), (1, 2)], 0),
        order(3, 2, &[(1, 1), (9, 1)], 0),
    ];
    let decisions = decide(&mut state, &batch);
    assert_eq!(decisions.sold(), 1);
    let outcomes: Vec<Outcome> = decisions
        .number(day(), 7)
        .iter()
        .map(|d| d.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Rejected(Rejection {
                reason: RejectReason::OutOfStock,
                product: Some(product(2)),
                slot: None,
            }),
            succeeded(7),
            Outcome::Rejected(Rejection {
                reason: RejectReason::UnknownProduct,
                product: Some(product(9)),
                slot: None,
            }),
        ]
    );
    // Only the second order took units.
    assert_eq!(state.stock[&product(1)], 3);
    assert_eq!(state.stock[&product(2)], 1);
    assert_eq!(state.stock[&product(3)], 4);
}

#[test]
fn a_buyer_gets_exactly_the_limit_and_other_buyers_are_not_affected() {
    let mut state = state(&[(1, 100)]);
    state.rules.insert(
        product(1),
        Rules {
            max_per_buyer: Some(3),
            ..Rules::default()
        },
    );
    state.bought.insert((product(1), user(2)), 2);
    let mut batch: Vec<Order> = (0..10).map(|id| order(id, 1, &[(1, 1)], 0)).collect();
    batch.push(order(10, 2, &[(1, 2)], 0));
    batch.push(order(11, 2, &[(1, 1)], 0));
    batch.push(order(12, 3, &[(1, 4)], 0));
    let outcomes: Vec<Outcome> = decide(&mut state, &batch)
        .number(day(), 1)
        .iter()
        .map(|d| d.outcome)
        .collect();
    let limit = rejected(RejectReason::LimitExceeded);
    assert_eq!(outcomes[..3], [succeeded(1), succeeded(2), succeeded(3)]);
    assert!(outcomes[3..10].iter().all(|o| *o == limit));
    assert_eq!(outcomes[10..], [limit, succeeded(4), limit]);
    assert_eq!(state.bought[&(product(1), user(1))], 3);
    assert_eq!(state.bought[&(product(1), user(2))], 3);
    assert!(!state.bought.contains_key(&(product(1), user(3))));
    assert_eq!(state.stock[&product(1)], 96);
}

#[test]
fn requests_are_judged_at_their_acceptance_time_at_the_exact_edges() {
    let mut state = state(&[(1, 100)]);
    state.rules.insert(
        product(1),
        Rules {
            sale: Sale {
                starts_at: Some(micros(1_000)),
                ends_at: Some(micros(2_000)),
                paused_since: Some(micros(1_900)),
                pauses: vec![(micros(1_200), micros(1_300))],
            },
            ..Rules::default()
        },
    );
    let times = [
        999, 1_000, 1_199, 1_200, 1_299, 1_300, 1_899, 1_900, 1_999, 2_000,
    ];
    let batch: Vec<Order> = times
        .iter()
        .enumerate()
        .map(|(id, &at)| order(id as u128, 1, &[(1, 1)], at))
        .collect();
    let reasons: Vec<Option<RejectReason>> = decide(&mut state, &batch)
        .number(day(), 1)
        .iter()
        .map(|d| match d.outcome {
            Outcome::Succeeded(_) | Outcome::Held { .. } => None,
            Outcome::Rejected(rejection) => Some(rejection.reason),
        })
        .collect();
    use RejectReason::{Ended, NotStarted, Paused};
    assert_eq!(
        reasons,
        [
            Some(NotStarted),
            None,
            None,
            Some(Paused),
            Some(Paused),
            None,
            None,
            Some(Paused),
            Some(Paused),
            Some(Ended)
        ]
    );
    assert_eq!(state.stock[&product(1)], 96);
}
