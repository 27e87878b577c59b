//! Several worker instances share the partitions evenly (`worker/src/seats.rs`): three workers
//! on 16 partitions own 6, 5 and 5 and decide exactly those; when one stops the other two take
//! 8 each, and when it comes back it gets its share back, all under a steady load, with every
//! request accepted decided exactly once, never oversold, numbers gapless.

use crate::helpers::{
    ExtraWorker, Options, TestApp, accepted_id, order_seqs, spawn_app, today, wait_for,
};
use allot_shared::partition::partition_for;
use allot_shared::{ProductId, TransactionId};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u16 = 16;

/// What a worker's `GET /partitions` says.
#[derive(Debug, Clone)]
struct Seats {
    worker: String,
    workers: u64,
    owned: BTreeSet<u16>,
    active: BTreeSet<u16>,
}

fn set_of(value: &Value) -> BTreeSet<u16> {
    value
        .as_array()
        .expect("a list of partitions")
        .iter()
        .map(|p| u16::try_from(p.as_u64().unwrap()).unwrap())
        .collect()
}

async fn seats_of(app: &TestApp, worker: &ExtraWorker) -> Seats {
    let (status, body) = worker.get(&app.client, "/partitions").await;
    assert_eq!(status, StatusCode::OK);
    Seats {
        worker: body["worker"].as_str().unwrap().to_owned(),
        workers: body["workers"].as_u64().unwrap(),
        owned: set_of(&body["owned"]),
        active: set_of(&body["active"]),
    }
}

/// Waits until every worker of `workers` lists exactly them, and their owned partitions are
/// disjoint, cover all 16 and are as even as can be; returns the shares, largest first.
async fn wait_even_spread(app: &TestApp, workers: &[ExtraWorker]) -> Vec<usize> {
    let what = format!("{} workers to share the partitions evenly", workers.len());
    wait_for(&what, || async {
        let mut all = BTreeSet::new();
        let mut shares = Vec::new();
        for worker in workers {
            let seats = seats_of(app, worker).await;
            if seats.workers != workers.len() as u64 || !seats.owned.is_disjoint(&all) {
                return None;
            }
            shares.push(seats.owned.len());
            all.extend(seats.owned);
        }
        shares.sort_unstable_by(|a, b| b.cmp(a));
        let even = shares.first()? - shares.last()? <= 1;
        (all.len() == usize::from(PARTITIONS) && even).then_some(shares)
    })
    .await
}

/// Waits until RabbitMQ delivers every partition to its owner: each worker is active on
/// exactly the partitions it owns (the load reaches every partition, so each owner receives
/// deliveries, and a worker that received a partition it does not own has stepped back).
async fn wait_owners_decide(app: &TestApp, workers: &[ExtraWorker]) -> Vec<Seats> {
    wait_for("every partition to be delivered to its owner", || async {
        let mut all = Vec::new();
        for worker in workers {
            let seats = seats_of(app, worker).await;
            if seats.active != seats.owned {
                return None;
            }
            all.push(seats);
        }
        Some(all)
    })
    .await
}

/// A steady load: `clients` buyers in turn over `products`, each 202 recorded.
struct Load {
    accepted: Arc<Mutex<Vec<TransactionId>>>,
    stop: CancellationToken,
    clients: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(app: &TestApp, products: &[i64], clients: i64) -> Load {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..clients {
            let (http, base, products) =
                (app.client.clone(), app.address.clone(), products.to_vec());
            let (accepted, stop) = (accepted.clone(), stop.clone());
            tasks.spawn(async move {
                let mut sent = 0i64;
                while !stop.is_cancelled() {
                    let product = products[(sent as usize + client as usize) % products.len()];
                    sent += 1;
                    let response = http
                        .post(format!("{base}/api/v1/order/addToCart"))
                        .json(&serde_json::json!({
                            "user_id": client * 10_000_000 + sent, "product_id": product, "quantity": 1
                        }))
                        .send()
                        .await
                        .unwrap();
                    let id = accepted_id(response).await;
                    accepted.lock().unwrap().push(id);
                    // A steady trickle, not a flood: the machine is shared.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        Load {
            accepted,
            stop,
            clients: tasks,
        }
    }

    fn accepted(&self) -> Vec<TransactionId> {
        self.accepted.lock().unwrap().clone()
    }

    async fn stop(mut self) -> Vec<TransactionId> {
        self.stop.cancel();
        while let Some(ended) = self.clients.join_next().await {
            ended.expect("a load client failed");
        }
        self.accepted()
    }
}

/// Waits until every id of `ids` is decided (one row each in PostgreSQL).
async fn wait_decided(app: &TestApp, ids: &[TransactionId], what: &str) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    wait_for(what, || async {
        let decided: i64 =
            sqlx::query_scalar("SELECT count(*) FROM transactions WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        (decided == ids.len() as i64).then_some(())
    })
    .await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn three_workers_share_sixteen_partitions_evenly_and_a_restarted_one_gets_its_share_back(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(
        pool,
        Options {
            partitions: PARTITIONS,
            ..Options::without_worker()
        },
    )
    .await;
    // One product per partition (ids 1 to 16 of a fresh database), stock to spare.
    let mut products = Vec::new();
    for n in 0..PARTITIONS {
        products.push(app.create_product(&format!("p{n}"), 1_000_000).await);
    }
    let covered: BTreeSet<u16> = products
        .iter()
        .map(|&id| partition_for(ProductId::try_from(id).unwrap(), PARTITIONS).0)
        .collect();
    assert_eq!(
        covered.len(),
        usize::from(PARTITIONS),
        "every partition has a product"
    );

    let mut workers: Vec<ExtraWorker> = (0..3)
        .map(|_| ExtraWorker::start(&app, &app.worker_config))
        .collect();
    assert_eq!(wait_even_spread(&app, &workers).await, vec![6, 5, 5]);
    let load = Load::start(&app, &products, 4);
    let deciding = wait_owners_decide(&app, &workers).await;
    let names: BTreeSet<&str> = deciding.iter().map(|s| s.worker.as_str()).collect();
    assert_eq!(names.len(), 3, "three workers, three ids");

    // The third stops (SIGTERM): the other two take its partitions, 8 each, and decide all.
    let stopped = workers.pop().unwrap();
    stopped.stop().await;
    assert_eq!(wait_even_spread(&app, &workers).await, vec![8, 8]);
    wait_owners_decide(&app, &workers).await;
    let so_far = load.accepted();
    wait_decided(
        &app,
        &so_far,
        "everything accepted so far to be decided by two workers",
    )
    .await;

    // It comes back (a new process: a new id) and gets its share back.
    workers.push(ExtraWorker::start(&app, &app.worker_config));
    assert_eq!(wait_even_spread(&app, &workers).await, vec![6, 5, 5]);
    let after = wait_owners_decide(&app, &workers).await;
    let back = &after[2];
    assert!(
        back.owned.len() >= 5 && back.active == back.owned,
        "the restarted worker decides its share: {back:?}"
    );

    // Every request accepted throughout is decided exactly once, and sold (stock to spare).
    let accepted = load.stop().await;
    assert!(
        accepted.len() >= 100,
        "the load ran ({} accepted)",
        accepted.len()
    );
    wait_decided(&app, &accepted, "every accepted request to be decided").await;
    let rows: Vec<(uuid::Uuid, String, i64)> =
        sqlx::query_as("SELECT id, status, product_id FROM transactions")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let expected: BTreeSet<uuid::Uuid> = accepted.iter().map(|id| id.0).collect();
    let decided: BTreeSet<uuid::Uuid> = rows.iter().map(|row| row.0).collect();
    assert_eq!(
        decided, expected,
        "exactly the accepted requests, once each"
    );
    assert!(rows.iter().all(|row| row.1 == "succeeded"));
    let mut sold: BTreeMap<i64, i64> = BTreeMap::new();
    for row in &rows {
        *sold.entry(row.2).or_default() += 1;
    }
    for &product in &products {
        let units = sold.get(&product).copied().unwrap_or_default();
        assert_eq!(
            app.product_stock(product).await,
            1_000_000 - units,
            "product {product}"
        );
    }
    let seqs = order_seqs(&app.pool, &today()).await;
    assert_eq!(
        seqs,
        (1..=rows.len() as i64).collect::<Vec<_>>(),
        "gapless numbers"
    );

    for worker in workers {
        worker.stop().await;
    }
    app.shutdown().await;
}
