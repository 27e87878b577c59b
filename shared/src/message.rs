//! What travels over RabbitMQ: batch envelopes of purchase requests.
//!
//! The API gathers the requests that arrive for a partition while its previous publish to it is
//! in flight into one persistent message, so one publish, one confirm, one delivery and one
//! settlement carry many requests (group commit). The body is JSON, so that a message sitting
//! in a queue can be read with any tool during an incident:
//!
//! ```json
//! {"requests": [{"transaction_id": "…", "user_id": 1, "product_id": 7, "quantity": 1,
//!                "created_at": "2026-12-02T10:00:00Z"}, …]}
//! ```
//!
//! The worker reads a message as a list of items, each one request's JSON, and decides them in
//! the order of the list, exactly as if they had come one by one: an item that cannot be read
//! is set aside alone. A body that is not an envelope is one item: the single-request message
//! of earlier versions, still understood, or a foreign message set aside as it is.

use crate::ids::{ProductId, Quantity, TransactionId, UserId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The AMQP `type` of a batch envelope.
pub const ENVELOPE_TYPE: &str = "allot.batch.v1";
/// The AMQP header that carries how many requests an envelope holds, so that a consumer can
/// bound its batches in requests without parsing first.
pub const COUNT_HEADER: &str = "x-allot-requests";

/// One accepted purchase request.
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

/// The body of an envelope carrying `requests`, each already serialised with
/// [`PurchaseRequest::to_json`].
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
