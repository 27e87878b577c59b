//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations as
//! [`crate::routes::router`] registers them (utoipa-axum), so the document lists exactly the
//! routes the server has. Served at `/api-docs/openapi.json`, with Swagger UI at `/docs` (its
//! files are compiled in: the page works without internet access).

use crate::state::AppState;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api-docs/openapi.json";
/// Where Swagger UI is served.
pub const DOCS_PATH: &str = "/docs";
/// The name of the staff's bearer-token security scheme.
pub const ADMIN_TOKEN: &str = "admin_token";
/// The name of the buyers' bearer-token security scheme.
pub const BUYER_TOKEN: &str = "buyer_token";

/// Tag of the buying endpoints.
pub const ORDERS: &str = "orders";
/// Tag of accounts, login and history.
pub const BUYERS: &str = "buyers";
/// Tag of checkout and cancel of holds.
pub const HOLDS: &str = "holds";
/// Tag of the capacity counters (slots).
pub const SLOTS: &str = "slots";
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
        (name = BUYERS, description = "Buyer accounts: sign up, log in for a bearer token, log out; a buyer's order history"),
        (name = HOLDS, description = "Holds: a purchase with `hold_seconds` takes its units without an order number; check it out (numbered then), cancel it, or let it expire"),
        (name = PRODUCTS, description = "The catalogue: anyone reads it; staff (bearer token) create, restock and set limits, sale windows and pauses"),
        (name = SLOTS, description = "Capacity counters (delivery slots): anyone reads them with their places taken, held and remaining; staff create and change them"),
        (name = OPERATIONS, description = "Health, readiness, metrics and live statistics")
    ),
    modifiers(&AdminToken)
)]
pub struct ApiDoc;

/// Declares the staff's `Authorization: Bearer <ALLOT_ADMIN_TOKEN>` scheme, and the buyers'
/// `Authorization: Bearer <token from POST /api/v1/auth/login>`.
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let mut buyer = Http::new(HttpAuthScheme::Bearer);
        buyer.bearer_format = Some("allotb1".into());
        buyer.description = Some(
            "A buyer's token from `POST /api/v1/auth/login`, signed, valid until its `expires_at` \
             or its logout"
                .into(),
        );
        components.add_security_scheme(BUYER_TOKEN, SecurityScheme::Http(buyer));
    }
}

/// The limits that come from the configuration, written into the document a server serves, so
/// that generated clients and fuzzers refuse what this server refuses: a quantity above
/// `ALLOT_MAX_QUANTITY` is documented as invalid, not as up to 2^63 - 1.
pub struct ConfiguredLimits {
    /// `ALLOT_MAX_QUANTITY`.
    pub max_quantity: i64,
    /// `ALLOT_MAX_HOLD_SECONDS`.
    pub max_hold_seconds: i64,
    /// `ALLOT_PARTITIONS`: the most shards a product may have.
    pub partitions: u16,
}

impl ConfiguredLimits {
    pub fn of(state: &AppState) -> Self {
        Self {
            max_quantity: state.max_quantity,
            max_hold_seconds: state.max_hold_seconds,
            partitions: state.publisher.partition_count(),
        }
    }
}

/// Replaces (or adds) `property` of the object schema `schema` of the document.
fn set_property(
    openapi: &mut utoipa::openapi::OpenApi,
    schema: &str,
    property: &str,
    value: ObjectBuilder,
) {
    let object = openapi
        .components
        .as_mut()
        .and_then(|components| components.schemas.get_mut(schema));
    let Some(RefOr::T(Schema::Object(object))) = object else {
        panic!("the document has the {schema} schema");
    };
    object.properties.insert(property.into(), value.into());
}

impl Modify for ConfiguredLimits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        // addToCart's quantity, and the quantity of each line of an order.
        for schema in ["AddToCart", "OrderItem"] {
            set_property(
                openapi,
                schema,
                "quantity",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(1))
                    .maximum(Some(self.max_quantity))
                    .description(Some(format!(
                        "How many units: 1 to {} (this server's ALLOT_MAX_QUANTITY)",
                        self.max_quantity
                    ))),
            );
        }
        // The hold a purchase may ask for.
        for schema in ["AddToCart", "NewOrder"] {
            set_property(
                openapi,
                schema,
                "hold_seconds",
                ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                        Type::Integer,
                        Type::Null,
                    ]))
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(1))
                    .maximum(Some(self.max_hold_seconds))
                    .description(Some(format!(
                        "Hold the units (and the slot's place) for this many seconds instead of \
                         buying at once: 1 to {} (this server's ALLOT_MAX_HOLD_SECONDS); absent or \
                         null: buy now. A hold is `held`, without an order number, until checked \
                         out, cancelled or expired",
                        self.max_hold_seconds
                    ))),
            );
        }
        // A product's shards: up to the partitions (a product's `shards` is null-able at
        // creation, not in a patch).
        for (schema, nullable) in [("NewProduct", true), ("ProductPatch", false)] {
            let types = match nullable {
                true => utoipa::openapi::schema::SchemaType::from_iter([Type::Integer, Type::Null]),
                false => utoipa::openapi::schema::SchemaType::Type(Type::Integer),
            };
            set_property(
                openapi,
                schema,
                "shards",
                ObjectBuilder::new()
                    .schema_type(types)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(1))
                    .maximum(Some(self.partitions))
                    .description(Some(format!(
                        "Spread the product's purchases over this many partitions, each deciding \
                         from its own share of the stock (a share that runs short takes from the \
                         others): 1 to {} (this server's ALLOT_PARTITIONS); not above 1 with \
                         max_per_buyer",
                        self.partitions
                    ))),
            );
        }
    }
}
