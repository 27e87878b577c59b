//! The decision core: a pure, synchronous function from a partition's state and a batch of
//! requests to their outcomes. No I/O, no clock, no async, so it can be tested exhaustively
//! (see the property tests below); everything around it (consume, commit, publish, ack) lives in
//! the other modules.
//!
//! Deciding is split in two steps because order numbers come from a counter shared by all
//! partitions, which the database should lock for as short a time as possible:
//!
//! 1. [`decide`] settles every request in arrival order against the stock it sees: sell,
//!    reject, or replay an outcome decided earlier (a redelivered or duplicated message).
//! 2. [`Decisions::number`] gives the new sales their order numbers, once the caller has
//!    reserved `sold()` consecutive numbers for the day.

use allot_shared::{OrderNumber, Outcome, ProductId, PurchaseRequest, RejectReason, TransactionId};
use chrono::NaiveDate;
use std::collections::HashMap;

/// What the core needs to know before deciding a batch.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    /// Units left, for every existing product the batch asks for. A product missing here does
    /// not exist.
    pub stock: HashMap<ProductId, i64>,
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
    Reject(RejectReason),
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

/// Decides `requests` in arrival order, taking sold units out of `state.stock`.
///
/// A request succeeds exactly when its product exists and has at least its quantity left at its
/// turn; stock therefore never goes below zero. A transaction id seen earlier (stored, or
/// earlier in this batch) is never decided twice.
pub fn decide(state: &mut PartitionState, requests: &[PurchaseRequest]) -> Decisions {
    let mut first_seen: HashMap<TransactionId, usize> = HashMap::with_capacity(requests.len());
    let mut sold = 0;
    let verdicts = requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            if let Some(&first) = first_seen.get(&request.transaction_id) {
                return Verdict::SameAs(first);
            }
            first_seen.insert(request.transaction_id, index);
            if let Some(&outcome) = state.decided.get(&request.transaction_id) {
                return Verdict::Replay(outcome);
            }
            let Some(stock) = state.stock.get_mut(&request.product_id) else {
                return Verdict::Reject(RejectReason::UnknownProduct);
            };
            let wanted = request.quantity.get();
            if *stock >= wanted {
                *stock -= wanted;
                sold += 1;
                Verdict::Sell
            } else {
                Verdict::Reject(RejectReason::OutOfStock)
            }
        })
        .collect();
    Decisions { verdicts, sold }
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
                Verdict::Reject(reason) => Decided {
                    outcome: Outcome::Rejected(reason),
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
