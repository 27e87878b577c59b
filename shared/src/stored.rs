//! Decided transactions as PostgreSQL stores them, and their conversion to the client view.
//! The worker reads them to replay earlier outcomes; the API reads them when Redis has no
//! status.

use crate::ids::{ProductId, Quantity, TransactionId, UserId};
use crate::outcome::{OrderNumber, Outcome, Status, TransactionView};
use anyhow::{Context, anyhow};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

/// A row of the `transactions` table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredTransaction {
    pub id: Uuid,
    pub user_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub status: String,
    pub reason: Option<String>,
    pub order_day: Option<NaiveDate>,
    pub order_seq: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub decided_at: DateTime<Utc>,
}

/// `SELECT`s every column of [`StoredTransaction`], with the given `WHERE` clause.
macro_rules! select_transactions_where {
    ($condition:literal) => {
        concat!(
            "SELECT id, user_id, product_id, quantity, status, reason, order_day, order_seq, ",
            "created_at, decided_at FROM transactions WHERE ",
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
            ("rejected", _, _, Some(reason)) => Ok(Outcome::Rejected(
                reason.parse().map_err(|e| anyhow!("{e}"))?,
            )),
            _ => Err(anyhow!(
                "transaction {} has an inconsistent stored outcome",
                self.id
            )),
        }
    }

    /// The view clients see.
    pub fn to_view(&self) -> anyhow::Result<TransactionView> {
        let outcome = self.outcome()?;
        let (status, order_number, reason) = match outcome {
            Outcome::Succeeded(number) => (Status::Succeeded, Some(number.to_string()), None),
            Outcome::Rejected(reason) => (Status::Rejected, None, Some(reason)),
        };
        let field = |what: &str| format!("transaction {} has an invalid stored {what}", self.id);
        Ok(TransactionView {
            transaction_id: TransactionId(self.id),
            status,
            user_id: UserId::try_from(self.user_id)
                .map_err(anyhow::Error::msg)
                .with_context(|| field("user_id"))?,
            product_id: ProductId::try_from(self.product_id)
                .map_err(anyhow::Error::msg)
                .with_context(|| field("product_id"))?,
            quantity: Quantity::try_from(self.quantity)
                .map_err(anyhow::Error::msg)
                .with_context(|| field("quantity"))?,
            order_number,
            reason,
            created_at: self.created_at,
            decided_at: Some(self.decided_at),
        })
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

/// Records each of `requests` as rejected (`not_accepted`) unless it was decided already, in
/// one statement, and says for each which (in the order of `requests`).
///
/// The API calls this when it answers 503 for the requests of a message the broker may have
/// stored anyway (the confirm timed out or the connection dropped after sending). The primary
/// key on the transaction id arbitrates between this and a worker deciding the same request:
/// whichever row is committed first stands. If this one does, a worker that later receives the
/// message finds a stored outcome and replays it, so the refused request can never take stock.
/// If a worker was first, the request was taken after all.
pub async fn withdraw<'e>(
    executor: impl PgExecutor<'e>,
    requests: &[crate::PurchaseRequest],
    partition: crate::PartitionId,
    at: DateTime<Utc>,
) -> sqlx::Result<Vec<Withdrawal>> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.transaction_id.0).collect();
    let users: Vec<i64> = requests.iter().map(|r| r.user_id.get()).collect();
    let products: Vec<i64> = requests.iter().map(|r| r.product_id.get()).collect();
    let quantities: Vec<i64> = requests.iter().map(|r| r.quantity.get()).collect();
    let created: Vec<DateTime<Utc>> = requests.iter().map(|r| r.created_at).collect();
    let withdrawn: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO transactions (id, user_id, product_id, quantity, created_at, status, reason, \
                                   partition, decided_at) \
         SELECT u.*, 'rejected', $6, $7, $8 \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[]) AS u \
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&products)
    .bind(&quantities)
    .bind(&created)
    .bind(crate::RejectReason::NotAccepted.as_str())
    .bind(i32::from(partition.0))
    .bind(at)
    .fetch_all(executor)
    .await?;
    let withdrawn: std::collections::HashSet<Uuid> = withdrawn.into_iter().collect();
    Ok(ids
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
