//! Orders of several products by buyers with accounts: what needs both halves of issue 13.
//! `POST /api/v1/orders` with a buyer's token (and a body `user_id` that is not the token's:
//! 403), read back only with that token, listed in the account's history with its items;
//! `Idempotency-Key` on orders (racing identical orders make one transaction; the key with other
//! items, or on addToCart, is 422; an answer given at once is replayed as it was); and
//! `max_per_buyer` counting an account's purchases, by addToCart and orders, exactly.

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, accepted_id, assert_error, spawn_app};
use allot_shared::TransactionId;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeSet;

const ORDERS: &str = "/api/v1/orders";
const ADD_TO_CART: &str = "/api/v1/order/addToCart";

fn items(lines: &[(i64, i64)]) -> Value {
    lines
        .iter()
        .map(|&(product_id, quantity)| json!({"product_id": product_id, "quantity": quantity}))
        .collect()
}

/// `POST path` with `body`, a bearer `token` and an `Idempotency-Key` if given.
async fn post(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = app.client.post(app.url(path)).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn get_as(app: &TestApp, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The id of an exact 202 answer, and whether it is marked as a replay.
async fn accepted(response: reqwest::Response) -> (TransactionId, bool) {
    let replayed = match response.headers().get("idempotent-replayed") {
        Some(value) => {
            assert_eq!(value, "true");
            true
        }
        None => false,
    };
    (accepted_id(response).await, replayed)
}

/// Everything a purchase can leave behind.
async fn written(app: &TestApp) -> (u32, usize, i64, i64, i64) {
    (
        app.total_queue_depth().await,
        app.redis_key_count().await,
        app.count("SELECT count(*) FROM transactions").await,
        app.count("SELECT count(*) FROM transaction_items").await,
        app.count("SELECT coalesce(sum(stock), 0)::bigint FROM products")
            .await,
    )
}

/// One page of `user`'s history read with `token` (`user_id=` for staff).
async fn history(app: &TestApp, token: &str, user: Option<i64>) -> Vec<Value> {
    let path = match user {
        Some(user) => format!("/api/v1/orders/history?limit=100&user_id={user}"),
        None => "/api/v1/orders/history?limit=100".to_owned(),
    };
    let response = get_as(app, &path, Some(token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let page: Value = response.json().await.unwrap();
    assert_eq!(page["next_after"], Value::Null, "one page");
    page["transactions"].as_array().unwrap().clone()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_buyer_orders_several_products_with_its_token_and_may_not_name_another(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::default()).await;
    let a = app.create_product("Cap", 10).await;
    let b = app.create_product("Scarf", 10).await;
    let (alice, alice_token) = app.buyer("alice").await;
    let (bob, bob_token) = app.buyer("bob").await;

    // Without a user_id, and with the account's own: both are the account's orders.
    let first = accepted(
        post(
            &app,
            ORDERS,
            Some(&alice_token),
            None,
            &json!({"items": items(&[(a, 1), (b, 2)])}),
        )
        .await,
    )
    .await
    .0;
    let second = accepted(
        post(
            &app,
            ORDERS,
            Some(&alice_token),
            None,
            &json!({"user_id": alice, "items": items(&[(b, 1), (a, 3)])}),
        )
        .await,
    )
    .await
    .0;
    for (id, lines) in [(first, [(a, 1), (b, 2)]), (second, [(b, 1), (a, 3)])] {
        let view = app.wait_final_as(id, &alice_token).await;
        assert_eq!(view["status"], "succeeded", "{view}");
        assert_eq!(view["user_id"], alice);
        assert_eq!(view["items"], items(&lines));
        assert!(view.get("product_id").is_none(), "{view}");
        let stored: (i64, Option<i64>) =
            sqlx::query_as("SELECT user_id, product_id FROM transactions WHERE id = $1")
                .bind(id.0)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(stored, (alice, None), "an order of the account, by items");
    }
    assert_eq!(
        (app.product_stock(a).await, app.product_stock(b).await),
        (6, 7)
    );

    // Read back only by its buyer and staff: another buyer and an anonymous reader get the
    // 404 of an unknown id, plain, waiting and as events.
    for token in [Some(alice_token.as_str()), Some(ADMIN_TOKEN)] {
        let response = get_as(&app, &format!("/api/v1/transaction/{first}"), token).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    for token in [Some(bob_token.as_str()), None] {
        for path in [
            format!("/api/v1/transaction/{first}"),
            format!("/api/v1/transaction/{first}/events"),
        ] {
            let response = get_as(&app, &path, token).await;
            assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
        }
    }

    // Another buyer's id or an anonymous one in the body: 403; an account's id without its
    // token: 422; nothing written either way.
    let before = written(&app).await;
    for other in [bob, 7] {
        let response = post(
            &app,
            ORDERS,
            Some(&alice_token),
            Some("\"not-a-purchase\""),
            &json!({"user_id": other, "items": items(&[(a, 1), (b, 1)])}),
        )
        .await;
        let message = assert_error(response, StatusCode::FORBIDDEN, "user_mismatch").await;
        assert!(message.contains(&other.to_string()), "{message}");
    }
    let response = post(
        &app,
        ORDERS,
        None,
        None,
        &json!({"user_id": alice, "items": items(&[(a, 1), (b, 1)])}),
    )
    .await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    assert_eq!(written(&app).await, before, "nothing written");

    // Staff order on the account's behalf, naming it.
    let by_staff = accepted(
        post(
            &app,
            ORDERS,
            Some(ADMIN_TOKEN),
            None,
            &json!({"user_id": bob, "items": items(&[(a, 1), (b, 1)])}),
        )
        .await,
    )
    .await
    .0;
    assert_eq!(
        app.wait_final_as(by_staff, &bob_token).await["user_id"],
        bob
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn without_anonymous_buyers_an_order_needs_a_token(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            tweak_api: |config| config.anonymous_buyers = false,
            ..Options::default()
        },
    )
    .await;
    let a = app.create_product("Cap", 10).await;
    let b = app.create_product("Scarf", 10).await;
    let (alice, token) = app.buyer("alice").await;

    let before = written(&app).await;
    for body in [
        json!({"user_id": 7, "items": items(&[(a, 1), (b, 1)])}),
        json!({"items": items(&[(a, 1), (b, 1)])}),
    ] {
        let response = post(&app, ORDERS, None, Some("k-1"), &body).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    assert_eq!(written(&app).await, before, "nothing written");

    let id = accepted(
        post(
            &app,
            ORDERS,
            Some(&token),
            Some("k-1"),
            &json!({"items": items(&[(a, 1), (b, 1)])}),
        )
        .await,
    )
    .await
    .0;
    let view = app.wait_final_as(id, &token).await;
    assert_eq!(
        (view["status"].as_str(), view["user_id"].as_i64()),
        (Some("succeeded"), Some(alice))
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn identical_orders_racing_with_one_key_make_one_transaction(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let a = app.create_product("Cap", 100).await;
    let b = app.create_product("Scarf", 100).await;
    let (alice, token) = app.buyer("alice").await;
    let body = json!({"items": items(&[(a, 1), (b, 2)])});

    let racing = (0..12).map(|_| {
        let request = app
            .client
            .post(app.url(ORDERS))
            .bearer_auth(&token)
            .header("idempotency-key", "\"basket-click-1\"")
            .json(&body);
        async move { request.send().await.unwrap() }
    });
    let mut ids = BTreeSet::new();
    let mut in_flight = 0;
    for response in futures::future::join_all(racing).await {
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
    let view = app.wait_final_as(id, &token).await;
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["items"], items(&[(a, 1), (b, 2)]));

    // Settled: the same order again is the same transaction, marked as a replay; an explicit
    // user_id equal to the token's and another spelling change nothing.
    for body in [
        body.clone(),
        json!({"user_id": alice, "items": [{"quantity": 1, "product_id": a}, {"quantity": 2, "product_id": b}]}),
    ] {
        let response = post(&app, ORDERS, Some(&token), Some("basket-click-1"), &body).await;
        assert_eq!(accepted(response).await, (id, true));
    }

    // The key with another request: other quantities, the same items in another order, fewer
    // items, or the same single line on addToCart. 422 each, nothing written.
    let before = written(&app).await;
    for (path, body) in [
        (ORDERS, json!({"items": items(&[(a, 2), (b, 2)])})),
        (ORDERS, json!({"items": items(&[(b, 2), (a, 1)])})),
        (ORDERS, json!({"items": items(&[(a, 1)])})),
        (ADD_TO_CART, json!({"product_id": a, "quantity": 1})),
    ] {
        let response = post(&app, path, Some(&token), Some("basket-click-1"), &body).await;
        assert_error(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
        )
        .await;
    }
    assert_eq!(written(&app).await, before, "nothing written");

    // One key, one endpoint: an order of one line is not the addToCart of that line.
    let single = accepted(
        post(
            &app,
            ORDERS,
            Some(&token),
            Some("one-line"),
            &json!({"items": items(&[(a, 1)])}),
        )
        .await,
    )
    .await
    .0;
    let response = post(
        &app,
        ADD_TO_CART,
        Some(&token),
        Some("one-line"),
        &json!({"product_id": a, "quantity": 1}),
    )
    .await;
    assert_error(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(
        app.wait_final_as(single, &token).await["status"],
        "succeeded"
    );

    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM transactions WHERE user_id = {alice}"
        ))
        .await,
        2,
        "one transaction per key"
    );
    assert_eq!(
        (app.product_stock(a).await, app.product_stock(b).await),
        (98, 98),
        "each key sold once"
    );

    // Keys belong to their buyer: another account's same key is its own order.
    let (_, bob_token) = app.buyer("bob").await;
    let (of_bob, replayed) = accepted(
        post(
            &app,
            ORDERS,
            Some(&bob_token),
            Some("basket-click-1"),
            &body,
        )
        .await,
    )
    .await;
    assert!(!replayed);
    assert_ne!(of_bob, id);
    assert_eq!(
        app.wait_final_as(of_bob, &bob_token).await["status"],
        "succeeded"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_keyed_order_answered_at_once_is_replayed_as_it_was(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            sold_out_refresh_ms: 100,
            ..Options::default()
        },
    )
    .await;
    let a = app.create_product("Cap", 10).await;
    let b = app.create_product("Scarf", 10).await;
    let (alice, token) = app.buyer("alice").await;
    let response = app.patch_product(b, &json!({"paused": true})).await;
    assert_eq!(response.status(), StatusCode::OK);

    let body = json!({"items": items(&[(a, 1), (b, 1)])});
    let before = written(&app).await;
    let response = post(&app, ORDERS, Some(&token), Some("paused-1"), &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("idempotent-replayed").is_none());
    let first: Value = response.json().await.unwrap();
    assert_eq!(
        first,
        json!({"status": "rejected", "reason": "paused", "user_id": alice,
               "items": items(&[(a, 1), (b, 1)]), "reason_product_id": b, "final": true})
    );

    // Resumed: a fresh order goes through, but the key keeps its answer.
    let response = app.patch_product(b, &json!({"paused": false})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = post(&app, ORDERS, Some(&token), Some("paused-1"), &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.json::<Value>().await.unwrap(), first);
    let (queues, _, transactions, lines, stock) = before;
    let (queues_now, _, transactions_now, lines_now, stock_now) = written(&app).await;
    assert_eq!(
        (queues_now, transactions_now, lines_now, stock_now),
        (queues, transactions, lines, stock),
        "nothing recorded or enqueued for the key"
    );

    let id = accepted(post(&app, ORDERS, Some(&token), Some("paused-2"), &body).await)
        .await
        .0;
    assert_eq!(app.wait_final_as(id, &token).await["status"], "succeeded");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_accounts_orders_are_in_its_history_with_their_items(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let a = app.create_product("Cap", 10).await;
    let b = app.create_product("Scarf", 10).await;
    let c = app.create_product("Last glove", 1).await;
    let (alice, token) = app.buyer("alice").await;
    let (_, bob_token) = app.buyer("bob").await;

    let single = accepted(
        post(
            &app,
            ADD_TO_CART,
            Some(&token),
            None,
            &json!({"product_id": a, "quantity": 1}),
        )
        .await,
    )
    .await
    .0;
    let order = accepted(
        post(
            &app,
            ORDERS,
            Some(&token),
            Some("history-1"),
            &json!({"items": items(&[(a, 1), (b, 2)])}),
        )
        .await,
    )
    .await
    .0;
    let refused = accepted(
        post(
            &app,
            ORDERS,
            Some(&token),
            None,
            &json!({"items": items(&[(b, 1), (c, 5)])}),
        )
        .await,
    )
    .await
    .0;

    // Pending (no worker yet): listed from their 202 on, newest first, an order by its items.
    let pending = history(&app, &token, None).await;
    let ids: Vec<&str> = pending
        .iter()
        .map(|view| view["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [refused.to_string(), order.to_string(), single.to_string()]
    );
    for view in &pending {
        assert_eq!(view["status"], "pending", "{view}");
        assert_eq!(view["user_id"], alice);
    }
    assert_eq!(pending[0]["items"], items(&[(b, 1), (c, 5)]));
    assert_eq!(pending[1]["items"], items(&[(a, 1), (b, 2)]));
    assert!(pending[1].get("product_id").is_none());
    assert_eq!(
        (
            pending[2]["product_id"].as_i64(),
            pending[2]["quantity"].as_i64()
        ),
        (Some(a), Some(1))
    );
    assert!(
        pending[2].get("items").is_none(),
        "one line reads as before"
    );

    // Decided: each exactly as GET /api/v1/transaction/{id} shows it, from PostgreSQL.
    app.start_worker(std::sync::Arc::new(allot_shared::SystemClock));
    for id in [single, order, refused] {
        app.wait_final_as(id, &token).await;
    }
    let decided = history(&app, &token, None).await;
    assert_eq!(decided.len(), 3);
    for view in &decided {
        let id = view["transaction_id"].as_str().unwrap();
        let read: Value = get_as(&app, &format!("/api/v1/transaction/{id}"), Some(&token))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(view, &read);
    }
    assert_eq!(decided[0]["status"], "rejected");
    assert_eq!(decided[0]["reason"], "out_of_stock");
    assert_eq!(decided[0]["reason_product_id"], c);
    assert_eq!(decided[0]["items"], items(&[(b, 1), (c, 5)]));
    assert_eq!(decided[1]["status"], "succeeded");
    assert_eq!(decided[1]["items"], items(&[(a, 1), (b, 2)]));
    assert!(decided[1]["order_number"].is_string());
    assert_eq!(decided[2]["product_id"], a);

    // Staff read the same; another buyer's history has none of them.
    assert_eq!(history(&app, ADMIN_TOKEN, Some(alice)).await, decided);
    assert_eq!(history(&app, &bob_token, None).await, Vec::<Value>::new());
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn max_per_buyer_counts_an_accounts_purchases_across_add_to_cart_and_orders(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::default()).await;
    let limited = app.create_product("Limited sneaker", 100).await;
    let other = app.create_product("Sock", 100).await;
    let response = app
        .patch_product(limited, &json!({"max_per_buyer": 3}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (alice, alice_token) = app.buyer("alice").await;
    let (bob, bob_token) = app.buyer("bob").await;

    async fn outcome(app: &TestApp, token: &str, path: &str, body: Value) -> Value {
        let id = accepted_id(post(app, path, Some(token), None, &body).await).await;
        app.wait_final_as(id, token).await
    }

    // 2 by addToCart, then 1 more in an order: 3, the limit.
    let view = outcome(
        &app,
        &alice_token,
        ADD_TO_CART,
        json!({"product_id": limited, "quantity": 2}),
    )
    .await;
    assert_eq!(view["status"], "succeeded");
    let view = outcome(
        &app,
        &alice_token,
        ORDERS,
        json!({"items": items(&[(limited, 1), (other, 1)])}),
    )
    .await;
    assert_eq!(view["status"], "succeeded");

    // Past it, whichever way: by addToCart, in an order (all or nothing: the sock is not
    // taken either), or by staff on the account's behalf.
    let view = outcome(
        &app,
        &alice_token,
        ADD_TO_CART,
        json!({"product_id": limited, "quantity": 1}),
    )
    .await;
    assert_eq!(
        (view["status"].as_str(), view["reason"].as_str()),
        (Some("rejected"), Some("limit_exceeded"))
    );
    let view = outcome(
        &app,
        &alice_token,
        ORDERS,
        json!({"items": items(&[(other, 1), (limited, 1)])}),
    )
    .await;
    assert_eq!(
        (
            view["status"].as_str(),
            view["reason"].as_str(),
            view["reason_product_id"].as_i64()
        ),
        (Some("rejected"), Some("limit_exceeded"), Some(limited))
    );
    let view = outcome(
        &app,
        ADMIN_TOKEN,
        ADD_TO_CART,
        json!({"user_id": alice, "product_id": limited, "quantity": 1}),
    )
    .await;
    assert_eq!(view["reason"], "limit_exceeded");

    // Per account: another account, and an anonymous id, have their own 3.
    let view = outcome(
        &app,
        &bob_token,
        ORDERS,
        json!({"items": items(&[(limited, 3), (other, 1)])}),
    )
    .await;
    assert_eq!(view["status"], "succeeded");
    let id = app.buy(7, limited, 3).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");

    let units: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT user_id, units FROM buyer_units WHERE product_id = $1 ORDER BY user_id",
    )
    .bind(limited)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(units, [(7, 3), (alice, 3), (bob, 3)]);
    assert_eq!(app.product_stock(limited).await, 91);
    assert_eq!(
        app.product_stock(other).await,
        98,
        "the refused order took no sock"
    );

    // One account firing 20 concurrent orders at a fresh limit of 3: exactly 3 succeed.
    let rare = app.create_product("Rare cap", 100).await;
    let response = app.patch_product(rare, &json!({"max_per_buyer": 3})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (_, carol_token) = app.buyer("carol").await;
    let body = json!({"items": items(&[(rare, 1), (other, 1)])});
    let racing = (0..20).map(|_| async {
        accepted_id(post(&app, ORDERS, Some(&carol_token), None, &body).await).await
    });
    let ids = futures::future::join_all(racing).await;
    let mut succeeded = 0;
    for id in ids {
        let view = app.wait_final_as(id, &carol_token).await;
        match view["status"].as_str() {
            Some("succeeded") => succeeded += 1,
            _ => {
                assert_eq!(view["reason"], "limit_exceeded", "{view}");
                assert_eq!(view["reason_product_id"], rare, "{view}");
            }
        }
    }
    assert_eq!(succeeded, 3, "exactly the limit");
    assert_eq!(app.product_stock(rare).await, 97);
    assert_eq!(
        app.product_stock(other).await,
        95,
        "only the 3 orders took socks"
    );
    app.shutdown().await;
}
