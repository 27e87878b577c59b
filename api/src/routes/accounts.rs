//! Buyer accounts: `POST /api/v1/users` (sign up), `POST /api/v1/auth/login` (a token),
//! `POST /api/v1/auth/logout` (revokes it). See [`crate::buyers`] for the rules and the token.
//!
//! Neither passwords nor tokens are logged: handlers are instrumented with `skip_all`, and the
//! password type's `Debug` shows nothing.

use crate::buyers::credentials::{PASSWORD_MAX, PASSWORD_MIN, Password, Username};
use crate::buyers::limits::retry_after_secs;
use crate::buyers::{Caller, accounts, sessions, tokens};
use crate::error::{ApiError, ErrorBody, Unavailability};
use crate::extract::{AppJson, ClientAddress};
use crate::state::AppState;
use allot_shared::{Clock, SystemClock, UserId};
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A sign-up or a login.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// 3 to 32 characters: ASCII letters, digits, `.`, `_`, `-`, beginning with a letter or a
    /// digit. Case-insensitive (stored in lower case).
    #[schema(
        example = "alice",
        min_length = 3,
        max_length = 32,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$"
    )]
    pub username: String,
    /// 8 to 128 characters, any but control characters; not the username. Never stored,
    /// logged or returned: only its Argon2id hash is kept.
    // The pattern says what the length cannot: no control character (Unicode `Cc`).
    #[schema(value_type = String, example = "correct horse battery", min_length = 8, max_length = 128, format = Password,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub password: Password,
}

/// A new account.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewAccount {
    /// The account's id: the `user_id` of its purchases (10^15 and up).
    #[schema(value_type = i64, example = 1_000_000_000_000_000_i64)]
    pub user_id: UserId,
    /// As stored: lower case.
    #[schema(example = "alice")]
    pub username: String,
    pub created_at: DateTime<Utc>,
}

/// A buyer's bearer token.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Token {
    /// Send it as `Authorization: Bearer <token>`. Opaque to clients (`allotb1_` and 86
    /// characters); keep it secret.
    #[schema(
        example = "allotb1_AZLf7uV0cgCWh0y3oVqQ5QADjX6kxoAAAAAAaUUMQRt5x0b0mQ6rbpj5Q1JX9a6N8m2wQm2aS1C3p3i0fCQ"
    )]
    pub token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: String,
    /// The token is refused from this instant on (`ALLOT_TOKEN_TTL_SECS` after login).
    pub expires_at: DateTime<Utc>,
    #[schema(value_type = i64, example = 1_000_000_000_000_000_i64)]
    pub user_id: UserId,
    #[schema(example = "alice")]
    pub username: String,
}

/// Checks the credentials' form; the username as stored.
fn username_of(raw: &str) -> Result<Username, ApiError> {
    Username::parse(raw).map_err(ApiError::InvalidBody)
}

fn rate_limited(wait: std::time::Duration) -> ApiError {
    ApiError::RateLimited {
        retry_after_secs: retry_after_secs(wait),
    }
}

#[utoipa::path(post, path = "/api/v1/users", tag = crate::openapi::BUYERS,
    summary = "Sign up: create a buyer account",
    description = "Creates an account; log in with `POST /api/v1/auth/login` to get a token. The password \
        is hashed with Argon2id and never stored, logged or returned. A sign-up counts against its client \
        address's login budget (`ALLOT_LOGIN_PER_ADDRESS_PER_MINUTE`).",
    request_body = Credentials,
    responses(
        (status = 201, description = "Created", body = NewAccount),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 409, description = "`username_taken`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: a username or password that breaks the rules", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many attempts from this address; see `Retry-After`", body = ErrorBody,
            headers(("retry-after" = u32, description = "Seconds until an attempt is allowed"))),
        (status = 503, description = "`database_unavailable`: the database cannot be reached (or `timeout`); retry after `Retry-After`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
pub async fn sign_up(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    AppJson(body): AppJson<Credentials>,
) -> Result<(StatusCode, Json<NewAccount>), ApiError> {
    let username = username_of(&body.username)?;
    body.password
        .check_new(&username)
        .map_err(ApiError::InvalidBody)?;
    state
        .buyers
        .limits
        .check_address(address)
        .map_err(rate_limited)?;
    let hash = state.buyers.hasher.hash(body.password).await?;
    let account = accounts::create(&state.pool, &username, &hash)
        .await
        .map_err(database_unavailable)?
        .ok_or_else(|| {
            ApiError::UsernameTaken(format!("the username {:?} is taken", username.as_str()))
        })?;
    tracing::info!(user_id = %account.id, "account created");
    Ok((
        StatusCode::CREATED,
        Json(NewAccount {
            user_id: account.id,
            username: account.username,
            created_at: account.created_at,
        }),
    ))
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = crate::openapi::BUYERS,
    summary = "Log in: get a bearer token",
    description = "Answers a signed bearer token valid for `ALLOT_TOKEN_TTL_SECS` (24 h by default), for \
        `Authorization: Bearer <token>` on purchases, reads and history. Rate-limited per username \
        (`ALLOT_LOGIN_PER_USERNAME_PER_MINUTE`) and per client address (`ALLOT_LOGIN_PER_ADDRESS_PER_MINUTE`): \
        over either, `429` with `Retry-After`. A wrong username and a wrong password get the same `401`.",
    request_body = Credentials,
    responses(
        (status = 200, description = "Logged in", body = Token,
            headers(("cache-control" = String, description = "`no-store`"))),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`: no account has this username and password", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: a username or password that no account can have", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many logins for this username or from this address; see `Retry-After`", body = ErrorBody,
            headers(("retry-after" = u32, description = "Seconds until an attempt is allowed"))),
        (status = 503, description = "`database_unavailable`: the database cannot be reached (or `timeout`); retry after `Retry-After`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
pub async fn login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    AppJson(body): AppJson<Credentials>,
) -> Result<Response, ApiError> {
    let username = username_of(&body.username)?;
    if !body.password.could_be_valid() {
        return Err(ApiError::InvalidBody(format!(
            "password must have {PASSWORD_MIN} to {PASSWORD_MAX} characters, without control characters"
        )));
    }
    let limits = &state.buyers.limits;
    limits.check_address(address).map_err(rate_limited)?;
    limits.check_username(&username).map_err(rate_limited)?;
    let account = accounts::find(&state.pool, &username)
        .await
        .map_err(database_unavailable)?;
    let (user, stored) = match account {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let matches = state.buyers.hasher.verify(body.password, stored).await?;
    let Some(user) = user.filter(|_| matches) else {
        tracing::info!("login refused");
        return Err(ApiError::InvalidCredentials);
    };
    let now = SystemClock.now();
    let ttl = i64::try_from(state.buyers.token_ttl.as_secs()).unwrap_or(i64::MAX);
    let expires_at = DateTime::from_timestamp(now.timestamp().saturating_add(ttl), 0)
        .ok_or_else(|| anyhow::anyhow!("a token expiry out of range"))?;
    let claims = tokens::Claims {
        session: uuid::Uuid::new_v4(),
        user,
        expires_at,
    };
    sessions::open(&state.pool, claims.session, user, now, expires_at)
        .await
        .map_err(|err| database_unavailable(err.into()))?;
    tracing::info!(user_id = %user, session = %claims.session, "logged in");
    let token = Token {
        token: state.buyers.key.issue(&claims),
        token_type: "Bearer".into(),
        expires_at,
        user_id: user,
        username: username.as_str().to_owned(),
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(token)).into_response())
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = crate::openapi::BUYERS,
    summary = "Log out: revoke the token",
    description = "Revokes the session of the bearer token sent. It is refused at once by the API instance \
        that answered, and by every other instance within `ALLOT_REVOCATION_REFRESH_MS` (1 s by default). \
        No body.",
    security(("buyer_token" = [])),
    responses(
        (status = 204, description = "Logged out: the token is revoked"),
        (status = 401, description = "`unauthorized`: no buyer's token, or one that is not valid (already revoked, expired, forged)", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: the database cannot be reached; the token was not revoked (or `timeout`); retry after `Retry-After`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
pub async fn logout(State(state): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    let Caller::Buyer(claims) = caller else {
        return Err(ApiError::Unauthenticated(
            "logging out takes the buyer's token: Authorization: Bearer <token>".into(),
        ));
    };
    sessions::revoke(&state.pool, claims.session)
        .await
        .map_err(|err| database_unavailable(err.into()))?;
    state
        .buyers
        .revocations
        .insert(claims.session, claims.expires_at);
    tracing::info!(user_id = %claims.user, session = %claims.session, "logged out");
    Ok(StatusCode::NO_CONTENT)
}

/// A database failure on an account endpoint: nothing was done, so a `503` the client may
/// retry (logged with its cause).
fn database_unavailable(err: anyhow::Error) -> ApiError {
    tracing::warn!(error = %format_args!("{err:#}"), "the database is unavailable");
    ApiError::unavailable(
        Unavailability::DatabaseUnavailable,
        "the account store is unavailable; try again",
        1,
    )
}
