//! Requests answered 503 because the broker's confirm did not come, although the broker may
//! have stored the message: they must never be sold, and if a worker sold one first, the API
//! must say 202, not 503. The primary key on the transaction id decides which happened.

use crate::helpers::{
    Options, Through, insert_product, partition_of, process, request, spawn_app, spawn_app_through,
    stock_of, test_amqp_url, wait_for,
};
use allot_shared::stored::{self, Withdrawal};
use allot_shared::{Clock, SystemClock};
use allot_tests::proxy::Proxy;
use reqwest::StatusCode;
use sqlx::PgPool;
use std::sync::Arc;

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_withdrawn_request_is_never_sold_when_its_message_arrives(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = insert_product(&app.pool, 5).await;
    let refused = request(1, product, 2);

    let withdrawal = stored::withdraw(
        &app.pool,
        &[refused.clone().into()],
        partition_of(product),
        SystemClock.now(),
    )
    .await
    .unwrap();
    assert_eq!(withdrawal, [Withdrawal::Withdrawn]);

    // The broker had stored the message after all; a worker now receives it.
    let decider = app.decider(Arc::new(SystemClock), chrono_tz::UTC);
    let outcome = process(
        &decider,
        partition_of(product),
        std::slice::from_ref(&refused),
    )
    .await
    .unwrap();
    assert_eq!(
        (outcome.succeeded, outcome.rejected, outcome.replayed),
        (0, 0, 1)
    );
    assert_eq!(stock_of(&app.pool, product).await, 5, "no stock taken");
    assert_eq!(
        app.count("SELECT count(*) FROM order_counters").await,
        0,
        "no number used"
    );
    let view = app.transaction(refused.transaction_id).await;
    assert_eq!(
        (view["status"].as_str(), view["reason"].as_str()),
        (Some("rejected"), Some("not_accepted"))
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_request_a_worker_decided_first_cannot_be_withdrawn(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = insert_product(&app.pool, 5).await;
    let sold = request(1, product, 2);
    let decider = app.decider(Arc::new(SystemClock), chrono_tz::UTC);
    process(&decider, partition_of(product), std::slice::from_ref(&sold))
        .await
        .unwrap();

    // One message carried both: the one decided first was accepted, its batch-mate withdrawn.
    let undecided = request(2, product, 1);
    let withdrawal = stored::withdraw(
        &app.pool,
        &[sold.clone().into(), undecided.clone().into()],
        partition_of(product),
        SystemClock.now(),
    )
    .await
    .unwrap();
    assert_eq!(
        withdrawal,
        [Withdrawal::AlreadyDecided, Withdrawal::Withdrawn],
        "the API must then answer 202 for the first, 503 for the second"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
            .await,
        1
    );
    assert_eq!(stock_of(&app.pool, product).await, 3);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_unconfirmed_publish_is_refused_with_503_and_never_sold(pool: PgPool) {
    // The API reaches the broker through a proxy that, from the order on, holds back what the
    // broker answers: the publish is delivered and stored, its confirm never arrives, and
    // after the confirm timeout the API gives up on it. (A zero timeout alone was not enough:
    // a confirm that had already arrived when it was first awaited was taken, and the API
    // rightly answered 202, in two of three runs on a quiet machine.)
    let (broker, amqp_url) = Proxy::in_front_of(&test_amqp_url()).await.unwrap();
    let through = Through {
        redis_url: None,
        amqp_url: Some(amqp_url),
    };
    let options = Options {
        confirm_timeout_ms: 0,
        ..Options::without_worker()
    };
    let mut app = spawn_app_through(pool, options, through).await;
    let product = app.create_product("unconfirmed", 5).await;
    broker.hold_replies();

    // With the replies held no confirm can arrive, so the first request is refused (main's
    // way around a confirm already there at the zero timeout's first poll, sending until one
    // is refused, is not needed).
    let response = app.add_to_cart(1, product, 1).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "broker_unavailable");
    broker.release_replies();

    // The broker stored the message although it was never confirmed to the API...
    wait_for("the unconfirmed message to reach its queue", || async {
        (app.queue_depth(partition_of(product)).await == 1).then_some(())
    })
    .await;
    let withdrawn = "SELECT count(*) FROM transactions WHERE reason = 'not_accepted'";
    assert_eq!(
        app.count(withdrawn).await,
        1,
        "the API withdrew the request"
    );

    // ...and a worker that receives it must not sell it.
    app.start_worker(Arc::new(SystemClock));
    wait_for("the queue to drain", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    // A graceful stop finishes the batch in flight; an unacked one would return to its queue.
    // So an empty queue after the stop proves the message was committed and acked. (A second
    // request cannot prove it: with a worker running, it may be decided before the API's
    // withdrawal, and then the API rightly answers 202.)
    app.stop_worker().await;
    assert_eq!(
        app.total_queue_depth().await,
        0,
        "the message was consumed and acked"
    );
    assert_eq!(app.product_stock(product).await, 5, "nothing sold");
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 1);
    assert_eq!(app.count(withdrawn).await, 1, "still withdrawn, not sold");
    assert_eq!(
        app.count("SELECT count(*) FROM transactions WHERE status = 'succeeded'")
            .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM order_counters").await, 0);
    app.shutdown().await;
}
