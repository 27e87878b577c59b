//! Decided transactions as PostgreSQL stores them, and their conversion to the client view.
//! The worker reads them to replay earlier outcomes; the API reads them when Redis has no
//! status.
//!
//! A transaction of one line keeps it in `transactions.product_id` and `.quantity`; an order of
//! several lines has both `NULL` and its lines in `transaction_items`. The view
//! `transaction_lines` gives every transaction's lines either way (one row per line), and
//! [`StoredTransaction::lines`] does the same for a loaded row.

use crate::ids::{CommandId, HoldSeconds, ProductId, Quantity, SlotId, TransactionId, UserId};
use crate::message::{Command, Line, Order};
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
    /// The hold asked for (hold requests only).
    pub hold_seconds: Option<i32>,
    /// When the hold ends by itself (set once it was granted).
    pub expires_at: Option<DateTime<Utc>>,
    /// The slot the order takes a place of.
    pub slot_id: Option<i64>,
    /// The slot a rejection names.
    pub reason_slot_id: Option<i64>,
}

/// `SELECT`s every column of [`StoredTransaction`], with the given `WHERE` clause. The lines of
/// an order of several products are read only for such rows (the `CASE`), so reading
/// one-line transactions costs what it did before orders had lines.
macro_rules! select_transactions_where {
    ($condition:literal) => {
        concat!(
            "SELECT id, user_id, product_id, quantity, status, reason, reason_product_id, ",
            "order_day, order_seq, created_at, decided_at, hold_seconds, expires_at, slot_id, ",
            "reason_slot_id, ",
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
                slot: self
                    .reason_slot_id
                    .map(|id| SlotId::try_from(id).map_err(anyhow::Error::msg))
                    .transpose()?,
            })),
            ("held", None, None, None) if self.expires_at.is_some() => Ok(Outcome::Held {
                expires_at: self.expires_at.expect("checked"),
            }),
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
            reason_slot_id: None,
            slot_id: self.slot()?,
            hold_seconds: self.hold()?,
            expires_at: self.expires_at,
            created_at: self.created_at,
            decided_at: Some(self.decided_at),
        };
        view.set_outcome(self.outcome()?);
        Ok(view)
    }

    /// The slot the order takes a place of, if any.
    pub fn slot(&self) -> anyhow::Result<Option<SlotId>> {
        self.slot_id
            .map(|id| SlotId::try_from(id).map_err(anyhow::Error::msg))
            .transpose()
            .with_context(|| format!("transaction {} has an invalid stored slot_id", self.id))
    }

    /// The hold asked for, if any.
    pub fn hold(&self) -> anyhow::Result<Option<HoldSeconds>> {
        self.hold_seconds
            .map(|secs| HoldSeconds::try_from(i64::from(secs)).map_err(anyhow::Error::msg))
            .transpose()
            .with_context(|| format!("transaction {} has an invalid stored hold", self.id))
    }
}

/// Locks the rows of those of `ids` that were decided (`FOR UPDATE`, in id order) and returns
/// them: the holds a batch's commands name, locked before anything else the batch locks (see
/// the worker's `persist::lock_holds`).
pub async fn lock_many<'e>(
    executor: impl PgExecutor<'e>,
    ids: &[Uuid],
) -> sqlx::Result<Vec<StoredTransaction>> {
    sqlx::query_as(select_transactions_where!(
        "id = ANY($1) ORDER BY id FOR UPDATE OF t"
    ))
    .bind(ids)
    .persistent(false)
    .fetch_all(executor)
    .await
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
    /// The hold each asked for, if any.
    pub hold_seconds: Vec<Option<i32>>,
    /// The slot of each, if any.
    pub slot_ids: Vec<Option<i64>>,
    /// Whether any row has a hold or a slot (else those two columns need not be written).
    pub any_hold_or_slot: bool,
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
        // The API allows at most ALLOT_MAX_HOLD_SECONDS (far below i32::MAX); a foreign message
        // asking for more is stored as the longest hold a row can say.
        let hold = order
            .hold
            .map(|secs| i32::try_from(secs.get()).unwrap_or(i32::MAX));
        self.hold_seconds.push(hold);
        self.slot_ids.push(order.slot.map(SlotId::get));
        self.any_hold_or_slot |= order.hold.is_some() || order.slot.is_some();
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
           INSERT INTO transactions (id, user_id, product_id, quantity, created_at, \
                                     hold_seconds, slot_id, status, reason, partition, decided_at) \
           SELECT u.*, 'rejected', $6, $7, $8 \
           FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[], \
                       $13::integer[], $14::bigint[]) AS u \
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
    .bind(&rows.hold_seconds)
    .bind(&rows.slot_ids)
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

/// Records each of `commands` (checkouts and cancels the API could not get confirmed) as
/// withdrawn unless a worker decided it first, and says for each what stands: `Withdrawn`, or
/// the outcome the worker gave it (the primary key on the command id arbitrates, as
/// [`withdraw`] does for requests). A withdrawn command that reaches a worker later does
/// nothing.
pub async fn withdraw_commands(
    pool: &sqlx::PgPool,
    commands: &[Command],
    at: DateTime<Utc>,
) -> sqlx::Result<Vec<crate::CommandOutcome>> {
    let ids: Vec<Uuid> = commands.iter().map(|c| c.command_id.0).collect();
    let holds: Vec<Uuid> = commands.iter().map(|c| c.transaction_id.0).collect();
    let kinds: Vec<&str> = commands.iter().map(|c| c.kind.as_str()).collect();
    let created: Vec<DateTime<Utc>> = commands.iter().map(|c| c.created_at).collect();
    let withdrawn: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO hold_commands (command_id, transaction_id, kind, outcome, created_at, \
                                    decided_at) \
         SELECT u.command_id, u.transaction_id, u.kind, 'withdrawn', u.created_at, $5 \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[]) \
           AS u(command_id, transaction_id, kind, created_at) \
         ON CONFLICT (command_id) DO NOTHING RETURNING command_id",
    )
    .bind(&ids)
    .bind(&holds)
    .bind(&kinds)
    .bind(&created)
    .bind(at)
    .fetch_all(pool)
    .await?;
    let withdrawn: std::collections::HashSet<Uuid> = withdrawn.into_iter().collect();
    // Those a worker decided first: read after the insert (which waited for the worker's
    // commit), in a statement of their own, so the worker's rows are seen.
    let decided: Vec<Uuid> = ids
        .iter()
        .filter(|id| !withdrawn.contains(id))
        .copied()
        .collect();
    let mut stands: std::collections::HashMap<Uuid, String> = std::collections::HashMap::new();
    if !decided.is_empty() {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT command_id, outcome FROM hold_commands WHERE command_id = ANY($1)",
        )
        .bind(&decided)
        .fetch_all(pool)
        .await?;
        stands.extend(rows);
    }
    Ok(ids
        .iter()
        .map(|id| {
            stands
                .get(id)
                .and_then(|outcome| outcome.parse().ok())
                .unwrap_or(crate::CommandOutcome::Withdrawn)
        })
        .collect())
}

/// What the worker did with a command, once it decided it (or the API withdrew it).
pub async fn command_outcome<'e>(
    executor: impl PgExecutor<'e>,
    command: CommandId,
) -> anyhow::Result<Option<crate::CommandOutcome>> {
    let outcome: Option<String> =
        sqlx::query_scalar("SELECT outcome FROM hold_commands WHERE command_id = $1")
            .bind(command.0)
            .fetch_optional(executor)
            .await
            .context("failed to read a command's outcome")?;
    outcome
        .map(|outcome| outcome.parse().map_err(|e| anyhow!("{e}")))
        .transpose()
}
