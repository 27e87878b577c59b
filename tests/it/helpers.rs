//! The test harness: [`spawn_app`] starts an API server (and, unless told otherwise, a worker)
//! against the test's own database, queues and Redis keys, and [`TestApp`] offers typed helpers
//! to drive it and inspect the services behind it. They are built on the test kit
//! (`allot_tests`): its client judges the answers, its broker publishes and counts, its
//! invariants check the promises.

use allot_api::{ApiConfig, AppState};
use allot_shared::partition::partition_for;
use allot_shared::{
    Clock, Line, Lines, ManualClock, Order, PartitionId, ProductId, PurchaseRequest, Quantity,
    SystemClock, TransactionId, UserId, status_store,
};
use allot_tests::broker::Broker;
use allot_tests::client::{self as kit, Answer, Api};
use allot_tests::invariants::{self, Statuses};
use allot_tests::ports::{PortMap, TEST_REDIS_DB, TEST_VHOST};
use allot_worker::WorkerConfig;
use allot_worker::decider::Decider;
use allot_worker::decider::Item;
use chrono::Utc;
use clap::Parser;
use redis::aio::ConnectionManager;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::future::Future;
use std::sync::{Arc, Once};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for something that should happen within milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(30);
pub const ADMIN_TOKEN: &str = "test-admin-token";

fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter("info,allot_worker=debug")
                .with_test_writer()
                .init();
        }
    });
}

/// What to start besides the API.
pub struct Options {
    /// Start a worker (`false` leaves requests in their queues).
    pub worker: bool,
    /// The worker's clock (the system clock if `None`).
    pub clock: Option<ManualClock>,
    /// Partition queue length limit.
    pub queue_max_length: i64,
    /// How long the API waits for a publish confirm (milliseconds).
    pub confirm_timeout_ms: u64,
    /// The API's sold-out refresh period (milliseconds). 0 (off) unless a test is about the
    /// short-circuit: the other tests check what the worker decides for every request, even
    /// for a product already sold out.
    pub sold_out_refresh_ms: u64,
    /// The API's `ALLOT_MAX_QUANTITY`.
    pub max_quantity: i64,
    /// Any other change to the API's configuration (login limits, token lifetime, ...).
    pub tweak_api: fn(&mut ApiConfig),
    /// The API's clock: the time requests are accepted at (the system clock if `None`).
    pub api_clock: Option<ManualClock>,
    /// Partitions of the deployment ([`PARTITIONS`] unless a test is about their spread).
    pub partitions: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker: true,
            clock: None,
            queue_max_length: 100_000,
            confirm_timeout_ms: 3000,
            sold_out_refresh_ms: 0,
            max_quantity: 10,
            tweak_api: |_| {},
            api_clock: None,
            partitions: PARTITIONS,
        }
    }
}

impl Options {
    /// The API alone: accepted requests stay in their queues, countable.
    pub fn without_worker() -> Self {
        Self {
            worker: false,
            ..Self::default()
        }
    }
}

/// A running task and the sender that stops it.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(DEADLINE, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => panic!("task failed: {err:?}"),
            Ok(Err(join)) => panic!("task panicked: {join}"),
            Err(_) => panic!("task did not stop within {DEADLINE:?}"),
        }
    }
}

pub struct TestApp {
    /// `http://127.0.0.1:<port>`
    pub address: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub api_config: ApiConfig,
    pub worker_config: WorkerConfig,
    /// `http://127.0.0.1:<port>` of the running worker's HTTP server (`/metrics`, `/readyz`).
    pub worker_address: Option<String>,
    api: Option<Running>,
    worker: Option<Running>,
    /// The test's broker, directly (never through a proxy of the API's, nor what a test set
    /// the worker's configuration to).
    amqp_url: String,
}

/// The tests' broker: `ALLOT_TEST_AMQP_URL`, else the port map's copy at offset 0
/// (`deploy/local.sh env` prints it for any copy).
pub fn test_amqp_url() -> String {
    std::env::var("ALLOT_TEST_AMQP_URL").unwrap_or_else(|_| PortMap::default().amqp_url(TEST_VHOST))
}

/// The tests' Redis: `ALLOT_TEST_REDIS_URL`, else the port map's copy at offset 0.
pub fn test_redis_url() -> String {
    std::env::var("ALLOT_TEST_REDIS_URL")
        .unwrap_or_else(|_| PortMap::default().redis_url(TEST_REDIS_DB))
}

/// Starts the API (and a worker, see [`Options`]) on the test's fresh database.
pub async fn spawn_app(pool: PgPool, options: Options) -> TestApp {
    spawn_app_through(pool, options, Through::default()).await
}

/// How the API reaches its services, when not directly: URLs of proxies in front of them
/// (`allot_tests::proxy`), so that a test can take a service away from this API alone. The
/// test's own connections (and the worker's Redis) stay direct.
#[derive(Debug, Default)]
pub struct Through {
    pub redis_url: Option<String>,
    pub amqp_url: Option<String>,
}

/// [`spawn_app`], with the API reaching Redis or RabbitMQ through [`Through`]'s proxies.
pub async fn spawn_app_through(pool: PgPool, options: Options, through: Through) -> TestApp {
    init_logging();
    let unique = format!("it-{}", uuid::Uuid::new_v4().simple());
    let amqp_url = test_amqp_url();
    let redis_url = test_redis_url();

    let mut api_config = ApiConfig::parse_from(["allot-api"]);
    api_config.common.amqp_url = through.amqp_url.unwrap_or_else(|| amqp_url.clone());
    api_config.common.amqp_urls = Vec::new(); // whatever the environment says
    api_config.common.redis_url = through.redis_url.clone().unwrap_or(redis_url.clone());
    api_config.common.partitions = options.partitions;
    api_config.common.queue_prefix = unique.clone();
    api_config.common.redis_prefix = unique;
    api_config.common.queue_max_length = options.queue_max_length;
    api_config.admin_token = ADMIN_TOKEN.into();
    api_config.confirm_timeout_ms = options.confirm_timeout_ms;
    api_config.sold_out_refresh_ms = options.sold_out_refresh_ms;
    api_config.max_quantity = options.max_quantity;
    (options.tweak_api)(&mut api_config);
    let mut worker_config = WorkerConfig::parse_from(["allot-worker"]);
    worker_config.common = api_config.common.clone();
    worker_config.common.redis_url = redis_url.clone();
    worker_config.common.amqp_url = amqp_url.clone();

    let redis = status_store::connect(&redis_url, api_config.common.redis_timeout())
        .await
        .expect("Redis is reachable");
    let api_redis = match &through.redis_url {
        Some(url) => status_store::connect(url, api_config.common.redis_timeout())
            .await
            .expect("Redis is reachable through its proxy"),
        None => redis.clone(),
    };
    let api_clock: Arc<dyn Clock> = match options.api_clock {
        Some(clock) => Arc::new(clock),
        None => Arc::new(SystemClock),
    };
    let state = AppState::build_with_clock(&api_config, pool.clone(), api_redis, api_clock)
        .await
        .expect("API state builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(allot_api::run(listener, state, async move {
        let _ = stopped.await;
    }));

    let mut app = TestApp {
        address,
        client: reqwest::Client::new(),
        pool,
        redis,
        api_config,
        worker_config,
        api: Some(Running { stop, task }),
        worker_address: None,
        worker: None,
        amqp_url,
    };
    if options.worker {
        let clock: Arc<dyn Clock> = match options.clock {
            Some(clock) => Arc::new(clock),
            None => Arc::new(SystemClock),
        };
        app.start_worker(clock);
    }
    app
}

impl TestApp {
    /// Starts a worker (another replica if one runs already).
    pub fn start_worker(&mut self, clock: Arc<dyn Clock>) {
        assert!(
            self.worker.is_none(),
            "this harness runs one worker at a time"
        );
        // Port 0: tests run in parallel, each worker on a free port of its own.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.set_nonblocking(true).unwrap();
        self.worker_address = Some(format!("http://{}", listener.local_addr().unwrap()));
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(allot_worker::serve(
            listener,
            self.worker_config.clone(),
            self.pool.clone(),
            self.redis.clone(),
            clock,
            async move {
                let _ = stopped.await;
            },
        ));
        self.worker = Some(Running { stop, task });
    }

    /// Stops the worker gracefully.
    pub async fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        self.worker_address = None;
    }

    /// Stops everything, asserting each part shut down cleanly, then deletes the test's queues
    /// and Redis keys (each quorum queue holds broker resources; a long test session would
    /// otherwise pile up hundreds).
    pub async fn shutdown(mut self) {
        self.stop_worker().await;
        if let Some(api) = self.api.take() {
            api.stop().await;
        }
        let broker = self.broker().await;
        broker.delete_queues().await.unwrap();
        broker.close().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.api_config.common.redis_prefix))
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut self.redis.clone())
                .await
                .unwrap();
        }
    }

    /// A decider on this test's database and Redis keys, to drive batches directly.
    pub fn decider(&self, clock: Arc<dyn Clock>, timezone: chrono_tz::Tz) -> Decider {
        Decider::new(
            self.pool.clone(),
            self.redis.clone(),
            self.api_config.common.redis_prefix.clone(),
            clock,
            timezone,
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// The kit's typed client of this API, with the admin token.
    pub fn api(&self) -> Api {
        Api::with_client(self.client.clone(), &self.address, Some(ADMIN_TOKEN.into()))
            .expect("the test server's address is a plain http URL")
    }

    /// The test's broker and partition queues (directly, not through a proxy of the API's).
    pub async fn broker(&self) -> Broker {
        Broker::connect(&self.amqp_url, self.api_config.common.topology())
            .await
            .expect("RabbitMQ is reachable")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("GET is answered")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST is answered")
    }

    pub async fn post_admin(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .expect("POST is answered")
    }

    /// Sends `body` as is, with exactly the given headers (reqwest adds none but `host`,
    /// `accept` and `content-length`).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Response {
        let mut request = self.client.request(method, self.url(path)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("the request is answered")
    }

    pub async fn add_to_cart(&self, user_id: i64, product_id: i64, quantity: i64) -> Response {
        self.post_json(
            "/api/v1/order/addToCart",
            &json!({"user_id": user_id, "product_id": product_id, "quantity": quantity}),
        )
        .await
    }

    /// Places an order and asserts the exact 202 answer (the kit's judgment: exactly
    /// `{"transaction_id", "status": "pending"}` and its `Location`); returns the transaction id.
    pub async fn buy(&self, user_id: i64, product_id: i64, quantity: i64) -> TransactionId {
        let order = kit::Order {
            user_id,
            product_id,
            quantity,
        };
        match self.api().add_to_cart(order).await {
            Answer::Accepted(id) => TransactionId(id),
            other => panic!("{order:?} was answered {}, not 202", other.describe()),
        }
    }

    /// Posts an order of `items` (product, quantity) for `user_id` to `POST /api/v1/orders`.
    pub async fn place_order(&self, user_id: i64, items: &[(i64, i64)]) -> Response {
        let items: Vec<Value> = items
            .iter()
            .map(|&(product_id, quantity)| json!({"product_id": product_id, "quantity": quantity}))
            .collect();
        self.post_json(
            "/api/v1/orders",
            &json!({"user_id": user_id, "items": items}),
        )
        .await
    }

    /// Places an order and asserts the exact 202 answer; returns the transaction id.
    pub async fn order(&self, user_id: i64, items: &[(i64, i64)]) -> TransactionId {
        accepted_id(self.place_order(user_id, items).await).await
    }

    /// `PATCH /api/v1/products/{id}` with the admin token.
    pub async fn patch_product(&self, product_id: i64, body: &Value) -> Response {
        self.client
            .patch(self.url(&format!("/api/v1/products/{product_id}")))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .expect("PATCH is answered")
    }

    /// Signs `username` up (asserting 201) and returns the account's id.
    pub async fn sign_up(&self, username: &str, password: &str) -> i64 {
        let response = self
            .post_json(
                "/api/v1/users",
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "sign-up of {username}"
        );
        let body: Value = response.json().await.unwrap();
        body["user_id"].as_i64().expect("a user id")
    }

    /// Logs `username` in (asserting 200) and returns the token.
    pub async fn log_in(&self, username: &str, password: &str) -> String {
        let response = self
            .post_json(
                "/api/v1/auth/login",
                &json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "login of {username}");
        let body: Value = response.json().await.unwrap();
        body["token"].as_str().expect("a token").to_owned()
    }

    /// A new account (`username`, password `password-of-<username>`) and its token.
    pub async fn buyer(&self, username: &str) -> (i64, String) {
        let password = format!("password-of-{username}");
        let id = self.sign_up(username, &password).await;
        (id, self.log_in(username, &password).await)
    }

    /// Creates a product (asserting exactly `201` with it) and returns its id.
    pub async fn create_product(&self, name: &str, stock: i64) -> i64 {
        let product = self.api().create_product(name, stock).await;
        product.unwrap_or_else(|err| panic!("{err:#}")).id
    }

    pub async fn product_stock(&self, product_id: i64) -> i64 {
        let product = self.api().product(product_id).await;
        product.unwrap_or_else(|err| panic!("{err:#}")).stock
    }

    /// Creates a slot of `capacity` places (with any other fields of `extra`) and returns its
    /// id.
    pub async fn create_slot(&self, name: &str, capacity: i64, extra: Value) -> i64 {
        let mut body = json!({"name": name, "capacity": capacity});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let response = self.post_admin("/api/v1/slots", &body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "create slot {body}");
        let body: Value = response.json().await.unwrap();
        body["id"].as_i64().expect("a slot id")
    }

    /// `GET /api/v1/slots/{id}` (asserting 200).
    pub async fn slot(&self, slot_id: i64) -> Value {
        let response = self.get(&format!("/api/v1/slots/{slot_id}")).await;
        assert_eq!(response.status(), StatusCode::OK, "GET slot {slot_id}");
        response.json().await.unwrap()
    }

    /// Asks to hold `quantity` of `product_id` for `hold_seconds`, asserting the 202; returns
    /// the transaction id.
    pub async fn hold(
        &self,
        user_id: i64,
        product_id: i64,
        quantity: i64,
        hold_seconds: i64,
    ) -> TransactionId {
        accepted_id(
            self.post_json(
                "/api/v1/order/addToCart",
                &json!({"user_id": user_id, "product_id": product_id, "quantity": quantity,
                        "hold_seconds": hold_seconds}),
            )
            .await,
        )
        .await
    }

    /// `POST /api/v1/transaction/{id}/<action>` (`checkout` or `cancel`), with `token` if
    /// given.
    pub async fn settle(&self, id: TransactionId, action: &str, token: Option<&str>) -> Response {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/transaction/{id}/{action}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the command is answered")
    }

    /// Stops the API gracefully (its queues and keys stay, unlike [`TestApp::shutdown`]).
    pub async fn stop_api(&mut self) {
        if let Some(api) = self.api.take() {
            api.stop().await;
        }
    }

    /// The transaction as `GET /api/v1/transaction/{id}` shows it (asserting 200).
    pub async fn transaction(&self, id: TransactionId) -> Value {
        let response = self.get(&format!("/api/v1/transaction/{id}")).await;
        assert_eq!(response.status(), StatusCode::OK, "GET transaction {id}");
        response.json().await.unwrap()
    }

    /// Polls a transaction until it is final.
    pub async fn wait_final(&self, id: TransactionId) -> Value {
        wait_for(&format!("transaction {id} to be decided"), || async {
            let view = self.transaction(id).await;
            (view["status"] != "pending").then_some(view)
        })
        .await
    }

    /// Polls a transaction, read with `token` (a buyer's, or the staff's), until it is final.
    pub async fn wait_final_as(&self, id: TransactionId, token: &str) -> Value {
        wait_for(&format!("transaction {id} to be decided"), || async {
            let response = self
                .client
                .get(self.url(&format!("/api/v1/transaction/{id}")))
                .bearer_auth(token)
                .send()
                .await
                .expect("GET is answered");
            assert_eq!(response.status(), StatusCode::OK, "GET transaction {id}");
            let view: Value = response.json().await.unwrap();
            (view["status"] != "pending").then_some(view)
        })
        .await
    }

    /// Publishes `requests` in one batch envelope, as the API does, under `message_id`.
    pub async fn publish_envelope(
        &self,
        partition: PartitionId,
        requests: &[&[u8]],
        message_id: &str,
    ) {
        let broker = self.broker().await;
        (broker
            .publish_envelope(partition, requests, message_id)
            .await)
            .expect("the broker took the message");
        broker.close().await;
    }

    /// Publishes a raw message to a partition queue, persistent and confirmed, as a
    /// misbehaving (or retrying) publisher would.
    pub async fn publish_raw(&self, partition: PartitionId, body: &[u8], message_id: Option<&str>) {
        let broker = self.broker().await;
        (broker.publish(partition, body, message_id).await).expect("the broker took the message");
        broker.close().await;
    }

    /// Messages waiting in a partition queue (not counting unacked ones).
    pub async fn queue_depth(&self, partition: PartitionId) -> u32 {
        let broker = self.broker().await;
        let depth = broker.depth(partition).await.unwrap();
        broker.close().await;
        depth
    }

    /// Messages waiting in all partition queues.
    pub async fn total_queue_depth(&self) -> u32 {
        let broker = self.broker().await;
        let total = broker.total_depth().await.unwrap();
        broker.close().await;
        total
    }

    /// How many Redis keys this test's prefix has.
    pub async fn redis_key_count(&self) -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.api_config.common.redis_prefix))
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        keys.len()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// Another API instance beside a [`TestApp`]'s, on the same database and Redis, with a
/// configuration of its own (the same one for a second replica, or another broker list).
pub struct ExtraApi {
    /// `http://127.0.0.1:<port>`
    pub address: String,
    running: Running,
}

impl ExtraApi {
    /// Builds and starts it; panics if it cannot start (see [`ExtraApi::build`]).
    pub async fn start(app: &TestApp, config: &ApiConfig) -> ExtraApi {
        Self::build(app, config).await.expect("the API starts")
    }

    /// Builds and starts it, or the error that kept it from starting.
    pub async fn build(app: &TestApp, config: &ApiConfig) -> anyhow::Result<ExtraApi> {
        let state = AppState::build(config, app.pool.clone(), app.redis.clone()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(allot_api::run(listener, state, async move {
            let _ = stopped.await;
        }));
        Ok(ExtraApi {
            address,
            running: Running { stop, task },
        })
    }

    pub async fn add_to_cart(
        &self,
        client: &reqwest::Client,
        user_id: i64,
        product_id: i64,
    ) -> Response {
        client
            .post(format!("{}/api/v1/order/addToCart", self.address))
            .json(&json!({"user_id": user_id, "product_id": product_id, "quantity": 1}))
            .send()
            .await
            .expect("POST is answered")
    }

    /// Stops it gracefully, asserting a clean exit.
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// A worker instance beside a [`TestApp`]'s (which runs one at most), with a configuration of
/// its own.
pub struct ExtraWorker {
    /// `http://127.0.0.1:<port>` of its HTTP server (`/readyz`, `/partitions`, `/metrics`).
    pub address: String,
    running: Running,
}

impl ExtraWorker {
    pub fn start(app: &TestApp, config: &WorkerConfig) -> ExtraWorker {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.set_nonblocking(true).unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(allot_worker::serve(
            listener,
            config.clone(),
            app.pool.clone(),
            app.redis.clone(),
            Arc::new(SystemClock),
            async move {
                let _ = stopped.await;
            },
        ));
        ExtraWorker {
            address,
            running: Running { stop, task },
        }
    }

    /// `GET <path>` on its HTTP server, as JSON, with its status.
    pub async fn get(&self, client: &reqwest::Client, path: &str) -> (StatusCode, Value) {
        let response = client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("the worker answers");
        let status = response.status();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// Stops it gracefully (SIGTERM), asserting a clean exit.
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// Asserts the exact 202 answer to a request to buy (the kit's judgment, as for `addToCart`:
/// exactly `{"transaction_id", "status": "pending"}` and its `Location`); returns its
/// transaction id.
pub async fn accepted_id(response: Response) -> TransactionId {
    let header = |name: &str| {
        (response.headers().get(name))
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    let (location, retry_after) = (header("location"), header("retry-after"));
    let status = response.status();
    let body = response.text().await.expect("the answer is read");
    match Answer::judge_accepted(status, location.as_deref(), retry_after.as_deref(), &body) {
        Answer::Accepted(id) => TransactionId(id),
        other => panic!("answered {}, not 202", other.describe()),
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    (allot_tests::wait::until(what, DEADLINE, check).await).unwrap_or_else(|err| panic!("{err}"))
}

/// The value of one sample in a Prometheus text rendering (`name{labels}` exactly as rendered,
/// labels in alphabetical order), or 0 if the sample is not there yet.
pub use allot_tests::metrics::sample;

/// Asserts the promises the whole test database must keep, with the kit's invariants: every
/// day's order numbers exactly 1..N and the day's counter N, only successes numbered, no stock
/// below zero, every decided status in Redis equal to PostgreSQL's.
pub async fn assert_promises_hold(app: &TestApp) {
    let mut redis = app.redis.clone();
    let statuses = Statuses {
        redis: &mut redis,
        prefix: &app.api_config.common.redis_prefix,
    };
    let checked = invariants::whole_database(&app.pool, Some(statuses))
        .await
        .expect("the database and Redis can be read");
    assert!(
        checked.violations.is_empty(),
        "broken promises: {:#?}",
        checked.violations
    );
}

/// Asserts an error response: exact status, JSON content type, and exactly
/// `{"error": {"code": <code>, "message": <non-empty>}}`. Returns the message.
pub async fn assert_error(response: Response, status: StatusCode, code: &str) -> String {
    assert_eq!(
        response.status(),
        status,
        "status of an error that should be {code}"
    );
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let body: Value = response.json().await.expect("an error body is JSON");
    let message = body["error"]["message"]
        .as_str()
        .expect("error.message is a string")
        .to_owned();
    assert!(!message.is_empty());
    assert_eq!(
        body,
        json!({"error": {"code": code, "message": message}}),
        "error body shape"
    );
    message
}

/// A manual clock at the given UTC time (`2026-11-22T23:59:59Z` style).
pub fn clock_at(rfc3339: &str) -> ManualClock {
    ManualClock::new(rfc3339.parse().expect("an RFC 3339 time"))
}

// --- Requests and rows, for tests that drive the decider directly ------------------------------

/// Partitions of every test deployment.
pub const PARTITIONS: u16 = 4;

pub fn today() -> String {
    Utc::now().format("%Y%m%d").to_string()
}

pub fn partition_of(product_id: i64) -> PartitionId {
    partition_for(ProductId::try_from(product_id).unwrap(), PARTITIONS)
}

pub fn request(user_id: i64, product_id: i64, quantity: i64) -> PurchaseRequest {
    PurchaseRequest {
        transaction_id: TransactionId::new(),
        user_id: UserId::try_from(user_id).unwrap(),
        product_id: ProductId::try_from(product_id).unwrap(),
        quantity: Quantity::try_from(quantity).unwrap(),
        created_at: SystemClock.now(),
    }
}

/// An order of `items` (product, quantity) of `user_id`, accepted now.
pub fn order_request(user_id: i64, items: &[(i64, i64)]) -> Order {
    Order {
        transaction_id: TransactionId::new(),
        user_id: UserId::try_from(user_id).unwrap(),
        lines: Lines::new(
            items
                .iter()
                .map(|&(product, quantity)| Line {
                    product_id: ProductId::try_from(product).unwrap(),
                    quantity: Quantity::try_from(quantity).unwrap(),
                })
                .collect(),
        )
        .expect("valid lines"),
        created_at: SystemClock.now(),
        hold: None,
        slot: None,
        shard: None,
    }
}

/// Drives a batch of orders through a decider directly, as the consumer loop would.
pub async fn process_orders(
    decider: &Decider,
    partition: PartitionId,
    orders: &[Order],
) -> anyhow::Result<allot_worker::decider::BatchOutcome> {
    let bodies: Vec<Vec<u8>> = orders.iter().map(Order::to_json).collect();
    let items: Vec<Item<'_>> = bodies
        .iter()
        .map(|body| Item {
            body,
            message_id: None,
        })
        .collect();
    decider.process_batch(partition, &items).await
}

/// Drives a batch through a decider directly, as the consumer loop would.
pub async fn process(
    decider: &Decider,
    partition: PartitionId,
    requests: &[PurchaseRequest],
) -> anyhow::Result<allot_worker::decider::BatchOutcome> {
    let bodies: Vec<Vec<u8>> = requests.iter().map(PurchaseRequest::to_json).collect();
    let items: Vec<Item<'_>> = bodies
        .iter()
        .map(|body| Item {
            body,
            message_id: None,
        })
        .collect();
    decider.process_batch(partition, &items).await
}

pub async fn insert_product(pool: &PgPool, stock: i64) -> i64 {
    sqlx::query_scalar("INSERT INTO products (name, stock) VALUES ('direct', $1) RETURNING id")
        .bind(stock)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn stock_of(pool: &PgPool, product_id: i64) -> i64 {
    sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(product_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Today's order numbers (as `seq` values) of the given day, sorted.
pub async fn order_seqs(pool: &PgPool, day: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT order_seq FROM transactions WHERE to_char(order_day, 'YYYYMMDD') = $1 ORDER BY order_seq")
        .bind(day)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The schema at `schema` in the OpenAPI document `doc`, following a `$ref` into the components.
pub fn resolve_schema<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .expect("a component reference");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Makes the database refuse every write of `product`'s row, as a broken constraint or a
/// corrupted row would: every batch that sells from it fails, the same way, every time.
pub async fn curse(pool: &PgPool, product: i64) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION curse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF OLD.id = {product} THEN RAISE EXCEPTION 'product {product} is cursed'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER curse BEFORE UPDATE ON products FOR EACH ROW EXECUTE FUNCTION curse();"
    )))
    .execute(pool)
    .await
    .unwrap();
}
