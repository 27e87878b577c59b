//! Holds, checkouts, cancels and expiries interleaved with orders (some for a slot), against a
//! sequential model on plain integers. A scenario is a run of batches, each decided at its own
//! time (times grow, so holds expire between batches), each committed into a store that stands
//! for PostgreSQL and built back into the core's state as `commit_batches` builds it (the
//! holds the commands name, the stored outcomes of the batch's ids); some batches are delivered
//! again after their commit (a lost ack). Staff change slot capacities between batches.
//!
//! The model decides each distinct request once, in arrival order: the same refusals as the
//! core of orders (unknown product, limit, stock; then the slot: unknown, ended, full), a hold
//! granted until `now + hold_seconds`, and a command on a hold: not held (nothing), due (released
//! as `expired`), or else confirmed (numbered then) or cancelled. Checked after every batch:
//! every outcome and command result equal to the model's; for every product `stock + held +
//! units sold == initial stock` and held units equal to the open holds' units; for every slot
//! `taken + held` equal to its succeeded and open orders, never more than the capacity when it
//! was booked; order numbers exactly `1..=N` over succeeded transactions only (a hold numbered
//! only when confirmed); a hold ends once, either sold or released, never both.

use super::*;
use allot_shared::{Command, CommandId, CommandKind, HoldSeconds, SlotId};
use std::collections::BTreeMap;

/// One request of a scenario, in the model's terms.
#[derive(Debug, Clone)]
enum Step {
    /// id, user, lines (product, quantity), slot, hold seconds.
    Order(u128, i64, Vec<(i64, i64)>, Option<i64>, Option<i64>),
    /// command id, kind (0 checkout, 1 cancel, 2 expire), the order it names (an index into
    /// the scenario's orders, any of them).
    Command(u128, u8, usize),
}

#[derive(Debug, Clone)]
struct Scenario {
    stock: Vec<i64>,
    /// Per product: its `max_per_buyer`, if any.
    limits: Vec<Option<i64>>,
    /// Per slot: capacity, and `ends_at` in seconds (after the epoch), if any.
    slots: Vec<(i64, Option<i64>)>,
    batches: Vec<ScenarioBatch>,
}

/// A batch of a scenario: the seconds that pass before it, its steps, whether it is delivered
/// again after its commit, and capacity changes applied before it (slot index, new capacity).
type ScenarioBatch = (i64, Vec<Step>, bool, Vec<(usize, i64)>);

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(0..8i64, 1..4),
        prop::collection::vec((0..4i64, prop::option::weighted(0.3, 0..20i64)), 0..3),
    )
        .prop_flat_map(|(stock, slots)| {
            let products = stock.len() as i64;
            let slot_count = slots.len() as i64;
            let line = (1..=products + 1, 1..=3i64);
            let order = (
                0..30u128,
                1..=3i64,
                prop::collection::vec(line, 1..=3),
                prop::option::weighted(0.4, 1..=slot_count + 1),
                prop::option::weighted(0.6, 1..=4i64),
            )
                .prop_map(|(id, user, mut lines, slot, hold)| {
                    let mut seen = HashSet::new();
                    lines.retain(|&(product, _)| seen.insert(product));
                    Step::Order(id, user, lines, slot, hold)
                });
            let command = (0..40u128, 0..3u8, 0..200usize)
                .prop_map(|(id, kind, target)| Step::Command(id, kind, target));
            let step = prop_oneof![3 => order, 2 => command];
            let batch = (
                0..3i64,
                prop::collection::vec(step, 0..8),
                prop::bool::weighted(0.2),
                prop::collection::vec((0..4usize, 0..4i64), 0..2),
            );
            (
                Just(stock),
                prop::collection::vec(prop::option::weighted(0.4, 1..4i64), products as usize),
                Just(slots),
                prop::collection::vec(batch, 1..12),
            )
                .prop_map(|(stock, limits, slots, mut batches)| {
                    same_id_same_command(&mut batches);
                    Scenario {
                        stock,
                        limits,
                        slots,
                        batches,
                    }
                })
        })
}

/// A command id names one command: the API and the sweeper draw a fresh id for each, so two
/// commands with one id are a duplicate delivery, the same kind about the same hold. Every use
/// of an id after the first is made a copy of the first.
fn same_id_same_command(batches: &mut [ScenarioBatch]) {
    let mut first = HashMap::new();
    for (_, steps, _, _) in batches {
        for step in steps {
            if let Step::Command(id, kind, target) = step {
                let (first_kind, first_target) = *first.entry(*id).or_insert((*kind, *target));
                *kind = first_kind;
                *target = first_target;
            }
        }
    }
}

fn seconds(at: i64) -> DateTime<Utc> {
    micros(at * 1_000_000)
}

fn tx(id: u128) -> TransactionId {
    TransactionId(uuid::Uuid::from_u128(id))
}

/// The core's requests of a batch's steps; a command names the `target % orders`-th order of
/// the scenario (a command of a scenario without orders names a transaction that never was).
fn requests(steps: &[Step], orders: &[u128], at: i64) -> Vec<Request> {
    steps
        .iter()
        .map(|step| match step {
            Step::Order(id, user, lines, slot, hold) => {
                let mut order = order(*id, *user, lines, at * 1_000_000);
                order.slot = slot.map(|slot| SlotId::try_from(slot).unwrap());
                order.hold = hold.map(|secs| HoldSeconds::try_from(secs).unwrap());
                Request::Order(order)
            }
            Step::Command(id, kind, target) => {
                let hold = if orders.is_empty() {
                    999
                } else {
                    orders[target % orders.len()]
                };
                Request::Command(Command {
                    kind: [
                        CommandKind::Checkout,
                        CommandKind::Cancel,
                        CommandKind::Expire,
                    ][usize::from(*kind)],
                    command_id: CommandId(uuid::Uuid::from_u128(*id)),
                    transaction_id: tx(hold),
                    created_at: seconds(at),
                })
            }
        })
        .collect()
}

/// What a store (PostgreSQL) holds between batches.
#[derive(Debug, Clone, Default)]
struct Store {
    stock: HashMap<ProductId, i64>,
    held: HashMap<ProductId, i64>,
    rules: HashMap<ProductId, Rules>,
    bought: HashMap<(ProductId, UserId), i64>,
    slots: HashMap<SlotId, Slot>,
    /// Every decided transaction: its order, and its outcome now.
    transactions: HashMap<TransactionId, (Order, Outcome)>,
    commands: HashMap<CommandId, CommandOutcome>,
    last_seq: i64,
}

impl Store {
    /// Decides `batch` at `now` as `commit_batches` does, and commits it.
    fn commit(&mut self, batch: &[Request], now: DateTime<Utc>) -> Numbered {
        let mut holds = HashMap::new();
        let mut commands = HashMap::new();
        let mut decided = HashMap::new();
        for request in batch {
            match request {
                Request::Order(order) => {
                    if let Some((_, outcome)) = self.transactions.get(&order.transaction_id) {
                        decided.insert(order.transaction_id, *outcome);
                    }
                }
                Request::Command(command) => {
                    if let Some((order, Outcome::Held { expires_at })) =
                        self.transactions.get(&command.transaction_id)
                    {
                        let hold = Hold {
                            user: order.user_id,
                            lines: order.lines.clone(),
                            slot: order.slot,
                            expires_at: *expires_at,
                        };
                        holds.insert(command.transaction_id, hold);
                    }
                    // Expiries are never stored (`persist::stored_commands` skips them).
                    if command.kind != CommandKind::Expire
                        && let Some(outcome) = self.commands.get(&command.command_id)
                    {
                        commands.insert(command.command_id, *outcome);
                    }
                }
            }
        }
        let mut state = PartitionState {
            stock: self.stock.clone(),
            held: self.held.clone(),
            rules: self.rules.clone(),
            bought: self.bought.clone(),
            slots: self.slots.clone(),
            holds,
            decided,
            commands,
            shares: HashMap::new(),
        };
        let decisions = super::super::decide(&mut state, batch, now);
        let first_seq = if decisions.sold() == 0 {
            1
        } else {
            self.last_seq + 1
        };
        let numbered = decisions.number(day(), first_seq);
        self.last_seq += decisions.sold();
        self.stock = state.stock;
        self.held = state.held;
        self.bought = state.bought;
        self.slots = state.slots;
        let orders = batch.iter().filter_map(|r| match r {
            Request::Order(order) => Some(order),
            Request::Command(_) => None,
        });
        for (order, decision) in orders.zip(&numbered.orders) {
            if decision.fresh {
                let earlier = self
                    .transactions
                    .insert(order.transaction_id, (order.clone(), decision.outcome));
                assert!(earlier.is_none(), "an order is decided once");
            }
        }
        let commands = batch.iter().filter_map(|r| match r {
            Request::Command(command) => Some(command),
            Request::Order(_) => None,
        });
        for (command, decision) in commands.zip(&numbered.commands) {
            if let Some(outcome) = decision.settled {
                let (_, stored) = self
                    .transactions
                    .get_mut(&command.transaction_id)
                    .expect("a settled hold is stored");
                assert!(matches!(stored, Outcome::Held { .. }), "settled once");
                *stored = outcome;
            }
            if decision.fresh && command.kind != CommandKind::Expire {
                let earlier = self.commands.insert(command.command_id, decision.outcome);
                assert!(earlier.is_none(), "a command is decided once");
            }
        }
        numbered
    }
}

/// A hold in the model: user, lines, slot, expires at (seconds), status.
#[derive(Debug, Clone, PartialEq)]
struct ModelHold {
    user: i64,
    lines: Vec<(i64, i64)>,
    slot: Option<i64>,
    expires: i64,
}

/// The sequential model.
#[derive(Debug, Default)]
struct Model {
    stock: BTreeMap<i64, i64>,
    held: BTreeMap<i64, i64>,
    limits: BTreeMap<i64, i64>,
    bought: BTreeMap<(i64, i64), i64>,
    /// capacity, taken, held, ends_at
    slots: BTreeMap<i64, (i64, i64, i64, Option<i64>)>,
    outcomes: BTreeMap<u128, Outcome>,
    open: BTreeMap<u128, ModelHold>,
    commands: BTreeMap<u128, CommandOutcome>,
    /// What each command id did in the current batch (a copy later in the batch does the same).
    batch_seen: BTreeMap<u128, CommandOutcome>,
    last_seq: i64,
}

impl Model {
    fn new(scenario: &Scenario) -> Self {
        let mut model = Model::default();
        for (index, &units) in scenario.stock.iter().enumerate() {
            let id = index as i64 + 1;
            model.stock.insert(id, units);
            if let Some(limit) = scenario.limits[index] {
                model.limits.insert(id, limit);
            }
        }
        for (index, &(capacity, ends)) in scenario.slots.iter().enumerate() {
            model.slots.insert(index as i64 + 1, (capacity, 0, 0, ends));
        }
        model
    }

    fn next_number(&mut self) -> Outcome {
        self.last_seq += 1;
        succeeded(self.last_seq)
    }

    fn order(
        &mut self,
        id: u128,
        user: i64,
        lines: &[(i64, i64)],
        slot: Option<i64>,
        hold: Option<i64>,
        now: i64,
    ) {
        if self.outcomes.contains_key(&id) {
            return;
        }
        let several = lines.len() > 1;
        let mut refusal = None;
        for &(product, quantity) in lines {
            let reason = match self.stock.get(&product) {
                None => Some(RejectReason::UnknownProduct),
                Some(_)
                    if self.limits.get(&product).is_some_and(|&limit| {
                        self.bought.get(&(product, user)).copied().unwrap_or(0) + quantity > limit
                    }) =>
                {
                    Some(RejectReason::LimitExceeded)
                }
                Some(&stock) if stock < quantity => Some(RejectReason::OutOfStock),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                refusal = Some(Rejection {
                    reason,
                    product: several.then(|| product_id(product)),
                    slot: None,
                });
                break;
            }
        }
        if refusal.is_none()
            && let Some(slot) = slot
        {
            let reason = match self.slots.get(&slot) {
                None => Some(RejectReason::UnknownSlot),
                Some(&(_, _, _, Some(ends))) if now >= ends => Some(RejectReason::SlotEnded),
                Some(&(capacity, taken, held, _)) if taken + held >= capacity => {
                    Some(RejectReason::SlotFull)
                }
                Some(_) => None,
            };
            refusal = reason.map(|reason| Rejection {
                reason,
                product: None,
                slot: Some(SlotId::try_from(slot).unwrap()),
            });
        }
        if let Some(rejection) = refusal {
            self.outcomes.insert(id, Outcome::Rejected(rejection));
            return;
        }
        for &(product, quantity) in lines {
            *self.stock.get_mut(&product).unwrap() -= quantity;
            if hold.is_some() {
                *self.held.entry(product).or_default() += quantity;
            }
            if self.limits.contains_key(&product) {
                *self.bought.entry((product, user)).or_default() += quantity;
            }
        }
        if let Some(slot) = slot {
            let entry = self.slots.get_mut(&slot).unwrap();
            match hold {
                Some(_) => entry.2 += 1,
                None => entry.1 += 1,
            }
        }
        let outcome = match hold {
            Some(secs) => {
                self.open.insert(
                    id,
                    ModelHold {
                        user,
                        lines: lines.to_vec(),
                        slot,
                        expires: now + secs,
                    },
                );
                Outcome::Held {
                    expires_at: seconds(now + secs),
                }
            }
            None => self.next_number(),
        };
        self.outcomes.insert(id, outcome);
    }

    /// A command, as the core must decide it; returns what it did.
    fn command(&mut self, id: u128, kind: u8, hold: u128, now: i64) -> CommandOutcome {
        if let Some(&first) = self.batch_seen.get(&id) {
            return first;
        }
        if kind != 2
            && let Some(&stored) = self.commands.get(&id)
        {
            self.batch_seen.insert(id, stored);
            return stored;
        }
        let result = match self.open.get(&hold).cloned() {
            None => CommandOutcome::NotHeld,
            Some(open) if now >= open.expires => {
                self.release(hold, &open, RejectReason::Expired);
                CommandOutcome::Expired
            }
            Some(open) => match kind {
                0 => {
                    self.open.remove(&hold);
                    for &(product, quantity) in &open.lines {
                        *self.held.get_mut(&product).unwrap() -= quantity;
                    }
                    if let Some(slot) = open.slot {
                        let entry = self.slots.get_mut(&slot).unwrap();
                        entry.2 -= 1;
                        entry.1 += 1;
                    }
                    let number = self.next_number();
                    self.outcomes.insert(hold, number);
                    CommandOutcome::Confirmed
                }
                1 => {
                    self.release(hold, &open, RejectReason::Cancelled);
                    CommandOutcome::Cancelled
                }
                _ => CommandOutcome::NotHeld,
            },
        };
        self.batch_seen.insert(id, result);
        if kind != 2 {
            self.commands.insert(id, result);
        }
        result
    }

    fn release(&mut self, id: u128, hold: &ModelHold, reason: RejectReason) {
        self.open.remove(&id);
        for &(product, quantity) in &hold.lines {
            *self.held.get_mut(&product).unwrap() -= quantity;
            *self.stock.get_mut(&product).unwrap() += quantity;
            if self.limits.contains_key(&product) {
                *self.bought.get_mut(&(product, hold.user)).unwrap() -= quantity;
            }
        }
        if let Some(slot) = hold.slot {
            self.slots.get_mut(&slot).unwrap().2 -= 1;
        }
        self.outcomes.insert(id, rejected(reason));
    }
}

fn product_id(id: i64) -> ProductId {
    product(id)
}

/// The store's state with zero entries dropped, in the model's terms.
fn nonzero<K: Ord + Copy>(map: impl IntoIterator<Item = (K, i64)>) -> BTreeMap<K, i64> {
    map.into_iter().filter(|&(_, units)| units != 0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn holds_checkouts_cancels_and_expiries_match_the_sequential_model(scenario in scenario()) {
        let mut store = Store::default();
        for (index, (&units, limit)) in scenario.stock.iter().zip(&scenario.limits).enumerate() {
            let id = product(index as i64 + 1);
            store.stock.insert(id, units);
            if let Some(limit) = limit {
                store.rules.insert(id, Rules { max_per_buyer: Some(*limit), ..Rules::default() });
            }
        }
        for (index, &(capacity, ends)) in scenario.slots.iter().enumerate() {
            let slot = Slot { capacity, taken: 0, held: 0, ends_at: ends.map(seconds) };
            store.slots.insert(SlotId::try_from(index as i64 + 1).unwrap(), slot);
        }
        let mut model = Model::new(&scenario);
        let orders: Vec<u128> = scenario.batches.iter()
            .flat_map(|(_, steps, _, _)| steps.iter())
            .filter_map(|step| match step { Step::Order(id, ..) => Some(*id), Step::Command(..) => None })
            .collect();
        let mut now = 0;
        for (pause, steps, again, capacities) in &scenario.batches {
            now += pause;
            for &(slot, capacity) in capacities {
                let id = slot as i64 + 1;
                if let Some(stored) = store.slots.get_mut(&SlotId::try_from(id).unwrap()) {
                    stored.capacity = capacity;
                    model.slots.get_mut(&id).unwrap().0 = capacity;
                }
            }
            let batch = requests(steps, &orders, now);
            let before = store.slots.clone();
            let numbered = store.commit(&batch, seconds(now));
            // The model, step by step.
            model.batch_seen.clear();
            let mut expected_commands = Vec::new();
            for (step, request) in steps.iter().zip(&batch) {
                match (step, request) {
                    (Step::Order(id, user, lines, slot, hold), _) => {
                        model.order(*id, *user, lines, *slot, *hold, now);
                    }
                    (Step::Command(id, kind, _), Request::Command(command)) => {
                        let hold = command.transaction_id.0.as_u128();
                        expected_commands.push(model.command(*id, *kind, hold, now));
                    }
                    _ => unreachable!(),
                }
            }
            // Outcomes of the orders and commands.
            for (id, (_, outcome)) in &store.transactions {
                prop_assert_eq!(Some(outcome), model.outcomes.get(&id.0.as_u128()), "transaction {}", id);
            }
            prop_assert_eq!(store.transactions.len(), model.outcomes.len());
            let commands: BTreeMap<u128, CommandOutcome> =
                store.commands.iter().map(|(id, o)| (id.0.as_u128(), *o)).collect();
            prop_assert_eq!(&commands, &model.commands);
            let results: Vec<CommandOutcome> = numbered.commands.iter().map(|d| d.outcome).collect();
            prop_assert_eq!(&results, &expected_commands);
            // Counters.
            prop_assert_eq!(nonzero(store.stock.iter().map(|(p, u)| (p.get(), *u))), nonzero(model.stock.clone()));
            prop_assert_eq!(nonzero(store.held.iter().map(|(p, u)| (p.get(), *u))), nonzero(model.held.clone()));
            prop_assert_eq!(
                nonzero(store.bought.iter().map(|((p, u), n)| ((p.get(), u.get()), *n))),
                nonzero(model.bought.clone())
            );
            for (id, slot) in &store.slots {
                let (capacity, taken, held, _) = model.slots[&id.get()];
                prop_assert_eq!((slot.capacity, slot.taken, slot.held), (capacity, taken, held));
                // Never booked past the capacity: places grow only within it.
                let was = &before[id];
                if slot.taken + slot.held > was.taken + was.held {
                    prop_assert!(slot.taken + slot.held <= slot.capacity, "slot {} overbooked", id);
                }
            }
            // Conservation: stock + held + sold == initial, per product; held == open holds.
            let mut sold: HashMap<ProductId, i64> = HashMap::new();
            let mut open: HashMap<ProductId, i64> = HashMap::new();
            let mut seqs = Vec::new();
            for (order, outcome) in store.transactions.values() {
                let into = match outcome {
                    Outcome::Succeeded(number) => { seqs.push(number.seq); &mut sold }
                    Outcome::Held { .. } => &mut open,
                    Outcome::Rejected(_) => continue,
                };
                for line in order.lines.iter() {
                    *into.entry(line.product_id).or_default() += line.quantity.get();
                }
            }
            for (index, &initial) in scenario.stock.iter().enumerate() {
                let id = product(index as i64 + 1);
                let get = |map: &HashMap<ProductId, i64>| map.get(&id).copied().unwrap_or(0);
                prop_assert_eq!(get(&store.stock) + get(&store.held) + get(&sold), initial, "product {}", id);
                prop_assert_eq!(get(&store.held), get(&open));
                prop_assert!(get(&store.stock) >= 0);
            }
            seqs.sort_unstable();
            prop_assert_eq!(&seqs, &(1..=store.last_seq).collect::<Vec<_>>(), "gapless over succeeded only");
            // Delivered again after its commit: everything is replayed, nothing changes.
            if *again {
                let snapshot = (store.stock.clone(), store.held.clone(), store.slots.clone(),
                                store.bought.clone(), store.last_seq, store.commands.clone());
                let outcomes: HashMap<TransactionId, Outcome> =
                    store.transactions.iter().map(|(id, (_, o))| (*id, *o)).collect();
                let replayed = store.commit(&batch, seconds(now));
                prop_assert!(replayed.orders.iter().all(|d| !d.fresh));
                prop_assert!(replayed.commands.iter().all(|d| d.settled.is_none()));
                prop_assert_eq!(
                    (store.stock.clone(), store.held.clone(), store.slots.clone(),
                     store.bought.clone(), store.last_seq, store.commands.clone()),
                    snapshot
                );
                let after: HashMap<TransactionId, Outcome> =
                    store.transactions.iter().map(|(id, (_, o))| (*id, *o)).collect();
                prop_assert_eq!(after, outcomes);
            }
        }
    }
}

fn held_order(id: u128, product: i64, quantity: i64, secs: i64) -> Request {
    let mut order = order(id, 1, &[(product, quantity)], 0);
    order.hold = Some(HoldSeconds::try_from(secs).unwrap());
    Request::Order(order)
}

fn command(id: u128, kind: CommandKind, hold: u128) -> Request {
    Request::Command(Command {
        kind,
        command_id: CommandId(uuid::Uuid::from_u128(id)),
        transaction_id: tx(hold),
        created_at: micros(0),
    })
}

#[test]
fn a_checkout_one_microsecond_before_the_expiry_confirms_and_one_at_it_releases() {
    let mut store = Store::default();
    store.stock.insert(product(1), 2);
    let granted = store.commit(
        &[held_order(1, 1, 1, 60), held_order(2, 1, 1, 60)],
        seconds(100),
    );
    let expires_at = seconds(160);
    assert_eq!(
        granted.orders[0],
        Decided {
            outcome: Outcome::Held { expires_at },
            fresh: true
        }
    );
    assert_eq!(store.stock[&product(1)], 0);
    assert_eq!(store.held[&product(1)], 2);
    assert_eq!(granted.orders.len(), 2);

    let just_before = expires_at - TimeDelta::microseconds(1);
    let checked_out = store.commit(&[command(10, CommandKind::Checkout, 1)], just_before);
    assert_eq!(
        checked_out.commands,
        [CommandDecided {
            outcome: CommandOutcome::Confirmed,
            fresh: true,
            settled: Some(succeeded(1)),
        }]
    );
    // At the instant: expired, whatever the command.
    let too_late = store.commit(&[command(11, CommandKind::Checkout, 2)], expires_at);
    assert_eq!(
        too_late.commands,
        [CommandDecided {
            outcome: CommandOutcome::Expired,
            fresh: true,
            settled: Some(rejected(RejectReason::Expired)),
        }]
    );
    assert_eq!(
        store.stock[&product(1)],
        1,
        "the expired unit is back, once"
    );
    assert_eq!(store.held.get(&product(1)).copied().unwrap_or(0), 0);
    // The sweeper's expiry of both, afterwards: neither is held, nothing changes.
    let swept = store.commit(
        &[
            command(12, CommandKind::Expire, 1),
            command(13, CommandKind::Expire, 2),
        ],
        expires_at + TimeDelta::seconds(1),
    );
    assert!(
        swept
            .commands
            .iter()
            .all(|d| d.outcome == CommandOutcome::NotHeld && d.settled.is_none())
    );
    assert_eq!(store.stock[&product(1)], 1);
    assert_eq!(
        store.last_seq, 1,
        "numbered once: only the checkout that won"
    );
}

#[test]
fn an_expiry_that_is_not_due_yet_changes_nothing_and_a_cancel_gives_everything_back() {
    let mut store = Store::default();
    store.stock.insert(product(1), 5);
    store.rules.insert(
        product(1),
        Rules {
            max_per_buyer: Some(3),
            ..Rules::default()
        },
    );
    let slot = SlotId::try_from(1).unwrap();
    store.slots.insert(
        slot,
        Slot {
            capacity: 1,
            taken: 0,
            held: 0,
            ends_at: None,
        },
    );
    let mut order = order(1, 7, &[(1, 3)], 0);
    order.hold = Some(HoldSeconds::try_from(30).unwrap());
    order.slot = Some(slot);
    store.commit(&[Request::Order(order)], seconds(0));
    assert_eq!(store.slots[&slot].held, 1);
    assert_eq!(
        store.bought[&(product(1), user(7))],
        3,
        "held units count against the limit"
    );
    // The limit and the slot are full while held.
    let mut more = self::order(2, 7, &[(1, 1)], 0);
    more.slot = Some(slot);
    let refused = store.commit(&[Request::Order(more)], seconds(1));
    assert_eq!(
        refused.orders[0].outcome,
        rejected(RejectReason::LimitExceeded)
    );
    let early = store.commit(&[command(20, CommandKind::Expire, 1)], seconds(29));
    assert_eq!(early.commands[0].settled, None);
    let cancelled = store.commit(&[command(21, CommandKind::Cancel, 1)], seconds(29));
    assert_eq!(
        cancelled.commands[0].settled,
        Some(rejected(RejectReason::Cancelled))
    );
    assert_eq!(store.stock[&product(1)], 5);
    assert_eq!(
        store
            .bought
            .get(&(product(1), user(7)))
            .copied()
            .unwrap_or(0),
        0
    );
    assert_eq!((store.slots[&slot].taken, store.slots[&slot].held), (0, 0));
    // Cancelled twice: the second finds it not held.
    let again = store.commit(&[command(22, CommandKind::Cancel, 1)], seconds(29));
    assert_eq!(again.commands[0].outcome, CommandOutcome::NotHeld);
    // The same cancel delivered again: replayed as it was.
    let replay = store.commit(&[command(21, CommandKind::Cancel, 1)], seconds(40));
    assert_eq!(
        replay.commands[0],
        CommandDecided {
            outcome: CommandOutcome::Cancelled,
            fresh: false,
            settled: None
        }
    );
}

#[test]
fn a_slot_takes_one_place_per_order_and_refuses_past_its_capacity_or_its_end() {
    let mut store = Store::default();
    store.stock.insert(product(1), 10);
    store.stock.insert(product(2), 0);
    let slot = SlotId::try_from(4).unwrap();
    store.slots.insert(
        slot,
        Slot {
            capacity: 1,
            taken: 0,
            held: 0,
            ends_at: Some(seconds(50)),
        },
    );
    let for_slot = |id: u128, lines: &[(i64, i64)], at: i64| {
        let mut order = order(id, 1, lines, at * 1_000_000);
        order.slot = Some(slot);
        Request::Order(order)
    };
    let decided = store.commit(
        &[
            for_slot(1, &[(1, 1), (2, 1)], 0), // product 2 is out: nothing taken
            for_slot(2, &[(1, 2)], 0),
            for_slot(3, &[(1, 1)], 0),
            for_slot(4, &[(1, 1)], 50),
        ],
        seconds(60),
    );
    let outcomes: Vec<Outcome> = decided.orders.iter().map(|d| d.outcome).collect();
    let slot_refusal = |reason| {
        Outcome::Rejected(Rejection {
            reason,
            product: None,
            slot: Some(slot),
        })
    };
    assert_eq!(
        outcomes,
        [
            Outcome::Rejected(Rejection {
                reason: RejectReason::OutOfStock,
                product: Some(product(2)),
                slot: None
            }),
            succeeded(1),
            slot_refusal(RejectReason::SlotFull),
            slot_refusal(RejectReason::SlotEnded),
        ]
    );
    assert_eq!(store.stock[&product(1)], 8);
    assert_eq!(store.slots[&slot].taken, 1);
}
