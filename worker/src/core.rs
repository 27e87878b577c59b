//! The decision core: a pure, synchronous function from a partition's state and a batch of
//! requests to their outcomes. No I/O, no clock, no async, so it can be tested exhaustively
//! (see the property tests below); everything around it (consume, commit, publish, ack) lives in
//! the other modules.
//!
//! A request is an [`Order`] of one or more lines, decided all or nothing: it succeeds exactly
//! when every line can be served at its turn (the product exists, is on sale at the time the
//! API accepted the request, the buyer stays within the product's `max_per_buyer`, and the
//! stock covers the quantity); then every line's units are taken and the order gets one order
//! number. Otherwise nothing is taken, and the rejection's reason is that of the first line
//! that could not be served (named by its product on an order of several lines).
//!
//! Deciding is split in two steps because order numbers come from a counter shared by all
//! partitions, which the database should lock for as short a time as possible:
//!
//! 1. [`decide`] settles every request in arrival order against the state it sees: sell,
//!    reject, or replay an outcome decided earlier (a redelivered or duplicated message).
//! 2. [`Decisions::number`] gives the new sales their order numbers, once the caller has
//!    reserved `sold()` consecutive numbers for the day.
//!
//! What a line takes from is a counter: today a product's stock (and, for a limited product,
//! the buyer's units). A verdict other than sell or reject (a hold that expires) would be one
//! more [`Verdict`]; other counters (capacity slots) one more map beside `stock`.

use allot_shared::sale::Sale;
use allot_shared::{
    Line, Order, OrderNumber, Outcome, ProductId, RejectReason, Rejection, TransactionId, UserId,
};
use chrono::NaiveDate;
use std::collections::HashMap;

/// A product's rules, for the products that have any: a per-buyer limit, a sale window,
/// pauses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// The most units one buyer may have succeeded with; `None`: no limit.
    pub max_per_buyer: Option<i64>,
    /// When the product is on sale.
    pub sale: Sale,
}

/// What the core needs to know before deciding a batch.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    /// Units left, for every existing product the batch asks for. A product missing here does
    /// not exist.
    pub stock: HashMap<ProductId, i64>,
    /// The rules of those products that have any (a product missing here has none).
    pub rules: HashMap<ProductId, Rules>,
    /// Units each buyer has succeeded with, of the products with a `max_per_buyer`, for every
    /// (product, buyer) pair of the batch. A pair missing here has none.
    pub bought: HashMap<(ProductId, UserId), i64>,
    /// Outcomes already stored for transactions of this batch. Such a request is not decided
    /// again: its stored outcome is replayed.
    pub decided: HashMap<TransactionId, Outcome>,
}

/// The verdict on one request, before order numbers are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A new sale; its units were taken from the stock.
    Sell,
    /// A new rejection.
    Reject(Rejection),
    /// Decided before this batch (a redelivery or duplicate): replay the stored outcome.
    Replay(Outcome),
    /// The same transaction id appeared earlier in this batch, at this index.
    SameAs(usize),
}

/// The verdicts on a batch, in arrival order.
#[derive(Debug, Clone)]
pub struct Decisions {
    verdicts: Vec<Verdict>,
    sold: i64,
}

/// One request's final outcome, and whether this batch decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    pub outcome: Outcome,
    /// `true` if this batch decided it (and must store it); `false` for a replay or an
    /// in-batch duplicate, whose outcome is already stored or stored once by its first copy.
    pub fresh: bool,
}

/// Decides `orders` in arrival order, taking sold units out of `state.stock` (and adding them
/// to `state.bought` for limited products).
///
/// An order succeeds exactly when each of its lines can be served at its turn (see the module
/// documentation); stock therefore never goes below zero and no buyer goes past a limit. A
/// transaction id seen earlier (stored, or earlier in this batch) is never decided twice.
pub fn decide(state: &mut PartitionState, orders: &[Order]) -> Decisions {
    let mut first_seen: HashMap<TransactionId, usize> = HashMap::with_capacity(orders.len());
    let mut sold = 0;
    let verdicts = orders
        .iter()
        .enumerate()
        .map(|(index, order)| {
            if let Some(&first) = first_seen.get(&order.transaction_id) {
                return Verdict::SameAs(first);
            }
            first_seen.insert(order.transaction_id, index);
            if let Some(&outcome) = state.decided.get(&order.transaction_id) {
                return Verdict::Replay(outcome);
            }
            let several = order.lines.len() > 1;
            for line in order.lines.iter() {
                if let Some(reason) = refusal(state, order, line) {
                    return Verdict::Reject(Rejection {
                        reason,
                        product: several.then_some(line.product_id),
                    });
                }
            }
            for line in order.lines.iter() {
                take(state, order.user_id, line);
            }
            sold += 1;
            Verdict::Sell
        })
        .collect();
    Decisions { verdicts, sold }
}

/// Why `line` of `order` cannot be served now, if it cannot: the product is unknown, not on
/// sale when the order was accepted, past the buyer's limit, or short of stock, in that order.
fn refusal(state: &PartitionState, order: &Order, line: &Line) -> Option<RejectReason> {
    let Some(&stock) = state.stock.get(&line.product_id) else {
        return Some(RejectReason::UnknownProduct);
    };
    let wanted = line.quantity.get();
    if let Some(rules) = state.rules.get(&line.product_id) {
        if let Some(closed) = rules.sale.closed_at(order.created_at) {
            return Some(closed);
        }
        if let Some(max) = rules.max_per_buyer {
            let bought = state
                .bought
                .get(&(line.product_id, order.user_id))
                .copied()
                .unwrap_or(0);
            if bought.saturating_add(wanted) > max {
                return Some(RejectReason::LimitExceeded);
            }
        }
    }
    (stock < wanted).then_some(RejectReason::OutOfStock)
}

/// Takes `line`'s units, which [`refusal`] found available.
fn take(state: &mut PartitionState, user: UserId, line: &Line) {
    let wanted = line.quantity.get();
    *state
        .stock
        .get_mut(&line.product_id)
        .expect("a line is taken only from a known product") -= wanted;
    let limited = state
        .rules
        .get(&line.product_id)
        .is_some_and(|rules| rules.max_per_buyer.is_some());
    if limited {
        *state.bought.entry((line.product_id, user)).or_insert(0) += wanted;
    }
}

impl Decisions {
    /// How many new sales need an order number.
    pub fn sold(&self) -> i64 {
        self.sold
    }

    /// Gives the new sales the order numbers `first_seq ..= first_seq + sold() - 1` of `day`,
    /// in arrival order, and returns every request's outcome.
    pub fn number(&self, day: NaiveDate, first_seq: i64) -> Vec<Decided> {
        let mut next_seq = first_seq;
        let mut decided: Vec<Decided> = Vec::with_capacity(self.verdicts.len());
        for verdict in &self.verdicts {
            let entry = match *verdict {
                Verdict::Sell => {
                    let number = OrderNumber { day, seq: next_seq };
                    next_seq += 1;
                    Decided {
                        outcome: Outcome::Succeeded(number),
                        fresh: true,
                    }
                }
                Verdict::Reject(rejection) => Decided {
                    outcome: Outcome::Rejected(rejection),
                    fresh: true,
                },
                Verdict::Replay(outcome) => Decided {
                    outcome,
                    fresh: false,
                },
                Verdict::SameAs(first) => Decided {
                    outcome: decided[first].outcome,
                    fresh: false,
                },
            };
            decided.push(entry);
        }
        decided
    }
}

#[cfg(test)]
mod tests;
