//! One group of batches (one batch per partition, see [`crate::group`]), one PostgreSQL
//! transaction: lock the product rows, load the outcomes already stored for the transaction
//! ids, decide each batch (in the pure core), reserve order numbers, write stock, outcomes and
//! dead letters, commit. Nothing of a batch is visible unless all of it is.
//!
//! Correctness does not rest on RabbitMQ handing a partition to one worker: product rows are
//! locked `FOR UPDATE` (so two deciders of the same product serialize, and restocks never lose
//! an update), the daily counter row is locked by its increment, and the primary key on the
//! transaction id refuses a second decision (the loser's transaction rolls back and its batch
//! is retried, when it finds and replays the winner's outcome).

use crate::core::{self, Decided, PartitionState};
use allot_shared::stored::{self, StoredTransaction};
use allot_shared::{
    Outcome, PartitionId, ProductId, PurchaseRequest, Status, TransactionId, TransactionView,
};
use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};
use std::collections::HashMap;
use uuid::Uuid;

/// A message that could not be parsed into a request; it is recorded in `dead_letters`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub body: Vec<u8>,
    pub error: String,
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New sales, each with a fresh order number.
    pub succeeded: usize,
    /// New rejections.
    pub rejected: usize,
    /// Requests decided before (redelivered or duplicated messages), replayed.
    pub replayed: usize,
    /// Unparseable messages set aside.
    pub dead_lettered: usize,
}

/// The result of a committed batch: its counts, and the status of every transaction it
/// touched, to publish.
#[derive(Debug)]
pub struct Committed {
    pub outcome: BatchOutcome,
    pub views: Vec<TransactionView>,
}

/// One partition's batch, as a part of a group commit.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub partition: PartitionId,
    pub requests: &'a [PurchaseRequest],
    pub dead_letters: &'a [DeadLetter],
}

/// Decides and commits the batches of several partitions in one database transaction (a group
/// commit): one lock of the day's order counter and one WAL flush for all of them, where one
/// transaction per batch would queue every partition behind the counter row, each holding it
/// through its own flush. Each batch is decided by the core on its own, in the order given, so
/// the outcome is the one of committing the batches one after the other; order numbers are
/// handed out batch after batch in that order. Either every batch is committed or none is.
pub async fn commit_group(
    pool: &PgPool,
    batches: &[Batch<'_>],
    decided_at: DateTime<Utc>,
    day: NaiveDate,
) -> anyhow::Result<Vec<Committed>> {
    let mut tx = pool
        .begin()
        .await
        .context("failed to begin a transaction")?;

    let all: Vec<&PurchaseRequest> = batches.iter().flat_map(|b| b.requests).collect();
    let (mut state, stored) = load_state(&mut tx, &all).await?;
    let stock_before = state.stock.clone();
    let decisions: Vec<core::Decisions> = batches
        .iter()
        .map(|batch| core::decide(&mut state, batch.requests))
        .collect();
    let sold = decisions.iter().map(core::Decisions::sold).sum();
    let mut next_seq = reserve_order_numbers(&mut tx, day, sold).await?;
    let decided: Vec<Vec<Decided>> = decisions
        .iter()
        .map(|decisions| {
            let numbered = decisions.number(day, next_seq);
            next_seq += decisions.sold();
            numbered
        })
        .collect();

    write_stock(&mut tx, &stock_before, &state.stock).await?;
    insert_transactions(&mut tx, batches, &decided, decided_at).await?;
    for batch in batches {
        insert_dead_letters(&mut tx, batch.partition, batch.dead_letters).await?;
    }
    tx.commit().await.context("failed to commit")?;

    batches
        .iter()
        .zip(&decided)
        .map(|(batch, decided)| {
            Ok(Committed {
                outcome: count(decided, batch.dead_letters.len()),
                views: views(batch.requests, decided, &stored, decided_at)?,
            })
        })
        .collect()
}

/// Locks the batch's products (in id order, so two lockers cannot deadlock) and reads their
/// stock, then the outcomes already stored for its transaction ids.
async fn load_state(
    conn: &mut PgConnection,
    requests: &[&PurchaseRequest],
) -> anyhow::Result<(PartitionState, HashMap<TransactionId, StoredTransaction>)> {
    let mut product_ids: Vec<i64> = requests.iter().map(|r| r.product_id.get()).collect();
    product_ids.sort_unstable();
    product_ids.dedup();
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&product_ids)
            // Planned for each call, as every set statement here: see `allot_shared::db`.
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .context("failed to lock the batch's products")?;
    let stock = rows
        .into_iter()
        .map(|(id, units)| Ok((ProductId::try_from(id).map_err(anyhow::Error::msg)?, units)))
        .collect::<anyhow::Result<_>>()?;

    let ids: Vec<Uuid> = requests.iter().map(|r| r.transaction_id.0).collect();
    let stored: HashMap<TransactionId, StoredTransaction> = stored::fetch_many(&mut *conn, &ids)
        .await
        .context("failed to load stored outcomes")?
        .into_iter()
        .map(|row| (TransactionId(row.id), row))
        .collect();
    let decided = stored
        .iter()
        .map(|(id, row)| Ok((*id, row.outcome()?)))
        .collect::<anyhow::Result<_>>()?;
    Ok((PartitionState { stock, decided }, stored))
}

/// Reserves `count` consecutive order numbers of `day` and returns the first. The counter row
/// stays locked until commit, so numbers are handed out gaplessly across all partitions; it is
/// taken last, to keep that lock short.
async fn reserve_order_numbers(
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
async fn write_stock(
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

/// Inserts the new outcomes of every batch in one statement.
async fn insert_transactions(
    conn: &mut PgConnection,
    batches: &[Batch<'_>],
    decided: &[Vec<Decided>],
    decided_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let mut rows = TransactionColumns::default();
    for (batch, decided) in batches.iter().zip(decided) {
        for (request, decision) in batch.requests.iter().zip(decided).filter(|(_, d)| d.fresh) {
            rows.push(batch.partition, request, decision.outcome);
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

async fn insert_dead_letters(
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

fn count(decided: &[Decided], dead_lettered: usize) -> BatchOutcome {
    let mut outcome = BatchOutcome {
        dead_lettered,
        ..BatchOutcome::default()
    };
    for decision in decided {
        match (decision.fresh, decision.outcome) {
            (false, _) => outcome.replayed += 1,
            (true, Outcome::Succeeded(_)) => outcome.succeeded += 1,
            (true, Outcome::Rejected(_)) => outcome.rejected += 1,
        }
    }
    outcome
}

/// The status of every distinct transaction of the batch: new outcomes from this batch,
/// replays from what is stored (so a duplicate message can never change what clients see).
fn views(
    requests: &[PurchaseRequest],
    decided: &[Decided],
    stored: &HashMap<TransactionId, StoredTransaction>,
    decided_at: DateTime<Utc>,
) -> anyhow::Result<Vec<TransactionView>> {
    let mut views = Vec::with_capacity(requests.len());
    for (request, decision) in requests.iter().zip(decided) {
        if decision.fresh {
            views.push(TransactionView::decided(
                request,
                decision.outcome,
                decided_at,
            ));
        } else if let Some(row) = stored.get(&request.transaction_id) {
            views.push(row.to_view()?);
        } // else: an in-batch duplicate of a fresh request, whose view is already there
    }
    // A transaction stored earlier and repeated within this batch appears once.
    let mut seen = std::collections::HashSet::with_capacity(views.len());
    views.retain(|view| seen.insert(view.transaction_id));
    Ok(views)
}
