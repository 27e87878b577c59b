//! Who buys, and who may read what: a buyer's token on `addToCart` and on the transaction
//! reads, `ALLOT_ANONYMOUS_BUYERS`, and a buyer never seeing another's transactions (404, like
//! an unknown id).

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, spawn_app};
use allot_shared::TransactionId;
use reqwest::StatusCode;
use serde_json::{Value, json};

const ADD_TO_CART: &str = "/api/v1/order/addToCart";

async fn buy_with(app: &TestApp, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = app.client.post(app.url(ADD_TO_CART)).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The id of a 202 answer.
async fn accepted(response: reqwest::Response) -> TransactionId {
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    TransactionId(body["transaction_id"].as_str().unwrap().parse().unwrap())
}

async fn get_with(app: &TestApp, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// A transaction read three ways: plain, with `Prefer: wait`, and as events.
async fn read(app: &TestApp, id: TransactionId, token: Option<&str>) -> [reqwest::Response; 3] {
    let path = format!("/api/v1/transaction/{id}");
    let plain = get_with(app, &path, token).await;
    let mut waiting = app.client.get(app.url(&path)).header("prefer", "wait=1");
    if let Some(token) = token {
        waiting = waiting.bearer_auth(token);
    }
    let waiting = waiting.send().await.unwrap();
    let events = get_with(app, &format!("{path}/events"), token).await;
    [plain, waiting, events]
}

/// Everything a purchase can leave behind.
async fn written(app: &TestApp) -> (u32, usize, i64) {
    (
        app.total_queue_depth().await,
        app.redis_key_count().await,
        app.count("SELECT count(*) FROM transactions").await,
    )
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_buyer_buys_as_its_account_and_may_not_name_another(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("Sneaker", 10).await;
    let (alice, token) = app.buyer("alice").await;

    // Without a user_id, and with its own: both are the account's.
    let first = accepted(
        buy_with(
            &app,
            Some(&token),
            &json!({"product_id": product, "quantity": 1}),
        )
        .await,
    )
    .await;
    let second = accepted(
        buy_with(
            &app,
            Some(&token),
            &json!({"user_id": alice, "product_id": product, "quantity": 2}),
        )
        .await,
    )
    .await;
    for (id, quantity) in [(first, 1), (second, 2)] {
        let view = app.wait_final_as(id, &token).await;
        assert_eq!(view["status"], "succeeded");
        assert_eq!(
            (view["user_id"].as_i64(), view["quantity"].as_i64()),
            (Some(alice), Some(quantity))
        );
        let stored: i64 = sqlx::query_scalar("SELECT user_id FROM transactions WHERE id = $1")
            .bind(id.0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(stored, alice);
    }

    // Another buyer's id, or an anonymous one, in the body: 403, nothing written.
    let before = written(&app).await;
    for other in [alice + 1, 7] {
        let response = buy_with(
            &app,
            Some(&token),
            &json!({"user_id": other, "product_id": product, "quantity": 1}),
        )
        .await;
        let message = assert_error(response, StatusCode::FORBIDDEN, "user_mismatch").await;
        assert!(message.contains(&other.to_string()), "{message}");
    }
    assert_eq!(written(&app).await, before);
    assert_eq!(app.product_stock(product).await, 7);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn anonymous_buyers_name_ids_below_accounts_and_staff_buy_for_anyone(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("Sneaker", 10).await;
    let (alice, _) = app.buyer("alice").await;

    // Today's clients: a user_id in the body, no token.
    app.buy(7, product, 1).await;
    app.buy(999_999_999_999_999, product, 1).await;
    let before = written(&app).await;
    // An account's id without its token, or no user_id at all: 422, nothing written.
    for body in [
        json!({"user_id": alice, "product_id": product, "quantity": 1}),
        json!({"user_id": 1_000_000_000_000_000_i64, "product_id": product, "quantity": 1}),
        json!({"product_id": product, "quantity": 1}),
        json!({"user_id": null, "product_id": product, "quantity": 1}),
    ] {
        let response = buy_with(&app, None, &body).await;
        assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    assert_eq!(written(&app).await, before);

    // Staff buy on behalf of any buyer, an account included; they must name it.
    let id = accepted(
        buy_with(
            &app,
            Some(ADMIN_TOKEN),
            &json!({"user_id": alice, "product_id": product, "quantity": 1}),
        )
        .await,
    )
    .await;
    let view: Value = get_with(
        &app,
        &format!("/api/v1/transaction/{id}"),
        Some(ADMIN_TOKEN),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(view["user_id"], alice);
    let response = buy_with(
        &app,
        Some(ADMIN_TOKEN),
        &json!({"product_id": product, "quantity": 1}),
    )
    .await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn without_anonymous_buyers_buying_and_reading_need_a_token(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            tweak_api: |config| config.anonymous_buyers = false,
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("Sneaker", 10).await;
    let (alice, token) = app.buyer("alice").await;

    let before = written(&app).await;
    for body in [
        json!({"user_id": 7, "product_id": product, "quantity": 1}),
        json!({"product_id": product, "quantity": 1}),
    ] {
        let response = buy_with(&app, None, &body).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let message = assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert!(message.contains("logged-in buyers only"), "{message}");
    }
    assert_eq!(written(&app).await, before, "nothing written");

    let id = accepted(
        buy_with(
            &app,
            Some(&token),
            &json!({"product_id": product, "quantity": 1}),
        )
        .await,
    )
    .await;
    let path = format!("/api/v1/transaction/{id}");
    for path in [path.clone(), format!("{path}/events")] {
        let response = get_with(&app, &path, None).await;
        assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // The buyer and staff still read it.
    let view: Value = get_with(&app, &path, Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["user_id"], alice);
    assert_eq!(
        get_with(&app, &path, Some(ADMIN_TOKEN)).await.status(),
        StatusCode::OK
    );
    // Staff still buy on a buyer's behalf.
    accepted(
        buy_with(
            &app,
            Some(ADMIN_TOKEN),
            &json!({"user_id": 7, "product_id": product, "quantity": 1}),
        )
        .await,
    )
    .await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_buyer_reads_its_own_transactions_and_another_buyers_are_404(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("Sneaker", 10).await;
    let (_, alice) = app.buyer("alice").await;
    let (_, bob) = app.buyer("bob").await;
    let of_alice = accepted(
        buy_with(
            &app,
            Some(&alice),
            &json!({"product_id": product, "quantity": 1}),
        )
        .await,
    )
    .await;
    let anonymous = app.buy(7, product, 1).await;
    app.wait_final(anonymous).await;
    let unknown = TransactionId::new();

    // Its owner and staff read it (plain, waiting, as events).
    for token in [Some(alice.as_str()), Some(ADMIN_TOKEN)] {
        for response in read(&app, of_alice, token).await {
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    // Another buyer, or an anonymous reader: exactly the answer of an id that does not exist.
    for token in [Some(bob.as_str()), None] {
        for (forbidden, missing) in read(&app, of_alice, token)
            .await
            .into_iter()
            .zip(read(&app, unknown, token).await)
        {
            let forbidden_message =
                assert_error(forbidden, StatusCode::NOT_FOUND, "not_found").await;
            let missing_message = assert_error(missing, StatusCode::NOT_FOUND, "not_found").await;
            assert_eq!(
                forbidden_message,
                missing_message.replace(&unknown.to_string(), &of_alice.to_string())
            );
        }
    }
    // An anonymous buyer's transaction stays readable by anyone holding its id, as before
    // accounts existed; not by a buyer's token, which reads its own only.
    for response in read(&app, anonymous, None).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    for response in read(&app, anonymous, Some(&bob)).await {
        assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    app.shutdown().await;
}
