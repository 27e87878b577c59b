//! The HTTP routes, and the layers every request passes through.

mod health;
mod orders;
mod products;

pub use orders::{Accepted, AddToCart};
pub use products::{Product, ProductPage};

use crate::error::ApiError;
use crate::state::AppState;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Router};
use std::any::Any;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

/// Largest accepted request body. Ours are tiny; anything bigger is a mistake or an attack.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// No request may take longer; keeps graceful shutdown bounded.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/order/addToCart", post(orders::add_to_cart))
        .route("/api/v1/transaction/{id}", get(orders::get_transaction))
        .route(
            "/api/v1/products",
            post(products::create).get(products::list),
        )
        .route("/api/v1/products/{id}", get(products::get))
        .route("/api/v1/products/{id}/restock", post(products::restock))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(TraceLayer::new_for_http())
                .layer(HandleErrorLayer::new(timeout_response))
                .timeout(REQUEST_TIMEOUT)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn timeout_response(err: BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::unavailable("the request took too long; try again", 1)
    } else {
        ApiError::Internal(anyhow::anyhow!("unhandled middleware error: {err}"))
    }
}

/// A panicking handler answers 500 in our error shape; the server stays up.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    ApiError::Internal(anyhow::anyhow!("handler panicked: {detail}")).into_response()
}
