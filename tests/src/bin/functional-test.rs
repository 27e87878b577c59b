//! `functional-test`: checks a running allot system end to end over its HTTP API.
//!
//! For every size `n` in `--sizes` it
//!
//! 1. creates a fresh product (`functional-<n>-<random>`) with stock `n / 2`;
//! 2. prepares `n` `addToCart` requests (quantity 1, distinct user ids) and releases them all at
//!    the same moment, at most `--max-in-flight` on the wire at once, expecting each to be
//!    answered `202 Accepted` with a `pending` transaction and a matching `Location` header;
//! 3. polls every accepted transaction until it is decided, or until `--deadline-secs` after the
//!    release has passed;
//! 4. checks the outcome, collecting every violation rather than stopping at the first: all
//!    requests accepted; exactly `n / 2` succeeded and the rest rejected as `out_of_stock`; every
//!    decided transaction echoes its user, product and quantity; succeeded ones (and only they)
//!    carry an order number, which is well formed (`YYYYMMDD-nnnnn`), unique and dated today in
//!    `--timezone` (the date at the start or at the end of the size's run, to survive midnight);
//!    and the product's stock is 0 at the end.
//!
//! It prints one table row per size (accept throughput, time until all decided, OK/FAIL) with the
//! violations listed under it, then `functional-test: <passed> passed, <failed> failed`. The exit
//! code is 1 if any size failed, 0 otherwise.
//!
//! Run it against a running system, for example:
//!
//! ```text
//! ALLOT_ADMIN_TOKEN=... cargo run -p allot-tests --bin functional-test -- \
//!     --base-url http://127.0.0.1:8080 --sizes 10,100,1000,5000
//! ```
//!
//! Every flag can also be given in the environment (see `--help`). Each in-flight request holds a
//! socket, so the open-file limit (`ulimit -n`) must comfortably exceed `--max-in-flight`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;
use clap::Parser;
use clap::builder::RangedU64ValueParser;
use futures::StreamExt as _;
use reqwest::header::{HeaderName, LOCATION, RETRY_AFTER};
use reqwest::{Client, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};
use uuid::Uuid;

/// Timeout for one HTTP request, from sending it until its body has been read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for establishing one TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two polling rounds over the still-pending transactions.
const POLL_PAUSE: Duration = Duration::from_millis(100);
/// How many instances a grouped violation quotes.
const MAX_EXAMPLES: usize = 3;
/// How much of an unexpected response body a message quotes.
const MAX_SNIPPET_CHARS: usize = 200;

const PENDING: &str = "pending";
const SUCCEEDED: &str = "succeeded";
const REJECTED: &str = "rejected";
const OUT_OF_STOCK: &str = "out_of_stock";

/// Flash-sale functional test against a running allot system.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of the allot API (scheme, host and port; plain http).
    #[arg(long, env = "ALLOT_BASE_URL", default_value = "http://127.0.0.1:8080")]
    base_url: String,

    /// Bearer token for the admin endpoints (creating products).
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,

    /// Comma-separated numbers of concurrent requests, one run each; stock is half of each.
    #[arg(
        long,
        env = "ALLOT_FT_SIZES",
        value_delimiter = ',',
        default_value = "10,100,1000,5000",
        value_parser = RangedU64ValueParser::<usize>::new().range(2..)
    )]
    sizes: Vec<usize>,

    /// Seconds allowed per size, from the release of the requests until every transaction is decided.
    #[arg(
        long,
        env = "ALLOT_FT_DEADLINE_SECS",
        default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    deadline_secs: u64,

    /// Maximum number of HTTP requests in flight at once.
    #[arg(
        long,
        env = "ALLOT_FT_MAX_IN_FLIGHT",
        default_value_t = 1000,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000)
    )]
    max_in_flight: usize,

    /// IANA time zone the server dates order numbers in (the server's ALLOT_TIMEZONE).
    #[arg(long, env = "ALLOT_TIMEZONE", default_value = "UTC")]
    timezone: Tz,
}

// ---------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct NewProduct<'a> {
    name: &'a str,
    stock: i64,
}

#[derive(Deserialize)]
struct Product {
    id: i64,
    name: String,
    stock: i64,
}

#[derive(Serialize)]
struct AddToCart {
    user_id: i64,
    product_id: i64,
    quantity: i64,
}

/// Body of a `202 Accepted` answer to `addToCart`.
#[derive(Deserialize)]
struct AcceptedBody {
    transaction_id: String,
    status: String,
}

/// A transaction as `GET /api/v1/transaction/<id>` shows it.
#[derive(Clone, Debug, Deserialize)]
struct Transaction {
    transaction_id: String,
    status: String,
    user_id: i64,
    product_id: i64,
    quantity: i64,
    order_number: Option<String>,
    reason: Option<String>,
}

impl Transaction {
    fn is_final(&self) -> bool {
        self.status != PENDING
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

// ---------------------------------------------------------------------------------------------
// What one size's run observed
// ---------------------------------------------------------------------------------------------

/// The answer to one `addToCart` request.
#[derive(Debug)]
struct Accept {
    user_id: i64,
    /// The accepted transaction, or why the answer was not a valid `202`.
    outcome: Result<Uuid, String>,
}

/// Result of releasing all requests of one size.
struct Fired {
    release: Instant,
    accepts: Vec<Accept>,
    /// Time from the release until the last request was answered (successfully or not).
    last_answer: Duration,
}

/// Result of polling the accepted transactions.
#[derive(Debug, Default)]
struct Polled {
    /// Decided transactions by id.
    finals: HashMap<Uuid, Transaction>,
    /// Transactions not seen decided before the deadline.
    pending: Vec<Uuid>,
    /// For transactions whose last poll failed: why.
    last_errors: HashMap<Uuid, String>,
    /// Time from the release until every transaction was seen decided.
    all_decided_after: Option<Duration>,
}

/// Everything [`check`] judges for one size.
#[derive(Debug)]
struct Observation {
    n: usize,
    product_id: i64,
    stock: usize,
    accepts: Vec<Accept>,
    polled: Polled,
    /// The product's stock read after all transactions were decided.
    final_stock: Result<i64, String>,
    /// Dates an order number may carry: today at the start and at the end of the run.
    valid_dates: [NaiveDate; 2],
    deadline: Duration,
}

/// The outcome of one size, as printed.
#[derive(Debug)]
struct SizeReport {
    n: usize,
    accepted: usize,
    succeeded: usize,
    rejected: usize,
    accept_rate: Option<f64>,
    decided_secs: Option<f64>,
    violations: Vec<String>,
}

impl SizeReport {
    fn new(observation: &Observation, last_answer: Duration, violations: Vec<String>) -> Self {
        let count_status = |status: &str| {
            (observation.polled.finals.values())
                .filter(|tx| tx.status == status)
                .count()
        };
        SizeReport {
            n: observation.n,
            accepted: (observation.accepts.iter())
                .filter(|a| a.outcome.is_ok())
                .count(),
            succeeded: count_status(SUCCEEDED),
            rejected: count_status(REJECTED),
            accept_rate: rate(observation.n, last_answer),
            decided_secs: observation
                .polled
                .all_decided_after
                .map(|d| d.as_secs_f64()),
            violations,
        }
    }

    /// A size that could not be run at all (e.g. the product could not be created).
    fn setup_failure(n: usize, error: &anyhow::Error) -> Self {
        SizeReport {
            n,
            accepted: 0,
            succeeded: 0,
            rejected: 0,
            accept_rate: None,
            decided_secs: None,
            violations: vec![format!("run aborted: {error:#}")],
        }
    }

    fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    const HEADER: &str = "     n  accepted  succeeded  rejected  accept req/s  decided (s)  result";

    fn row(&self) -> String {
        let optional = |value: Option<f64>, precision: usize| {
            value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
        };
        format!(
            "{:>6}  {:>8}  {:>9}  {:>8}  {:>12}  {:>11}  {}",
            self.n,
            self.accepted,
            self.succeeded,
            self.rejected,
            optional(self.accept_rate, 1),
            optional(self.decided_secs, 2),
            if self.passed() { "OK" } else { "FAIL" },
        )
    }

    fn print(&self) {
        println!("{}", self.row());
        for violation in &self.violations {
            println!("        - {violation}");
        }
    }
}

/// Requests per second, if the duration allows computing it.
fn rate(requests: usize, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| requests as f64 / secs)
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// The allot API: one shared client, the base URL and the admin token.
struct Api {
    client: Client,
    base: String,
    admin_token: String,
}

impl Api {
    fn new(args: &Args) -> Result<Self> {
        let base = args.base_url.trim_end_matches('/').to_owned();
        let url =
            reqwest::Url::parse(&base).with_context(|| format!("invalid --base-url {base:?}"))?;
        ensure!(
            url.scheme() == "http",
            "--base-url {base:?} must be a plain http:// URL"
        );
        let client = Client::builder()
            .pool_max_idle_per_host(args.max_in_flight)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            base,
            admin_token: args.admin_token.clone(),
        })
    }

    /// The absolute URL of `path` below `/api/v1`.
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }
}

/// Creates a product and returns its id.
async fn create_product(api: &Api, name: &str, stock: i64) -> Result<i64> {
    let response = (api.client.post(api.url("/products")))
        .bearer_auth(&api.admin_token)
        .json(&NewProduct { name, stock })
        .send()
        .await
        .context("POST /api/v1/products")?;
    let (status, body) = read_body(response)
        .await
        .context("reading the POST /api/v1/products answer")?;
    ensure!(
        status == StatusCode::CREATED,
        "POST /api/v1/products answered {}",
        describe_failure(status, None, &body)
    );
    let product: Product = serde_json::from_str(&body)
        .with_context(|| format!("POST /api/v1/products answered {}", snippet(&body)))?;
    ensure!(
        product.name == name && product.stock == stock,
        "POST /api/v1/products for {name:?} with stock {stock} created {:?} with stock {}",
        product.name,
        product.stock
    );
    Ok(product.id)
}

/// Reads a product's remaining stock.
async fn product_stock(api: &Api, product_id: i64) -> Result<i64> {
    let path = format!("/products/{product_id}");
    let response = (api.client.get(api.url(&path)).send())
        .await
        .with_context(|| format!("GET /api/v1{path}"))?;
    let (status, body) = read_body(response)
        .await
        .with_context(|| format!("reading the GET /api/v1{path} answer"))?;
    ensure!(
        status == StatusCode::OK,
        "GET /api/v1{path} answered {}",
        describe_failure(status, None, &body)
    );
    let product: Product = serde_json::from_str(&body)
        .with_context(|| format!("GET /api/v1{path} answered {}", snippet(&body)))?;
    Ok(product.stock)
}

/// Prepares one `addToCart` request per user, releases them all at the same moment and collects
/// the answers. At most `max_in_flight` requests are on the wire at once.
async fn fire(api: &Api, product_id: i64, user_ids: &[i64], max_in_flight: usize) -> Result<Fired> {
    let (release_tx, release_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut tasks = JoinSet::new();
    for &user_id in user_ids {
        let body = AddToCart {
            user_id,
            product_id,
            quantity: 1,
        };
        let request = (api.client.post(api.url("/order/addToCart")))
            .json(&body)
            .build()
            .with_context(|| format!("building the addToCart request of user {user_id}"))?;
        let client = api.client.clone();
        let mut released = release_rx.clone();
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let outcome = submit(&client, request, &mut released, &permits).await;
            (Accept { user_id, outcome }, Instant::now())
        });
    }

    let release = Instant::now();
    release_tx.send_replace(true);
    let mut accepts = Vec::with_capacity(user_ids.len());
    let mut last_answer = Duration::ZERO;
    while let Some(joined) = tasks.join_next().await {
        let (accept, answered_at) = joined.context("an addToCart task failed")?;
        last_answer = last_answer.max(answered_at.saturating_duration_since(release));
        accepts.push(accept);
    }
    Ok(Fired {
        release,
        accepts,
        last_answer,
    })
}

/// Waits for the release, then sends one `addToCart` request under a permit and judges the answer.
async fn submit(
    client: &Client,
    request: Request,
    released: &mut watch::Receiver<bool>,
    permits: &Semaphore,
) -> Result<Uuid, String> {
    (released.wait_for(|&go| go).await).map_err(|_| "the release signal was lost".to_owned())?;
    let _permit = (permits.acquire().await).map_err(|_| "the request limiter closed".to_owned())?;
    let response = (client.execute(request).await)
        .map_err(|e| format!("request failed: {:#}", anyhow::Error::new(e)))?;
    let location = header(&response, &LOCATION);
    let retry_after = header(&response, &RETRY_AFTER);
    let (status, body) = (read_body(response).await)
        .map_err(|e| format!("reading the answer failed: {:#}", anyhow::Error::new(e)))?;
    classify_accept(status, location.as_deref(), retry_after.as_deref(), &body)
}

/// Polls the still-pending transactions round after round, with a short pause between rounds,
/// until all are decided or the deadline has passed.
async fn poll_until_final(
    api: &Api,
    ids: Vec<Uuid>,
    max_in_flight: usize,
    release: Instant,
    deadline: Instant,
) -> Polled {
    let mut polled = Polled {
        pending: ids,
        ..Polled::default()
    };
    while !polled.pending.is_empty() && Instant::now() < deadline {
        poll_round(api, &mut polled, max_in_flight, deadline).await;
        if !polled.pending.is_empty() {
            sleep_until((Instant::now() + POLL_PAUSE).min(deadline)).await;
        }
    }
    if polled.pending.is_empty() {
        polled.all_decided_after = Some(release.elapsed());
    }
    polled
}

/// Polls every pending transaction once (at most `max_in_flight` at a time, never past the
/// deadline) and moves the decided ones to `finals`.
async fn poll_round(api: &Api, polled: &mut Polled, max_in_flight: usize, deadline: Instant) {
    let mut answers = futures::stream::iter(polled.pending.clone())
        .map(|id| async move { (id, get_transaction(api, id).await) })
        .buffer_unordered(max_in_flight);
    while let Ok(Some((id, answer))) = timeout_at(deadline, answers.next()).await {
        match answer {
            Ok(transaction) => {
                polled.last_errors.remove(&id);
                if transaction.is_final() {
                    polled.finals.insert(id, transaction);
                }
            }
            Err(error) => {
                polled.last_errors.insert(id, error);
            }
        }
    }
    polled.pending.retain(|id| !polled.finals.contains_key(id));
}

/// Reads one transaction; the error says what was wrong with the answer.
async fn get_transaction(api: &Api, id: Uuid) -> Result<Transaction, String> {
    let response = (api
        .client
        .get(api.url(&format!("/transaction/{id}")))
        .send())
    .await
    .map_err(|e| format!("request failed: {:#}", anyhow::Error::new(e)))?;
    let (status, body) = (read_body(response).await)
        .map_err(|e| format!("reading the answer failed: {:#}", anyhow::Error::new(e)))?;
    if status != StatusCode::OK {
        return Err(describe_failure(status, None, &body));
    }
    serde_json::from_str(&body).map_err(|e| format!("unexpected body ({e}): {}", snippet(&body)))
}

async fn read_body(response: Response) -> reqwest::Result<(StatusCode, String)> {
    let status = response.status();
    Ok((status, response.text().await?))
}

fn header(response: &Response, name: &HeaderName) -> Option<String> {
    let value = response.headers().get(name)?;
    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Judging answers
// ---------------------------------------------------------------------------------------------

/// Judges the answer to one `addToCart` request: a valid acceptance is `202` with a `pending`
/// transaction whose id is a UUID, and a `Location` header pointing at that transaction.
fn classify_accept(
    status: StatusCode,
    location: Option<&str>,
    retry_after: Option<&str>,
    body: &str,
) -> Result<Uuid, String> {
    if status != StatusCode::ACCEPTED {
        return Err(describe_failure(status, retry_after, body));
    }
    let accepted: AcceptedBody = serde_json::from_str(body)
        .map_err(|e| format!("202 with an unexpected body ({e}): {}", snippet(body)))?;
    let mut problems = Vec::new();
    if accepted.status != PENDING {
        problems.push(format!(
            "status {:?} instead of \"pending\"",
            accepted.status
        ));
    }
    let expected_location = format!("/api/v1/transaction/{}", accepted.transaction_id);
    if location != Some(expected_location.as_str()) {
        problems.push(format!(
            "Location {location:?} instead of {expected_location:?}"
        ));
    }
    let id = Uuid::parse_str(&accepted.transaction_id);
    if id.is_err() {
        problems.push(format!(
            "transaction_id {:?} is not a UUID",
            accepted.transaction_id
        ));
    }
    match id {
        Ok(id) if problems.is_empty() => Ok(id),
        _ => Err(format!("202 with {}", problems.join(", "))),
    }
}

/// Describes an unexpected answer: the status, the error code and message if the body is in the
/// API's error format (otherwise a snippet of it), and `Retry-After` if given.
fn describe_failure(status: StatusCode, retry_after: Option<&str>, body: &str) -> String {
    let mut text = format!("HTTP {status}");
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => {
            let _ = write!(text, " {}: {}", error.code, error.message);
        }
        Err(_) if body.trim().is_empty() => {}
        Err(_) => {
            let _ = write!(text, ", body not in the error format: {}", snippet(body));
        }
    }
    if let Some(retry_after) = retry_after {
        let _ = write!(text, " (Retry-After: {retry_after})");
    }
    text
}

/// The beginning of `text`, for quoting it in a message.
fn snippet(text: &str) -> String {
    let mut chars = text.chars();
    let mut quoted: String = chars.by_ref().take(MAX_SNIPPET_CHARS).collect();
    if chars.next().is_some() {
        quoted.push('…');
    }
    format!("{quoted:?}")
}

/// Parses an order number `YYYYMMDD-nnnnn` (a valid date, a dash, at least five digits) and
/// returns its date.
fn parse_order_number(order_number: &str) -> Result<NaiveDate, String> {
    let malformed = |why: &str| format!("{order_number:?} {why}");
    let (date, sequence) =
        (order_number.split_once('-')).ok_or_else(|| malformed("has no '-' after the date"))?;
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("does not start with an 8-digit date"));
    }
    if sequence.len() < 5 || !sequence.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("does not end in at least 5 digits"));
    }
    NaiveDate::parse_from_str(date, "%Y%m%d").map_err(|_| malformed("has no valid date"))
}

/// Today's date in `timezone`.
fn today(timezone: Tz) -> NaiveDate {
    Utc::now().with_timezone(&timezone).date_naive()
}

/// Checks one size's observation against the contract and returns every violation found.
/// Problems of the same kind with individual instances are grouped into one line.
fn check(observation: &Observation) -> Vec<String> {
    let mut violations = check_accepts(observation);
    violations.extend(check_pending(observation));
    violations.extend(check_decisions(observation));
    violations.extend(check_final_stock(observation));
    violations
}

/// Every request was answered with a valid `202`, each with its own transaction.
fn check_accepts(observation: &Observation) -> Vec<String> {
    let Observation { n, accepts, .. } = observation;
    let mut violations = Vec::new();
    if accepts.len() != *n {
        violations.push(format!(
            "{} answers recorded for {n} requests",
            accepts.len()
        ));
    }
    let mut not_accepted = Vec::new();
    let mut requester = HashMap::new();
    let mut shared_ids = Vec::new();
    for accept in accepts {
        match &accept.outcome {
            Err(why) => not_accepted.push(format!("user {}: {why}", accept.user_id)),
            Ok(id) => {
                if let Some(first) = requester.insert(*id, accept.user_id) {
                    shared_ids.push(format!("{id} (users {first} and {})", accept.user_id));
                }
            }
        }
    }
    violations.extend(grouped(
        "requests not accepted with a valid 202",
        &not_accepted,
    ));
    violations.extend(grouped(
        "transaction ids returned for several requests",
        &shared_ids,
    ));
    violations
}

/// Every accepted transaction was decided before the deadline.
fn check_pending(observation: &Observation) -> Option<String> {
    let Observation {
        polled, deadline, ..
    } = observation;
    if polled.pending.is_empty() {
        return None;
    }
    let mut line = format!(
        "{} of {} accepted transactions still pending {}s after the release",
        polled.pending.len(),
        polled.pending.len() + polled.finals.len(),
        deadline.as_secs()
    );
    let failing: Vec<String> = (polled.pending.iter())
        .filter_map(|id| Some(format!("{id}: {}", polled.last_errors.get(id)?)))
        .collect();
    if let Some(errors) = grouped("; their last poll failed", &failing) {
        line.push_str(&errors);
    }
    Some(line)
}

/// The decided transactions: as many successes as there was stock, all others rejected as out of
/// stock, each echoing its request, order numbers exactly on the successes, and those valid.
fn check_decisions(observation: &Observation) -> Vec<String> {
    let Observation {
        n,
        product_id,
        stock,
        accepts,
        polled,
        valid_dates,
        ..
    } = observation;
    let mut wrong_echo = Vec::new();
    let mut unknown_status = Vec::new();
    let mut wrong_reason = Vec::new();
    let mut missing_order_number = Vec::new();
    let mut rejected_with_order_number = Vec::new();
    let mut order_numbers = Vec::new();
    let (mut succeeded, mut rejected) = (0, 0);
    let mut seen = HashSet::new();
    for accept in accepts {
        let Ok(id) = &accept.outcome else { continue };
        let Some(tx) = polled.finals.get(id).filter(|_| seen.insert(*id)) else {
            continue;
        };
        wrong_echo.extend(echo_mismatches(*id, tx, accept.user_id, *product_id));
        match tx.status.as_str() {
            SUCCEEDED => {
                succeeded += 1;
                match &tx.order_number {
                    Some(number) => order_numbers.push((id, number.as_str())),
                    None => missing_order_number.push(id.to_string()),
                }
            }
            REJECTED => {
                rejected += 1;
                if tx.reason.as_deref() != Some(OUT_OF_STOCK) {
                    wrong_reason.push(format!("{id}: {:?}", tx.reason));
                }
                if let Some(number) = &tx.order_number {
                    rejected_with_order_number.push(format!("{id}: {number}"));
                }
            }
            other => unknown_status.push(format!("{id}: {other:?}")),
        }
    }

    let mut violations = Vec::new();
    if succeeded != *stock {
        violations.push(format!(
            "{succeeded} transactions succeeded, expected {stock} (the stock)"
        ));
    }
    if rejected != n - stock {
        violations.push(format!(
            "{rejected} transactions rejected, expected {}",
            n - stock
        ));
    }
    let groups = [
        ("transactions with an unknown status", unknown_status),
        ("transactions not echoing their request", wrong_echo),
        (
            "rejections with a reason other than \"out_of_stock\"",
            wrong_reason,
        ),
        (
            "succeeded transactions without an order_number",
            missing_order_number,
        ),
        (
            "rejected transactions with an order_number",
            rejected_with_order_number,
        ),
    ];
    for (kind, instances) in groups {
        violations.extend(grouped(kind, &instances));
    }
    violations.extend(check_order_numbers(&order_numbers, valid_dates));
    violations
}

/// How a decided transaction differs from the request that created it.
fn echo_mismatches(id: Uuid, tx: &Transaction, user_id: i64, product_id: i64) -> Vec<String> {
    let mut mismatches = Vec::new();
    if Uuid::parse_str(&tx.transaction_id).ok() != Some(id) {
        mismatches.push(format!("{id}: transaction_id {:?}", tx.transaction_id));
    }
    let fields = [
        ("user_id", tx.user_id, user_id),
        ("product_id", tx.product_id, product_id),
        ("quantity", tx.quantity, 1),
    ];
    for (field, got, expected) in fields {
        if got != expected {
            mismatches.push(format!("{id}: {field} {got} instead of {expected}"));
        }
    }
    mismatches
}

/// The product is sold out at the end.
fn check_final_stock(observation: &Observation) -> Option<String> {
    let Observation {
        product_id,
        final_stock,
        ..
    } = observation;
    match final_stock {
        Ok(0) => None,
        Ok(left) => Some(format!(
            "product {product_id} shows stock {left} at the end, expected 0"
        )),
        Err(why) => Some(format!(
            "could not read product {product_id} at the end: {why}"
        )),
    }
}

/// Checks that the order numbers of succeeded transactions are well formed, dated on one of
/// `valid_dates` and unique.
fn check_order_numbers(order_numbers: &[(&Uuid, &str)], valid_dates: &[NaiveDate]) -> Vec<String> {
    let mut malformed = Vec::new();
    let mut wrong_date = Vec::new();
    let mut holders: HashMap<&str, Vec<&Uuid>> = HashMap::new();
    for &(id, number) in order_numbers {
        holders.entry(number).or_default().push(id);
        match parse_order_number(number) {
            Err(why) => malformed.push(format!("{id}: {why}")),
            Ok(date) if !valid_dates.contains(&date) => {
                wrong_date.push(format!("{id}: {number}"));
            }
            Ok(_) => {}
        }
    }
    let mut duplicates: Vec<String> = (holders.into_iter())
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(number, ids)| format!("{number} given to {} transactions", ids.len()))
        .collect();
    duplicates.sort();
    let mut dates: Vec<String> = (valid_dates.iter())
        .map(|d| d.format("%Y%m%d").to_string())
        .collect();
    dates.dedup();
    [
        grouped("malformed order numbers", &malformed),
        grouped(
            &format!("order numbers not dated {}", dates.join(" or ")),
            &wrong_date,
        ),
        grouped("duplicate order numbers", &duplicates),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// One violation line for instances of one kind of problem: the count and a few examples.
fn grouped(kind: &str, instances: &[String]) -> Option<String> {
    if instances.is_empty() {
        return None;
    }
    let shown = instances.len().min(MAX_EXAMPLES);
    let mut line = format!(
        "{kind} ({}): {}",
        instances.len(),
        instances[..shown].join("; ")
    );
    if instances.len() > shown {
        let _ = write!(line, "; and {} more", instances.len() - shown);
    }
    Some(line)
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// `n` distinct, positive user ids, starting at a random offset so that repeated runs against the
/// same system use different users.
fn user_ids(n: usize) -> Vec<i64> {
    let offset = (Uuid::new_v4().as_u128() % 1_000_000_000) as i64;
    (1..).map(|i| offset + i).take(n).collect()
}

/// Runs one size: create the product, fire, poll, read the stock, check.
async fn run_size(api: &Api, args: &Args, n: usize) -> Result<SizeReport> {
    let start_date = today(args.timezone);
    let stock = n / 2;
    let name = format!("functional-{n}-{:08x}", Uuid::new_v4().as_u128() as u32);
    let product_id = create_product(api, &name, i64::try_from(stock)?)
        .await
        .with_context(|| format!("creating product {name:?}"))?;

    let fired = fire(api, product_id, &user_ids(n), args.max_in_flight).await?;
    let deadline = Duration::from_secs(args.deadline_secs);
    let accepted = fired.accepts.iter().filter_map(|a| a.outcome.clone().ok());
    let polled = poll_until_final(
        api,
        accepted.collect(),
        args.max_in_flight,
        fired.release,
        fired.release + deadline,
    )
    .await;
    let final_stock = (product_stock(api, product_id).await).map_err(|e| format!("{e:#}"));

    let observation = Observation {
        n,
        product_id,
        stock,
        accepts: fired.accepts,
        polled,
        final_stock,
        valid_dates: [start_date, today(args.timezone)],
        deadline,
    };
    let violations = check(&observation);
    Ok(SizeReport::new(&observation, fired.last_answer, violations))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("functional-test: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every size, printing a table row per size; returns whether all passed.
async fn run(args: Args) -> Result<bool> {
    let api = Api::new(&args)?;
    println!(
        "functional-test against {} (deadline {}s per size, at most {} requests in flight, order dates in {})",
        api.base, args.deadline_secs, args.max_in_flight, args.timezone
    );
    println!("{}", SizeReport::HEADER);
    let mut failed = 0;
    for &n in &args.sizes {
        let report = match run_size(&api, &args, n).await {
            Ok(report) => report,
            Err(error) => SizeReport::setup_failure(n, &error),
        };
        report.print();
        if !report.passed() {
            failed += 1;
        }
    }
    println!(
        "functional-test: {} passed, {failed} failed",
        args.sizes.len() - failed
    );
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    const TODAY: (i32, u32, u32) = (2025, 3, 14);

    fn transaction(id: Uuid, user_id: i64, product_id: i64, status: &str) -> Transaction {
        Transaction {
            transaction_id: id.to_string(),
            status: status.to_owned(),
            user_id,
            product_id,
            quantity: 1,
            order_number: None,
            reason: None,
        }
    }

    /// A run of size `n` that did everything right: the first half succeeded, the rest were
    /// rejected as out of stock.
    fn good_observation(n: usize) -> Observation {
        let product_id = 42;
        let stock = n / 2;
        let mut accepts = Vec::new();
        let mut finals = HashMap::new();
        for (i, user_id) in (1..=n as i64).enumerate() {
            let id = Uuid::new_v4();
            accepts.push(Accept {
                user_id,
                outcome: Ok(id),
            });
            let mut tx = transaction(id, user_id, product_id, REJECTED);
            if i < stock {
                tx.status = SUCCEEDED.to_owned();
                tx.order_number = Some(format!("20250314-{:05}", i + 1));
            } else {
                tx.reason = Some(OUT_OF_STOCK.to_owned());
            }
            finals.insert(id, tx);
        }
        let today = date(TODAY.0, TODAY.1, TODAY.2);
        Observation {
            n,
            product_id,
            stock,
            accepts,
            polled: Polled {
                finals,
                all_decided_after: Some(Duration::from_millis(1500)),
                ..Polled::default()
            },
            final_stock: Ok(0),
            valid_dates: [today, today],
            deadline: Duration::from_secs(120),
        }
    }

    /// The transaction of the `i`-th request.
    fn tx_mut(observation: &mut Observation, i: usize) -> &mut Transaction {
        let id = *observation.accepts[i].outcome.as_ref().expect("accepted");
        observation
            .polled
            .finals
            .get_mut(&id)
            .expect("decided transaction")
    }

    fn assert_single_violation(observation: &Observation, needle: &str) {
        let violations = check(observation);
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(violations[0].contains(needle), "{violations:#?}");
    }

    #[test]
    fn order_numbers_parse() {
        assert_eq!(parse_order_number("20250314-00001"), Ok(date(2025, 3, 14)));
        assert_eq!(
            parse_order_number("20241231-1234567"),
            Ok(date(2024, 12, 31))
        );
        for bad in [
            "",
            "20250314",
            "20250314-",
            "20250314-0001",
            "20250314_00001",
            "2025031-00001",
            "202503144-00001",
            "20251314-00001",
            "20250230-00001",
            "2025O314-00001",
            "20250314-0000x",
            "20250314-00001-2",
            "20250314- 0001",
            "+2025031-00001",
            "20250314-٠٠٠٠١",
        ] {
            assert!(
                parse_order_number(bad).is_err(),
                "{bad:?} should be malformed"
            );
        }
    }

    #[test]
    fn valid_acceptance_is_accepted() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"transaction_id": "{id}", "status": "pending"}}"#);
        let location = format!("/api/v1/transaction/{id}");
        assert_eq!(
            classify_accept(StatusCode::ACCEPTED, Some(&location), None, &body),
            Ok(id)
        );
    }

    #[test]
    fn invalid_acceptances_are_explained() {
        let id = Uuid::new_v4();
        let location = format!("/api/v1/transaction/{id}");
        let body = format!(r#"{{"transaction_id": "{id}", "status": "pending"}}"#);

        let busy = r#"{"error": {"code": "unavailable", "message": "broker did not confirm"}}"#;
        let error = classify_accept(StatusCode::SERVICE_UNAVAILABLE, None, Some("1"), busy)
            .expect_err("503 is no acceptance");
        assert!(error.contains("503"), "{error}");
        assert!(
            error.contains("unavailable: broker did not confirm"),
            "{error}"
        );
        assert!(error.contains("Retry-After: 1"), "{error}");

        let error = classify_accept(StatusCode::OK, Some(&location), None, &body)
            .expect_err("200 is no acceptance");
        assert!(error.contains("200"), "{error}");

        let error = classify_accept(StatusCode::ACCEPTED, None, None, &body)
            .expect_err("Location is required");
        assert!(error.contains("Location None"), "{error}");

        let error = classify_accept(StatusCode::ACCEPTED, Some("/elsewhere"), None, &body)
            .expect_err("Location must match");
        assert!(error.contains("/elsewhere"), "{error}");

        let decided = format!(r#"{{"transaction_id": "{id}", "status": "succeeded"}}"#);
        let error = classify_accept(StatusCode::ACCEPTED, Some(&location), None, &decided)
            .expect_err("status must be pending");
        assert!(error.contains("\"succeeded\""), "{error}");

        let not_uuid = r#"{"transaction_id": "abc", "status": "pending"}"#;
        let error = classify_accept(
            StatusCode::ACCEPTED,
            Some("/api/v1/transaction/abc"),
            None,
            not_uuid,
        )
        .expect_err("transaction_id must be a UUID");
        assert!(error.contains("not a UUID"), "{error}");

        let error = classify_accept(StatusCode::ACCEPTED, Some(&location), None, "<html>")
            .expect_err("body must be JSON");
        assert!(error.contains("<html>"), "{error}");
    }

    #[test]
    fn failures_are_described() {
        assert_eq!(
            describe_failure(StatusCode::BAD_GATEWAY, None, ""),
            "HTTP 502 Bad Gateway"
        );
        let long = "x".repeat(1000);
        let described = describe_failure(StatusCode::INTERNAL_SERVER_ERROR, None, &long);
        assert!(described.contains("not in the error format"), "{described}");
        assert!(described.len() < 300, "{described}");
    }

    #[test]
    fn a_correct_run_has_no_violations() {
        for n in [2, 3, 10, 101] {
            let observation = good_observation(n);
            assert_eq!(check(&observation), Vec::<String>::new(), "n = {n}");
        }
    }

    #[test]
    fn failed_accepts_are_violations() {
        let mut observation = good_observation(10);
        let id = *observation.accepts[9].outcome.as_ref().expect("accepted");
        observation.polled.finals.remove(&id);
        observation.accepts[9].outcome = Err("HTTP 503 Service Unavailable".to_owned());
        let violations = check(&observation);
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(violations[0].contains("not accepted with a valid 202 (1): user 10: HTTP 503"));
        assert!(violations[1].contains("4 transactions rejected, expected 5"));
    }

    #[test]
    fn shared_transaction_ids_are_violations() {
        let mut observation = good_observation(4);
        let id = *observation.accepts[2].outcome.as_ref().expect("accepted");
        let other = *observation.accepts[3].outcome.as_ref().expect("accepted");
        observation.polled.finals.remove(&other);
        observation.accepts[3].outcome = Ok(id);
        let violations = check(&observation);
        assert!(
            violations
                .iter()
                .any(|v| v.contains("transaction ids returned for several requests (1)")),
            "{violations:#?}"
        );
    }

    #[test]
    fn pending_transactions_at_the_deadline_are_a_violation() {
        let mut observation = good_observation(10);
        for i in [7, 8, 9] {
            let id = *observation.accepts[i].outcome.as_ref().expect("accepted");
            observation.polled.finals.remove(&id);
            observation.polled.pending.push(id);
        }
        let stuck = observation.polled.pending[0];
        (observation.polled.last_errors).insert(stuck, "HTTP 500 Internal Server Error".into());
        observation.polled.all_decided_after = None;
        let violations = check(&observation);
        assert!(
            violations[0].starts_with("3 of 10 accepted transactions still pending 120s"),
            "{violations:#?}"
        );
        assert!(
            violations[0].contains("last poll failed (1)"),
            "{violations:#?}"
        );
        assert!(violations[1].contains("2 transactions rejected, expected 5"));
        assert_eq!(violations.len(), 2, "{violations:#?}");
    }

    #[test]
    fn overselling_is_a_violation() {
        let mut observation = good_observation(4);
        let tx = tx_mut(&mut observation, 3);
        tx.status = SUCCEEDED.to_owned();
        tx.reason = None;
        tx.order_number = Some("20250314-00003".to_owned());
        let violations = check(&observation);
        assert_eq!(
            violations,
            [
                "3 transactions succeeded, expected 2 (the stock)",
                "1 transactions rejected, expected 2",
            ]
        );
    }

    #[test]
    fn wrong_rejection_reasons_are_violations() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 3).reason = Some("sold_out".to_owned());
        tx_mut(&mut observation, 2).reason = None;
        let violations = check(&observation);
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(
            violations[0].starts_with("rejections with a reason other than \"out_of_stock\" (2)")
        );
    }

    #[test]
    fn echo_mismatches_are_violations() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 0).user_id = 99;
        tx_mut(&mut observation, 1).product_id = 7;
        tx_mut(&mut observation, 2).quantity = 2;
        tx_mut(&mut observation, 3).transaction_id = Uuid::nil().to_string();
        let violations = check(&observation);
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(
            violations[0].starts_with("transactions not echoing their request (4)"),
            "{violations:#?}"
        );
        assert!(violations[0].contains("user_id 99 instead of 1"));
    }

    #[test]
    fn transaction_ids_are_compared_as_uuids() {
        let mut observation = good_observation(2);
        let tx = tx_mut(&mut observation, 0);
        tx.transaction_id = tx.transaction_id.to_uppercase();
        assert_eq!(check(&observation), Vec::<String>::new());
    }

    #[test]
    fn order_number_presence_is_checked() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 0).order_number = None;
        tx_mut(&mut observation, 3).order_number = Some("20250314-00009".to_owned());
        let violations = check(&observation);
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(violations[0].starts_with("succeeded transactions without an order_number (1)"));
        assert!(violations[1].starts_with("rejected transactions with an order_number (1)"));
    }

    #[test]
    fn bad_order_numbers_are_violations() {
        let mut observation = good_observation(8);
        tx_mut(&mut observation, 0).order_number = Some("2025-03-14-1".to_owned());
        tx_mut(&mut observation, 1).order_number = Some("20250313-00002".to_owned());
        tx_mut(&mut observation, 2).order_number = Some("20250314-00004".to_owned());
        let violations = check(&observation);
        assert_eq!(violations.len(), 3, "{violations:#?}");
        assert!(violations[0].starts_with("malformed order numbers (1)"));
        assert!(violations[1].starts_with("order numbers not dated 20250314 (1)"));
        assert!(violations[2].contains("20250314-00004 given to 2 transactions"));
    }

    #[test]
    fn order_numbers_may_carry_the_date_at_either_end_of_the_run() {
        let mut observation = good_observation(4);
        observation.valid_dates = [date(2025, 3, 13), date(2025, 3, 14)];
        tx_mut(&mut observation, 0).order_number = Some("20250313-00007".to_owned());
        assert_eq!(check(&observation), Vec::<String>::new());
    }

    #[test]
    fn remaining_stock_is_a_violation() {
        let mut observation = good_observation(4);
        observation.final_stock = Ok(1);
        assert_single_violation(&observation, "shows stock 1 at the end, expected 0");
        observation.final_stock = Err("HTTP 404 Not Found".to_owned());
        assert_single_violation(&observation, "could not read product 42 at the end");
    }

    #[test]
    fn unknown_statuses_are_violations() {
        let mut observation = good_observation(4);
        tx_mut(&mut observation, 3).status = "cancelled".to_owned();
        let violations = check(&observation);
        assert!(
            violations
                .iter()
                .any(|v| v.starts_with("transactions with an unknown status (1)")),
            "{violations:#?}"
        );
    }

    #[test]
    fn grouping_quotes_a_few_examples() {
        assert_eq!(grouped("things", &[]), None);
        let items: Vec<String> = (1..=5).map(|i| i.to_string()).collect();
        assert_eq!(
            grouped("things", &items).as_deref(),
            Some("things (5): 1; 2; 3; and 2 more")
        );
    }

    #[test]
    fn report_rows_line_up_with_the_header() {
        let observation = good_observation(10);
        let report = SizeReport::new(&observation, Duration::from_millis(250), Vec::new());
        assert_eq!(
            (report.accepted, report.succeeded, report.rejected),
            (10, 5, 5)
        );
        assert_eq!(report.accept_rate, Some(40.0));
        let row = report.row();
        assert_eq!(row.len(), SizeReport::HEADER.len() - 4, "{row}");
        assert!(row.ends_with("  OK"), "{row}");
        let failed = SizeReport::setup_failure(10, &anyhow::anyhow!("no server"));
        assert!(!failed.passed());
        assert!(failed.row().ends_with("FAIL"), "{}", failed.row());
    }

    #[test]
    fn rates_need_elapsed_time() {
        assert_eq!(rate(10, Duration::ZERO), None);
        assert_eq!(rate(10, Duration::from_secs(2)), Some(5.0));
    }

    #[test]
    fn user_ids_are_distinct_and_positive() {
        let ids = user_ids(5000);
        assert_eq!(ids.len(), 5000);
        assert!(ids.iter().all(|&id| id > 0 && id < i64::from(i32::MAX)));
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 5000);
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let args = Args::try_parse_from(["functional-test", "--admin-token", "t"])
            .expect("defaults parse");
        assert_eq!(args.sizes, [10, 100, 1000, 5000]);
        assert_eq!(args.deadline_secs, 120);
        assert_eq!(args.max_in_flight, 1000);
        assert_eq!(args.timezone, Tz::UTC);
        assert_eq!(args.base_url, "http://127.0.0.1:8080");

        let args = Args::try_parse_from([
            "functional-test",
            "--admin-token=t",
            "--sizes=4,6",
            "--timezone=Europe/Berlin",
        ])
        .expect("flags parse");
        assert_eq!(args.sizes, [4, 6]);
        assert_eq!(args.timezone, Tz::Europe__Berlin);

        for bad in [
            "--sizes=1",
            "--max-in-flight=0",
            "--deadline-secs=0",
            "--timezone=Mars",
        ] {
            assert!(
                Args::try_parse_from(["functional-test", "--admin-token=t", bad]).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
