//! What travels over RabbitMQ: batch envelopes of purchase requests.
//!
//! The API gathers the requests that arrive for a partition while its previous publish to it is
//! in flight into one persistent message, so one publish, one confirm, one delivery and one
//! settlement carry many requests (group commit). The body is JSON, so that a message sitting
//! in a queue can be read with any tool during an incident:
//!
//! ```json
//! {"requests": [{"transaction_id": "…", "user_id": 1, "product_id": 7, "quantity": 1,
//!                "created_at": "2026-12-02T10:00:00Z"},
//!               {"transaction_id": "…", "user_id": 2,
//!                "items": [{"product_id": 6, "quantity": 1}, {"product_id": 9, "quantity": 2}],
//!                "created_at": "2026-12-02T10:00:01Z"}, …]}
//! ```
//!
//! A request of one line (every addToCart, an order of one item) is the flat JSON of
//! [`PurchaseRequest`], byte for byte what earlier versions wrote; an order of several lines
//! carries them as `items` ([`Order`]). A hold adds `"hold_seconds"`, an order for a capacity
//! counter `"slot_id"`, a purchase of a product spread over several partitions the share it is
//! decided from (`"shard"`), after the other fields and only when present, so a request without
//! them is the same bytes as before they existed.
//!
//! A checkout or cancel of a hold travels the same way, as a [`Command`] item of its hold's
//! partition (`{"command": "checkout", "command_id": "…", "transaction_id": "…",
//! "created_at": "…"}`), and so does an expiry the worker's sweeper asks for (`"expire"`): the
//! serial path that took the hold's units is the one that confirms or releases them.
//!
//! The worker reads a message as a list of items, each one request's JSON, and decides them in
//! the order of the list, exactly as if they had come one by one: an item that cannot be read
//! is set aside alone. A body that is not an envelope is one item: the single-request message
//! of earlier versions, still understood, or a foreign message set aside as it is.

use crate::ids::{
    CommandId, HoldSeconds, ProductId, Quantity, Shard, SlotId, TransactionId, UserId,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The AMQP `type` of a batch envelope.
pub const ENVELOPE_TYPE: &str = "allot.batch.v1";
/// The AMQP header that carries how many requests an envelope holds, so that a consumer can
/// bound its batches in requests without parsing first.
pub const COUNT_HEADER: &str = "x-allot-requests";

/// One accepted purchase request of one line: what `addToCart` accepts, and the flat JSON of
/// every one-line request on the wire. [`Order`] is the general form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseRequest {
    pub transaction_id: TransactionId,
    pub user_id: UserId,
    pub product_id: ProductId,
    pub quantity: Quantity,
    /// When the API accepted it.
    pub created_at: DateTime<Utc>,
}

impl PurchaseRequest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a PurchaseRequest always serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The most lines one order may have.
pub const MAX_LINES: usize = 20;

/// One line of an order: how many units of which product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub product_id: ProductId,
    pub quantity: Quantity,
}

/// The lines of an order: 1 to [`MAX_LINES`], each product at most once, in the order the buyer
/// listed them. A single line is held without allocating, so the one-product path costs what
/// it cost before orders had lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lines(LinesRepr);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LinesRepr {
    One(Line),
    Many(Box<[Line]>),
}

impl Lines {
    /// One line.
    pub fn one(line: Line) -> Self {
        Self(LinesRepr::One(line))
    }

    /// Checks `lines`: 1 to [`MAX_LINES`] of them, no product twice.
    pub fn new(lines: Vec<Line>) -> Result<Self, String> {
        if lines.is_empty() {
            return Err("an order has at least one line".into());
        }
        if lines.len() > MAX_LINES {
            return Err(format!(
                "an order has at most {MAX_LINES} lines, got {}",
                lines.len()
            ));
        }
        for (index, line) in lines.iter().enumerate() {
            if lines[..index]
                .iter()
                .any(|earlier| earlier.product_id == line.product_id)
            {
                return Err(format!(
                    "product {} is listed more than once",
                    line.product_id
                ));
            }
        }
        Ok(match <[Line; 1]>::try_from(lines) {
            Ok([line]) => Self::one(line),
            Err(lines) => Self(LinesRepr::Many(lines.into_boxed_slice())),
        })
    }

    pub fn as_slice(&self) -> &[Line] {
        match &self.0 {
            LinesRepr::One(line) => std::slice::from_ref(line),
            LinesRepr::Many(lines) => lines,
        }
    }

    /// The line, if there is exactly one.
    pub fn single(&self) -> Option<Line> {
        match self.as_slice() {
            [line] => Some(*line),
            _ => None,
        }
    }
}

impl std::ops::Deref for Lines {
    type Target = [Line];

    fn deref(&self) -> &[Line] {
        self.as_slice()
    }
}

/// One accepted request to buy: a buyer, one or more [`Lines`], the time the API accepted it,
/// and optionally a hold and a slot. Decided all or nothing. On the wire, one line is the flat
/// JSON of [`PurchaseRequest`] (the same bytes, when there is no hold or slot), several are
/// `items`.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub transaction_id: TransactionId,
    pub user_id: UserId,
    pub lines: Lines,
    /// When the API accepted it; a sale window or a pause is judged at this time.
    pub created_at: DateTime<Utc>,
    /// A hold: the units (and the slot's place) are taken for this long, without an order
    /// number, until a checkout, a cancel or the expiry. `None`: sold outright.
    pub hold: Option<HoldSeconds>,
    /// The capacity counter the order takes one place of, besides its products' units.
    pub slot: Option<SlotId>,
    /// The share of its product this purchase is decided from, when the API spread the product
    /// over several partitions (`shards` > 1): set only on a purchase of one line without a
    /// hold, which travels to that shard's partition. `None`: decided from the whole product.
    pub shard: Option<Shard>,
}

impl From<PurchaseRequest> for Order {
    fn from(request: PurchaseRequest) -> Self {
        Self {
            transaction_id: request.transaction_id,
            user_id: request.user_id,
            lines: Lines::one(Line {
                product_id: request.product_id,
                quantity: request.quantity,
            }),
            created_at: request.created_at,
            hold: None,
            slot: None,
            shard: None,
        }
    }
}

/// The wire form of an order of one line: the field order of [`PurchaseRequest`], so that the
/// bytes are the same.
#[derive(Serialize)]
struct OneLineWire<'a> {
    transaction_id: TransactionId,
    user_id: UserId,
    product_id: ProductId,
    quantity: Quantity,
    created_at: &'a DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hold_seconds: Option<HoldSeconds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot_id: Option<SlotId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<Shard>,
}

#[derive(Serialize)]
struct ItemsWire<'a> {
    transaction_id: TransactionId,
    user_id: UserId,
    items: &'a [Line],
    created_at: &'a DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hold_seconds: Option<HoldSeconds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot_id: Option<SlotId>,
}

/// Either wire form, as read back.
#[derive(Deserialize)]
struct AnyWire {
    transaction_id: TransactionId,
    user_id: UserId,
    #[serde(default)]
    product_id: Option<ProductId>,
    #[serde(default)]
    quantity: Option<Quantity>,
    #[serde(default)]
    items: Option<Vec<Line>>,
    created_at: DateTime<Utc>,
    #[serde(default)]
    hold_seconds: Option<HoldSeconds>,
    #[serde(default)]
    slot_id: Option<SlotId>,
    #[serde(default)]
    shard: Option<Shard>,
}

impl Order {
    pub fn to_json(&self) -> Vec<u8> {
        let json = match self.lines.single() {
            Some(line) => serde_json::to_vec(&OneLineWire {
                transaction_id: self.transaction_id,
                user_id: self.user_id,
                product_id: line.product_id,
                quantity: line.quantity,
                created_at: &self.created_at,
                hold_seconds: self.hold,
                slot_id: self.slot,
                shard: self.shard,
            }),
            None => serde_json::to_vec(&ItemsWire {
                transaction_id: self.transaction_id,
                user_id: self.user_id,
                items: &self.lines,
                created_at: &self.created_at,
                hold_seconds: self.hold,
                slot_id: self.slot,
            }),
        };
        json.expect("an Order always serialises")
    }

    /// Reads either wire form: `product_id` and `quantity`, or `items` (1 to [`MAX_LINES`]
    /// lines, no product twice), never both.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        use serde::de::Error;
        let wire: AnyWire = serde_json::from_slice(bytes)?;
        let single = wire.items.is_none();
        let lines = match (wire.product_id, wire.quantity, wire.items) {
            (Some(product_id), Some(quantity), None) => Lines::one(Line {
                product_id,
                quantity,
            }),
            (None, None, Some(items)) => Lines::new(items).map_err(serde_json::Error::custom)?,
            _ => {
                return Err(serde_json::Error::custom(
                    "a request has product_id and quantity, or items, not both",
                ));
            }
        };
        Ok(Self {
            transaction_id: wire.transaction_id,
            user_id: wire.user_id,
            lines,
            created_at: wire.created_at,
            hold: wire.hold_seconds,
            slot: wire.slot_id,
            // Only a purchase of one line is decided from one share.
            shard: wire.shard.filter(|_| single),
        })
    }

    /// The product whose partition decides this order: its smallest product id. For one line,
    /// its product.
    pub fn routing_product(&self) -> ProductId {
        self.lines
            .iter()
            .map(|line| line.product_id)
            .min()
            .expect("an order has a line")
    }
}

/// What a [`Command`] does to its hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Confirm the hold: `succeeded`, with its order number, if it has not expired.
    Checkout,
    /// Release the hold: `rejected` (`cancelled`), its units back.
    Cancel,
    /// Release the hold if it has expired: `rejected` (`expired`), its units back. Sent by the
    /// worker's expiry sweeper, never by a client.
    Expire,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Checkout => "checkout",
            CommandKind::Cancel => "cancel",
            CommandKind::Expire => "expire",
        }
    }
}

/// A command about a hold: a checkout or cancel the API accepted, or an expiry the worker's
/// sweeper asks for. Travels in its hold's partition queue, as an item of a batch envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    #[serde(rename = "command")]
    pub kind: CommandKind,
    pub command_id: CommandId,
    /// The hold.
    pub transaction_id: TransactionId,
    /// When it was accepted (by the API) or asked for (by the sweeper).
    pub created_at: DateTime<Utc>,
}

impl Command {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Command always serialises")
    }
}

/// One item of a batch envelope: a request to buy, or a command about a hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Order(Order),
    Command(Command),
}

impl From<Order> for Request {
    fn from(order: Order) -> Self {
        Request::Order(order)
    }
}

impl From<PurchaseRequest> for Request {
    fn from(request: PurchaseRequest) -> Self {
        Request::Order(Order::from(request))
    }
}

impl From<Command> for Request {
    fn from(command: Command) -> Self {
        Request::Command(command)
    }
}

impl Request {
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Request::Order(order) => order.to_json(),
            Request::Command(command) => command.to_json(),
        }
    }

    /// Reads an item: an [`Order`] (tried first: the common case), else a [`Command`]. The
    /// error is the order's when neither reads.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        match Order::from_json(bytes) {
            Ok(order) => Ok(Request::Order(order)),
            Err(order_error) => serde_json::from_slice::<Command>(bytes)
                .map(Request::Command)
                .map_err(|_| order_error),
        }
    }

    /// The transaction it is about: the order's own, or the command's hold.
    pub fn transaction_id(&self) -> TransactionId {
        match self {
            Request::Order(order) => order.transaction_id,
            Request::Command(command) => command.transaction_id,
        }
    }
}

/// The body of an envelope carrying `requests`, each already serialised with
/// [`Order::to_json`] (or [`PurchaseRequest::to_json`]).
pub fn envelope<'a>(requests: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(br#"{"requests":["#);
    for (index, request) in requests.into_iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(request);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The size in bytes of an envelope of requests of `request_bytes` bytes in all, `count` of them.
pub fn envelope_len(request_bytes: usize, count: usize) -> usize {
    br#"{"requests":[]}"#.len() + request_bytes + count.saturating_sub(1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    requests: Vec<&'a RawValue>,
}

/// The items of a message body, in order: the requests of an envelope, each as its own JSON
/// text (borrowed from `body`), or the whole body when it is not an envelope.
pub fn items(body: &[u8]) -> Vec<&[u8]> {
    match serde_json::from_slice::<Envelope<'_>>(body) {
        Ok(envelope) => envelope
            .requests
            .into_iter()
            .map(|raw| raw.get().as_bytes())
            .collect(),
        Err(_) => vec![body],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: u128) -> PurchaseRequest {
        PurchaseRequest {
            transaction_id: TransactionId(uuid::Uuid::from_u128(n)),
            user_id: UserId::try_from(1).unwrap(),
            product_id: ProductId::try_from(2).unwrap(),
            quantity: Quantity::try_from(3).unwrap(),
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn an_envelope_gives_back_its_requests_in_order() {
        let jsons: Vec<Vec<u8>> = (1..=3).map(|n| request(n).to_json()).collect();
        let body = envelope(jsons.iter().map(Vec::as_slice));
        let total: usize = jsons.iter().map(Vec::len).sum();
        assert_eq!(body.len(), envelope_len(total, jsons.len()));
        let items = items(&body);
        assert_eq!(items.len(), 3);
        for (n, item) in (1..=3).zip(items) {
            assert_eq!(PurchaseRequest::from_json(item).unwrap(), request(n));
        }
    }

    fn line(product: i64, quantity: i64) -> Line {
        Line {
            product_id: ProductId::try_from(product).unwrap(),
            quantity: Quantity::try_from(quantity).unwrap(),
        }
    }

    #[test]
    fn an_order_of_one_line_is_the_same_bytes_as_a_purchase_request() {
        let request = request(5);
        let order = Order::from(request.clone());
        assert_eq!(order.to_json(), request.to_json());
        assert_eq!(Order::from_json(&request.to_json()).unwrap(), order);
        // An order of one line built from lines is the same, too.
        let built = Order {
            lines: Lines::new(vec![line(2, 3)]).unwrap(),
            ..order.clone()
        };
        assert_eq!(built.hold, None);
        assert_eq!(built, order);
        assert_eq!(built.to_json(), request.to_json());
    }

    #[test]
    fn an_order_of_several_lines_carries_items_and_reads_back() {
        let order = Order {
            lines: Lines::new(vec![line(9, 1), line(4, 2), line(7, 1)]).unwrap(),
            ..Order::from(request(6))
        };
        let json: serde_json::Value = serde_json::from_slice(&order.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "transaction_id": "00000000-0000-0000-0000-000000000006",
                "user_id": 1,
                "items": [{"product_id": 9, "quantity": 1}, {"product_id": 4, "quantity": 2},
                          {"product_id": 7, "quantity": 1}],
                "created_at": "2023-11-14T22:13:20Z",
            })
        );
        assert_eq!(Order::from_json(&order.to_json()).unwrap(), order);
        assert_eq!(order.routing_product().get(), 4);
    }

    #[test]
    fn a_hold_and_a_slot_come_after_the_other_fields_and_only_when_present() {
        let request = request(8);
        let mut order = Order::from(request.clone());
        order.hold = Some(HoldSeconds::try_from(600).unwrap());
        order.slot = Some(SlotId::try_from(3).unwrap());
        let json = String::from_utf8(order.to_json()).unwrap();
        let plain = String::from_utf8(request.to_json()).unwrap();
        assert_eq!(
            json,
            format!(
                "{},\"hold_seconds\":600,\"slot_id\":3}}",
                plain.trim_end_matches('}')
            )
        );
        assert_eq!(Order::from_json(json.as_bytes()).unwrap(), order);
        assert_eq!(
            Request::from_json(json.as_bytes()).unwrap(),
            Request::Order(order)
        );
        assert!(Order::from_json(br#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"product_id":2,"quantity":1,"created_at":"2023-11-14T22:13:20Z","hold_seconds":0}"#).is_err());
    }

    #[test]
    fn a_shard_comes_last_only_when_present_and_only_on_one_line() {
        let request = request(8);
        let mut order = Order::from(request.clone());
        order.shard = Some(Shard(3));
        let json = String::from_utf8(order.to_json()).unwrap();
        let plain = String::from_utf8(request.to_json()).unwrap();
        assert_eq!(
            json,
            format!("{},\"shard\":3}}", plain.trim_end_matches('}'))
        );
        assert_eq!(Order::from_json(json.as_bytes()).unwrap(), order);
        let several = br#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"items":[{"product_id":2,"quantity":1},{"product_id":3,"quantity":1}],"created_at":"2023-11-14T22:13:20Z","shard":1}"#;
        assert_eq!(Order::from_json(several).unwrap().shard, None);
    }

    #[test]
    fn a_command_reads_back_and_is_no_order() {
        let command = Command {
            kind: CommandKind::Checkout,
            command_id: CommandId(uuid::Uuid::from_u128(9)),
            transaction_id: TransactionId(uuid::Uuid::from_u128(4)),
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        };
        let json: serde_json::Value = serde_json::from_slice(&command.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"command": "checkout",
                "command_id": "00000000-0000-0000-0000-000000000009",
                "transaction_id": "00000000-0000-0000-0000-000000000004",
                "created_at": "2023-11-14T22:13:20Z"})
        );
        let read = Request::from_json(&command.to_json()).unwrap();
        assert_eq!(read, Request::Command(command.clone()));
        assert_eq!(read.transaction_id(), command.transaction_id);
        assert!(Order::from_json(&command.to_json()).is_err());
        // Neither: the order's error is reported.
        let err = Request::from_json(br#"{"command":"refund"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
    }

    #[test]
    fn lines_are_one_to_twenty_distinct_products() {
        assert!(Lines::new(vec![]).is_err());
        assert!(Lines::new((1..=20).map(|p| line(p, 1)).collect()).is_ok());
        assert!(Lines::new((1..=21).map(|p| line(p, 1)).collect()).is_err());
        let twice = Lines::new(vec![line(3, 1), line(4, 1), line(3, 2)]).unwrap_err();
        assert_eq!(twice, "product 3 is listed more than once");
        for bad in [
            r#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"created_at":"2023-11-14T22:13:20Z"}"#,
            r#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"product_id":2,"created_at":"2023-11-14T22:13:20Z"}"#,
            r#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"items":[],"created_at":"2023-11-14T22:13:20Z"}"#,
            r#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"product_id":2,"quantity":1,"items":[{"product_id":2,"quantity":1}],"created_at":"2023-11-14T22:13:20Z"}"#,
            r#"{"transaction_id":"00000000-0000-0000-0000-000000000001","user_id":1,"items":[{"product_id":2,"quantity":1},{"product_id":2,"quantity":1}],"created_at":"2023-11-14T22:13:20Z"}"#,
        ] {
            assert!(Order::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_item_stays_one_item_and_other_bodies_are_one_item() {
        let good = request(1).to_json();
        let body = envelope([good.as_slice(), br#"{"quantity":0}"#, b"17"]);
        let items = items(&body);
        assert_eq!(items.len(), 3);
        assert!(PurchaseRequest::from_json(items[1]).is_err());
        assert_eq!(items[2], b"17");

        let single = request(9).to_json();
        assert_eq!(super::items(&single), vec![single.as_slice()]);
        assert_eq!(super::items(b"{not json"), vec![b"{not json".as_slice()]);
        assert_eq!(super::items(b""), vec![b"".as_slice()]);
    }
}
