//! Safe retries: the `Idempotency-Key` request header (IETF httpapi draft "The Idempotency-Key
//! HTTP Header Field") on the purchase endpoints.
//!
//! The same key, from the same buyer, with the same request, makes at most one transaction and
//! gets the same answer for [`KEY_TTL`] (24 hours) from the first attempt; the same key with
//! another request is `422 idempotency_key_reused`; while the first attempt is still being
//! accepted (milliseconds, a confirm timeout at worst) a second one is `409
//! idempotency_key_in_flight` with `Retry-After: 1`, as the draft asks. A first attempt that is
//! refused (`503`) does not poison the key: if nothing was published (queue full, Redis down)
//! the key is given back and a retry is a new attempt; if the broker may have stored the message
//! (no confirm), the retry takes the key over at once with the same transaction id (see below).
//! Without the header nothing here runs.
//!
//! What is remembered is the *outcome of accepting*, not the HTTP bytes: the transaction id
//! (replayed as `202` with its `Location`, or, with `Prefer: wait`, as its final state) or a
//! final answer given at once (the catalogue's answer for a product sold out, outside its sale
//! window or paused, replayed as it was). Replays carry `Idempotent-Replayed: true`.
//!
//! ## How one transaction is guaranteed
//!
//! The record lives in Redis, a hash under `<prefix>:idem:<user id>:<SHA-256 of the key>`,
//! expiring [`KEY_TTL`] after the first attempt: `fp` (the request's [`Fingerprint`]), `tx`
//! (the transaction id), `state` (`in_flight` or `done`), `lease`, `answer`. One Lua script
//! claims it atomically, so of two concurrent attempts exactly one proceeds.
//!
//! The transaction id is chosen when the key is claimed and **pinned in the record before
//! anything is published**. So whatever breaks after that point, no second transaction can
//! appear: if this process dies after the broker took the message, or the record's completion
//! is lost, the claim's lease expires ([`lease_for`]) and the next attempt takes the key over
//! *with the same id*. It looks the id up in PostgreSQL first: decided (and not withdrawn) means
//! it is replayed; withdrawn (`not_accepted`: the first attempt was refused) means a fresh id;
//! unknown means it publishes the same id again, and the worker's primary key on the
//! transaction id decides it once whether or not the first copy arrived.
//!
//! Hence the promises hold as long as Redis keeps the record: a Redis that loses its data (no
//! append-only file, or the last second of writes under `appendfsync everysec`) forgets keys,
//! and a retry after that is a new purchase (see docs/guarantees.md).

use crate::error::{ApiError, Unavailability};
use crate::state::AppState;
use allot_shared::stored;
use allot_shared::{RejectReason, TransactionId, UserId};
use axum::http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::time::Duration;

/// The request header.
pub static HEADER: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header of a replayed answer.
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The longest key, in characters (after unquoting).
pub const MAX_KEY_LEN: usize = 255;
/// How long a key is remembered after its first attempt.
pub const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A valid key, unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The request's key, if it sent one: one `Idempotency-Key` header whose value is either a
/// Structured Field string (`"..."`, RFC 8941, as the draft specifies) or the bare key, 1 to
/// [`MAX_KEY_LEN`] printable ASCII characters. Anything else is `400 invalid_idempotency_key`.
pub fn key_of(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all(&HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid_key("send one Idempotency-Key header, not several"));
    }
    parse_key(value.as_bytes()).map(Some).map_err(invalid_key)
}

fn invalid_key(why: impl Into<String>) -> ApiError {
    ApiError::InvalidIdempotencyKey(why.into())
}

/// The pure part of [`key_of`].
pub fn parse_key(raw: &[u8]) -> Result<IdempotencyKey, String> {
    let printable = |b: &u8| (0x20..=0x7e).contains(b);
    if !raw.iter().all(printable) {
        return Err(
            "Idempotency-Key must be printable ASCII (a quoted string, or the bare key)".into(),
        );
    }
    let key = match raw.strip_prefix(b"\"") {
        Some(quoted) => {
            let Some(inner) = quoted.strip_suffix(b"\"") else {
                return Err("Idempotency-Key opens a quoted string it does not close".into());
            };
            let mut key = Vec::with_capacity(inner.len());
            let mut bytes = inner.iter();
            while let Some(&byte) = bytes.next() {
                match byte {
                    b'\\' => match bytes.next() {
                        Some(&escaped @ (b'"' | b'\\')) => key.push(escaped),
                        _ => {
                            return Err(
                                "Idempotency-Key: in a quoted string, '\\' may only escape '\"' or '\\'".into(),
                            );
                        }
                    },
                    b'"' => return Err("Idempotency-Key: unescaped '\"' in a quoted string".into()),
                    other => key.push(other),
                }
            }
            key
        }
        None => {
            if raw.iter().any(|b| matches!(b, b'"' | b'\\')) {
                return Err("Idempotency-Key: quote the key to use '\"' or '\\' in it".into());
            }
            raw.to_vec()
        }
    };
    if key.is_empty() {
        return Err("Idempotency-Key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "Idempotency-Key may have at most {MAX_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    Ok(IdempotencyKey(
        String::from_utf8(key).expect("printable ASCII is UTF-8"),
    ))
}

/// What makes two requests "the same": the operation and its validated content (the buyer is
/// part of the key's scope, not of the fingerprint). Computed from the parsed request, so
/// whitespace, field order and an explicit `user_id` equal to the token's do not matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `request` sent to `operation` (a fixed name per endpoint).
    pub fn of(operation: &str, request: &impl Serialize) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(operation.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(request).expect("a request serialises"));
        Self(hasher.finalize().into())
    }

    fn hex(&self) -> String {
        hex(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The outcome of accepting a request, as remembered under its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remembered {
    /// Accepted (202) as this transaction.
    Accepted(TransactionId),
    /// Answered at once and finally with this JSON body (200), nothing recorded: the
    /// catalogue's answer ([`crate::catalogue::FinalAnswer`]).
    Final(String),
}

/// How a keyed request was settled.
#[derive(Debug)]
pub enum Settled {
    /// This request did the work.
    Fresh(Remembered),
    /// An earlier attempt did; this is its answer again.
    Replayed(Remembered),
}

/// Why the work of a keyed request failed, and whether its transaction id may be used again
/// by a fresh id's attempt.
#[derive(Debug)]
pub struct Failed {
    /// The answer.
    pub error: ApiError,
    /// Nothing was published under the attempt's transaction id (the queue was full, Redis
    /// refused the pending status, the request was invalid): the key is given back, and a
    /// retry is a fresh attempt. Otherwise (the broker may have stored the message: no
    /// confirm came) the key keeps the id, and the retry takes it over: PostgreSQL then tells
    /// whether it was withdrawn (a fresh id) or not (the same id, published again).
    pub nothing_sent: bool,
}

impl Failed {
    /// A failure before anything was published.
    pub fn nothing_sent(error: ApiError) -> Self {
        Self {
            error,
            nothing_sent: true,
        }
    }
}

/// By default a failure may have published something: the key keeps its transaction id.
impl From<ApiError> for Failed {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            nothing_sent: false,
        }
    }
}

/// What the work of a keyed request is given.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// The transaction id to accept the request as.
    pub transaction_id: TransactionId,
    /// `false` when an earlier attempt with this id may have reached the broker (its claim's
    /// lease ran out): then the request must be published again as it is, never answered
    /// another way (no answer at once from the catalogue), or two answers could exist for one key.
    pub first: bool,
}

/// How long a claim holds off other attempts: longer than any attempt can take (the broker's
/// confirm timeout, then a withdrawal in PostgreSQL), with room to spare.
pub fn lease_for(confirm_timeout: Duration) -> Duration {
    confirm_timeout + Duration::from_secs(60)
}

/// Runs `work` at most once per key, buyer and request; see the module documentation.
///
/// `candidate` is the transaction id a fresh attempt gets: pass the one a `Prefer: wait`
/// waiter is registered on. The work runs in a task of its own, so a client that disconnects
/// cannot leave its key claimed half-way.
pub async fn once<F, Fut>(
    state: &AppState,
    user: UserId,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    candidate: TransactionId,
    work: F,
) -> Result<Settled, ApiError>
where
    F: FnOnce(Attempt) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Remembered, Failed>> + Send + 'static,
{
    let state = state.clone();
    tokio::spawn(async move {
        let record = Record {
            key: record_key(state.statuses.prefix(), user, &key),
            redis: state.redis.clone(),
        };
        let attempt = match record
            .settle_claim(&state, fingerprint, candidate)
            .await?
        {
            Claimed::Attempt(attempt) => attempt,
            Claimed::Replay(answer) => return Ok(Settled::Replayed(answer)),
        };
        match work(attempt).await {
            Ok(answer) => {
                if let Err(err) = record.complete(attempt.transaction_id, &answer).await {
                    // The claim's lease runs out and the next attempt takes the key over with
                    // the same transaction id: still one transaction.
                    tracing::warn!(error = %format_args!("{err:#}"), "could not record an idempotent answer");
                }
                Ok(Settled::Fresh(answer))
            }
            Err(failed) => {
                // Free the key only if nothing can have reached the broker under this id;
                // otherwise keep the id pinned and let the next attempt take it over at once.
                let given_back = if attempt.first && failed.nothing_sent {
                    record.release(attempt.transaction_id).await
                } else {
                    record.expire_lease(attempt.transaction_id).await
                };
                if let Err(err) = given_back {
                    tracing::warn!(error = %format_args!("{err:#}"), "could not give an idempotency key back");
                }
                Err(failed.error)
            }
        }
    })
    .await
    .map_err(|err| ApiError::Internal(anyhow::anyhow!("an idempotent request's task failed: {err}")))?
}

/// The Redis key of a record: the buyer's scope and a hash of the key (any printable key, of
/// bounded length).
pub fn record_key(prefix: &str, user: UserId, key: &IdempotencyKey) -> String {
    format!(
        "{prefix}:idem:{user}:{}",
        hex(&Sha256::digest(key.as_str().as_bytes()))
    )
}

/// The outcome of claiming a key.
enum Claimed {
    Attempt(Attempt),
    Replay(Remembered),
}

/// What the claim script answered.
#[derive(Debug, PartialEq)]
enum ClaimReply {
    /// The key was free: the work may run with this id.
    Claimed(TransactionId),
    /// The key belongs to another request.
    Reused,
    /// Done before: this answer.
    Done(Remembered),
    /// Another attempt holds the lease.
    InFlight,
    /// An attempt's lease ran out: this one takes the key over, with the pinned id.
    TakenOver(TransactionId),
}

impl ClaimReply {
    fn parse(reply: &[String]) -> anyhow::Result<Self> {
        let id = |raw: &str| -> anyhow::Result<TransactionId> { Ok(TransactionId(raw.parse()?)) };
        Ok(match reply {
            [state, tx] if state == "claimed" => ClaimReply::Claimed(id(tx)?),
            [state] if state == "reused" => ClaimReply::Reused,
            [state, answer] if state == "done" => ClaimReply::Done(serde_json::from_str(answer)?),
            [state] if state == "in_flight" => ClaimReply::InFlight,
            [state, tx] if state == "taken_over" => ClaimReply::TakenOver(id(tx)?),
            other => anyhow::bail!("unexpected reply of the claim script: {other:?}"),
        })
    }
}

/// One key's record in Redis.
struct Record {
    key: String,
    redis: redis::aio::ConnectionManager,
}

/// Claims the record: KEYS[1] the record; ARGV fingerprint, candidate id, lease (ms), TTL (ms).
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = string.format('%.0f', now + tonumber(ARGV[3]))
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'tx', ARGV[2], 'state', 'in_flight', 'lease', lease)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'claimed', ARGV[2]}
end
local rec = redis.call('HMGET', KEYS[1], 'fp', 'tx', 'state', 'lease', 'answer')
if rec[1] ~= ARGV[1] then return {'reused'} end
if rec[3] == 'done' then return {'done', rec[5]} end
if tonumber(rec[4]) > now then return {'in_flight'} end
redis.call('HSET', KEYS[1], 'lease', lease)
return {'taken_over', rec[2]}
";

/// Completes the claim of ARGV[1] with the answer ARGV[2].
const COMPLETE: &str = r"
if redis.call('HGET', KEYS[1], 'tx') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'answer', ARGV[2])
redis.call('HDEL', KEYS[1], 'lease')
return 1
";

/// Lets the claim of ARGV[1], if it is still in flight, be taken over at once.
const EXPIRE_LEASE: &str = r"
local rec = redis.call('HMGET', KEYS[1], 'tx', 'state')
if rec[1] ~= ARGV[1] or rec[2] ~= 'in_flight' then return 0 end
redis.call('HSET', KEYS[1], 'lease', '0')
return 1
";

/// Gives back the claim of ARGV[1], if it is still in flight.
const RELEASE: &str = r"
local rec = redis.call('HMGET', KEYS[1], 'tx', 'state')
if rec[1] ~= ARGV[1] or rec[2] ~= 'in_flight' then return 0 end
return redis.call('DEL', KEYS[1])
";

impl Record {
    async fn claim(
        &self,
        fingerprint: Fingerprint,
        candidate: TransactionId,
        lease: Duration,
    ) -> anyhow::Result<ClaimReply> {
        let reply: Vec<String> = redis::Script::new(CLAIM)
            .key(&self.key)
            .arg(fingerprint.hex())
            .arg(candidate.to_string())
            .arg(lease.as_millis() as u64)
            .arg(KEY_TTL.as_millis() as u64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        ClaimReply::parse(&reply)
    }

    /// Claims the key and settles what a claim finds, down to either work to do or an answer
    /// to replay.
    async fn settle_claim(
        &self,
        state: &AppState,
        fingerprint: Fingerprint,
        candidate: TransactionId,
    ) -> Result<Claimed, ApiError> {
        let lease = state.idempotency_lease;
        let mut candidate = candidate;
        // At most twice: a taken-over id that turns out withdrawn is given back, and the key
        // claimed afresh.
        for _ in 0..2 {
            let reply = self
                .claim(fingerprint, candidate, lease)
                .await
                .map_err(store_unavailable)?;
            match reply {
                ClaimReply::Claimed(id) => {
                    return Ok(Claimed::Attempt(Attempt {
                        transaction_id: id,
                        first: true,
                    }));
                }
                ClaimReply::Reused => return Err(ApiError::IdempotencyKeyReused),
                ClaimReply::Done(answer) => return Ok(Claimed::Replay(answer)),
                ClaimReply::InFlight => return Err(ApiError::IdempotencyKeyInFlight),
                ClaimReply::TakenOver(id) => {
                    let stored = match stored::fetch_one(&state.pool, id).await {
                        Ok(stored) => stored,
                        Err(err) => {
                            // Still pinned to `id`: the next attempt tries the takeover again.
                            let _ = self.expire_lease(id).await;
                            tracing::warn!(error = %err, "cannot look up a retaken transaction");
                            return Err(ApiError::unavailable(
                                Unavailability::DatabaseUnavailable,
                                "the database is unavailable; the request was not accepted, try again",
                                1,
                            ));
                        }
                    };
                    let withdrawn = RejectReason::NotAccepted.as_str();
                    match stored {
                        None => {
                            return Ok(Claimed::Attempt(Attempt {
                                transaction_id: id,
                                first: false,
                            }));
                        }
                        Some(row) if row.reason.as_deref() == Some(withdrawn) => {
                            self.release(id).await.map_err(store_unavailable)?;
                            candidate = TransactionId::new();
                        }
                        Some(_) => {
                            let answer = Remembered::Accepted(id);
                            self.complete(id, &answer)
                                .await
                                .map_err(store_unavailable)?;
                            return Ok(Claimed::Replay(answer));
                        }
                    }
                }
            }
        }
        Err(ApiError::IdempotencyKeyInFlight)
    }

    async fn complete(&self, id: TransactionId, answer: &Remembered) -> anyhow::Result<()> {
        let _: i64 = redis::Script::new(COMPLETE)
            .key(&self.key)
            .arg(id.to_string())
            .arg(serde_json::to_string(answer)?)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    async fn expire_lease(&self, id: TransactionId) -> anyhow::Result<()> {
        let _: i64 = redis::Script::new(EXPIRE_LEASE)
            .key(&self.key)
            .arg(id.to_string())
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    async fn release(&self, id: TransactionId) -> anyhow::Result<()> {
        let _: i64 = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(id.to_string())
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }
}

fn store_unavailable(err: anyhow::Error) -> ApiError {
    tracing::warn!(error = %format_args!("{err:#}"), "the idempotency store is unavailable");
    ApiError::unavailable(
        Unavailability::RedisUnavailable,
        "the idempotency store is unavailable; the request was not accepted, try again",
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(raw: &str) -> Result<String, String> {
        parse_key(raw.as_bytes()).map(|key| key.0)
    }

    #[test]
    fn keys_are_quoted_strings_or_bare_printable_ascii() {
        assert_eq!(
            key(r#""8e03978e-40d5-43e8-bc93-6894a57f9324""#).as_deref(),
            Ok("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(key("8e03978e-40d5").as_deref(), Ok("8e03978e-40d5"));
        assert_eq!(key(r#""a \"b\" \\ c""#).as_deref(), Ok(r#"a "b" \ c"#));
        assert_eq!(key("a b").as_deref(), Ok("a b"));
        assert_eq!(key(&"k".repeat(255)).map(|k| k.len()), Ok(255));
        assert_eq!(
            key(&format!("\"{}\"", "k".repeat(255))).map(|k| k.len()),
            Ok(255)
        );
        for bad in [
            "",
            "\"\"",
            "\"open",
            "a\"b",
            r"a\b",
            r#""\x""#,
            r#""a"b""#,
            "caf\u{e9}",
            "tab\there",
            &"k".repeat(256),
        ] {
            assert!(key(bad).is_err(), "{bad:?}");
        }
        assert!(parse_key(b"\xff").is_err());
    }

    #[test]
    fn claim_replies_are_read_exactly() {
        let id = TransactionId::new();
        let s = |parts: &[&str]| parts.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ClaimReply::parse(&s(&["claimed", &id.to_string()])).unwrap(),
            ClaimReply::Claimed(id)
        );
        assert_eq!(
            ClaimReply::parse(&s(&["reused"])).unwrap(),
            ClaimReply::Reused
        );
        assert_eq!(
            ClaimReply::parse(&s(&["in_flight"])).unwrap(),
            ClaimReply::InFlight
        );
        assert_eq!(
            ClaimReply::parse(&s(&["taken_over", &id.to_string()])).unwrap(),
            ClaimReply::TakenOver(id)
        );
        let answer = serde_json::to_string(&Remembered::Accepted(id)).unwrap();
        assert_eq!(
            ClaimReply::parse(&s(&["done", &answer])).unwrap(),
            ClaimReply::Done(Remembered::Accepted(id))
        );
        assert!(ClaimReply::parse(&s(&["done"])).is_err());
        assert!(ClaimReply::parse(&s(&["claimed", "not-a-uuid"])).is_err());
    }

    #[test]
    fn a_remembered_final_answer_keeps_its_json_exactly() {
        let body = r#"{"status":"rejected","reason":"out_of_stock","user_id":1000000000000001,"product_id":9,"quantity":1,"final":true}"#;
        let answer = Remembered::Final(body.to_owned());
        let stored = serde_json::to_string(&answer).unwrap();
        assert_eq!(serde_json::from_str::<Remembered>(&stored).unwrap(), answer);
    }

    #[test]
    fn fingerprints_differ_by_operation_and_content() {
        let a = Fingerprint::of("addToCart", &(1, 2));
        assert_eq!(a, Fingerprint::of("addToCart", &(1, 2)));
        assert_ne!(a, Fingerprint::of("addToCart", &(1, 3)));
        assert_ne!(a, Fingerprint::of("orders", &(1, 2)));
        assert_eq!(a.hex().len(), 64);
    }

    proptest! {
        #[test]
        fn any_printable_key_round_trips_through_its_quoted_form(raw in "[ -~]{1,255}") {
            let quoted = format!("\"{}\"", raw.replace('\\', r"\\").replace('"', "\\\""));
            prop_assert_eq!(key(&quoted), Ok(raw));
        }
    }
}
