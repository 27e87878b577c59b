//! `GET /api/v1/orders/history`: a buyer's own transactions, newest first, keyset pages with no
//! repeat and no gap, pending ones included; staff read anyone's; nobody else's is listed.

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, spawn_app};
use allot_shared::TransactionId;
use reqwest::StatusCode;
use serde_json::{Value, json};

const HISTORY: &str = "/api/v1/orders/history";

async fn history(app: &TestApp, query: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url(&format!("{HISTORY}{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Every page of `query`'s history, `limit` at a time: the transactions in order, and how
/// many pages it took.
async fn all_pages(app: &TestApp, query: &str, limit: usize, token: &str) -> (Vec<Value>, usize) {
    pages_after(app, query, limit, token, None).await
}

/// [`all_pages`] from `after` on.
async fn pages_after(
    app: &TestApp,
    query: &str,
    limit: usize,
    token: &str,
    mut after: Option<String>,
) -> (Vec<Value>, usize) {
    let mut transactions = Vec::new();
    let mut pages = 0;
    loop {
        let mut page_query = format!("?limit={limit}{query}");
        if let Some(after) = &after {
            page_query.push_str(&format!("&after={after}"));
        }
        let response = history(app, &page_query, Some(token)).await;
        assert_eq!(response.status(), StatusCode::OK, "{page_query}");
        let page: Value = response.json().await.unwrap();
        let listed = page["transactions"].as_array().unwrap();
        assert!(listed.len() <= limit);
        pages += 1;
        transactions.extend(listed.iter().cloned());
        match page["next_after"].as_str() {
            Some(next) => {
                assert_eq!(listed.len(), limit, "only a full page has a next one");
                assert_eq!(listed.last().unwrap()["transaction_id"], next);
                after = Some(next.to_owned());
            }
            None => return (transactions, pages),
        }
    }
}

async fn buy_with(app: &TestApp, token: &str, product: i64, quantity: i64) -> TransactionId {
    let response = app
        .client
        .post(app.url("/api/v1/order/addToCart"))
        .bearer_auth(token)
        .json(&json!({"product_id": product, "quantity": quantity}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    TransactionId(body["transaction_id"].as_str().unwrap().parse().unwrap())
}

async fn view_as(app: &TestApp, id: &str, token: &str) -> Value {
    let response = app
        .client
        .get(app.url(&format!("/api/v1/transaction/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn history_lists_a_buyers_own_transactions_newest_first_in_pages_without_repeats_or_gaps(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::default()).await;
    // Stock for 9 of the 12 units asked for: successes and rejections both.
    let product = app.create_product("Sneaker", 9).await;
    let (alice, alice_token) = app.buyer("alice").await;
    let (_, bob_token) = app.buyer("bob").await;
    let mut bought = Vec::new();
    for n in 0..12 {
        bought.push(buy_with(&app, &alice_token, product, 1).await);
        if n % 3 == 0 {
            buy_with(&app, &bob_token, product, 1).await;
            app.buy(7, product, 1).await;
        }
    }
    for id in &bought {
        app.wait_final_as(*id, &alice_token).await;
    }

    for limit in [1, 5, 12, 100] {
        let (listed, pages) = all_pages(&app, "", limit, &alice_token).await;
        let ids: Vec<&str> = listed
            .iter()
            .map(|view| view["transaction_id"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = bought.iter().rev().map(ToString::to_string).collect();
        assert_eq!(
            ids, expected,
            "exactly alice's, newest first, with limit {limit}"
        );
        assert_eq!(
            pages,
            12usize.div_ceil(limit),
            "a next page only when there is one"
        );
    }
    // Each entry is the transaction as its own read shows it (items, status, number or
    // reason, times), and they are all alice's.
    let (listed, _) = all_pages(&app, "", 100, &alice_token).await;
    let mut outcomes = (0, 0);
    for view in &listed {
        assert_eq!(view["user_id"], alice);
        assert_eq!(
            view,
            &view_as(&app, view["transaction_id"].as_str().unwrap(), &alice_token).await
        );
        match view["status"].as_str() {
            Some("succeeded") => outcomes.0 += 1,
            Some("rejected") => outcomes.1 += 1,
            other => panic!("a decided transaction: {other:?}"),
        }
    }
    assert_eq!(outcomes.0 + outcomes.1, 12);
    let created: Vec<&str> = listed
        .iter()
        .map(|view| view["created_at"].as_str().unwrap())
        .collect();
    let mut newest_first = created.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(created, newest_first, "newest first");

    // Staff read alice's with user_id=; alice may name herself, not bob.
    let (as_staff, _) = all_pages(&app, &format!("&user_id={alice}"), 4, ADMIN_TOKEN).await;
    assert_eq!(as_staff, listed);
    let (named, _) = all_pages(&app, &format!("&user_id={alice}"), 100, &alice_token).await;
    assert_eq!(named, listed);
    let response = history(&app, &format!("?user_id={}", alice + 1), Some(&alice_token)).await;
    assert_error(response, StatusCode::FORBIDDEN, "user_mismatch").await;
    // Staff read an anonymous buyer's (decided) history too.
    let (anonymous, _) = all_pages(&app, "&user_id=7", 100, ADMIN_TOKEN).await;
    assert_eq!(anonymous.len(), 4);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn pending_transactions_are_listed_and_keep_their_place_once_decided(pool: sqlx::PgPool) {
    // No worker: every purchase stays pending until one starts.
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("Sneaker", 100).await;
    let (_, token) = app.buyer("carol").await;
    let mut bought = Vec::new();
    for _ in 0..5 {
        bought.push(buy_with(&app, &token, product, 1).await);
    }
    let expected: Vec<String> = bought.iter().rev().map(ToString::to_string).collect();
    let ids = |listed: &[Value]| -> Vec<String> {
        listed
            .iter()
            .map(|view| view["transaction_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (listed, _) = all_pages(&app, "", 2, &token).await;
    assert_eq!(
        ids(&listed),
        expected,
        "pending ones listed from their 202 on"
    );
    assert!(listed.iter().all(|view| view["status"] == "pending"));

    // The first page read while pending, the rest after the decisions: still every one once.
    let first: Value = history(&app, "?limit=2", Some(&token))
        .await
        .json()
        .await
        .unwrap();
    app.start_worker(std::sync::Arc::new(allot_shared::SystemClock));
    for id in &bought {
        app.wait_final_as(*id, &token).await;
    }
    let after = first["next_after"].as_str().unwrap();
    let (rest, _) = pages_after(&app, "", 2, &token, Some(after.to_owned())).await;
    let mut all = ids(first["transactions"].as_array().unwrap());
    all.extend(ids(&rest));
    assert_eq!(all, expected);
    let (listed, _) = all_pages(&app, "", 100, &token).await;
    assert!(listed.iter().all(|view| view["status"] == "succeeded"));
    // The index of pending ones was cleaned as it was read.
    let leftover: i64 = redis::cmd("ZCARD")
        .arg(format!(
            "{}:pending:{}",
            app.api_config.common.redis_prefix, listed[0]["user_id"]
        ))
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    assert_eq!(leftover, 0);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn history_needs_a_token_and_well_formed_queries(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let (_, token) = app.buyer("dave").await;
    let empty: Value = history(&app, "", Some(&token)).await.json().await.unwrap();
    assert_eq!(empty, json!({"transactions": [], "next_after": null}));

    let response = history(&app, "", None).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_error(
        history(&app, "", Some("allotb1_x")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    // Staff must say whose.
    assert_error(
        history(&app, "", Some(ADMIN_TOKEN)).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    for query in [
        "?limit=0",
        "?limit=101",
        "?limit=abc",
        "?limit=1.5",
        "?after=not-a-uuid",
        "?after=",
        "?user_id=0",
        "?user_id=-3",
        "?user_id=x",
        "?page=2",
        "?limit=1&limit=2",
    ] {
        let response = history(&app, query, Some(&token)).await;
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    app.shutdown().await;
}
