//! The API's one error type. Every failure, from any endpoint or extractor, becomes a response
//! of this single JSON shape:
//!
//! ```json
//! {"error": {"code": "invalid_body", "message": "quantity must be at most 10"}}
//! ```
//!
//! `code` is stable and machine-readable; `message` is for humans and may change.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_json`: the body is not syntactically valid JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// 422 `invalid_body`: valid JSON, but a field is missing, unknown, of the wrong type or out
    /// of range.
    #[error("{0}")]
    InvalidBody(String),
    /// 415 `unsupported_media_type`: the body is not declared as `application/json`.
    #[error("expected a request body with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 413 `payload_too_large`: the body exceeds the size limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// 400 `invalid_id`: an id in the path is malformed.
    #[error("{0}")]
    InvalidId(String),
    /// 400 `invalid_query`: the query string has an unknown or malformed parameter.
    #[error("{0}")]
    InvalidQuery(String),
    /// 401 `unauthorized`: the admin token is missing or wrong.
    #[error("this endpoint needs the header Authorization: Bearer <admin token>")]
    Unauthorized,
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    /// 503, with `Retry-After`: a dependency cannot take the request right now; nothing was
    /// accepted. The code names the reason ([`Unavailability`]).
    #[error("{message}")]
    Unavailable {
        reason: Unavailability,
        message: String,
        retry_after_secs: u32,
    },
    /// 500 `internal`: a bug or an unexpected failure. Logged with its cause; the client only
    /// sees a generic message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
    /// 401 `unauthorized`: a buyer's token is needed, or the one sent is not good (forged,
    /// altered, expired, revoked); the message says which.
    #[error("{0}")]
    Unauthenticated(String),
    /// 401 `invalid_credentials`: no account has this username and password.
    #[error("the username or the password is wrong")]
    InvalidCredentials,
    /// 403 `user_mismatch`: a buyer's token acts for its own account only.
    #[error("{0}")]
    UserMismatch(String),
    /// 409 `username_taken`.
    #[error("{0}")]
    UsernameTaken(String),
    /// 429 `rate_limited`, with `Retry-After`: too many logins for this username or from
    /// this address.
    #[error("too many login attempts; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u32 },
    /// 400 `invalid_idempotency_key`: the `Idempotency-Key` header is empty, too long, not
    /// printable ASCII, or sent more than once.
    #[error("{0}")]
    InvalidIdempotencyKey(String),
    /// 422 `idempotency_key_reused`: this key was used for another request.
    #[error(
        "this Idempotency-Key was used for another request (a different body or endpoint); use a new key"
    )]
    IdempotencyKeyReused,
    /// 409 `idempotency_key_in_flight`, with `Retry-After`: an earlier request with this key
    /// is still being accepted.
    #[error("a request with this Idempotency-Key is still being processed; retry in a moment")]
    IdempotencyKeyInFlight,
    /// 422 `unknown_slot`: an order names a slot that does not exist.
    #[error("{0}")]
    UnknownSlot(String),
    /// 409 `hold_expired`: a checkout or cancel of a hold that expired first (its units went
    /// back).
    #[error("{0}")]
    HoldExpired(String),
    /// 409 `not_held`: a checkout or cancel of a transaction that is not held (still pending,
    /// already checked out, cancelled, or not a hold); the message says its status.
    #[error("{0}")]
    NotHeld(String),
}

/// Why a request was answered 503: each reason has a stable code of its own, so that clients
/// (and tests) tell a full queue from an outage without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailability {
    /// `queue_full`: the product's partition queue is at its bound (the API's or the broker's).
    QueueFull,
    /// `broker_unavailable`: RabbitMQ is unreachable or did not confirm in time.
    BrokerUnavailable,
    /// `redis_unavailable`: Redis (statuses, the shared queue bound, Idempotency-Keys) is
    /// unreachable.
    RedisUnavailable,
    /// `database_unavailable`: PostgreSQL is unreachable where a request needs it at once
    /// (accounts, sessions, a buyer's history, looking up a retried Idempotency-Key's request).
    DatabaseUnavailable,
    /// `timeout`: the request took longer than the server's request timeout.
    Timeout,
}

impl Unavailability {
    /// Every reason, in the order of the README's error table.
    pub const ALL: [Unavailability; 5] = [
        Unavailability::QueueFull,
        Unavailability::BrokerUnavailable,
        Unavailability::RedisUnavailable,
        Unavailability::DatabaseUnavailable,
        Unavailability::Timeout,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Unavailability::QueueFull => "queue_full",
            Unavailability::BrokerUnavailable => "broker_unavailable",
            Unavailability::RedisUnavailable => "redis_unavailable",
            Unavailability::DatabaseUnavailable => "database_unavailable",
            Unavailability::Timeout => "timeout",
        }
    }
}

/// The body of every error response (also its OpenAPI schema).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// Stable and machine-readable: `malformed_json`, `invalid_body`, `unsupported_media_type`,
    /// `payload_too_large`, `invalid_id`, `invalid_query`, `unauthorized`, `not_found`,
    /// `method_not_allowed` or `internal`; for buyers `invalid_credentials`, `user_mismatch`,
    /// `username_taken`, `rate_limited`, `invalid_idempotency_key`, `idempotency_key_reused`
    /// or `idempotency_key_in_flight`; for holds and slots `unknown_slot`, `not_held` or
    /// `hold_expired`; for a 503 its reason: `queue_full`, `broker_unavailable`,
    /// `redis_unavailable`, `database_unavailable` or `timeout`.
    #[schema(example = "invalid_body")]
    pub code: &'a str,
    /// For humans; may change.
    #[schema(example = "quantity must be at most 10, got 11")]
    pub message: String,
}

impl ApiError {
    pub fn unavailable(
        reason: Unavailability,
        message: impl Into<String>,
        retry_after_secs: u32,
    ) -> Self {
        ApiError::Unavailable {
            reason,
            message: message.into(),
            retry_after_secs,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::InvalidId(_) | ApiError::InvalidQuery(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::InvalidBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthenticated(_) | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::UserMismatch(_) => StatusCode::FORBIDDEN,
            ApiError::UsernameTaken(_)
            | ApiError::IdempotencyKeyInFlight
            | ApiError::HoldExpired(_)
            | ApiError::NotHeld(_) => StatusCode::CONFLICT,
            ApiError::UnknownSlot(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InvalidIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::InvalidId(_) => "invalid_id",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unavailable { reason, .. } => reason.code(),
            ApiError::Internal(_) => "internal",
            ApiError::Unauthenticated(_) => "unauthorized",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::UserMismatch(_) => "user_mismatch",
            ApiError::UsernameTaken(_) => "username_taken",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyKeyInFlight => "idempotency_key_in_flight",
            ApiError::UnknownSlot(_) => "unknown_slot",
            ApiError::HoldExpired(_) => "hold_expired",
            ApiError::NotHeld(_) => "not_held",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::Internal(anyhow::Error::new(err).context("database query failed"))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::Internal(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error = %format_args!("{cause:#}"), "internal error");
        }
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Unauthorized
            | ApiError::Unauthenticated(_)
            | ApiError::InvalidCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::IdempotencyKeyInFlight => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 503 reason is answered 503 with `Retry-After` and its own code, in the one shape.
    #[tokio::test]
    async fn every_unavailability_has_its_own_code_in_the_one_shape() {
        let mut codes = std::collections::BTreeSet::new();
        for reason in Unavailability::ALL {
            let response = ApiError::unavailable(reason, "try again", 2).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "2");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"error": {"code": reason.code(), "message": "try again"}})
            );
            assert!(
                codes.insert(reason.code()),
                "{} is used once",
                reason.code()
            );
        }
    }
}
