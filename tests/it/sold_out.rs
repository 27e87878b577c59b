//! The sold-out short-circuit: once a product's stock is 0, the API answers its requests at
//! once with a final `out_of_stock` (200, nothing recorded, nothing enqueued), and a restock
//! re-opens it, at once through this API and within a second through the database.

use crate::helpers::{Options, TestApp, spawn_app, wait_for};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

const REFRESH_MS: u64 = 100;

fn options() -> Options {
    Options {
        sold_out_refresh_ms: REFRESH_MS,
        ..Options::default()
    }
}

/// The exact final answer for a sold-out product.
fn sold_out_body(user_id: i64, product_id: i64, quantity: i64) -> Value {
    json!({"status": "rejected", "reason": "out_of_stock", "user_id": user_id,
           "product_id": product_id, "quantity": quantity, "final": true})
}

/// Sends requests for `product` until the API short-circuits it, then waits until the requests
/// it still accepted meanwhile are decided (so that none of them can take a later restock).
/// Every earlier request for `product` must already be decided.
async fn wait_short_circuited(app: &TestApp, product: i64) {
    let sql = format!("SELECT count(*) FROM transactions WHERE product_id = {product}");
    let decided_before = app.count(&sql).await;
    let accepted = AtomicI64::new(0);
    wait_for("the product to be short-circuited", || async {
        match app.add_to_cart(1, product, 1).await.status() {
            StatusCode::OK => Some(()),
            StatusCode::ACCEPTED => {
                accepted.fetch_add(1, Ordering::Relaxed);
                None
            }
            other => panic!("unexpected {other}"),
        }
    })
    .await;
    let expected = decided_before + accepted.load(Ordering::Relaxed);
    wait_for("the accepted requests to be decided", || async {
        (app.count(&sql).await == expected).then_some(())
    })
    .await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_sold_out_product_is_answered_at_once_and_nothing_is_recorded(pool: PgPool) {
    let app = spawn_app(pool, options()).await;
    let product = app.create_product("two units", 2).await;
    let other = app.create_product("plenty", 100).await;
    for user in 1..=2 {
        let id = app.buy(user, product, 1).await;
        assert_eq!(app.wait_final(id).await["status"], "succeeded");
    }

    wait_short_circuited(&app, product).await;
    let response = app.add_to_cart(9, product, 3).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer, sold_out_body(9, product, 3));
    let recorded = app
        .count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
        .await;
    assert_eq!(recorded, 2, "exactly the stock was sold");

    // Nothing of a short-circuited request is recorded or enqueued.
    let before = (
        app.count("SELECT count(*) FROM transactions").await,
        app.redis_key_count().await,
    );
    for user in 10..20 {
        let response = app.add_to_cart(user, product, 1).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            sold_out_body(user, product, 1)
        );
    }
    wait_for("the queues to drain", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    let after = (
        app.count("SELECT count(*) FROM transactions").await,
        app.redis_key_count().await,
    );
    assert_eq!(after, before, "short-circuited requests leave no trace");
    assert_eq!(app.product_stock(product).await, 0);

    // Other products are not affected.
    let id = app.buy(1, other, 1).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_restock_through_the_api_reopens_the_product_at_once(pool: PgPool) {
    let app = spawn_app(pool, options()).await;
    let product = app.create_product("none yet", 0).await;
    wait_short_circuited(&app, product).await;

    let response = app
        .post_admin(
            &format!("/api/v1/products/{product}/restock"),
            &json!({"quantity": 1}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // No waiting: the restocking instance re-opens the product itself.
    let id = app.buy(2, product, 1).await;
    let view = app.wait_final(id).await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(app.product_stock(product).await, 0);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn stock_added_elsewhere_reopens_the_product_within_a_second(pool: PgPool) {
    let app = spawn_app(pool, options()).await;
    let product = app.create_product("none yet", 0).await;
    wait_short_circuited(&app, product).await;

    // As another API instance's restock would: only the database changes.
    sqlx::query("UPDATE products SET stock = 1 WHERE id = $1")
        .bind(product)
        .execute(&app.pool)
        .await
        .unwrap();
    let restocked = Instant::now();
    let id = wait_for("the product to re-open", || async {
        let response = app.add_to_cart(2, product, 1).await;
        (response.status() == StatusCode::ACCEPTED).then(|| {
            let location = response.headers()["location"].to_str().unwrap().to_owned();
            location.rsplit('/').next().unwrap().to_owned()
        })
    })
    .await;
    let reopened_after = restocked.elapsed();
    assert!(
        reopened_after < Duration::from_secs(1),
        "re-opened after {reopened_after:?}"
    );
    let view = app
        .wait_final(allot_shared::TransactionId(id.parse().unwrap()))
        .await;
    assert_eq!(view["status"], "succeeded");
    app.shutdown().await;
}
