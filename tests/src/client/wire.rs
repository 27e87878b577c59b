//! The JSON bodies of allot's API as a client sees them. Read strictly (`deny_unknown_fields`)
//! where the README fixes the shape, and with plain strings for statuses and reasons, so that a
//! wrong value is reported for what it is rather than as a body that does not parse.

use serde::{Deserialize, Serialize};

pub const PENDING: &str = "pending";
pub const SUCCEEDED: &str = "succeeded";
pub const REJECTED: &str = "rejected";
pub const OUT_OF_STOCK: &str = "out_of_stock";

/// The body of `addToCart`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Order {
    pub user_id: i64,
    pub product_id: i64,
    pub quantity: i64,
}

#[derive(Serialize)]
pub struct NewProduct<'a> {
    pub name: &'a str,
    pub stock: i64,
    /// Spread over this many partitions; left out: 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u16>,
}

/// A product as `GET /api/v1/products/{id}` (and creating or restocking one) answers it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    pub id: i64,
    pub name: String,
    /// Units still for sale (held units not counted).
    pub stock: i64,
    /// Units held by open holds; present only when some are.
    #[serde(default)]
    pub held: Option<i64>,
    /// Present only when set, like the sale window and the pause.
    #[serde(default)]
    pub max_per_buyer: Option<i64>,
    #[serde(default)]
    pub sale_starts_at: Option<String>,
    #[serde(default)]
    pub sale_ends_at: Option<String>,
    #[serde(default)]
    pub paused_at: Option<String>,
    /// The partitions its purchases are spread over; present only when more than 1.
    #[serde(default)]
    pub shards: Option<i64>,
}

/// A transaction as `GET /api/v1/transaction/{id}` shows it.
#[derive(Clone, Debug, Deserialize)]
pub struct Transaction {
    pub transaction_id: String,
    pub status: String,
    pub user_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub order_number: Option<String>,
    pub reason: Option<String>,
}

impl Transaction {
    pub fn is_final(&self) -> bool {
        self.status != PENDING
    }
}

/// The one error shape, `{"error": {"code", "message"}}`, and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
