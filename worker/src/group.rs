//! Group commit across partitions. Every partition consumer of a process hands its decided
//! batch to one committer task; whatever has arrived while the previous commit ran is committed
//! together, in one database transaction ([`persist::commit_group`]).
//!
//! Why: order numbers are gapless across all partitions, so every commit with a sale locks the
//! day's one counter row, and holds it until its commit is flushed. One transaction per batch
//! queued all partitions behind that row, one WAL flush at a time (measured: commits of 15-30
//! requests waiting 100-400 ms on the lock, about 2k decisions/s for the whole process). A
//! group takes the lock once and flushes once for all of them, so the cost per request falls
//! as load rises.
//!
//! What it does not change: each batch is still decided by the core on its own, in arrival
//! order, and acked by its own consumer only after the commit that carries it. If a group fails
//! its batches are committed again one by one, so a batch that cannot commit (a poison item, a
//! conflict with another worker process) fails alone and takes its usual path (retry, split,
//! set aside; see [`crate::consumer`]).

use crate::decider::{self, Batch, Committed};
use allot_shared::Clock;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The handle the partition consumers share; the committer task ends when it is dropped.
pub struct GroupCommit {
    jobs: mpsc::UnboundedSender<Job>,
    committer: Arc<Committer>,
}

/// One batch waiting for a commit, and where its result goes.
struct Job {
    batch: Batch,
    answer: oneshot::Sender<anyhow::Result<Committed>>,
}

/// What a commit needs.
struct Committer {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    timezone: Tz,
}

impl GroupCommit {
    /// Starts the committer task (needs a tokio runtime).
    pub fn start(pool: PgPool, clock: Arc<dyn Clock>, timezone: Tz) -> Self {
        let committer = Arc::new(Committer {
            pool,
            clock,
            timezone,
        });
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(committer.clone().run(queue));
        Self { jobs, committer }
    }

    /// Decides and commits one partition's batch, together with whatever other partitions'
    /// batches are waiting at the same time.
    pub async fn commit(&self, batch: Batch) -> anyhow::Result<Committed> {
        let (answer, answered) = oneshot::channel();
        match self.jobs.send(Job { batch, answer }) {
            Ok(()) => match answered.await {
                Ok(result) => result,
                Err(_) => anyhow::bail!("the group committer stopped before answering"),
            },
            // The committer task is gone (it never should be): commit alone.
            Err(mpsc::error::SendError(job)) => self.committer.commit_alone(&job.batch).await,
        }
    }
}

impl Committer {
    async fn run(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = queue.recv().await {
            let mut group = vec![first];
            while let Ok(job) = queue.try_recv() {
                group.push(job);
            }
            self.commit_group(group).await;
        }
    }

    /// Commits `group` in one transaction; if that fails, each of its batches alone.
    async fn commit_group(&self, group: Vec<Job>) {
        metrics::histogram!("allot_worker_group_batches").record(group.len() as f64);
        if let [job] = group.as_slice() {
            let result = self.commit_alone(&job.batch).await;
            let job = group.into_iter().next().expect("one job");
            let _ = job.answer.send(result);
            return;
        }
        let (decided_at, day) = self.moment();
        let batches: Vec<&Batch> = group.iter().map(|job| &job.batch).collect();
        match decider::commit_batches(&self.pool, &batches, decided_at, day).await {
            Ok(committed) => {
                for (job, committed) in group.into_iter().zip(committed) {
                    let _ = job.answer.send(Ok(committed));
                }
            }
            Err(err) => {
                tracing::debug!(batches = group.len(), error = %format_args!("{err:#}"), "a group commit failed; committing its batches one by one");
                for job in group {
                    let result = self.commit_alone(&job.batch).await;
                    let _ = job.answer.send(result);
                }
            }
        }
    }

    async fn commit_alone(&self, batch: &Batch) -> anyhow::Result<Committed> {
        let (decided_at, day) = self.moment();
        let mut committed = decider::commit_batches(&self.pool, &[batch], decided_at, day).await?;
        Ok(committed.remove(0))
    }

    /// Now, and the calendar day it falls on in the configured time zone.
    fn moment(&self) -> (DateTime<Utc>, NaiveDate) {
        let now = self.clock.now();
        (now, now.with_timezone(&self.timezone).date_naive())
    }
}
