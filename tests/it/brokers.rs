//! A list of broker addresses (`ALLOT_AMQP_URLS`): the API and the worker use whichever
//! address answers, and move on to the next when theirs dies, with every accepted request
//! decided once. A dead address is a port nobody listens on; an address that dies while in use
//! is the test kit's TCP proxy to the test broker, dropped (its connections drop as they
//! would when a node stops); a node that accepts connections but never answers is a listener
//! that says nothing.

use crate::helpers::{
    DEADLINE, ExtraApi, ExtraWorker, Options, TestApp, accepted_id, sample, spawn_app,
    test_amqp_url, wait_for,
};
use allot_shared::TransactionId;
use allot_shared::brokers::BrokerAddress;
use allot_tests::proxy::Proxy;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// `url` (the test broker's) with its host and port replaced by `address`.
fn url_at(url: &str, address: SocketAddr) -> String {
    let at = broker_address(url).to_string();
    assert!(url.contains(&at), "{url} names its host and port");
    url.replacen(&at, &address.to_string(), 1)
}

/// The test broker's address.
fn broker_address(url: &str) -> SocketAddr {
    let uri: lapin::uri::AMQPUri = url.parse().expect("the test broker's URL");
    format!("{}:{}", uri.authority.host, uri.authority.port)
        .parse()
        .expect("the test broker listens on an IP address")
}

/// A port on which nothing listens (bound, then released).
async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A listener that accepts connections and never says a word (a node that hangs).
async fn silent_listener() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (address, task)
}

/// The sample of `allot_broker_connection` for `connection` on `url`'s address.
fn connection_sample(metrics: &str, connection: &str, url: &str) -> f64 {
    let shown = BrokerAddress::new(url).shown().to_owned();
    sample(
        metrics,
        &format!("allot_broker_connection{{address=\"{shown}\",connection=\"{connection}\"}}"),
    )
}

async fn metrics(app: &TestApp) -> String {
    app.get("/metrics").await.text().await.unwrap()
}

/// Starts an API and a worker with `urls` as their broker list, beside `app`'s own API.
async fn start_on(app: &mut TestApp, urls: &[String]) -> (ExtraApi, ExtraWorker) {
    let mut api_config = app.api_config.clone();
    api_config.common.amqp_urls = urls.to_vec();
    let api = ExtraApi::start(app, &api_config).await;
    let mut worker_config = app.worker_config.clone();
    worker_config.common.amqp_urls = urls.to_vec();
    let worker = ExtraWorker::start(app, &worker_config);
    (api, worker)
}

async fn wait_ready(app: &TestApp, worker: &ExtraWorker) {
    wait_for("the worker to be ready", || async {
        let (status, _) = worker.get(&app.client, "/readyz").await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
}

/// Buys one unit each for `users` through `api`, asserting 202s.
async fn buy_all(
    app: &TestApp,
    api: &ExtraApi,
    product: i64,
    users: std::ops::Range<i64>,
) -> Vec<TransactionId> {
    let mut ids = Vec::new();
    for user in users {
        ids.push(accepted_id(api.add_to_cart(&app.client, user, product).await).await);
    }
    ids
}

/// Every id in `accepted` is decided `succeeded` exactly once, and nothing else is sold.
async fn assert_sold_exactly(app: &TestApp, accepted: &[TransactionId]) {
    for id in accepted {
        assert_eq!(app.wait_final(*id).await["status"], "succeeded");
    }
    let sold: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM transactions WHERE status = 'succeeded'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let sold_set: BTreeSet<uuid::Uuid> = sold.iter().copied().collect();
    assert_eq!(sold.len(), sold_set.len());
    let expected: BTreeSet<uuid::Uuid> = accepted.iter().map(|id| id.0).collect();
    assert_eq!(sold_set, expected, "exactly the accepted requests are sold");
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_list_whose_first_address_is_dead_is_served_by_the_next(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let live = app.api_config.common.amqp_url.clone();
    let dead = url_at(&live, dead_address().await);
    let (api, worker) = start_on(&mut app, &[dead.clone(), live.clone()]).await;
    wait_ready(&app, &worker).await;
    let product = app.create_product("listed", 100).await;

    let accepted = buy_all(&app, &api, product, 1..6).await;
    assert_sold_exactly(&app, &accepted).await;

    let metrics = metrics(&app).await;
    assert_eq!(connection_sample(&metrics, "allot-worker", &live), 1.0);
    assert_eq!(connection_sample(&metrics, "allot-worker", &dead), 0.0);
    assert_eq!(connection_sample(&metrics, "allot-api", &dead), 0.0);
    assert!(
        metrics.contains(&format!(
            "address=\"{}\"",
            BrokerAddress::new(&dead).shown()
        )),
        "every listed address has its series"
    );
    assert!(!metrics.contains("guest:guest"), "no credentials in labels");

    worker.stop().await;
    api.stop().await;
    app.shutdown().await;
}

#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn an_address_that_dies_while_in_use_is_left_for_the_next(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let live = app.api_config.common.amqp_url.clone();
    let relay = Proxy::start(broker_address(&live).to_string())
        .await
        .unwrap();
    let relayed = url_at(&live, relay.addr());
    let (api, worker) = start_on(&mut app, &[relayed.clone(), live.clone()]).await;
    wait_ready(&app, &worker).await;
    let product = app.create_product("failover", 1_000).await;

    // Both use the first address (only they use it: `app`'s own API is on `live`).
    let before = metrics(&app).await;
    assert_eq!(connection_sample(&before, "allot-api", &relayed), 1.0);
    assert_eq!(connection_sample(&before, "allot-worker", &relayed), 1.0);
    let mut accepted = buy_all(&app, &api, product, 1..11).await;
    assert_sold_exactly(&app, &accepted).await;

    // The node of the first address goes away with both connections.
    drop(relay); // every connection it carried drops, and its port is closed
    let mut refused = Vec::new();
    let mut user = 100;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    // Until the API accepts again: 503s meanwhile (nothing else), then on the second address.
    loop {
        user += 1;
        let response = api.add_to_cart(&app.client, user, product).await;
        match response.status() {
            StatusCode::ACCEPTED => {
                accepted.push(accepted_id(response).await);
                break;
            }
            StatusCode::SERVICE_UNAVAILABLE => refused.push(user),
            other => panic!("unexpected {other} during the failover"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API did not accept again within {DEADLINE:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    accepted.extend(buy_all(&app, &api, product, 1_000..1_010).await);
    wait_ready(&app, &worker).await;
    assert_sold_exactly(&app, &accepted).await;
    // Nothing refused during the failover was sold (an unconfirmed publish is withdrawn).
    let sold_refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transactions WHERE status = 'succeeded' AND user_id = ANY($1)",
    )
    .bind(&refused)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(sold_refused, 0);
    assert_eq!(
        app.product_stock(product).await,
        1_000 - accepted.len() as i64
    );

    let after = metrics(&app).await;
    for connection in ["allot-api", "allot-worker"] {
        assert_eq!(
            connection_sample(&after, connection, &relayed),
            0.0,
            "{connection}"
        );
    }
    assert_eq!(connection_sample(&after, "allot-worker", &live), 1.0);
    assert!(
        sample(
            &after,
            "allot_broker_reconnects_total{connection=\"allot-worker\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &after,
            "allot_broker_reconnects_total{connection=\"allot-api\"}"
        ) >= 1.0
    );

    worker.stop().await;
    api.stop().await;
    app.shutdown().await;
}

/// A node that accepts the TCP connection but never answers the AMQP handshake holds a
/// connection attempt for at most the connect timeout (5 s), then the next address serves.
#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn a_node_that_never_answers_is_given_up_for_the_next(pool: sqlx::PgPool) {
    let mut app = spawn_app(pool, Options::without_worker()).await;
    let live = app.api_config.common.amqp_url.clone();
    let (silent, listener) = silent_listener().await;
    let hung = url_at(&live, silent);
    let started = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        start_on(&mut app, &[hung.clone(), live.clone()]),
    )
    .await;
    let (api, worker) = started.expect("starting does not hang on a silent node");
    wait_ready(&app, &worker).await;
    let product = app.create_product("patient", 10).await;
    let accepted = buy_all(&app, &api, product, 1..4).await;
    assert_sold_exactly(&app, &accepted).await;
    let metrics = metrics(&app).await;
    assert_eq!(connection_sample(&metrics, "allot-worker", &hung), 0.0);
    assert_eq!(connection_sample(&metrics, "allot-worker", &live), 1.0);
    listener.abort();
    worker.stop().await;
    api.stop().await;
    app.shutdown().await;
}

/// With no address answering, the API does not start, and says why for each address, without
/// the password; the worker runs, not ready, and becomes ready once an address answers.
#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn with_no_address_answering_the_api_refuses_to_start_and_the_worker_waits(
    pool: sqlx::PgPool,
) {
    let app = spawn_app(pool, Options::without_worker()).await;
    let live = app.api_config.common.amqp_url.clone();
    let upstream = broker_address(&live);
    // Nothing listens on port 1 (privileged, never an ephemeral port).
    let first = url_at(&live, "127.0.0.1:1".parse().unwrap());
    // The second address is a relay that is not listening yet; it starts later, at that port.
    let port = dead_address().await;
    let second = url_at(&live, port);
    let urls = vec![first.clone(), second.clone()];

    let mut api_config = app.api_config.clone();
    api_config.common.amqp_urls = urls.clone();
    let err = match ExtraApi::build(&app, &api_config).await {
        Ok(_) => panic!("the API started without a broker"),
        Err(err) => format!("{err:#}"),
    };
    for url in [&first, &second] {
        let shown = BrokerAddress::new(url).shown().to_owned();
        assert!(err.contains(&shown), "{err} names {shown}");
    }
    assert!(!err.contains("guest:guest"), "{err}");

    let mut worker_config = app.worker_config.clone();
    worker_config.common.amqp_urls = urls;
    let worker = ExtraWorker::start(&app, &worker_config);
    let not_ready = wait_for("the worker's HTTP server", || async {
        let response = app
            .client
            .get(format!("{}/readyz", worker.address))
            .send()
            .await
            .ok()?;
        Some(response.status())
    })
    .await;
    assert_eq!(not_ready, StatusCode::SERVICE_UNAVAILABLE);
    let (_, body) = worker.get(&app.client, "/readyz").await;
    assert_eq!(
        body["checks"],
        json!({"database": "ok", "redis": "ok", "broker": "unavailable"})
    );

    // The second node comes up: the worker finds it (its backoff is capped at 2 s a round).
    let listener = TcpListener::bind(port)
        .await
        .expect("the port is free again");
    let relay = Proxy::on(listener, upstream.to_string()).unwrap();
    wait_ready(&app, &worker).await;
    let metrics = metrics(&app).await;
    assert_eq!(connection_sample(&metrics, "allot-worker", &second), 1.0);
    assert_eq!(connection_sample(&metrics, "allot-worker", &first), 0.0);
    worker.stop().await;
    drop(relay);
    app.shutdown().await;
}

/// lapin threads of this process (nextest runs each test in a process of its own).
fn lapin_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "lapin-io-loop")
        .count()
}

/// An address that once hung is probed (a bare TCP connection and the AMQP header) before
/// lapin connects to it again: a node still hung costs no connection thread, and one that
/// answers again is used.
#[tokio::test]
async fn a_hung_address_is_probed_before_it_is_connected_again() {
    let live = test_amqp_url();
    let upstream = broker_address(&live);
    // Silent until told to relay.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let relaying = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = relaying.clone();
    let node = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut connections = JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !switch.load(std::sync::atomic::Ordering::SeqCst) {
                held.push(inbound);
                continue;
            }
            connections.spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let url = url_at(&live, at);
    let brokers = allot_shared::brokers::Brokers::new([url.as_str()]).unwrap();
    let mut failover = allot_shared::brokers::Failover::new(brokers, "allot-tests");

    let before = lapin_threads();
    let first = failover.connect().await.unwrap_err();
    assert!(
        format!("{first:#}").contains("no answer within"),
        "{first:#}"
    );
    let abandoned = lapin_threads();
    assert!(
        abandoned > before,
        "lapin's thread of the abandoned handshake"
    );
    let second = failover.connect().await.unwrap_err();
    assert!(
        format!("{second:#}").contains("no answer within"),
        "{second:#}"
    );
    assert_eq!(
        lapin_threads(),
        abandoned,
        "the probe costs no lapin thread"
    );

    relaying.store(true, std::sync::atomic::Ordering::SeqCst);
    let (connection, address) = failover.connect().await.expect("the node answers again");
    assert_eq!(address.url(), url);
    connection.close(200, "done".into()).await.unwrap();
    node.abort();
}
