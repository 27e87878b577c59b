//! `POST /api/v1/orders`: an order of several products, decided all or nothing with one order
//! number, read back by `GET /api/v1/transaction/{id}` (from Redis and from PostgreSQL), by
//! `Prefer: wait` and by SSE; answered at once when the catalogue snapshot knows a line cannot
//! be served; bad input refused with nothing written; messages of earlier versions still
//! decided.

use crate::helpers::{
    Options, TestApp, accepted_id, assert_error, order_seqs, partition_of, spawn_app, today,
    wait_for,
};
use allot_shared::TransactionId;
use allot_shared::status_store::transaction_key;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Everything a refused order could have written: decided transactions and their lines,
/// stock, queued messages, Redis keys.
async fn written(app: &TestApp) -> (i64, i64, i64, u32, usize) {
    (
        app.count("SELECT count(*) FROM transactions").await,
        app.count("SELECT count(*) FROM transaction_items").await,
        app.count("SELECT coalesce(sum(stock), 0)::bigint FROM products")
            .await,
        app.total_queue_depth().await,
        app.redis_key_count().await,
    )
}

fn items(lines: &[(i64, i64)]) -> Value {
    lines
        .iter()
        .map(|&(product_id, quantity)| json!({"product_id": product_id, "quantity": quantity}))
        .collect()
}

/// Three products on three different partitions.
async fn three_products(app: &TestApp, stock: [i64; 3]) -> [i64; 3] {
    let mut ids = [0; 3];
    for (slot, units) in stock.into_iter().enumerate() {
        ids[slot] = app.create_product(&format!("product {slot}"), units).await;
    }
    let partitions: std::collections::BTreeSet<_> =
        ids.iter().map(|&id| partition_of(id)).collect();
    assert_eq!(
        partitions.len(),
        3,
        "consecutive products spread over partitions"
    );
    ids
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_order_takes_every_line_or_none_and_gets_one_number(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let [a, b, c] = three_products(&app, [5, 1, 5]).await;

    // Every line served: one order number for the order.
    let first = app.order(7, &[(a, 2), (c, 1)]).await;
    let view = app.wait_final(first).await;
    assert_eq!(
        view,
        json!({"transaction_id": first.to_string(), "status": "succeeded", "user_id": 7,
               "items": items(&[(a, 2), (c, 1)]),
               "order_number": format!("{}-00001", today()),
               "created_at": view["created_at"], "decided_at": view["decided_at"]})
    );

    // The second line cannot be served: nothing is taken, the reason names it.
    let short = app.order(8, &[(a, 1), (b, 2), (c, 1)]).await;
    let view = app.wait_final(short).await;
    assert_eq!(
        view,
        json!({"transaction_id": short.to_string(), "status": "rejected", "user_id": 8,
               "items": items(&[(a, 1), (b, 2), (c, 1)]),
               "reason": "out_of_stock", "reason_product_id": b,
               "created_at": view["created_at"], "decided_at": view["decided_at"]})
    );
    // An unknown product is accepted, then rejected by name.
    let unknown = app.order(9, &[(c, 1), (424_242, 1)]).await;
    let view = app.wait_final(unknown).await;
    assert_eq!(view["reason"], "unknown_product");
    assert_eq!(view["reason_product_id"], 424_242);
    // An order of one item is a transaction of one line, read like addToCart's.
    let one = app.order(10, &[(b, 1)]).await;
    let view = app.wait_final(one).await;
    assert_eq!(
        view,
        json!({"transaction_id": one.to_string(), "status": "succeeded", "user_id": 10,
               "product_id": b, "quantity": 1,
               "order_number": format!("{}-00002", today()),
               "created_at": view["created_at"], "decided_at": view["decided_at"]})
    );

    // Only the two successes took units; their numbers are 1 and 2.
    assert_eq!(app.product_stock(a).await, 3);
    assert_eq!(app.product_stock(b).await, 0);
    assert_eq!(app.product_stock(c).await, 4);
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2]);
    // Stored: an order of several lines has its lines in transaction_items, one of one line
    // in the row; the view gives them either way.
    let lines: Vec<(uuid::Uuid, i16, i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, position, product_id, quantity FROM transaction_lines \
         WHERE transaction_id = ANY($1) ORDER BY transaction_id, position",
    )
    .bind(vec![first.0, one.0])
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        lines,
        vec![(first.0, 0, a, 2), (first.0, 1, c, 1), (one.0, 0, b, 1)]
    );
    let stored: (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT product_id, quantity, reason_product_id FROM transactions WHERE id = $1",
    )
    .bind(short.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, (None, None, Some(b)));

    // The same views from PostgreSQL when Redis has lost them.
    for id in [first, short, one] {
        let from_redis = app.transaction(id).await;
        let _: () = redis::cmd("DEL")
            .arg(transaction_key(&app.api_config.common.redis_prefix, id))
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
        assert_eq!(
            app.transaction(id).await,
            from_redis,
            "{id} from PostgreSQL"
        );
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_order_is_followed_by_prefer_wait_and_by_its_event_stream(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let [a, b, _] = three_products(&app, [3, 3, 3]).await;

    let response = app
        .client
        .post(app.url("/api/v1/orders"))
        .header("prefer", "wait=10")
        .json(&json!({"user_id": 3, "items": items(&[(b, 1), (a, 3)])}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["preference-applied"], "wait=10");
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["items"], items(&[(b, 1), (a, 3)]));
    let id: TransactionId =
        TransactionId(view["transaction_id"].as_str().unwrap().parse().unwrap());
    assert_eq!(app.transaction(id).await, view);

    // The next order cannot get a's units; its stream ends with the rejection.
    let rejected = app.order(4, &[(a, 1), (b, 1)]).await;
    let events = app
        .get(&format!("/api/v1/transaction/{rejected}/events"))
        .await;
    assert_eq!(events.status(), StatusCode::OK);
    let text = events.text().await.unwrap();
    let last: Value = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| serde_json::from_str(data.trim()).unwrap())
        .next_back()
        .expect("a status event");
    assert_eq!(last["status"], "rejected");
    assert_eq!(last["reason"], "out_of_stock");
    assert_eq!(last["reason_product_id"], a);
    assert_eq!(last["items"], items(&[(a, 1), (b, 1)]));
    assert_eq!(app.product_stock(b).await, 2);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_order_the_snapshot_knows_cannot_be_served_is_answered_at_once(pool: PgPool) {
    let app = spawn_app(
        pool,
        Options {
            sold_out_refresh_ms: 100,
            ..Options::default()
        },
    )
    .await;
    let [a, b, c] = three_products(&app, [5, 0, 5]).await;
    let response = app.patch_product(c, &json!({"paused": true})).await;
    assert_eq!(response.status(), StatusCode::OK);
    // b is sold out from its creation: wait for the snapshot to know it.
    wait_for("b to be known sold out", || async {
        let response = app.add_to_cart(1, b, 1).await;
        match response.status() {
            StatusCode::OK => Some(()),
            StatusCode::ACCEPTED => None,
            other => panic!("{other}"),
        }
    })
    .await;
    wait_for("the accepted requests to be decided", || async {
        (app.total_queue_depth().await == 0).then_some(())
    })
    .await;
    let before = written(&app).await;

    for (lines, reason, named) in [
        (vec![(a, 1), (b, 1), (c, 1)], "out_of_stock", b),
        (vec![(a, 1), (c, 1), (b, 1)], "paused", c),
    ] {
        let response = app.place_order(5, &lines).await;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer,
            json!({"status": "rejected", "reason": reason, "user_id": 5, "items": items(&lines),
                   "reason_product_id": named, "final": true})
        );
    }
    // One item: shaped like addToCart's answer.
    let response = app.place_order(5, &[(c, 2)]).await;
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "rejected", "reason": "paused", "user_id": 5, "product_id": c,
               "quantity": 2, "final": true})
    );
    assert_eq!(written(&app).await, before, "nothing recorded or enqueued");

    // What the snapshot does not know goes to the worker.
    let id = app.order(5, &[(a, 2)]).await;
    assert_eq!(app.wait_final(id).await["status"], "succeeded");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_bad_order_is_a_clear_422_and_writes_nothing(pool: PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let [a, b, _] = three_products(&app, [5, 5, 5]).await;
    let before = written(&app).await;
    let twenty_one: Vec<Value> = (1..=21)
        .map(|n| json!({"product_id": a + n, "quantity": 1}))
        .collect();

    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"user_id": 7, "items": []}),
            "items must have 1 to 20 entries, got 0",
        ),
        (
            json!({"user_id": 7, "items": twenty_one}),
            "items must have 1 to 20 entries, got 21",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": 1}, {"product_id": b, "quantity": 1}, {"product_id": a, "quantity": 2}]}),
            "items[2]: product",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": 0}]}),
            "quantity must be a positive integer, got 0",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": -1}]}),
            "quantity must be a positive integer, got -1",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": 11}]}),
            "items[0].quantity must be at most 10, got 11",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": 0, "quantity": 1}]}),
            "product_id must be a positive integer",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": "1"}]}),
            "invalid type",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": 1.5}]}),
            "invalid type",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a}]}),
            "missing field `quantity`",
        ),
        (
            json!({"user_id": 7, "items": [{"product_id": a, "quantity": 1, "price": 3}]}),
            "unknown field `price`",
        ),
        (
            json!({"user_id": 7, "items": [[a, 1]]}),
            "expected an object",
        ),
        (json!({"user_id": 7, "items": [null]}), "expected an object"),
        (
            json!({"user_id": 7, "items": {"product_id": a, "quantity": 1}}),
            "invalid type: map, expected a sequence",
        ),
        (json!({"user_id": 7, "items": null}), "invalid type: null"),
        (json!({"user_id": 7}), "missing field `items`"),
        (
            json!({"items": [{"product_id": a, "quantity": 1}]}),
            "user_id is required without a buyer's token",
        ),
        (
            json!({"user_id": 0, "items": [{"product_id": a, "quantity": 1}]}),
            "user_id must be a positive integer",
        ),
        (
            json!({"user_id": 1_000_000_000_000_000_i64, "items": [{"product_id": a, "quantity": 1}]}),
            "user_id must be below 1000000000000000 without a token",
        ),
        (
            json!({"user_id": 7, "product_id": a, "items": [{"product_id": a, "quantity": 1}]}),
            "unknown field `product_id`",
        ),
    ];
    for (body, expected) in cases {
        let response = app.post_json("/api/v1/orders", &body).await;
        let message =
            assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        assert!(message.contains(expected), "{body}: {message}");
        assert_eq!(written(&app).await, before, "written after {body}");
    }
    for (body, status, code) in [
        (
            "{\"user_id\": 7, \"items\": [",
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        ("[7, []]", StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (
            "{\"user_id\": 7, \"items\": [{\"product_id\": 1, \"product_id\": 2, \"quantity\": 1}]}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ] {
        let response = app
            .send(
                Method::POST,
                "/api/v1/orders",
                &[("content-type", "application/json")],
                body,
            )
            .await;
        assert_error(response, status, code).await;
    }
    let response = app
        .send(
            Method::POST,
            "/api/v1/orders",
            &[("content-type", "text/plain")],
            json!({"user_id": 7, "items": items(&[(a, 1)])}).to_string(),
        )
        .await;
    assert_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    assert_eq!(written(&app).await, before);

    // Twenty items, each at the largest quantity, is accepted.
    let twenty: Vec<(i64, i64)> = (0..20).map(|n| (a + n, 10)).collect();
    let id = accepted_id(app.place_order(7, &twenty).await).await;
    assert_eq!(app.transaction(id).await["items"], items(&twenty));
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn messages_of_earlier_versions_are_still_decided(pool: PgPool) {
    let app = spawn_app(pool, Options::default()).await;
    let [a, b, _] = three_products(&app, [5, 5, 5]).await;
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
    // The single-request message of the first versions: flat JSON, no envelope type.
    let legacy = format!(
        r#"{{"transaction_id":"{}","user_id":1,"product_id":{a},"quantity":2,"created_at":"2026-11-22T10:00:00.123456Z"}}"#,
        ids[0]
    );
    app.publish_raw(
        partition_of(a),
        legacy.as_bytes(),
        Some(&ids[0].to_string()),
    )
    .await;
    // A batch envelope of flat requests, as the API wrote before orders had lines.
    let flat = |id: uuid::Uuid, product: i64| {
        format!(
            r#"{{"transaction_id":"{id}","user_id":2,"product_id":{product},"quantity":1,"created_at":"2026-11-22T10:00:01Z"}}"#
        )
    };
    let (one, two) = (flat(ids[1], a), flat(ids[2], b));
    app.publish_envelope(
        partition_of(a),
        &[one.as_bytes(), two.as_bytes()],
        "legacy-envelope",
    )
    .await;
    // And an order of several lines, in the same kind of envelope.
    let order = format!(
        r#"{{"transaction_id":"{}","user_id":3,"items":[{{"product_id":{b},"quantity":2}},{{"product_id":{a},"quantity":1}}],"created_at":"2026-11-22T10:00:02Z"}}"#,
        ids[3]
    );
    app.publish_envelope(partition_of(a), &[order.as_bytes()], "order-envelope")
        .await;

    // Nothing of these went through the API, so there is no pending status to poll: wait for
    // the rows.
    wait_for("the four requests to be decided", || async {
        let decided = app.count("SELECT count(*) FROM transactions").await;
        (decided == 4).then_some(())
    })
    .await;
    let views: Vec<Value> =
        futures::future::join_all(ids.iter().map(|&id| app.transaction(TransactionId(id)))).await;
    assert!(
        views.iter().all(|view| view["status"] == "succeeded"),
        "{views:?}"
    );
    assert_eq!(views[0]["quantity"], 2);
    assert_eq!(views[0]["created_at"], "2026-11-22T10:00:00.123456Z");
    assert_eq!(views[3]["items"], items(&[(b, 2), (a, 1)]));
    assert_eq!(app.product_stock(a).await, 1);
    assert_eq!(app.product_stock(b).await, 2);
    assert_eq!(order_seqs(&app.pool, &today()).await, vec![1, 2, 3, 4]);
    app.shutdown().await;
}
