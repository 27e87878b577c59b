//! The shop's calls beyond addToCart: orders of several products, holds and their checkout and
//! cancel, slots and a product's rules. Their answers come back as [`Reply`] (status and JSON
//! body), for the scenario to judge against what it expects; [`Reply::accepted`] and
//! [`Reply::refused`] read the two answers every purchase may get.

use super::{Api, header, snippet};
use anyhow::{Context as _, Result, ensure};
use reqwest::header::RETRY_AFTER;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// One HTTP answer: its status, `Retry-After` if any, and its body as JSON (`Null` when empty
/// or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    pub body: Value,
}

impl Reply {
    /// The transaction id of a valid `202` (`{"transaction_id", "status": "pending"}`).
    pub fn accepted(&self) -> Option<Uuid> {
        if self.status != StatusCode::ACCEPTED || self.body["status"] != "pending" {
            return None;
        }
        self.body["transaction_id"].as_str()?.parse().ok()
    }

    /// The `code` of a `503` with `Retry-After` in the one error shape.
    pub fn refused(&self) -> Option<&str> {
        if self.status != StatusCode::SERVICE_UNAVAILABLE || self.retry_after.is_none() {
            return None;
        }
        self.body["error"]["code"].as_str()
    }

    /// The `code` of an error answer in the one error shape.
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    /// A short description, for a violation.
    pub fn describe(&self) -> String {
        format!("HTTP {} {}", self.status, snippet(&self.body.to_string()))
    }
}

impl Api {
    /// Sends `request` and reads its answer; `Err` when no HTTP answer came.
    async fn reply(&self, request: RequestBuilder) -> Result<Reply, String> {
        let response =
            (request.send().await).map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
        let status = response.status();
        let retry_after = header(&response, &RETRY_AFTER);
        let text = (response.text().await).map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
        Ok(Reply {
            status,
            retry_after,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        })
    }

    /// `POST /api/v1/orders` with `body` (`{"user_id", "items": [...], "hold_seconds"?,
    /// "slot_id"?}`).
    pub async fn place_order(&self, body: &Value) -> Result<Reply, String> {
        let request = self.client.post(self.url("/api/v1/orders")).json(body);
        self.reply(request).await
    }

    /// `POST /api/v1/order/addToCart` with any body (a hold, a slot): the answer as JSON.
    pub async fn add_to_cart_json(&self, body: &Value) -> Result<Reply, String> {
        let request = (self.client.post(self.url("/api/v1/order/addToCart"))).json(body);
        self.reply(request).await
    }

    /// `POST /api/v1/transaction/{id}/checkout`, waiting up to `wait` for its decision.
    pub async fn checkout(&self, id: Uuid, wait: Duration) -> Result<Reply, String> {
        self.settle(id, "checkout", wait).await
    }

    /// `POST /api/v1/transaction/{id}/cancel`, waiting up to `wait` for its decision.
    pub async fn cancel(&self, id: Uuid, wait: Duration) -> Result<Reply, String> {
        self.settle(id, "cancel", wait).await
    }

    async fn settle(&self, id: Uuid, what: &str, wait: Duration) -> Result<Reply, String> {
        let path = format!("/api/v1/transaction/{id}/{what}");
        let request = (self.client.post(self.url(&path)))
            .header("Prefer", format!("wait={}", wait.as_secs()));
        self.reply(request).await
    }

    /// Sends `request` (`what`: its method and path, for the error) and demands exactly
    /// `expected`: the body as JSON.
    async fn expect(
        &self,
        request: RequestBuilder,
        expected: StatusCode,
        what: &str,
    ) -> Result<Value> {
        let reply = (self.reply(request).await).map_err(anyhow::Error::msg)?;
        ensure!(
            reply.status == expected,
            "{what} answered {}",
            reply.describe()
        );
        Ok(reply.body)
    }

    /// `GET /api/v1/transaction/{id}` with `Prefer: wait=N`: exactly `200`, the body as JSON.
    pub async fn transaction_json(&self, id: Uuid, wait: Duration) -> Result<Value> {
        let path = format!("/api/v1/transaction/{id}");
        let request =
            (self.client.get(self.url(&path))).header("Prefer", format!("wait={}", wait.as_secs()));
        self.expect(request, StatusCode::OK, &format!("GET {path}"))
            .await
    }

    /// `GET /api/v1/products/{id}`: exactly `200`, the body as JSON (with `held` and the rules).
    pub async fn product_json(&self, product_id: i64) -> Result<Value> {
        let path = format!("/api/v1/products/{product_id}");
        let request = self.client.get(self.url(&path));
        self.expect(request, StatusCode::OK, &format!("GET {path}"))
            .await
    }

    /// `PATCH /api/v1/products/{id}` (staff) with a merge-patch `body`: exactly `200`.
    pub async fn patch_product(&self, product_id: i64, body: &Value) -> Result<Value> {
        let path = format!("/api/v1/products/{product_id}");
        let request = (self.client.patch(self.url(&path)))
            .bearer_auth(self.token()?)
            .json(body);
        self.expect(request, StatusCode::OK, &format!("PATCH {path}"))
            .await
    }

    /// `POST /api/v1/slots` (staff): exactly `201`; returns the slot's id.
    pub async fn create_slot(&self, name: &str, capacity: i64) -> Result<i64> {
        let request = (self.client.post(self.url("/api/v1/slots")))
            .bearer_auth(self.token()?)
            .json(&json!({"name": name, "capacity": capacity}));
        let body = (self.expect(request, StatusCode::CREATED, "POST /api/v1/slots")).await?;
        body["id"]
            .as_i64()
            .with_context(|| format!("POST /api/v1/slots answered no id: {body}"))
    }

    /// `GET /api/v1/slots/{id}`: exactly `200`, the body as JSON.
    pub async fn slot_json(&self, slot_id: i64) -> Result<Value> {
        let path = format!("/api/v1/slots/{slot_id}");
        let request = self.client.get(self.url(&path));
        self.expect(request, StatusCode::OK, &format!("GET {path}"))
            .await
    }
}
