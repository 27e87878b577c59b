//! The catalogue: staff create, restock and change products (bearer token): a per-buyer limit,
//! a sale window, a pause, the shards of a hot product; anyone lists them and reads their
//! remaining stock and rules.
//!
//! A product with `shards` > 1 keeps its stock in its shares (`product_shares`, one row per
//! shard; `products.stock` is 0), and reads as their sum. Whatever changes its stock or shards
//! here locks the product row for update, then every share (see `worker/src/persist.rs`, the
//! lock order), and splits the stock evenly over the shares again.

use super::keyset;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{self, Admin, AppJson, AppPath, AppQuery};
use crate::state::AppState;
use allot_shared::ProductId;
use allot_shared::clock::to_stored_precision;
use allot_shared::sale::Sale;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Deserializer, Serialize};

/// The most units a product may hold; keeps every sum of stock far from `bigint` overflow.
pub const MAX_STOCK: i64 = 1_000_000_000_000;
/// The longest product name.
pub const MAX_NAME_CHARS: usize = 200;

/// A product as clients see it. The rules appear only when set: a product without a limit,
/// window, pause or held units reads `{"id", "name", "stock"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Product {
    pub id: i64,
    pub name: String,
    /// Units still for sale: held units (open holds) are not counted here.
    pub stock: i64,
    /// Units held by open holds (taken out of `stock`, not sold yet); present only when some
    /// are.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schema(minimum = 1)]
    pub held: i64,
    /// The most units one buyer may have succeeded with; present only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, nullable = false)]
    pub max_per_buyer: Option<i64>,
    /// On sale from this time on (inclusive); present only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub sale_starts_at: Option<DateTime<Utc>>,
    /// On sale until this time (exclusive); present only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub sale_ends_at: Option<DateTime<Utc>>,
    /// Paused by staff since this time; present only while paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub paused_at: Option<DateTime<Utc>>,
    /// The partitions its purchases are spread over (its stock is split in as many shares,
    /// and `stock` is their sum); present only when more than 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schema(minimum = 2)]
    pub shards: i32,
}

/// The columns of [`Product`], for `SELECT` and `RETURNING`: a product's stock is its own
/// column plus the sum of its shares (it has either, never both).
macro_rules! product_columns {
    () => {
        "id, name, \
         stock + COALESCE((SELECT sum(s.stock) FROM product_shares s \
                           WHERE s.product_id = products.id), 0)::bigint AS stock, \
         held, max_per_buyer, sale_starts_at, sale_ends_at, paused_at, shards"
    };
}

fn is_zero(units: &i64) -> bool {
    *units == 0
}

fn one() -> i32 {
    1
}

fn is_one(shards: &i32) -> bool {
    *shards == 1
}

impl Product {
    /// The sale window and pause, as the catalogue gate judges them.
    fn sale(&self) -> Sale {
        Sale {
            starts_at: self.sale_starts_at,
            ends_at: self.sale_ends_at,
            paused_since: self.paused_at,
            pauses: Vec::new(),
        }
    }
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
    /// The most units one buyer may succeed with, 1 to 10^12; absent or `null`: no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64, example = 2)]
    pub max_per_buyer: Option<i64>,
    /// On sale from this time on (RFC 3339, kept to the microsecond); absent or `null`: from
    /// now.
    #[serde(default)]
    pub sale_starts_at: Option<DateTime<Utc>>,
    /// On sale until this time (exclusive), after `sale_starts_at`; absent or `null`: no end.
    #[serde(default)]
    pub sale_ends_at: Option<DateTime<Utc>>,
    /// Spread the product's purchases over this many partitions (1 to `ALLOT_PARTITIONS`),
    /// each deciding from its own share of the stock; absent or `null`: 1. Not with
    /// `max_per_buyer`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16, example = 4)]
    pub shards: Option<i64>,
}

/// A change of a product's rules, with JSON merge-patch semantics (RFC 7396): a field left out
/// stays as it is, `null` clears it, a value sets it.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    /// The most units one buyer may succeed with, 1 to 10^12; `null`: no limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1_000_000_000_000_i64, example = 2)]
    pub max_per_buyer: Option<Option<i64>>,
    /// On sale from this time on (RFC 3339, inclusive, kept to the microsecond); `null`: no
    /// start.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub sale_starts_at: Option<Option<DateTime<Utc>>>,
    /// On sale until this time (exclusive), after the start; `null`: no end.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub sale_ends_at: Option<Option<DateTime<Utc>>>,
    /// `true` pauses the sale (from now until resumed), `false` resumes it; `null` is refused.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = bool)]
    pub paused: Option<Option<bool>>,
    /// Spread the product's purchases over this many partitions (1 to `ALLOT_PARTITIONS`);
    /// the stock is split again over the new shares at once, under their locks. `null` is
    /// refused. Not with `max_per_buyer`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = i64, minimum = 1, maximum = 16, example = 4)]
    pub shards: Option<Option<i64>>,
}

/// A field that is present: `Some(None)` for `null`, `Some(Some(value))` for a value (a field
/// left out is `None`, through `#[serde(default)]`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A name (of a product or a slot) as sent, checked: 1 to [`MAX_NAME_CHARS`] characters, no
/// control characters, not only whitespace; returned trimmed.
pub fn checked_name(name: &str) -> Result<&str, ApiError> {
    // Checked as sent, so the limits are the ones the document states (NAME_PATTERN): a
    // padded name does not get past the length limit, nor a tab past the control characters.
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::InvalidBody(format!(
            "name must have 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    // PostgreSQL text cannot hold NUL; no name needs any control character.
    if name.chars().any(char::is_control) {
        return Err(ApiError::InvalidBody(
            "name may not contain control characters".into(),
        ));
    }
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::InvalidBody(
            "name must have a character other than whitespace".into(),
        ));
    }
    Ok(name)
}

/// A time of a request body, checked: within the years 1 to 9999, kept to the microsecond
/// (PostgreSQL's precision). `field` names it in the error.
pub fn checked_time(
    field: &str,
    value: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    match value {
        Some(time) if !(1..=9999).contains(&time.year()) => Err(ApiError::InvalidBody(format!(
            "{field} must be a time between the years 1 and 9999, got {time}"
        ))),
        _ => Ok(value.map(to_stored_precision)),
    }
}

/// A product's rules, checked: the limit in range, the times within years 1 to 9999 (kept to
/// the microsecond, PostgreSQL's precision), the start before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    max_per_buyer: Option<i64>,
    sale_starts_at: Option<DateTime<Utc>>,
    sale_ends_at: Option<DateTime<Utc>>,
}

impl Rules {
    fn checked(self) -> Result<Self, ApiError> {
        if let Some(max) = self.max_per_buyer
            && !(1..=MAX_STOCK).contains(&max)
        {
            return Err(ApiError::InvalidBody(format!(
                "max_per_buyer must be between 1 and {MAX_STOCK}, got {max}"
            )));
        }
        let rules = Rules {
            max_per_buyer: self.max_per_buyer,
            sale_starts_at: checked_time("sale_starts_at", self.sale_starts_at)?,
            sale_ends_at: checked_time("sale_ends_at", self.sale_ends_at)?,
        };
        if let (Some(starts), Some(ends)) = (rules.sale_starts_at, rules.sale_ends_at)
            && starts >= ends
        {
            return Err(ApiError::InvalidBody(format!(
                "sale_starts_at ({}) must be before sale_ends_at ({})",
                starts.to_rfc3339(),
                ends.to_rfc3339()
            )));
        }
        Ok(rules)
    }
}

/// Checks a product's `shards`: 1 to the number of partitions, and not with a per-buyer limit
/// (its units per buyer are counted under the product row's lock, which purchases decided
/// from one share do not take).
fn checked_shards(
    state: &AppState,
    shards: i64,
    max_per_buyer: Option<i64>,
) -> Result<i32, ApiError> {
    let partitions = state.publisher.partition_count();
    if !(1..=i64::from(partitions)).contains(&shards) {
        return Err(ApiError::InvalidBody(format!(
            "shards must be between 1 and {partitions} (the number of partitions), got {shards}"
        )));
    }
    if shards > 1 && max_per_buyer.is_some() {
        return Err(ApiError::InvalidBody(
            "a product with max_per_buyer cannot have more than 1 shard".into(),
        ));
    }
    Ok(shards as i32)
}

/// Splits `stock` units of `product` over `shards` shares again (1: back on the product row),
/// in the transaction `tx`, which holds the product row locked for update. Locks the shares it
/// replaces first (after the product row, as every decider does; nobody else can hold them
/// while the product row is locked for update, so this never waits).
async fn split_stock(
    tx: &mut sqlx::PgConnection,
    product: i64,
    stock: i64,
    shards: i32,
) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM product_shares WHERE product_id = $1")
        .bind(product)
        .execute(&mut *tx)
        .await?;
    if shards <= 1 {
        sqlx::query("UPDATE products SET stock = $2 WHERE id = $1")
            .bind(product)
            .bind(stock)
            .execute(&mut *tx)
            .await?;
        return Ok(());
    }
    let count = i64::from(shards);
    let (each, rest) = (stock / count, stock % count);
    let units: Vec<i64> = (0..count).map(|i| each + i64::from(i < rest)).collect();
    let indexes: Vec<i32> = (0..shards).collect();
    sqlx::query(
        "WITH emptied AS (UPDATE products SET stock = 0 WHERE id = $1) \
         INSERT INTO product_shares (product_id, shard, stock) \
         SELECT $1, u.shard, u.stock FROM UNNEST($2::integer[], $3::bigint[]) AS u(shard, stock)",
    )
    .bind(product)
    .bind(&indexes)
    .bind(&units)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The stock of `product` as it stands (its row plus its shares), read after its row was
/// locked for update, with its shares locked too: a statement of its own, so that it sees what
/// a decider committed while this transaction waited for the lock.
async fn locked_stock(tx: &mut sqlx::PgConnection, product: i64) -> Result<i64, ApiError> {
    let shares: Vec<i64> = sqlx::query_scalar(
        "SELECT stock FROM product_shares WHERE product_id = $1 ORDER BY shard FOR UPDATE",
    )
    .bind(product)
    .fetch_all(&mut *tx)
    .await?;
    let own: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(product)
        .fetch_one(&mut *tx)
        .await?;
    Ok(own + shares.iter().sum::<i64>())
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
    description = "Creates a product with its stock and, optionally, a per-buyer limit (`max_per_buyer`) \
        and a sale window (`sale_starts_at` inclusive, `sale_ends_at` exclusive, RFC 3339 times), or `shards` \
        (1 to the number of partitions, not with `max_per_buyer`): a hot product whose purchases are spread \
        over that many partitions, its stock split evenly over as many shares. Requests are judged against \
        the window at the time they are accepted.",
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
    let name = checked_name(&body.name)?;
    if !(0..=MAX_STOCK).contains(&body.stock) {
        return Err(ApiError::InvalidBody(format!(
            "stock must be between 0 and {MAX_STOCK}, got {}",
            body.stock
        )));
    }
    let rules = Rules {
        max_per_buyer: body.max_per_buyer,
        sale_starts_at: body.sale_starts_at,
        sale_ends_at: body.sale_ends_at,
    }
    .checked()?;
    let shards = checked_shards(&state, body.shards.unwrap_or(1), rules.max_per_buyer)?;
    let mut tx = state.pool.begin().await?;
    let product: Product = sqlx::query_as(concat!(
        "INSERT INTO products (name, stock, max_per_buyer, sale_starts_at, sale_ends_at, shards) ",
        "VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
        product_columns!()
    ))
    .bind(name)
    .bind(body.stock)
    .bind(rules.max_per_buyer)
    .bind(rules.sale_starts_at)
    .bind(rules.sale_ends_at)
    .bind(shards)
    .fetch_one(&mut *tx)
    .await?;
    if shards > 1 {
        split_stock(&mut tx, product.id, body.stock, shards).await?;
    }
    tx.commit().await?;
    let id = ProductId::try_from(product.id).map_err(anyhow::Error::msg)?;
    if product.sale().is_restricted() {
        state.catalogue.set_sale(id, product.sale());
    }
    if shards > 1 {
        state.catalogue.set_shards(id, shards as u16);
    }
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
    let updated = add_stock(&state, id.get(), body.quantity).await?;
    match updated {
        Some(product) => {
            state.catalogue.reopen(id);
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

/// Adds `quantity` units to `product` under its row lock; `None` if it does not exist or would
/// go past [`MAX_STOCK`]. A product without shares: one statement, as before shares existed. One
/// with shares: its row and then every share locked, the new stock split evenly over them.
async fn add_stock(
    state: &AppState,
    product: i64,
    quantity: i64,
) -> Result<Option<Product>, ApiError> {
    let updated: Option<Product> = sqlx::query_as(concat!(
        "UPDATE products SET stock = stock + $2 WHERE id = $1 AND shards = 1 ",
        "AND stock <= $3 - $2 RETURNING ",
        product_columns!()
    ))
    .bind(product)
    .bind(quantity)
    .bind(MAX_STOCK)
    .fetch_optional(&state.pool)
    .await?;
    if updated.is_some() {
        return Ok(updated);
    }
    let mut tx = state.pool.begin().await?;
    let shards: Option<i32> =
        sqlx::query_scalar("SELECT shards FROM products WHERE id = $1 FOR UPDATE")
            .bind(product)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(shards) = shards.filter(|&shards| shards > 1) else {
        return Ok(None); // unknown, or too much for a product without shares
    };
    let stock = locked_stock(&mut tx, product).await?;
    if stock > MAX_STOCK - quantity {
        return Ok(None);
    }
    split_stock(&mut tx, product, stock + quantity, shards).await?;
    let product: Product = sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products WHERE id = $1"
    ))
    .bind(product)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(product))
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
    let limit = keyset::limit(query.limit)?;
    let products: Vec<Product> = sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(query.after.unwrap_or(0))
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let next_after = keyset::next_after(&products, limit, |p| p.id);
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
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?)
}

/// Changes a product's per-buyer limit, sale window or pause, under the product's row lock (the
/// lock every decision about it takes), so that no request is decided against half a change.
#[utoipa::path(patch, path = "/api/v1/products/{id}", tag = crate::openapi::PRODUCTS,
    summary = "Change a product's limit, sale window, pause or shards (staff)",
    description = "JSON merge-patch semantics (RFC 7396), sent as `application/json`: a field left out stays \
        as it is, `null` clears it, a value sets it. `max_per_buyer` (1 to 10^12): no buyer's succeeded units \
        of the product go past it (units bought before a limit is set count; lowering it undoes no purchase). \
        `sale_starts_at` (inclusive) and `sale_ends_at` (exclusive), RFC 3339 times kept to the microsecond, \
        the start before the end: a request is on sale iff it was accepted inside the window. `paused`: \
        `true` pauses the sale from now on (requests accepted while paused are rejected `paused`, also those \
        decided after the resume), `false` resumes it. `shards` (1 to the number of partitions, not with \
        `max_per_buyer`; `null` refused): the product's purchases are spread over that many partitions, each \
        deciding from its own share of the stock (a share that runs short takes from the others); the stock \
        is split evenly over the new shares at once. Answers the product as it now is. The change applies \
        at once on this server; other API instances answer at once from it within one catalogue refresh, \
        and the worker always judges from the product itself.",
    params(("id" = i64, Path, minimum = 1, description = "The product id")),
    request_body = ProductPatch,
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The product as it now is", body = Product),
        (status = 400, description = "`invalid_id` or `malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "`not_found`: no such product", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: unknown field, wrong type, a limit out of range, a time that is not RFC 3339 or outside the years 1 to 9999, a start not before the end, `paused: null`, `shards` null, not an integer, outside 1 to the number of partitions, or above 1 with a `max_per_buyer`", body = ErrorBody),
    ))]
pub async fn update(
    _: Admin,
    State(state): State<AppState>,
    AppPath(raw_id): AppPath<String>,
    AppJson(body): AppJson<ProductPatch>,
) -> Result<Json<Product>, ApiError> {
    let id = extract::product_id(&raw_id)?;
    let paused = match body.paused {
        Some(None) => {
            return Err(ApiError::InvalidBody(
                "paused must be true or false, not null".into(),
            ));
        }
        Some(Some(paused)) => Some(paused),
        None => None,
    };
    let shards = match body.shards {
        Some(None) => {
            return Err(ApiError::InvalidBody(
                "shards must be an integer from 1, not null".into(),
            ));
        }
        Some(Some(shards)) => Some(shards),
        None => None,
    };
    let mut tx = state.pool.begin().await?;
    let current: Option<Product> = sqlx::query_as(concat!(
        "SELECT ",
        product_columns!(),
        " FROM products WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Err(ApiError::NotFound(format!("no product {id}")));
    };
    let rules = Rules {
        max_per_buyer: body.max_per_buyer.unwrap_or(current.max_per_buyer),
        sale_starts_at: body.sale_starts_at.unwrap_or(current.sale_starts_at),
        sale_ends_at: body.sale_ends_at.unwrap_or(current.sale_ends_at),
    }
    .checked()?;
    let shards = checked_shards(
        &state,
        shards.unwrap_or(i64::from(current.shards)),
        rules.max_per_buyer,
    )?;
    if shards != current.shards {
        let stock = locked_stock(&mut tx, id.get()).await?;
        split_stock(&mut tx, id.get(), stock, shards).await?;
    }
    let now = state.clock.now();
    let paused_at = match (paused, current.paused_at) {
        (Some(true), None) => Some(now),
        (Some(false), Some(since)) => {
            resume(&mut tx, id, since, now).await?;
            None
        }
        (_, unchanged) => unchanged,
    };
    match (current.max_per_buyer, rules.max_per_buyer) {
        (None, Some(_)) => count_buyer_units(&mut tx, id).await?,
        (Some(_), None) => {
            sqlx::query("DELETE FROM buyer_units WHERE product_id = $1")
                .bind(id.get())
                .execute(&mut *tx)
                .await?;
        }
        _ => {}
    }
    let product: Product = sqlx::query_as(concat!(
        "UPDATE products SET max_per_buyer = $2, sale_starts_at = $3, sale_ends_at = $4, ",
        "paused_at = $5, shards = $6 WHERE id = $1 RETURNING ",
        product_columns!()
    ))
    .bind(id.get())
    .bind(rules.max_per_buyer)
    .bind(rules.sale_starts_at)
    .bind(rules.sale_ends_at)
    .bind(paused_at)
    .bind(shards)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    state.catalogue.set_sale(id, product.sale());
    state.catalogue.set_shards(id, product.shards as u16);
    tracing::info!(
        product_id = product.id,
        max_per_buyer = product.max_per_buyer,
        shards = product.shards,
        sale_starts_at = ?product.sale_starts_at,
        sale_ends_at = ?product.sale_ends_at,
        paused_at = ?product.paused_at,
        "product changed"
    );
    Ok(Json(product))
}

/// Ends a pause begun at `since`: records it as a closed pause `[since, now)` (so that a
/// request accepted during it is rejected `paused` even when decided later), unless it covered
/// no instant.
async fn resume(
    tx: &mut sqlx::PgConnection,
    id: ProductId,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if now <= since {
        return Ok(()); // a pause of no duration (or a clock that went back) covers nothing
    }
    sqlx::query(
        "WITH closed AS (INSERT INTO product_pauses (product_id, paused_at, resumed_at) \
                         VALUES ($1, $2, $3)) \
         UPDATE products SET last_resumed_at = greatest(last_resumed_at, $3) WHERE id = $1",
    )
    .bind(id.get())
    .bind(since)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// When a limit is set on a product that had none: counts each buyer's succeeded and held
/// units of it so far into `buyer_units` (from then on the worker keeps them), under the product's row lock,
/// so that the limit counts what was bought before it too.
async fn count_buyer_units(tx: &mut sqlx::PgConnection, id: ProductId) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM buyer_units WHERE product_id = $1")
        .bind(id.get())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO buyer_units (product_id, user_id, units) \
         SELECT $1, t.user_id, sum(l.quantity) FROM transaction_lines l \
         JOIN transactions t ON t.id = l.transaction_id \
         WHERE l.product_id = $1 AND t.status IN ('succeeded', 'held') GROUP BY t.user_id",
    )
    .bind(id.get())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
