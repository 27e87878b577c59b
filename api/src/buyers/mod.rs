//! Buyers: accounts, their tokens, and who may buy and read as whom.
//!
//! Three kinds of caller, told apart by the `Authorization` header alone ([`Caller`], no I/O):
//! - **anonymous** (no header): buys as the `user_id` its body names, only while
//!   `ALLOT_ANONYMOUS_BUYERS` is true (the default), and only below [`ACCOUNT_IDS_FROM`]:
//!   account ids start there, so an anonymous request can never buy as, or read the
//!   transactions of, an account;
//! - **a buyer** (`Bearer allotb1_...`, from `POST /api/v1/auth/login`): buys as its account;
//!   a body `user_id` must be that account's or the request is `403 user_mismatch`;
//! - **staff** (`Bearer <ALLOT_ADMIN_TOKEN>`): buys on behalf of the body's `user_id`, any id,
//!   and reads every transaction and history.
//!
//! A token that is present but not good (forged, altered, expired, revoked, of another
//! deployment, not a bearer token) is `401 unauthorized`: never silently treated as anonymous.
//!
//! [`resolve`] (who buys) and [`authorize_read`] (who may read a transaction) are the two
//! decisions every purchase and read endpoint makes; they are pure.
//!
//! Both purchase endpoints (`addToCart` and `POST /api/v1/orders`) take [`Caller`] before
//! their body, [`resolve`] the buyer from the body's optional `user_id`, and hand the validated
//! order to [`crate::routes::accept`], which does the rest for both: if
//! [`crate::idempotency::key_of`] finds a key, the accepting runs inside
//! [`crate::idempotency::once`] (with a [`crate::idempotency::Fingerprint`] of the endpoint and
//! the order's lines, and [`crate::idempotency::Failed`] saying whether a refusal published
//! nothing); around the intake, [`pending::note`] indexes the transaction first and
//! [`pending::forget`] unindexes it if refused (no-ops for anonymous buyers), so that an
//! account's history lists it from its `202` on.

pub mod accounts;
pub mod credentials;
pub mod limits;
pub mod pending;
pub mod sessions;
pub mod tokens;

use crate::error::ApiError;
use crate::state::AppState;
use allot_shared::{Clock, SystemClock, TransactionId, UserId};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use std::sync::Arc;
use std::time::Duration;
use tokens::{Claims, TokenKey};

/// The first account id. Anonymous buyers name ids below it.
pub const ACCOUNT_IDS_FROM: i64 = 1_000_000_000_000_000;

/// Whether `user` is an account's id (rather than an id an anonymous buyer names).
pub fn is_account(user: UserId) -> bool {
    user.get() >= ACCOUNT_IDS_FROM
}

/// The buyers' part of the API's state.
pub struct Buyers {
    /// `ALLOT_ANONYMOUS_BUYERS`: whether a request without a token may buy (and read) by
    /// naming a `user_id`.
    pub anonymous_allowed: bool,
    /// Signs and verifies buyer tokens.
    pub key: TokenKey,
    /// How long a token is valid.
    pub token_ttl: Duration,
    /// Revoked sessions, refreshed from PostgreSQL.
    pub revocations: Arc<sessions::Revocations>,
    /// How often `revocations` is refreshed.
    pub revocation_refresh: Duration,
    /// Login budgets per username and per client address.
    pub limits: Arc<limits::LoginLimits>,
    /// Argon2id, on the blocking pool.
    pub hasher: credentials::Hasher,
}

impl Buyers {
    pub fn from_config(config: &crate::ApiConfig) -> Self {
        let per_minute = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            anonymous_allowed: config.anonymous_buyers,
            key: config.token_key(),
            token_ttl: Duration::from_secs(config.token_ttl_secs),
            revocations: Arc::default(),
            revocation_refresh: Duration::from_millis(config.revocation_refresh_ms),
            limits: Arc::new(limits::LoginLimits::new(
                per_minute(config.login_per_username_per_minute),
                per_minute(config.login_per_address_per_minute),
            )),
            hasher: credentials::Hasher::default(),
        }
    }
}

/// Who sent a request, from its `Authorization` header. Extracting it costs no I/O: a buyer's
/// token is verified by its signature, its expiry and the in-memory revocations.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No `Authorization` header.
    Anonymous,
    /// The staff's token.
    Staff,
    /// A buyer's valid token.
    Buyer(Claims),
}

impl Caller {
    /// The account of a buyer's token.
    pub fn buyer(&self) -> Option<UserId> {
        match self {
            Caller::Buyer(claims) => Some(claims.user),
            _ => None,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(AUTHORIZATION) else {
            return Ok(Caller::Anonymous);
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "the Authorization header must be `Bearer <token>`".into(),
                )
            })?;
        // Constant-time, so response timing does not leak how much of a guess was right.
        if constant_time_eq::constant_time_eq(presented.as_bytes(), state.admin_token.as_bytes()) {
            return Ok(Caller::Staff);
        }
        let claims = state
            .buyers
            .key
            .verify(presented, SystemClock.now())
            .map_err(|err| ApiError::Unauthenticated(err.to_string()))?;
        if state.buyers.revocations.contains(claims.session) {
            return Err(ApiError::Unauthenticated(
                "the bearer token was revoked (logged out); log in again".into(),
            ));
        }
        Ok(Caller::Buyer(claims))
    }
}

/// Who a purchase is for, given who sent it and the `user_id` its body names (if any).
///
/// - a buyer: its account; a different body `user_id` is `403 user_mismatch`;
/// - staff: the body's `user_id` (required, `422` without);
/// - anonymous: `401` unless `ALLOT_ANONYMOUS_BUYERS`; then the body's `user_id` (required,
///   below [`ACCOUNT_IDS_FROM`]; `422` otherwise).
pub fn resolve(
    state: &AppState,
    caller: &Caller,
    body_user: Option<UserId>,
) -> Result<UserId, ApiError> {
    match caller {
        Caller::Buyer(claims) => match body_user {
            Some(named) if named != claims.user => Err(ApiError::UserMismatch(format!(
                "this token is account {}'s; the body names user_id {named}",
                claims.user
            ))),
            _ => Ok(claims.user),
        },
        Caller::Staff => body_user.ok_or_else(|| {
            ApiError::InvalidBody("user_id is required when staff buy on a buyer's behalf".into())
        }),
        Caller::Anonymous => {
            require_anonymous_allowed(state)?;
            let user = body_user.ok_or_else(|| {
                ApiError::InvalidBody(
                    "user_id is required without a buyer's token (Authorization: Bearer <token>)"
                        .into(),
                )
            })?;
            if is_account(user) {
                return Err(ApiError::InvalidBody(format!(
                    "user_id must be below {ACCOUNT_IDS_FROM} without a token: ids from there on \
                     are accounts, which buy with their token"
                )));
            }
            Ok(user)
        }
    }
}

/// `401` for an anonymous caller while `ALLOT_ANONYMOUS_BUYERS` is false. Checked before any
/// read, so that an anonymous request then costs nothing.
pub fn require_anonymous_allowed(state: &AppState) -> Result<(), ApiError> {
    if state.buyers.anonymous_allowed {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated(
            "this server serves logged-in buyers only: send Authorization: Bearer <token> \
             (POST /api/v1/auth/login)"
                .into(),
        ))
    }
}

/// Whether `caller` may read transaction `id` of `owner`. Staff read every transaction; a
/// buyer only its account's; an anonymous reader (while `ALLOT_ANONYMOUS_BUYERS`) every
/// anonymous one, by id, as before accounts existed, and no account's. A transaction the
/// caller may not read is `404 not_found`, exactly as an unknown id, so ids cannot be probed.
pub fn authorize_read(
    state: &AppState,
    caller: &Caller,
    id: TransactionId,
    owner: UserId,
) -> Result<(), ApiError> {
    let allowed = match caller {
        Caller::Staff => true,
        Caller::Buyer(claims) => claims.user == owner,
        Caller::Anonymous => {
            require_anonymous_allowed(state)?;
            !is_account(owner)
        }
    };
    if allowed { Ok(()) } else { Err(not_found(id)) }
}

/// The 404 of a transaction that does not exist, or that the caller may not see.
pub fn not_found(id: TransactionId) -> ApiError {
    ApiError::NotFound(format!("no transaction {id}"))
}
