//! Poison items: reading the requests out of a batch's items. One that does not parse becomes
//! a dead letter, and [`salvage`] recovers the transaction it names, if any can be read, so
//! that it is rejected (`unprocessable`) instead of staying pending. What is done with an item
//! that parses but fails every time is the retry policy's ([`crate::retry`]).

use crate::decider::Item;
use crate::persist::DeadLetter;
use allot_shared::clock::to_stored_precision;
use allot_shared::{Line, Lines, Order, ProductId, Quantity, Request, TransactionId, UserId};
use chrono::{DateTime, Utc};

/// What can be recovered from an item that is not a valid [`Order`]: enough to record its
/// transaction as rejected (an id, a user, and either a product and quantity or items the
/// schema accepts). `None` if any of them is missing; such a message never came from allot's
/// API, which publishes only what it validated, so no client holds its id.
pub fn salvage(body: &[u8], message_id: Option<&str>, now: DateTime<Utc>) -> Option<Order> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = value
        .get("transaction_id")
        .and_then(|v| v.as_str())
        .or(message_id)?;
    let positive = |value: &serde_json::Value, field: &str| {
        value.get(field).and_then(serde_json::Value::as_i64)
    };
    let line = |value: &serde_json::Value| {
        Some(Line {
            product_id: ProductId::try_from(positive(value, "product_id")?).ok()?,
            quantity: Quantity::try_from(positive(value, "quantity")?).ok()?,
        })
    };
    let created_at = value
        .get("created_at")
        .and_then(|v| serde_json::from_value::<DateTime<Utc>>(v.clone()).ok())
        .unwrap_or(now);
    let lines = match value.get("items").and_then(serde_json::Value::as_array) {
        Some(items) => Lines::new(items.iter().map(line).collect::<Option<Vec<Line>>>()?).ok()?,
        None => Lines::one(line(&value)?),
    };
    Some(Order {
        transaction_id: TransactionId(id.parse().ok()?),
        user_id: UserId::try_from(positive(&value, "user_id")?).ok()?,
        lines,
        created_at: to_stored_precision(created_at),
        hold: None,
        slot: None,
        shard: None,
    })
}

/// Splits items into the requests they carry (orders and commands about holds) and the
/// unreadable rest, in order.
pub fn parse(items: &[Item<'_>]) -> (Vec<Request>, Vec<DeadLetter>) {
    let mut requests = Vec::with_capacity(items.len());
    let mut dead_letters = Vec::new();
    for item in items {
        match Request::from_json(item.body) {
            Ok(mut request) => {
                // Stored to the microsecond: keep the published status identical to the row.
                match &mut request {
                    Request::Order(order) => {
                        order.created_at = to_stored_precision(order.created_at);
                    }
                    Request::Command(command) => {
                        command.created_at = to_stored_precision(command.created_at);
                    }
                }
                requests.push(request);
            }
            Err(err) => dead_letters.push(DeadLetter {
                message_id: item.message_id.clone(),
                body: item.body.to_vec(),
                error: err.to_string(),
            }),
        }
    }
    (requests, dead_letters)
}

/// The order an item that keeps failing names, if it can be read at all: the item itself
/// when it parses, else what [`salvage`] recovers. A command about a hold names no order: it
/// is set aside alone (its hold stays as it is, and expires if nobody settles it).
pub fn request_named_by(item: &Item<'_>, now: DateTime<Utc>) -> Option<Order> {
    Order::from_json(item.body)
        .ok()
        .map(|mut request| {
            request.created_at = to_stored_precision(request.created_at);
            request
        })
        .or_else(|| salvage(item.body, item.message_id.as_deref(), now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salvage_needs_an_id_and_valid_fields() {
        let now = Utc::now();
        let id = "01a20115-940a-7103-84d0-01f4c76444b1";
        let body =
            format!(r#"{{"transaction_id":"{id}","user_id":1,"product_id":2,"quantity":3}}"#);
        let request = salvage(body.as_bytes(), None, now).expect("salvageable");
        assert_eq!(request.transaction_id.to_string(), id);
        assert_eq!(request.lines.single().unwrap().quantity.get(), 3);
        // The id may come from the AMQP message_id.
        let body = br#"{"user_id":1,"product_id":2,"quantity":3,"created_at":"yesterday"}"#;
        assert!(salvage(body, Some(id), now).is_some());
        assert!(salvage(body, None, now).is_none(), "no id at all");
        let zero =
            format!(r#"{{"transaction_id":"{id}","user_id":1,"product_id":2,"quantity":0}}"#);
        assert!(
            salvage(zero.as_bytes(), None, now).is_none(),
            "the schema refuses 0"
        );
        assert!(salvage(b"{not json", Some(id), now).is_none());
        // An order of several lines, with a field too many: its lines are recovered.
        let order = format!(
            r#"{{"transaction_id":"{id}","user_id":1,"items":[{{"product_id":2,"quantity":1}},{{"product_id":5,"quantity":2}}],"extra":[]}}"#
        );
        let request = salvage(order.as_bytes(), None, now).expect("salvageable");
        assert_eq!(request.lines.len(), 2);
        assert_eq!(request.lines[1].product_id.get(), 5);
        let twice = format!(
            r#"{{"transaction_id":"{id}","user_id":1,"items":[{{"product_id":2,"quantity":1}},{{"product_id":2,"quantity":2}}]}}"#
        );
        assert!(
            salvage(twice.as_bytes(), None, now).is_none(),
            "a product twice is no order"
        );
    }
}
