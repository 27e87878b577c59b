//! The expiry sweeper: holds end by themselves, driven by durable state.
//!
//! A hold's expiry is a time in its row (`transactions.expires_at`, status `held`), not a timer
//! in any process's memory. Every [`WorkerConfig::hold_sweep`] each worker reads the holds whose
//! expiry has passed (by its clock; index `transactions_held_expiry`) and asks for their release
//! by publishing an `expire` [`Command`] into each hold's partition queue. The release itself is
//! decided there like a checkout or a cancel: by the partition's serial consumer, in the batch's
//! one database transaction, under the hold's and its products' and slot's row locks, by the
//! pure core, which releases a hold only if it is still held and due. So:
//!
//! - a hold is released **exactly once**: its status moves from `held` once, under its row
//!   lock, and a second `expire` (a duplicate, a redelivery, another worker's) finds it settled
//!   and does nothing;
//! - a checkout racing the expiry is **decided once**: whichever the partition's consumer
//!   decides first wins; a checkout decided at or after `expires_at` finds the hold due and
//!   releases it (`expired`) instead;
//! - **nothing is lost across restarts**: the rows say what is due. A sweeper that dies after
//!   publishing leaves its commands in the queue; one that dies before leaves the holds held
//!   and due, and the next round of any worker publishes them. A hold is late by the sweep
//!   period, the queue's wait and the time no worker runs, never released early or twice.
//!
//! Which worker asks: the one that owns the hold's partition ([`crate::seats`]); any worker
//! once a hold is overdue by more than [`ORPHAN_AFTER`] (its owner may be dead while its lease
//! runs). Asking twice is harmless. A worker remembers what it asked for and asks again only
//! after [`ASK_AGAIN_AFTER`], in case its command was lost.

use crate::seats::Seats;
use allot_shared::amqp::Topology;
use allot_shared::message::{COUNT_HEADER, ENVELOPE_TYPE, envelope};
use allot_shared::{Clock, Command, CommandId, CommandKind, PartitionId, TransactionId};
use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A hold overdue by more than this is asked for by any worker, not only its partition's owner.
pub const ORPHAN_AFTER: Duration = Duration::from_secs(10);
/// A hold asked for and still held is asked for again after this.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(10);
/// The most holds one round asks for.
const ROUND_LIMIT: i64 = 1000;
/// How long a publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// What a sweeper needs.
pub struct Sweeper {
    pub pool: PgPool,
    pub clock: Arc<dyn Clock>,
    pub topology: Topology,
    pub seats: Arc<Seats>,
    pub every: Duration,
}

/// A due hold, as a round reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub transaction_id: TransactionId,
    pub partition: PartitionId,
    pub expires_at: DateTime<Utc>,
}

/// Whether this worker asks for the release of a hold of `partition`, overdue by `overdue`:
/// its partition's owner does, and anyone once it is an orphan.
pub fn should_ask(partition: PartitionId, owned: &[u16], overdue: chrono::TimeDelta) -> bool {
    owned.contains(&partition.0) || overdue.to_std().is_ok_and(|overdue| overdue > ORPHAN_AFTER)
}

impl Sweeper {
    /// Runs rounds until `stop` is cancelled, publishing on `connection`. A failed round is
    /// logged and the next one tries again (on a fresh channel).
    pub async fn run(&self, connection: &Connection, stop: CancellationToken) {
        let mut channel: Option<Channel> = None;
        let mut asked: HashMap<TransactionId, Instant> = HashMap::new();
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if channel
                .as_ref()
                .is_none_or(|open| !open.status().connected())
            {
                channel = match open_channel(connection).await {
                    Ok(open) => Some(open),
                    Err(err) => {
                        tracing::debug!(error = %format_args!("{err:#}"), "the expiry sweeper cannot open a channel");
                        continue;
                    }
                };
            }
            let Some(open) = &channel else { continue };
            if let Err(err) = self.round(open, &mut asked).await {
                tracing::warn!(error = %format_args!("{err:#}"), "an expiry round failed; the next one tries again");
                channel = None;
            }
        }
    }

    /// One round: count the open holds, read the due ones, ask for the release of those this
    /// worker should ask for and has not asked for lately.
    async fn round(
        &self,
        channel: &Channel,
        asked: &mut HashMap<TransactionId, Instant>,
    ) -> anyhow::Result<()> {
        let now = self.clock.now();
        let (open, due) = read_due(&self.pool, now).await?;
        crate::monitor::record_open_holds(open);
        asked.retain(|_, at| at.elapsed() < ASK_AGAIN_AFTER);
        let owned = self.seats.view().owned;
        let mut by_partition: BTreeMap<PartitionId, Vec<Command>> = BTreeMap::new();
        for hold in due {
            if asked.contains_key(&hold.transaction_id)
                || !should_ask(hold.partition, &owned, now - hold.expires_at)
            {
                continue;
            }
            by_partition
                .entry(hold.partition)
                .or_default()
                .push(Command {
                    kind: CommandKind::Expire,
                    command_id: CommandId::new(),
                    transaction_id: hold.transaction_id,
                    created_at: now,
                });
        }
        for (partition, commands) in by_partition {
            publish(channel, &self.topology, partition, &commands)
                .await
                .with_context(|| format!("failed to ask for expiries in partition {partition}"))?;
            tracing::debug!(%partition, holds = commands.len(), "asked for the release of expired holds");
            let at = Instant::now();
            for command in commands {
                asked.insert(command.transaction_id, at);
            }
        }
        Ok(())
    }
}

/// The number of open holds, and those due at `now` (soonest first, at most a round's worth),
/// with the partition that decided each.
pub async fn read_due(pool: &PgPool, now: DateTime<Utc>) -> anyhow::Result<(i64, Vec<Due>)> {
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions WHERE status = 'held'")
        .fetch_one(pool)
        .await
        .context("failed to count the open holds")?;
    if open == 0 {
        return Ok((0, Vec::new()));
    }
    let rows: Vec<(Uuid, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, partition, expires_at FROM transactions \
         WHERE status = 'held' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
    )
    .bind(now)
    .bind(ROUND_LIMIT)
    .fetch_all(pool)
    .await
    .context("failed to read the holds due")?;
    let due = rows
        .into_iter()
        .filter_map(|(id, partition, expires_at)| {
            Some(Due {
                transaction_id: TransactionId(id),
                partition: PartitionId(u16::try_from(partition).ok()?),
                expires_at,
            })
        })
        .collect();
    Ok((open, due))
}

async fn open_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .context("failed to open a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("failed to enable publisher confirms")?;
    Ok(channel)
}

/// Publishes `commands` as one persistent batch envelope to `partition`'s queue and waits for
/// the broker's confirm (a refusal, a full queue, is an error: the round's holds are asked for
/// again next round).
async fn publish(
    channel: &Channel,
    topology: &Topology,
    partition: PartitionId,
    commands: &[Command],
) -> anyhow::Result<()> {
    let queue = topology.queue(partition);
    let jsons: Vec<Vec<u8>> = commands.iter().map(Command::to_json).collect();
    let body = envelope(jsons.iter().map(Vec::as_slice));
    let mut headers = FieldTable::default();
    headers.insert(
        COUNT_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(commands.len()).unwrap_or(i64::MAX)),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2) // persistent
        .with_content_type("application/json".into())
        .with_type(ENVELOPE_TYPE.into())
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_headers(headers);
    let publish = async {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await?;
        confirm.await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
        Err(_elapsed) => anyhow::bail!("the broker did not confirm in time"),
        Ok(Err(err)) => Err(anyhow::Error::new(err).context("the publish failed")),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => anyhow::bail!("queue {queue} does not exist"),
        Ok(Ok(Confirmation::Nack(_))) => anyhow::bail!("queue {queue} is full"),
        Ok(Ok(Confirmation::NotRequested)) => unreachable!("the channel is in confirm mode"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn the_owner_asks_at_once_and_anyone_once_the_hold_is_an_orphan() {
        let owned = [1, 3];
        let just = TimeDelta::zero();
        assert!(should_ask(PartitionId(3), &owned, just));
        assert!(!should_ask(PartitionId(2), &owned, just));
        assert!(!should_ask(PartitionId(2), &owned, TimeDelta::seconds(10)));
        assert!(should_ask(
            PartitionId(2),
            &owned,
            TimeDelta::seconds(10) + TimeDelta::microseconds(1)
        ));
        // A clock that went back (a due hold not yet due by this clock) is no orphan.
        assert!(!should_ask(PartitionId(2), &[], TimeDelta::seconds(-30)));
        assert!(should_ask(PartitionId(2), &[2], TimeDelta::seconds(-30)));
    }
}
