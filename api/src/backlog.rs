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
//! before it is sent, and is refused at once when the estimate, its own place included, is
//! past the bound. Once the broker answers, the place is kept (confirmed, or ambiguous: the
//! broker may have stored it) or given back (refused, or never sent). A read replaces only
//! what was kept before it was sent: a publish still on its way when the broker answered may
//! not be in the answer, so it stays counted, and one confirmed while the read was on its way
//! is counted twice until the next read. The estimate errs on the full side, never on the empty
//! one. Depths are read every [`POLL_EVERY`] by every API instance ([`crate::publisher`]); only
//! a read sent after the one recorded (more kept places before it) replaces it.
//!
//! # What it costs
//!
//! No round trip of its own on the accept path: the reservation travels in the pipeline that
//! records the message's requests as pending ([`Backlog::reserve_with`]), as three plain
//! commands (add the place, count the places in flight, read the counters; the estimate is
//! computed here, and a place past the bound is given back). Settlements are not sent one by
//! one either: they wait (at most [`FLUSH_AFTER`]) for the next reservation or depth read of
//! this instance, and travel with it. The keys' expiry is renewed by the depth reads, not by
//! each command. A Lua script per reservation and per settlement, as first built, cost Redis
//! about 20 µs of CPU per message and the API two more round trips; the bench's accept
//! scenario measured it (docs/benchmarks.md).
//!
//! # Why plain commands are enough
//!
//! Other instances' commands may run between a reservation's three, and between a
//! settlement's two; the orders make every such interleaving count a place twice, never miss
//! one. A reservation adds its place before it counts (so of two racing reservations each
//! counts the other), and counts the places in flight before it reads the counters. A kept
//! place is added to `kept` before it leaves the set in flight: a count in between sees it in
//! both. So each accepted reservation counted itself and every place accepted before it that
//! is still in flight or kept, and the bound is never passed.
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
//! itself: its counters live in Redis, and reservations of all instances meet there, so the
//! bound is never passed across them (see above; the test `tests/it/backlog.rs` runs two
//! instances against one bound: never more than the bound accepted). A reservation refused past the bound counts against the
//! others for the moment until it is given back (at once, one more round trip on the refusal
//! path): they may be refused a place that was free then (the full side again).
//!
//! Redis because it is already on the accept path: a request is recorded `pending` there
//! before it is published, and a Redis outage already refuses requests (503). The bound adds
//! no dependency and no round trip (see above). PostgreSQL would have served too, at the cost
//! of a row lock per message on the database the workers commit to.
//!
//! An instance that dies between a reservation and its settlement would leave its place
//! counted for ever; so a place in flight is a member of a sorted set scored by its expiry,
//! the confirm timeout plus [`HOLD_MARGIN`] from the reservation (the reserving instance's
//! clock: instances' clocks must agree within the margin), and expired places are removed at
//! each depth read. If the message was stored, the next read counts it. A settlement whose
//! round trip failed is sent again with the next one (a keep counted twice errs on the full
//! side until the next read).
//!
//! Keys (outside the `<prefix>:` namespace of statuses): `<prefix>.backlog:<queue>` (a hash:
//! `read`, `kept`, `kept_at_read`) and `<prefix>.backlog:<queue>:flight` (the places in flight);
//! every depth read sets both to expire after [`KEY_TTL`], so a deployment that stopped leaves
//! nothing (a key first written less than [`POLL_EVERY`] before its last instance stopped has
//! no expiry yet: one small key per partition at most).

use allot_shared::PartitionId;
use allot_shared::amqp::Topology;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often each API instance reads the depth of every partition queue.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long past the confirm timeout a place in flight counts without an answer.
pub const HOLD_MARGIN: Duration = Duration::from_secs(10);
/// How long the keys of a partition live without a write.
pub const KEY_TTL: Duration = Duration::from_secs(3600);
/// How long a settlement waits for a reservation or a depth read to travel with, before it is
/// sent on its own.
pub const FLUSH_AFTER: Duration = Duration::from_millis(5);

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

/// The fields of a queue's hash the estimate reads.
const COUNTERS: [&str; 3] = ["read", "kept", "kept_at_read"];

/// The values of [`COUNTERS`].
type Counters = (Option<i64>, Option<i64>, Option<i64>);

/// The estimate from a queue's counters and its places in flight.
fn depth(read: Option<i64>, kept: Option<i64>, kept_at_read: Option<i64>, in_flight: i64) -> i64 {
    read.unwrap_or(0) + (kept.unwrap_or(0) - kept_at_read.unwrap_or(0)).max(0) + in_flight
}

/// Records a read (`ARGV[1]` the places kept when it was sent, `ARGV[2]` the depth answered),
/// unless one sent later (more places kept before it) is recorded already, or the counters
/// were lost since it was sent (Redis restarted empty: more kept then than now). The one Lua
/// script left: a read is recorded on a condition, ten times a second, off the accept path.
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
    /// Estimates past this refuse further publishes.
    bound: i64,
    /// How long a place in flight counts without an answer (milliseconds).
    hold_ms: u64,
    /// Makes this instance's place tokens unique among all instances.
    instance: String,
    next_token: AtomicU64,
    record_read: redis::Script,
    /// Settlements not yet sent to Redis.
    unsent: Mutex<Vec<Settlement>>,
    /// Whether a flush of [`Inner::unsent`] is on its way.
    flush_scheduled: AtomicBool,
}

/// A place's answer, waiting to be sent.
struct Settlement {
    partition: PartitionId,
    token: String,
    kept: bool,
    /// When the place stops counting anyway (milliseconds, this instance's clock).
    expires_ms: u64,
}

/// A reserved place in a partition queue. Settle it with [`Place::keep`] (the broker stored the
/// message, or may have) or [`Place::give_back`], or their `_later` forms that travel with the
/// next round trip; one dropped unsettled is given back.
#[must_use]
pub struct Place {
    inner: Arc<Inner>,
    partition: PartitionId,
    token: String,
    expires_ms: u64,
    settled: bool,
}

impl Place {
    /// The message is (or may be) in the queue: it counts until a read sent after now.
    pub async fn keep(mut self) {
        let inner = self.settle(true);
        flush(&inner).await;
    }

    /// The message is not in the queue (refused, or never sent).
    pub async fn give_back(mut self) {
        let inner = self.settle(false);
        flush(&inner).await;
    }

    /// [`Place::keep`], sent with this instance's next reservation or depth read, or on its
    /// own after [`FLUSH_AFTER`].
    pub fn keep_later(mut self) {
        schedule_flush(&self.settle(true));
    }

    /// [`Place::give_back`], sent like [`Place::keep_later`].
    pub fn give_back_later(mut self) {
        schedule_flush(&self.settle(false));
    }

    /// Queues the place's settlement (once); the caller sends it.
    fn settle(&mut self, kept: bool) -> Arc<Inner> {
        self.settled = true;
        self.inner.queue(vec![Settlement {
            partition: self.partition,
            token: std::mem::take(&mut self.token),
            kept,
            expires_ms: self.expires_ms,
        }]);
        self.inner.clone()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.settled {
            schedule_flush(&self.settle(false));
        }
    }
}

impl Inner {
    fn queue(&self, mut settlements: Vec<Settlement>) {
        let now = now_ms();
        // A place past its expiry counts no more (the next depth read removes it).
        settlements.retain(|settlement| settlement.kept || settlement.expires_ms > now);
        if !settlements.is_empty() {
            (self.unsent.lock().expect("backlog settlements lock")).append(&mut settlements);
        }
    }

    fn take_unsent(&self) -> Vec<Settlement> {
        std::mem::take(&mut *self.unsent.lock().expect("backlog settlements lock"))
    }

    /// Adds `settlements` to `pipe`: each place leaves the set in flight; a kept one counts as
    /// kept.
    fn add_settlements(&self, pipe: &mut redis::Pipeline, settlements: &[Settlement]) {
        for settlement in settlements {
            let (hash, flight) = &self.keys[usize::from(settlement.partition.0)];
            // Kept first, then out of flight: a count in between sees it twice, never nowhere.
            if settlement.kept {
                pipe.hincr(hash, "kept", 1).ignore();
            }
            pipe.zrem(flight, &settlement.token).ignore();
        }
    }

    /// Settlements whose round trip failed wait for the next one.
    fn requeue(&self, settlements: Vec<Settlement>, err: &redis::RedisError) {
        if !settlements.is_empty() {
            tracing::warn!(count = settlements.len(), error = %err, "could not settle places in the queue bound; they go with the next round trip");
            self.queue(settlements);
        }
    }
}

/// Sends the settlements waiting, if any, in one round trip.
async fn flush(inner: &Inner) {
    let settlements = inner.take_unsent();
    if settlements.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    inner.add_settlements(&mut pipe, &settlements);
    if let Err(err) = pipe.query_async::<()>(&mut inner.redis.clone()).await {
        inner.requeue(settlements, &err);
    }
}

/// Sends the settlements waiting after [`FLUSH_AFTER`], unless a flush is on its way already
/// (or, outside a runtime, leaves them for the next round trip).
fn schedule_flush(inner: &Arc<Inner>) {
    if inner.flush_scheduled.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        inner.flush_scheduled.store(false, Ordering::Release);
        return;
    };
    let inner = inner.clone();
    runtime.spawn(async move {
        tokio::time::sleep(FLUSH_AFTER).await;
        inner.flush_scheduled.store(false, Ordering::Release);
        flush(&inner).await;
    });
}

/// This instance's clock, in milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
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
                record_read: redis::Script::new(RECORD_READ),
                unsent: Mutex::new(Vec::new()),
                flush_scheduled: AtomicBool::new(false),
            }),
        }
    }

    /// The bound publishes are refused past.
    pub fn bound(&self) -> i64 {
        self.inner.bound
    }

    /// Reserves a place in `partition`'s queue: `Ok(None)` if it is (estimated) full, an error
    /// if Redis cannot be asked (the publish is refused then too).
    pub async fn reserve(&self, partition: PartitionId) -> redis::RedisResult<Option<Place>> {
        self.reserve_with(partition, redis::pipe()).await
    }

    /// [`Backlog::reserve`] in one round trip with `pipe`'s commands (whose replies must be
    /// ignored): the intake records a message's pending statuses
    /// this way. The settlements waiting go with it.
    pub async fn reserve_with(
        &self,
        partition: PartitionId,
        mut pipe: redis::Pipeline,
    ) -> redis::RedisResult<Option<Place>> {
        let inner = &self.inner;
        let (hash, flight) = &inner.keys[usize::from(partition.0)];
        let token = format!(
            "{}:{}",
            inner.instance,
            inner.next_token.fetch_add(1, Ordering::Relaxed)
        );
        let expires_ms = now_ms().saturating_add(inner.hold_ms);
        let settlements = inner.take_unsent();
        inner.add_settlements(&mut pipe, &settlements);
        // In this order (see the module documentation): add, count, read.
        pipe.zadd(flight, &token, expires_ms).ignore();
        pipe.zcard(flight);
        pipe.cmd("HMGET").arg(hash).arg(&COUNTERS[..]);
        let answer: redis::RedisResult<(i64, Counters)> =
            pipe.query_async(&mut inner.redis.clone()).await;
        let (in_flight, (read, kept, kept_at_read)) = match answer {
            Ok(answer) => answer,
            Err(err) => {
                inner.requeue(settlements, &err);
                return Err(err);
            }
        };
        let place = Place {
            inner: inner.clone(),
            partition,
            token,
            expires_ms,
            settled: false,
        };
        // The count includes this place.
        if depth(read, kept, kept_at_read, in_flight) > inner.bound {
            // At once: until it is given back, it counts against the other instances too.
            place.give_back().await;
            return Ok(None);
        }
        Ok(Some(place))
    }

    /// The estimated depth of `partition`'s queue, as every instance sees it (the settlements
    /// of this instance sent first).
    pub async fn estimate(&self, partition: PartitionId) -> redis::RedisResult<i64> {
        flush(&self.inner).await;
        let (hash, flight) = &self.inner.keys[usize::from(partition.0)];
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrembyscore(flight, "-inf", now_ms())
            .ignore()
            .zcard(flight)
            .cmd("HMGET")
            .arg(hash)
            .arg(&COUNTERS[..]);
        let (in_flight, (read, kept, kept_at_read)): (i64, Counters) =
            pipe.query_async(&mut self.inner.redis.clone()).await?;
        Ok(depth(read, kept, kept_at_read, in_flight))
    }

    /// Call just before sending the passive declares of a round of depth reads (one pipeline,
    /// which also removes the places expired, renews the keys' expiry and carries the
    /// settlements waiting).
    pub async fn begin_reads(&self) -> redis::RedisResult<Reads> {
        let inner = &self.inner;
        let settlements = inner.take_unsent();
        let mut pipe = redis::pipe();
        inner.add_settlements(&mut pipe, &settlements);
        let (now, ttl) = (now_ms(), KEY_TTL.as_millis() as i64);
        for (hash, flight) in &inner.keys {
            pipe.zrembyscore(flight, "-inf", now).ignore();
            // Renewed here rather than by each reservation and settlement.
            pipe.pexpire(flight, ttl).ignore();
            pipe.pexpire(hash, ttl).ignore();
            pipe.hget(hash, "kept");
        }
        let kept: Vec<Option<i64>> = match pipe.query_async(&mut inner.redis.clone()).await {
            Ok(kept) => kept,
            Err(err) => {
                inner.requeue(settlements, &err);
                return Err(err);
            }
        };
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
