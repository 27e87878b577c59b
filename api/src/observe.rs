//! What operators see of each request: a request id (kept from the client when sane, else a
//! fresh UUID), carried by the request's tracing span, so every log line of the request names
//! it, and echoed in the `x-request-id` response header; and Prometheus metrics of requests by
//! matched route and status, with the accept latency of `addToCart` as its own histogram.

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::SharedString;
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Instant;
use tracing::Span;

/// The header that carries the request id, both ways.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest client-sent request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;
/// The route whose latency is the accept latency.
const ACCEPT_ROUTE: &str = "/api/v1/order/addToCart";

/// Whether a client-sent request id may go into our logs as it is: 1 to 128 characters of
/// `A-Z a-z 0-9 - _ . :`. Anything else (spaces, control characters, a log-injection attempt)
/// is replaced by a fresh id.
pub fn is_sane_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Drops a client-sent request id that is not sane, so that `SetRequestIdLayer` (which keeps
/// an existing one) makes a fresh one instead.
pub async fn drop_insane_request_id(mut request: Request, next: Next) -> Response {
    if let Some(value) = request.headers().get(&REQUEST_ID)
        && !is_sane_request_id(value)
    {
        request.headers_mut().remove(&REQUEST_ID);
    }
    next.run(request).await
}

/// The span of one request; its `request_id` field is on every log line logged inside it.
pub fn request_span(request: &axum::http::Request<axum::body::Body>) -> Span {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %request.method(),
        uri = %request.uri(),
        request_id = %request_id,
    )
}

/// Counts every routed request by method, matched route and status, and times it. Installed
/// with `route_layer`, so the route is the matched template (`/api/v1/products/{id}`), never
/// the raw path: the label set stays bounded whatever clients send. Labels are static strings
/// where possible: this runs on every purchase request.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route: SharedString = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(SharedString::const_str("unmatched"), |path| {
            SharedString::from(path.as_str().to_owned())
        });
    let accept = route.as_ref() == ACCEPT_ROUTE;
    let response = next.run(request).await;
    let status = SharedString::from(response.status().as_str().to_owned());
    let elapsed = started.elapsed().as_secs_f64();
    if accept {
        metrics::histogram!("allot_api_accept_duration_seconds", "status" => status.clone())
            .record(elapsed);
    }
    metrics::histogram!("allot_api_request_duration_seconds", "method" => method, "route" => route.clone())
        .record(elapsed);
    metrics::counter!("allot_api_requests_total", "method" => method, "route" => route, "status" => status)
        .increment(1);
    response
}

/// The `method` label: a static string for the methods we serve, `other` for the rest.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Installs the metrics recorder (see [`allot_shared::metrics::install`]) and registers the
/// API's counters whose label values are known in advance at 0, so that `/metrics` shows
/// them from the start: a rate or an alert on `allot_api_publishes_total{result="failed"}`
/// needs the series before the first failure, not only after it.
pub fn install_metrics() -> PrometheusHandle {
    let handle = allot_shared::metrics::install();
    // The `result` labels of `Publisher::publish`.
    for result in ["confirmed", "refused", "failed"] {
        // `increment(0)`, not `absolute(0)`: the registry is per process, and may already count.
        metrics::counter!("allot_api_publishes_total", "result" => result).increment(0);
    }
    // Registered (an empty histogram renders at 0), nothing recorded.
    let _ = metrics::histogram!("allot_api_envelope_requests");
    handle
}

/// Counts a request no route matched (the router's fallback).
pub fn count_unmatched(method: &Method, status: StatusCode) {
    metrics::counter!("allot_api_requests_total", "method" => method_label(method), "route" => "unmatched", "status" => status.as_str().to_owned())
        .increment(1);
}

/// The Prometheus text of everything this process recorded.
pub fn render(handle: &PrometheusHandle) -> impl IntoResponse + use<> {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(allot_shared::metrics::CONTENT_TYPE),
        )],
        handle.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_short_and_plain() {
        for kept in ["abc", "0199-ab_cd.ef:1", &"x".repeat(128)] {
            assert!(
                is_sane_request_id(&HeaderValue::from_str(kept).unwrap()),
                "{kept}"
            );
        }
        for dropped in ["", "a b", "a\tb", "id\"quoted", "ü", &"x".repeat(129)] {
            let value = HeaderValue::from_bytes(dropped.as_bytes()).unwrap();
            assert!(!is_sane_request_id(&value), "{dropped:?}");
        }
    }
}
