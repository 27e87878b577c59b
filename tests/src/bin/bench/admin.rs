//! The staff endpoints the bench needs (creating the hot product, restocking it), over reqwest:
//! set-up calls, not measured.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use std::net::SocketAddr;

pub struct Admin {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// The socket address of a `http://127.0.0.1:PORT` base URL (the load generator connects to it
/// directly). Only loopback addresses are accepted: the bench never targets another machine.
pub fn socket_addr(base_url: &str) -> Result<SocketAddr> {
    let url = reqwest::Url::parse(base_url).with_context(|| format!("invalid URL {base_url:?}"))?;
    ensure!(
        url.scheme() == "http",
        "{base_url:?} must be a plain http:// URL"
    );
    let addr: SocketAddr = format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(80)
    )
    .parse()
    .with_context(|| format!("{base_url:?} must name an IP address"))?;
    ensure!(
        addr.ip().is_loopback(),
        "the bench only targets loopback addresses, not {addr}"
    );
    Ok(addr)
}

impl Admin {
    pub fn new(base_url: &str, token: &str) -> Result<Self> {
        Ok(Self {
            client: reqwest::Client::new(),
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// `POST /api/v1{path}` with the staff token; the answer's JSON, or an error unless 2xx.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = self
            .client
            .post(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let text = response.text().await?;
        ensure!(status.is_success(), "POST {path} answered {status}: {text}");
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn create_product(&self, name: &str, stock: i64) -> Result<i64> {
        let product = self
            .post("/products", json!({"name": name, "stock": stock}))
            .await?;
        product["id"].as_i64().context("no product id")
    }

    pub async fn restock(&self, product: i64, quantity: i64) -> Result<()> {
        self.post(
            &format!("/products/{product}/restock"),
            json!({"quantity": quantity}),
        )
        .await?;
        Ok(())
    }
}
