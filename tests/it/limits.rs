//! Per-buyer limits (`max_per_buyer`): decided in the serial path under the product's row
//! lock, so a buyer's succeeded units never exceed the limit, exactly, under any concurrency;
//! the rejection is `limit_exceeded` (naming the product in an order of several). A limit set
//! during a sale counts what the buyer bought before it.

use crate::helpers::{Options, TestApp, order_request, partition_of, process_orders, spawn_app};
use allot_shared::{Order, SystemClock};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;

async fn set_limit(app: &TestApp, product: i64, limit: Value) {
    let response = app
        .patch_product(product, &json!({"max_per_buyer": limit}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body.get("max_per_buyer").cloned().unwrap_or(Value::Null),
        limit
    );
}

/// Units of `product` the buyer's succeeded transactions hold, from their lines.
async fn units_bought(app: &TestApp, product: i64, user: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(l.quantity), 0)::bigint FROM transaction_lines l \
         JOIN transactions t ON t.id = l.transaction_id \
         WHERE l.product_id = $1 AND t.user_id = $2 AND t.status = 'succeeded'",
    )
    .bind(product)
    .bind(user)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn buyer_units(app: &TestApp, product: i64, user: i64) -> Option<i64> {
    sqlx::query_scalar("SELECT units FROM buyer_units WHERE product_id = $1 AND user_id = $2")
        .bind(product)
        .bind(user)
        .fetch_optional(&app.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn one_buyer_firing_100_concurrent_buys_gets_exactly_the_limit(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("limited", 1000).await;
    set_limit(&app, product, json!(3)).await;
    assert_eq!(
        app.get(&format!("/api/v1/products/{product}"))
            .await
            .json::<Value>()
            .await
            .unwrap(),
        json!({"id": product, "name": "limited", "stock": 1000, "max_per_buyer": 3})
    );

    let ids = join_all((0..100).map(|_| app.buy(7, product, 1))).await;
    let views = join_all(ids.iter().map(|&id| app.wait_final(id))).await;
    let succeeded = views.iter().filter(|v| v["status"] == "succeeded").count();
    assert_eq!(succeeded, 3, "exactly the limit");
    for view in views.iter().filter(|v| v["status"] == "rejected") {
        assert_eq!(view["reason"], "limit_exceeded", "{view}");
        assert!(
            view.get("reason_product_id").is_none(),
            "a one-line rejection names no line"
        );
    }
    assert_eq!(units_bought(&app, product, 7).await, 3);
    assert_eq!(buyer_units(&app, product, 7).await, Some(3));
    assert_eq!(app.product_stock(product).await, 997);

    // Another buyer has a limit of their own: 3 units in one request, then no more.
    let id = app.buy(8, product, 3).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    let id = app.buy(8, product, 1).await;
    assert_eq!(app.wait_final(id).await["reason"], "limit_exceeded");
    // A request for more than the limit at once is refused whole.
    let id = app.buy(9, product, 4).await;
    assert_eq!(app.wait_final(id).await["reason"], "limit_exceeded");
    assert_eq!(units_bought(&app, product, 9).await, 0);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_order_counts_against_the_limit_and_is_refused_whole_naming_the_product(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let limited = app.create_product("limited", 100).await;
    let free = app.create_product("free", 100).await;
    set_limit(&app, limited, json!(2)).await;

    let id = app.order(5, &[(free, 4), (limited, 2)]).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    let id = app.order(5, &[(free, 1), (limited, 1)]).await;
    let view = app.wait_final(id).await;
    assert_eq!(view["status"], "rejected");
    assert_eq!(view["reason"], "limit_exceeded");
    assert_eq!(view["reason_product_id"], limited);
    // Nothing of the refused order was taken.
    assert_eq!(app.product_stock(free).await, 96);
    assert_eq!(app.product_stock(limited).await, 98);
    assert_eq!(buyer_units(&app, limited, 5).await, Some(2));
    assert_eq!(buyer_units(&app, free, 5).await, None, "no limit, no count");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_limit_holds_exactly_across_racing_deciders(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("limited", 1000).await;
    let other = app.create_product("other", 1000).await;
    set_limit(&app, product, json!(3)).await;
    let deciders: Vec<_> = (0..4)
        .map(|_| app.decider(Arc::new(SystemClock), chrono_tz::UTC))
        .collect();

    // Four deciders at once, as worker replicas in a split brain, each with buys of the same
    // buyer: single units, and orders of the limited product with another.
    let batches: Vec<Vec<Order>> = (0..4)
        .map(|n| {
            (0..10)
                .map(|m| {
                    if (n + m) % 3 == 0 {
                        order_request(7, &[(other, 1), (product, 1)])
                    } else {
                        order_request(7, &[(product, 1)])
                    }
                })
                .collect()
        })
        .collect();
    let results = join_all(
        batches
            .iter()
            .zip(&deciders)
            .map(|(batch, decider)| process_orders(decider, partition_of(product), batch)),
    )
    .await;
    let succeeded: usize = results
        .into_iter()
        .map(|result| result.expect("every batch commits").succeeded)
        .sum();
    assert_eq!(
        succeeded, 3,
        "exactly the limit, whichever decider sold them"
    );
    assert_eq!(units_bought(&app, product, 7).await, 3);
    assert_eq!(buyer_units(&app, product, 7).await, Some(3));
    assert_eq!(app.product_stock(product).await, 997);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_limit_set_during_a_sale_counts_what_was_bought_before(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("sneaker", 100).await;
    let other = app.create_product("laces", 100).await;

    // Bought before any limit: 2 units in one request, 1 in an order of two products.
    for id in [
        app.buy(4, product, 2).await,
        app.order(4, &[(other, 1), (product, 1)]).await,
    ] {
        assert_eq!(app.wait_final(id).await["status"], "succeeded");
    }
    set_limit(&app, product, json!(4)).await;
    assert_eq!(
        buyer_units(&app, product, 4).await,
        Some(3),
        "counted at once"
    );
    let id = app.buy(4, product, 2).await;
    assert_eq!(app.wait_final(id).await["reason"], "limit_exceeded");
    let id = app.buy(4, product, 1).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");

    // Cleared: no limit, nothing counted; set again: counted again from the sales.
    set_limit(&app, product, Value::Null).await;
    assert_eq!(buyer_units(&app, product, 4).await, None);
    let id = app.buy(4, product, 5).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    set_limit(&app, product, json!(10)).await;
    assert_eq!(buyer_units(&app, product, 4).await, Some(9));
    let id = app.buy(4, product, 2).await;
    assert_eq!(app.wait_final(id).await["reason"], "limit_exceeded");
    // Lowered below what the buyer holds: nothing is undone, nothing more is sold.
    set_limit(&app, product, json!(1)).await;
    assert_eq!(units_bought(&app, product, 4).await, 9);
    let id = app.buy(4, product, 1).await;
    assert_eq!(app.wait_final(id).await["reason"], "limit_exceeded");
    app.shutdown().await;
}
