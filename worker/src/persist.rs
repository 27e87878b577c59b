//! All of the worker's SQL. The statements of a group of batches (one per partition, see
//! [`crate::group`]) run in one PostgreSQL transaction, which [`crate::decider`] opens and
//! commits around the pure core: lock the holds its commands name, the product rows (with their
//! limits, windows and pauses) and the slot rows, load the buyers' units of limited products and
//! the outcomes already stored for the transaction ids and command ids, (decide), reserve order
//! numbers, write stock, slots, buyers' units, outcomes (and the lines of orders of several
//! products), the holds settled, the commands and dead letters. Nothing of a batch is visible
//! unless all of it is. A batch that uses none of limits, pauses, orders of several products,
//! holds or slots runs the statements it ran before they existed.
//!
//! **The lock order**, the same for every decider, so that two of them never deadlock: the
//! holds (transactions) a batch's commands name, by id; then products, by id; then the shares of
//! products spread over several partitions, by (product, shard); then slots, by id; then the
//! day's counter row. Staff's changes take one product or slot row each (and, for a product
//! with shares, all its shares after it).
//!
//! A product with shares is locked like an intention lock over them: `FOR SHARE` by a batch
//! that decides it from some of its shares (several partitions at once), `FOR UPDATE` by
//! whatever needs all of the product (staff's changes, holds, orders of several products). So
//! whoever holds the product row for update holds its shares alone, and locks them after it
//! without ever waiting (see [`lock_products`]).
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

use crate::core::{Decided, Escalation, Rules, ShareMode, Shares, Slot};
use allot_shared::stored::{self, ItemColumns, RowColumns, StoredTransaction};
use allot_shared::{
    Command, CommandId, CommandKind, CommandOutcome, Order, Outcome, PartitionId, ProductId,
    RejectReason, Shard, SlotId, Status, TransactionId, UserId,
};
use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// The batch's products, locked: their stock, held units, and the rules of those that have any.
#[derive(Debug, Default)]
pub struct Locked {
    /// Units for sale of every existing product the batch names.
    pub stock: HashMap<ProductId, i64>,
    /// Units held by open holds, of those products that have any.
    pub held: HashMap<ProductId, i64>,
    /// Limits, sale windows and pauses of the products that have any.
    pub rules: HashMap<ProductId, Rules>,
    /// The shares of the products spread over several partitions, as locked.
    pub shares: HashMap<ProductId, Shares>,
    /// Set when a product was found not to be what the batch's plan took it for (share-locked,
    /// but it has no shares, or a per-buyer limit): nothing is decided, the batch is tried
    /// again with the product locked for update.
    pub escalation: Option<Escalation>,
}

/// Which of a sharded product's shares a batch locks, with the product row `FOR SHARE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareLock {
    /// These shards' shares ([`ShareMode::Own`]).
    Own(BTreeSet<Shard>),
    /// Every share ([`ShareMode::Pooled`]).
    Pooled,
}

/// A product row as [`lock_products`] reads it.
type ProductRow = (
    i64,
    i64,
    i64,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i32,
);

/// The columns of [`ProductRow`].
macro_rules! product_row {
    () => {
        "id, stock, held, max_per_buyer, sale_starts_at, sale_ends_at, paused_at, \
         last_resumed_at, shards"
    };
}

/// Locks the transactions the batch's commands name (`FOR UPDATE`, in id order: the first
/// locks a batch takes, see the module documentation) and returns their rows. No statement
/// when the batch has no command.
pub async fn lock_holds(
    conn: &mut PgConnection,
    commands: &[&Command],
) -> anyhow::Result<HashMap<TransactionId, StoredTransaction>> {
    if commands.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = commands
        .iter()
        .map(|command| command.transaction_id.0)
        .collect::<BTreeSet<Uuid>>()
        .into_iter()
        .collect();
    Ok(stored::lock_many(&mut *conn, &ids)
        .await
        .context("failed to lock the holds the batch's commands name")?
        .into_iter()
        .map(|row| (TransactionId(row.id), row))
        .collect())
}

/// Locks `product_ids` (in id order, so two lockers cannot deadlock, whichever partitions their
/// orders came from) and returns their stock, held units, rules and shares. A product missing
/// from the result does not exist. `orders` are the batch's orders, whose acceptance times say
/// which closed pauses matter. The products of `share_locks` are locked `FOR SHARE` (in the same
/// ordered statement), with the shares asked for; every other product `FOR UPDATE`, with all
/// its shares if it has any (locked after the products: whoever holds a product row for update
/// holds its shares alone, so this never waits).
///
/// The closed pauses of a product are read only when an order of the batch was accepted
/// before the product's latest resume (`last_resumed_at`): the one case where one can cover
/// it. A batch without such requests, products with shares or share locks costs the one
/// statement it cost before rules existed.
pub async fn lock_products(
    conn: &mut PgConnection,
    product_ids: &BTreeSet<i64>,
    orders: &[&Order],
    share_locks: &BTreeMap<i64, ShareLock>,
) -> anyhow::Result<Locked> {
    let product_ids: Vec<i64> = product_ids.iter().copied().collect();
    let rows: Vec<ProductRow> = if share_locks.is_empty() {
        sqlx::query_as(concat!(
            "SELECT ",
            product_row!(),
            " FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(&product_ids)
        .persistent(false)
        .fetch_all(&mut *conn)
        .await
    } else {
        // One row lock after the other, in id order, each in its own mode: a nested loop over
        // the ids (a lateral subquery with a row lock is never flattened).
        let shared: Vec<bool> = product_ids
            .iter()
            .map(|id| share_locks.contains_key(id))
            .collect();
        sqlx::query_as(concat!(
            "SELECT l.* FROM UNNEST($1::bigint[], $2::bool[]) WITH ORDINALITY AS t(id, shared, n) \
             CROSS JOIN LATERAL ( \
               SELECT * FROM (SELECT ",
            product_row!(),
            " FROM products p WHERE p.id = t.id AND NOT t.shared FOR UPDATE) x \
               UNION ALL \
               SELECT * FROM (SELECT ",
            product_row!(),
            " FROM products p WHERE p.id = t.id AND t.shared FOR SHARE) y) l \
             ORDER BY t.n"
        ))
        .bind(&product_ids)
        .bind(&shared)
        .persistent(false)
        .fetch_all(&mut *conn)
        .await
    }
    .context("failed to lock the batch's products")?;
    let mut locked = Locked::default();
    let mut resumed: HashMap<ProductId, DateTime<Utc>> = HashMap::new();
    // Products with shares, and how they are held.
    let mut sharded: Vec<(ProductId, i32, ShareMode)> = Vec::new();
    for (id, units, held, max_per_buyer, starts_at, ends_at, paused_since, last_resumed, shards) in
        rows
    {
        let id = ProductId::try_from(id).map_err(anyhow::Error::msg)?;
        let mode = match share_locks.get(&id.get()) {
            None => ShareMode::Exclusive,
            Some(ShareLock::Own(_)) => ShareMode::Own,
            Some(ShareLock::Pooled) => ShareMode::Pooled,
        };
        if mode != ShareMode::Exclusive && shards <= 1 && locked.escalation.is_none() {
            // Share-locked, but its stock is on its own row (shards went back to 1).
            locked.escalation = Some(Escalation {
                product: id,
                mode: ShareMode::Exclusive,
            });
        }
        if shards > 1 {
            sharded.push((id, shards, mode));
        }
        locked.stock.insert(id, units);
        if held != 0 {
            locked.held.insert(id, held);
        }
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
    if locked.escalation.is_some() {
        return Ok(locked); // decided again, locked otherwise
    }
    if !sharded.is_empty() {
        locked.shares = lock_shares(&mut *conn, &sharded, share_locks).await?;
    }
    if resumed.is_empty() {
        return Ok(locked); // no product of the batch was ever resumed: no closed pause
    }
    // Requests accepted before their product's latest resume: a closed pause may cover them.
    let mut earliest: Option<DateTime<Utc>> = None;
    let mut paused_products = BTreeSet::new();
    for order in orders.iter() {
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

/// Locks the shares of `sharded` (products with shares, with their shard count and how the batch
/// holds them: its own shards' shares, or all), `FOR UPDATE` in (product, shard) order, in one
/// statement, and returns them.
///
/// A statement of its own, after the products' locks are held: its snapshot is taken then, so
/// it sees the shares as the last change of the product left them. Staff's restocks and changes
/// of `shards` delete and insert share rows under the product row's update lock; a statement that
/// locked the product row and scanned the shares at once would scan them with the snapshot it
/// took before waiting for that lock, find the deleted rows gone and miss the inserted ones, and
/// decide from shares that are not there (the integration tests caught exactly that).
async fn lock_shares(
    conn: &mut PgConnection,
    sharded: &[(ProductId, i32, ShareMode)],
    share_locks: &BTreeMap<i64, ShareLock>,
) -> anyhow::Result<HashMap<ProductId, Shares>> {
    let mut all = Vec::new();
    let (mut own_products, mut own_shards) = (Vec::new(), Vec::new());
    for &(product, shards, mode) in sharded {
        match share_locks.get(&product.get()) {
            Some(ShareLock::Own(own)) if mode == ShareMode::Own => {
                for shard in own.iter().filter(|shard| i32::from(shard.0) < shards) {
                    own_products.push(product.get());
                    own_shards.push(i32::from(shard.0));
                }
            }
            _ => all.push(product.get()),
        }
    }
    let rows: Vec<(i64, i32, i64)> = sqlx::query_as(
        "SELECT product_id, shard, stock FROM product_shares \
         WHERE product_id = ANY($1) \
            OR (product_id, shard) IN (SELECT * FROM UNNEST($2::bigint[], $3::integer[])) \
         ORDER BY product_id, shard FOR UPDATE",
    )
    .bind(&all)
    .bind(&own_products)
    .bind(&own_shards)
    .persistent(false)
    .fetch_all(&mut *conn)
    .await
    .context("failed to lock the batch's shares")?;
    let mut shares: HashMap<ProductId, Shares> = sharded
        .iter()
        .map(|&(product, _, mode)| {
            let units = BTreeMap::new();
            (product, Shares { mode, units })
        })
        .collect();
    for (product, shard, units) in rows {
        let product = ProductId::try_from(product).map_err(anyhow::Error::msg)?;
        let shard = Shard(u16::try_from(shard).context("a shard out of range")?);
        if let Some(held) = shares.get_mut(&product) {
            held.units.insert(shard, units);
        }
    }
    Ok(shares)
}

/// Writes the shares whose units changed (the rows are locked: absolute values are safe). No
/// statement when none did.
pub async fn write_shares(
    conn: &mut PgConnection,
    before: &HashMap<ProductId, Shares>,
    after: &HashMap<ProductId, Shares>,
) -> anyhow::Result<()> {
    let (mut products, mut shards, mut units) = (Vec::new(), Vec::new(), Vec::new());
    for (product, shares) in after {
        let was = before.get(product).map(|shares| &shares.units);
        for (shard, &now) in &shares.units {
            if was.and_then(|was| was.get(shard)) != Some(&now) {
                products.push(product.get());
                shards.push(i32::from(shard.0));
                units.push(now);
            }
        }
    }
    if products.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE product_shares AS s SET stock = v.stock \
         FROM UNNEST($1::bigint[], $2::integer[], $3::bigint[]) AS v(product_id, shard, stock) \
         WHERE s.product_id = v.product_id AND s.shard = v.shard",
    )
    .bind(&products)
    .bind(&shards)
    .bind(&units)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to write the shares")?;
    Ok(())
}

/// A slot row as [`lock_slots`] reads it: id, capacity, taken, held, end.
type SlotRow = (i64, i64, i64, i64, Option<DateTime<Utc>>);

/// Locks the slots the batch names (`FOR UPDATE`, in id order, after the products) and returns
/// them. A slot missing from the result does not exist. No statement when the batch names none.
pub async fn lock_slots(
    conn: &mut PgConnection,
    slot_ids: &BTreeSet<i64>,
) -> anyhow::Result<HashMap<SlotId, Slot>> {
    if slot_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = slot_ids.iter().copied().collect();
    let rows: Vec<SlotRow> = sqlx::query_as(
        "SELECT id, capacity, taken, held, ends_at FROM slots WHERE id = ANY($1) \
         ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .persistent(false)
    .fetch_all(&mut *conn)
    .await
    .context("failed to lock the batch's slots")?;
    rows.into_iter()
        .map(|(id, capacity, taken, held, ends_at)| {
            Ok((
                SlotId::try_from(id).map_err(anyhow::Error::msg)?,
                Slot {
                    capacity,
                    taken,
                    held,
                    ends_at,
                },
            ))
        })
        .collect()
}

/// Writes the slots whose places changed (the rows are locked: absolute values are safe). No
/// statement when none did.
pub async fn write_slots(
    conn: &mut PgConnection,
    before: &HashMap<SlotId, Slot>,
    after: &HashMap<SlotId, Slot>,
) -> anyhow::Result<()> {
    let mut ids = Vec::new();
    let mut taken = Vec::new();
    let mut held = Vec::new();
    for (id, slot) in after {
        if before.get(id) != Some(slot) {
            ids.push(id.get());
            taken.push(slot.taken);
            held.push(slot.held);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE slots AS s SET taken = v.taken, held = v.held \
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS v(id, taken, held) \
         WHERE s.id = v.id",
    )
    .bind(&ids)
    .bind(&taken)
    .bind(&held)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to write the slots")?;
    Ok(())
}

/// The units each of `buyers` (product, buyer pairs of the batch's orders and holds) has
/// succeeded with or holds, of the products with a `max_per_buyer` (read under their row
/// locks, which [`lock_products`] took). No statement when the batch has no limited product.
pub async fn buyer_units(
    conn: &mut PgConnection,
    rules: &HashMap<ProductId, Rules>,
    buyers: impl IntoIterator<Item = (ProductId, UserId)>,
) -> anyhow::Result<HashMap<(ProductId, UserId), i64>> {
    if rules.is_empty() {
        return Ok(HashMap::new());
    }
    let pairs: BTreeSet<(i64, i64)> = buyers
        .into_iter()
        .filter(|(product, _)| {
            rules
                .get(product)
                .is_some_and(|rules| rules.max_per_buyer.is_some())
        })
        .map(|(product, user)| (product.get(), user.get()))
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

/// Writes the buyers' units that changed (new sales and holds of limited products, holds
/// released); a buyer left with none loses the row. The product rows are locked, so writing
/// absolute values is safe.
pub async fn write_buyer_units(
    conn: &mut PgConnection,
    before: &HashMap<(ProductId, UserId), i64>,
    after: &HashMap<(ProductId, UserId), i64>,
) -> anyhow::Result<()> {
    let mut products = Vec::new();
    let mut users = Vec::new();
    let mut units = Vec::new();
    let mut gone_products = Vec::new();
    let mut gone_users = Vec::new();
    for (&(product, user), &now) in after {
        if before.get(&(product, user)).copied().unwrap_or(0) == now {
            continue;
        }
        if now > 0 {
            products.push(product.get());
            users.push(user.get());
            units.push(now);
        } else {
            gone_products.push(product.get());
            gone_users.push(user.get());
        }
    }
    if !gone_products.is_empty() {
        sqlx::query(
            "DELETE FROM buyer_units b USING UNNEST($1::bigint[], $2::bigint[]) AS g(product_id, user_id) \
             WHERE b.product_id = g.product_id AND b.user_id = g.user_id",
        )
        .bind(&gone_products)
        .bind(&gone_users)
        .persistent(false)
        .execute(&mut *conn)
        .await
        .context("failed to remove the buyers' units released")?;
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
    orders: &[&Order],
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

/// What the batch's commands were decided as before (or withdrawn as by the API), of the
/// checkouts and cancels (the sweeper's expiries are not recorded). No statement without such
/// commands.
pub async fn stored_commands(
    conn: &mut PgConnection,
    commands: &[&Command],
) -> anyhow::Result<HashMap<CommandId, CommandOutcome>> {
    let ids: Vec<Uuid> = commands
        .iter()
        .filter(|command| command.kind != CommandKind::Expire)
        .map(|command| command.command_id.0)
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT command_id, outcome FROM hold_commands WHERE command_id = ANY($1)")
            .bind(&ids)
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .context("failed to load the commands decided before")?;
    rows.into_iter()
        .map(|(id, outcome)| Ok((CommandId(id), outcome.parse().map_err(anyhow::Error::msg)?)))
        .collect()
}

/// Writes the new stock (and held units) of every product the batch changed. The rows are
/// locked, so writing absolute values is safe. A batch that changed no product's held units
/// runs the statement it ran before holds existed.
pub async fn write_stock(
    conn: &mut PgConnection,
    before: (&HashMap<ProductId, i64>, &HashMap<ProductId, i64>),
    after: (&HashMap<ProductId, i64>, &HashMap<ProductId, i64>),
) -> anyhow::Result<()> {
    let (stock_before, held_before) = before;
    let (stock_after, held_after) = after;
    let held_of = |map: &HashMap<ProductId, i64>, id: &ProductId| map.get(id).copied().unwrap_or(0);
    let held_changed = held_after
        .keys()
        .chain(held_before.keys())
        .any(|id| held_of(held_before, id) != held_of(held_after, id));
    if held_changed {
        let mut ids = Vec::new();
        let mut stock = Vec::new();
        let mut held = Vec::new();
        for (id, units) in stock_after {
            if stock_before.get(id) != Some(units)
                || held_of(held_before, id) != held_of(held_after, id)
            {
                ids.push(id.get());
                stock.push(*units);
                held.push(held_of(held_after, id));
            }
        }
        sqlx::query(
            "UPDATE products AS p SET stock = v.stock, held = v.held \
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS v(id, stock, held) \
             WHERE p.id = v.id",
        )
        .bind(&ids)
        .bind(&stock)
        .bind(&held)
        .persistent(false)
        .execute(conn)
        .await
        .context("failed to write stock and held units")?;
        return Ok(());
    }
    let (ids, stock): (Vec<i64>, Vec<i64>) = stock_after
        .iter()
        .filter(|(id, units)| stock_before.get(id) != Some(units))
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
/// second time. Rows of holds, of orders for a slot or refused for one are written by a
/// statement with those columns; a batch without any runs the statement it ran before them.
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
    let extended = rows.rows.any_hold_or_slot || rows.reason_slot_ids.iter().any(Option::is_some);
    if extended {
        sqlx::query(
            "INSERT INTO transactions (id, user_id, product_id, quantity, status, reason, \
                                       reason_product_id, order_day, order_seq, created_at, \
                                       partition, hold_seconds, expires_at, slot_id, \
                                       reason_slot_id, decided_at) \
             SELECT u.*, $16 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], \
                                         $5::text[], $6::text[], $7::bigint[], $8::date[], \
                                         $9::bigint[], $10::timestamptz[], $11::integer[], \
                                         $12::integer[], $13::timestamptz[], $14::bigint[], \
                                         $15::bigint[]) AS u",
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
        .bind(&rows.rows.hold_seconds)
        .bind(&rows.expires_at)
        .bind(&rows.rows.slot_ids)
        .bind(&rows.reason_slot_ids)
        .bind(decided_at)
        .persistent(false)
        .execute(&mut *conn)
        .await
        .context("failed to insert outcomes")?;
    } else {
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
    }
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
    /// Ids, buyers, lines, acceptance times, holds and slots asked for.
    rows: RowColumns,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    reason_product_ids: Vec<Option<i64>>,
    reason_slot_ids: Vec<Option<i64>>,
    order_days: Vec<Option<NaiveDate>>,
    order_seqs: Vec<Option<i64>>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    partitions: Vec<i32>,
}

/// A new status's columns: status, reason, product and slot named, number, expiry.
type OutcomeColumns = (
    &'static str,
    Option<&'static str>,
    Option<i64>,
    Option<i64>,
    Option<NaiveDate>,
    Option<i64>,
    Option<DateTime<Utc>>,
);

fn outcome_columns(outcome: Outcome) -> OutcomeColumns {
    match outcome {
        Outcome::Succeeded(number) => (
            Status::Succeeded.as_str(),
            None,
            None,
            None,
            Some(number.day),
            Some(number.seq),
            None,
        ),
        Outcome::Rejected(rejection) => (
            Status::Rejected.as_str(),
            Some(rejection.reason.as_str()),
            rejection.product.map(ProductId::get),
            rejection.slot.map(SlotId::get),
            None,
            None,
            None,
        ),
        Outcome::Held { expires_at } => (
            Status::Held.as_str(),
            None,
            None,
            None,
            None,
            None,
            Some(expires_at),
        ),
    }
}

impl TransactionColumns {
    fn push(&mut self, partition: PartitionId, order: &Order, outcome: Outcome) {
        self.partitions.push(i32::from(partition.0));
        self.rows.push(order);
        let (status, reason, product, slot, day, seq, expires_at) = outcome_columns(outcome);
        self.statuses.push(status);
        self.reasons.push(reason);
        self.reason_product_ids.push(product);
        self.reason_slot_ids.push(slot);
        self.order_days.push(day);
        self.order_seqs.push(seq);
        self.expires_at.push(expires_at);
    }
}

/// Settles holds: each `(hold, its new outcome)` becomes `succeeded` (numbered) or `rejected`
/// (`cancelled`, `expired`), decided at `decided_at`, in one statement. Only a row that is
/// still held changes (the rows are locked, or were inserted held by this batch); fewer rows
/// changed than asked is an error, and the batch rolls back.
pub async fn settle_holds(
    conn: &mut PgConnection,
    settled: &[(TransactionId, Outcome)],
    decided_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    if settled.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(settled.len());
    let mut statuses = Vec::with_capacity(settled.len());
    let mut reasons = Vec::with_capacity(settled.len());
    let mut days = Vec::with_capacity(settled.len());
    let mut seqs = Vec::with_capacity(settled.len());
    for &(id, outcome) in settled {
        let (status, reason, _, _, day, seq, _) = outcome_columns(outcome);
        ids.push(id.0);
        statuses.push(status);
        reasons.push(reason);
        days.push(day);
        seqs.push(seq);
    }
    let changed = sqlx::query(
        "UPDATE transactions AS t SET status = v.status, reason = v.reason, \
                order_day = v.order_day, order_seq = v.order_seq, decided_at = $6 \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::date[], $5::bigint[]) \
           AS v(id, status, reason, order_day, order_seq) \
         WHERE t.id = v.id AND t.status = 'held'",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&days)
    .bind(&seqs)
    .bind(decided_at)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to settle holds")?
    .rows_affected();
    anyhow::ensure!(
        changed == settled.len() as u64,
        "settled {changed} of {} holds: a hold changed under its lock",
        settled.len()
    );
    Ok(())
}

/// Records what the batch's checkouts and cancels did (`fresh` ones; the sweeper's expiries
/// are not recorded), one row per command id, in one statement. A command naming no stored
/// transaction is not recorded (nothing to point at; it did nothing). No `ON CONFLICT`: a
/// command id stored meanwhile (the API withdrew it, or another decider decided it) rolls the
/// batch back, and its retry replays what stands.
pub async fn insert_commands(
    conn: &mut PgConnection,
    commands: &[(&Command, CommandOutcome)],
    decided_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let recorded: Vec<&(&Command, CommandOutcome)> = commands
        .iter()
        .filter(|(command, _)| command.kind != CommandKind::Expire)
        .collect();
    if recorded.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = recorded.iter().map(|(c, _)| c.command_id.0).collect();
    let holds: Vec<Uuid> = recorded.iter().map(|(c, _)| c.transaction_id.0).collect();
    let kinds: Vec<&str> = recorded.iter().map(|(c, _)| c.kind.as_str()).collect();
    let outcomes: Vec<&str> = recorded.iter().map(|(_, o)| o.as_str()).collect();
    let created: Vec<DateTime<Utc>> = recorded.iter().map(|(c, _)| c.created_at).collect();
    sqlx::query(
        "INSERT INTO hold_commands (command_id, transaction_id, kind, outcome, created_at, \
                                    decided_at) \
         SELECT u.*, $6 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], \
                                    $5::timestamptz[]) AS u(command_id, transaction_id, kind, \
                                    outcome, created_at) \
         WHERE EXISTS (SELECT 1 FROM transactions t WHERE t.id = u.transaction_id)",
    )
    .bind(&ids)
    .bind(&holds)
    .bind(&kinds)
    .bind(&outcomes)
    .bind(&created)
    .bind(decided_at)
    .persistent(false)
    .execute(conn)
    .await
    .context("failed to record the commands")?;
    Ok(())
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
                                     partition, created_at, decided_at, hold_seconds, slot_id) \
           VALUES ($1, $2, $3, $4, 'rejected', $5, $6, $7, $8, $13, $14) \
           ON CONFLICT (id) DO NOTHING \
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
    .bind(rows.hold_seconds[0])
    .bind(rows.slot_ids[0])
    .execute(&mut *conn)
    .await
    .context("failed to record an unprocessable transaction as rejected")?;
    stored::fetch_one(&mut *conn, order.transaction_id)
        .await
        .context("failed to read back an unprocessable transaction")?
        .context("an unprocessable transaction vanished")
}
