//! The message the API publishes to a partition queue and the worker consumes.
//!
//! JSON, so that a message sitting in a queue can be read with any tool during an incident.
//! The transaction id doubles as the AMQP `message_id`.

use crate::ids::{ProductId, Quantity, TransactionId, UserId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One accepted purchase request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseRequest {
    pub transaction_id: TransactionId,
    pub user_id: UserId,
    pub product_id: ProductId,
    pub quantity: Quantity,
    /// When the API accepted it.
    pub created_at: DateTime<Utc>,
}

impl PurchaseRequest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a PurchaseRequest always serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
