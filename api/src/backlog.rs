//! The API's own bound on each partition queue, below RabbitMQ's `x-max-length`, shared by every
//! API instance of a deployment.
//!
//! The partition queues are bounded by the broker (`x-max-length` with `reject-publish`), and a
//! refused publish becomes a 503. But a quorum queue applies that limit loosely, and in a chaos
//! test run against RabbitMQ 3.10.8 one message published just as its queue reached the limit
//! was confirmed and never stored: a 202 for a request no worker ever saw. So the API does not
//! lean on the broker's limit; it refuses first, at [`bound`] (four fifths of the limit, the
//! limit itself below 5), and the broker's limit stays as the backstop.
//!
//! # The estimate
//!
//! Per partition queue, the estimate of its depth is
//!
//! ```text
//! read                       the depth last read from the broker (a passive declare)
//! + (kept - kept_at_read)    messages kept (confirmed, or perhaps stored) since that read was sent
//! + in flight                places reserved whose publish has no answer yet
//! ```
//!
//! A publish reserves a place (one per message, whatever the number of requests it carries)
//! before it is sent, and is refused at once when the estimate has reached the bound. Once the
//! broker answers, the place is kept (confirmed, or ambiguous: the broker may have stored it) or
//! given back (refused, or never sent). A read replaces only what was kept before it was sent: a
//! publish still on its way when the broker answered may not be in the answer, so it stays
//! counted, and one confirmed while the read was on its way is counted twice until the next
//! read. The estimate errs on the full side, never on the empty one. Depths are read every
//! [`POLL_EVERY`] by every API instance ([`crate::publisher`]); only a read sent after the one
//! recorded (more kept places before it) replaces it.
//!
//! # Why shared, and why in Redis
//!
//! Each API instance used to keep this estimate in its own memory, counting only its own
//! publishes between two reads. With several instances that is wrong in the one case the bound
//! is for: between two reads (100 ms) every instance may fill the queue up to the bound by
//! itself, so n instances let up to n times the headroom in, past the broker's limit, where
//! RabbitMQ 3.10.8 was seen to lose a confirmed message. Reading the depth more often narrows the
//! window but cannot close it: the broker has no "reserve a place" operation, and a read is
//! stale by the publishes in flight when it is answered. So the instances share the estimate
//! itself: its counters live in Redis and every change is one Lua script, atomic in Redis,
//! so reservations of all instances are serialised and the bound is exact across them (the
//! test `tests/it/backlog.rs` runs two instances against one bound: never more than the
//! bound accepted).
//!
//! Redis because it is already on the accept path: a request is recorded `pending` there
//! before it is published, and a Redis outage already refuses requests (503). The bound adds
//! no dependency, only one round trip per message (the reservation, before the publish; the
//! settlement after the confirm is sent without waiting for it), not per request: under load a
//! message carries several requests. PostgreSQL would have served too, at the cost of a row
//! lock per message on the database the workers commit to.
//!
//! An instance that dies between a reservation and its settlement would leave its place
//! counted for ever; so a place in flight is a member of a sorted set scored by its expiry,
//! the confirm timeout plus [`HOLD_MARGIN`] from the reservation (Redis's clock), and expired
//! places no longer count. If the message was stored, the next read counts it.
//!
//! Keys (outside the `<prefix>:` namespace of statuses): `<prefix>.backlog:<queue>` (a hash:
//! `read`, `kept`, `kept_at_read`) and `<prefix>.backlog:<queue>:flight` (the places in flight);
//! both expire after [`KEY_TTL`] without a write, so a deployment that stopped leaves nothing.

use allot_shared::PartitionId;
use allot_shared::amqp::Topology;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often each API instance reads the depth of every partition queue.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long past the confirm timeout a place in flight counts without an answer.
pub const HOLD_MARGIN: Duration = Duration::from_secs(10);
/// How long the keys of a partition live without a write.
pub const KEY_TTL: Duration = Duration::from_secs(3600);

/// How long a place in flight counts without an answer, for publishes that wait
/// `confirm_timeout` for their confirm: that, plus [`HOLD_MARGIN`] for the settlement to reach
/// Redis.
pub fn hold_for(confirm_timeout: Duration) -> Duration {
    confirm_timeout + HOLD_MARGIN
}

/// The estimate at which publishes to a queue whose broker limit is `max_length` are refused:
/// four fifths of the limit (the fifth of margin absorbs the broker's loose application of its
/// limit), the limit itself below 5.
pub fn bound(max_length: i64) -> i64 {
    max_length - max_length / 5
}

/// Redis's clock in milliseconds, then the estimate of the queue (`KEYS[1]` its hash,
/// `KEYS[2]` its places in flight), after dropping the places expired.
const ESTIMATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local s = redis.call('HMGET', KEYS[1], 'read', 'kept', 'kept_at_read')
local depth = (tonumber(s[1]) or 0)
    + math.max(0, (tonumber(s[2]) or 0) - (tonumber(s[3]) or 0))
    + redis.call('ZCARD', KEYS[2])
";

/// Reserves a place (`ARGV[2]` its token, `ARGV[3]` how long it counts) if the estimate is
/// below the bound (`ARGV[1]`): `{1, estimate}` or `{0, estimate}`.
fn reserve_script() -> redis::Script {
    redis::Script::new(&format!(
        "{ESTIMATE}
if depth >= tonumber(ARGV[1]) then return {{0, depth}} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {{1, depth + 1}}"
    ))
}

/// Settles a place (`ARGV[1]` its token): no longer in flight; kept (`ARGV[2]` = 1) or given back.
const SETTLE: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'kept', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1";

/// Records a read (`ARGV[1]` the places kept when it was sent, `ARGV[2]` the depth answered),
/// unless one sent later (more places kept before it) is recorded already, or the counters
/// were lost since it was sent (Redis restarted empty: more kept then than now).
const RECORD_READ: &str = r"
local s = redis.call('HMGET', KEYS[1], 'kept', 'kept_at_read')
local sent = tonumber(ARGV[1])
if sent > (tonumber(s[1]) or 0) or sent < (tonumber(s[2]) or 0) then return 0 end
redis.call('HSET', KEYS[1], 'read', ARGV[2], 'kept_at_read', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1";

/// The shared depth estimates of every partition queue. Cheap to clone.
#[derive(Clone)]
pub struct Backlog {
    inner: Arc<Inner>,
}

struct Inner {
    redis: ConnectionManager,
    /// Per partition: its hash key and the key of its places in flight.
    keys: Vec<(String, String)>,
    /// Estimates at or above this refuse further publishes.
    bound: i64,
    /// How long a place in flight counts without an answer (milliseconds).
    hold_ms: u64,
    /// Makes this instance's place tokens unique among all instances.
    instance: String,
    next_token: AtomicU64,
    reserve: redis::Script,
    estimate: redis::Script,
    settle: redis::Script,
    record_read: redis::Script,
}

/// A reserved place in a partition queue. Settle it with [`Place::keep`] (the broker stored the
/// message, or may have) or [`Place::give_back`]; one dropped unsettled is given back in the
/// background.
#[must_use]
pub struct Place {
    inner: Arc<Inner>,
    partition: PartitionId,
    token: String,
    settled: bool,
}

impl Place {
    /// The message is (or may be) in the queue: it counts until a read sent after now.
    pub async fn keep(mut self) {
        self.settled = true;
        settle(&self.inner, self.partition, &self.token, true).await;
    }

    /// The message is not in the queue (refused, or never sent).
    pub async fn give_back(mut self) {
        self.settled = true;
        settle(&self.inner, self.partition, &self.token, false).await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (inner, partition, token) = (self.inner.clone(), self.partition, self.token.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { settle(&inner, partition, &token, false).await });
        }
    }
}

async fn settle(inner: &Inner, partition: PartitionId, token: &str, kept: bool) {
    let (hash, flight) = &inner.keys[usize::from(partition.0)];
    let result: redis::RedisResult<i64> = inner
        .settle
        .key(hash)
        .key(flight)
        .arg(token)
        .arg(if kept { 1 } else { 0 })
        .arg(KEY_TTL.as_millis() as u64)
        .invoke_async(&mut inner.redis.clone())
        .await;
    if let Err(err) = result {
        // The place stays in flight until it expires (the estimate errs on the full side);
        // a kept message is counted by the next read once it has.
        tracing::warn!(%partition, error = %err, kept, "could not settle a place in the queue bound");
    }
}

/// Depth reads about to be sent: the places kept before them, per partition.
pub struct Reads {
    kept: Vec<i64>,
}

impl Backlog {
    /// Shared estimates of `topology`'s queues, in `redis` under `redis_prefix`; a place in
    /// flight counts for at most `hold` (see [`hold_for`]).
    pub fn new(
        redis: ConnectionManager,
        redis_prefix: &str,
        topology: &Topology,
        hold: Duration,
    ) -> Backlog {
        let keys = topology
            .partitions()
            .map(|partition| {
                let hash = format!("{redis_prefix}.backlog:{}", topology.queue(partition));
                let flight = format!("{hash}:flight");
                (hash, flight)
            })
            .collect();
        Backlog {
            inner: Arc::new(Inner {
                redis,
                keys,
                bound: bound(topology.max_length),
                hold_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1),
                instance: uuid::Uuid::new_v4().simple().to_string(),
                next_token: AtomicU64::new(0),
                reserve: reserve_script(),
                estimate: redis::Script::new(&format!("{ESTIMATE}\nreturn depth")),
                settle: redis::Script::new(SETTLE),
                record_read: redis::Script::new(RECORD_READ),
            }),
        }
    }

    /// The bound publishes are refused at.
    pub fn bound(&self) -> i64 {
        self.inner.bound
    }

    /// Reserves a place in `partition`'s queue: `Ok(None)` if it is (estimated) full, an error
    /// if Redis cannot be asked (the publish is refused then too).
    pub async fn reserve(&self, partition: PartitionId) -> redis::RedisResult<Option<Place>> {
        let inner = &self.inner;
        let (hash, flight) = &inner.keys[usize::from(partition.0)];
        let token = format!(
            "{}:{}",
            inner.instance,
            inner.next_token.fetch_add(1, Ordering::Relaxed)
        );
        let (reserved, _estimate): (i64, i64) = inner
            .reserve
            .key(hash)
            .key(flight)
            .arg(inner.bound)
            .arg(&token)
            .arg(inner.hold_ms)
            .arg(KEY_TTL.as_millis() as u64)
            .invoke_async(&mut inner.redis.clone())
            .await?;
        Ok((reserved == 1).then(|| Place {
            inner: inner.clone(),
            partition,
            token,
            settled: false,
        }))
    }

    /// The estimated depth of `partition`'s queue, as every instance sees it.
    pub async fn estimate(&self, partition: PartitionId) -> redis::RedisResult<i64> {
        let (hash, flight) = &self.inner.keys[usize::from(partition.0)];
        self.inner
            .estimate
            .key(hash)
            .key(flight)
            .invoke_async(&mut self.inner.redis.clone())
            .await
    }

    /// Call just before sending the passive declares of a round of depth reads (one pipeline).
    pub async fn begin_reads(&self) -> redis::RedisResult<Reads> {
        let mut pipe = redis::pipe();
        for (hash, _) in &self.inner.keys {
            pipe.hget(hash, "kept");
        }
        let kept: Vec<Option<i64>> = pipe.query_async(&mut self.inner.redis.clone()).await?;
        Ok(Reads {
            kept: kept.into_iter().map(Option::unwrap_or_default).collect(),
        })
    }

    /// Records the depths the broker answered to `reads`, per partition (`None` where a read
    /// failed: that estimate stays as it is), in one pipeline.
    pub async fn end_reads(&self, reads: Reads, depths: &[Option<i64>]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for (((hash, _), kept), depth) in self.inner.keys.iter().zip(reads.kept).zip(depths) {
            if let Some(depth) = depth {
                pipe.invoke_script(
                    self.inner
                        .record_read
                        .key(hash)
                        .arg(kept)
                        .arg(*depth)
                        .arg(KEY_TTL.as_millis() as u64),
                );
                any = true;
            }
        }
        if !any {
            return Ok(());
        }
        let mut redis = self.inner.redis.clone();
        match pipe.query_async::<Vec<i64>>(&mut redis).await {
            // Scripts in a pipeline are not loaded on demand: the first round after a start
            // (or after Redis restarted) loads it and sends the round again.
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.inner
                    .record_read
                    .prepare_invoke()
                    .load_async(&mut redis)
                    .await?;
                pipe.query_async::<Vec<i64>>(&mut redis).await.map(drop)
            }
            other => other.map(drop),
        }
    }

    /// Records one depth read of `partition` (a round of one).
    pub async fn record_read(
        &self,
        partition: PartitionId,
        reads: Reads,
        depth: i64,
    ) -> redis::RedisResult<()> {
        let mut depths = vec![None; self.inner.keys.len()];
        depths[usize::from(partition.0)] = Some(depth);
        self.end_reads(reads, &depths).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_four_fifths_of_the_limit_and_the_limit_itself_below_5() {
        assert_eq!(bound(500_000), 400_000);
        assert_eq!(bound(1000), 800);
        assert_eq!(bound(10), 8);
        assert_eq!(bound(9), 8);
        assert_eq!(bound(5), 4);
        for small in 1..5 {
            assert_eq!(bound(small), small);
        }
    }
}
