//! Buyer accounts: `POST /api/v1/users`, `POST /api/v1/auth/login`, `POST /api/v1/auth/logout`,
//! every status and body, the login rate limit, and tokens refused once logged out, expired,
//! forged or altered.

use crate::helpers::{ADMIN_TOKEN, Options, TestApp, assert_error, spawn_app, wait_for};
use allot_api::buyers::tokens::{Claims, TokenKey};
use allot_shared::UserId;
use chrono::SubsecRound;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SIGN_UP: &str = "/api/v1/users";
const LOGIN: &str = "/api/v1/auth/login";
const LOGOUT: &str = "/api/v1/auth/logout";
const HISTORY: &str = "/api/v1/orders/history";

async fn accounts_and_sessions(app: &TestApp) -> (i64, i64) {
    (
        app.count("SELECT count(*) FROM users").await,
        app.count("SELECT count(*) FROM sessions").await,
    )
}

/// `GET /api/v1/orders/history` with `token`: what a token is good for, cheaply.
async fn history_with(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .get(app.url(HISTORY))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn logout(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .post(app.url(LOGOUT))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn sign_up_creates_an_account_with_its_password_hashed_and_never_returned(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let response = app
        .post_json(
            SIGN_UP,
            &json!({"username": "Alice.B-2_", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    let id = body["user_id"].as_i64().expect("a user id");
    assert!(
        id >= 1_000_000_000_000_000,
        "account ids start at 10^15: {id}"
    );
    let created_at = body["created_at"].as_str().expect("created_at").to_owned();
    assert_eq!(
        body,
        json!({"user_id": id, "username": "alice.b-2_", "created_at": created_at}),
        "no password in the answer"
    );

    let (username, hash): (String, String) =
        sqlx::query_as("SELECT username, password_hash FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(username, "alice.b-2_");
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "an Argon2id PHC string: {hash}"
    );
    assert!(!hash.contains("correct horse"));

    // Usernames are case-insensitive: taken in any case.
    let response = app
        .post_json(
            SIGN_UP,
            &json!({"username": "ALICE.b-2_", "password": "another password"}),
        )
        .await;
    assert_error(response, StatusCode::CONFLICT, "username_taken").await;
    assert_eq!(accounts_and_sessions(&app).await, (1, 0));

    // A second account gets another id; and logs in with its username in any case.
    let bob = app.sign_up("bob", "bob's password").await;
    assert!(bob > id, "{bob} after {id}");
    let response = app
        .post_json(
            LOGIN,
            &json!({"username": "BOB", "password": "bob's password"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn bad_credentials_are_422_in_the_error_shape_and_create_nothing(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let too_long = "é".repeat(129);
    let bad_bodies: Vec<Value> = vec![
        json!({"username": "ab", "password": "long enough"}),
        json!({"username": "a".repeat(33), "password": "long enough"}),
        json!({"username": "_alice", "password": "long enough"}),
        json!({"username": "al ice", "password": "long enough"}),
        json!({"username": "alïce", "password": "long enough"}),
        json!({"username": "", "password": "long enough"}),
        json!({"username": "alice", "password": "short"}),
        json!({"username": "alice", "password": too_long}),
        json!({"username": "alice", "password": "pass\u{0}word1"}),
        json!({"username": "alice", "password": "tab\tin password"}),
        json!({"username": "alicealice", "password": "AliceAlice"}),
        json!({"username": "alice"}),
        json!({"password": "long enough"}),
        json!({"username": "alice", "password": "long enough", "email": "a@b.c"}),
        json!({"username": 7, "password": "long enough"}),
        json!({"username": "alice", "password": 12345678}),
        json!({"username": null, "password": "long enough"}),
        json!({"username": ["alice"], "password": "long enough"}),
    ];
    for path in [SIGN_UP, LOGIN] {
        for body in &bad_bodies {
            // The password rule of a sign-up does not apply to a login (it was checked when
            // the account was made); those two are simply wrong credentials there.
            if path == LOGIN && body["password"] == "AliceAlice" {
                continue;
            }
            let response = app.post_json(path, body).await;
            assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
        }
        let response = app
            .send(
                Method::POST,
                path,
                &[("content-type", "application/json")],
                r#"{"username": "alice", "#,
            )
            .await;
        assert_error(response, StatusCode::BAD_REQUEST, "malformed_json").await;
        let response = app
            .send(
                Method::POST,
                path,
                &[("content-type", "text/plain")],
                r#"{"username": "alice", "password": "long enough"}"#,
            )
            .await;
        assert_error(
            response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        let response = app
            .post_json(
                path,
                &json!({"username": "alice", "password": "x".repeat(20 * 1024)}),
            )
            .await;
        assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    }
    assert_eq!(accounts_and_sessions(&app).await, (0, 0), "nothing written");
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn login_gives_a_signed_token_and_a_wrong_username_or_password_the_same_401(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let id = app.sign_up("carol", "carol's password").await;
    let before = chrono::Utc::now();
    let response = app
        .post_json(
            LOGIN,
            &json!({"username": "carol", "password": "carol's password"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    let token = body["token"].as_str().expect("a token").to_owned();
    let expires_at = body["expires_at"].as_str().expect("expires_at").to_owned();
    assert_eq!(
        body,
        json!({"token": token, "token_type": "Bearer", "expires_at": expires_at,
               "user_id": id, "username": "carol"})
    );
    assert!(
        token.starts_with("allotb1_") && token.len() == 94,
        "{token}"
    );
    // Valid for ALLOT_TOKEN_TTL_SECS (24 h by default), to the second: the expiry is the issue
    // time (at or after `before`, perhaps in a later second) plus 24 h, in whole seconds.
    let expires: chrono::DateTime<chrono::Utc> = expires_at.parse().unwrap();
    let ttl = expires - before.trunc_subsecs(0);
    assert!(
        ttl >= chrono::Duration::hours(24)
            && ttl < chrono::Duration::hours(24) + chrono::Duration::seconds(30),
        "{ttl}"
    );
    // One session, and the token itself is stored nowhere.
    let (session_user, stored_expiry): (i64, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT user_id, expires_at FROM sessions")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((session_user, stored_expiry), (id, expires));
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(s::text, ' ') FROM (SELECT * FROM sessions) s")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(!dump.contains(&token[8..40]), "the token is not stored");
    assert_eq!(history_with(&app, &token).await.status(), StatusCode::OK);

    let wrong_password = app
        .post_json(
            LOGIN,
            &json!({"username": "carol", "password": "not her password"}),
        )
        .await;
    let unknown_user = app
        .post_json(
            LOGIN,
            &json!({"username": "nobody", "password": "carol's password"}),
        )
        .await;
    for response in [wrong_password, unknown_user] {
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let message = assert_error(response, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        assert_eq!(message, "the username or the password is wrong");
    }
    assert_eq!(
        accounts_and_sessions(&app).await,
        (1, 1),
        "no session for a refused login"
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn logout_revokes_the_token_at_once_and_other_tokens_keep_working(pool: sqlx::PgPool) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let (_, first) = app.buyer("dave").await;
    let second = app.log_in("dave", "password-of-dave").await;
    assert_ne!(first, second, "each login is its own session");

    let response = logout(&app, &first).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.bytes().await.unwrap().is_empty());
    let revoked = app
        .count("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL")
        .await;
    assert_eq!(revoked, 1);

    // Refused at once, everywhere a token is taken; logging out again is refused too.
    let message = assert_error(
        history_with(&app, &first).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert!(message.contains("revoked"), "{message}");
    let response = app
        .client
        .post(app.url("/api/v1/order/addToCart"))
        .bearer_auth(&first)
        .json(&json!({"product_id": 1, "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_error(
        logout(&app, &first).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(app.total_queue_depth().await, 0, "nothing bought with it");

    // The other session is untouched.
    assert_eq!(history_with(&app, &second).await.status(), StatusCode::OK);

    // Logout needs a buyer's token: none, the staff's, or garbage is 401.
    let response = app.client.post(app.url(LOGOUT)).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_error(
        logout(&app, ADMIN_TOKEN).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_error(
        logout(&app, "allotb1_nonsense").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL")
            .await,
        1
    );
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_token_revoked_on_one_instance_is_refused_by_another_within_its_refresh(
    pool: sqlx::PgPool,
) {
    let options = || Options {
        tweak_api: |config| config.revocation_refresh_ms = 200,
        ..Options::without_worker()
    };
    let one = spawn_app(pool.clone(), options()).await;
    let other = spawn_app(pool, options()).await;
    let (_, token) = one.buyer("erin").await;
    // Signed, not stored: the other instance takes it as it is.
    assert_eq!(history_with(&other, &token).await.status(), StatusCode::OK);

    assert_eq!(logout(&one, &token).await.status(), StatusCode::NO_CONTENT);
    assert_error(
        history_with(&one, &token).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    wait_for("the other instance to refuse the revoked token", || async {
        (history_with(&other, &token).await.status() == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    one.shutdown().await;
    other.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn expired_forged_and_altered_tokens_are_refused_with_401(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            tweak_api: |config| config.token_ttl_secs = 1,
            ..Options::without_worker()
        },
    )
    .await;
    let (id, token) = app.buyer("frank").await;
    let user = UserId::try_from(id).unwrap();
    // Live: a token of one second is refused once it expired.
    let message = wait_for("the one-second token to expire", || async {
        let response = history_with(&app, &token).await;
        if response.status() == StatusCode::UNAUTHORIZED {
            Some(assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await)
        } else {
            None
        }
    })
    .await;
    assert!(message.contains("expired"), "{message}");

    // Made with the deployment's key (derived from the admin token), but expired.
    let key = TokenKey::derive(ADMIN_TOKEN.as_bytes());
    let claims = |expires_at: chrono::DateTime<chrono::Utc>| Claims {
        session: uuid::Uuid::new_v4(),
        user,
        expires_at: chrono::DateTime::from_timestamp(expires_at.timestamp(), 0).unwrap(),
    };
    let expired = key.issue(&claims(chrono::Utc::now() - chrono::Duration::seconds(5)));
    let message = assert_error(
        history_with(&app, &expired).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert!(message.contains("expired"), "{message}");

    // Signed with another key (another deployment, or a forger's), valid otherwise.
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let foreign = TokenKey::derive(b"some other deployment's secret").issue(&claims(future));
    // One character of a genuine token changed.
    let genuine = key.issue(&claims(future));
    assert_eq!(
        history_with(&app, &genuine).await.status(),
        StatusCode::OK,
        "the genuine one works"
    );
    let mut altered = genuine.clone().into_bytes();
    altered[40] = if altered[40] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    for (what, token) in [
        ("foreign", foreign.as_str()),
        ("altered", altered.as_str()),
        ("truncated", &genuine[..genuine.len() - 1]),
        ("garbage", "allotb1_not-a-token"),
        ("staff-like", "test-admin-tokenx"),
    ] {
        let response = history_with(&app, token).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        let message = assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert!(
            message.contains("not a valid buyer token"),
            "{what}: {message}"
        );
    }
    // Not a bearer token at all.
    for authorization in [
        "Basic YWxpY2U6cGFzc3dvcmQ=",
        "Bearer",
        "Bearer ",
        "bearer x",
    ] {
        let response = app
            .client
            .get(app.url(HISTORY))
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn logins_of_one_username_are_rate_limited_with_retry_after(pool: sqlx::PgPool) {
    let app = spawn_app(
        pool,
        Options {
            tweak_api: |config| {
                config.login_per_username_per_minute = 3;
                config.login_per_address_per_minute = 1000;
            },
            ..Options::without_worker()
        },
    )
    .await;
    app.sign_up("grace", "grace's password").await;
    // Three attempts, right or wrong, use the budget up.
    for password in ["wrong password", "grace's password", "wrong again!"] {
        let response = app
            .post_json(LOGIN, &json!({"username": "grace", "password": password}))
            .await;
        assert_ne!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let sessions = app.count("SELECT count(*) FROM sessions").await;
    // The fourth is refused before the password is even checked, the right one included, in
    // any case of the username.
    for username in ["grace", "GRACE"] {
        let response = app
            .post_json(
                LOGIN,
                &json!({"username": username, "password": "grace's password"}),
            )
            .await;
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1..=20).contains(&retry_after),
            "one attempt every 20 s: {retry_after}"
        );
        assert_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    }
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, sessions);
    // Another username from the same address is not limited.
    app.sign_up("heidi", "heidi's password").await;
    app.log_in("heidi", "heidi's password").await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn logins_and_sign_ups_from_one_address_are_rate_limited_with_retry_after(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(
        pool,
        Options {
            tweak_api: |config| {
                config.login_per_username_per_minute = 1000;
                config.login_per_address_per_minute = 4;
            },
            ..Options::without_worker()
        },
    )
    .await;
    app.sign_up("ivan", "ivan's password").await;
    // Different usernames, known or not: all from 127.0.0.1.
    for username in ["ivan", "judy", "mallory"] {
        let response = app
            .post_json(
                LOGIN,
                &json!({"username": username, "password": "a guess at it"}),
            )
            .await;
        assert_error(response, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    let response = app
        .post_json(
            LOGIN,
            &json!({"username": "ivan", "password": "ivan's password"}),
        )
        .await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=15).contains(&retry_after),
        "one attempt every 15 s: {retry_after}"
    );
    assert_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let response = app
        .post_json(
            SIGN_UP,
            &json!({"username": "oscar", "password": "oscar's password"}),
        )
        .await;
    assert_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(accounts_and_sessions(&app).await, (1, 0), "nothing written");
    // A malformed attempt guesses nothing and is answered for what it is.
    let response = app.post_json(LOGIN, &json!({"username": "ivan"})).await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    app.shutdown().await;
}
