//! The sold-out short-circuit. Once a product's stock is 0, every further request for it can
//! only be rejected `out_of_stock`; sending those through the broker and a worker would spend
//! the system's capacity on foregone conclusions. So the API keeps the set of sold-out products
//! in memory (no I/O per request) and answers a request for one of them at once with a final
//! outcome (`200`, see [`SoldOutAnswer`]), recording nothing.
//!
//! The set is refreshed from PostgreSQL, the source of truth for stock, every
//! `ALLOT_SOLD_OUT_REFRESH_MS`: no second copy of the stock that could drift (a mark pushed by
//! the worker could race a restock and stay stale forever, with no request left to correct it).
//! A product that sells out is short-circuited within one refresh; until then its requests go
//! the normal way and the worker rejects them. A restock through this API re-opens the product
//! at once on this instance, and on every other instance at its next refresh.

use allot_shared::{ProductId, Quantity, RejectReason, Status, UserId};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The products whose stock was 0 at the last refresh.
#[derive(Debug, Default)]
pub struct SoldOut {
    ids: RwLock<HashSet<i64>>,
}

/// The answer to a request for a sold-out product: `200`, final, and not recorded (there is no
/// transaction id to poll).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SoldOutAnswer {
    pub status: Status,
    pub reason: RejectReason,
    pub user_id: UserId,
    pub product_id: ProductId,
    pub quantity: Quantity,
    /// Always `true`: this outcome will not change, and nothing was recorded.
    #[serde(rename = "final")]
    #[schema(rename = "final")]
    pub is_final: bool,
}

impl SoldOutAnswer {
    pub fn new(user_id: UserId, product_id: ProductId, quantity: Quantity) -> Self {
        Self {
            status: Status::Rejected,
            reason: RejectReason::OutOfStock,
            user_id,
            product_id,
            quantity,
            is_final: true,
        }
    }
}

impl SoldOut {
    /// Whether `product` was sold out at the last refresh.
    pub fn contains(&self, product: ProductId) -> bool {
        self.ids
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&product.get())
    }

    /// Re-opens `product` at once (after a restock through this instance).
    pub fn reopen(&self, product: ProductId) {
        self.ids
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&product.get());
    }

    /// Replaces the set with the products PostgreSQL holds at stock 0.
    pub async fn refresh(&self, pool: &PgPool) -> sqlx::Result<()> {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM products WHERE stock = 0")
            .fetch_all(pool)
            .await?;
        let ids: HashSet<i64> = ids.into_iter().collect();
        *self
            .ids
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = ids;
        Ok(())
    }

    /// Refreshes every `interval` until the task is aborted. While the database cannot be read
    /// the last set stays: the worker cannot sell anything then either.
    pub fn spawn_refresher(self: Arc<Self>, pool: PgPool, interval: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticker.tick().await;
                match self.refresh(&pool).await {
                    Ok(()) if failing => {
                        tracing::info!("the sold-out set is refreshed again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(err) if !failing => {
                        tracing::warn!(error = %err, "cannot refresh the sold-out set; keeping the last one");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
    }
}
