//! What a purchase request becomes: its status, the reason of a rejection, the order number of a
//! success, and [`TransactionView`], the one JSON shape in which a transaction is stored in Redis
//! and shown to clients.

use crate::ids::{HoldSeconds, ProductId, Quantity, SlotId, TransactionId, UserId};
use crate::message::{Line, Order};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a transaction stands. `Pending` until its partition's worker decided it; a hold is
/// then `Held` (its units taken, no order number) until a checkout, a cancel or its expiry;
/// `Succeeded` and `Rejected` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Held,
    Succeeded,
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Held => "held",
            Status::Succeeded => "succeeded",
            Status::Rejected => "rejected",
        }
    }

    /// `Succeeded` or `Rejected`: it will not change again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Rejected)
    }
}

/// Why a request was rejected. Stored in PostgreSQL as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The product had fewer units left than the request asked for.
    OutOfStock,
    /// No product with that id exists.
    UnknownProduct,
    /// The buyer would have more units of the product than its `max_per_buyer`.
    LimitExceeded,
    /// Accepted before the product's `sale_starts_at`.
    NotStarted,
    /// Accepted at or after the product's `sale_ends_at`.
    Ended,
    /// Accepted while staff had paused the product's sale.
    Paused,
    /// The order's slot had no place left (`taken + held` at its capacity).
    SlotFull,
    /// The order was accepted at or after its slot's `ends_at`.
    SlotEnded,
    /// No slot with that id exists (the API refuses such an order with `422`; a message that
    /// names one anyway is rejected).
    UnknownSlot,
    /// A hold released by its holder (or staff): its units went back to the stock.
    Cancelled,
    /// A hold that was not checked out before its `expires_at`: its units went back.
    Expired,
    /// The API answered 503 (the broker's confirm did not come) and withdrew the request before
    /// any worker decided it. Nobody was told this transaction id; the record exists so that a
    /// message the broker stored after all can never take stock.
    NotAccepted,
    /// The worker could not decide the message however often it tried (a deterministic
    /// failure, such as a row the database refuses to write); it was set aside in
    /// `dead_letters` with the error, so that its partition keeps moving.
    Unprocessable,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::OutOfStock => "out_of_stock",
            RejectReason::UnknownProduct => "unknown_product",
            RejectReason::LimitExceeded => "limit_exceeded",
            RejectReason::NotStarted => "not_started",
            RejectReason::Ended => "ended",
            RejectReason::Paused => "paused",
            RejectReason::SlotFull => "slot_full",
            RejectReason::SlotEnded => "slot_ended",
            RejectReason::UnknownSlot => "unknown_slot",
            RejectReason::Cancelled => "cancelled",
            RejectReason::Expired => "expired",
            RejectReason::NotAccepted => "not_accepted",
            RejectReason::Unprocessable => "unprocessable",
        }
    }
}

impl FromStr for RejectReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "out_of_stock" => Ok(RejectReason::OutOfStock),
            "unknown_product" => Ok(RejectReason::UnknownProduct),
            "limit_exceeded" => Ok(RejectReason::LimitExceeded),
            "not_started" => Ok(RejectReason::NotStarted),
            "ended" => Ok(RejectReason::Ended),
            "paused" => Ok(RejectReason::Paused),
            "slot_full" => Ok(RejectReason::SlotFull),
            "slot_ended" => Ok(RejectReason::SlotEnded),
            "unknown_slot" => Ok(RejectReason::UnknownSlot),
            "cancelled" => Ok(RejectReason::Cancelled),
            "expired" => Ok(RejectReason::Expired),
            "not_accepted" => Ok(RejectReason::NotAccepted),
            "unprocessable" => Ok(RejectReason::Unprocessable),
            other => Err(format!("unknown reject reason {other:?}")),
        }
    }
}

/// An order number: the day it was decided on (in `ALLOT_TIMEZONE`) and its place in that
/// day's sequence, which starts at 1 and has no gaps across all partitions.
///
/// Displayed as `YYYYMMDD-nnnnn`: at least five digits, zero-padded, growing past 99999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderNumber {
    pub day: NaiveDate,
    pub seq: i64,
}

impl fmt::Display for OrderNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:05}", self.day.format("%Y%m%d"), self.seq)
    }
}

/// Why a transaction was rejected, and, for an order of several lines, the product of the first
/// line that could not be served (a one-line transaction's product is its own); for a slot's
/// refusal (`slot_full`, `slot_ended`, `unknown_slot`), the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub product: Option<ProductId>,
    pub slot: Option<SlotId>,
}

/// A decided transaction's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded(OrderNumber),
    Rejected(Rejection),
    /// A hold: its units are taken until `expires_at` (exclusive), unless checked out or
    /// cancelled first. Not final.
    Held {
        expires_at: DateTime<Utc>,
    },
}

impl Outcome {
    /// A rejection that names no line (a one-line transaction, or one refused as a whole).
    pub fn rejected(reason: RejectReason) -> Self {
        Outcome::Rejected(Rejection {
            reason,
            product: None,
            slot: None,
        })
    }
}

/// What a checkout or cancel of a hold did, as `hold_commands.outcome` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandOutcome {
    /// A checkout that confirmed the hold: it succeeded, numbered then.
    Confirmed,
    /// A cancel that released the hold.
    Cancelled,
    /// The command came at or after the hold's `expires_at`: the hold expired (released), and
    /// the command did nothing else.
    Expired,
    /// The transaction was not held when the command was decided (already checked out,
    /// cancelled or expired; or not a hold): nothing changed.
    NotHeld,
    /// The API withdrew the command before any worker decided it (its publish was not
    /// confirmed; the client was answered `503`): nothing changes.
    Withdrawn,
}

impl CommandOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Confirmed => "confirmed",
            CommandOutcome::Cancelled => "cancelled",
            CommandOutcome::Expired => "expired",
            CommandOutcome::NotHeld => "not_held",
            CommandOutcome::Withdrawn => "withdrawn",
        }
    }
}

impl FromStr for CommandOutcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "confirmed" => Ok(CommandOutcome::Confirmed),
            "cancelled" => Ok(CommandOutcome::Cancelled),
            "expired" => Ok(CommandOutcome::Expired),
            "not_held" => Ok(CommandOutcome::NotHeld),
            "withdrawn" => Ok(CommandOutcome::Withdrawn),
            other => Err(format!("unknown command outcome {other:?}")),
        }
    }
}

/// A transaction as clients see it (`GET /api/v1/transaction/{id}`) and as Redis stores it.
///
/// Optional fields are left out of the JSON when empty: `product_id` and `quantity` appear on a
/// transaction of one line, `items` on an order of several; `order_number` only on succeeded
/// transactions, `reason` only on rejected ones (`reason_product_id` on rejected orders of
/// several lines, `reason_slot_id` on a slot's refusal), `decided_at` once decided;
/// `hold_seconds` on a hold request, `expires_at` once the hold was granted; `slot_id` on an
/// order for a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TransactionView {
    pub transaction_id: TransactionId,
    pub status: Status,
    pub user_id: UserId,
    /// The product; transactions of one line only (every addToCart, an order of one item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<ProductId>,
    /// Its units; transactions of one line only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Quantity>,
    /// The lines of an order of several products, in the order they were listed; present only
    /// on such orders (2 to 20 lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Line>,
    /// `YYYYMMDD-nnnnn`; succeeded transactions only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "20261122-00001")]
    pub order_number: Option<String>,
    /// Rejected transactions only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RejectReason>,
    /// The product of the first line that could not be served; rejected orders of several
    /// lines only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_product_id: Option<ProductId>,
    /// The slot a rejection names (`slot_full`, `slot_ended`, `unknown_slot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_slot_id: Option<SlotId>,
    /// The capacity counter (delivery slot) the order takes a place of; orders for a slot only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_id: Option<SlotId>,
    /// The hold asked for, in seconds; hold requests only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_seconds: Option<HoldSeconds>,
    /// When the hold ends by itself (exclusive): a checkout decided before it confirms the
    /// hold, at or after it the hold is `rejected` (`expired`) and its units go back. Set once
    /// the hold was granted, and kept after it was checked out, cancelled or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// When it was last decided: the hold granted, then its checkout, cancel or expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
}

impl TransactionView {
    /// The view of a request that was accepted and not yet decided.
    pub fn pending(order: &Order) -> Self {
        let (product_id, quantity, items) = match order.lines.single() {
            Some(line) => (Some(line.product_id), Some(line.quantity), Vec::new()),
            None => (None, None, order.lines.to_vec()),
        };
        Self {
            transaction_id: order.transaction_id,
            status: Status::Pending,
            user_id: order.user_id,
            product_id,
            quantity,
            items,
            order_number: None,
            reason: None,
            reason_product_id: None,
            reason_slot_id: None,
            slot_id: order.slot,
            hold_seconds: order.hold,
            expires_at: None,
            created_at: order.created_at,
            decided_at: None,
        }
    }

    /// The view of a decided request.
    pub fn decided(order: &Order, outcome: Outcome, decided_at: DateTime<Utc>) -> Self {
        let mut view = Self::pending(order);
        view.decided_at = Some(decided_at);
        view.set_outcome(outcome);
        view
    }

    /// Sets the status and what goes with it (order number, or reason and the product or slot
    /// named, or the hold's expiry). A hold's `expires_at` stays once it is settled.
    pub fn set_outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Succeeded(number) => {
                self.status = Status::Succeeded;
                self.order_number = Some(number.to_string());
            }
            Outcome::Rejected(rejection) => {
                self.status = Status::Rejected;
                self.reason = Some(rejection.reason);
                self.reason_product_id = rejection.product;
                self.reason_slot_id = rejection.slot;
            }
            Outcome::Held { expires_at } => {
                self.status = Status::Held;
                self.expires_at = Some(expires_at);
            }
        }
    }

    /// The transaction's lines, however many it has.
    pub fn lines(&self) -> Vec<Line> {
        match (self.product_id, self.quantity) {
            (Some(product_id), Some(quantity)) => vec![Line {
                product_id,
                quantity,
            }],
            _ => self.items.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_numbers_are_zero_padded_to_five_digits_and_grow_past_them() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        assert_eq!(OrderNumber { day, seq: 1 }.to_string(), "20261122-00001");
        assert_eq!(
            OrderNumber { day, seq: 99_999 }.to_string(),
            "20261122-99999"
        );
        assert_eq!(
            OrderNumber { day, seq: 100_000 }.to_string(),
            "20261122-100000"
        );
    }

    #[test]
    fn reject_reasons_round_trip_through_their_names() {
        for reason in [
            RejectReason::OutOfStock,
            RejectReason::UnknownProduct,
            RejectReason::LimitExceeded,
            RejectReason::NotStarted,
            RejectReason::Ended,
            RejectReason::Paused,
            RejectReason::SlotFull,
            RejectReason::SlotEnded,
            RejectReason::UnknownSlot,
            RejectReason::Cancelled,
            RejectReason::Expired,
            RejectReason::NotAccepted,
            RejectReason::Unprocessable,
        ] {
            assert_eq!(reason.as_str().parse::<RejectReason>(), Ok(reason));
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }
}
