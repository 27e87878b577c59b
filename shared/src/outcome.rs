//! What a purchase request becomes: its status, the reason of a rejection, the order number of a
//! success, and [`TransactionView`], the one JSON shape in which a transaction is stored in Redis
//! and shown to clients.

use crate::ids::{ProductId, Quantity, TransactionId, UserId};
use crate::message::{Line, Order};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a transaction stands. `Pending` until its partition's worker decided it; the two
/// decided states are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Succeeded,
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Succeeded => "succeeded",
            Status::Rejected => "rejected",
        }
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
/// line that could not be served (a one-line transaction's product is its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub product: Option<ProductId>,
}

/// A decided transaction's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded(OrderNumber),
    Rejected(Rejection),
}

impl Outcome {
    /// A rejection that names no line (a one-line transaction, or one refused as a whole).
    pub fn rejected(reason: RejectReason) -> Self {
        Outcome::Rejected(Rejection {
            reason,
            product: None,
        })
    }
}

/// A transaction as clients see it (`GET /api/v1/transaction/{id}`) and as Redis stores it.
///
/// Optional fields are left out of the JSON when empty: `product_id` and `quantity` appear on a
/// transaction of one line, `items` on an order of several; `order_number` only on succeeded
/// transactions, `reason` only on rejected ones (`reason_product_id` on rejected orders of
/// several lines), `decided_at` once decided.
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
    pub created_at: DateTime<Utc>,
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

    /// Sets the status and what goes with it (order number, or reason and the product named).
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
            RejectReason::NotAccepted,
            RejectReason::Unprocessable,
        ] {
            assert_eq!(reason.as_str().parse::<RejectReason>(), Ok(reason));
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }
}
