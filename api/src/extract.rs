//! Extractors whose rejections speak our error shape: [`AppJson`] for bodies, [`AppQuery`] for
//! query strings, [`Admin`] for the staff's bearer token, and parsers for path ids.

use crate::error::ApiError;
use crate::state::AppState;
use allot_shared::{ProductId, TransactionId};
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// `Json<T>` with our error shape: malformed JSON 400, wrong shape 422, wrong content type
/// 415, too large 413.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(AppJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonSyntaxError(err) => ApiError::MalformedJson(err.body_text()),
        JsonRejection::JsonDataError(err) => ApiError::InvalidBody(err.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        other => ApiError::MalformedJson(other.body_text()),
    }
}

/// `Query<T>` with our error shape (400 `invalid_query`).
#[derive(Debug)]
pub struct AppQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for AppQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| AppQuery(value))
            .map_err(|rejection: QueryRejection| ApiError::InvalidQuery(rejection.body_text()))
    }
}

/// Proof that the request carries the admin token. Put it before any body extractor, so an
/// unauthenticated request is refused before its body is read.
#[derive(Debug)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        // Constant-time, so response timing does not leak how much of a guess was right.
        if constant_time_eq::constant_time_eq(
            presented.trim().as_bytes(),
            state.admin_token.as_bytes(),
        ) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// Parses a transaction id from the path (400 `invalid_id` if it is not a UUID).
pub fn transaction_id(raw: &str) -> Result<TransactionId, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(TransactionId)
        .map_err(|_| ApiError::InvalidId(format!("transaction id {raw:?} is not a UUID")))
}

/// Parses a product id from the path (400 `invalid_id` unless a positive integer).
pub fn product_id(raw: &str) -> Result<ProductId, ApiError> {
    raw.parse::<i64>()
        .ok()
        .and_then(|id| ProductId::try_from(id).ok())
        .ok_or_else(|| ApiError::InvalidId(format!("product id {raw:?} is not a positive integer")))
}
