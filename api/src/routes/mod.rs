//! The HTTP routes, and the layers every request passes through.
//!
//! The JSON API is registered through utoipa-axum's [`OpenApiRouter`], which builds the router
//! and the OpenAPI document from the same list, so the document cannot miss a route. The web
//! page, the docs and the document itself are added beside it, undocumented.

mod accounts;
mod baskets;
mod health;
mod history;
mod holds;
mod keyset;
mod orders;
mod page;
mod products;
mod slots;
mod stats;
mod watch;

pub use accounts::{Credentials, NewAccount, Token};
pub use baskets::{NewOrder, OrderItem};
pub use history::HistoryPage;
pub use orders::{Accepted, AddToCart, accept, read_transaction};
pub use products::{Product, ProductPage, ProductPatch};
pub use slots::{NewSlot, Slot, SlotPage, SlotPatch};
pub use stats::Stats;
pub use watch::WATCH_LIMIT;

use crate::error::{ApiError, Unavailability};
use crate::extract;
use crate::observe;
use crate::openapi::{ApiDoc, ConfiguredLimits, DOCS_PATH, DOCUMENT_PATH};
use crate::state::AppState;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{BoxError, Router, middleware};
use std::any::Any;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

/// Largest accepted request body. Ours are tiny; anything bigger is a mistake or an attack.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// No request may take longer; keeps graceful shutdown bounded.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The documented JSON API: the router and its OpenAPI document, with the limits of `state`'s
/// configuration ([`ConfiguredLimits`]).
pub fn api(state: &AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(orders::add_to_cart))
        .routes(routes!(baskets::place_order))
        .routes(routes!(orders::get_transaction))
        .routes(routes!(watch::transaction_events))
        .routes(routes!(holds::checkout))
        .routes(routes!(holds::cancel))
        .routes(routes!(products::create, products::list))
        .routes(routes!(products::get, products::update))
        .routes(routes!(products::restock))
        .routes(routes!(slots::create, slots::list))
        .routes(routes!(slots::get, slots::update))
        .routes(routes!(stats::stats))
        .routes(routes!(accounts::sign_up))
        .routes(routes!(accounts::login))
        .routes(routes!(accounts::logout))
        .routes(routes!(history::history))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .split_for_parts();
    ConfiguredLimits::of(state).modify(&mut document);
    (router, document)
}

pub fn router(state: AppState) -> Router {
    let (api, document) = api(&state);
    let docs = SwaggerUi::new(DOCS_PATH)
        .url(DOCUMENT_PATH, document)
        .config(utoipa_swagger_ui::Config::default().validator_url("none"));
    let docs = Router::from(docs).layer(middleware::map_response(no_such_doc_file));
    api.route_layer(middleware::from_fn(extract::decodable_path_params))
        .route_layer(middleware::from_fn(observe::track_requests))
        .route("/", get(page::index))
        .merge(docs)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(in_error_shape))
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(observe::drop_insane_request_id))
                .layer(SetRequestIdLayer::new(
                    observe::REQUEST_ID.clone(),
                    MakeRequestUuid,
                ))
                .layer(TraceLayer::new_for_http().make_span_with(observe::request_span))
                .layer(PropagateRequestIdLayer::new(observe::REQUEST_ID.clone()))
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(HandleErrorLayer::new(timeout_response))
                .timeout(REQUEST_TIMEOUT)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .with_state(state)
}

async fn not_found(method: Method) -> ApiError {
    observe::count_unmatched(&method, StatusCode::NOT_FOUND);
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Swagger UI reads the file name under `/docs/` with axum's `Path`, so a name that is not
/// UTF-8 once decoded gets a plain-text 400: no such file exists, so it is our 404.
async fn no_such_doc_file(response: Response) -> Response {
    if response.status() == StatusCode::BAD_REQUEST && !is_json(&response) {
        ApiError::NotFound("no such file".into()).into_response()
    } else {
        response
    }
}

/// The fallback behind the fallbacks: routers merged in whole (Swagger UI's, which serves its
/// files under `/docs/`) answer an unknown path with a bare 404 of their own, which our
/// `fallback` never sees. Any 404 or 405 that is not already JSON gets our shape here, for
/// every route, nested router and static asset.
async fn in_error_shape(response: Response) -> Response {
    match response.status() {
        StatusCode::NOT_FOUND if !is_json(&response) => {
            ApiError::NotFound("no such file".into()).into_response()
        }
        StatusCode::METHOD_NOT_ALLOWED if !is_json(&response) => {
            ApiError::MethodNotAllowed.into_response()
        }
        _ => response,
    }
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"))
}

async fn timeout_response(err: BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::unavailable(
            Unavailability::Timeout,
            "the request took too long; try again",
            1,
        )
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
