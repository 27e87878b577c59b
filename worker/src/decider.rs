//! The steps of a batch, each idempotent: [`Decider::decide_and_commit`] (one PostgreSQL
//! transaction around the pure [`core`]), [`Decider::publish_statuses`] (Redis), and
//! [`Decider::set_aside`] for an item that fails every time. The consumer loop
//! ([`crate::consumer`]) runs them and acks after; tests drive [`Decider::process_batch`].
//!
//! Because every step is idempotent, a batch that failed anywhere (database down, Redis down,
//! a crash) is simply processed again: what was committed is found and replayed.

use crate::core::{
    self, CommandDecided, Decided, Decisions, Escalation, Hold, Numbered, PartitionState, ShareMode,
};
use crate::group::GroupCommit;
use crate::persist::{self, DeadLetter, ShareLock};
use crate::poison;
use crate::retry::{self, Failure};
use allot_shared::status_store::StatusStore;
use allot_shared::stored::StoredTransaction;
use allot_shared::{
    Clock, Command, CommandOutcome, Lines, Order, Outcome, PartitionId, ProductId, Request, SlotId,
    TransactionId, TransactionView, UserId,
};
use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// One item to decide: one request's JSON as received (an item of a batch envelope, see
/// [`allot_shared::message`]), and the id it is recorded under if it is set aside
/// (`<AMQP message_id>#<index>` for an envelope's item, the `message_id` itself for a message
/// that is not an envelope, whose id may then name its transaction).
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub body: &'a [u8],
    pub message_id: Option<String>,
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New sales, each with a fresh order number (holds confirmed are counted in `confirmed`).
    pub succeeded: usize,
    /// New rejections.
    pub rejected: usize,
    /// New holds.
    pub held: usize,
    /// Requests decided before (redelivered or duplicated messages), replayed.
    pub replayed: usize,
    /// Unreadable items set aside.
    pub dead_lettered: usize,
    /// Holds checked out (each with a fresh order number).
    pub confirmed: usize,
    /// Holds cancelled.
    pub cancelled: usize,
    /// Holds expired (released by the sweeper's expiry, or by a checkout or cancel that came
    /// too late).
    pub expired: usize,
}

/// A committed batch: its counts, the status of every transaction it touched, to publish, and
/// the times of its holds' settlements, for the metrics.
#[derive(Debug)]
pub struct Committed {
    pub outcome: BatchOutcome,
    pub views: Vec<TransactionView>,
    pub settlements: Vec<Settlement>,
}

/// A hold settled by a batch, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settlement {
    /// Checked out this long after it was granted (seconds).
    Confirmed { after_secs: f64 },
    /// Cancelled.
    Cancelled,
    /// Expired, released this long after its `expires_at` (seconds, at least 0).
    Expired { late_secs: f64 },
}

/// Everything needed to decide batches; shared by all partition consumers of a process.
pub struct Decider {
    pool: PgPool,
    statuses: StatusStore,
    clock: Arc<dyn Clock>,
    /// Commits the batches of every partition that are ready at once (see [`crate::group`]).
    group: GroupCommit,
}

/// One partition's batch, read: its requests (orders, and commands about holds) in arrival
/// order, and its unreadable items.
#[derive(Debug, Clone)]
pub struct Batch {
    pub partition: PartitionId,
    pub requests: Vec<Request>,
    pub dead_letters: Vec<DeadLetter>,
}

impl Decider {
    pub fn new(
        pool: PgPool,
        redis: ConnectionManager,
        redis_prefix: String,
        clock: Arc<dyn Clock>,
        timezone: Tz,
    ) -> Self {
        Self {
            group: GroupCommit::start(pool.clone(), clock.clone(), timezone),
            pool,
            statuses: StatusStore::new(redis, redis_prefix),
            clock,
        }
    }

    /// One attempt at a batch, as the consumer loop makes it: decide and commit, then publish
    /// the statuses. The caller acks only after it returned `Ok`.
    pub async fn process_batch(
        &self,
        partition: PartitionId,
        items: &[Item<'_>],
    ) -> anyhow::Result<BatchOutcome> {
        let committed = self.decide_and_commit(partition, items).await?;
        self.publish_statuses(partition, &committed.views).await?;
        Ok(committed.outcome)
    }

    /// Decides a batch of a partition's items, in order, and commits every outcome in one
    /// database transaction, shared with the batches other partitions have ready at the same
    /// moment (see [`crate::group`] and [`commit_batches`]). An unreadable item is a dead
    /// letter and the transaction it names, if any can be read, is rejected (`unprocessable`).
    #[tracing::instrument(skip_all, fields(partition = %partition, size = items.len()), err(Display))]
    pub async fn decide_and_commit(
        &self,
        partition: PartitionId,
        items: &[Item<'_>],
    ) -> anyhow::Result<Committed> {
        let (requests, dead_letters) = poison::parse(items);
        for letter in &dead_letters {
            tracing::warn!(message_id = ?letter.message_id, error = %letter.error, "dead-lettering an unreadable item");
        }
        let started = std::time::Instant::now();
        let batch = Batch {
            partition,
            requests,
            dead_letters,
        };
        let committed = self
            .group
            .commit(batch)
            .await
            .with_context(|| format!("failed to commit batch for partition {partition}"))?;
        crate::monitor::record_batch(&committed.outcome, items.len(), started);
        crate::monitor::record_settlements(&committed.settlements);
        tracing::debug!(outcome = ?committed.outcome, "batch committed");
        Ok(committed)
    }

    /// Overwrites each transaction's status in Redis with its final one and announces them to
    /// the API, in one pipeline.
    pub async fn publish_statuses(
        &self,
        partition: PartitionId,
        views: &[TransactionView],
    ) -> anyhow::Result<()> {
        self.statuses.record_decided(views).await.with_context(|| {
            format!("failed to publish statuses of partition {partition} to Redis")
        })
    }

    /// Sets an item that keeps failing aside: a dead letter with `reason`, and its
    /// transaction, if it names one, rejected as `unprocessable`, its status published. If the
    /// database refuses even that rejection, the dead letter is recorded alone (and the error
    /// logged): the partition must move on.
    #[tracing::instrument(skip_all, fields(partition = %partition, message_id = ?item.message_id), err(Display))]
    pub async fn set_aside(
        &self,
        partition: PartitionId,
        item: &Item<'_>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let decided_at = self.clock.now();
        let request = poison::request_named_by(item, decided_at);
        let letter = DeadLetter {
            message_id: item.message_id.clone(),
            body: item.body.to_vec(),
            error: reason.to_owned(),
        };
        tracing::error!(transaction_id = ?request.as_ref().map(|r| r.transaction_id), %reason, "setting aside an item that keeps failing");
        let stored = match self
            .record_set_aside(partition, &letter, request.as_ref(), decided_at)
            .await
        {
            Ok(stored) => stored,
            Err(err) if request.is_some() && retry::classify(&err) == Failure::Deterministic => {
                tracing::error!(error = %format_args!("{err:#}"), "the database refuses even the rejection; recording the dead letter alone, the transaction stays undecided");
                self.record_set_aside(partition, &letter, None, decided_at)
                    .await?
            }
            Err(err) => return Err(err),
        };
        if let Some(row) = stored {
            self.publish_statuses(partition, &[row.to_view()?]).await?;
        }
        Ok(())
    }

    /// In one database transaction: the dead letter, and the rejection of `request` unless it
    /// was decided already. Returns the transaction's stored row, to publish its status.
    async fn record_set_aside(
        &self,
        partition: PartitionId,
        letter: &DeadLetter,
        request: Option<&Order>,
        decided_at: DateTime<Utc>,
    ) -> anyhow::Result<Option<StoredTransaction>> {
        let mut tx = self.pool.begin().await.context("failed to begin")?;
        persist::insert_dead_letters(&mut tx, partition, std::slice::from_ref(letter)).await?;
        let stored = match request {
            Some(request) => {
                Some(persist::reject_unprocessable(&mut tx, partition, request, decided_at).await?)
            }
            None => None,
        };
        tx.commit().await.context("failed to commit")?;
        Ok(stored)
    }
}

/// Decides `batches` (each of its own partition) and commits them in one database
/// transaction: lock the holds the commands name, the products and the slots, load what was
/// decided before, decide each batch in the pure core, reserve the order numbers of all their
/// sales, write, commit. Each batch is decided on its own, in the order given, so the outcome is
/// the one of committing them one after the other, and their sales are numbered batch after
/// batch. All of them commit, or none does.
///
/// The purchases of a product spread over several partitions are decided from their own
/// shard's share where they can be ([`ShareMode::Own`]); when the core finds a share short (or
/// a product held otherwise than it needs), the attempt is rolled back and the batches decided
/// again with that product's shares held as asked ([`Escalation`]), at most twice per such
/// product (own, pooled, exclusive).
pub async fn commit_batches(
    pool: &PgPool,
    batches: &[&Batch],
    decided_at: DateTime<Utc>,
    day: NaiveDate,
) -> anyhow::Result<Vec<Committed>> {
    let mut escalated: BTreeMap<i64, ShareMode> = BTreeMap::new();
    loop {
        let attempt = attempt_batches(pool, batches, decided_at, day, &escalated).await?;
        let escalation = match attempt {
            Attempt::Committed(committed) => return Ok(committed),
            Attempt::Escalate(escalation) => escalation,
        };
        let product = escalation.product.get();
        let before = escalated.get(&product).copied();
        anyhow::ensure!(
            before.is_none_or(|before| before < escalation.mode),
            "product {product} asked again for its shares held {:?}",
            escalation.mode
        );
        tracing::debug!(%product, mode = ?escalation.mode, "deciding the batches again with more of a product's shares locked");
        crate::monitor::record_escalation(escalation.mode);
        escalated.insert(product, escalation.mode);
    }
}

/// One attempt at [`commit_batches`]: committed, or rolled back because a product's shares
/// must be held otherwise.
enum Attempt {
    Committed(Vec<Committed>),
    Escalate(Escalation),
}

/// How the batches' products with shares are locked ([`persist::lock_products`]): the products
/// of purchases of one line without a hold that name their shard (and of nothing else) from
/// those shards' shares, unless an earlier attempt asked for more (`escalated`); every other
/// product for update. Only purchases of products with shares name a shard.
fn share_locks(
    orders: &[&Order],
    holds: &HashMap<TransactionId, Hold>,
    escalated: &BTreeMap<i64, ShareMode>,
) -> BTreeMap<i64, ShareLock> {
    let mut locks: BTreeMap<i64, ShareLock> = BTreeMap::new();
    let mut whole: BTreeSet<i64> = holds
        .values()
        .flat_map(|hold| hold.lines.iter().map(|line| line.product_id.get()))
        .collect();
    for order in orders {
        match (order.shard, order.lines.single(), order.hold) {
            (Some(shard), Some(line), None) => {
                let product = line.product_id.get();
                if let ShareLock::Own(shards) = locks
                    .entry(product)
                    .or_insert_with(|| ShareLock::Own(BTreeSet::new()))
                {
                    shards.insert(shard);
                }
            }
            _ => whole.extend(order.lines.iter().map(|line| line.product_id.get())),
        }
    }
    locks.retain(|product, lock| {
        match escalated.get(product) {
            Some(ShareMode::Exclusive) => return false,
            Some(ShareMode::Pooled) => *lock = ShareLock::Pooled,
            _ => {}
        }
        !whole.contains(product)
    });
    locks
}

async fn attempt_batches(
    pool: &PgPool,
    batches: &[&Batch],
    decided_at: DateTime<Utc>,
    day: NaiveDate,
    escalated: &BTreeMap<i64, ShareMode>,
) -> anyhow::Result<Attempt> {
    let mut tx = pool
        .begin()
        .await
        .context("failed to begin a transaction")?;
    let orders: Vec<&Order> = orders_of(batches.iter().flat_map(|b| &b.requests)).collect();
    let commands: Vec<&Command> = commands_of(batches.iter().flat_map(|b| &b.requests)).collect();
    // What the core needs, under lock in the one global order (holds, products, shares, slots;
    // the day's counter last): the holds the commands name, the products' stock, held units,
    // rules and shares, the slots, the buyers' units of limited products, and what was decided
    // before.
    let holds = persist::lock_holds(&mut tx, &commands).await?;
    let open = open_holds(&holds)?;
    let share_locks = share_locks(&orders, &open, escalated);
    let products = products_of(&orders, &open);
    let locked = persist::lock_products(&mut tx, &products, &orders, &share_locks).await?;
    if let Some(escalation) = locked.escalation {
        tx.rollback().await.context("failed to roll back")?;
        return Ok(Attempt::Escalate(escalation));
    }
    let slots = persist::lock_slots(&mut tx, &slots_of(&orders, &open)).await?;
    let bought = persist::buyer_units(&mut tx, &locked.rules, buyers_of(&orders, &open)).await?;
    let stored = persist::stored_outcomes(&mut tx, &orders).await?;
    let stored_commands = persist::stored_commands(&mut tx, &commands).await?;
    let mut state = PartitionState {
        stock: locked.stock.clone(),
        held: locked.held.clone(),
        rules: locked.rules,
        bought: bought.clone(),
        slots: slots.clone(),
        holds: open,
        decided: outcomes_of(&stored)?,
        commands: stored_commands,
        shares: locked.shares.clone(),
    };
    // Decide each batch in arrival order, then number the new sales, batch after batch (the
    // day's counter, locked last).
    let decided: Result<Vec<Decisions>, Escalation> = batches
        .iter()
        .map(|batch| core::try_decide(&mut state, &batch.requests, decided_at))
        .collect();
    let decisions = match decided {
        Ok(decisions) => decisions,
        Err(escalation) => {
            tx.rollback().await.context("failed to roll back")?;
            return Ok(Attempt::Escalate(escalation));
        }
    };
    core::rebalance(&mut state);
    let sold = decisions.iter().map(Decisions::sold).sum();
    let mut next_seq = persist::reserve_order_numbers(&mut tx, day, sold).await?;
    let numbered: Vec<Numbered> = decisions
        .iter()
        .map(|decisions| {
            let numbered = decisions.number(day, next_seq);
            next_seq += decisions.sold();
            numbered
        })
        .collect();
    // Write it all, and commit: stock and held units, slots, buyers' units, new outcomes, the
    // holds settled (after the new rows: a batch may settle a hold it granted), the commands.
    persist::write_stock(
        &mut tx,
        (&locked.stock, &locked.held),
        (&state.stock, &state.held),
    )
    .await?;
    persist::write_shares(&mut tx, &locked.shares, &state.shares).await?;
    persist::write_slots(&mut tx, &slots, &state.slots).await?;
    persist::write_buyer_units(&mut tx, &bought, &state.bought).await?;
    let mut rows = Vec::with_capacity(orders.len());
    let mut settled = Vec::new();
    let mut recorded = Vec::new();
    for (batch, numbered) in batches.iter().zip(&numbered) {
        let batch_orders = orders_of(&batch.requests);
        for (order, decision) in batch_orders.zip(&numbered.orders) {
            rows.push((batch.partition, order, decision));
        }
        for (command, decision) in commands_of(&batch.requests).zip(&numbered.commands) {
            if let Some(outcome) = decision.settled {
                settled.push((command.transaction_id, outcome));
            }
            if decision.fresh {
                recorded.push((command, decision.outcome));
            }
        }
    }
    persist::insert_transactions(&mut tx, rows, decided_at).await?;
    persist::settle_holds(&mut tx, &settled, decided_at).await?;
    persist::insert_commands(&mut tx, &recorded, decided_at).await?;
    let mut rejected = Vec::with_capacity(batches.len());
    for batch in batches {
        persist::insert_dead_letters(&mut tx, batch.partition, &batch.dead_letters).await?;
        let mut rows = Vec::new();
        for request in salvaged(&batch.dead_letters, decided_at) {
            rows.push(
                persist::reject_unprocessable(&mut tx, batch.partition, &request, decided_at)
                    .await?,
            );
        }
        rejected.push(rows);
    }
    tx.commit().await.context("failed to commit")?;

    // What each batch did, and the statuses it publishes: each transaction as it stands after
    // the whole group (a hold granted or replayed, then settled, is published settled).
    let touched: Vec<Vec<TransactionView>> = if commands.is_empty() {
        batches
            .iter()
            .zip(&numbered)
            .map(|(batch, numbered)| views(&batch.requests, &numbered.orders, &stored, decided_at))
            .collect::<anyhow::Result<_>>()?
    } else {
        let mut latest = LatestViews::new(&holds, decided_at);
        let touched: Vec<Vec<TransactionId>> = batches
            .iter()
            .zip(&numbered)
            .map(|(batch, numbered)| latest.apply(&batch.requests, numbered, &stored))
            .collect::<anyhow::Result<_>>()?;
        touched.iter().map(|ids| latest.views_of(ids)).collect()
    };
    batches
        .iter()
        .zip(&numbered)
        .zip(rejected)
        .zip(touched)
        .map(|(((batch, numbered), rejected), mut views)| {
            for row in &rejected {
                views.push(row.to_view()?);
            }
            let mut seen = HashSet::with_capacity(views.len());
            views.retain(|view| seen.insert(view.transaction_id));
            Ok(Committed {
                outcome: count(numbered, batch.dead_letters.len()),
                settlements: settlements(&batch.requests, numbered, &holds, decided_at),
                views,
            })
        })
        .collect::<anyhow::Result<_>>()
        .map(Attempt::Committed)
}

/// The orders among `requests`, in order.
fn orders_of<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
) -> impl Iterator<Item = &'a Order> {
    requests.into_iter().filter_map(|request| match request {
        Request::Order(order) => Some(order),
        Request::Command(_) => None,
    })
}

/// The commands among `requests`, in order.
fn commands_of<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
) -> impl Iterator<Item = &'a Command> {
    requests.into_iter().filter_map(|request| match request {
        Request::Command(command) => Some(command),
        Request::Order(_) => None,
    })
}

/// The holds among the locked rows that are still held, as the core takes them.
fn open_holds(
    rows: &HashMap<TransactionId, StoredTransaction>,
) -> anyhow::Result<HashMap<TransactionId, Hold>> {
    let mut open = HashMap::new();
    for (id, row) in rows {
        if let Outcome::Held { expires_at } = row.outcome()? {
            let user = UserId::try_from(row.user_id).map_err(anyhow::Error::msg)?;
            let lines = Lines::new(row.lines()?).map_err(anyhow::Error::msg)?;
            let hold = Hold {
                user,
                lines,
                slot: row.slot()?,
                expires_at,
            };
            open.insert(*id, hold);
        }
    }
    Ok(open)
}

/// Every product the orders and the open holds name, to lock.
fn products_of(orders: &[&Order], holds: &HashMap<TransactionId, Hold>) -> BTreeSet<i64> {
    let lines = orders
        .iter()
        .flat_map(|order| order.lines.iter())
        .chain(holds.values().flat_map(|hold| hold.lines.iter()));
    lines.map(|line| line.product_id.get()).collect()
}

/// Every slot the orders and the open holds name, to lock.
fn slots_of(orders: &[&Order], holds: &HashMap<TransactionId, Hold>) -> BTreeSet<i64> {
    let slots = orders
        .iter()
        .filter_map(|order| order.slot)
        .chain(holds.values().filter_map(|hold| hold.slot));
    slots.map(SlotId::get).collect()
}

/// Every (product, buyer) pair of the orders and the open holds (read only when the batch has a
/// limited product).
fn buyers_of<'a>(
    orders: &'a [&'a Order],
    holds: &'a HashMap<TransactionId, Hold>,
) -> impl Iterator<Item = (ProductId, UserId)> + 'a {
    let of_orders = orders.iter().flat_map(|order| {
        order
            .lines
            .iter()
            .map(|line| (line.product_id, order.user_id))
    });
    let of_holds = holds
        .values()
        .flat_map(|hold| hold.lines.iter().map(|line| (line.product_id, hold.user)));
    of_orders.chain(of_holds)
}

/// The outcomes of stored rows, as the core takes them.
fn outcomes_of(
    stored: &HashMap<TransactionId, StoredTransaction>,
) -> anyhow::Result<HashMap<TransactionId, Outcome>> {
    stored
        .iter()
        .map(|(id, row)| Ok((*id, row.outcome()?)))
        .collect()
}

/// The transactions named by unreadable items whose id, user, product and quantity can still
/// be read (see [`poison::salvage`]), to reject.
fn salvaged(dead_letters: &[DeadLetter], now: DateTime<Utc>) -> Vec<Order> {
    dead_letters
        .iter()
        .filter_map(|letter| poison::salvage(&letter.body, letter.message_id.as_deref(), now))
        .collect()
}

fn count(numbered: &Numbered, dead_lettered: usize) -> BatchOutcome {
    let mut outcome = BatchOutcome {
        dead_lettered,
        ..BatchOutcome::default()
    };
    for decision in &numbered.orders {
        match (decision.fresh, decision.outcome) {
            (false, _) => outcome.replayed += 1,
            (true, Outcome::Succeeded(_)) => outcome.succeeded += 1,
            (true, Outcome::Rejected(_)) => outcome.rejected += 1,
            (true, Outcome::Held { .. }) => outcome.held += 1,
        }
    }
    for decision in &numbered.commands {
        match (decision.settled.is_some(), decision.outcome) {
            (true, CommandOutcome::Confirmed) => outcome.confirmed += 1,
            (true, CommandOutcome::Cancelled) => outcome.cancelled += 1,
            (true, CommandOutcome::Expired) => outcome.expired += 1,
            _ => {}
        }
    }
    outcome
}

/// The holds the batch settled, with their times, for the metrics.
fn settlements(
    requests: &[Request],
    numbered: &Numbered,
    holds: &HashMap<TransactionId, StoredTransaction>,
    decided_at: DateTime<Utc>,
) -> Vec<Settlement> {
    let secs = |delta: chrono::TimeDelta| delta.as_seconds_f64().max(0.0);
    commands_of(requests)
        .zip(&numbered.commands)
        .filter(|(_, decision)| decision.settled.is_some())
        .map(|(command, decision)| {
            let row = holds.get(&command.transaction_id);
            let expires_at = row.and_then(|row| row.expires_at).unwrap_or(decided_at);
            match decision.outcome {
                CommandOutcome::Confirmed => {
                    let granted = row.map_or(decided_at, |row| {
                        expires_at
                            - chrono::TimeDelta::seconds(i64::from(row.hold_seconds.unwrap_or(0)))
                    });
                    Settlement::Confirmed {
                        after_secs: secs(decided_at - granted),
                    }
                }
                CommandOutcome::Cancelled => Settlement::Cancelled,
                _ => Settlement::Expired {
                    late_secs: secs(decided_at - expires_at),
                },
            }
        })
        .collect()
}

/// The status of every order of the batch (a batch without commands): new outcomes from this
/// batch, replays from what is stored (so a duplicate message can never change what clients
/// see). An in-batch duplicate of a fresh request adds nothing: its first copy's view is there.
fn views(
    requests: &[Request],
    decided: &[Decided],
    stored: &HashMap<TransactionId, StoredTransaction>,
    decided_at: DateTime<Utc>,
) -> anyhow::Result<Vec<TransactionView>> {
    let mut views = Vec::with_capacity(decided.len());
    for (order, decision) in orders_of(requests).zip(decided) {
        if decision.fresh {
            views.push(TransactionView::decided(
                order,
                decision.outcome,
                decided_at,
            ));
        } else if let Some(row) = stored.get(&order.transaction_id) {
            views.push(row.to_view()?);
        }
    }
    Ok(views)
}

/// The latest status of every transaction the batches of a group touched, when they carry
/// commands about holds: applied batch after batch, request after request, so that what is
/// published for a transaction is its status after the group.
struct LatestViews<'a> {
    /// The locked rows of the holds the commands named.
    holds: &'a HashMap<TransactionId, StoredTransaction>,
    decided_at: DateTime<Utc>,
    views: HashMap<TransactionId, TransactionView>,
}

impl<'a> LatestViews<'a> {
    fn new(
        holds: &'a HashMap<TransactionId, StoredTransaction>,
        decided_at: DateTime<Utc>,
    ) -> Self {
        Self {
            holds,
            decided_at,
            views: HashMap::new(),
        }
    }

    /// Applies a batch's decisions; returns the transactions it touched, in order, once each.
    /// New outcomes come from this batch, replays from what is stored (so a duplicate message
    /// can never change what clients see), holds as their commands leave them; a command that
    /// changed nothing touches its transaction too, so whoever waits on it hears of it.
    fn apply(
        &mut self,
        requests: &[Request],
        numbered: &Numbered,
        stored: &HashMap<TransactionId, StoredTransaction>,
    ) -> anyhow::Result<Vec<TransactionId>> {
        let mut touched = Vec::with_capacity(requests.len());
        let mut seen = HashSet::with_capacity(requests.len());
        let (mut orders, mut commands) = (numbered.orders.iter(), numbered.commands.iter());
        for request in requests {
            let id = match request {
                Request::Order(order) => {
                    let decision = orders.next().context("an order without a decision")?;
                    self.order(order, decision, stored)?
                }
                Request::Command(command) => {
                    let decision = commands.next().context("a command without a decision")?;
                    self.command(command, decision)?
                }
            };
            if let Some(id) = id
                && seen.insert(id)
            {
                touched.push(id);
            }
        }
        Ok(touched)
    }

    /// The latest views of `ids`.
    fn views_of(&self, ids: &[TransactionId]) -> Vec<TransactionView> {
        ids.iter()
            .filter_map(|id| self.views.get(id).cloned())
            .collect()
    }

    fn order(
        &mut self,
        order: &Order,
        decision: &Decided,
        stored: &HashMap<TransactionId, StoredTransaction>,
    ) -> anyhow::Result<Option<TransactionId>> {
        let id = order.transaction_id;
        if decision.fresh {
            let view = TransactionView::decided(order, decision.outcome, self.decided_at);
            self.views.insert(id, view);
        } else if let std::collections::hash_map::Entry::Vacant(entry) = self.views.entry(id) {
            // A replay shows what is stored; an in-batch duplicate what its first copy shows.
            let Some(row) = stored.get(&id) else {
                return Ok(None);
            };
            entry.insert(row.to_view()?);
        }
        Ok(Some(id))
    }

    fn command(
        &mut self,
        command: &Command,
        decision: &CommandDecided,
    ) -> anyhow::Result<Option<TransactionId>> {
        let id = command.transaction_id;
        if !self.views.contains_key(&id) {
            // A transaction that does not exist has no status to publish.
            let Some(row) = self.holds.get(&id) else {
                return Ok(None);
            };
            self.views.insert(id, row.to_view()?);
        }
        if let Some(outcome) = decision.settled {
            let view = self.views.get_mut(&id).expect("inserted above");
            view.set_outcome(outcome);
            view.decided_at = Some(self.decided_at);
        }
        Ok(Some(id))
    }
}
