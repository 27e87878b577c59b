//! The API's settings (`allot-api --help` lists them with their variables).

use allot_shared::CommonConfig;
use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "allot-api",
    version,
    about = "allot's HTTP API: accepts purchase requests and serves their status"
)]
pub struct ApiConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Address the HTTP server listens on.
    #[arg(long, env = "ALLOT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Bearer token the shop's staff present to create and restock products.
    #[arg(
        long,
        env = "ALLOT_ADMIN_TOKEN",
        default_value = "allot-dev-admin-token",
        hide_default_value = true
    )]
    pub admin_token: String,

    /// Largest quantity one purchase request (or one line of an order) may ask for.
    #[arg(long, env = "ALLOT_MAX_QUANTITY", default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub max_quantity: i64,

    /// Longest hold a purchase may ask for (`hold_seconds`), in seconds.
    #[arg(long, env = "ALLOT_MAX_HOLD_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(i64).range(1..=604_800))]
    pub max_hold_seconds: i64,

    /// How long to wait for RabbitMQ to confirm a publish before answering 503 (milliseconds).
    #[arg(long, env = "ALLOT_CONFIRM_TIMEOUT_MS", default_value_t = 5000)]
    pub confirm_timeout_ms: u64,

    /// Confirm-mode channels the API publishes on, in turn.
    #[arg(long, env = "ALLOT_PUBLISH_CHANNELS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publish_channels: u16,

    /// Most purchase requests one broker message carries. The requests that arrive for a
    /// partition while its previous message is in flight travel together in the next one.
    #[arg(long, env = "ALLOT_ENVELOPE_MAX_REQUESTS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub envelope_max_requests: u32,

    /// Most bytes of one broker message's body (a single request always fits).
    #[arg(long, env = "ALLOT_ENVELOPE_MAX_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub envelope_max_bytes: u32,

    /// Messages of one partition in flight at once (published, confirm awaited).
    #[arg(long, env = "ALLOT_ENVELOPES_IN_FLIGHT", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub envelopes_in_flight: u16,

    /// How often the catalogue snapshot (the products sold out, and those with a sale window
    /// or a pause) is re-read from PostgreSQL (milliseconds); a request for a sold-out product,
    /// or outside its sale window, or while it is paused, is answered at once, without the
    /// broker. 0 switches the short-circuit off: every request then goes to the worker.
    #[arg(long, env = "ALLOT_SOLD_OUT_REFRESH_MS", default_value_t = 200)]
    pub sold_out_refresh_ms: u64,

    /// PostgreSQL connections of the API (product endpoints and status fallback).
    #[arg(long, env = "ALLOT_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,

    /// Whether a purchase without a buyer's token may name its buyer in the body (`user_id`,
    /// below 10^15), and an anonymous reader read such transactions by id. `false`: buying
    /// and reading need a token (401 without).
    #[arg(long, env = "ALLOT_ANONYMOUS_BUYERS", default_value_t = true, action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new())]
    pub anonymous_buyers: bool,

    /// Secret the buyers' tokens are signed with (at least 32 characters); every API instance
    /// of a deployment needs the same. Default: derived from ALLOT_ADMIN_TOKEN.
    #[arg(long, env = "ALLOT_TOKEN_SECRET", hide_env_values = true, value_parser = long_secret)]
    pub token_secret: Option<String>,

    /// How long a buyer's token is valid after login (seconds).
    #[arg(long, env = "ALLOT_TOKEN_TTL_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=2_592_000))]
    pub token_ttl_secs: u64,

    /// How often the sessions revoked by logouts on other API instances are read (milliseconds).
    #[arg(long, env = "ALLOT_REVOCATION_REFRESH_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub revocation_refresh_ms: u64,

    /// Logins one username may attempt per minute (a burst of that many, then one every
    /// minute / N).
    #[arg(long, env = "ALLOT_LOGIN_PER_USERNAME_PER_MINUTE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub login_per_username_per_minute: u32,

    /// Logins and sign-ups one client address (an IPv6 /64) may attempt per minute.
    #[arg(long, env = "ALLOT_LOGIN_PER_ADDRESS_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub login_per_address_per_minute: u32,
}

fn long_secret(value: &str) -> Result<String, String> {
    if value.chars().count() >= 32 {
        Ok(value.to_owned())
    } else {
        Err("ALLOT_TOKEN_SECRET must have at least 32 characters".into())
    }
}

impl ApiConfig {
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }

    pub fn envelope_limits(&self) -> crate::intake::EnvelopeLimits {
        crate::intake::EnvelopeLimits {
            max_requests: self.envelope_max_requests as usize,
            max_bytes: self.envelope_max_bytes as usize,
            in_flight: usize::from(self.envelopes_in_flight),
        }
    }

    /// The sold-out refresh period, or `None` when the short-circuit is off.
    pub fn sold_out_refresh(&self) -> Option<Duration> {
        (self.sold_out_refresh_ms > 0).then(|| Duration::from_millis(self.sold_out_refresh_ms))
    }

    /// The key buyer tokens are signed with: from `ALLOT_TOKEN_SECRET`, else from the admin
    /// token (which every instance of a deployment shares already).
    pub fn token_key(&self) -> crate::buyers::tokens::TokenKey {
        let secret = self.token_secret.as_deref().unwrap_or(&self.admin_token);
        crate::buyers::tokens::TokenKey::derive(secret.as_bytes())
    }

    /// Whether the admin token is the built-in development default (worth a warning).
    pub fn uses_default_admin_token(&self) -> bool {
        self.admin_token == "allot-dev-admin-token"
    }
}
