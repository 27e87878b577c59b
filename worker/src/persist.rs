//! All of the worker's SQL. The statements of a group of batches (one per partition, see
//! [`crate::group`]) run in one PostgreSQL transaction, which [`crate::decider`] opens and
//! commits around the pure core: lock the product rows (with their limits, windows and pauses),
//! load the buyers' units of limited products and the outcomes already stored for the
//! transaction ids, (decide), reserve order numbers, write stock, buyers' units, outcomes (and
//! the lines of orders of several products) and dead letters. Nothing of a batch is visible
//! unless all of it is. A batch that uses none of limits, pauses or orders of several products
//! runs the statements it ran before they existed.
//!
//! The set statements (`= ANY($1)`, `UNNEST`) run with `.persistent(false)`, planned for each
//! call: see the module documentation of `allot_shared::db`. Setting an item aside ([`insert_dead_letters`], [`reject_unprocessable`]) is the
//! other writer.
//!
//! Every write is idempotent: a redelivered batch finds its stored outcomes and writes no new
//! row (see [`insert_transactions`]), dead letters are keyed by their `message_id`, and a
//! rejection as `unprocessable` leaves a stored outcome as it is.
//!
//! Correctness does not rest on RabbitMQ handing a partition to one worker: product rows are
//! locked `FOR UPDATE` (so two deciders of the same product serialize, and restocks never lose
//! an update), the daily counter row is locked by its increment, and the primary key on the
//! transaction id refuses a second decision (the loser's transaction rolls back and its batch
//! is retried, when it finds and replays the winner's outcome).

use crate::core::{Decided, Rules};
use allot_shared::stored::{self, ItemColumns, RowColumns, StoredTransaction};
use allot_shared::{
    Order, Outcome, PartitionId, ProductId, RejectReason, Status, TransactionId, UserId,
};
use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

/// An item that could not be decided; it is recorded in `dead_letters`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The item's id (`<message_id>#<index>` for an envelope's item), its key in the table.
    pub message_id: Option<String>,
    pub body: Vec<u8>,
    /// Why: the parse error, or the database's error for an item that failed every time.
    pub error: String,
}

/// The batch's products, locked: their stock, and the rules of those that have any.
#[derive(Debug, Default)]
pub struct Locked {
    /// Units left of every existing product the batch asks for.
    pub stock: HashMap<ProductId, i64>,
    /// Limits, sale windows and pauses of the products that have any.
    pub rules: HashMap<ProductId, Rules>,
}

/// A product row as [`lock_products`] reads it.
type ProductRow = (
    i64,
    i64,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// Locks every product a line of the batch names (in id order, so two lockers cannot deadlock,
/// whichever partitions their orders came from) and returns their stock and rules. A product
/// missing from the result does not exist.
///
/// The closed pauses of a product are read only when a request of the batch was accepted
/// before the product's latest resume (`last_resumed_at`): the one case where one can cover
/// it. A batch without such requests costs the one statement it cost before rules existed.
pub async fn lock_products(conn: &mut PgConnection, orders: &[Order]) -> anyhow::Result<Locked> {
    let product_ids: Vec<i64> = orders
        .iter()
        .flat_map(|order| order.lines.iter().map(|line| line.product_id.get()))
        .collect::<BTreeSet<i64>>()
        .into_iter()
        .collect();
    let rows: Vec<ProductRow> = sqlx::query_as(
        "SELECT id, stock, max_per_buyer, sale_starts_at, sale_ends_at, paused_at, last_resumed_at \
         FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&product_ids)
    .persistent(false)
    .fetch_all(&mut *conn)
    .await
    .context("failed to lock the batch's products")?;
    let mut locked = Locked::default();
    let mut resumed: HashMap<ProductId, DateTime<Utc>> = HashMap::new();
    for (id, units, max_per_buyer, starts_at, ends_at, paused_since, last_resumed) in rows {
        let id = ProductId::try_from(id).map_err(anyhow::Error::msg)?;
        locked.stock.insert(id, units);
        let rules = Rules {
            max_per_buyer,
            sale: allot_shared::sale::Sale {
                starts_at,
                ends_at,
                paused_since,
                pauses: Vec::new(),
            },
        };
        if rules != Rules::default() {
            locked.rules.insert(id, rules);
        }
        if let Some(last_resumed) = last_resumed {
            resumed.insert(id, last_resumed);
        }
    }
    if resumed.is_empty() {
        return Ok(locked); // no product of the batch was ever resumed: no closed pause
    }
    // Requests accepted before their product's latest resume: a closed pause may cover them.
    let mut earliest: Option<DateTime<Utc>> = None;
    let mut paused_products = BTreeSet::new();
    for order in orders {
        for line in order.lines.iter() {
            if resumed
                .get(&line.product_id)
                .is_some_and(|&last| order.created_at < last)
            {
                paused_products.insert(line.product_id.get());
                earliest = Some(earliest.map_or(order.created_at, |e| e.min(order.created_at)));
            }
        }
    }
    if let Some(earliest) = earliest {
        let ids: Vec<i64> = paused_products.into_iter().collect();
        let pauses: Vec<(i64, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT product_id, paused_at, resumed_at FROM product_pauses \
             WHERE product_id = ANY($1) AND resumed_at > $2",
        )
        .bind(&ids)
        .bind(earliest)
        .persistent(false)
        .fetch_all(&mut *conn)
        .await
        .context("failed to load the products' closed pauses")?;
        for (id, paused, resumed) in pauses {
            let id = ProductId::try_from(id).map_err(anyhow::Error::msg)?;
            locked
                .rules
                .entry(id)
                .or_default()
                .sale
                .pauses
                .push((paused, resumed));
        }
    }
    Ok(locked)
}

/// The units each buyer of the batch has succeeded with, of the products with a
/// `max_per_buyer` (read under their row locks, which [`lock_products`] took). No statement
/// when the batch has no limited product.
pub async fn buyer_units(
    conn: &mut PgConnection,
    rules: &HashMap<ProductId, Rules>,
    orders: &[Order],
) -> anyhow::Result<HashMap<(ProductId, UserId), i64>> {
    if rules.is_empty() {
        return Ok(HashMap::new());
    }
    let pairs: BTreeSet<(i64, i64)> = orders
        .iter()
        .flat_map(|order| {
            order
                .lines
                .iter()
                .filter(|line| {
                    rules
                        .get(&line.product_id)
                        .is_some_and(|rules| rules.max_per_buyer.is_some())
                })
                .map(|line| (line.product_id.get(), order.user_id.get()))
        })
        .collect();
    if pairs.is_empty() {
        return Ok(HashMap::new());
    }
    let (products, users): (Vec<i64>, Vec<i64>) = pairs.into_iter().unzip();
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT b.product_id, b.user_id, b.units FROM buyer_units b \
         JOIN UNNEST($1::bigint[], $2::bigint[]) AS p(product_id, user_id) \
           ON b.product_id = p.product_id AND b.user_id = p.user_id",
    )
    .bind(&products)
    .bind(&users)
    .persistent(false)
    .fetch_all(&mut *conn)
    .await
    .context("failed to load the buyers' units")?;
    rows.into_iter()
        .map(|(product, user, units)| {
            Ok((
                (
                    ProductId::try_from(product).map_err(anyhow::Error::msg)?,
                    UserId::try_from(user).map_err(anyhow::Error::msg)?,
                ),
                units,
            ))
        })
        .collect()
}

/// Writes the buyers' units that changed (new sales of limited products). The product rows are
/// locked, so writing absolute values is safe.
pub async fn write_buyer_units(
    conn: &mut PgConnection,
    before: &HashMap<(ProductId, UserId), i64>,
    after: &HashMap<(ProductId, UserId), i64>,
) -> anyhow::Result<()> {
    let mut products = Vec::new();
    let mut users = Vec::new();
    let mut units = Vec::new();
    for (&(product, user), &now) in after {
        if before.get(&(product, user)) != Some(&now) {
            products.push(product.get());
            users.push(user.get());
            units.push(now);
        }
    }
    if products.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO buyer_units (product_id, user_id, units) \
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) \
         ON CONFLICT (product_id, user_id) DO UPDATE SET units = EXCLUDED.units",
    )
    .bind(&products)
    .bind(&users)
    .bind(&units)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to write the buyers' units")?;
    Ok(())
}

/// The rows already stored for the batch's transaction ids (decided by an earlier delivery of
/// the same request, or withdrawn by the API).
pub async fn stored_outcomes(
    conn: &mut PgConnection,
    orders: &[Order],
) -> anyhow::Result<HashMap<TransactionId, StoredTransaction>> {
    let ids: Vec<Uuid> = orders.iter().map(|r| r.transaction_id.0).collect();
    Ok(stored::fetch_many(&mut *conn, &ids)
        .await
        .context("failed to load stored outcomes")?
        .into_iter()
        .map(|row| (TransactionId(row.id), row))
        .collect())
}

/// Reserves `count` consecutive order numbers of `day` and returns the first. The counter row
/// stays locked until commit, so numbers are handed out gaplessly across all partitions; it is
/// taken last, to keep that lock short.
pub async fn reserve_order_numbers(
    conn: &mut PgConnection,
    day: NaiveDate,
    count: i64,
) -> anyhow::Result<i64> {
    if count == 0 {
        return Ok(1); // no new sale: nothing is numbered
    }
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO order_counters (day, last_seq) VALUES ($1, $2) \
         ON CONFLICT (day) DO UPDATE SET last_seq = order_counters.last_seq + EXCLUDED.last_seq \
         RETURNING last_seq",
    )
    .bind(day)
    .bind(count)
    .fetch_one(conn)
    .await
    .context("failed to reserve order numbers")?;
    Ok(last - count + 1)
}

/// Writes the new stock of every product the batch sold from. The rows are locked, so writing
/// absolute values is safe.
pub async fn write_stock(
    conn: &mut PgConnection,
    before: &HashMap<ProductId, i64>,
    after: &HashMap<ProductId, i64>,
) -> anyhow::Result<()> {
    let (ids, stock): (Vec<i64>, Vec<i64>) = after
        .iter()
        .filter(|(id, units)| before.get(id) != Some(units))
        .map(|(id, units)| (id.get(), *units))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE products AS p SET stock = v.stock \
         FROM UNNEST($1::bigint[], $2::bigint[]) AS v(id, stock) WHERE p.id = v.id",
    )
    .bind(&ids)
    .bind(&stock)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to write stock")?;
    Ok(())
}

/// Inserts the new outcomes (those [`Decided::fresh`]) of every batch of a group, given as
/// `(partition, order, decision)`, in one statement, and the lines of the orders of several
/// products in a second (only when there are any). No `ON CONFLICT`: a transaction id stored
/// meanwhile means another decider won a race for it (a split brain); the conflict rolls this
/// batch back, and its retry replays the winner's outcome instead of taking stock for it a
/// second time.
pub async fn insert_transactions<'a>(
    conn: &mut PgConnection,
    decided: impl IntoIterator<Item = (PartitionId, &'a Order, &'a Decided)>,
    decided_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let mut rows = TransactionColumns::default();
    for (partition, order, decision) in decided {
        if decision.fresh {
            rows.push(partition, order, decision.outcome);
        }
    }
    if rows.rows.ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO transactions (id, user_id, product_id, quantity, status, reason, \
                                   reason_product_id, order_day, order_seq, created_at, \
                                   partition, decided_at) \
         SELECT u.*, $12 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], \
                                     $5::text[], $6::text[], $7::bigint[], $8::date[], \
                                     $9::bigint[], $10::timestamptz[], $11::integer[]) AS u",
    )
    .bind(&rows.rows.ids)
    .bind(&rows.rows.user_ids)
    .bind(&rows.rows.product_ids)
    .bind(&rows.rows.quantities)
    .bind(&rows.statuses)
    .bind(&rows.reasons)
    .bind(&rows.reason_product_ids)
    .bind(&rows.order_days)
    .bind(&rows.order_seqs)
    .bind(&rows.rows.created_at)
    .bind(&rows.partitions)
    .bind(decided_at)
    .execute(&mut *conn)
    .await
    .context("failed to insert outcomes")?;
    insert_items(conn, &rows.rows.items).await
}

/// Inserts the lines of orders of several products (no statement if there are none).
async fn insert_items(conn: &mut PgConnection, items: &ItemColumns) -> anyhow::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO transaction_items (transaction_id, position, product_id, quantity) \
         SELECT * FROM UNNEST($1::uuid[], $2::smallint[], $3::bigint[], $4::bigint[])",
    )
    .bind(&items.transaction_ids)
    .bind(&items.positions)
    .bind(&items.product_ids)
    .bind(&items.quantities)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to insert the lines of orders")?;
    Ok(())
}

/// The columns of new `transactions` rows, as arrays for `UNNEST`.
#[derive(Default)]
struct TransactionColumns {
    /// Ids, buyers, lines, acceptance times.
    rows: RowColumns,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    reason_product_ids: Vec<Option<i64>>,
    order_days: Vec<Option<NaiveDate>>,
    order_seqs: Vec<Option<i64>>,
    partitions: Vec<i32>,
}

impl TransactionColumns {
    fn push(&mut self, partition: PartitionId, order: &Order, outcome: Outcome) {
        self.partitions.push(i32::from(partition.0));
        self.rows.push(order);
        match outcome {
            Outcome::Succeeded(number) => {
                self.statuses.push(Status::Succeeded.as_str());
                self.reasons.push(None);
                self.reason_product_ids.push(None);
                self.order_days.push(Some(number.day));
                self.order_seqs.push(Some(number.seq));
            }
            Outcome::Rejected(rejection) => {
                self.statuses.push(Status::Rejected.as_str());
                self.reasons.push(Some(rejection.reason.as_str()));
                self.reason_product_ids
                    .push(rejection.product.map(ProductId::get));
                self.order_days.push(None);
                self.order_seqs.push(None);
            }
        }
    }
}

/// Records dead letters; one already recorded under the same `message_id` (a redelivery) is
/// left as it is.
pub async fn insert_dead_letters(
    conn: &mut PgConnection,
    partition: PartitionId,
    dead_letters: &[DeadLetter],
) -> anyhow::Result<()> {
    for letter in dead_letters {
        sqlx::query(
            "INSERT INTO dead_letters (partition, message_id, body, error) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(i32::from(partition.0))
        .bind(&letter.message_id)
        .bind(&letter.body)
        .bind(&letter.error)
        .execute(&mut *conn)
        .await
        .context("failed to record a dead letter")?;
    }
    Ok(())
}

/// Records `order` as rejected (`unprocessable`) unless it was decided already, with its lines
/// if it has several, in one statement; returns the row that stands.
pub async fn reject_unprocessable(
    conn: &mut PgConnection,
    partition: PartitionId,
    order: &Order,
    decided_at: DateTime<Utc>,
) -> anyhow::Result<StoredTransaction> {
    let mut rows = RowColumns::default();
    rows.push(order);
    sqlx::query(
        "WITH rejected AS ( \
           INSERT INTO transactions (id, user_id, product_id, quantity, status, reason, \
                                     partition, created_at, decided_at) \
           VALUES ($1, $2, $3, $4, 'rejected', $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING \
           RETURNING id) \
         INSERT INTO transaction_items (transaction_id, position, product_id, quantity) \
         SELECT i.* FROM UNNEST($9::uuid[], $10::smallint[], $11::bigint[], $12::bigint[]) \
           AS i(transaction_id, position, product_id, quantity) \
         WHERE i.transaction_id IN (SELECT id FROM rejected)",
    )
    .bind(order.transaction_id.0)
    .bind(order.user_id.get())
    .bind(rows.product_ids[0])
    .bind(rows.quantities[0])
    .bind(RejectReason::Unprocessable.as_str())
    .bind(i32::from(partition.0))
    .bind(order.created_at)
    .bind(decided_at)
    .bind(&rows.items.transaction_ids)
    .bind(&rows.items.positions)
    .bind(&rows.items.product_ids)
    .bind(&rows.items.quantities)
    .execute(&mut *conn)
    .await
    .context("failed to record an unprocessable transaction as rejected")?;
    stored::fetch_one(&mut *conn, order.transaction_id)
        .await
        .context("failed to read back an unprocessable transaction")?
        .context("an unprocessable transaction vanished")
}
