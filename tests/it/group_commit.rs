//! Group commit across partitions (worker/src/group.rs): the batches of several partitions in
//! one database transaction are all committed or none is, are numbered one after the other
//! with no gap, and a batch that cannot commit fails alone, its group-mates committed.

use crate::helpers::{curse, partition_of, request};
use allot_shared::{PartitionId, PurchaseRequest, SystemClock};
use allot_worker::decider::{Batch, commit_batches};
use allot_worker::group::GroupCommit;
use chrono::Utc;
use sqlx::PgPool;
use std::sync::Arc;

async fn product(pool: &PgPool, stock: i64) -> i64 {
    sqlx::query_scalar("INSERT INTO products (name, stock) VALUES ('group', $1) RETURNING id")
        .bind(stock)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Two products of two different partitions.
async fn products_of_two_partitions(pool: &PgPool, stock: i64) -> (i64, i64) {
    let first = product(pool, stock).await;
    let mut second = product(pool, stock).await;
    while partition_of(second) == partition_of(first) {
        second = product(pool, stock).await;
    }
    (first, second)
}

fn batch(partition: PartitionId, requests: &[PurchaseRequest]) -> Batch {
    Batch {
        partition,
        requests: requests.iter().cloned().map(Into::into).collect(),
        dead_letters: Vec::new(),
    }
}

async fn stock(pool: &PgPool, product: i64) -> i64 {
    sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(product)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// (transaction id, order sequence) of every succeeded row, by sequence.
async fn numbered(pool: &PgPool) -> Vec<(uuid::Uuid, i64)> {
    sqlx::query_as(
        "SELECT id, order_seq FROM transactions WHERE status = 'succeeded' ORDER BY order_seq",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_group_numbers_its_batches_one_after_the_other(pool: PgPool) {
    let (a, b) = products_of_two_partitions(&pool, 2).await;
    let first: Vec<_> = (1..=3).map(|user| request(user, a, 1)).collect();
    let second: Vec<_> = (4..=5).map(|user| request(user, b, 1)).collect();
    let now = Utc::now();
    let committed = commit_batches(
        &pool,
        &[
            &batch(partition_of(a), &first),
            &batch(partition_of(b), &second),
        ],
        now,
        now.date_naive(),
    )
    .await
    .unwrap();

    assert_eq!(committed.len(), 2);
    assert_eq!(
        (
            committed[0].outcome.succeeded,
            committed[0].outcome.rejected
        ),
        (2, 1),
        "the first batch: two units, three buyers"
    );
    assert_eq!(
        (
            committed[1].outcome.succeeded,
            committed[1].outcome.rejected
        ),
        (2, 0)
    );
    let expected: Vec<(uuid::Uuid, i64)> = [&first[0], &first[1], &second[0], &second[1]]
        .iter()
        .zip(1..)
        .map(|(request, seq)| (request.transaction_id.0, seq))
        .collect();
    assert_eq!(
        numbered(&pool).await,
        expected,
        "numbers 1..4, batch after batch, in arrival order"
    );
    let counter: i64 = sqlx::query_scalar("SELECT last_seq FROM order_counters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counter, 4);
    assert_eq!((stock(&pool, a).await, stock(&pool, b).await), (0, 0));
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_group_with_a_batch_that_cannot_commit_commits_nothing(pool: PgPool) {
    let (good, cursed) = products_of_two_partitions(&pool, 5).await;
    curse(&pool, cursed).await;
    let fine = vec![request(1, good, 1)];
    let poisoned = vec![request(2, cursed, 1)];
    let now = Utc::now();
    let result = commit_batches(
        &pool,
        &[
            &batch(partition_of(good), &fine),
            &batch(partition_of(cursed), &poisoned),
        ],
        now,
        now.date_naive(),
    )
    .await;

    assert!(
        result.is_err(),
        "the cursed product's write fails the group"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing of the group is visible");
    let counters: i64 = sqlx::query_scalar("SELECT count(*) FROM order_counters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counters, 0, "no order number was taken");
    assert_eq!(stock(&pool, good).await, 5);
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_batch_that_cannot_commit_fails_alone_and_its_group_mates_commit(pool: PgPool) {
    let (good, cursed) = products_of_two_partitions(&pool, 5).await;
    curse(&pool, cursed).await;
    let group = GroupCommit::start(pool.clone(), Arc::new(SystemClock), chrono_tz::UTC);
    let fine: Vec<_> = (1..=2).map(|user| request(user, good, 1)).collect();
    let poisoned = vec![request(3, cursed, 1)];

    // Sent together, so that (usually) they share a group; either way the outcome is the same.
    let (committed, failed) = tokio::join!(
        group.commit(batch(partition_of(good), &fine)),
        group.commit(batch(partition_of(cursed), &poisoned)),
    );

    let committed = committed.expect("the good batch commits");
    assert_eq!(committed.outcome.succeeded, 2);
    assert!(failed.is_err(), "the cursed batch fails, alone");
    let expected: Vec<(uuid::Uuid, i64)> = fine
        .iter()
        .zip(1..)
        .map(|(request, seq)| (request.transaction_id.0, seq))
        .collect();
    assert_eq!(numbered(&pool).await, expected);
    assert_eq!(stock(&pool, good).await, 3);
    assert_eq!(stock(&pool, cursed).await, 5);
}
