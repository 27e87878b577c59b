//! The list of live worker instances, in Redis: each worker whose broker session consumes
//! renews its entry every [`BEAT_EVERY`], and an entry not renewed within [`LEASE`] is gone
//! (a worker killed with `kill -9`, or cut off from Redis). A worker that stops, or whose
//! session ends, removes its entry at once.
//!
//! The list is a sorted set `<redis prefix>.workers:<queue prefix>` (outside the `<prefix>:`
//! namespace of statuses): members are `<worker id>#<session>`, scores the time (Redis's clock,
//! milliseconds) their lease ends. The session number changes when a worker's broker session
//! starts again, so the others see a new list even if they never saw the old entry go: a
//! session that starts again has subscribed anew, behind everybody, and the partitions it owns
//! must be handed back to it ([`crate::seats`]).

use redis::aio::ConnectionManager;
use std::time::Duration;

/// How often a worker renews its entry and reads the list.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// How long an entry lives without renewal.
pub const LEASE: Duration = Duration::from_secs(5);

/// Renews `ARGV[1]` until `ARGV[2]` ms from now, drops expired entries, returns the live ones.
const BEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)";

/// One worker's entry in the list of one deployment's workers.
pub struct Membership {
    redis: ConnectionManager,
    key: String,
    beat: redis::Script,
}

/// One live worker session, as listed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// The worker's id (stable for the life of its process).
    pub worker: String,
    /// Its broker session, counted from 1.
    pub session: u64,
}

impl Member {
    fn entry(&self) -> String {
        format!("{}#{}", self.worker, self.session)
    }

    fn parse(entry: &str) -> Option<Member> {
        let (worker, session) = entry.rsplit_once('#')?;
        Some(Member {
            worker: worker.to_owned(),
            session: session.parse().ok()?,
        })
    }
}

impl Membership {
    pub fn new(redis: ConnectionManager, redis_prefix: &str, queue_prefix: &str) -> Self {
        Self {
            redis,
            key: format!("{redis_prefix}.workers:{queue_prefix}"),
            beat: redis::Script::new(BEAT),
        }
    }

    /// Renews `me` and returns every live member, sorted (`me` among them).
    pub async fn beat(&self, me: &Member) -> redis::RedisResult<Vec<Member>> {
        let entries: Vec<String> = self
            .beat
            .key(&self.key)
            .arg(me.entry())
            .arg(u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.redis.clone())
            .await?;
        let mut members: Vec<Member> = entries.iter().filter_map(|e| Member::parse(e)).collect();
        members.sort();
        Ok(members)
    }

    /// Removes `me` (best effort: if Redis cannot be reached, the lease runs out).
    pub async fn leave(&self, me: &Member) {
        let removed: redis::RedisResult<i64> = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(me.entry())
            .query_async(&mut self.redis.clone())
            .await;
        if let Err(err) = removed {
            tracing::debug!(error = %err, "could not leave the list of workers; the lease will run out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_junk_is_ignored() {
        let member = Member {
            worker: "a1b2#odd".into(),
            session: 7,
        };
        assert_eq!(Member::parse(&member.entry()), Some(member));
        assert_eq!(Member::parse("no-session"), None);
        assert_eq!(Member::parse("w#x"), None);
    }
}
