//! All of the worker's SQL. The statements of a group of batches (one per partition, see
//! [`crate::group`]) run in one PostgreSQL transaction, which [`crate::decider`] opens and
//! commits around the pure core: lock the product rows, load the outcomes already stored for
//! the transaction ids, (decide), reserve order numbers, write stock, outcomes and dead
//! letters. Nothing of a batch is visible unless all of it is.
//!
//! The set statements (`= ANY($1)`, `UNNEST`) run with `.persistent(false)`, planned for each
//! call: see the module documentation of `allot_shared::db`. Setting an item aside ([`insert_dead_letters`], [`reject_unprocessable`]) is the
//! other writer.
//!
//! Every write is idempotent: a redelivered batch finds its stored outcomes and writes no new
//! row (see [`insert_transactions`]), dead letters are keyed by their `message_id`, and a
//! rejection as `unprocessable` leaves a stored outcome as it is.
//!
//! Correctness does not rest on RabbitMQ handing a partition to one worker: product rows are
//! locked `FOR UPDATE` (so two deciders of the same product serialize, and restocks never lose
//! an update), the daily counter row is locked by its increment, and the primary key on the
//! transaction id refuses a second decision (the loser's transaction rolls back and its batch
//! is retried, when it finds and replays the winner's outcome).

use crate::core::Decided;
use allot_shared::stored::{self, StoredTransaction};
use allot_shared::{
    Outcome, PartitionId, ProductId, PurchaseRequest, RejectReason, Status, TransactionId,
};
use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use std::collections::HashMap;
use uuid::Uuid;

/// An item that could not be decided; it is recorded in `dead_letters`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The item's id (`<message_id>#<index>` for an envelope's item), its key in the table.
    pub message_id: Option<String>,
    pub body: Vec<u8>,
    /// Why: the parse error, or the database's error for an item that failed every time.
    pub error: String,
}

/// Locks the batch's products (in id order, so two lockers cannot deadlock) and returns their
/// stock. A product missing from the result does not exist.
pub async fn lock_stock(
    conn: &mut PgConnection,
    requests: &[PurchaseRequest],
) -> anyhow::Result<HashMap<ProductId, i64>> {
    let mut product_ids: Vec<i64> = requests.iter().map(|r| r.product_id.get()).collect();
    product_ids.sort_unstable();
    product_ids.dedup();
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&product_ids)
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .context("failed to lock the batch's products")?;
    rows.into_iter()
        .map(|(id, units)| Ok((ProductId::try_from(id).map_err(anyhow::Error::msg)?, units)))
        .collect()
}

/// The rows already stored for the batch's transaction ids (decided by an earlier delivery of
/// the same request, or withdrawn by the API).
pub async fn stored_outcomes(
    conn: &mut PgConnection,
    requests: &[PurchaseRequest],
) -> anyhow::Result<HashMap<TransactionId, StoredTransaction>> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.transaction_id.0).collect();
    Ok(stored::fetch_many(&mut *conn, &ids)
        .await
        .context("failed to load stored outcomes")?
        .into_iter()
        .map(|row| (TransactionId(row.id), row))
        .collect())
}

/// Reserves `count` consecutive order numbers of `day` and returns the first. The counter row
/// stays locked until commit, so numbers are handed out gaplessly across all partitions; it is
/// taken last, to keep that lock short.
pub async fn reserve_order_numbers(
    conn: &mut PgConnection,
    day: NaiveDate,
    count: i64,
) -> anyhow::Result<i64> {
    if count == 0 {
        return Ok(1); // no new sale: nothing is numbered
    }
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO order_counters (day, last_seq) VALUES ($1, $2) \
         ON CONFLICT (day) DO UPDATE SET last_seq = order_counters.last_seq + EXCLUDED.last_seq \
         RETURNING last_seq",
    )
    .bind(day)
    .bind(count)
    .fetch_one(conn)
    .await
    .context("failed to reserve order numbers")?;
    Ok(last - count + 1)
}

/// Writes the new stock of every product the batch sold from. The rows are locked, so writing
/// absolute values is safe.
pub async fn write_stock(
    conn: &mut PgConnection,
    before: &HashMap<ProductId, i64>,
    after: &HashMap<ProductId, i64>,
) -> anyhow::Result<()> {
    let (ids, stock): (Vec<i64>, Vec<i64>) = after
        .iter()
        .filter(|(id, units)| before.get(id) != Some(units))
        .map(|(id, units)| (id.get(), *units))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE products AS p SET stock = v.stock \
         FROM UNNEST($1::bigint[], $2::bigint[]) AS v(id, stock) WHERE p.id = v.id",
    )
    .bind(&ids)
    .bind(&stock)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to write stock")?;
    Ok(())
}

/// Inserts the new outcomes (those [`Decided::fresh`]) of every batch of a group, given as
/// `(partition, request, decision)`, in one statement. No
/// `ON CONFLICT`: a transaction id stored meanwhile means another decider won a race for it
/// (a split brain); the conflict rolls this batch back, and its retry replays the winner's
/// outcome instead of taking stock for it a second time.
pub async fn insert_transactions<'a>(
    conn: &mut PgConnection,
    decided: impl IntoIterator<Item = (PartitionId, &'a PurchaseRequest, &'a Decided)>,
    decided_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let mut rows = TransactionColumns::default();
    for (partition, request, decision) in decided {
        if decision.fresh {
            rows.push(partition, request, decision.outcome);
        }
    }
    if rows.ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO transactions (id, user_id, product_id, quantity, status, reason, \
                                   order_day, order_seq, created_at, partition, decided_at) \
         SELECT u.*, $11 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], \
                                     $5::text[], $6::text[], $7::date[], $8::bigint[], \
                                     $9::timestamptz[], $10::integer[]) AS u",
    )
    .bind(&rows.ids)
    .bind(&rows.user_ids)
    .bind(&rows.product_ids)
    .bind(&rows.quantities)
    .bind(&rows.statuses)
    .bind(&rows.reasons)
    .bind(&rows.order_days)
    .bind(&rows.order_seqs)
    .bind(&rows.created_at)
    .bind(&rows.partitions)
    .bind(decided_at)
    .execute(conn)
    .await
    .context("failed to insert outcomes")?;
    Ok(())
}

/// The columns of new `transactions` rows, as arrays for `UNNEST`.
#[derive(Default)]
struct TransactionColumns {
    ids: Vec<Uuid>,
    user_ids: Vec<i64>,
    product_ids: Vec<i64>,
    quantities: Vec<i64>,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    order_days: Vec<Option<NaiveDate>>,
    order_seqs: Vec<Option<i64>>,
    created_at: Vec<DateTime<Utc>>,
    partitions: Vec<i32>,
}

impl TransactionColumns {
    fn push(&mut self, partition: PartitionId, request: &PurchaseRequest, outcome: Outcome) {
        self.partitions.push(i32::from(partition.0));
        self.ids.push(request.transaction_id.0);
        self.user_ids.push(request.user_id.get());
        self.product_ids.push(request.product_id.get());
        self.quantities.push(request.quantity.get());
        self.created_at.push(request.created_at);
        match outcome {
            Outcome::Succeeded(number) => {
                self.statuses.push(Status::Succeeded.as_str());
                self.reasons.push(None);
                self.order_days.push(Some(number.day));
                self.order_seqs.push(Some(number.seq));
            }
            Outcome::Rejected(reason) => {
                self.statuses.push(Status::Rejected.as_str());
                self.reasons.push(Some(reason.as_str()));
                self.order_days.push(None);
                self.order_seqs.push(None);
            }
        }
    }
}

/// Records dead letters; one already recorded under the same `message_id` (a redelivery) is
/// left as it is.
pub async fn insert_dead_letters(
    conn: &mut PgConnection,
    partition: PartitionId,
    dead_letters: &[DeadLetter],
) -> anyhow::Result<()> {
    for letter in dead_letters {
        sqlx::query(
            "INSERT INTO dead_letters (partition, message_id, body, error) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(i32::from(partition.0))
        .bind(&letter.message_id)
        .bind(&letter.body)
        .bind(&letter.error)
        .execute(&mut *conn)
        .await
        .context("failed to record a dead letter")?;
    }
    Ok(())
}

/// Records `request` as rejected (`unprocessable`) unless it was decided already; returns the
/// row that stands.
pub async fn reject_unprocessable(
    conn: &mut PgConnection,
    partition: PartitionId,
    request: &PurchaseRequest,
    decided_at: DateTime<Utc>,
) -> anyhow::Result<StoredTransaction> {
    sqlx::query(
        "INSERT INTO transactions (id, user_id, product_id, quantity, status, reason, partition, \
                                   created_at, decided_at) \
         VALUES ($1, $2, $3, $4, 'rejected', $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
    )
    .bind(request.transaction_id.0)
    .bind(request.user_id.get())
    .bind(request.product_id.get())
    .bind(request.quantity.get())
    .bind(RejectReason::Unprocessable.as_str())
    .bind(i32::from(partition.0))
    .bind(request.created_at)
    .bind(decided_at)
    .execute(&mut *conn)
    .await
    .context("failed to record an unprocessable transaction as rejected")?;
    stored::fetch_one(&mut *conn, request.transaction_id)
        .await
        .context("failed to read back an unprocessable transaction")?
        .context("an unprocessable transaction vanished")
}
