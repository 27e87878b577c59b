//! Decided transactions as PostgreSQL stores them, and their conversion to the client view.
//! The worker reads them to replay earlier outcomes; the API reads them when Redis has no
//! status.
//!
//! A transaction of one line keeps it in `transactions.product_id` and `.quantity`; an order of
//! several lines has both `NULL` and its lines in `transaction_items`. The view
//! `transaction_lines` gives every transaction's lines either way (one row per line), and
//! [`StoredTransaction::lines`] does the same for a loaded row.

use crate::ids::{ProductId, Quantity, TransactionId, UserId};
use crate::message::{Line, Order};
use crate::outcome::{OrderNumber, Outcome, Rejection, Status, TransactionView};
use anyhow::{Context, anyhow};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

/// A row of the `transactions` table, with the lines of an order of several products from
/// `transaction_items`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredTransaction {
    pub id: Uuid,
    pub user_id: i64,
    /// Set on a transaction of one line; `NULL` on an order of several (see `item_products`).
    pub product_id: Option<i64>,
    pub quantity: Option<i64>,
    pub status: String,
    pub reason: Option<String>,
    pub reason_product_id: Option<i64>,
    pub order_day: Option<NaiveDate>,
    pub order_seq: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub decided_at: DateTime<Utc>,
    /// The products of an order's lines, in order; `NULL` for a transaction of one line.
    pub item_products: Option<Vec<i64>>,
    /// Their quantities.
    pub item_quantities: Option<Vec<i64>>,
}

/// `SELECT`s every column of [`StoredTransaction`], with the given `WHERE` clause. The lines of
/// an order of several products are read only for such rows (the `CASE`), so reading
/// one-line transactions costs what it did before orders had lines.
macro_rules! select_transactions_where {
    ($condition:literal) => {
        concat!(
            "SELECT id, user_id, product_id, quantity, status, reason, reason_product_id, ",
            "order_day, order_seq, created_at, decided_at, ",
            "CASE WHEN product_id IS NULL THEN ARRAY(SELECT i.product_id FROM transaction_items i ",
            "WHERE i.transaction_id = t.id ORDER BY i.position) END AS item_products, ",
            "CASE WHEN product_id IS NULL THEN ARRAY(SELECT i.quantity FROM transaction_items i ",
            "WHERE i.transaction_id = t.id ORDER BY i.position) END AS item_quantities ",
            "FROM transactions t WHERE ",
            $condition
        )
    };
}

impl StoredTransaction {
    /// The stored outcome. Fails only on a row the schema's constraints should have refused.
    pub fn outcome(&self) -> anyhow::Result<Outcome> {
        match (
            self.status.as_str(),
            self.order_day,
            self.order_seq,
            &self.reason,
        ) {
            ("succeeded", Some(day), Some(seq), _) => {
                Ok(Outcome::Succeeded(OrderNumber { day, seq }))
            }
            ("rejected", _, _, Some(reason)) => Ok(Outcome::Rejected(Rejection {
                reason: reason.parse().map_err(|e| anyhow!("{e}"))?,
                product: self
                    .reason_product_id
                    .map(|id| ProductId::try_from(id).map_err(anyhow::Error::msg))
                    .transpose()?,
            })),
            _ => Err(anyhow!(
                "transaction {} has an inconsistent stored outcome",
                self.id
            )),
        }
    }

    /// The transaction's lines: its one line, or the lines of an order of several.
    pub fn lines(&self) -> anyhow::Result<Vec<Line>> {
        let field = |what: &str| format!("transaction {} has an invalid stored {what}", self.id);
        let line = |product: i64, quantity: i64| -> anyhow::Result<Line> {
            Ok(Line {
                product_id: ProductId::try_from(product)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| field("product_id"))?,
                quantity: Quantity::try_from(quantity)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| field("quantity"))?,
            })
        };
        match (
            self.product_id,
            self.quantity,
            &self.item_products,
            &self.item_quantities,
        ) {
            (Some(product), Some(quantity), _, _) => Ok(vec![line(product, quantity)?]),
            (None, None, Some(products), Some(quantities))
                if !products.is_empty() && products.len() == quantities.len() =>
            {
                products
                    .iter()
                    .zip(quantities)
                    .map(|(&product, &quantity)| line(product, quantity))
                    .collect()
            }
            _ => Err(anyhow!("{}", field("line"))),
        }
    }

    /// The view clients see.
    pub fn to_view(&self) -> anyhow::Result<TransactionView> {
        let mut lines = self.lines()?;
        let (product_id, quantity) = match lines.as_slice() {
            [line] => (Some(line.product_id), Some(line.quantity)),
            _ => (None, None),
        };
        if product_id.is_some() {
            lines.clear();
        }
        let mut view = TransactionView {
            transaction_id: TransactionId(self.id),
            status: Status::Pending,
            user_id: UserId::try_from(self.user_id)
                .map_err(anyhow::Error::msg)
                .with_context(|| {
                    format!("transaction {} has an invalid stored user_id", self.id)
                })?,
            product_id,
            quantity,
            items: lines,
            order_number: None,
            reason: None,
            reason_product_id: None,
            created_at: self.created_at,
            decided_at: Some(self.decided_at),
        };
        view.set_outcome(self.outcome()?);
        Ok(view)
    }
}

/// Loads the stored rows of those of `ids` that were decided.
pub async fn fetch_many<'e>(
    executor: impl PgExecutor<'e>,
    ids: &[Uuid],
) -> sqlx::Result<Vec<StoredTransaction>> {
    sqlx::query_as(select_transactions_where!("id = ANY($1)"))
        .bind(ids)
        // Planned for each call: see the module documentation of `crate::db`.
        .persistent(false)
        .fetch_all(executor)
        .await
}

/// Loads one decided transaction, if it was decided.
pub async fn fetch_one<'e>(
    executor: impl PgExecutor<'e>,
    id: TransactionId,
) -> sqlx::Result<Option<StoredTransaction>> {
    sqlx::query_as(select_transactions_where!("id = $1"))
        .bind(id.0)
        .fetch_optional(executor)
        .await
}

/// A buyer's decided transactions, newest first (by id: UUIDv7, acceptance order), only those
/// older than `before` if given, at most `limit` of them: one page of the buyer's history
/// (index `transactions_user_id_id`).
pub async fn fetch_of_user<'e>(
    executor: impl PgExecutor<'e>,
    user: UserId,
    before: Option<TransactionId>,
    limit: i64,
) -> sqlx::Result<Vec<StoredTransaction>> {
    sqlx::query_as(select_transactions_where!(
        "user_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
    ))
    .bind(user.get())
    .bind(before.map(|id| id.0))
    .bind(limit)
    .fetch_all(executor)
    .await
}

/// The columns of `transactions` rows to insert, and of the `transaction_items` rows of those
/// that are orders of several lines, as arrays for `UNNEST`.
#[derive(Debug, Default)]
pub struct RowColumns {
    pub ids: Vec<Uuid>,
    pub user_ids: Vec<i64>,
    /// `None` for an order of several lines.
    pub product_ids: Vec<Option<i64>>,
    pub quantities: Vec<Option<i64>>,
    pub created_at: Vec<DateTime<Utc>>,
    /// The lines of the orders of several lines: transaction id, position, product, quantity.
    pub items: ItemColumns,
}

/// `transaction_items` rows, as arrays for `UNNEST`.
#[derive(Debug, Default)]
pub struct ItemColumns {
    pub transaction_ids: Vec<Uuid>,
    pub positions: Vec<i16>,
    pub product_ids: Vec<i64>,
    pub quantities: Vec<i64>,
}

impl RowColumns {
    /// Adds `order`: its one line in the row, or its lines as items.
    pub fn push(&mut self, order: &Order) {
        self.ids.push(order.transaction_id.0);
        self.user_ids.push(order.user_id.get());
        self.created_at.push(order.created_at);
        match order.lines.single() {
            Some(line) => {
                self.product_ids.push(Some(line.product_id.get()));
                self.quantities.push(Some(line.quantity.get()));
            }
            None => {
                self.product_ids.push(None);
                self.quantities.push(None);
                self.items.push(order);
            }
        }
    }
}

impl ItemColumns {
    /// Adds the lines of `order`, an order of several lines.
    pub fn push(&mut self, order: &Order) {
        for (position, line) in order.lines.iter().enumerate() {
            self.transaction_ids.push(order.transaction_id.0);
            self.positions
                .push(i16::try_from(position).expect("an order has at most 20 lines"));
            self.product_ids.push(line.product_id.get());
            self.quantities.push(line.quantity.get());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.transaction_ids.is_empty()
    }
}

/// Records each of `requests` as rejected (`not_accepted`) unless it was decided already, in
/// one statement (with the lines of orders of several products), and says for each which (in
/// the order of `requests`).
///
/// The API calls this when it answers 503 for the requests of a message the broker may have
/// stored anyway (the confirm timed out or the connection dropped after sending). The primary
/// key on the transaction id arbitrates between this and a worker deciding the same request:
/// whichever row is committed first stands. If this one does, a worker that later receives the
/// message finds a stored outcome and replays it, so the refused request can never take stock.
/// If a worker was first, the request was taken after all.
pub async fn withdraw<'e>(
    executor: impl PgExecutor<'e>,
    requests: &[Order],
    partition: crate::PartitionId,
    at: DateTime<Utc>,
) -> sqlx::Result<Vec<Withdrawal>> {
    let mut rows = RowColumns::default();
    for request in requests {
        rows.push(request);
    }
    // One statement: the rows, and the lines of those withdrawn here (the items' foreign key
    // is checked at the end of the statement, when the rows exist).
    let withdrawn: Vec<Uuid> = sqlx::query_scalar(
        "WITH withdrawn AS ( \
           INSERT INTO transactions (id, user_id, product_id, quantity, created_at, status, \
                                     reason, partition, decided_at) \
           SELECT u.*, 'rejected', $6, $7, $8 \
           FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[]) AS u \
           ON CONFLICT (id) DO NOTHING RETURNING id), \
         items AS ( \
           INSERT INTO transaction_items (transaction_id, position, product_id, quantity) \
           SELECT i.* FROM UNNEST($9::uuid[], $10::smallint[], $11::bigint[], $12::bigint[]) \
             AS i(transaction_id, position, product_id, quantity) \
           WHERE i.transaction_id IN (SELECT id FROM withdrawn)) \
         SELECT id FROM withdrawn",
    )
    .bind(&rows.ids)
    .bind(&rows.user_ids)
    .bind(&rows.product_ids)
    .bind(&rows.quantities)
    .bind(&rows.created_at)
    .bind(crate::RejectReason::NotAccepted.as_str())
    .bind(i32::from(partition.0))
    .bind(at)
    .bind(&rows.items.transaction_ids)
    .bind(&rows.items.positions)
    .bind(&rows.items.product_ids)
    .bind(&rows.items.quantities)
    .fetch_all(executor)
    .await?;
    let withdrawn: std::collections::HashSet<Uuid> = withdrawn.into_iter().collect();
    Ok(rows
        .ids
        .iter()
        .map(|id| {
            if withdrawn.contains(id) {
                Withdrawal::Withdrawn
            } else {
                Withdrawal::AlreadyDecided
            }
        })
        .collect())
}

/// What [`withdraw`] found for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// The request is now recorded as not accepted; no worker will ever sell it.
    Withdrawn,
    /// A worker decided it first: the broker had stored it, so it was accepted after all.
    AlreadyDecided,
}
