//! A dependency down, for this test's API alone (a proxy between it and the service, cut and
//! restored): every refusal is a `503` with `Retry-After` and the code of its reason, nothing
//! of a refused request is written, reads of decided transactions fall back to PostgreSQL, and
//! the API takes requests again once the service is back.

use crate::helpers::{
    Options, Through, assert_error, spawn_app_through, test_amqp_url, test_redis_url, wait_for,
};
use allot_tests::client::{Answer, Order, Unavailable};
use allot_tests::proxy::Proxy;
use reqwest::StatusCode;
use sqlx::PgPool;

/// Asserts that `answer` is the refusal `reason` with `Retry-After: retry_after`.
fn assert_refused_for(answer: &Answer, reason: Unavailable, retry_after: &str) {
    match answer {
        Answer::Refused {
            reason: got,
            retry_after: after,
            ..
        } => assert_eq!((*got, after.as_str()), (reason, retry_after), "{answer:?}"),
        other => panic!("expected 503 {}, got {}", reason.code(), other.describe()),
    }
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_redis_outage_refuses_orders_with_redis_unavailable_and_reads_fall_back(pool: PgPool) {
    let (redis, redis_url) = Proxy::in_front_of(&test_redis_url()).await.unwrap();
    let through = Through {
        redis_url: Some(redis_url),
        amqp_url: None,
    };
    let app = spawn_app_through(pool, Options::default(), through).await;
    let product = app.create_product("Widget", 10).await;
    let decided = app.buy(1, product, 1).await;
    assert_eq!(app.wait_final(decided).await["status"], "succeeded");
    let view = app.transaction(decided).await;

    redis.cut();
    // Buying needs the pending record: refused, at once, with the reason in the code.
    let order = Order {
        user_id: 2,
        product_id: product,
        quantity: 1,
    };
    let answer = app.api().add_to_cart(order).await;
    assert_refused_for(&answer, Unavailable::RedisUnavailable, "1");
    // A decided transaction is read from PostgreSQL, the same body.
    assert_eq!(app.transaction(decided).await, view);
    // One PostgreSQL does not know might be pending: not 404, but the same 503.
    let unknown = uuid::Uuid::new_v4();
    let response = app.get(&format!("/api/v1/transaction/{unknown}")).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "redis_unavailable",
    )
    .await;
    // Nothing of the refused request was written.
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 1);
    assert_eq!(app.total_queue_depth().await, 0);

    redis.restore();
    let accepted = wait_for("the API to accept again with Redis back", || async {
        match app
            .api()
            .add_to_cart(Order {
                user_id: 3,
                ..order
            })
            .await
        {
            Answer::Accepted(id) => Some(id),
            _ => None,
        }
    })
    .await;
    let view = app.wait_final(allot_shared::TransactionId(accepted)).await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(app.product_stock(product).await, 8, "user 2 bought nothing");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_broker_outage_refuses_orders_with_broker_unavailable(pool: PgPool) {
    let (broker, amqp_url) = Proxy::in_front_of(&test_amqp_url()).await.unwrap();
    let through = Through {
        redis_url: None,
        amqp_url: Some(amqp_url),
    };
    let app = spawn_app_through(pool, Options::without_worker(), through).await;
    let product = app.create_product("Widget", 10).await;
    app.buy(1, product, 1).await;

    broker.cut();
    let order = Order {
        user_id: 2,
        product_id: product,
        quantity: 1,
    };
    // The publisher learns of the dropped connection at once or at its next publish: every
    // answer from the cut on is the refusal, never a 202.
    for user in 2..5 {
        let answer = app
            .api()
            .add_to_cart(Order {
                user_id: user,
                ..order
            })
            .await;
        assert_refused_for(&answer, Unavailable::BrokerUnavailable, "2");
    }
    assert_eq!(app.total_queue_depth().await, 1, "only the first is queued");
    // A publish sent as the connection dropped is withdrawn (`not_accepted`): never sold.
    let recorded = "SELECT count(*) FROM transactions WHERE reason IS DISTINCT FROM 'not_accepted'";
    assert_eq!(app.count(recorded).await, 0);

    broker.restore();
    wait_for("the API to accept again with the broker back", || async {
        let answer = app
            .api()
            .add_to_cart(Order {
                user_id: 9,
                ..order
            })
            .await;
        matches!(answer, Answer::Accepted(_)).then_some(())
    })
    .await;
    assert_eq!(app.total_queue_depth().await, 2);
    app.shutdown().await;
}
