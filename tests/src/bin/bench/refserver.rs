//! The reference designs, served by `bench ref-server` in a child process of its own, so that
//! they compete for the CPU with the load generator the way allot's API does:
//!
//! - `bare`: axum answering 202 with a small JSON, touching nothing (the ceiling of HTTP alone);
//! - `publish`: axum plus one persistent publish to a quorum queue, the confirm awaited on one
//!   shared confirm channel, then 202 (the ceiling of "accept through the broker");
//! - `naive`: what users reach for: one `UPDATE ... SET stock = stock - $q WHERE id = $id AND
//!   stock >= $q RETURNING` per request on one hot row, sqlx pool of 20, in a database of its own.

use anyhow::{Context as _, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::net::SocketAddr;
use std::sync::Arc;

/// The quorum queue of the publish reference (deleted before and after a run).
pub const REFERENCE_QUEUE: &str = "bench.reference";
/// The path every reference serves, the same as allot's.
pub const PATH: &str = "/api/v1/order/addToCart";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Bare,
    Publish,
    Naive,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bare => "bare",
            Kind::Publish => "publish",
            Kind::Naive => "naive",
        }
    }
}

/// One closed-loop measurement of a reference design.
pub struct Measured {
    pub kind: Kind,
    pub connections: usize,
    pub tally: allot_tests::load::Tally,
}

impl Measured {
    /// `reference naive 20 conns`.
    pub fn name(&self) -> String {
        format!("reference {} {} conns", self.kind.name(), self.connections)
    }
}

/// Serves `kind` on `addr` until killed.
pub async fn serve(kind: Kind, addr: SocketAddr, amqp_url: &str, naive_db: &str) -> Result<()> {
    let router = match kind {
        Kind::Bare => Router::new().route(PATH, post(bare)),
        Kind::Publish => Router::new()
            .route(PATH, post(publish))
            .with_state(Arc::new(publish_channel(amqp_url).await?)),
        Kind::Naive => Router::new()
            .route(PATH, post(naive))
            .with_state(naive_pool(naive_db).await?),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    axum::serve(listener, router).await?;
    Ok(())
}

const ACCEPTED: &str =
    r#"{"transaction_id":"01a20115-940a-7103-84d0-01f4c76444b1","status":"pending"}"#;

fn accepted() -> impl IntoResponse {
    (
        StatusCode::ACCEPTED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        ACCEPTED,
    )
}

async fn bare() -> impl IntoResponse {
    accepted()
}

/// Opens the reference's one confirm channel and a fresh quorum queue.
pub async fn open_channel(amqp_url: &str) -> Result<(Connection, Channel)> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

async fn publish_channel(amqp_url: &str) -> Result<Channel> {
    let (connection, channel) = open_channel(amqp_url).await?;
    channel
        .queue_delete(REFERENCE_QUEUE.into(), Default::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            REFERENCE_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // The connection lives as long as the process.
    std::mem::forget(connection);
    Ok(channel)
}

async fn publish(State(channel): State<Arc<Channel>>, body: Bytes) -> impl IntoResponse {
    let confirm = channel
        .basic_publish(
            "".into(),
            REFERENCE_QUEUE.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    match confirm {
        Ok(confirm) => match confirm.await {
            Ok(Confirmation::Ack(_)) => accepted().into_response(),
            _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        },
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// The naive design's table, one hot row with practically endless stock (so every request
/// takes the row lock and writes).
async fn naive_pool(url: &str) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect(url)
        .await
        .context("connecting to the naive design's database")?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS products (id BIGINT PRIMARY KEY, stock BIGINT NOT NULL CHECK (stock >= 0)); \
         INSERT INTO products (id, stock) VALUES (1, 1000000000000) \
         ON CONFLICT (id) DO UPDATE SET stock = EXCLUDED.stock",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}

#[derive(Deserialize)]
struct Order {
    quantity: i64,
}

async fn naive(
    State(pool): State<PgPool>,
    axum::Json(order): axum::Json<Order>,
) -> impl IntoResponse {
    let updated: Result<Option<i64>, _> = sqlx::query_scalar(
        "UPDATE products SET stock = stock - $1 WHERE id = 1 AND stock >= $1 RETURNING stock",
    )
    .bind(order.quantity)
    .fetch_optional(&pool)
    .await;
    match updated {
        Ok(Some(_)) => accepted().into_response(),
        Ok(None) => (StatusCode::OK, r#"{"status":"rejected"}"#).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
