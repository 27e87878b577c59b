//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations as
//! [`crate::routes::router`] registers them (utoipa-axum), so the document lists exactly the
//! routes the server has. Served at `/api-docs/openapi.json`, with Swagger UI at `/docs` (its
//! files are compiled in: the page works without internet access).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api-docs/openapi.json";
/// Where Swagger UI is served.
pub const DOCS_PATH: &str = "/docs";
/// The name of the staff's bearer-token security scheme.
pub const ADMIN_TOKEN: &str = "admin_token";

/// Tag of the buying endpoints.
pub const ORDERS: &str = "orders";
/// Tag of the catalogue endpoints.
pub const PRODUCTS: &str = "products";
/// Tag of health, readiness, metrics and statistics.
pub const OPERATIONS: &str = "operations";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "allot",
        description = "Flash-sale order intake that never oversells. A purchase request is \
            answered 202 with a transaction id once RabbitMQ confirmed it; poll \
            `GET /api/v1/transaction/{id}` (or watch its events) until it is `succeeded` with an \
            order number or `rejected` with a reason. Every error has the body \
            `{\"error\": {\"code\": ..., \"message\": ...}}`.",
        license(name = "MIT")
    ),
    tags(
        (name = ORDERS, description = "Buying, and following a purchase to its outcome"),
        (name = PRODUCTS, description = "The catalogue: anyone reads it; staff (bearer token) create and restock"),
        (name = OPERATIONS, description = "Health, readiness, metrics and live statistics")
    ),
    modifiers(&AdminToken)
)]
pub struct ApiDoc;

/// Declares the staff's `Authorization: Bearer <ALLOT_ADMIN_TOKEN>` scheme.
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}
