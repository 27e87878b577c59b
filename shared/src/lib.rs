//! Common ground of allot's two binaries: the domain types (ids, quantities, outcomes, order
//! numbers), the message that travels over RabbitMQ, the status record kept in Redis, the
//! partitioning function, configuration, and the database schema.
//!
//! Anything both `allot-api` and `allot-worker` must agree on lives here, so that the two can
//! never disagree about a queue name, a Redis key or the shape of a message.

pub mod amqp;
pub mod brokers;
pub mod clock;
pub mod config;
pub mod db;
pub mod ids;
pub mod message;
pub mod metrics;
pub mod outcome;
pub mod partition;
pub mod sale;
pub mod shutdown;
pub mod status_store;
pub mod stored;
pub mod telemetry;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::CommonConfig;
pub use ids::{
    CommandId, HoldSeconds, PartitionId, ProductId, Quantity, Shard, SlotId, TransactionId, UserId,
};
pub use message::{Command, CommandKind, Line, Lines, Order, PurchaseRequest, Request};
pub use outcome::{
    CommandOutcome, OrderNumber, Outcome, RejectReason, Rejection, Status, TransactionView,
};
