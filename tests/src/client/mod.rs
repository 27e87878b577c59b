//! The typed black-box client of allot's HTTP API, the one every test, scenario and tool uses:
//! each call returns a typed answer, judged strictly against the README ([`Answer`] for
//! `addToCart`; the other calls fail with a description of whatever was not the promised
//! answer). Clients tell refusals apart by their `code` ([`Unavailable`]), never by the message.

mod answer;
mod poll;
mod shop;
pub mod wire;

pub use answer::{Answer, Unavailable, describe_failure, snippet};
pub use poll::{Polled, poll_until_final};
pub use shop::Reply;
pub use wire::{Order, Product, Transaction};

use anyhow::{Context as _, Result, ensure};
use reqwest::header::{HeaderName, LOCATION, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};
use serde::de::DeserializeOwned;
use std::time::Duration;
use uuid::Uuid;
use wire::NewProduct;

/// Longer than the API's own request timeout (15 s), so that the API always answers first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One allot API: its base URL, the staff's token, one shared connection pool.
#[derive(Clone)]
pub struct Api {
    client: Client,
    base: String,
    admin_token: Option<String>,
}

impl Api {
    /// A client of `base_url` (`http://host:port`, plain http) keeping up to `max_idle`
    /// connections open.
    pub fn new(base_url: &str, admin_token: Option<String>, max_idle: usize) -> Result<Api> {
        let client = Client::builder()
            .pool_max_idle_per_host(max_idle)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Self::with_client(client, base_url, admin_token)
    }

    /// A client of `base_url` over an existing reqwest client.
    pub fn with_client(client: Client, base_url: &str, admin_token: Option<String>) -> Result<Api> {
        let base = base_url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).with_context(|| format!("invalid URL {base:?}"))?;
        ensure!(
            url.scheme() == "http",
            "{base:?} must be a plain http:// URL"
        );
        Ok(Api {
            client,
            base,
            admin_token,
        })
    }

    /// `http://host:port`, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn token(&self) -> Result<&str> {
        self.admin_token
            .as_deref()
            .context("this call needs the admin token")
    }

    /// `POST /api/v1/order/addToCart`, judged.
    pub async fn add_to_cart(&self, order: Order) -> Answer {
        let sent = self
            .client
            .post(self.url("/api/v1/order/addToCart"))
            .json(&order)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => return Answer::Unanswered(format!("{:#}", anyhow::Error::new(err))),
        };
        let location = header(&response, &LOCATION);
        let retry_after = header(&response, &RETRY_AFTER);
        let status = response.status();
        match response.text().await {
            Ok(body) => Answer::judge(
                &order,
                status,
                location.as_deref(),
                retry_after.as_deref(),
                &body,
            ),
            Err(err) => Answer::Unanswered(format!(
                "reading the answer failed: {:#}",
                anyhow::Error::new(err)
            )),
        }
    }

    /// `POST /api/v1/products` (staff): exactly `201` with the product as created.
    pub async fn create_product(&self, name: &str, stock: i64) -> Result<Product> {
        self.create_sharded_product(name, stock, 1).await
    }

    /// `POST /api/v1/products` (staff) of a product spread over `shards` partitions: exactly
    /// `201` with the product, its stock and its shards (shown only above 1).
    pub async fn create_sharded_product(
        &self,
        name: &str,
        stock: i64,
        shards: u16,
    ) -> Result<Product> {
        let body = NewProduct {
            name,
            stock,
            shards: (shards != 1).then_some(shards),
        };
        let response = (self.client.post(self.url("/api/v1/products")))
            .bearer_auth(self.token()?)
            .json(&body)
            .send()
            .await;
        let product: Product =
            expect(response, StatusCode::CREATED, "POST /api/v1/products").await?;
        let shown = (shards > 1).then_some(i64::from(shards));
        ensure!(
            product.name == name.trim() && product.stock == stock && product.shards == shown,
            "POST /api/v1/products for {name:?} with stock {stock} and {shards} shard(s) created \
             {:?} with stock {} and shards {:?}",
            product.name,
            product.stock,
            product.shards
        );
        Ok(product)
    }

    /// `POST /api/v1/products/{id}/restock` (staff): exactly `200` with the product.
    pub async fn restock(&self, product_id: i64, quantity: i64) -> Result<Product> {
        let path = format!("/api/v1/products/{product_id}/restock");
        let response = (self.client.post(self.url(&path)))
            .bearer_auth(self.token()?)
            .json(&serde_json::json!({"quantity": quantity}))
            .send()
            .await;
        let product: Product = expect(response, StatusCode::OK, &format!("POST {path}")).await?;
        ensure!(
            product.id == product_id,
            "POST {path} answered product {}",
            product.id
        );
        Ok(product)
    }

    /// `GET /api/v1/products/{id}`: exactly `200` with the product.
    pub async fn product(&self, product_id: i64) -> Result<Product> {
        let path = format!("/api/v1/products/{product_id}");
        let response = self.client.get(self.url(&path)).send().await;
        expect(response, StatusCode::OK, &format!("GET {path}")).await
    }

    /// `GET /api/v1/transaction/{id}`: exactly `200` with the transaction.
    pub async fn transaction(&self, id: Uuid) -> Result<Transaction> {
        let path = format!("/api/v1/transaction/{id}");
        let response = self.client.get(self.url(&path)).send().await;
        expect(response, StatusCode::OK, &format!("GET {path}")).await
    }

    /// Whether `/readyz` answers `200` (within 2 s).
    pub async fn ready(&self) -> bool {
        let answer = (self.client.get(self.url("/readyz")))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        matches!(answer, Ok(response) if response.status() == StatusCode::OK)
    }
}

/// The body of `response` as `T` if its status is `expected`, else what it was instead.
async fn expect<T: DeserializeOwned>(
    response: reqwest::Result<Response>,
    expected: StatusCode,
    what: &str,
) -> Result<T> {
    let response = response.with_context(|| what.to_owned())?;
    let status = response.status();
    let retry_after = header(&response, &RETRY_AFTER);
    let body = (response.text().await).with_context(|| format!("reading the {what} answer"))?;
    ensure!(
        status == expected,
        "{what} answered {}",
        describe_failure(status, retry_after.as_deref(), &body)
    );
    serde_json::from_str(&body).with_context(|| format!("{what} answered {}", snippet(&body)))
}

fn header(response: &Response, name: &HeaderName) -> Option<String> {
    let value = response.headers().get(name)?;
    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
}
