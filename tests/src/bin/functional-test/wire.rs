//! The JSON bodies the allot API takes and answers, as far as the functional test writes or
//! reads them, and the transaction statuses and rejection reason it judges them by.

use serde::{Deserialize, Serialize};

pub const PENDING: &str = "pending";
pub const SUCCEEDED: &str = "succeeded";
pub const REJECTED: &str = "rejected";
pub const OUT_OF_STOCK: &str = "out_of_stock";

#[derive(Serialize)]
pub struct NewProduct<'a> {
    pub name: &'a str,
    pub stock: i64,
}

#[derive(Deserialize)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub stock: i64,
}

#[derive(Serialize)]
pub struct AddToCart {
    pub user_id: i64,
    pub product_id: i64,
    pub quantity: i64,
}

/// Body of a `202 Accepted` answer to `addToCart`.
#[derive(Deserialize)]
pub struct AcceptedBody {
    pub transaction_id: String,
    pub status: String,
}

/// A transaction as `GET /api/v1/transaction/<id>` shows it.
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

#[derive(Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
