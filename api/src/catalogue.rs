//! The catalogue gate: requests the API can answer at once, finally, without the broker. A
//! request for a product that is sold out can only be rejected `out_of_stock`; one accepted
//! before its product's sale starts, after it ends, or while staff have paused it can only be
//! rejected `not_started`, `ended` or `paused`. Sending those through the broker and a worker
//! would spend the system's capacity on foregone conclusions, so the API keeps a snapshot of the
//! products concerned in memory (no I/O per request) and answers such a request at once with a
//! final outcome (`200`, see [`FinalAnswer`]), recording nothing.
//!
//! The snapshot holds the products at stock 0 and those with a sale window or a pause, and is
//! refreshed from PostgreSQL, the source of truth, every `ALLOT_SOLD_OUT_REFRESH_MS`: no second
//! copy that could drift (a mark pushed by the worker could race a restock and stay stale
//! forever, with no request left to correct it). A product that sells out is short-circuited
//! within one refresh; until then its requests go the normal way and the worker rejects them.
//! A restock or a change of window or pause through this API applies at once on this instance,
//! and on every other instance at its next refresh.
//!
//! The snapshot also holds how many shards each product spread over several partitions has
//! (`shards` > 1), refreshed the same way even when the short-circuit is off
//! ([`SHARDS_REFRESH_WHEN_OFF`]): [`Catalogue::assign_shard`] sends each purchase of such a
//! product to one of its shards' partitions. A snapshot that is a refresh old only changes
//! where a purchase is decided, never how: a purchase that names a shard the product no longer
//! has, or none while it has some, is decided from all of its shares.
//!
//! Windows and pauses are judged by the same rule as the worker's ([`Sale::closed_at`]), at the
//! request's acceptance time (its `created_at`): the answer at once is the answer the worker
//! would give, and a request that reaches the worker is judged there again, from the locked
//! product row, so the window is exact whatever the snapshot's age.

use allot_shared::sale::Sale;
use allot_shared::{
    HoldSeconds, Line, Order, ProductId, Quantity, RejectReason, Shard, SlotId, Status, UserId,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the snapshot is refreshed when the short-circuit is off
/// (`ALLOT_SOLD_OUT_REFRESH_MS=0`), for the shards of products alone.
pub const SHARDS_REFRESH_WHEN_OFF: Duration = Duration::from_secs(1);

/// What the snapshot knows of one product: whether it was sold out, its sale window and
/// pause, and its shards. Only products with something to say are held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gate {
    pub sold_out: bool,
    /// Window and current pause (closed pauses are the worker's business: they lie in the past).
    pub sale: Sale,
    /// The product's shards, when it has more than one (0 or 1: not spread).
    pub shards: u16,
}

impl Gate {
    fn is_empty(&self) -> bool {
        !self.sold_out && !self.sale.is_restricted() && self.shards <= 1
    }

    /// Why a request accepted `at` cannot be served: the window and pause first, as the worker
    /// judges them, then the stock.
    fn refusal(&self, at: DateTime<Utc>) -> Option<RejectReason> {
        self.sale
            .closed_at(at)
            .or(self.sold_out.then_some(RejectReason::OutOfStock))
    }
}

/// The snapshot of the products whose requests can be answered at once.
#[derive(Debug)]
pub struct Catalogue {
    /// `false`: the short-circuit is off (`ALLOT_SOLD_OUT_REFRESH_MS=0`) and every request goes
    /// to the worker.
    enabled: bool,
    gates: RwLock<HashMap<ProductId, Gate>>,
    /// Changes made through this instance; a refresh that ran across one is dropped (it may have
    /// read the database before the change committed), the next one sees it.
    local_changes: AtomicU64,
}

/// The answer to a request that cannot be served and is refused at once: `200`, final, and not
/// recorded (there is no transaction id to poll). Shaped like the transaction it would have
/// been: `product_id` and `quantity` for one line, `items` and `reason_product_id` for several.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FinalAnswer {
    pub status: Status,
    /// `out_of_stock` (sold out), `not_started`, `ended` or `paused`.
    pub reason: RejectReason,
    pub user_id: UserId,
    /// The product; requests of one line only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<ProductId>,
    /// Its units; requests of one line only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Quantity>,
    /// The lines of an order of several products.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Line>,
    /// The product of the first line that cannot be served; orders of several lines only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_product_id: Option<ProductId>,
    /// The slot the request named, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_id: Option<SlotId>,
    /// The hold the request asked for, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_seconds: Option<HoldSeconds>,
    /// Always `true`: this outcome will not change, and nothing was recorded.
    #[serde(rename = "final")]
    #[schema(rename = "final")]
    pub is_final: bool,
}

impl FinalAnswer {
    /// The answer for `order`, refused for `reason` on the line of `product`.
    pub fn new(order: &Order, reason: RejectReason, product: ProductId) -> Self {
        let single = order.lines.single();
        Self {
            status: Status::Rejected,
            reason,
            user_id: order.user_id,
            product_id: single.map(|line| line.product_id),
            quantity: single.map(|line| line.quantity),
            items: if single.is_some() {
                Vec::new()
            } else {
                order.lines.to_vec()
            },
            reason_product_id: single.is_none().then_some(product),
            slot_id: order.slot,
            hold_seconds: order.hold,
            is_final: true,
        }
    }
}

/// A product row as the refresh reads it.
type GateRow = (
    i64,
    bool,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i32,
);

impl Catalogue {
    /// An empty snapshot; `enabled: false` never refuses anything.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            gates: RwLock::default(),
            local_changes: AtomicU64::new(0),
        }
    }

    /// The first line of `order` the snapshot knows cannot be served at `order.created_at`,
    /// and why. One read of the snapshot, no I/O.
    pub fn refusal(&self, order: &Order) -> Option<(ProductId, RejectReason)> {
        if !self.enabled {
            return None;
        }
        let gates = self.read();
        order.lines.iter().find_map(|line| {
            let gate = gates.get(&line.product_id)?;
            Some((line.product_id, gate.refusal(order.created_at)?))
        })
    }

    /// Sends a purchase of one line without a hold, of a product the snapshot knows is spread
    /// over several partitions, to one of its shards: `shard` is set from a hash of the
    /// transaction id (random bits of a UUIDv7), so purchases spread evenly over the shards.
    /// Anything else is left as it is (decided from the whole product). No I/O.
    pub fn assign_shard(&self, order: &mut Order) {
        let Some(line) = order.lines.single() else {
            return;
        };
        if order.hold.is_some() {
            return;
        }
        let shards = self
            .read()
            .get(&line.product_id)
            .map_or(0, |gate| gate.shards);
        if shards > 1 {
            let hash = order.transaction_id.0.as_u128() as u64;
            order.shard = Some(Shard((hash % u64::from(shards)) as u16));
        }
    }

    /// Sets `product`'s shards at once (after a change through this instance).
    pub fn set_shards(&self, product: ProductId, shards: u16) {
        self.change(product, |gate| gate.shards = shards);
    }

    /// Re-opens `product` at once (after a restock through this instance).
    pub fn reopen(&self, product: ProductId) {
        self.change(product, |gate| gate.sold_out = false);
    }

    /// Sets `product`'s window and pause at once (after a change through this instance).
    pub fn set_sale(&self, product: ProductId, sale: Sale) {
        self.change(product, |gate| gate.sale = sale);
    }

    fn change(&self, product: ProductId, change: impl FnOnce(&mut Gate)) {
        self.local_changes.fetch_add(1, Ordering::SeqCst);
        let mut gates = self.write();
        let gate = gates.entry(product).or_default();
        change(gate);
        if gate.is_empty() {
            gates.remove(&product);
        }
    }

    /// Replaces the snapshot with what PostgreSQL holds: the products at stock 0 (a product
    /// with shares: the sum of its shares), those with a sale window or a pause, and those
    /// spread over several partitions.
    pub async fn refresh(&self, pool: &PgPool) -> sqlx::Result<()> {
        let changes = self.local_changes.load(Ordering::SeqCst);
        let rows: Vec<GateRow> = sqlx::query_as(
            "SELECT p.id, p.stock + COALESCE(s.units, 0) = 0, p.sale_starts_at, p.sale_ends_at, \
                    p.paused_at, p.shards \
             FROM products p LEFT JOIN (SELECT product_id, sum(stock) AS units \
                                        FROM product_shares GROUP BY product_id) s \
               ON s.product_id = p.id \
             WHERE p.stock + COALESCE(s.units, 0) = 0 OR p.sale_starts_at IS NOT NULL \
                OR p.sale_ends_at IS NOT NULL OR p.paused_at IS NOT NULL OR p.shards > 1",
        )
        .fetch_all(pool)
        .await?;
        let mut gates = HashMap::with_capacity(rows.len());
        for (id, sold_out, starts_at, ends_at, paused_since, shards) in rows {
            let Ok(id) = ProductId::try_from(id) else {
                continue;
            };
            let sale = Sale {
                starts_at,
                ends_at,
                paused_since,
                pauses: Vec::new(),
            };
            let shards = u16::try_from(shards).unwrap_or(1);
            gates.insert(
                id,
                Gate {
                    sold_out,
                    sale,
                    shards,
                },
            );
        }
        let mut current = self.write();
        if self.local_changes.load(Ordering::SeqCst) == changes {
            *current = gates;
        }
        Ok(())
    }

    /// Refreshes every `interval` until the task is aborted. While the database cannot be read
    /// the last snapshot stays: the worker cannot sell anything then either.
    pub fn spawn_refresher(self: Arc<Self>, pool: PgPool, interval: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticker.tick().await;
                match self.refresh(&pool).await {
                    Ok(()) if failing => {
                        tracing::info!("the catalogue snapshot is refreshed again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(err) if !failing => {
                        tracing::warn!(error = %err, "cannot refresh the catalogue snapshot; keeping the last one");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ProductId, Gate>> {
        self.gates
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ProductId, Gate>> {
        self.gates
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_shared::{Lines, TransactionId};
    use chrono::TimeDelta;

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::microseconds(micros)
    }

    fn order(products: &[i64], created: i64) -> Order {
        Order {
            transaction_id: TransactionId::new(),
            user_id: UserId::try_from(7).unwrap(),
            lines: Lines::new(
                products
                    .iter()
                    .map(|&p| Line {
                        product_id: ProductId::try_from(p).unwrap(),
                        quantity: Quantity::try_from(1).unwrap(),
                    })
                    .collect(),
            )
            .unwrap(),
            created_at: at(created),
            hold: None,
            slot: None,
            shard: None,
        }
    }

    fn product(id: i64) -> ProductId {
        ProductId::try_from(id).unwrap()
    }

    #[test]
    fn the_first_line_the_snapshot_refuses_is_named() {
        let catalogue = Catalogue::new(true);
        catalogue.set_sale(
            product(2),
            Sale {
                starts_at: Some(at(100)),
                ..Sale::default()
            },
        );
        catalogue.change(product(3), |gate| gate.sold_out = true);
        assert_eq!(catalogue.refusal(&order(&[1], 0)), None);
        assert_eq!(
            catalogue.refusal(&order(&[1, 3, 2], 0)),
            Some((product(3), RejectReason::OutOfStock))
        );
        assert_eq!(
            catalogue.refusal(&order(&[2, 3], 99)),
            Some((product(2), RejectReason::NotStarted))
        );
        assert_eq!(
            catalogue.refusal(&order(&[2], 100)),
            None,
            "on sale from its start"
        );
        catalogue.reopen(product(3));
        assert_eq!(catalogue.refusal(&order(&[3, 2], 100)), None);
        assert!(
            catalogue.read().get(&product(3)).is_none(),
            "nothing to say"
        );

        let off = Catalogue::new(false);
        off.change(product(3), |gate| gate.sold_out = true);
        assert_eq!(
            off.refusal(&order(&[3], 0)),
            None,
            "the short-circuit is off"
        );
    }

    #[test]
    fn an_answer_is_shaped_like_its_transaction() {
        let one = order(&[4], 0);
        let answer =
            serde_json::to_value(FinalAnswer::new(&one, RejectReason::OutOfStock, product(4)))
                .unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"status": "rejected", "reason": "out_of_stock", "user_id": 7,
                               "product_id": 4, "quantity": 1, "final": true})
        );
        let several = order(&[4, 5], 0);
        let answer =
            serde_json::to_value(FinalAnswer::new(&several, RejectReason::Paused, product(5)))
                .unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"status": "rejected", "reason": "paused", "user_id": 7,
                               "items": [{"product_id": 4, "quantity": 1}, {"product_id": 5, "quantity": 1}],
                               "reason_product_id": 5, "final": true})
        );
    }
}
