//! The few HTTP calls the chaos test makes to allot-api, each judged strictly: the exact status
//! codes the README promises, `Retry-After` on every 503, one error shape.

use anyhow::{Context as _, Result, ensure};
use reqwest::header::{LOCATION, RETRY_AFTER};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// Longer than the API's own request timeout (15 s), so the API always answers first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How one `addToCart` was answered.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 202 with a pending transaction and a matching `Location`.
    Accepted(Uuid),
    /// 503 with `Retry-After` and a documented code; `queue_full` when that code says so.
    Refused { queue_full: bool },
    /// 200 `rejected` `out_of_stock` with `"final": true`: the API's sold-out short-circuit, a
    /// final answer that records nothing (no transaction id).
    SoldOut,
    /// 422 `invalid_body`, for the deliberately bad requests.
    Invalid,
    /// No HTTP answer (the API is down or restarting).
    Unanswered,
    /// Anything else: a broken promise, described.
    Unexpected(String),
}

pub struct Api {
    client: Client,
    base: String,
    admin_token: String,
}

impl Api {
    pub fn new(addr: &str, admin_token: String) -> Result<Api> {
        let client = Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Api {
            client,
            base: format!("http://{addr}"),
            admin_token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST addToCart` with quantity 1 (or 0, a request that must be refused with 422).
    pub async fn add_to_cart(&self, user_id: i64, product_id: i64, quantity: i64) -> Answer {
        let body = json!({"user_id": user_id, "product_id": product_id, "quantity": quantity});
        let response = match (self.client.post(self.url("/api/v1/order/addToCart")))
            .json(&body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(_) => return Answer::Unanswered,
        };
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = response.headers().contains_key(RETRY_AFTER);
        let text = match response.text().await {
            Ok(text) => text,
            Err(_) => return Answer::Unanswered,
        };
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match status {
            StatusCode::ACCEPTED => {
                let id = json["transaction_id"].as_str().and_then(|s| s.parse().ok());
                match id {
                    Some(id)
                        if json["status"] == "pending"
                            && location.as_deref()
                                == Some(&*format!("/api/v1/transaction/{id}")) =>
                    {
                        Answer::Accepted(id)
                    }
                    _ => Answer::Unexpected(format!(
                        "a malformed 202: {text} (location {location:?})"
                    )),
                }
            }
            StatusCode::SERVICE_UNAVAILABLE
                if retry_after
                    && ["queue_full", "broker_unavailable", "redis_unavailable", "timeout"]
                        .contains(&json["error"]["code"].as_str().unwrap_or_default()) =>
            {
                // The reason is the code; the message is for people and never read.
                Answer::Refused {
                    queue_full: json["error"]["code"] == "queue_full",
                }
            }
            StatusCode::OK
                if quantity > 0
                    && json["status"] == "rejected"
                    && json["reason"] == "out_of_stock"
                    && json["final"] == true
                    && json.get("transaction_id").is_none() =>
            {
                Answer::SoldOut
            }
            StatusCode::UNPROCESSABLE_ENTITY
                if quantity == 0 && json["error"]["code"] == "invalid_body" =>
            {
                Answer::Invalid
            }
            _ => Answer::Unexpected(format!(
                "{status} (Retry-After {retry_after}) for quantity {quantity}: {text}"
            )),
        }
    }

    /// `GET` a transaction: its status code and body.
    pub async fn transaction(&self, id: Uuid) -> Result<(StatusCode, Value)> {
        let response = (self
            .client
            .get(self.url(&format!("/api/v1/transaction/{id}"))))
        .send()
        .await?;
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn create_product(&self, name: &str, stock: i64) -> Result<i64> {
        let response = (self.client.post(self.url("/api/v1/products")))
            .bearer_auth(&self.admin_token)
            .json(&json!({"name": name, "stock": stock}))
            .send()
            .await?;
        ensure!(
            response.status() == StatusCode::CREATED,
            "creating a product answered {}",
            response.status()
        );
        let body: Value = response.json().await?;
        body["id"].as_i64().context("a created product has an id")
    }

    pub async fn restock(&self, product_id: i64, quantity: i64) -> Result<()> {
        let response = (self
            .client
            .post(self.url(&format!("/api/v1/products/{product_id}/restock"))))
        .bearer_auth(&self.admin_token)
        .json(&json!({"quantity": quantity}))
        .send()
        .await?;
        ensure!(
            response.status() == StatusCode::OK,
            "restocking product {product_id} answered {}",
            response.status()
        );
        Ok(())
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        matches!(
            self.client.get(self.url("/readyz")).timeout(Duration::from_secs(2)).send().await,
            Ok(response) if response.status() == StatusCode::OK
        )
    }
}
