//! [`Decider::process_batch`]: the one step the consumer loop repeats, and that tests drive
//! directly. Parse, commit, publish statuses; the caller acks only after it returned `Ok`.
//!
//! Every step is idempotent, so a batch that failed anywhere (database down, Redis down, a
//! crash) is simply processed again: what was committed is found and replayed.

use crate::group::GroupCommit;
use crate::persist::{BatchOutcome, DeadLetter};
use crate::poison::{self, Failure};
use allot_shared::clock::to_stored_precision;
use allot_shared::status_store::StatusStore;
use allot_shared::{Clock, PartitionId, PurchaseRequest, TransactionView};
use anyhow::Context;
use chrono_tz::Tz;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::sync::Arc;

/// One item to decide: one request's JSON as received (an item of a batch envelope, see
/// [`allot_shared::message`]), and the id it is recorded under if it is set aside
/// (`<AMQP message_id>#<index>` for an envelope's item, the `message_id` itself for a message
/// that is not an envelope, whose id may then name its transaction).
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
}

/// Everything needed to decide batches; shared by all partition consumers of a process.
pub struct Decider {
    pool: PgPool,
    statuses: StatusStore,
    clock: Arc<dyn Clock>,
    /// Commits the batches of all partitions that are ready at once.
    group: GroupCommit,
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

    /// Decides one batch of a partition's messages, in order: commits every outcome in one
    /// database transaction (shared with the batches other partitions have ready, see
    /// [`crate::group`]), then publishes the statuses to Redis.
    #[tracing::instrument(skip_all, fields(partition = %partition, size = messages.len()), err(Display))]
    pub async fn process_batch(
        &self,
        partition: PartitionId,
        messages: &[Message<'_>],
    ) -> anyhow::Result<BatchOutcome> {
        let (requests, dead_letters) = parse(messages);
        for letter in &dead_letters {
            tracing::warn!(message_id = ?letter.message_id, error = %letter.error, "dead-lettering an unparseable message");
        }
        let commit_started = std::time::Instant::now();
        let (committed, decided_at) = self
            .group
            .commit(partition, requests, dead_letters.clone())
            .await
            .with_context(|| format!("failed to commit batch for partition {partition}"))?;
        crate::monitor::record_batch(&committed.outcome, messages.len(), commit_started);
        let mut views = committed.views;
        views.extend(
            self.reject_salvaged(partition, &dead_letters, decided_at)
                .await?,
        );
        self.publish_statuses(&views).await.with_context(|| {
            format!("failed to publish statuses of partition {partition} to Redis")
        })?;
        tracing::debug!(outcome = ?committed.outcome, "batch decided");
        Ok(committed.outcome)
    }

    /// Records as rejected (`unprocessable`) the transactions named by unparseable messages
    /// whose id, user, product and quantity can still be read (see [`poison::salvage`]).
    async fn reject_salvaged(
        &self,
        partition: PartitionId,
        dead_letters: &[DeadLetter],
        decided_at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Vec<TransactionView>> {
        let salvaged: Vec<PurchaseRequest> = dead_letters
            .iter()
            .filter_map(|letter| {
                poison::salvage(&letter.body, letter.message_id.as_deref(), decided_at)
            })
            .collect();
        if salvaged.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .context("failed to acquire a connection")?;
        let mut views = Vec::with_capacity(salvaged.len());
        for request in &salvaged {
            let row =
                poison::reject_unprocessable(&mut conn, partition, request, decided_at).await?;
            views.push(row.to_view()?);
        }
        Ok(views)
    }

    /// Sets a message that keeps failing aside: a dead letter with `reason`, and its
    /// transaction, if it names one, rejected as `unprocessable`, its status published. If the
    /// database refuses even that rejection, the dead letter is recorded alone (and the error
    /// logged): the partition must move on.
    #[tracing::instrument(skip_all, fields(partition = %partition, message_id = ?message.message_id), err(Display))]
    pub async fn set_aside(
        &self,
        partition: PartitionId,
        message: Message<'_>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let decided_at = self.clock.now();
        let request = PurchaseRequest::from_json(message.body)
            .ok()
            .map(|mut request| {
                request.created_at = to_stored_precision(request.created_at);
                request
            })
            .or_else(|| poison::salvage(message.body, message.message_id, decided_at));
        let letter = DeadLetter {
            message_id: message.message_id.map(str::to_owned),
            body: message.body.to_vec(),
            error: reason.to_owned(),
        };
        tracing::error!(transaction_id = ?request.as_ref().map(|r| r.transaction_id), %reason, "setting aside a message that keeps failing");
        let stored = match poison::record_set_aside(
            &self.pool,
            partition,
            &letter,
            request.as_ref(),
            decided_at,
        )
        .await
        {
            Ok(stored) => stored,
            Err(err) if request.is_some() && poison::classify(&err) == Failure::Deterministic => {
                tracing::error!(error = %format_args!("{err:#}"), "the database refuses even the rejection; recording the dead letter alone, the transaction stays undecided");
                poison::record_set_aside(&self.pool, partition, &letter, None, decided_at).await?
            }
            Err(err) => return Err(err),
        };
        if let Some(row) = stored {
            self.publish_statuses(&[row.to_view()?]).await?;
        }
        Ok(())
    }

    /// Overwrites each transaction's status in Redis with its final one and announces the
    /// batch to the API, in one pipeline.
    async fn publish_statuses(&self, views: &[TransactionView]) -> anyhow::Result<()> {
        self.statuses.record_decided(views).await
    }
}

/// Splits messages into requests and the unparseable rest.
fn parse(messages: &[Message<'_>]) -> (Vec<PurchaseRequest>, Vec<DeadLetter>) {
    let mut requests = Vec::with_capacity(messages.len());
    let mut dead_letters = Vec::new();
    for message in messages {
        match PurchaseRequest::from_json(message.body) {
            Ok(mut request) => {
                // Stored to the microsecond: keep the published status identical to the row.
                request.created_at = to_stored_precision(request.created_at);
                requests.push(request);
            }
            Err(err) => dead_letters.push(DeadLetter {
                message_id: message.message_id.map(str::to_owned),
                body: message.body.to_vec(),
                error: err.to_string(),
            }),
        }
    }
    (requests, dead_letters)
}
