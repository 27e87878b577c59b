//! Holds expire from durable state, exactly once, whatever stops in between: a worker stopped
//! abruptly while its holds come due, and a whole system stopped past their expiry and started
//! again.
//!
//! How a worker is stopped abruptly in-process: it runs on a tokio runtime of its own, with its
//! own PostgreSQL pool and Redis connection, and reaches RabbitMQ through a TCP relay (the test
//! kit's proxy). Crashing it shuts that runtime down without a graceful stop (every task is
//! dropped wherever it was awaiting: a batch half decided, a commit in flight, statuses half
//! published, an ack not sent, a sweep between its read and its publish) and cuts the relay, so
//! the broker sees the connection drop without a close, as it would from a killed process, and
//! redelivers what was unacked. What this proves: no hold, expiry or decision depends on a
//! process's memory or on a graceful stop. What it does not: a real `kill -9` (the process's
//! other threads, such as lapin's I/O thread, are not killed with the runtime, only cut off by
//! the relay; sockets to PostgreSQL and Redis are closed by the drop rather than reset by the
//! kernel), and the
//! services themselves do not crash here (their durability is PostgreSQL's and RabbitMQ's).

use crate::helpers::{ExtraApi, Options, TestApp, assert_error, spawn_app, wait_for};
use allot_shared::{ManualClock, TransactionId};
use allot_tests::proxy::Proxy;
use chrono::{DateTime, TimeDelta, Utc};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;

/// A worker that can be stopped abruptly; see the module documentation.
struct CrashableWorker {
    runtime: Option<tokio::runtime::Runtime>,
    /// The test kit's proxy between the worker and the broker; dropping it cuts them apart.
    relay: Option<Proxy>,
}

impl CrashableWorker {
    async fn start(app: &TestApp, clock: ManualClock) -> CrashableWorker {
        let (relay, relayed) = Proxy::in_front_of(&app.api_config.common.amqp_url)
            .await
            .unwrap();
        let mut config = app.worker_config.clone();
        config.common.amqp_urls = vec![relayed];
        let options = (*app.pool.connect_options()).clone();
        let redis_url = app.api_config.common.redis_url.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let pool = PgPoolOptions::new()
                .max_connections(5)
                .connect_with(options)
                .await
                .expect("the crashable worker's pool connects");
            let redis =
                allot_shared::status_store::connect(&redis_url, std::time::Duration::from_secs(1))
                    .await
                    .expect("the crashable worker's Redis connects");
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = allot_worker::serve(
                listener,
                config,
                pool,
                redis,
                Arc::new(clock),
                std::future::pending::<()>(),
            )
            .await;
        });
        CrashableWorker {
            runtime: Some(runtime),
            relay: Some(relay),
        }
    }

    /// Drops every task of the worker where it stands, and cuts its broker connection.
    async fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        drop(self.relay.take());
    }
}

impl Drop for CrashableWorker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        drop(self.relay.take());
    }
}

/// Every transaction's status and reason, from PostgreSQL.
async fn statuses(pool: &PgPool, ids: &[TransactionId]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let row: (String, Option<String>) =
            sqlx::query_as("SELECT status, reason FROM transactions WHERE id = $1")
                .bind(id.0)
                .fetch_one(pool)
                .await
                .unwrap();
        out.push(row);
    }
    out
}

/// Waits until every one of `ids` is stored `rejected` (`expired`).
async fn wait_all_expired(pool: &PgPool, ids: &[TransactionId]) {
    wait_for("every due hold to be released", || async {
        let all = statuses(pool, ids).await;
        all.iter()
            .all(|(status, reason)| status == "rejected" && reason.as_deref() == Some("expired"))
            .then_some(())
    })
    .await;
}

/// stock + held + sold == stocked for each product, and nothing held.
async fn assert_released_once(app: &TestApp, products: &[i64], stocked: i64) {
    for &product in products {
        crate::holds::assert_conserved(app, product, stocked).await;
        let held: i64 = sqlx::query_scalar("SELECT held FROM products WHERE id = $1")
            .bind(product)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(held, 0, "product {product}: nothing held any more");
    }
}

/// Asks for holds through `base` (an API address) and waits until each is held; returns them
/// in the order asked.
async fn held_by(app: &TestApp, base: &str, asks: &[(i64, i64)], secs: i64) -> Vec<TransactionId> {
    let ids = join_all(asks.iter().map(|&(user, product)| async move {
        let response = app
            .client
            .post(format!("{base}/api/v1/order/addToCart"))
            .json(&json!({"user_id": user, "product_id": product, "quantity": 1, "hold_seconds": secs}))
            .send()
            .await
            .unwrap();
        crate::helpers::accepted_id(response).await
    }))
    .await;
    for &id in &ids {
        wait_for(&format!("hold {id} to be granted"), || async {
            let view: Value = app
                .client
                .get(format!("{base}/api/v1/transaction/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match view["status"].as_str() {
                Some("held") => Some(()),
                Some("pending") => None,
                _ => panic!("hold {id} was not granted: {view}"),
            }
        })
        .await;
    }
    ids
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_worker_stopped_abruptly_as_its_holds_come_due_loses_no_expiry_and_doubles_none(
    pool: PgPool,
) {
    let start: DateTime<Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
    let clock = ManualClock::new(start);
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let mut products = Vec::new();
    for n in 0..4 {
        products.push(app.create_product(&format!("p{n}"), 5).await);
    }
    let first = CrashableWorker::start(&app, clock.clone()).await;
    // 12 holds over four products (four partitions): 6 for 30 s, 6 for 60 s.
    let asks: Vec<(i64, i64)> = (0..12)
        .map(|n| (n + 1, products[(n % 4) as usize]))
        .collect();
    let short = held_by(&app, &app.address, &asks[..6], 30).await;
    let long = held_by(&app, &app.address, &asks[6..], 60).await;

    // The first worker releases the short ones when they come due.
    clock.set(start + TimeDelta::seconds(30));
    wait_all_expired(&app.pool, &short).await;
    assert_eq!(
        statuses(&app.pool, &long).await,
        vec![("held".to_string(), None); 6]
    );

    // Three of the long ones are checked out, and the worker is stopped abruptly while their
    // checkouts are on their way (published, perhaps delivered, perhaps decided: whatever it
    // had committed stands, the rest is redelivered to the next).
    let checkouts = tokio::spawn({
        let client = app.client.clone();
        let base = app.address.clone();
        let ids = long[..3].to_vec();
        async move {
            join_all(ids.iter().map(|id| {
                client
                    .post(format!("{base}/api/v1/transaction/{id}/checkout"))
                    .send()
            }))
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    first.crash().await;
    let decided_by_first = statuses(&app.pool, &long[..3])
        .await
        .iter()
        .filter(|(status, _)| status == "succeeded")
        .count();
    println!("the first worker decided {decided_by_first} of 3 checkouts before its crash");

    // Another worker takes over: the checkouts are decided once each (the API answers them),
    // then the rest come due and are released, each once.
    app.start_worker(Arc::new(clock.clone()));
    for answer in checkouts.await.unwrap() {
        let answer = answer.unwrap();
        assert_eq!(
            answer.status(),
            StatusCode::OK,
            "a checkout across the crash"
        );
        assert_eq!(answer.json::<Value>().await.unwrap()["status"], "succeeded");
    }
    assert_eq!(crate::holds::assert_gapless(&app).await, 3);
    clock.set(start + TimeDelta::seconds(60));
    let due: Vec<TransactionId> = short.iter().chain(&long[3..]).copied().collect();
    let due = &due[..];
    wait_all_expired(&app.pool, due).await;
    assert_released_once(&app, &products, 5).await;
    for &hold in &long[..3] {
        assert_eq!(app.transaction(hold).await["status"], "succeeded");
    }
    // Its statuses are published too (a crash between a commit and its statuses is replayed).
    for &hold in due {
        wait_for(&format!("hold {hold}'s status to read expired"), || async {
            let view = app.transaction(hold).await;
            (view["reason"] == "expired").then_some(())
        })
        .await;
    }
    // Later sweeps find nothing more to release; the released units sell again.
    clock.set(start + TimeDelta::seconds(300));
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_released_once(&app, &products, 5).await;
    let sales = join_all((100..109).map(|user| app.buy(user, products[0], 1))).await;
    let views = join_all(sales.iter().map(|&id| app.wait_final(id))).await;
    let sold = views.iter().filter(|v| v["status"] == "succeeded").count();
    assert_eq!(
        sold, 4,
        "product 0 had 5 units, one checked out: 4 back on sale"
    );
    assert_eq!(crate::holds::assert_gapless(&app).await, 3 + 4);
    assert_eq!(
        app.count("SELECT count(*) FROM hold_commands WHERE outcome <> 'confirmed'")
            .await,
        0
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_whole_system_stopped_past_its_holds_expiry_releases_each_once_when_started_again(
    pool: PgPool,
) {
    let start: DateTime<Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
    let clock = ManualClock::new(start);
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let mut products = Vec::new();
    for n in 0..2 {
        products.push(app.create_product(&format!("p{n}"), 4).await);
    }
    let worker = CrashableWorker::start(&app, clock.clone()).await;
    let asks: Vec<(i64, i64)> = (0..6)
        .map(|n| (n + 1, products[(n % 2) as usize]))
        .collect();
    let holds = held_by(&app, &app.address, &asks, 60).await;
    assert_eq!(
        app.settle(holds[0], "checkout", None).await.status(),
        StatusCode::OK
    );
    let due = &holds[1..];

    // Everything stops (the worker abruptly); time passes beyond every expiry.
    worker.crash().await;
    app.stop_api().await;
    let restarted_at = start + TimeDelta::hours(1);
    clock.set(restarted_at);

    // Started again: a new API and a new worker.
    let api = ExtraApi::start(&app, &app.api_config).await;
    app.start_worker(Arc::new(clock.clone()));
    wait_all_expired(&app.pool, due).await;
    assert_released_once(&app, &products, 4).await;
    let decided_at: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT decided_at FROM transactions WHERE reason = 'expired' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        decided_at,
        vec![restarted_at; due.len()],
        "released by the new worker, once each"
    );
    for &hold in due {
        let view: Value = wait_for(&format!("hold {hold} to read expired"), || async {
            let view: Value = app
                .client
                .get(format!("{}/api/v1/transaction/{hold}", api.address))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (view["reason"] == "expired").then_some(view)
        })
        .await;
        assert_eq!(view["status"], "rejected");
    }
    let late = app
        .client
        .post(format!(
            "{}/api/v1/transaction/{}/checkout",
            api.address, due[0]
        ))
        .send()
        .await
        .unwrap();
    assert_error(late, StatusCode::CONFLICT, "hold_expired").await;
    let kept = app
        .client
        .get(format!("{}/api/v1/transaction/{}", api.address, holds[0]))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        kept["status"], "succeeded",
        "the checked-out hold stays sold"
    );
    assert_eq!(crate::holds::assert_gapless(&app).await, 1);
    api.stop().await;
    app.shutdown().await;
}
