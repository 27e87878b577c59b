//! Capacity counters (slots): an order naming a `slot_id` takes one place of it as well as its
//! units, all or nothing, decided like a product's stock under contention (the last place goes
//! to one order); a hold holds its place; a lowered capacity refuses new orders and cancels
//! none; a slot refuses orders accepted at or after its `ends_at`.

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, clock_at, spawn_app};
use crate::holds::{assert_conserved, assert_gapless, counters, wait_held};
use chrono::{DateTime, TimeDelta, Utc};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

async fn order_for_slot(
    app: &TestApp,
    user: i64,
    items: &[(i64, i64)],
    slot: i64,
) -> reqwest::Response {
    let items: Vec<Value> = items
        .iter()
        .map(|&(product_id, quantity)| json!({"product_id": product_id, "quantity": quantity}))
        .collect();
    app.post_json(
        "/api/v1/orders",
        &json!({"user_id": user, "items": items, "slot_id": slot}),
    )
    .await
}

/// (capacity, taken, held, remaining) of a slot.
async fn places(app: &TestApp, slot: i64) -> (i64, i64, i64, i64) {
    let view = app.slot(slot).await;
    let n = |field: &str| view[field].as_i64().unwrap();
    (n("capacity"), n("taken"), n("held"), n("remaining"))
}

async fn patch_slot(app: &TestApp, slot: i64, body: Value) -> reqwest::Response {
    app.client
        .patch(app.url(&format!("/api/v1/slots/{slot}")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_slot_of_capacity_1_with_100_concurrent_orders_takes_exactly_one(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let mut products = Vec::new();
    for n in 0..4 {
        products.push(app.create_product(&format!("p{n}"), 1000).await);
    }
    let slot = app.create_slot("Tuesday 10:00-12:00", 1, json!({})).await;
    // 100 orders over four products (so four partitions' consumers race for the one place),
    // half by addToCart, half as orders.
    let responses = join_all((0..100).map(|n: i64| {
        let product = products[(n % 4) as usize];
        let app = &app;
        async move {
            if n % 2 == 0 {
                app.post_json(
                    "/api/v1/order/addToCart",
                    &json!({"user_id": n + 1, "product_id": product, "quantity": 1, "slot_id": slot}),
                )
                .await
            } else {
                order_for_slot(app, n + 1, &[(product, 1)], slot).await
            }
        }
    }))
    .await;
    let mut ids = Vec::new();
    for response in responses {
        ids.push(crate::helpers::accepted_id(response).await);
    }
    let views = join_all(ids.iter().map(|&id| app.wait_final(id))).await;
    let succeeded = views.iter().filter(|v| v["status"] == "succeeded").count();
    assert_eq!(succeeded, 1, "exactly one order gets the place");
    for view in views.iter().filter(|v| v["status"] == "rejected") {
        assert_eq!(view["reason"], "slot_full", "{view}");
        assert_eq!(view["reason_slot_id"], slot, "the slot is named: {view}");
        assert_eq!(view["slot_id"], slot);
    }
    assert_eq!(places(&app, slot).await, (1, 1, 0, 0));
    let sold: i64 = join_all(products.iter().map(|&p| app.product_stock(p)))
        .await
        .iter()
        .map(|stock| 1000 - stock)
        .sum();
    assert_eq!(sold, 1, "only the winner took a unit");
    assert_eq!(assert_gapless(&app).await, 1);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_order_for_a_slot_and_two_products_where_one_runs_out_takes_nothing(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let plenty = app.create_product("plenty", 10).await;
    let scarce = app.create_product("scarce", 1).await;
    let slot = app.create_slot("Wednesday", 5, json!({})).await;
    let first = crate::helpers::accepted_id(
        order_for_slot(&app, 1, &[(plenty, 1), (scarce, 1)], slot).await,
    )
    .await;
    assert_eq!(app.wait_final(first).await["status"], "succeeded");
    let second = crate::helpers::accepted_id(
        order_for_slot(&app, 2, &[(plenty, 2), (scarce, 1)], slot).await,
    )
    .await;
    let refused = app.wait_final(second).await;
    assert_eq!(
        (
            refused["reason"].clone(),
            refused["reason_product_id"].clone()
        ),
        (json!("out_of_stock"), json!(scarce)),
        "{refused}"
    );
    assert!(refused.get("reason_slot_id").is_none());
    assert_eq!(
        counters(&app, plenty).await,
        (9, 0),
        "nothing taken of the product that had units"
    );
    assert_eq!(counters(&app, scarce).await, (0, 0));
    assert_eq!(places(&app, slot).await, (5, 1, 0, 4), "nor of the slot");
    assert_eq!(assert_gapless(&app).await, 1);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_hold_holds_its_place_until_checkout_cancel_or_expiry(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("groceries", 10).await;
    let slot = app.create_slot("Friday", 1, json!({})).await;
    let hold = |user: i64| {
        let body = json!({"user_id": user, "product_id": product, "quantity": 1, "slot_id": slot,
                          "hold_seconds": 600});
        let app = &app;
        async move { app.post_json("/api/v1/order/addToCart", &body).await }
    };
    let first = crate::helpers::accepted_id(hold(1).await).await;
    let held = wait_held(&app, first).await;
    assert_eq!(held["slot_id"], slot);
    assert_eq!(places(&app, slot).await, (1, 0, 1, 0));
    let second = crate::helpers::accepted_id(hold(2).await).await;
    assert_eq!(app.wait_final(second).await["reason"], "slot_full");

    assert_eq!(
        app.settle(first, "cancel", None).await.status(),
        StatusCode::OK
    );
    assert_eq!(places(&app, slot).await, (1, 0, 0, 1));
    let third = crate::helpers::accepted_id(hold(3).await).await;
    wait_held(&app, third).await;
    assert_eq!(
        app.settle(third, "checkout", None).await.status(),
        StatusCode::OK
    );
    assert_eq!(places(&app, slot).await, (1, 1, 0, 0));
    assert_conserved(&app, product, 10).await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_capacity_lowered_below_what_is_taken_refuses_new_orders_and_cancels_none(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let product = app.create_product("boxes", 10).await;
    let slot = app.create_slot("Saturday", 3, json!({})).await;
    let mut taken = Vec::new();
    for user in 1..=2 {
        let id =
            crate::helpers::accepted_id(order_for_slot(&app, user, &[(product, 1)], slot).await)
                .await;
        assert_eq!(app.wait_final(id).await["status"], "succeeded");
        taken.push(id);
    }
    let response = patch_slot(&app, slot, json!({"capacity": 1})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let patched: Value = response.json().await.unwrap();
    assert_eq!(
        patched,
        json!({"id": slot, "name": "Saturday", "capacity": 1, "taken": 2, "held": 0, "remaining": 0})
    );
    let refused =
        crate::helpers::accepted_id(order_for_slot(&app, 3, &[(product, 1)], slot).await).await;
    assert_eq!(app.wait_final(refused).await["reason"], "slot_full");
    for &id in &taken {
        assert_eq!(
            app.transaction(id).await["status"],
            "succeeded",
            "nothing cancelled"
        );
    }
    let response = patch_slot(&app, slot, json!({"capacity": 3, "name": "Saturday 9-11"})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let accepted =
        crate::helpers::accepted_id(order_for_slot(&app, 4, &[(product, 1)], slot).await).await;
    assert_eq!(app.wait_final(accepted).await["status"], "succeeded");
    assert_eq!(places(&app, slot).await, (3, 3, 0, 0));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_slot_refuses_orders_accepted_at_or_after_its_end(pool: PgPool) {
    let api_clock = clock_at("2026-12-05T09:59:59.999999Z");
    let app = spawn_app(
        pool,
        Options {
            api_clock: Some(api_clock.clone()),
            ..Options::default()
        },
    )
    .await;
    let product = app.create_product("evening", 10).await;
    let ends: DateTime<Utc> = "2026-12-05T10:00:00Z".parse().unwrap();
    let slot = app
        .create_slot(
            "Morning",
            10,
            json!({"starts_at": "2026-12-05T08:00:00Z", "ends_at": "2026-12-05T10:00:00Z"}),
        )
        .await;
    assert_eq!(
        app.slot(slot).await,
        json!({"id": slot, "name": "Morning", "capacity": 10, "taken": 0, "held": 0, "remaining": 10,
               "starts_at": "2026-12-05T08:00:00Z", "ends_at": "2026-12-05T10:00:00Z"})
    );
    let before =
        crate::helpers::accepted_id(order_for_slot(&app, 1, &[(product, 1)], slot).await).await;
    api_clock.set(ends);
    let at =
        crate::helpers::accepted_id(order_for_slot(&app, 2, &[(product, 1)], slot).await).await;
    api_clock.set(ends + TimeDelta::hours(1));
    let after =
        crate::helpers::accepted_id(order_for_slot(&app, 3, &[(product, 1)], slot).await).await;
    assert_eq!(app.wait_final(before).await["status"], "succeeded");
    for id in [at, after] {
        let view = app.wait_final(id).await;
        assert_eq!(
            (view["reason"].clone(), view["reason_slot_id"].clone()),
            (json!("slot_ended"), json!(slot))
        );
    }
    assert_eq!(places(&app, slot).await, (10, 1, 0, 9));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn slots_are_listed_a_page_at_a_time_and_bad_slot_input_changes_nothing(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(
            app.create_slot(&format!("slot {n}"), n * 10, json!({}))
                .await,
        );
    }
    let page: Value = app.get("/api/v1/slots?limit=2").await.json().await.unwrap();
    assert_eq!(
        page,
        json!({"slots": [
            {"id": ids[0], "name": "slot 1", "capacity": 10, "taken": 0, "held": 0, "remaining": 10},
            {"id": ids[1], "name": "slot 2", "capacity": 20, "taken": 0, "held": 0, "remaining": 20}],
            "next_after": ids[1]})
    );
    let last: Value = app
        .get(&format!("/api/v1/slots?limit=2&after={}", ids[1]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(last["slots"].as_array().unwrap().len(), 1);
    assert_eq!(last["next_after"], Value::Null);
    assert_error(
        app.get("/api/v1/slots?limit=0").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    assert_error(
        app.get("/api/v1/slots/999").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        app.get("/api/v1/slots/x").await,
        StatusCode::BAD_REQUEST,
        "invalid_id",
    )
    .await;

    let before = app.count("SELECT count(*) FROM slots").await;
    for body in [
        json!({"name": "s", "capacity": -1}),
        json!({"name": "s", "capacity": 1_000_000_000_001_i64}),
        json!({"name": "", "capacity": 1}),
        json!({"name": " ", "capacity": 1}),
        json!({"name": "s", "capacity": 1, "starts_at": "2026-12-05T10:00:00Z", "ends_at": "2026-12-05T10:00:00Z"}),
        json!({"name": "s", "capacity": 1, "ends_at": "tomorrow"}),
        json!({"name": "s"}),
        json!({"name": "s", "capacity": 1, "taken": 0}),
    ] {
        let response = app.post_admin("/api/v1/slots", &body).await;
        assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    let anonymous = app
        .post_json("/api/v1/slots", &json!({"name": "s", "capacity": 1}))
        .await;
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "unauthorized").await;
    for body in [
        json!({"capacity": null}),
        json!({"name": null}),
        json!({"capacity": -3}),
        json!({"starts_at": "2030-01-01T00:00:00Z", "ends_at": "2029-01-01T00:00:00Z"}),
        json!({"held": 1}),
    ] {
        let response = patch_slot(&app, ids[0], body).await;
        assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    assert_error(
        patch_slot(&app, 999, json!({"capacity": 1})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM slots").await, before);
    assert_eq!(app.slot(ids[0]).await["capacity"], 10, "unchanged");
    app.shutdown().await;
}
