//! The catalogue: staff create and restock products (bearer token); anyone lists them and
//! reads their remaining stock.

use crate::error::{ApiError, ErrorBody};
use crate::extract::{self, Admin, AppJson, AppPath, AppQuery};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

/// The most units a product may hold; keeps every sum of stock far from `bigint` overflow.
pub const MAX_STOCK: i64 = 1_000_000_000_000;
/// The longest product name.
pub const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Product {
    pub id: i64,
    pub name: String,
    /// Units still for sale.
    pub stock: i64,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1 to 200 characters, no control characters, not only whitespace; stored without
    /// leading and trailing whitespace.
    // The pattern is what `create` checks besides the length, in a syntax ECMAScript and
    // Python share: no control character (Unicode `Cc`, what `char::is_control` tests) and at
    // least one character that is neither control nor whitespace (`char::is_whitespace`).
    #[schema(
        example = "Limited sneaker",
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub name: String,
    /// Units for sale, 0 to 10^12.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64, example = 100)]
    pub stock: i64,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Restock {
    /// Units to add, 1 to 10^12 (the stock may not exceed 10^12).
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64, example = 50)]
    pub quantity: i64,
}

/// `GET /api/v1/products?limit=&after=`: keyset pagination by id.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only products with a larger id (the previous page's `next_after`).
    pub after: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductPage {
    pub products: Vec<Product>,
    /// Pass as `after` to get the next page; `null` on the last page.
    pub next_after: Option<i64>,
}

#[utoipa::path(post, path = "/api/v1/products", tag = crate::openapi::PRODUCTS,
    summary = "Create a product (staff)",
    request_body = NewProduct,
    security(("admin_token" = [])),
    responses(
        (status = 201, description = "Created", body = Product),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong admin token", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    ))]
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    AppJson(body): AppJson<NewProduct>,
) -> Result<(StatusCode, Json<Product>), ApiError> {
    // Checked as sent, so the limits are the ones the document states (NAME_PATTERN): a
    // padded name does not get past the length limit, nor a tab past the control characters.
    if body.name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::InvalidBody(format!(
            "name must have 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    // PostgreSQL text cannot hold NUL; no name needs any control character.
    if body.name.chars().any(char::is_control) {
        return Err(ApiError::InvalidBody(
            "name may not contain control characters".into(),
        ));
    }
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::InvalidBody(
            "name must have a character other than whitespace".into(),
        ));
    }
    if !(0..=MAX_STOCK).contains(&body.stock) {
        return Err(ApiError::InvalidBody(format!(
            "stock must be between 0 and {MAX_STOCK}, got {}",
            body.stock
        )));
    }
    let product: Product = sqlx::query_as(
        "INSERT INTO products (name, stock) VALUES ($1, $2) RETURNING id, name, stock",
    )
    .bind(name)
    .bind(body.stock)
    .fetch_one(&state.pool)
    .await?;
    tracing::info!(
        product_id = product.id,
        stock = product.stock,
        "product created"
    );
    Ok((StatusCode::CREATED, Json(product)))
}

/// Adds stock. Safe while a sale runs: the update waits for the row lock a deciding batch holds,
/// so neither overwrites the other.
#[utoipa::path(post, path = "/api/v1/products/{id}/restock", tag = crate::openapi::PRODUCTS,
    summary = "Add stock to a product (staff)",
    description = "Adds `quantity` units; the stock may not exceed 10^12. Safe while a sale of the product runs: no update is lost and nothing is oversold. A product that was sold out is on sale again at once.",
    params(("id" = i64, Path, minimum = 1, description = "The product id")),
    request_body = Restock,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The product with its new stock", body = Product),
        (status = 400, description = "`invalid_id` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "`not_found`: no such product", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`", body = ErrorBody),
    ))]
pub async fn restock(
    _: Admin,
    State(state): State<AppState>,
    AppPath(raw_id): AppPath<String>,
    AppJson(body): AppJson<Restock>,
) -> Result<Json<Product>, ApiError> {
    let id = extract::product_id(&raw_id)?;
    if !(1..=MAX_STOCK).contains(&body.quantity) {
        return Err(ApiError::InvalidBody(format!(
            "quantity must be between 1 and {MAX_STOCK}, got {}",
            body.quantity
        )));
    }
    let updated: Option<Product> = sqlx::query_as(
        "UPDATE products SET stock = stock + $2 WHERE id = $1 AND stock <= $3 - $2 RETURNING id, name, stock",
    )
    .bind(id.get())
    .bind(body.quantity)
    .bind(MAX_STOCK)
    .fetch_optional(&state.pool)
    .await?;
    match updated {
        Some(product) => {
            state.sold_out.reopen(id);
            tracing::info!(
                product_id = product.id,
                added = body.quantity,
                stock = product.stock,
                "product restocked"
            );
            Ok(Json(product))
        }
        None if fetch(&state, id.get()).await?.is_some() => Err(ApiError::InvalidBody(format!(
            "restocking would take the stock above {MAX_STOCK}"
        ))),
        None => Err(ApiError::NotFound(format!("no product {id}"))),
    }
}

#[utoipa::path(get, path = "/api/v1/products", tag = crate::openapi::PRODUCTS,
    summary = "List products with their remaining stock, a page at a time",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of products in id order, with their remaining stock", body = ProductPage),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ListQuery>,
) -> Result<Json<ProductPage>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be between 1 and 1000, got {limit}"
        )));
    }
    let products: Vec<Product> =
        sqlx::query_as("SELECT id, name, stock FROM products WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(query.after.unwrap_or(0))
            .bind(limit)
            .fetch_all(&state.pool)
            .await?;
    let next_after = (products.len() as i64 == limit)
        .then(|| products.last().map(|p| p.id))
        .flatten();
    Ok(Json(ProductPage {
        products,
        next_after,
    }))
}

#[utoipa::path(get, path = "/api/v1/products/{id}", tag = crate::openapi::PRODUCTS,
    summary = "Read a product and its remaining stock",
    params(("id" = i64, Path, minimum = 1, description = "The product id")),
    responses(
        (status = 200, description = "The product and its remaining stock", body = Product),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    AppPath(raw_id): AppPath<String>,
) -> Result<Json<Product>, ApiError> {
    let id = extract::product_id(&raw_id)?;
    fetch(&state, id.get())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no product {id}")))
}

async fn fetch(state: &AppState, id: i64) -> Result<Option<Product>, ApiError> {
    Ok(
        sqlx::query_as("SELECT id, name, stock FROM products WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await?,
    )
}
