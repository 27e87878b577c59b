//! Orders of several products under concurrency: orders listing the same products in opposite
//! orders, orders spanning partitions racing single-product buys of the same products, through
//! the whole system and through several deciders committing at once (each its own database
//! transaction, as worker replicas in a split brain would). No deadlock, all or nothing, never
//! oversold, order numbers gapless: checked in PostgreSQL.

use crate::helpers::{
    Options, TestApp, insert_product, order_request, order_seqs, partition_of, process_orders,
    spawn_app, today,
};
use allot_shared::{Order, SystemClock};
use futures::future::join_all;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;

/// The promises, from PostgreSQL: every order decided once; each product's stock fell by
/// exactly the units of the succeeded orders' lines (so a rejected order took nothing) and is
/// not below zero; today's numbers are 1..=N for the N successes; rejections name a line of
/// their order with a reason the race can give.
async fn assert_promises(app: &TestApp, orders: &[Order], initial: &HashMap<i64, i64>) {
    let rows: Vec<(uuid::Uuid, String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT id, status, reason, reason_product_id FROM transactions WHERE id = ANY($1)",
    )
    .bind(
        orders
            .iter()
            .map(|o| o.transaction_id.0)
            .collect::<Vec<_>>(),
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), orders.len(), "every order decided, once");
    let by_id: HashMap<uuid::Uuid, _> = rows.into_iter().map(|row| (row.0, row)).collect();
    let mut taken: HashMap<i64, i64> = HashMap::new();
    let mut succeeded = 0;
    for order in orders {
        let (_, status, reason, named) = &by_id[&order.transaction_id.0];
        match status.as_str() {
            "succeeded" => {
                succeeded += 1;
                for line in order.lines.iter() {
                    *taken.entry(line.product_id.get()).or_default() += line.quantity.get();
                }
            }
            "rejected" => {
                assert_eq!(reason.as_deref(), Some("out_of_stock"), "{order:?}");
                if order.lines.len() > 1 {
                    let named = named.expect("a rejected order names a line");
                    assert!(
                        order
                            .lines
                            .iter()
                            .any(|line| line.product_id.get() == named)
                    );
                }
            }
            other => panic!("status {other}"),
        }
    }
    for (&product, &units) in initial {
        let stock: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
            .bind(product)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert!(stock >= 0, "product {product} oversold");
        assert_eq!(
            units - stock,
            taken.get(&product).copied().unwrap_or(0),
            "product {product}: stock fell by exactly the units of the successes"
        );
    }
    assert!(succeeded > 0, "some orders succeed");
    assert_eq!(
        order_seqs(&app.pool, &today()).await,
        (1..=succeeded).collect::<Vec<i64>>(),
        "numbers gapless"
    );
}

/// Three products on three partitions.
async fn products(app: &TestApp, stock: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(insert_product(&app.pool, stock).await);
    }
    ids
}

/// `count` orders over `products`, every other one listing them in the opposite order, with
/// quantities 1 to 3.
fn opposite_orders(products: &[i64], count: usize, first_user: i64) -> Vec<Order> {
    (0..count)
        .map(|n| {
            let mut lines: Vec<(i64, i64)> = products
                .iter()
                .enumerate()
                .map(|(slot, &product)| (product, 1 + ((n + slot) % 3) as i64))
                .collect();
            if n % 2 == 1 {
                lines.reverse();
            }
            order_request(first_user + n as i64, &lines)
        })
        .collect()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn orders_in_opposite_item_orders_through_the_system_are_all_or_nothing(pool: PgPool) {
    let owned = spawn_app(pool, Options::default()).await;
    let app = &owned;
    let products = products(app, 40).await;
    let initial: HashMap<i64, i64> = products.iter().map(|&p| (p, 40)).collect();

    // 60 concurrent orders over the same three products, half of them listed backwards.
    let requests = opposite_orders(&products, 60, 1);
    let responses = join_all(requests.iter().map(|order| {
        let lines: Vec<(i64, i64)> = order
            .lines
            .iter()
            .map(|line| (line.product_id.get(), line.quantity.get()))
            .collect();
        let user = order.user_id.get();
        async move { app.order(user, &lines).await }
    }))
    .await;
    let views: Vec<Value> = join_all(responses.iter().map(|&id| app.wait_final(id))).await;
    // The orders the API made are what PostgreSQL holds; check them as placed.
    let placed: Vec<Order> = views
        .iter()
        .zip(&requests)
        .map(|(view, request)| Order {
            transaction_id: allot_shared::TransactionId(
                view["transaction_id"].as_str().unwrap().parse().unwrap(),
            ),
            ..request.clone()
        })
        .collect();
    assert_promises(app, &placed, &initial).await;
    // 40 units of each, each order taking 1 to 3 of each: the demand (120 of each) is far above
    // the supply, so some orders were refused.
    assert!(views.iter().any(|v| v["status"] == "rejected"));
    owned.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn racing_deciders_on_opposite_item_orders_and_single_buys_never_deadlock(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let products = products(&app, 150).await;
    let initial: HashMap<i64, i64> = products.iter().map(|&p| (p, 150)).collect();
    let deciders: Vec<_> = (0..4)
        .map(|_| app.decider(Arc::new(SystemClock), chrono_tz::UTC))
        .collect();

    // Each round, four deciders commit at once: two take orders of all three products listed
    // in opposite orders (routed to the partition of the smallest product), two take single
    // buys of the other products, in their own partitions. With products locked in any order
    // but one, the first two would deadlock.
    let mut all = Vec::new();
    for round in 0..12 {
        let user = 1000 * (round + 1);
        let forward = opposite_orders(&products, 6, user)
            .into_iter()
            .step_by(2)
            .collect::<Vec<_>>();
        let backward = opposite_orders(&products, 6, user + 100)
            .into_iter()
            .skip(1)
            .step_by(2)
            .collect::<Vec<_>>();
        let singles_b: Vec<Order> = (0..4)
            .map(|n| order_request(user + 200 + n, &[(products[1], 1)]))
            .collect();
        let singles_c: Vec<Order> = (0..4)
            .map(|n| order_request(user + 300 + n, &[(products[2], 2)]))
            .collect();
        let batches = [
            (partition_of(products[0]), forward),
            (partition_of(products[0]), backward),
            (partition_of(products[1]), singles_b),
            (partition_of(products[2]), singles_c),
        ];
        let results = join_all(
            batches
                .iter()
                .zip(&deciders)
                .map(|((partition, orders), decider)| process_orders(decider, *partition, orders)),
        )
        .await;
        for result in results {
            // A deadlock would surface here: PostgreSQL aborts one of the transactions.
            let outcome = result.expect("every batch commits at its first attempt");
            assert_eq!(outcome.replayed + outcome.dead_lettered, 0);
        }
        all.extend(batches.into_iter().flat_map(|(_, orders)| orders));
    }
    assert_promises(&app, &all, &initial).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_order_spanning_partitions_races_single_buys_of_its_products(pool: PgPool) {
    let owned = spawn_app(pool, Options::default()).await;
    let app = &owned;
    let (p, q) = (
        app.create_product("left", 30).await,
        app.create_product("right", 30).await,
    );
    assert_ne!(partition_of(p), partition_of(q));
    let initial: HashMap<i64, i64> = [(p, 30), (q, 30)].into();

    // 40 orders of both, 40 single buys of each, all at once: the orders are decided by p's
    // partition, the single buys of q by q's, against the same row of q.
    let mut requests: Vec<(i64, Vec<(i64, i64)>)> = Vec::new();
    for n in 0..40 {
        requests.push((n + 1, vec![(q, 1), (p, 1)]));
        requests.push((n + 101, vec![(p, 1)]));
        requests.push((n + 201, vec![(q, 1)]));
    }
    let ids = join_all(requests.iter().map(|(user, lines)| async move {
        if lines.len() == 1 {
            app.buy(*user, lines[0].0, lines[0].1).await
        } else {
            app.order(*user, lines).await
        }
    }))
    .await;
    join_all(ids.iter().map(|&id| app.wait_final(id))).await;
    let placed: Vec<Order> = ids
        .iter()
        .zip(&requests)
        .map(|(&id, (user, lines))| Order {
            transaction_id: id,
            ..order_request(*user, lines)
        })
        .collect();
    assert_promises(app, &placed, &initial).await;
    // Demand (80 of each) is above supply (30): both sell out, since single buys alone could
    // take all of either.
    assert_eq!(app.product_stock(p).await, 0);
    assert_eq!(app.product_stock(q).await, 0);
    owned.shutdown().await;
}
