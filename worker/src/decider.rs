//! The steps of a batch, each idempotent: [`Decider::decide_and_commit`] (one PostgreSQL
//! transaction around the pure [`core`]), [`Decider::publish_statuses`] (Redis), and
//! [`Decider::set_aside`] for an item that fails every time. The consumer loop
//! ([`crate::consumer`]) runs them and acks after; tests drive [`Decider::process_batch`].
//!
//! Because every step is idempotent, a batch that failed anywhere (database down, Redis down,
//! a crash) is simply processed again: what was committed is found and replayed.

use crate::core::{self, Decided, Decisions, PartitionState};
use crate::group::GroupCommit;
use crate::persist::{self, DeadLetter};
use crate::poison;
use crate::retry::{self, Failure};
use allot_shared::status_store::StatusStore;
use allot_shared::stored::StoredTransaction;
use allot_shared::{Clock, Order, Outcome, PartitionId, TransactionId, TransactionView};
use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One item to decide: one request's JSON as received (an item of a batch envelope, see
/// [`allot_shared::message`]), and the id it is recorded under if it is set aside
/// (`<AMQP message_id>#<index>` for an envelope's item, the `message_id` itself for a message
/// that is not an envelope, whose id may then name its transaction).
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub body: &'a [u8],
    pub message_id: Option<String>,
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
    /// Unreadable items set aside.
    pub dead_lettered: usize,
}

/// A committed batch: its counts, and the status of every transaction it touched, to publish.
#[derive(Debug)]
pub struct Committed {
    pub outcome: BatchOutcome,
    pub views: Vec<TransactionView>,
}

/// Everything needed to decide batches; shared by all partition consumers of a process.
pub struct Decider {
    pool: PgPool,
    statuses: StatusStore,
    clock: Arc<dyn Clock>,
    /// Commits the batches of every partition that are ready at once (see [`crate::group`]).
    group: GroupCommit,
}

/// One partition's batch, read: its requests in arrival order, and its unreadable items.
#[derive(Debug, Clone)]
pub struct Batch {
    pub partition: PartitionId,
    pub requests: Vec<Order>,
    pub dead_letters: Vec<DeadLetter>,
}

impl Decider {
    pub fn new(
        pool: PgPool,
        redis: ConnectionManager,
        redis_prefix: String,
        clock: Arc<dyn Clock>,
        timezone: Tz,
    ) -> Self {
        Self {
            group: GroupCommit::start(pool.clone(), clock.clone(), timezone),
            pool,
            statuses: StatusStore::new(redis, redis_prefix),
            clock,
        }
    }

    /// One attempt at a batch, as the consumer loop makes it: decide and commit, then publish
    /// the statuses. The caller acks only after it returned `Ok`.
    pub async fn process_batch(
        &self,
        partition: PartitionId,
        items: &[Item<'_>],
    ) -> anyhow::Result<BatchOutcome> {
        let committed = self.decide_and_commit(partition, items).await?;
        self.publish_statuses(partition, &committed.views).await?;
        Ok(committed.outcome)
    }

    /// Decides a batch of a partition's items, in order, and commits every outcome in one
    /// database transaction, shared with the batches other partitions have ready at the same
    /// moment (see [`crate::group`] and [`commit_batches`]). An unreadable item is a dead
    /// letter and the transaction it names, if any can be read, is rejected (`unprocessable`).
    #[tracing::instrument(skip_all, fields(partition = %partition, size = items.len()), err(Display))]
    pub async fn decide_and_commit(
        &self,
        partition: PartitionId,
        items: &[Item<'_>],
    ) -> anyhow::Result<Committed> {
        let (requests, dead_letters) = poison::parse(items);
        for letter in &dead_letters {
            tracing::warn!(message_id = ?letter.message_id, error = %letter.error, "dead-lettering an unreadable item");
        }
        let started = std::time::Instant::now();
        let batch = Batch {
            partition,
            requests,
            dead_letters,
        };
        let committed = self
            .group
            .commit(batch)
            .await
            .with_context(|| format!("failed to commit batch for partition {partition}"))?;
        crate::monitor::record_batch(&committed.outcome, items.len(), started);
        tracing::debug!(outcome = ?committed.outcome, "batch committed");
        Ok(committed)
    }

    /// Overwrites each transaction's status in Redis with its final one and announces them to
    /// the API, in one pipeline.
    pub async fn publish_statuses(
        &self,
        partition: PartitionId,
        views: &[TransactionView],
    ) -> anyhow::Result<()> {
        self.statuses.record_decided(views).await.with_context(|| {
            format!("failed to publish statuses of partition {partition} to Redis")
        })
    }

    /// Sets an item that keeps failing aside: a dead letter with `reason`, and its
    /// transaction, if it names one, rejected as `unprocessable`, its status published. If the
    /// database refuses even that rejection, the dead letter is recorded alone (and the error
    /// logged): the partition must move on.
    #[tracing::instrument(skip_all, fields(partition = %partition, message_id = ?item.message_id), err(Display))]
    pub async fn set_aside(
        &self,
        partition: PartitionId,
        item: &Item<'_>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let decided_at = self.clock.now();
        let request = poison::request_named_by(item, decided_at);
        let letter = DeadLetter {
            message_id: item.message_id.clone(),
            body: item.body.to_vec(),
            error: reason.to_owned(),
        };
        tracing::error!(transaction_id = ?request.as_ref().map(|r| r.transaction_id), %reason, "setting aside an item that keeps failing");
        let stored = match self
            .record_set_aside(partition, &letter, request.as_ref(), decided_at)
            .await
        {
            Ok(stored) => stored,
            Err(err) if request.is_some() && retry::classify(&err) == Failure::Deterministic => {
                tracing::error!(error = %format_args!("{err:#}"), "the database refuses even the rejection; recording the dead letter alone, the transaction stays undecided");
                self.record_set_aside(partition, &letter, None, decided_at)
                    .await?
            }
            Err(err) => return Err(err),
        };
        if let Some(row) = stored {
            self.publish_statuses(partition, &[row.to_view()?]).await?;
        }
        Ok(())
    }

    /// In one database transaction: the dead letter, and the rejection of `request` unless it
    /// was decided already. Returns the transaction's stored row, to publish its status.
    async fn record_set_aside(
        &self,
        partition: PartitionId,
        letter: &DeadLetter,
        request: Option<&Order>,
        decided_at: DateTime<Utc>,
    ) -> anyhow::Result<Option<StoredTransaction>> {
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        persist::insert_dead_letters(&mut tx, partition, std::slice::from_ref(letter)).await?;
        let stored = match request {
            Some(request) => {
                Some(persist::reject_unprocessable(&mut tx, partition, request, decided_at).await?)
            }
            None => None,
        };
        tx.commit().await.context("failed to commit")?;
        Ok(stored)
    }
}

/// Decides `batches` (each of its own partition) and commits them in one database
/// transaction: lock the products, load what was decided before, decide each batch in the pure
/// core, reserve the order numbers of all their sales, write, commit. Each batch is decided on
/// its own, in the order given, so the outcome is the one of committing them one after the
/// other, and their sales are numbered batch after batch. All of them commit, or none does.
pub async fn commit_batches(
    pool: &PgPool,
    batches: &[&Batch],
    decided_at: DateTime<Utc>,
    day: NaiveDate,
) -> anyhow::Result<Vec<Committed>> {
    let mut tx = pool
        .begin()
        .await
        .context("failed to begin a transaction")?;
    // What the core needs: the products' stock and rules, under lock, the buyers' units of
    // limited products, and the outcomes decided before.
    let requests: Vec<Order> = batches
        .iter()
        .flat_map(|batch| batch.requests.iter().cloned())
        .collect();
    let locked = persist::lock_products(&mut tx, &requests).await?;
    let bought = persist::buyer_units(&mut tx, &locked.rules, &requests).await?;
    let stored = persist::stored_outcomes(&mut tx, &requests).await?;
    let stock = locked.stock;
    let mut state = PartitionState {
        stock: stock.clone(),
        rules: locked.rules,
        bought: bought.clone(),
        decided: outcomes_of(&stored)?,
    };
    // Decide each batch in arrival order, then number the new sales, batch after batch (the
    // day's counter, locked last).
    let decisions: Vec<Decisions> = batches
        .iter()
        .map(|batch| core::decide(&mut state, &batch.requests))
        .collect();
    let sold = decisions.iter().map(Decisions::sold).sum();
    let mut next_seq = persist::reserve_order_numbers(&mut tx, day, sold).await?;
    let decided: Vec<Vec<Decided>> = decisions
        .iter()
        .map(|decisions| {
            let numbered = decisions.number(day, next_seq);
            next_seq += decisions.sold();
            numbered
        })
        .collect();
    // Write it all, and commit.
    persist::write_stock(&mut tx, &stock, &state.stock).await?;
    persist::write_buyer_units(&mut tx, &bought, &state.bought).await?;
    let mut rows = Vec::with_capacity(requests.len());
    for (batch, decided) in batches.iter().zip(&decided) {
        for (request, decision) in batch.requests.iter().zip(decided) {
            rows.push((batch.partition, request, decision));
        }
    }
    persist::insert_transactions(&mut tx, rows, decided_at).await?;
    let mut rejected = Vec::with_capacity(batches.len());
    for batch in batches {
        persist::insert_dead_letters(&mut tx, batch.partition, &batch.dead_letters).await?;
        let mut rows = Vec::new();
        for request in salvaged(&batch.dead_letters, decided_at) {
            rows.push(
                persist::reject_unprocessable(&mut tx, batch.partition, &request, decided_at)
                    .await?,
            );
        }
        rejected.push(rows);
    }
    tx.commit().await.context("failed to commit")?;

    // What each batch did, and the statuses it publishes.
    batches
        .iter()
        .zip(&decided)
        .zip(rejected)
        .map(|((batch, decided), rejected)| {
            let mut views = views(&batch.requests, decided, &stored, decided_at)?;
            for row in &rejected {
                views.push(row.to_view()?);
            }
            let mut seen = HashSet::with_capacity(views.len());
            views.retain(|view| seen.insert(view.transaction_id));
            Ok(Committed {
                outcome: count(decided, batch.dead_letters.len()),
                views,
            })
        })
        .collect()
}

/// The outcomes of stored rows, as the core takes them.
fn outcomes_of(
    stored: &HashMap<TransactionId, StoredTransaction>,
) -> anyhow::Result<HashMap<TransactionId, Outcome>> {
    stored
        .iter()
        .map(|(id, row)| Ok((*id, row.outcome()?)))
        .collect()
}

/// The transactions named by unreadable items whose id, user, product and quantity can still
/// be read (see [`poison::salvage`]), to reject.
fn salvaged(dead_letters: &[DeadLetter], now: DateTime<Utc>) -> Vec<Order> {
    dead_letters
        .iter()
        .filter_map(|letter| poison::salvage(&letter.body, letter.message_id.as_deref(), now))
        .collect()
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

/// The status of every transaction of the batch: new outcomes from this batch, replays from
/// what is stored (so a duplicate message can never change what clients see). An in-batch
/// duplicate of a fresh request adds nothing: its first copy's view is there.
fn views(
    requests: &[Order],
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
        }
    }
    Ok(views)
}
