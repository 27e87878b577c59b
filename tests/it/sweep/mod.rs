//! The bad-input sweep: for every operation of the served OpenAPI document, a few thousand
//! requests built from the document and then broken (wrong types, arrays and scalars for
//! objects, missing, duplicate and unknown fields, numbers at and past every limit, floats
//! for integers, huge and deeply nested bodies, bytes that are not UTF-8 in bodies, paths and
//! queries, wrong and missing content types, wrong methods, bad and missing tokens, control
//! characters in strings), from a seeded generator. Each must be answered with a documented
//! 4xx in the one error shape, and none may write anything. The seed is printed; set
//! `ALLOT_SWEEP_SEED` to replay a run (`ALLOT_SWEEP_REQUESTS` sets how many requests).
//!
//! Bytes that are not ASCII, unencoded, in the request target are not HTTP (RFC 3986 wants
//! them percent-encoded): hyper refuses the request line with a bare 400 before the router
//! sees it, so for those the sweep asserts that 400 and that nothing was written.
//!
//! Operations without query parameters ignore the query string (as `/healthz?probe=1` from a
//! load balancer expects), so the sweep only breaks the query of operations that have one.

mod generate;
mod model;
mod raw_http;

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, spawn_app};
use generate::Generator;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

const DEFAULT_SEED: u64 = 20_261_122;
const DEFAULT_REQUESTS: usize = 3000;
/// The codes of the 4xx errors (README, "Errors").
const CLIENT_ERROR_CODES: &[&str] = &[
    "malformed_json",
    "invalid_body",
    "unsupported_media_type",
    "payload_too_large",
    "invalid_id",
    "invalid_query",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "invalid_credentials",
    "user_mismatch",
    "username_taken",
    "rate_limited",
    "invalid_idempotency_key",
    "idempotency_key_reused",
    "idempotency_key_in_flight",
    "unknown_slot",
    "not_held",
    "hold_expired",
];
/// Queue depths are read every this many requests (and at the end): a request that got
/// through would also have left its pending status in Redis, which is read after each one.
const QUEUES_EVERY: usize = 100;

/// Everything a request could write in PostgreSQL and Redis.
#[derive(Debug, PartialEq)]
struct Written {
    database: (i64, i64, String, i64, i64, i64, i64, i64, i64, i64, i64),
    /// Slots, and commands about holds.
    capacity: (String, i64),
    redis_keys: Vec<String>,
}

async fn written(app: &TestApp) -> Written {
    let database = sqlx::query_as(
        "SELECT (SELECT count(*) FROM products), \
                (SELECT coalesce(sum(stock), 0)::bigint FROM products), \
                (SELECT coalesce(string_agg(p::text, ',' ORDER BY id), '') FROM products p), \
                (SELECT count(*) FROM transactions), \
                (SELECT count(*) FROM dead_letters), \
                (SELECT count(*) FROM order_counters), \
                (SELECT count(*) FROM transaction_items), \
                (SELECT count(*) FROM buyer_units), \
                (SELECT count(*) FROM product_pauses), \
                (SELECT count(*) FROM users), \
                (SELECT count(*) FROM sessions)",
    )
    .fetch_one(&app.pool)
    .await
    .expect("the database answers");
    let capacity = sqlx::query_as(
        "SELECT (SELECT coalesce(string_agg(s::text, ',' ORDER BY id), '') FROM slots s), \
                (SELECT count(*) FROM hold_commands)",
    )
    .fetch_one(&app.pool)
    .await
    .expect("the database answers");
    let mut redis_keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.api_config.common.redis_prefix))
        .query_async(&mut app.redis.clone())
        .await
        .expect("Redis answers");
    redis_keys.sort();
    Written {
        database,
        capacity,
        redis_keys,
    }
}

/// Why a response breaks the promise, if it does.
fn violation(
    response: &raw_http::RawResponse,
    documented: Option<&model::Operation>,
) -> Option<String> {
    if !(400..500).contains(&response.status) {
        return Some(format!("status {} is not a 4xx", response.status));
    }
    if let Some(operation) = documented
        && !operation.statuses.contains(&response.status)
    {
        return Some(format!(
            "status {} is not documented for {} {} ({:?})",
            response.status, operation.method, operation.template, operation.statuses
        ));
    }
    if response.header("content-type") != Some("application/json") {
        return Some(format!(
            "content type {:?}",
            response.header("content-type")
        ));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&response.body) else {
        return Some(format!("body {} is not JSON", response.body.escape_ascii()));
    };
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    let shape = serde_json::json!({"error": {"code": code, "message": message}});
    if body != shape || message.is_empty() {
        return Some(format!("body {body} is not the error shape"));
    }
    if !CLIENT_ERROR_CODES.contains(&code) {
        return Some(format!("code {code:?} is not a documented 4xx code"));
    }
    None
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn every_broken_request_is_a_documented_4xx_in_the_error_shape_and_writes_nothing(
    pool: sqlx::PgPool,
) {
    let seed = std::env::var("ALLOT_SWEEP_SEED").map_or(DEFAULT_SEED, |seed| {
        seed.parse().expect("ALLOT_SWEEP_SEED is a u64")
    });
    let requests = std::env::var("ALLOT_SWEEP_REQUESTS").map_or(DEFAULT_REQUESTS, |n| {
        n.parse().expect("ALLOT_SWEEP_REQUESTS is a number")
    });
    println!(
        "bad-input sweep: seed {seed} (replay with ALLOT_SWEEP_SEED={seed}), {requests} requests"
    );

    // No worker: an accepted order would stay in its queue and its pending status in Redis.
    // A product with stock, so that a broken order that got through would be sellable and a
    // restock would show.
    let app = spawn_app(pool, Options::without_worker()).await;
    let product_id = app.create_product("Sweep product", 100).await;
    let response = app.get("/api-docs/openapi.json").await;
    let document: Value = response.json().await.expect("the document is JSON");
    let operations = model::operations(&document);
    assert!(
        operations.len() >= 11,
        "the document has the API's operations"
    );
    let address = app.address.trim_start_matches("http://").to_owned();
    let before = written(&app).await;
    assert_eq!(app.total_queue_depth().await, 0);

    let started = Instant::now();
    let mut generator = Generator::new(seed, &operations, product_id, ADMIN_TOKEN);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut categories: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for index in 0..requests {
        let probe = generator.next_probe();
        *categories.entry(probe.category).or_default() += 1;
        let documented = probe.operation.map(|index| &operations[index]);
        let replay = || {
            format!(
                "request {index} ({}, ALLOT_SWEEP_SEED={seed}): {}",
                probe.category,
                probe.request.describe()
            )
        };
        match raw_http::send(&address, &probe.request).await {
            Ok(response) => {
                let code = serde_json::from_slice::<Value>(&response.body)
                    .ok()
                    .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "-".to_owned());
                *codes
                    .entry(format!("{} {code}", response.status))
                    .or_default() += 1;
                let violation = if probe.category == "path_raw_bytes" {
                    (response.status != 400).then(|| {
                        format!(
                            "status {} for a request line hyper refuses",
                            response.status
                        )
                    })
                } else {
                    violation(&response, documented)
                };
                if let Some(violation) = violation {
                    failures.push(format!("{}: {violation}", replay()));
                }
            }
            Err(err) => failures.push(format!("{}: {err}", replay())),
        }
        let now = written(&app).await;
        assert!(
            now == before,
            "{} wrote something: {now:?}, was {before:?}",
            replay()
        );
        if index % QUEUES_EVERY == QUEUES_EVERY - 1 {
            assert_eq!(
                app.total_queue_depth().await,
                0,
                "a message was queued by request {index} or one of the {QUEUES_EVERY} before it (ALLOT_SWEEP_SEED={seed})"
            );
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(app.total_queue_depth().await, 0, "no message queued");
    assert_eq!(written(&app).await, before);

    println!("bad-input sweep: {requests} requests in {elapsed:.1?} (seed {seed})");
    println!("  by category: {categories:?}");
    println!("  answers (status code): {codes:?}");
    assert!(
        failures.is_empty(),
        "{} of {requests} broken requests were not answered as promised (first 20):\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The server is still ready after all that.
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), reqwest::StatusCode::OK, "still ready");
    app.shutdown().await;
}
