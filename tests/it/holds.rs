//! Holds: a purchase with `hold_seconds` takes its units at once (`held`, with `expires_at`, no
//! order number), and is then checked out (numbered at that moment), cancelled, or released by
//! its expiry, each decided once in the hold's serial path. Every test checks the counters:
//! `stock + held + units sold == units stocked`, order numbers gapless over succeeded
//! transactions only.

use crate::helpers::{
    ADMIN_TOKEN, DEADLINE, Options, TestApp, accepted_id, assert_error, clock_at, sample,
    spawn_app, wait_for,
};
use allot_shared::TransactionId;
use chrono::{DateTime, TimeDelta, Utc};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

/// Waits until the transaction is `held` (asserting it is not refused) and returns its view.
pub async fn wait_held(app: &TestApp, id: TransactionId) -> Value {
    let view = app.wait_final(id).await;
    assert_eq!(view["status"], "held", "{view}");
    view
}

/// Waits until the transaction's status is `status`.
pub async fn wait_status(app: &TestApp, id: TransactionId, status: &str) -> Value {
    wait_for(&format!("transaction {id} to be {status}"), || async {
        let view = app.transaction(id).await;
        (view["status"] == status).then_some(view)
    })
    .await
}

/// stock, held (0 when absent) of a product, as `GET /api/v1/products/{id}` shows them.
pub async fn counters(app: &TestApp, product: i64) -> (i64, i64) {
    let body: Value = app
        .get(&format!("/api/v1/products/{product}"))
        .await
        .json()
        .await
        .unwrap();
    (
        body["stock"].as_i64().unwrap(),
        body.get("held").map_or(0, |held| held.as_i64().unwrap()),
    )
}

/// Units of `product` sold (succeeded transactions), from PostgreSQL.
pub async fn sold(app: &TestApp, product: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(l.quantity), 0)::bigint FROM transaction_lines l \
         JOIN transactions t ON t.id = l.transaction_id \
         WHERE l.product_id = $1 AND t.status = 'succeeded'",
    )
    .bind(product)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Asserts `stock + held + sold == stocked` and that the held units are exactly those of the
/// open holds, from PostgreSQL.
pub async fn assert_conserved(app: &TestApp, product: i64, stocked: i64) {
    let (stock, held): (i64, i64) =
        sqlx::query_as("SELECT stock, held FROM products WHERE id = $1")
            .bind(product)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let open: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(l.quantity), 0)::bigint FROM transaction_lines l \
         JOIN transactions t ON t.id = l.transaction_id \
         WHERE l.product_id = $1 AND t.status = 'held'",
    )
    .bind(product)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let sold = sold(app, product).await;
    assert_eq!(
        stock + held + sold,
        stocked,
        "product {product}: stock {stock} + held {held} + sold {sold}"
    );
    assert_eq!(held, open, "held units are the open holds'");
}

/// Every order number of today, in order, asserting they are 1..=N and only on succeeded rows.
pub async fn assert_gapless(app: &TestApp) -> i64 {
    let seqs: Vec<i64> = sqlx::query_scalar(
        "SELECT order_seq FROM transactions WHERE order_seq IS NOT NULL ORDER BY order_seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let numbered_not_succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transactions WHERE order_seq IS NOT NULL AND status <> 'succeeded'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(numbered_not_succeeded, 0);
    let n = seqs.len() as i64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "gapless");
    n
}

fn time(view: &Value, field: &str) -> DateTime<Utc> {
    view[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {view}"))
        .parse()
        .unwrap()
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_hold_takes_the_units_at_once_and_its_checkout_numbers_it_then(pool: PgPool) {
    let clock = clock_at("2026-12-05T10:00:00Z");
    let app = spawn_app(
        pool,
        Options {
            clock: Some(clock.clone()),
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("sneaker", 5).await;
    let first = app.buy(1, product, 1).await;
    assert_eq!(app.wait_final(first).await["status"], "succeeded");

    let hold = app.hold(2, product, 2, 600).await;
    let held = wait_held(&app, hold).await;
    assert_eq!(held["hold_seconds"], 600);
    assert!(held.get("order_number").is_none(), "no number yet: {held}");
    assert_eq!(
        time(&held, "expires_at"),
        time(&held, "decided_at") + TimeDelta::seconds(600),
        "held for 600 s from its decision"
    );
    assert_eq!(
        counters(&app, product).await,
        (2, 2),
        "held units are taken"
    );
    assert_conserved(&app, product, 5).await;

    // A sale after the hold is numbered before the hold's checkout.
    let second = app.buy(3, product, 1).await;
    assert_eq!(
        app.wait_final(second).await["order_number"],
        "20261205-00002"
    );

    let response = app.settle(hold, "checkout", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let checked_out = json_of(response).await;
    assert_eq!(checked_out["status"], "succeeded", "{checked_out}");
    assert_eq!(checked_out["order_number"], "20261205-00003");
    assert_eq!(checked_out["expires_at"], held["expires_at"], "kept");
    assert_eq!(
        wait_status(&app, hold, "succeeded").await["order_number"],
        "20261205-00003"
    );
    assert_eq!(counters(&app, product).await, (1, 0));
    assert_conserved(&app, product, 5).await;

    // Checked out twice: the second is refused, naming the status; nothing changes.
    let again = app.settle(hold, "checkout", None).await;
    let message = assert_error(again, StatusCode::CONFLICT, "not_held").await;
    assert!(message.contains("succeeded"), "{message}");
    let cancel = app.settle(hold, "cancel", None).await;
    assert_error(cancel, StatusCode::CONFLICT, "not_held").await;
    assert_eq!(assert_gapless(&app).await, 3);
    assert_eq!(counters(&app, product).await, (1, 0));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_hold_that_expires_gives_its_units_back_once_and_they_are_sold_to_someone_else(
    pool: PgPool,
) {
    let clock = clock_at("2026-12-05T10:00:00Z");
    let app = spawn_app(
        pool,
        Options {
            clock: Some(clock.clone()),
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("last one", 1).await;
    let hold = app.hold(1, product, 1, 60).await;
    let held = wait_held(&app, hold).await;
    let expires_at = time(&held, "expires_at");
    assert_eq!(
        expires_at,
        "2026-12-05T10:01:00Z".parse::<DateTime<Utc>>().unwrap()
    );
    let refused = app.buy(2, product, 1).await;
    assert_eq!(app.wait_final(refused).await["reason"], "out_of_stock");

    // At its expiry the sweeper has it released, in its partition's serial path.
    clock.set(expires_at);
    let expired = wait_status(&app, hold, "rejected").await;
    assert_eq!(expired["reason"], "expired", "{expired}");
    assert_eq!(expired["expires_at"], held["expires_at"]);
    assert_eq!(time(&expired, "decided_at"), expires_at);
    assert_eq!(counters(&app, product).await, (1, 0));

    // The unit is sold to someone else; the holder's checkout comes too late.
    let later = app.buy(3, product, 1).await;
    assert_eq!(app.wait_final(later).await["status"], "succeeded");
    let late = app.settle(hold, "checkout", None).await;
    assert_error(late, StatusCode::CONFLICT, "hold_expired").await;
    assert_conserved(&app, product, 1).await;
    assert_eq!(counters(&app, product).await, (0, 0));
    assert_eq!(
        assert_gapless(&app).await,
        1,
        "numbered: the later sale only"
    );

    // Released once: the sweeper keeps running and finds nothing more to release.
    clock.set(expires_at + TimeDelta::seconds(30));
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_conserved(&app, product, 1).await;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.worker_address.as_ref().unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(sample(&metrics, r#"allot_worker_holds_total{event="expired"}"#) >= 1.0);
    assert!(sample(&metrics, "allot_worker_expiry_lateness_seconds_count") >= 1.0);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_checkout_at_the_instant_of_expiry_is_decided_once_either_way(pool: PgPool) {
    let start: DateTime<Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
    let clock = clock_at("2026-12-05T10:00:00Z");
    let app = spawn_app(
        pool,
        Options {
            clock: Some(clock.clone()),
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("edge", 10).await;
    // Three holds granted at the same instant: they expire at the same instant.
    let holds = join_all((1..=3).map(|user| app.hold(user, product, 1, 30))).await;
    for &hold in &holds {
        wait_held(&app, hold).await;
    }
    let expires_at = start + TimeDelta::seconds(30);
    assert_eq!(counters(&app, product).await, (7, 3));

    // One microsecond before: the checkout wins.
    clock.set(expires_at - TimeDelta::microseconds(1));
    let won = app.settle(holds[0], "checkout", None).await;
    assert_eq!(won.status(), StatusCode::OK);
    assert_eq!(json_of(won).await["order_number"], "20261205-00001");

    // At the instant: the hold is due; the checkout, the cancel and the sweeper race, and the
    // hold is released once, as expired, whichever the partition decides first.
    clock.set(expires_at);
    let (checkout, cancel) = tokio::join!(
        app.settle(holds[1], "checkout", None),
        app.settle(holds[1], "cancel", None)
    );
    assert_error(checkout, StatusCode::CONFLICT, "hold_expired").await;
    assert_error(cancel, StatusCode::CONFLICT, "hold_expired").await;
    let late = app.settle(holds[2], "checkout", None).await;
    assert_error(late, StatusCode::CONFLICT, "hold_expired").await;
    for &hold in &holds[1..] {
        let view = wait_status(&app, hold, "rejected").await;
        assert_eq!(view["reason"], "expired");
    }
    assert_eq!(
        wait_status(&app, holds[0], "succeeded").await["order_number"],
        "20261205-00001"
    );
    // The sweeper leaves the checked-out hold alone, however late.
    clock.set(expires_at + TimeDelta::seconds(3600));
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(app.transaction(holds[0]).await["status"], "succeeded");
    assert_eq!(
        counters(&app, product).await,
        (9, 0),
        "two units back, each once"
    );
    assert_conserved(&app, product, 10).await;
    assert_eq!(assert_gapless(&app).await, 1);
    // What each command did, recorded once each.
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM hold_commands ORDER BY created_at, outcome")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "confirmed").count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o == "confirmed" || o == "expired" || o == "not_held"),
        "{outcomes:?}"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn cancel_twice_checkout_twice_and_racing_checkouts_settle_a_hold_once(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("twice", 10).await;

    // Cancel twice: the first gives the units back, the second is refused.
    let hold = app.hold(1, product, 3, 600).await;
    wait_held(&app, hold).await;
    assert_eq!(counters(&app, product).await, (7, 3));
    let cancelled = app.settle(hold, "cancel", None).await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let cancelled = json_of(cancelled).await;
    assert_eq!(
        (&cancelled["status"], &cancelled["reason"]),
        (&json!("rejected"), &json!("cancelled"))
    );
    assert_eq!(counters(&app, product).await, (10, 0));
    let again = app.settle(hold, "cancel", None).await;
    let message = assert_error(again, StatusCode::CONFLICT, "not_held").await;
    assert!(message.contains("rejected (cancelled)"), "{message}");
    let checkout = app.settle(hold, "checkout", None).await;
    assert_error(checkout, StatusCode::CONFLICT, "not_held").await;
    assert_eq!(counters(&app, product).await, (10, 0));

    // Ten checkouts of one hold at once: one confirms it, the nine others find it not held.
    let hold = app.hold(2, product, 2, 600).await;
    wait_held(&app, hold).await;
    let answers = join_all((0..10).map(|_| app.settle(hold, "checkout", None))).await;
    let mut confirmed = 0;
    for response in answers {
        match response.status() {
            StatusCode::OK => {
                confirmed += 1;
                assert_eq!(json_of(response).await["status"], "succeeded");
            }
            _ => {
                assert_error(response, StatusCode::CONFLICT, "not_held").await;
            }
        }
    }
    assert_eq!(confirmed, 1, "one checkout confirms the hold");
    assert_eq!(counters(&app, product).await, (8, 0));
    assert_conserved(&app, product, 10).await;
    assert_eq!(assert_gapless(&app).await, 1, "numbered once");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn only_the_holder_or_staff_settle_a_hold_and_bad_requests_change_nothing(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("mine", 10).await;
    let (alice, alice_token) = app.buyer("alice").await;
    let (_, bob_token) = app.buyer("bob").await;
    let response = app
        .client
        .post(app.url("/api/v1/order/addToCart"))
        .bearer_auth(&alice_token)
        .json(&json!({"product_id": product, "quantity": 1, "hold_seconds": 300}))
        .send()
        .await
        .unwrap();
    let hold = accepted_id(response).await;
    let held = app.wait_final_as(hold, &alice_token).await;
    assert_eq!(
        (held["status"].clone(), held["user_id"].clone()),
        (json!("held"), json!(alice))
    );

    // Another buyer, and an anonymous caller, do not see an account's hold.
    let bob = app.settle(hold, "checkout", Some(&bob_token)).await;
    assert_error(bob, StatusCode::NOT_FOUND, "not_found").await;
    let anonymous = app.settle(hold, "cancel", None).await;
    assert_error(anonymous, StatusCode::NOT_FOUND, "not_found").await;
    let forged = app.settle(hold, "checkout", Some("allotb1_forged")).await;
    assert_error(forged, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let malformed = app
        .client
        .post(app.url("/api/v1/transaction/not-a-uuid/checkout"))
        .send()
        .await
        .unwrap();
    assert_error(malformed, StatusCode::BAD_REQUEST, "invalid_id").await;
    let unknown = app.settle(TransactionId::new(), "checkout", None).await;
    assert_error(unknown, StatusCode::NOT_FOUND, "not_found").await;
    // A purchase that is not a hold cannot be checked out.
    let bought = app.buy(9, product, 1).await;
    app.wait_final(bought).await;
    let not_a_hold = app.settle(bought, "checkout", None).await;
    let message = assert_error(not_a_hold, StatusCode::CONFLICT, "not_held").await;
    assert!(message.contains("succeeded"), "{message}");
    assert_eq!(
        app.count("SELECT count(*) FROM hold_commands").await,
        0,
        "nothing recorded"
    );
    assert_eq!(counters(&app, product).await, (8, 1));

    // The holder checks out with its token; staff cancel a second hold of hers.
    let mine = app.settle(hold, "checkout", Some(&alice_token)).await;
    assert_eq!(mine.status(), StatusCode::OK);
    let response = app
        .client
        .post(app.url("/api/v1/orders"))
        .bearer_auth(&alice_token)
        .json(&json!({"items": [{"product_id": product, "quantity": 2}], "hold_seconds": 300}))
        .send()
        .await
        .unwrap();
    let second = accepted_id(response).await;
    app.wait_final_as(second, &alice_token).await;
    let staff = app.settle(second, "cancel", Some(ADMIN_TOKEN)).await;
    assert_eq!(staff.status(), StatusCode::OK);
    assert_eq!(json_of(staff).await["reason"], "cancelled");
    assert_conserved(&app, product, 10).await;

    // Her history shows both, as they now stand.
    let history: Value = app
        .client
        .get(app.url("/api/v1/orders/history"))
        .bearer_auth(&alice_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<(&str, i64)> = history["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["status"].as_str().unwrap(),
                t["hold_seconds"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses, [("rejected", 300), ("succeeded", 300)]);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn bad_hold_input_is_refused_and_nothing_is_written(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let product = app.create_product("guarded", 10).await;
    let keys_before = app.redis_key_count().await;
    for (body, code) in [
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "hold_seconds": 0}),
            "invalid_body",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "hold_seconds": -5}),
            "invalid_body",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "hold_seconds": 3601}),
            "invalid_body",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "hold_seconds": 1e20}),
            "invalid_body",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "hold_seconds": "60"}),
            "invalid_body",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "hold_seconds": 1.5}),
            "invalid_body",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "slot_id": 42}),
            "unknown_slot",
        ),
        (
            json!({"user_id": 1, "product_id": product, "quantity": 1, "slot_id": 0}),
            "invalid_body",
        ),
    ] {
        for path in ["/api/v1/order/addToCart", "/api/v1/orders"] {
            let body = if path == "/api/v1/orders" {
                let mut order =
                    json!({"user_id": 1, "items": [{"product_id": product, "quantity": 1}]});
                for field in ["hold_seconds", "slot_id"] {
                    if let Some(value) = body.get(field) {
                        order[field] = value.clone();
                    }
                }
                order
            } else {
                body.clone()
            };
            let response = app.post_json(path, &body).await;
            let message = assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
            if code == "unknown_slot" {
                assert_eq!(message, "no slot 42");
            }
        }
    }
    assert_eq!(app.total_queue_depth().await, 0, "nothing enqueued");
    assert_eq!(app.redis_key_count().await, keys_before, "nothing recorded");
    assert_eq!(app.count("SELECT count(*) FROM transactions").await, 0);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn held_units_count_towards_max_per_buyer_until_released(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("limited", 10).await;
    let response = app
        .patch_product(product, &json!({"max_per_buyer": 2}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    let hold = app.hold(7, product, 2, 600).await;
    wait_held(&app, hold).await;
    let more = app.buy(7, product, 1).await;
    assert_eq!(app.wait_final(more).await["reason"], "limit_exceeded");
    let another_hold = app.hold(7, product, 1, 600).await;
    assert_eq!(
        app.wait_final(another_hold).await["reason"],
        "limit_exceeded"
    );
    // Another buyer is not affected.
    let other = app.buy(8, product, 2).await;
    assert_eq!(app.wait_final(other).await["status"], "succeeded");

    // Cancelled: the buyer may buy again, up to the limit.
    assert_eq!(
        app.settle(hold, "cancel", None).await.status(),
        StatusCode::OK
    );
    let after = app.buy(7, product, 2).await;
    assert_eq!(app.wait_final(after).await["status"], "succeeded");
    let past = app.buy(7, product, 1).await;
    assert_eq!(app.wait_final(past).await["reason"], "limit_exceeded");
    let units: i64 =
        sqlx::query_scalar("SELECT units FROM buyer_units WHERE product_id = $1 AND user_id = 7")
            .bind(product)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(units, 2);

    // A limit set while a hold is open counts it.
    let free = app.create_product("free", 10).await;
    let open = app.hold(7, free, 3, 600).await;
    wait_held(&app, open).await;
    let response = app.patch_product(free, &json!({"max_per_buyer": 3})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let over = app.buy(7, free, 1).await;
    assert_eq!(app.wait_final(over).await["reason"], "limit_exceeded");
    assert_eq!(
        app.settle(open, "checkout", None).await.status(),
        StatusCode::OK
    );
    assert_conserved(&app, product, 10).await;
    assert_conserved(&app, free, 10).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_restock_during_holds_adds_to_the_sellable_stock(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("restocked", 2).await;
    let holds = join_all((1..=2).map(|user| app.hold(user, product, 1, 600))).await;
    for &hold in &holds {
        wait_held(&app, hold).await;
    }
    assert_eq!(counters(&app, product).await, (0, 2));
    let refused = app.buy(9, product, 1).await;
    assert_eq!(app.wait_final(refused).await["reason"], "out_of_stock");

    let response = app
        .post_admin(
            &format!("/api/v1/products/{product}/restock"),
            &json!({"quantity": 3}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let restocked = json_of(response).await;
    assert_eq!(
        (restocked["stock"].clone(), restocked["held"].clone()),
        (json!(3), json!(2))
    );
    let buys = join_all((10..14).map(|user| app.buy(user, product, 1))).await;
    let views = join_all(buys.iter().map(|&id| app.wait_final(id))).await;
    let succeeded = views.iter().filter(|v| v["status"] == "succeeded").count();
    assert_eq!(succeeded, 3, "the restocked units, not the held ones");
    assert_eq!(
        app.settle(holds[0], "checkout", None).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.settle(holds[1], "cancel", None).await.status(),
        StatusCode::OK
    );
    assert_eq!(counters(&app, product).await, (1, 0));
    assert_conserved(&app, product, 5).await;
    assert_eq!(assert_gapless(&app).await, 4);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn prefer_wait_events_and_keys_follow_a_hold(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("watched", 5).await;

    // With Prefer: wait, the hold's answer comes at once: held.
    let response = app
        .client
        .post(app.url("/api/v1/order/addToCart"))
        .header("prefer", "wait=5")
        .json(&json!({"user_id": 3, "product_id": product, "quantity": 1, "hold_seconds": 120}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let held = json_of(response).await;
    assert_eq!(held["status"], "held", "{held}");
    let id = TransactionId(held["transaction_id"].as_str().unwrap().parse().unwrap());

    // Its events: held now, then its checkout, and the stream ends.
    let stream = app
        .client
        .get(app.url(&format!("/api/v1/transaction/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream;
    let mut text = String::new();
    while !text.contains("\"status\":\"held\"") {
        let chunk = tokio::time::timeout(DEADLINE, body.chunk())
            .await
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream goes on"),
        ));
    }
    assert_eq!(
        app.settle(id, "checkout", None).await.status(),
        StatusCode::OK
    );
    let rest = tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = body.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
    .await
    .expect("the stream ends once the hold is final");
    let statuses: Vec<&str> = rest
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| {
            if data.contains("\"status\":\"held\"") {
                "held"
            } else if data.contains("\"status\":\"succeeded\"") {
                "succeeded"
            } else {
                "other"
            }
        })
        .collect();
    assert_eq!(statuses, ["held", "succeeded"]);

    // An Idempotency-Key covers the hold: the same request is the same transaction, another
    // hold time is another request.
    let keyed = |hold: i64| {
        app.client
            .post(app.url("/api/v1/order/addToCart"))
            .header("idempotency-key", "\"hold-key-1\"")
            .json(
                &json!({"user_id": 4, "product_id": product, "quantity": 1, "hold_seconds": hold}),
            )
            .send()
    };
    let first = accepted_id(keyed(60).await.unwrap()).await;
    let replay = keyed(60).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(accepted_id(replay).await, first);
    let other = keyed(61).await.unwrap();
    assert_error(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    wait_held(&app, first).await;
    assert_eq!(counters(&app, product).await, (3, 1));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_checkout_decided_after_the_wait_is_answered_202_and_decided_later(pool: PgPool) {
    let mut app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("slow", 3).await;
    let hold = app.hold(1, product, 1, 600).await;
    wait_held(&app, hold).await;
    app.stop_worker().await;

    let response = app
        .client
        .post(app.url(&format!("/api/v1/transaction/{hold}/checkout")))
        .header("prefer", "wait=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.headers()["location"],
        format!("/api/v1/transaction/{hold}").as_str()
    );
    assert_eq!(response.headers()["preference-applied"], "wait=1");
    assert_eq!(
        json_of(response).await,
        json!({"transaction_id": hold.to_string(), "status": "held"})
    );
    assert_eq!(app.transaction(hold).await["status"], "held");

    // Once a worker runs again, the stored checkout is decided.
    app.start_worker(std::sync::Arc::new(allot_shared::SystemClock));
    let view = wait_status(&app, hold, "succeeded").await;
    assert!(view["order_number"].is_string());
    let outcome: String =
        sqlx::query_scalar("SELECT outcome FROM hold_commands WHERE transaction_id = $1")
            .bind(hold.0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(outcome, "confirmed");
    assert_conserved(&app, product, 3).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn the_hold_metrics_are_exported_from_the_start(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.worker_address.as_ref().unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"allot_worker_holds_total{event="held"}"#,
        r#"allot_worker_holds_total{event="confirmed"}"#,
        r#"allot_worker_holds_total{event="cancelled"}"#,
        r#"allot_worker_holds_total{event="expired"}"#,
        r#"allot_worker_decisions_total{outcome="held"}"#,
        "allot_holds_open",
        r#"allot_worker_hold_checkout_seconds_bucket{le="3600"}"#,
        r#"allot_worker_expiry_lateness_seconds_bucket{le="0.05"}"#,
    ] {
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with(&format!("{series} "))),
            "worker /metrics has {series}:\n{metrics}"
        );
    }
    // The open holds, as the sweeper counts them.
    let product = app.create_product("counted", 5).await;
    let holds = join_all((1..=2).map(|user| app.hold(user, product, 1, 600))).await;
    for &hold in &holds {
        wait_held(&app, hold).await;
    }
    wait_for("the open holds gauge to count 2", || async {
        let metrics = app
            .client
            .get(format!("{}/metrics", app.worker_address.as_ref().unwrap()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (sample(&metrics, "allot_holds_open") == 2.0).then_some(())
    })
    .await;
    assert_eq!(
        app.settle(holds[0], "checkout", None).await.status(),
        StatusCode::OK
    );
    let metrics = app
        .client
        .get(format!("{}/metrics", app.worker_address.as_ref().unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(sample(&metrics, "allot_worker_hold_checkout_seconds_count") >= 1.0);
    assert!(sample(&metrics, r#"allot_worker_holds_total{event="confirmed"}"#) >= 1.0);
    app.shutdown().await;
}
