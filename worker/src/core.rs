//! The decision core: a pure, synchronous function from a partition's state and a batch of
//! requests to their outcomes. No I/O, no clock (the decision time is an input), no async, so
//! it can be tested exhaustively (see the property tests below); everything around it (consume,
//! commit, publish, ack) lives in the other modules.
//!
//! A request is an [`Order`] of one or more lines, decided all or nothing: it succeeds exactly
//! when every line can be served at its turn (the product exists, is on sale at the time the
//! API accepted the request, the buyer stays within the product's `max_per_buyer`, and the
//! stock covers the quantity) and its slot, if it names one, has a place left and was booked
//! before the slot ended; then every line's units (and the slot's place) are taken and the
//! order gets one order number. Otherwise nothing is taken, and the rejection's reason is that
//! of the first line that could not be served (named by its product on an order of several
//! lines), or the slot's (named by the slot).
//!
//! An order with `hold_seconds` is a **hold**: what it takes is taken the same way, but it gets
//! no number; it stays [`Outcome::Held`] until a [`Command`] settles it, in the same serial
//! path: a checkout before `expires_at` confirms it (numbered then), a cancel releases it
//! (`cancelled`), and at or after `expires_at` any command releases it (`expired`), giving back
//! exactly what it took. A hold is settled once: a command that finds it settled changes
//! nothing (`not_held`).
//!
//! What a line takes from is a counter: a product's stock (and, for a limited product, the
//! buyer's units), and an order's slot's places. Each counter a batch touches is in the
//! [`PartitionState`], read under its row lock.
//!
//! Deciding is split in two steps because order numbers come from a counter shared by all
//! partitions, which the database should lock for as short a time as possible:
//!
//! 1. [`decide`] settles every request in arrival order against the state it sees: sell, hold,
//!    reject, confirm or release a hold, or replay what was decided earlier (a redelivered or
//!    duplicated message).
//! 2. [`Decisions::number`] gives the new sales (sold outright, or holds confirmed) their order
//!    numbers, once the caller has reserved `sold()` consecutive numbers for the day.
//!
//! A product spread over several partitions (`shards` > 1) is decided from its [`Shares`]
//! instead of its stock; see [`shares`]. [`try_decide`] may then find that the batch needs more
//! of them locked than it holds (an [`Escalation`]): nothing it decided counts, and the caller
//! decides the batch again with them locked. Never is a purchase of such a product refused
//! `out_of_stock` unless every share is held and their sum is below its quantity.

use allot_shared::sale::Sale;
use allot_shared::{
    Command, CommandId, CommandKind, CommandOutcome, Line, Lines, Order, OrderNumber, Outcome,
    ProductId, RejectReason, Rejection, Request, SlotId, TransactionId, UserId,
};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use std::collections::HashMap;

pub mod shares;

pub use shares::{Escalation, ShareMode, Shares};

/// A product's rules, for the products that have any: a per-buyer limit, a sale window,
/// pauses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// The most units one buyer may have succeeded with (or hold); `None`: no limit.
    pub max_per_buyer: Option<i64>,
    /// When the product is on sale.
    pub sale: Sale,
}

/// A capacity counter (a delivery slot), as the batch found it under its row lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Places in all. May be below `taken + held` (staff lowered it): then no place is left.
    pub capacity: i64,
    /// Places of succeeded orders.
    pub taken: i64,
    /// Places of open holds.
    pub held: i64,
    /// Bookable by orders accepted before this time (exclusive); `None`: no end.
    pub ends_at: Option<DateTime<Utc>>,
}

impl Slot {
    /// Places left for a new order.
    pub fn remaining(&self) -> i64 {
        (self.capacity - self.taken - self.held).max(0)
    }
}

/// An open hold that a command of the batch names (or one this batch granted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub user: UserId,
    pub lines: Lines,
    pub slot: Option<SlotId>,
    /// Held while the decision time is before it.
    pub expires_at: DateTime<Utc>,
}

/// What the core needs to know before deciding a batch.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    /// Units for sale (not held), for every existing product the batch names. A product
    /// missing here does not exist.
    pub stock: HashMap<ProductId, i64>,
    /// Units held by open holds, of the products in `stock` that have any.
    pub held: HashMap<ProductId, i64>,
    /// The rules of those products that have any (a product missing here has none).
    pub rules: HashMap<ProductId, Rules>,
    /// Units each buyer has succeeded with or holds, of the products with a `max_per_buyer`,
    /// for every (product, buyer) pair of the batch. A pair missing here has none.
    pub bought: HashMap<(ProductId, UserId), i64>,
    /// Every existing slot the batch names. A slot missing here does not exist.
    pub slots: HashMap<SlotId, Slot>,
    /// The open holds the batch's commands name. A command naming a transaction missing here
    /// finds it not held.
    pub holds: HashMap<TransactionId, Hold>,
    /// Outcomes already stored for transactions of this batch. Such a request is not decided
    /// again: its stored outcome is replayed.
    pub decided: HashMap<TransactionId, Outcome>,
    /// Outcomes already stored for the batch's commands (decided before, or withdrawn by the
    /// API). Such a command does nothing again.
    pub commands: HashMap<CommandId, CommandOutcome>,
    /// The shares of the products spread over several partitions (`shards` > 1), as locked:
    /// such a product's units for sale are there, not in `stock` (where its entry, 0, only
    /// says that it exists).
    pub shares: HashMap<ProductId, Shares>,
}

/// The verdict on one request, before order numbers are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A new sale; its units were taken.
    Sell,
    /// A new hold; its units were taken until `expires_at`.
    Hold { expires_at: DateTime<Utc> },
    /// A new rejection.
    Reject(Rejection),
    /// Decided before this batch (a redelivery or duplicate): replay the stored outcome.
    Replay(Outcome),
    /// The same transaction id (or command id) appeared earlier in this batch, at this index.
    SameAs(usize),
    /// A command that confirmed its hold: a sale, numbered now.
    Confirm,
    /// A command that released its hold for `reason` (`cancelled`, `expired`).
    Release(RejectReason),
    /// A command that changed nothing (the hold was not held, or an expiry not due yet).
    Unchanged,
    /// A command decided (or withdrawn) before this batch: it does nothing again.
    ReplayCommand(CommandOutcome),
}

/// The verdicts on a batch, in arrival order.
#[derive(Debug, Clone)]
pub struct Decisions {
    verdicts: Vec<Verdict>,
    sold: i64,
}

/// An order's final outcome (or its hold), and whether this batch decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    pub outcome: Outcome,
    /// `true` if this batch decided it (and must store it); `false` for a replay or an
    /// in-batch duplicate, whose outcome is already stored or stored once by its first copy.
    pub fresh: bool,
}

/// What a command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandDecided {
    pub outcome: CommandOutcome,
    /// `true` if this batch decided it (and must store it, unless it is an expiry).
    pub fresh: bool,
    /// The hold's new outcome, when this command settled it: succeeded (confirmed, with its
    /// number) or rejected (`cancelled`, `expired`).
    pub settled: Option<Outcome>,
}

/// The numbered decisions of a batch: one per order and one per command, each in arrival
/// order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Numbered {
    pub orders: Vec<Decided>,
    pub commands: Vec<CommandDecided>,
}

/// Decides `requests` in arrival order at time `now` (the decision time: when a hold is
/// granted, and what a hold's expiry is judged against), taking sold and held units out of
/// `state.stock` and giving released ones back, and keeping `state.held`, `state.bought`,
/// `state.slots` and `state.holds` in step.
///
/// An order succeeds (or is held) exactly when each of its lines, and its slot, can be served
/// at its turn (see the module documentation); stock therefore never goes below zero, no slot
/// is booked past its capacity and no buyer goes past a limit. A transaction id (or command
/// id) seen earlier (stored, or earlier in this batch) is never decided twice.
///
/// For a state without [`Shares`] (no product spread over several partitions), which can never
/// escalate; see [`try_decide`].
pub fn decide(state: &mut PartitionState, requests: &[Request], now: DateTime<Utc>) -> Decisions {
    try_decide(state, requests, now).expect("a state without shares never escalates")
}

/// [`decide`], for a state that may hold [`Shares`]: `Err` when a request needs a product's
/// shares held in a stronger [`ShareMode`] than they are (its own share is short, or not held;
/// or it needs the product row: see [`shares`]). Then `state` is left half-changed and nothing
/// may be written: decide the batch again from a fresh state with the product held as asked.
pub fn try_decide(
    state: &mut PartitionState,
    requests: &[Request],
    now: DateTime<Utc>,
) -> Result<Decisions, Escalation> {
    let mut orders_seen: HashMap<TransactionId, usize> = HashMap::with_capacity(requests.len());
    let mut commands_seen: HashMap<CommandId, usize> = HashMap::new();
    let mut sold = 0;
    let verdicts = requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let verdict = match request {
                Request::Order(order) => {
                    if let Some(&first) = orders_seen.get(&order.transaction_id) {
                        return Ok(Verdict::SameAs(first));
                    }
                    orders_seen.insert(order.transaction_id, index);
                    match state.decided.get(&order.transaction_id) {
                        Some(&outcome) => Verdict::Replay(outcome),
                        None => decide_order(state, order, now)?,
                    }
                }
                Request::Command(command) => {
                    if let Some(&first) = commands_seen.get(&command.command_id) {
                        return Ok(Verdict::SameAs(first));
                    }
                    commands_seen.insert(command.command_id, index);
                    match state.commands.get(&command.command_id) {
                        Some(&outcome) => Verdict::ReplayCommand(outcome),
                        None => decide_command(state, command, now)?,
                    }
                }
            };
            if matches!(verdict, Verdict::Sell | Verdict::Confirm) {
                sold += 1;
            }
            Ok(verdict)
        })
        .collect::<Result<_, Escalation>>()?;
    Ok(Decisions { verdicts, sold })
}

/// Splits the stock of every product whose shares are all held ([`ShareMode::Pooled`] or
/// [`ShareMode::Exclusive`]) evenly over them again, once every batch of the attempt is decided:
/// a share that ran dry takes from the others.
pub fn rebalance(state: &mut PartitionState) {
    for shares in state.shares.values_mut() {
        shares.rebalance();
    }
}

/// Sells, holds or rejects a new order.
fn decide_order(
    state: &mut PartitionState,
    order: &Order,
    now: DateTime<Utc>,
) -> Result<Verdict, Escalation> {
    let several = order.lines.len() > 1;
    for line in order.lines.iter() {
        if let Some(reason) = refusal(state, order, line)? {
            return Ok(Verdict::Reject(Rejection {
                reason,
                product: several.then_some(line.product_id),
                slot: None,
            }));
        }
    }
    if let Some(slot) = order.slot
        && let Some(reason) = slot_refusal(state, slot, order.created_at)
    {
        return Ok(Verdict::Reject(Rejection {
            reason,
            product: None,
            slot: Some(slot),
        }));
    }
    let held = order.hold.is_some();
    for line in order.lines.iter() {
        take(state, order, line, held);
    }
    if let Some(slot) = order.slot.and_then(|slot| state.slots.get_mut(&slot)) {
        match held {
            true => slot.held += 1,
            false => slot.taken += 1,
        }
    }
    match order.hold {
        Some(seconds) => {
            // The API allows at most a week; a foreign message asking for more than time can
            // say is held as long as it can be.
            let expires_at = TimeDelta::try_seconds(seconds.get())
                .and_then(|hold| now.checked_add_signed(hold))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            state.holds.insert(
                order.transaction_id,
                Hold {
                    user: order.user_id,
                    lines: order.lines.clone(),
                    slot: order.slot,
                    expires_at,
                },
            );
            Ok(Verdict::Hold { expires_at })
        }
        None => Ok(Verdict::Sell),
    }
}

/// Why `line` of `order` cannot be served now, if it cannot: the product is unknown, not on
/// sale when the order was accepted, past the buyer's limit, or short of stock, in that order.
/// `Err` when its product's shares are not held as the line needs (see [`shares`]).
fn refusal(
    state: &PartitionState,
    order: &Order,
    line: &Line,
) -> Result<Option<RejectReason>, Escalation> {
    let Some(&stock) = state.stock.get(&line.product_id) else {
        return Ok(Some(RejectReason::UnknownProduct));
    };
    let shares = state.shares.get(&line.product_id);
    if let Some(shares) = shares {
        let needed = needed_mode(state, order, line.product_id);
        if needed > shares.mode {
            return Err(Escalation {
                product: line.product_id,
                mode: needed,
            });
        }
    }
    let wanted = line.quantity.get();
    if let Some(rules) = state.rules.get(&line.product_id) {
        if let Some(closed) = rules.sale.closed_at(order.created_at) {
            return Ok(Some(closed));
        }
        if let Some(max) = rules.max_per_buyer {
            let bought = state
                .bought
                .get(&(line.product_id, order.user_id))
                .copied()
                .unwrap_or(0);
            if bought.saturating_add(wanted) > max {
                return Ok(Some(RejectReason::LimitExceeded));
            }
        }
    }
    let Some(shares) = shares else {
        return Ok((stock < wanted).then_some(RejectReason::OutOfStock));
    };
    match shares.available(order.shard) {
        Some(available) if available >= wanted => Ok(None),
        // Every share is held: the product as a whole is short.
        Some(_) if shares.mode != ShareMode::Own => Ok(Some(RejectReason::OutOfStock)),
        // Its own share is short (or not held): the others may have enough.
        _ => Err(Escalation {
            product: line.product_id,
            mode: ShareMode::Pooled,
        }),
    }
}

/// How `order` needs the shares of `product` (a product spread over several partitions) held:
/// from its own share, for a purchase of one line without a hold that names its shard, of a
/// product without a per-buyer limit; with the product row locked for anything else.
fn needed_mode(state: &PartitionState, order: &Order, product: ProductId) -> ShareMode {
    let own = order.shard.is_some()
        && order.lines.len() == 1
        && order.hold.is_none()
        && !is_limited(state, product);
    match own {
        true => ShareMode::Own,
        false => ShareMode::Exclusive,
    }
}

/// Why `slot` cannot take an order accepted `at`, if it cannot: it does not exist, it ended,
/// or it has no place left, in that order.
fn slot_refusal(state: &PartitionState, slot: SlotId, at: DateTime<Utc>) -> Option<RejectReason> {
    let Some(slot) = state.slots.get(&slot) else {
        return Some(RejectReason::UnknownSlot);
    };
    if slot.ends_at.is_some_and(|ends| at >= ends) {
        return Some(RejectReason::SlotEnded);
    }
    (slot.remaining() < 1).then_some(RejectReason::SlotFull)
}

/// Takes `line`'s units, which [`refusal`] found available: out of the stock (or the shares),
/// into the held units if `held`, and into the buyer's units of a limited product.
fn take(state: &mut PartitionState, order: &Order, line: &Line, held: bool) {
    let (user, wanted) = (order.user_id, line.quantity.get());
    match state.shares.get_mut(&line.product_id) {
        Some(shares) => shares.take(order.shard, wanted),
        None => {
            *state
                .stock
                .get_mut(&line.product_id)
                .expect("a line is taken only from a known product") -= wanted;
        }
    }
    if held {
        *state.held.entry(line.product_id).or_insert(0) += wanted;
    }
    if is_limited(state, line.product_id) {
        *state.bought.entry((line.product_id, user)).or_insert(0) += wanted;
    }
}

fn is_limited(state: &PartitionState, product: ProductId) -> bool {
    state
        .rules
        .get(&product)
        .is_some_and(|rules| rules.max_per_buyer.is_some())
}

/// Confirms, releases or leaves alone the hold `command` names.
fn decide_command(
    state: &mut PartitionState,
    command: &Command,
    now: DateTime<Utc>,
) -> Result<Verdict, Escalation> {
    let Some(hold) = state.holds.get(&command.transaction_id) else {
        return Ok(Verdict::Unchanged);
    };
    // A hold's held units are on its products' rows: a sharded one must be locked for update.
    for line in hold.lines.iter() {
        if let Some(shares) = state.shares.get(&line.product_id)
            && shares.mode != ShareMode::Exclusive
        {
            return Err(Escalation {
                product: line.product_id,
                mode: ShareMode::Exclusive,
            });
        }
    }
    if now >= hold.expires_at {
        release(state, command.transaction_id);
        return Ok(Verdict::Release(RejectReason::Expired));
    }
    Ok(match command.kind {
        CommandKind::Checkout => {
            confirm(state, command.transaction_id);
            Verdict::Confirm
        }
        CommandKind::Cancel => {
            release(state, command.transaction_id);
            Verdict::Release(RejectReason::Cancelled)
        }
        // Not due yet (the sweeper's clock ran ahead of this one): nothing to do.
        CommandKind::Expire => Verdict::Unchanged,
    })
}

/// A hold checked out: its units stay taken, now sold (no longer held), and its slot's place
/// moves from held to taken. The buyer's units already count them.
fn confirm(state: &mut PartitionState, id: TransactionId) {
    let hold = state.holds.remove(&id).expect("a held transaction");
    for line in hold.lines.iter() {
        unhold(state, line);
    }
    if let Some(slot) = hold.slot.and_then(|slot| state.slots.get_mut(&slot)) {
        slot.held -= 1;
        slot.taken += 1;
    }
}

/// A hold released: exactly what it took goes back (stock, buyer's units, the slot's place).
fn release(state: &mut PartitionState, id: TransactionId) {
    let hold = state.holds.remove(&id).expect("a held transaction");
    for line in hold.lines.iter() {
        unhold(state, line);
        if let Some(shares) = state.shares.get_mut(&line.product_id) {
            shares.give_back(line.quantity.get());
        } else if let Some(stock) = state.stock.get_mut(&line.product_id) {
            *stock += line.quantity.get();
        }
        if is_limited(state, line.product_id)
            && let Some(units) = state.bought.get_mut(&(line.product_id, hold.user))
        {
            *units = (*units - line.quantity.get()).max(0);
        }
    }
    if let Some(slot) = hold.slot.and_then(|slot| state.slots.get_mut(&slot)) {
        slot.held = (slot.held - 1).max(0);
    }
}

/// Takes `line`'s units out of its product's held units.
fn unhold(state: &mut PartitionState, line: &Line) {
    if let Some(held) = state.held.get_mut(&line.product_id) {
        *held = (*held - line.quantity.get()).max(0);
    }
}

impl Decisions {
    /// How many new sales need an order number: orders sold outright and holds confirmed.
    pub fn sold(&self) -> i64 {
        self.sold
    }

    /// Gives the new sales the order numbers `first_seq ..= first_seq + sold() - 1` of `day`,
    /// in arrival order, and returns every order's outcome and every command's.
    pub fn number(&self, day: NaiveDate, first_seq: i64) -> Numbered {
        let mut next_seq = first_seq;
        let mut next_number = || {
            let number = OrderNumber { day, seq: next_seq };
            next_seq += 1;
            number
        };
        // Where each request's result went: (is a command, index in its list).
        let mut places: Vec<(bool, usize)> = Vec::with_capacity(self.verdicts.len());
        let mut numbered = Numbered::default();
        for verdict in &self.verdicts {
            let order = |outcome, fresh| Some(Decided { outcome, fresh });
            let command = |outcome, fresh, settled| CommandDecided {
                outcome,
                fresh,
                settled,
            };
            let (order_result, command_result) = match *verdict {
                Verdict::Sell => (order(Outcome::Succeeded(next_number()), true), None),
                Verdict::Hold { expires_at } => (order(Outcome::Held { expires_at }, true), None),
                Verdict::Reject(rejection) => (order(Outcome::Rejected(rejection), true), None),
                Verdict::Replay(outcome) => (order(outcome, false), None),
                Verdict::SameAs(first) => match places[first] {
                    (false, at) => (order(numbered.orders[at].outcome, false), None),
                    (true, at) => {
                        let first = numbered.commands[at];
                        (None, Some(command(first.outcome, false, None)))
                    }
                },
                Verdict::Confirm => {
                    let settled = Outcome::Succeeded(next_number());
                    let result = command(CommandOutcome::Confirmed, true, Some(settled));
                    (None, Some(result))
                }
                Verdict::Release(reason) => {
                    let outcome = match reason {
                        RejectReason::Cancelled => CommandOutcome::Cancelled,
                        _ => CommandOutcome::Expired,
                    };
                    let settled = Outcome::rejected(reason);
                    (None, Some(command(outcome, true, Some(settled))))
                }
                Verdict::Unchanged => (None, Some(command(CommandOutcome::NotHeld, true, None))),
                Verdict::ReplayCommand(outcome) => (None, Some(command(outcome, false, None))),
            };
            match (order_result, command_result) {
                (Some(decided), _) => {
                    places.push((false, numbered.orders.len()));
                    numbered.orders.push(decided);
                }
                (None, Some(decided)) => {
                    places.push((true, numbered.commands.len()));
                    numbered.commands.push(decided);
                }
                (None, None) => unreachable!("every verdict has a result"),
            }
        }
        numbered
    }
}

#[cfg(test)]
mod tests;
