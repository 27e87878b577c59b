//! `Idempotency-Key` on `addToCart`: one transaction per key, buyer and request, whatever the
//! races, retries and refusals; the same answer replayed; another request with the key is 422;
//! bad keys are 400; and a key whose first attempt was cut off is taken over with the same
//! transaction id.

use crate::helpers::{Options, TestApp, assert_error, spawn_app, wait_for};
use allot_api::idempotency::{parse_key, record_key};
use allot_shared::stored;
use allot_shared::{Clock, SystemClock, TransactionId, UserId};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;

const ADD_TO_CART: &str = "/api/v1/order/addToCart";

async fn buy_keyed(
    app: &TestApp,
    key: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url(ADD_TO_CART))
        .header("idempotency-key", key)
        .json(body);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// The transaction id of a 202, checking the whole answer; and whether it was a replay.
async fn accepted(response: reqwest::Response) -> (TransactionId, bool) {
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let replayed = match response.headers().get("idempotent-replayed") {
        Some(value) => {
            assert_eq!(value, "true");
            true
        }
        None => false,
    };
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["transaction_id"].as_str().unwrap().to_owned();
    assert_eq!(body, json!({"transaction_id": id, "status": "pending"}));
    assert_eq!(location, format!("/api/v1/transaction/{id}"));
    (TransactionId(id.parse().unwrap()), replayed)
}

async fn transactions_of(app: &TestApp, user: i64) -> i64 {
    app.count(&format!(
        "SELECT count(*) FROM transactions WHERE user_id = {user}"
    ))
    .await
}

/// The Redis record of `key` for `user`.
fn record(app: &TestApp, user: i64, key: &str) -> String {
    record_key(
        &app.api_config.common.redis_prefix,
        UserId::try_from(user).unwrap(),
        &parse_key(key.as_bytes()).unwrap(),
    )
}

/// Makes a record look like an attempt that was cut off after claiming the key: in flight,
/// its lease run out (or not, with `lease_ms` in the future), its answer lost.
async fn cut_off(app: &TestApp, record: &str, lease_ms: u64) {
    let _: () = redis::pipe()
        .hset(record, "state", "in_flight")
        .hset(record, "lease", lease_ms)
        .hdel(record, "answer")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn identical_requests_racing_with_one_key_make_one_transaction(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("Sneaker", 100).await;
    let (alice, token) = app.buyer("alice").await;
    let body = json!({"product_id": product, "quantity": 1});

    let racing = (0..12).map(|_| {
        let request = app
            .client
            .post(app.url(ADD_TO_CART))
            .bearer_auth(&token)
            .header("idempotency-key", "\"double-click-1\"")
            .json(&body);
        async move { request.send().await.unwrap() }
    });
    let answers = futures::future::join_all(racing).await;
    let mut ids = std::collections::BTreeSet::new();
    let mut in_flight = 0;
    for response in answers {
        match response.status() {
            StatusCode::ACCEPTED => {
                ids.insert(accepted(response).await.0);
            }
            StatusCode::CONFLICT => {
                assert_eq!(response.headers()["retry-after"], "1");
                assert_error(response, StatusCode::CONFLICT, "idempotency_key_in_flight").await;
                in_flight += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        ids.len(),
        1,
        "every 202 names the same transaction ({in_flight} were 409)"
    );
    let id = *ids.first().unwrap();
    assert_eq!(app.wait_final_as(id, &token).await["status"], "succeeded");
    // Once settled, every retry is the same answer, marked as a replay.
    for _ in 0..3 {
        let response = app
            .client
            .post(app.url(ADD_TO_CART))
            .bearer_auth(&token)
            .header("idempotency-key", "double-click-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(accepted(response).await, (id, true));
    }
    assert_eq!(transactions_of(&app, alice).await, 1);
    assert_eq!(app.product_stock(product).await, 99, "one unit sold");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_replay_after_the_decision_answers_the_same_transaction(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("Sneaker", 100).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 2});
    let (id, replayed) = accepted(buy_keyed(&app, "k-1", &body, &[]).await).await;
    assert!(!replayed);
    let decided = app.wait_final(id).await;

    // The same request, however it is spelt: same id, a 202 as the first answer was.
    let respelt = format!(r#"{{ "quantity": 2, "product_id": {product},  "user_id": 7 }}"#);
    let response = app
        .client
        .post(app.url(ADD_TO_CART))
        .header("idempotency-key", "k-1")
        .header("content-type", "application/json")
        .body(respelt)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted(response).await, (id, true));
    // With Prefer: wait, the replay answers the final transaction.
    let response = buy_keyed(&app, "\"k-1\"", &body, &[("prefer", "wait=5")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.headers()["preference-applied"], "wait=5");
    assert_eq!(response.json::<Value>().await.unwrap(), decided);

    // The key is the buyer's: another buyer with the same key makes its own transaction.
    let other = json!({"user_id": 8, "product_id": product, "quantity": 2});
    let (other_id, replayed) = accepted(buy_keyed(&app, "k-1", &other, &[]).await).await;
    assert!(!replayed);
    assert_ne!(other_id, id);
    app.wait_final(other_id).await;
    assert_eq!(
        (
            transactions_of(&app, 7).await,
            transactions_of(&app, 8).await
        ),
        (1, 1)
    );
    assert_eq!(app.product_stock(product).await, 96);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_first_answer_given_with_prefer_wait_is_replayed_for_the_same_transaction(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("Sneaker", 1).await;
    let (_, token) = app.buyer("bob").await;
    let request = |wait: Option<&'static str>| {
        let mut request = app
            .client
            .post(app.url(ADD_TO_CART))
            .bearer_auth(&token)
            .header("idempotency-key", "bob-1")
            .json(&json!({"product_id": product, "quantity": 1}));
        if let Some(wait) = wait {
            request = request.header("prefer", wait);
        }
        request.send()
    };
    let first = request(Some("wait=10")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let view: Value = first.json().await.unwrap();
    assert_eq!(view["status"], "succeeded");
    let id = TransactionId(view["transaction_id"].as_str().unwrap().parse().unwrap());
    assert_eq!(accepted(request(None).await.unwrap()).await, (id, true));
    let again = request(Some("wait=10")).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap(), view);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_same_key_with_another_request_is_422_and_writes_nothing(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("Sneaker", 100).await;
    let other_product = app.create_product("Boot", 100).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 1});
    let (id, _) = accepted(buy_keyed(&app, "k-2", &body, &[]).await).await;
    let before = (app.total_queue_depth().await, app.redis_key_count().await);
    for another in [
        json!({"user_id": 7, "product_id": product, "quantity": 2}),
        json!({"user_id": 7, "product_id": other_product, "quantity": 1}),
    ] {
        let response = buy_keyed(&app, "k-2", &another, &[]).await;
        assert_error(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
        )
        .await;
    }
    assert_eq!(
        (app.total_queue_depth().await, app.redis_key_count().await),
        before
    );
    // The key still answers its own request.
    assert_eq!(
        accepted(buy_keyed(&app, "k-2", &body, &[]).await).await,
        (id, true)
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn bad_keys_are_400_and_write_nothing(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("Sneaker", 100).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 1}).to_string();
    let longest = "k".repeat(255);
    let too_long = "k".repeat(256);
    let quoted_too_long = format!("\"{too_long}\"");
    let bad: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("idempotency-key", b"")],
        vec![("idempotency-key", b"\"\"")],
        vec![("idempotency-key", too_long.as_bytes())],
        vec![("idempotency-key", quoted_too_long.as_bytes())],
        vec![("idempotency-key", b"caf\xc3\xa9")],
        vec![("idempotency-key", b"\xff")],
        vec![("idempotency-key", b"\"unterminated")],
        vec![("idempotency-key", b"a\"b")],
        vec![("idempotency-key", b"\"bad \\x escape\"")],
        vec![("idempotency-key", b"one"), ("idempotency-key", b"two")],
    ];
    for headers in bad {
        let mut request = app
            .client
            .post(app.url(ADD_TO_CART))
            .header("content-type", "application/json")
            .body(body.clone());
        for (name, value) in &headers {
            request = request.header(
                *name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let response = request.send().await.unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;
    }
    assert_eq!(app.total_queue_depth().await, 0);
    assert_eq!(
        app.redis_key_count().await,
        0,
        "no record, no pending status"
    );
    // A bad body with a good key: the body's error, and the key stays unused.
    let response = buy_keyed(
        &app,
        "k-3",
        &json!({"user_id": 7, "product_id": product, "quantity": 0}),
        &[],
    )
    .await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    assert_eq!(app.redis_key_count().await, 0);
    // The longest key is fine.
    let json_body: Value = serde_json::from_str(&body).unwrap();
    accepted(buy_keyed(&app, &longest, &json_body, &[]).await).await;
    accepted(buy_keyed(&app, "k-3", &json_body, &[]).await).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_first_attempt_refused_with_503_leaves_the_key_free_for_the_retry(pool: sqlx::PgPool) {
    let mut app = spawn_app(
        pool,
        Options {
            queue_max_length: 2,
            ..Options::without_worker()
        },
    )
    .await;
    let product = app.create_product("Sneaker", 100).await;
    app.buy(1, product, 1).await;
    app.buy(2, product, 1).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 1});
    let response = buy_keyed(&app, "k-4", &body, &[]).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(response, StatusCode::SERVICE_UNAVAILABLE, "queue_full").await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(record(&app, 7, "k-4"))
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert!(!exists, "the refused attempt gave the key back");

    // Once the queue drains, the retry with the same key is a purchase like any other.
    app.start_worker(Arc::new(SystemClock));
    let id = wait_for("the retry to be accepted", || async {
        let response = buy_keyed(&app, "k-4", &body, &[]).await;
        match response.status() {
            StatusCode::SERVICE_UNAVAILABLE => None,
            _ => Some(accepted(response).await),
        }
    })
    .await;
    assert!(!id.1, "a fresh attempt, not a replay");
    assert_eq!(app.wait_final(id.0).await["status"], "succeeded");
    assert_eq!(transactions_of(&app, 7).await, 1);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_sold_out_answer_is_replayed_as_it_was(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            sold_out_refresh_ms: 50,
            ..Options::without_worker()
        },
    )
    .await;
    let product = app.create_product("Gone", 0).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 1});
    let expected = json!({"status": "rejected", "reason": "out_of_stock", "user_id": 7,
                          "product_id": product, "quantity": 1, "final": true});
    wait_for("the product to be known sold out", || async {
        let response = app.add_to_cart(8, product, 1).await;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    let before = (app.total_queue_depth().await, app.redis_key_count().await);
    let first = buy_keyed(&app, "k-5", &body, &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(first.json::<Value>().await.unwrap(), expected);
    let replay = buy_keyed(&app, "k-5", &body, &[]).await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/json");
    assert_eq!(replay.json::<Value>().await.unwrap(), expected);
    assert_eq!(
        (app.total_queue_depth().await, app.redis_key_count().await),
        (before.0, before.1 + 1),
        "nothing enqueued, the key's record only"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_key_cut_off_mid_attempt_is_taken_over_with_the_same_transaction(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("Sneaker", 100).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 1});
    let (id, _) = accepted(buy_keyed(&app, "k-6", &body, &[]).await).await;
    let record = record(&app, 7, "k-6");

    // Its lease still running: someone else holds the key.
    let future_ms = (SystemClock.now().timestamp_millis() + 60_000) as u64;
    cut_off(&app, &record, future_ms).await;
    let response = buy_keyed(&app, "k-6", &body, &[]).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(response, StatusCode::CONFLICT, "idempotency_key_in_flight").await;

    // The lease ran out and the answer was lost (the process died after the broker took the
    // message): the retry publishes the same transaction again.
    cut_off(&app, &record, 0).await;
    assert_eq!(
        accepted(buy_keyed(&app, "k-6", &body, &[]).await).await,
        (id, false)
    );
    assert_eq!(
        app.total_queue_depth().await,
        2,
        "the same transaction, twice"
    );
    app.start_worker(Arc::new(SystemClock));
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    wait_for("both copies to be consumed", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    assert_eq!(transactions_of(&app, 7).await, 1, "decided once");
    assert_eq!(app.product_stock(product).await, 99);

    // Cut off again once decided: the retry finds it decided and replays it.
    cut_off(&app, &record, 0).await;
    assert_eq!(
        accepted(buy_keyed(&app, "k-6", &body, &[]).await).await,
        (id, true)
    );
    assert_eq!(
        accepted(buy_keyed(&app, "k-6", &body, &[]).await).await,
        (id, true)
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_key_whose_transaction_was_withdrawn_gets_a_fresh_one(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("Sneaker", 100).await;
    let body = json!({"user_id": 7, "product_id": product, "quantity": 1});
    let (withdrawn, _) = accepted(buy_keyed(&app, "k-7", &body, &[]).await).await;
    // As if its publish had gone unconfirmed: withdrawn in PostgreSQL, answered 503, and the
    // key's release lost.
    let request = allot_shared::PurchaseRequest {
        transaction_id: withdrawn,
        user_id: UserId::try_from(7).unwrap(),
        product_id: allot_shared::ProductId::try_from(product).unwrap(),
        quantity: allot_shared::Quantity::try_from(1).unwrap(),
        created_at: SystemClock.now(),
    };
    let partition = crate::helpers::partition_of(product);
    stored::withdraw(&app.pool, &[request.into()], partition, SystemClock.now())
        .await
        .unwrap();
    cut_off(&app, &record(&app, 7, "k-7"), 0).await;

    let (fresh, replayed) = accepted(buy_keyed(&app, "k-7", &body, &[]).await).await;
    assert!(!replayed);
    assert_ne!(
        fresh, withdrawn,
        "a withdrawn transaction is never answered 202 again"
    );
    app.start_worker(Arc::new(SystemClock));
    assert_eq!(app.wait_final(fresh).await["status"], "succeeded");
    let old = app.wait_final(withdrawn).await;
    assert_eq!(
        (old["status"].as_str(), old["reason"].as_str()),
        (Some("rejected"), Some("not_accepted"))
    );
    assert_eq!(app.product_stock(product).await, 99, "sold once");
    assert_eq!(
        accepted(buy_keyed(&app, "k-7", &body, &[]).await).await,
        (fresh, true)
    );
    app.shutdown().await;
}
