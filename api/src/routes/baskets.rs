//! `POST /api/v1/orders`: an order of several products, decided all or nothing. It takes the
//! path of addToCart ([`super::orders::accept`]): the buyer resolved from the token or the body
//! ([`crate::buyers::resolve`]), at most once per `Idempotency-Key`, answered at once when the
//! catalogue snapshot knows a line cannot be served, else accepted (202) once the broker
//! confirmed it, to the partition of its smallest product id, where the worker locks every
//! product it names.

use super::orders::{ORDERS, accept, check_slot, hold_of};
use crate::buyers::{self, Caller};
use crate::catalogue::FinalAnswer;
use crate::error::{ApiError, ErrorBody};
use crate::extract::AppJson;
use crate::routes::Accepted;
use crate::state::AppState;
use allot_shared::message::MAX_LINES;
use allot_shared::{Line, Lines, Order, ProductId, Quantity, SlotId, TransactionId, UserId};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor, value::MapAccessDeserializer};
use std::fmt;

/// An order: who buys which products. 1 to 20 items, each product at most once.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// The buyer, as in addToCart: 1 to 10^15 - 1 without a token (an anonymous buyer, while
    /// `ALLOT_ANONYMOUS_BUYERS` is true); with a buyer's token leave it out, or send the
    /// token's account id (10^15 and up; another id is `403`); with the staff token any buyer.
    #[serde(default)]
    #[schema(value_type = Option<i64>, format = Int64, minimum = 1, maximum = 999_999_999_999_999_i64)]
    pub user_id: Option<UserId>,
    /// The lines of the order, 1 to 20, each product at most once; decided all or nothing.
    #[schema(value_type = Vec<OrderItem>, min_items = 1, max_items = 20)]
    pub items: Vec<Item>,
    /// Hold the units for this many seconds instead of buying them at once: 1 to this server's
    /// `ALLOT_MAX_HOLD_SECONDS`. The order is then `held` (no order number yet) until it is
    /// checked out (`POST /api/v1/transaction/{id}/checkout`), cancelled, or expires.
    #[serde(default)]
    #[schema(value_type = Option<i64>, format = Int64, minimum = 1, maximum = 3600)]
    pub hold_seconds: Option<i64>,
    /// A capacity counter (delivery slot, `GET /api/v1/slots`) to take one place of as well,
    /// all or nothing.
    #[serde(default)]
    #[schema(value_type = Option<i64>, format = Int64, minimum = 1)]
    pub slot_id: Option<SlotId>,
}

/// One line of an order: a JSON object with exactly these two fields.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    pub product_id: ProductId,
    /// How many units: 1 to this server's `ALLOT_MAX_QUANTITY`.
    pub quantity: Quantity,
}

/// An [`OrderItem`] read only from a JSON object. serde's derived structs also accept the
/// positional form (`[6, 1]`), which `deny_unknown_fields` does not stop; the body's top level
/// is checked by [`AppJson`], an item here.
#[derive(Debug, Clone, Copy)]
pub struct Item(pub OrderItem);

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly;

        impl<'de> Visitor<'de> for ObjectOnly {
            type Value = OrderItem;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str(r#"an object {"product_id": ..., "quantity": ...}"#)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OrderItem, A::Error> {
                OrderItem::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer.deserialize_map(ObjectOnly).map(Item)
    }
}

impl NewOrder {
    /// The order's lines, checked: 1 to 20, quantities within `max_quantity`, no product twice.
    fn lines(&self, max_quantity: i64) -> Result<Lines, ApiError> {
        if !(1..=MAX_LINES).contains(&self.items.len()) {
            return Err(ApiError::InvalidBody(format!(
                "items must have 1 to {MAX_LINES} entries, got {}",
                self.items.len()
            )));
        }
        let mut lines: Vec<Line> = Vec::with_capacity(self.items.len());
        for (index, Item(item)) in self.items.iter().enumerate() {
            if item.quantity.get() > max_quantity {
                return Err(ApiError::InvalidBody(format!(
                    "items[{index}].quantity must be at most {max_quantity}, got {}",
                    item.quantity
                )));
            }
            if let Some(earlier) = lines
                .iter()
                .position(|line| line.product_id == item.product_id)
            {
                return Err(ApiError::InvalidBody(format!(
                    "items[{index}]: product {} is already in the order (items[{earlier}]); \
                     list each product once, with its quantity",
                    item.product_id
                )));
            }
            lines.push(Line {
                product_id: item.product_id,
                quantity: item.quantity,
            });
        }
        Lines::new(lines).map_err(ApiError::InvalidBody)
    }
}

#[utoipa::path(post, path = "/api/v1/orders", tag = crate::openapi::ORDERS,
    request_body = NewOrder,
    params(("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): hold the answer until the order is final, at most N seconds (capped at 10)"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 257, description = "A key for safe retries (IETF httpapi draft): 1 to 255 printable ASCII characters, bare or as a quoted string (`\"...\"`). The same key with the same items (in the same order) from the same buyer makes one transaction and gets the same answer for 24 hours (marked `Idempotent-Replayed: true`); with other items, or on addToCart, `422 idempotency_key_reused`; while the first is still being accepted, `409 idempotency_key_in_flight`. A refused attempt (`503`) leaves the key free.")),
    security((), ("buyer_token" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Final at once: a line's product is sold out, outside its sale window or paused (rejected `out_of_stock`, `not_started`, `ended` or `paused`, naming the product in `reason_product_id` for an order of several items; nothing recorded; a `FinalAnswer`), or, with `Prefer: wait`, the order decided within the wait (a `TransactionView`, with `Preference-Applied`)", body = FinalAnswer,
            headers(("idempotent-replayed" = String, description = "`true` on the answer of an earlier request with the same `Idempotency-Key`"))),
        (status = 202, description = "Accepted: RabbitMQ confirmed the order; follow the transaction", body = Accepted,
            headers(("location" = String, description = "/api/v1/transaction/{id}"),
                ("idempotent-replayed" = String, description = "`true` on the answer of an earlier request with the same `Idempotency-Key`"))),
        (status = 400, description = "`malformed_json`, or `invalid_idempotency_key` (empty, longer than 255 characters, not printable ASCII, or sent twice)", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a token that is not valid (forged, expired, revoked), or no token while `ALLOT_ANONYMOUS_BUYERS` is false", body = ErrorBody),
        (status = 403, description = "`user_mismatch`: the body's `user_id` is not the token's account", body = ErrorBody),
        (status = 409, description = "`idempotency_key_in_flight`: a request with this `Idempotency-Key` is still being accepted; retry after `Retry-After`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: missing, unknown or out-of-range field (an account's `user_id`, 10^15 and up, without its token), no item or more than 20, an item that is not an object, a product listed twice; or `idempotency_key_reused`: this `Idempotency-Key` came with another request", body = ErrorBody),
        (status = 503, description = "Not accepted: retry after `Retry-After`. The code says why, as for addToCart: `queue_full` (the partition queue is at its bound), `broker_unavailable` (RabbitMQ unreachable or did not confirm in time), `redis_unavailable` (Redis unreachable: the status store, the shared queue bound or the Idempotency-Key store), `database_unavailable` (PostgreSQL unreachable while a named slot or the retry of an Idempotency-Key is looked up), `timeout` (the request took longer than the server's request timeout)", body = ErrorBody),
    ),
    summary = "Order several products at once, all or nothing",
    description = "Like addToCart, for 1 to 20 items (each product at most once, each quantity at most the \
        server's maximum): `202` with a transaction id once the order is stored for processing, then one final \
        outcome for the whole order. `succeeded`: every item's units were taken and the order has one order \
        number. `rejected`: nothing was taken, and the reason (`out_of_stock`, `unknown_product`, \
        `limit_exceeded`, `not_started`, `ended`, `paused`) is that of the first item, in the order listed, \
        that could not be served; for an order of several items `reason_product_id` names its product. \
        Follow it with `GET /api/v1/transaction/{id}`, its `/events`, or `Prefer: wait=N` (at most 10 s). \
        An item whose product is already known to be sold out, outside its sale window or paused is answered \
        `200` at once, final, and nothing is recorded. `503` with `Retry-After`: not accepted, retry later. \
        Who buys and safe retries as in addToCart: the token's account with a buyer's token, else the body's \
        `user_id` (while `ALLOT_ANONYMOUS_BUYERS` is true); with `Idempotency-Key`, a retry of the same order \
        makes no second transaction.")]
#[tracing::instrument(skip_all, fields(items = body.items.len(), transaction_id))]
pub async fn place_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<NewOrder>,
) -> Result<Response, ApiError> {
    let lines = body.lines(state.max_quantity)?;
    let hold = hold_of(&state, body.hold_seconds)?;
    let user_id = buyers::resolve(&state, &caller, body.user_id)?;
    check_slot(&state, body.slot_id).await?;
    let order = Order {
        transaction_id: TransactionId::new(),
        user_id,
        lines,
        created_at: state.clock.now(),
        hold,
        slot: body.slot_id,
        shard: None,
    };
    accept(&state, &headers, ORDERS, order).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(json: &str, max_quantity: i64) -> Result<Vec<(i64, i64)>, String> {
        let order: NewOrder = serde_json::from_str(json).map_err(|err| err.to_string())?;
        let lines = order.lines(max_quantity).map_err(|err| err.to_string())?;
        Ok(lines
            .iter()
            .map(|line| (line.product_id.get(), line.quantity.get()))
            .collect())
    }

    #[test]
    fn items_are_objects_of_two_fields_listed_once_within_the_limits() {
        assert_eq!(
            lines_of(
                r#"{"user_id": 7, "items": [{"product_id": 6, "quantity": 1}, {"quantity": 2, "product_id": 3}]}"#,
                10
            ),
            Ok(vec![(6, 1), (3, 2)])
        );
        for (body, expected) in [
            (r#"{"user_id": 7, "items": [[6, 1]]}"#, "expected an object"),
            (
                r#"{"user_id": 7, "items": [{"product_id": 6, "quantity": 1, "x": 1}]}"#,
                "unknown field `x`",
            ),
            (
                r#"{"user_id": 7, "items": [{"product_id": 6, "product_id": 7, "quantity": 1}]}"#,
                "duplicate field `product_id`",
            ),
            (
                r#"{"user_id": 7, "items": [{"product_id": 6}]}"#,
                "missing field `quantity`",
            ),
            (
                r#"{"user_id": 7, "items": [{"product_id": 6, "quantity": 0}]}"#,
                "quantity must be a positive integer",
            ),
            (
                r#"{"user_id": 7, "items": []}"#,
                "items must have 1 to 20 entries, got 0",
            ),
            (
                r#"{"user_id": 7, "items": [{"product_id": 6, "quantity": 11}]}"#,
                "items[0].quantity must be at most 10, got 11",
            ),
            (
                r#"{"user_id": 7, "items": [{"product_id": 6, "quantity": 1}, {"product_id": 6, "quantity": 2}]}"#,
                "items[1]: product 6 is already in the order (items[0])",
            ),
            (
                r#"{"user_id": 7, "items": {"product_id": 6, "quantity": 1}}"#,
                "invalid type: map, expected a sequence",
            ),
        ] {
            let err = lines_of(body, 10).unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
        }
        let many: Vec<String> = (1..=21)
            .map(|p| format!(r#"{{"product_id": {p}, "quantity": 1}}"#))
            .collect();
        let err = lines_of(
            &format!(r#"{{"user_id": 7, "items": [{}]}}"#, many.join(",")),
            10,
        )
        .unwrap_err();
        assert!(
            err.contains("items must have 1 to 20 entries, got 21"),
            "{err}"
        );
    }
}
