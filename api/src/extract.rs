//! Extractors whose rejections speak our error shape: [`AppJson`] for bodies, [`AppPath`] for
//! path parameters, [`AppQuery`] for query strings, [`Admin`] for the staff's bearer token,
//! [`ClientAddress`] for the peer's address (the buyers' extractor, who sent a request, is
//! [`crate::buyers::Caller`]), and parsers for path ids. [`decodable_path_params`] makes sure no handler, whichever path
//! extractor it uses, ever sees a path parameter that is not valid UTF-8.

use crate::error::ApiError;
use crate::state::AppState;
use allot_shared::{ProductId, SlotId, TransactionId};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{
    BytesRejection, JsonRejection, PathRejection, QueryRejection, RawPathParamsRejection,
};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, RawPathParams, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::{DeserializeOwned, IgnoredAny};

/// `Json<T>` with our error shape: wrong content type 415, too large 413, malformed JSON 400,
/// anything but a JSON object 422, wrong fields 422.
///
/// Every body of the API is an object. serde's derived structs also accept the positional
/// form (`[7, 1, 1]` for `{"user_id": 7, "product_id": 1, "quantity": 1}`), which
/// `deny_unknown_fields` does not stop, so the top level is checked before deserialising.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !declares_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        if !starts_an_object(&bytes) {
            // Malformed JSON stays a 400 whatever its first character; valid JSON that is not
            // an object is the wrong shape.
            let _: Json<IgnoredAny> = Json::from_bytes(&bytes).map_err(json_rejection)?;
            return Err(ApiError::InvalidBody(
                "the body must be a JSON object".into(),
            ));
        }
        Json::<T>::from_bytes(&bytes)
            .map(|Json(value)| AppJson(value))
            .map_err(json_rejection)
    }
}

/// Whether the request declares exactly one `Content-Type`, `application/json` (parameters
/// such as `charset` allowed). Stricter than axum's `Json`, which also takes any
/// `application/*+json`: the API documents `application/json` only, and a body declared as,
/// say, `application/merge-patch+json` asks for semantics it does not have.
fn declares_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().is_ok_and(|value| {
            let essence = value.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
        }),
        _ => false,
    }
}

/// Whether the first character after JSON whitespace opens an object.
fn starts_an_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|&byte| byte == b'{')
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::MalformedJson(rejection.body_text())
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

/// `Path<T>` with our error shape: every path parameter of the API is an id, so any rejection
/// is 400 `invalid_id`.
#[derive(Debug)]
pub struct AppPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for AppPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| AppPath(value))
            .map_err(|rejection: PathRejection| match rejection {
                PathRejection::MissingPathParams(err) => ApiError::Internal(anyhow::anyhow!(
                    "a handler reads path parameters its route does not have: {}",
                    err.body_text()
                )),
                other => ApiError::InvalidId(other.body_text()),
            })
    }
}

/// Refuses, with 400 `invalid_id`, a request whose path parameters are not valid UTF-8 once
/// percent-decoded (`/api/v1/products/%FF`), before any handler runs. Installed as a route
/// layer on every documented route, so it holds for handlers that read their id with axum's
/// own `Path` too, whose rejection would be plain text.
pub async fn decodable_path_params(
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    match params {
        Err(RawPathParamsRejection::InvalidUtf8InPathParam(err)) => {
            ApiError::InvalidId(err.body_text()).into_response()
        }
        _ => next.run(request).await,
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

/// Parses a slot id from the path (400 `invalid_id` unless a positive integer).
pub fn slot_id(raw: &str) -> Result<SlotId, ApiError> {
    raw.parse::<i64>()
        .ok()
        .and_then(|id| SlotId::try_from(id).ok())
        .ok_or_else(|| ApiError::InvalidId(format!("slot id {raw:?} is not a positive integer")))
}

/// The client's address: the TCP peer's (see [`crate::buyers::limits`] on proxies), or the
/// unspecified address when the server was not started with connection info (a router driven
/// in-process).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        Ok(ClientAddress(peer.unwrap_or(std::net::IpAddr::V4(
            std::net::Ipv4Addr::UNSPECIFIED,
        ))))
    }
}
