//! What every request handler shares.

use crate::backlog::Backlog;
use crate::buyers::Buyers;
use crate::catalogue::Catalogue;
use crate::config::ApiConfig;
use crate::decisions::Decisions;
use crate::intake::Intake;
use crate::publisher::Publisher;
use allot_shared::status_store::StatusStore;
use allot_shared::{Clock, SystemClock};
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Cheap to clone (one reference count): axum clones the state for every request, and for
/// every layer that extracts it.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state itself, behind [`AppState`].
pub struct Shared {
    /// PostgreSQL: products, and decided transactions when Redis has no status.
    pub pool: PgPool,
    /// Redis: transaction statuses.
    pub statuses: StatusStore,
    /// RabbitMQ: where accepted requests go, in batch envelopes.
    pub publisher: Arc<Publisher>,
    /// The one step from a validated request to accepted or refused.
    pub intake: Arc<Intake>,
    /// Waiters on decisions, woken by the worker's notifications.
    pub decisions: Arc<Decisions>,
    /// Products sold out, outside their sale window or paused at the last refresh: their
    /// requests are answered without the broker.
    pub catalogue: Arc<Catalogue>,
    /// How often `catalogue` is refreshed; `None`: never (the short-circuit is off).
    pub catalogue_refresh: Option<std::time::Duration>,
    /// The time a request is accepted at (its `created_at`, at which a sale window or a pause
    /// is judged), and a pause begins or ends at. The system clock; tests set their own.
    pub clock: Arc<dyn Clock>,
    /// The staff's bearer token.
    pub admin_token: Arc<str>,
    /// Largest quantity one request may ask for.
    pub max_quantity: i64,
    /// Longest hold one request may ask for, in seconds.
    pub max_hold_seconds: i64,
    /// Renders this process's Prometheus metrics.
    pub metrics: PrometheusHandle,
    /// Cancelled when the server starts shutting down, so that long-lived responses (status
    /// event streams) end instead of holding the graceful shutdown open.
    pub shutdown: CancellationToken,
    /// Redis, for what is not a status: idempotency records, accounts' pending transactions.
    pub redis: ConnectionManager,
    /// Accounts, tokens, login limits, `ALLOT_ANONYMOUS_BUYERS`.
    pub buyers: Buyers,
    /// How long a claimed `Idempotency-Key` holds off other attempts.
    pub idempotency_lease: std::time::Duration,
}

impl AppState {
    /// Connects the publisher (declaring the partition queues) and assembles the state around
    /// an already migrated pool and a Redis connection.
    pub async fn build(
        config: &ApiConfig,
        pool: PgPool,
        redis: ConnectionManager,
    ) -> anyhow::Result<Self> {
        Self::build_with_clock(config, pool, redis, Arc::new(SystemClock)).await
    }

    /// [`AppState::build`], with the clock requests are accepted by.
    pub async fn build_with_clock(
        config: &ApiConfig,
        pool: PgPool,
        redis: ConnectionManager,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        // First, so that the publisher's broker metrics are recorded from its first connection.
        let metrics = crate::observe::install_metrics();
        let topology = config.common.topology();
        let backlog = Backlog::new(
            redis.clone(),
            &config.common.redis_prefix,
            &topology,
            crate::backlog::hold_for(config.confirm_timeout()),
        );
        let publisher = Publisher::connect(
            config.common.brokers(),
            topology,
            backlog,
            config.confirm_timeout(),
            usize::from(config.publish_channels),
        )
        .await?;
        let publisher = Arc::new(publisher);
        let statuses = StatusStore::new(redis.clone(), config.common.redis_prefix.clone());
        let intake = Intake::start(
            publisher.clone(),
            statuses.clone(),
            pool.clone(),
            config.envelope_limits(),
        );
        let decisions = Arc::new(Decisions::default());
        let notifications = redis::Client::open(config.common.redis_url.as_str())?;
        decisions
            .clone()
            .spawn_listener(notifications, &config.common.redis_prefix);
        Ok(Self(Arc::new(Shared {
            pool,
            statuses,
            publisher,
            intake: Arc::new(intake),
            decisions,
            catalogue: Arc::new(Catalogue::new(config.sold_out_refresh().is_some())),
            catalogue_refresh: config.sold_out_refresh(),
            clock,
            admin_token: config.admin_token.as_str().into(),
            max_quantity: config.max_quantity,
            max_hold_seconds: config.max_hold_seconds,
            metrics,
            shutdown: CancellationToken::new(),
            redis,
            buyers: Buyers::from_config(config),
            idempotency_lease: crate::idempotency::lease_for(config.confirm_timeout()),
        })))
    }
}
