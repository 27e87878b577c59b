//! Talking to the allot API over HTTP: the shared client ([`Api`]), creating a product and
//! reading its stock, releasing all `addToCart` requests of a size at once ([`fire`]), polling
//! the accepted transactions until they are decided ([`poll_until_final`]), and judging each
//! answer, with short descriptions of the unexpected ones.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use futures::StreamExt as _;
use reqwest::header::{HeaderName, LOCATION, RETRY_AFTER};
use reqwest::{Client, Request, Response, StatusCode};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};
use uuid::Uuid;

use crate::Args;
use crate::wire::{
    AcceptedBody, AddToCart, ErrorBody, NewProduct, OUT_OF_STOCK, PENDING, Product, REJECTED,
    Transaction,
};

/// Timeout for one HTTP request, from sending it until its body has been read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for establishing one TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two polling rounds over the still-pending transactions.
const POLL_PAUSE: Duration = Duration::from_millis(100);
/// How much of an unexpected response body a message quotes.
const MAX_SNIPPET_CHARS: usize = 200;

/// The allot API: one shared client, the base URL and the admin token.
pub struct Api {
    client: Client,
    pub base: String,
    admin_token: String,
}

impl Api {
    pub fn new(args: &Args) -> Result<Self> {
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

/// The answer to one `addToCart` request.
#[derive(Debug)]
pub struct Accept {
    pub user_id: i64,
    /// The accepted transaction, or why the answer was not a valid `202`.
    pub outcome: Result<Uuid, String>,
    /// The answer was allot's final `out_of_stock` for a product already sold out (`200`,
    /// nothing recorded): a valid outcome, though not an acceptance.
    pub sold_out: bool,
}

/// Result of releasing all requests of one size.
pub struct Fired {
    pub release: Instant,
    pub accepts: Vec<Accept>,
    /// Time from the release until the last request was answered (successfully or not).
    pub last_answer: Duration,
}

/// Result of polling the accepted transactions.
#[derive(Debug, Default)]
pub struct Polled {
    /// Decided transactions by id.
    pub finals: HashMap<Uuid, Transaction>,
    /// Transactions not seen decided before the deadline.
    pub pending: Vec<Uuid>,
    /// For transactions whose last poll failed: why.
    pub last_errors: HashMap<Uuid, String>,
    /// Time from the release until every transaction was seen decided.
    pub all_decided_after: Option<Duration>,
}

/// Creates a product and returns its id.
pub async fn create_product(api: &Api, name: &str, stock: i64) -> Result<i64> {
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
pub async fn product_stock(api: &Api, product_id: i64) -> Result<i64> {
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
pub async fn fire(
    api: &Api,
    product_id: i64,
    user_ids: &[i64],
    max_in_flight: usize,
) -> Result<Fired> {
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
            let (outcome, sold_out) = match submit(
                &client,
                request,
                &mut released,
                &permits,
                user_id,
                product_id,
            )
            .await
            {
                Ok(answer) => answer,
                Err(why) => (Err(why), false),
            };
            let accept = Accept {
                user_id,
                outcome,
                sold_out,
            };
            (accept, Instant::now())
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

/// Waits for the release, then sends one `addToCart` request under a permit and judges the
/// answer: the accepted transaction (or why not), and whether it was a valid sold-out answer.
async fn submit(
    client: &Client,
    request: Request,
    released: &mut watch::Receiver<bool>,
    permits: &Semaphore,
    user_id: i64,
    product_id: i64,
) -> Result<(Result<Uuid, String>, bool), String> {
    (released.wait_for(|&go| go).await).map_err(|_| "the release signal was lost".to_owned())?;
    let _permit = (permits.acquire().await).map_err(|_| "the request limiter closed".to_owned())?;
    let response = (client.execute(request).await)
        .map_err(|e| format!("request failed: {:#}", anyhow::Error::new(e)))?;
    let location = header(&response, &LOCATION);
    let retry_after = header(&response, &RETRY_AFTER);
    let (status, body) = (read_body(response).await)
        .map_err(|e| format!("reading the answer failed: {:#}", anyhow::Error::new(e)))?;
    if status == StatusCode::OK && is_sold_out_answer(&body, user_id, product_id) {
        return Ok((Err("sold out".to_owned()), true));
    }
    Ok((
        classify_accept(status, location.as_deref(), retry_after.as_deref(), &body),
        false,
    ))
}

/// Whether `body` is allot's final answer for a sold-out product, echoing the request.
fn is_sold_out_answer(body: &str, user_id: i64, product_id: i64) -> bool {
    let expected = serde_json::json!({"status": REJECTED, "reason": OUT_OF_STOCK,
        "user_id": user_id, "product_id": product_id, "quantity": 1, "final": true});
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|answer| answer == expected)
}

/// Polls the still-pending transactions round after round, with a short pause between rounds,
/// until all are decided or the deadline has passed.
pub async fn poll_until_final(
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

#[cfg(test)]
mod tests {
    use super::*;

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

        let busy = r#"{"error": {"code": "broker_unavailable", "message": "broker did not confirm"}}"#;
        let error = classify_accept(StatusCode::SERVICE_UNAVAILABLE, None, Some("1"), busy)
            .expect_err("503 is no acceptance");
        assert!(error.contains("503"), "{error}");
        assert!(
            error.contains("broker_unavailable: broker did not confirm"),
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
}
