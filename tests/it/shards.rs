//! A hot product spread over several partitions (`shards`): its purchases are decided by as many
//! partitions at once, each from its own share of the stock, with exact rebalancing: it never
//! oversells and never undersells.
//!
//! Undersell is checked decision by decision: a trigger in the test's database records, inside
//! the very transaction that stores each `out_of_stock` rejection (after it wrote its stock),
//! the product's stock (its row plus its shares) and how many of its shares that transaction
//! locked or wrote. A rejection may only come from a transaction that held every share while
//! the product had nothing left for it.

use crate::helpers::{
    Options, PARTITIONS, TestApp, accepted_id, assert_error, order_request, order_seqs,
    partition_of, process_orders, spawn_app, today, wait_for,
};
use allot_shared::partition::shard_partition;
use allot_shared::{Order, PartitionId, ProductId, Shard, SystemClock, TransactionId};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Records every `out_of_stock` rejection as its transaction stores it: the product's stock
/// then, its shares, and how many of them the rejecting transaction locked or wrote.
async fn audit_rejections(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE rejection_audit (transaction_id uuid, product_id bigint, stock bigint, \
                                       shares bigint, shares_held bigint); \
         CREATE FUNCTION audit_rejection() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.status = 'rejected' AND NEW.reason = 'out_of_stock' THEN \
             INSERT INTO rejection_audit \
             SELECT NEW.id, p.id, \
                    p.stock + COALESCE(sum(s.stock), 0), \
                    count(s.shard), \
                    count(s.shard) FILTER (WHERE s.xmin = pg_current_xact_id()::xid \
                                              OR s.xmax = pg_current_xact_id()::xid) \
             FROM products p LEFT JOIN product_shares s ON s.product_id = p.id \
             WHERE p.id = COALESCE(NEW.reason_product_id, NEW.product_id) GROUP BY p.id; \
           END IF; \
           RETURN NEW; \
         END $$; \
         CREATE TRIGGER audit_rejection AFTER INSERT ON transactions \
           FOR EACH ROW EXECUTE FUNCTION audit_rejection();",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// The audit rows: (stock, shares, shares held) of each `out_of_stock` rejection.
async fn audited(pool: &PgPool) -> Vec<(i64, i64, i64)> {
    sqlx::query_as("SELECT stock, shares, shares_held FROM rejection_audit")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn create_sharded(app: &TestApp, name: &str, stock: i64, shards: i64) -> i64 {
    let response = app
        .post_admin(
            "/api/v1/products",
            &json!({"name": name, "stock": stock, "shards": shards}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_i64().unwrap();
    assert_eq!(
        body,
        json!({"id": id, "name": name, "stock": stock, "shards": shards})
    );
    id
}

async fn product(app: &TestApp, id: i64) -> Value {
    let response = app.get(&format!("/api/v1/products/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// The shares of `product` in shard order.
async fn shares(pool: &PgPool, product: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT stock FROM product_shares WHERE product_id = $1 ORDER BY shard")
        .bind(product)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Fires one purchase of one unit per buyer in `buyers`, all at once; returns the ids.
async fn buy_all(app: &TestApp, product: i64, buyers: std::ops::Range<i64>) -> Vec<TransactionId> {
    let responses = join_all(buyers.map(|user| app.add_to_cart(user, product, 1))).await;
    join_all(responses.into_iter().map(accepted_id)).await
}

/// Waits for every transaction to be final; returns (succeeded, rejected out_of_stock).
async fn outcomes(app: &TestApp, ids: &[TransactionId]) -> (usize, usize) {
    let views = join_all(ids.iter().map(|&id| app.wait_final(id))).await;
    let succeeded = views.iter().filter(|v| v["status"] == "succeeded").count();
    let refused = views
        .iter()
        .filter(|v| v["status"] == "rejected" && v["reason"] == "out_of_stock")
        .count();
    assert_eq!(
        succeeded + refused,
        ids.len(),
        "only sales and out_of_stock"
    );
    (succeeded, refused)
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn four_shards_sell_exactly_the_stock_and_refuse_only_when_all_of_it_is_gone(pool: PgPool) {
    const UNITS: i64 = 100;
    audit_rejections(&pool).await;
    let app = spawn_app(pool.clone(), Options::default()).await;
    let hot = create_sharded(&app, "hot", UNITS, 4).await;
    assert_eq!(shares(&pool, hot).await, vec![25, 25, 25, 25]);

    let ids = buy_all(&app, hot, 1..3 * UNITS + 1).await;
    let (succeeded, refused) = outcomes(&app, &ids).await;
    assert_eq!(succeeded as i64, UNITS, "exactly the stock is sold");
    assert_eq!(refused as i64, 2 * UNITS);
    assert_eq!(
        product(&app, hot).await,
        json!({"id": hot, "name": "hot", "stock": 0, "shards": 4})
    );
    assert_eq!(shares(&pool, hot).await, vec![0, 0, 0, 0]);
    let expected: Vec<i64> = (1..=UNITS).collect();
    assert_eq!(order_seqs(&pool, &today()).await, expected, "gapless");

    // Every rejection was decided under the locks of all four shares, with nothing left.
    let audit = audited(&pool).await;
    assert_eq!(audit.len() as i64, 2 * UNITS);
    for (stock, shares, held) in audit {
        assert_eq!(
            (stock, shares, held),
            (0, 4, 4),
            "a rejection while stock remained"
        );
    }
    // The purchases were decided by the four partitions of the product's shards.
    let partitions: BTreeSet<i32> =
        sqlx::query_scalar("SELECT DISTINCT partition FROM transactions WHERE product_id = $1")
            .bind(hot)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        partitions.len(),
        4,
        "spread over 4 partitions: {partitions:?}"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn changing_the_shards_and_restocking_during_a_sale_lose_and_oversell_nothing(pool: PgPool) {
    const UNITS: i64 = 120;
    const RESTOCK: i64 = 30;
    const BUYERS: i64 = 300;
    audit_rejections(&pool).await;
    let app = spawn_app(pool.clone(), Options::default()).await;
    let hot = create_sharded(&app, "hot", UNITS, 4).await;

    // The first half of the buyers while staff change the shards and restock; the second half
    // after: enough demand after the restock to sell every unit, whenever the first half ends.
    let sale = buy_all(&app, hot, 1..BUYERS / 2 + 1);
    let staff = async {
        // Staff change the shards back and forth and restock while purchases are decided.
        for (shards, stock_added) in [(2, false), (1, true), (3, false), (4, false)] {
            wait_for("some purchases to be decided", || async {
                let decided = app
                    .count("SELECT count(*) FROM transactions WHERE status <> 'pending'")
                    .await;
                (decided > 0).then_some(())
            })
            .await;
            let response = app.patch_product(hot, &json!({"shards": shards})).await;
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["shards"],
                json!(if shards == 1 { None } else { Some(shards) })
            );
            if stock_added {
                let response = app
                    .post_admin(
                        &format!("/api/v1/products/{hot}/restock"),
                        &json!({"quantity": RESTOCK}),
                    )
                    .await;
                assert_eq!(response.status(), StatusCode::OK);
            }
        }
    };
    let (first, ()) = tokio::join!(sale, staff);
    let second = buy_all(&app, hot, BUYERS / 2 + 1..BUYERS + 1).await;
    let ids = [first, second].concat();
    let (succeeded, _) = outcomes(&app, &ids).await;
    assert_eq!(
        succeeded as i64,
        UNITS + RESTOCK,
        "demand above supply: every unit sold, none twice"
    );
    assert_eq!(
        product(&app, hot).await,
        json!({"id": hot, "name": "hot", "stock": 0, "shards": 4})
    );
    assert_eq!(shares(&pool, hot).await, vec![0, 0, 0, 0]);
    let raw: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(hot)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(raw, 0, "a sharded product's own row holds no stock");
    let expected: Vec<i64> = (1..=UNITS + RESTOCK).collect();
    assert_eq!(order_seqs(&pool, &today()).await, expected, "gapless");
    for (stock, shares, held) in audited(&pool).await {
        assert_eq!(stock, 0, "a rejection while stock remained");
        assert_eq!(held, shares, "a rejection without every share locked");
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_sharded_product_is_sold_in_orders_of_several_products_and_held_from_all_its_shares(
    pool: PgPool,
) {
    let app = spawn_app(pool.clone(), Options::default()).await;
    let hot = create_sharded(&app, "hot", 3, 3).await;
    let plain = app.create_product("plain", 5).await;
    assert_eq!(shares(&pool, hot).await, vec![1, 1, 1]);

    // Two units of three shares of one unit each: the order takes them from the pool.
    let first = app.order(7, &[(hot, 2), (plain, 1)]).await;
    let view = app.wait_final(first).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(product(&app, hot).await["stock"], 1);
    assert_eq!(shares(&pool, hot).await.iter().sum::<i64>(), 1);
    assert_eq!(app.product_stock(plain).await, 4);

    // All or nothing: one unit left, two asked for.
    let second = app.order(8, &[(plain, 1), (hot, 2)]).await;
    let view = app.wait_final(second).await;
    assert_eq!(
        (&view["status"], &view["reason"], &view["reason_product_id"]),
        (&json!("rejected"), &json!("out_of_stock"), &json!(hot))
    );
    assert_eq!(app.product_stock(plain).await, 4, "nothing taken");

    // A hold takes the last unit from the shares and gives it back when cancelled.
    let hold = app.hold(9, hot, 1, 300).await;
    assert_eq!(app.wait_final(hold).await["status"], "held");
    assert_eq!(
        product(&app, hot).await,
        json!({"id": hot, "name": "hot", "stock": 0, "held": 1, "shards": 3})
    );
    let response = app.settle(hold, "cancel", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    wait_for("the cancelled hold's unit to come back", || async {
        (product(&app, hot).await["stock"] == 1).then_some(())
    })
    .await;
    assert_eq!(shares(&pool, hot).await.iter().sum::<i64>(), 1);
    let expected: Vec<i64> = vec![1];
    assert_eq!(order_seqs(&pool, &today()).await, expected);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn restocks_and_new_shards_split_the_stock_evenly(pool: PgPool) {
    let app = spawn_app(pool.clone(), Options::without_worker()).await;
    let hot = create_sharded(&app, "hot", 10, 4).await;
    assert_eq!(shares(&pool, hot).await, vec![3, 3, 2, 2]);
    let response = app
        .post_admin(
            &format!("/api/v1/products/{hot}/restock"),
            &json!({"quantity": 5}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"id": hot, "name": "hot", "stock": 15, "shards": 4})
    );
    assert_eq!(shares(&pool, hot).await, vec![4, 4, 4, 3]);

    let response = app.patch_product(hot, &json!({"shards": 2})).await;
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"id": hot, "name": "hot", "stock": 15, "shards": 2})
    );
    assert_eq!(shares(&pool, hot).await, vec![8, 7]);
    let response = app.patch_product(hot, &json!({"shards": 1})).await;
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"id": hot, "name": "hot", "stock": 15})
    );
    assert!(shares(&pool, hot).await.is_empty());
    let response = app.patch_product(hot, &json!({"shards": 3})).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(shares(&pool, hot).await, vec![5, 5, 5]);
    // The listing shows the same.
    let page: Value = app.get("/api/v1/products").await.json().await.unwrap();
    assert_eq!(
        page["products"],
        json!([{"id": hot, "name": "hot", "stock": 15, "shards": 3}])
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn bad_shards_are_refused_and_nothing_is_written(pool: PgPool) {
    let app = spawn_app(pool.clone(), Options::without_worker()).await;
    let plain = app.create_product("plain", 10).await;
    let hot = create_sharded(&app, "hot", 8, 2).await;
    let before = (product(&app, plain).await, product(&app, hot).await);
    let above = i64::from(PARTITIONS) + 1;
    for shards in [
        json!(0),
        json!(-1),
        json!(above),
        json!(2.5),
        json!("2"),
        json!(true),
    ] {
        let response = app
            .post_admin(
                "/api/v1/products",
                &json!({"name": "bad", "stock": 1, "shards": shards}),
            )
            .await;
        assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        for id in [plain, hot] {
            let response = app.patch_product(id, &json!({"shards": shards})).await;
            assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        }
    }
    // `null` in a patch, and shards with a per-buyer limit, either way round.
    let response = app.patch_product(hot, &json!({"shards": null})).await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    let response = app
        .post_admin(
            "/api/v1/products",
            &json!({"name": "bad", "stock": 1, "shards": 2, "max_per_buyer": 1}),
        )
        .await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    let response = app.patch_product(hot, &json!({"max_per_buyer": 2})).await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    let response = app
        .patch_product(plain, &json!({"max_per_buyer": 2, "shards": 2}))
        .await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    // Without the staff token.
    let response = app
        .client
        .patch(app.url(&format!("/api/v1/products/{plain}")))
        .json(&json!({"shards": 2}))
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;

    assert_eq!(
        (product(&app, plain).await, product(&app, hot).await),
        before
    );
    assert_eq!(app.count("SELECT count(*) FROM products").await, 2);
    assert_eq!(shares(&pool, hot).await, vec![4, 4]);
    assert!(shares(&pool, plain).await.is_empty());
    // shards 1 is a product as any other.
    let response = app
        .post_admin(
            "/api/v1/products",
            &json!({"name": "one", "stock": 3, "shards": 1}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"id": body["id"], "name": "one", "stock": 3}));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn deciders_racing_on_shares_orders_and_restocks_never_deadlock_nor_oversell(pool: PgPool) {
    audit_rejections(&pool).await;
    let app = spawn_app(pool.clone(), Options::without_worker()).await;
    let hot = create_sharded(&app, "hot", 40, 4).await;
    let plain = app.create_product("plain", 1000).await;
    let deciders: Vec<_> = (0..5)
        .map(|_| app.decider(Arc::new(SystemClock), chrono_tz::UTC))
        .collect();
    let purchase = |user: i64, shard: u16| {
        let mut order = order_request(user, &[(hot, 1)]);
        order.shard = Some(Shard(shard));
        order
    };

    // Each round, five deciders commit at once, each in a transaction of its own: the four
    // shards' partitions their own purchases (share-locking the product), the product's own
    // partition orders of both products (locking it for update, and every share); every other
    // round staff restock 2 units meanwhile. Demand (14 a round) is far above supply.
    let mut all: Vec<Order> = Vec::new();
    for round in 0..10i64 {
        let user = 1000 * (round + 1);
        let mut batches: Vec<(PartitionId, Vec<Order>)> = (0..4u16)
            .map(|shard| {
                let product = ProductId::try_from(hot).unwrap();
                let partition = shard_partition(product, Shard(shard), PARTITIONS);
                let orders = (0..3)
                    .map(|n| purchase(user + i64::from(shard) * 10 + n, shard))
                    .collect();
                (partition, orders)
            })
            .collect();
        let orders = (0..2)
            .map(|n| order_request(user + 100 + n, &[(plain, 1), (hot, 1)]))
            .collect();
        batches.push((partition_of(hot.min(plain)), orders));
        let decided = join_all(
            batches
                .iter()
                .zip(&deciders)
                .map(|((partition, orders), decider)| process_orders(decider, *partition, orders)),
        );
        let restock = async {
            if round % 2 == 0 {
                let response = app
                    .post_admin(
                        &format!("/api/v1/products/{hot}/restock"),
                        &json!({"quantity": 2}),
                    )
                    .await;
                assert_eq!(response.status(), StatusCode::OK);
            }
        };
        let (results, ()) = tokio::join!(decided, restock);
        for result in results {
            // A deadlock would surface here: PostgreSQL aborts one of the transactions.
            let outcome = result.expect("every batch commits");
            assert_eq!(outcome.replayed + outcome.dead_lettered, 0);
        }
        all.extend(batches.into_iter().flat_map(|(_, orders)| orders));
    }
    let sold: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(l.quantity), 0)::bigint FROM transaction_lines l \
         JOIN transactions t ON t.id = l.transaction_id \
         WHERE l.product_id = $1 AND t.status = 'succeeded'",
    )
    .bind(hot)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sold, 40 + 5 * 2, "every unit sold once, none twice");
    assert_eq!(product(&app, hot).await["stock"], 0);
    assert_eq!(shares(&pool, hot).await, vec![0, 0, 0, 0]);
    let decided = app
        .count("SELECT count(*) FROM transactions WHERE status IN ('succeeded', 'rejected')")
        .await;
    assert_eq!(decided, all.len() as i64, "each purchase decided once");
    let succeeded = app
        .count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
        .await;
    let expected: Vec<i64> = (1..=succeeded).collect();
    assert_eq!(order_seqs(&pool, &today()).await, expected, "gapless");
    let audit = audited(&pool).await;
    assert_eq!(audit.len() as i64, all.len() as i64 - succeeded);
    for (stock, shares, held) in audit {
        assert_eq!(
            (stock, shares, held),
            (0, 4, 4),
            "a rejection while stock remained"
        );
    }
    app.shutdown().await;
}
