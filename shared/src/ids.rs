//! Newtypes over the bare integers and uuids of the domain, so that a user id can never be
//! passed where a product id is expected. Their `Deserialize` impls validate, so a value of
//! one of these types is always in range.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Identifies one purchase request from acceptance to its final outcome.
///
/// Chosen by the API (UUIDv7, so ids sort roughly by acceptance time) and carried by the
/// message; the database's primary key on it is what makes every decision happen once.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct TransactionId(pub Uuid);

impl TransactionId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for TransactionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The OpenAPI schema of the positive-id newtypes: `integer`, `int64`, at least 1.
fn positive_integer_schema(what: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .maximum(Some(i64::MAX))
        .description(Some(format!("{what}: a positive 64-bit integer")))
        .into()
}

/// Declares a newtype over a strictly positive `i64` (the range of PostgreSQL's `bigint`).
macro_rules! positive_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub struct $name(i64);

        impl $name {
            /// The raw value, for SQL parameters and keys.
            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = String;

            fn try_from(value: i64) -> Result<Self, Self::Error> {
                if value > 0 {
                    Ok(Self(value))
                } else {
                    Err(format!("{} must be a positive integer, got {value}", $what))
                }
            }
        }

        impl From<$name> for i64 {
            fn from(id: $name) -> i64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        /// OpenAPI: a positive 64-bit integer (written by hand: the derive cannot say `minimum`).
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                positive_integer_schema($what)
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

positive_id!(
    /// A buyer, as the shop identifies them. allot does not manage users; it records the id.
    UserId,
    "user_id"
);
positive_id!(
    /// A product row in PostgreSQL (`products.id`).
    ProductId,
    "product_id"
);
positive_id!(
    /// How many units one request asks for. At least 1; the API also enforces the configured
    /// maximum (`ALLOT_MAX_QUANTITY`).
    Quantity,
    "quantity"
);

positive_id!(
    /// A capacity counter (`slots.id`): a delivery slot, or any finite capacity an order takes
    /// one place of.
    SlotId,
    "slot_id"
);
positive_id!(
    /// How long a hold keeps its units, in seconds. At least 1; the API also enforces the
    /// configured maximum (`ALLOT_MAX_HOLD_SECONDS`).
    HoldSeconds,
    "hold_seconds"
);

/// Identifies one checkout or cancel of a hold (or one expiry the worker asked for), from the
/// API's publish to its decision: the primary key of `hold_commands` decides each once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(pub Uuid);

impl CommandId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for CommandId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One of the `ALLOT_PARTITIONS` partitions; each has its own queue and is decided serially.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PartitionId(pub u16);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One share of a product spread over several partitions (`shards` > 1): 0 to `shards - 1`.
/// Shard `i` of product `p` is decided by partition `(partition_for(p) + i) mod ALLOT_PARTITIONS`
/// (see [`crate::partition::shard_partition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shard(pub u16);

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_ids_reject_zero_and_negatives_with_a_message_naming_the_field() {
        assert_eq!(UserId::try_from(7).map(UserId::get), Ok(7));
        assert_eq!(
            ProductId::try_from(0),
            Err("product_id must be a positive integer, got 0".to_string())
        );
        let err = serde_json::from_str::<Quantity>("-3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("quantity must be a positive integer"), "{err}");
        assert!(serde_json::from_str::<Quantity>("1.5").is_err());
        assert!(serde_json::from_str::<Quantity>("\"2\"").is_err());
        assert!(serde_json::from_str::<Quantity>("9223372036854775808").is_err());
    }
}
