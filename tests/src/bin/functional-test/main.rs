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
//! Then it runs the shop's sales (`--shop-buyers`, see `shop.rs`): a flash sale of orders of two
//! products listed in both orders (all or nothing, exactly the supply sold), a per-buyer-limit
//! sale (exactly the limit per buyer), and a sale of holds half of whose winners abandon them
//! (their units expire back and are sold to later buyers, none twice).
//!
//! It prints one table row per size (accept throughput, time until all decided, OK/FAIL) with the
//! violations listed under it, then `functional-test: <passed> passed, <failed> failed`. Given
//! `--database-url` (and `--redis-url`), it then checks the promises where they are kept, with
//! the kit's invariants: every day's order numbers exactly 1..N and the day's counter N, no stock
//! below zero, every decided status in Redis equal to PostgreSQL's (`deploy/local.sh test` gives
//! both; the database must be the tested allot's own). The exit code is 1 if anything failed,
//! 0 otherwise.
//!
//! A scenario over the test kit (`allot_tests`): its requests go through the kit's client,
//! which judges every answer strictly.
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

mod check;
mod client;
#[cfg(test)]
mod fixtures;
mod order_number;
mod report;
mod shop;

use std::process::ExitCode;
use std::time::Duration;

use allot_tests::client::{Api, poll_until_final};
use allot_tests::invariants::{self, Statuses};
use anyhow::{Context as _, Result};
use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;
use clap::Parser;
use clap::builder::RangedU64ValueParser;
use uuid::Uuid;

use crate::check::{Observation, check};
use crate::client::fire;
use crate::report::SizeReport;

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

    /// Buyers of each shop sale run after the sizes (an order of two products, a per-buyer
    /// limit, holds abandoned and sold again); 0 runs none.
    #[arg(long, env = "ALLOT_FT_SHOP_BUYERS", default_value_t = 200)]
    shop_buyers: usize,

    /// The tested allot's own PostgreSQL database: check the promises in it after the sizes.
    #[arg(long, env = "ALLOT_FT_DATABASE_URL")]
    database_url: Option<String>,

    /// The tested allot's Redis (with --database-url): its statuses must equal PostgreSQL's.
    #[arg(long, env = "ALLOT_FT_REDIS_URL")]
    redis_url: Option<String>,

    /// The tested allot's Redis key prefix (its ALLOT_REDIS_PREFIX).
    #[arg(long, env = "ALLOT_REDIS_PREFIX", default_value = "allot")]
    redis_prefix: String,
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

/// Today's date in `timezone`.
fn today(timezone: Tz) -> NaiveDate {
    Utc::now().with_timezone(&timezone).date_naive()
}

/// Runs one size: create the product, fire, poll, read the stock, check.
async fn run_size(api: &Api, args: &Args, n: usize) -> Result<SizeReport> {
    let start_date = today(args.timezone);
    let stock = n / 2;
    let name = format!("functional-{n}-{:08x}", Uuid::new_v4().as_u128() as u32);
    let product_id = (api.create_product(&name, i64::try_from(stock)?).await)
        .with_context(|| format!("creating product {name:?}"))?
        .id;

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
    let final_stock = (api.product(product_id).await)
        .map(|product| product.stock)
        .map_err(|e| format!("{e:#}"));

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
    let api = Api::new(
        &args.base_url,
        Some(args.admin_token.clone()),
        args.max_in_flight,
    )
    .context("--base-url")?;
    println!(
        "functional-test against {} (deadline {}s per size, at most {} requests in flight, order dates in {})",
        api.base(),
        args.deadline_secs,
        args.max_in_flight,
        args.timezone
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
    let mut runs = args.sizes.len();
    if args.shop_buyers > 0 {
        let first_user = user_ids(1)[0] + 1_000_000_000;
        for report in shop::run_all(&api, args.shop_buyers.max(8), first_user).await {
            report.print();
            runs += 1;
            if !report.passed() {
                failed += 1;
            }
        }
    }
    println!("functional-test: {} passed, {failed} failed", runs - failed);
    let promises_held = match &args.database_url {
        Some(url) => check_promises(url, args.redis_url.as_deref(), &args.redis_prefix).await?,
        None => true,
    };
    Ok(failed == 0 && promises_held)
}

/// The kit's invariants over the whole database (and Redis); prints what was checked.
async fn check_promises(database_url: &str, redis_url: Option<&str>, prefix: &str) -> Result<bool> {
    let pool = sqlx::PgPool::connect(database_url)
        .await
        .context("connecting to --database-url")?;
    let mut redis = match redis_url {
        Some(url) => Some(
            redis::aio::ConnectionManager::new(redis::Client::open(url)?)
                .await
                .context("connecting to --redis-url")?,
        ),
        None => None,
    };
    let statuses = redis.as_mut().map(|redis| Statuses { redis, prefix });
    let checked = invariants::whole_database(&pool, statuses).await?;
    if checked.violations.is_empty() {
        println!("functional-test: promises hold in the database: {checked}");
        return Ok(true);
    }
    println!("functional-test: promises broken in the database:");
    for violation in &checked.violations {
        println!("        - {violation}");
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

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
        assert_eq!(args.shop_buyers, 200);

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
