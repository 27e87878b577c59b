//! `bench`: allot's benchmark. Runs, against a running allot, the scenarios of issue 4 and, in
//! the same run, the reference designs it is measured against, then prints every figure and the
//! ratios the targets are stated in.
//!
//! 1. References, each in a child process (`bench --serve-reference KIND`): a bare axum 202,
//!    axum + one confirmed persistent publish to a quorum queue, and the naive hot-row `UPDATE`.
//! 2. Accept path: closed loop (fixed connections) and open loop (fixed arrival rate, latency
//!    from the intended send time), then a closed loop at few connections (20), then requests
//!    with `Prefer: wait=5` under the closed-loop accept load (final answer against
//!    accept-to-decided of the same requests).
//! 3. Flash sale on one hot product, then requests for the sold-out product, then a restock.
//! 4. Wide catalogue: uniform random requests over many products, backlog sampled.
//! 5. One hot product spread over 1, 2 and 4 partitions (`shards`): its decisions/s with each
//!    (`hot.rs`; `--only hot` runs this scenario alone).
//! 6. Resident memory of allot-api and allot-worker (`--api-pid`, `--worker-pid`), and the CPU
//!    each component (allot-api, allot-worker, RabbitMQ, PostgreSQL, Redis, the bench itself)
//!    used per request in the accept and wide scenarios (`cost.rs`; docs/scaling.md's inputs).
//! 7. With `--chart PATH`, the accept phases' latency percentiles as an SVG picture.
//!
//! Correctness is asserted: everything accepted decided, succeeded == stock and stock 0 after
//! the flash sale, and the kit's invariants over the whole database (every day's order numbers
//! exactly 1..N and its counter N, no stock below zero, and with `--redis-url` every decided
//! status in Redis equal to PostgreSQL's); the exit code is 1 if any check failed. Timing
//! targets are reported, never asserted (`--smoke` runs everything tiny, for CI). Needs a fresh
//! allot database: the checks read every row in it. `deploy/local.sh bench` does all of this.
//!
//! A scenario over the test kit (`allot_tests`): its load generator, its client, its invariants.

mod chart;
mod cost;
mod db;
mod hot;
mod refserver;
mod report;
mod rss;
mod scenarios;

use allot_tests::client::Api;
use allot_tests::invariants::{self, Statuses};
use allot_tests::load;
use allot_tests::ports::{BENCH_NAIVE_DATABASE, Deployment, PortMap};
use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// allot's benchmark (see the module documentation, or docs/benchmarks.md).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of the allot API under test (plain http, 127.0.0.1 only).
    #[arg(long, env = "ALLOT_BASE_URL", default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// Bearer token of the admin endpoints.
    #[arg(
        long,
        env = "ALLOT_ADMIN_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    admin_token: String,
    /// allot's database (a fresh one), for the correctness checks and decision times.
    #[arg(long, env = "ALLOT_DATABASE_URL", default_value_t = PortMap::default().database_url(Deployment::Bench.database()))]
    database_url: String,
    /// allot's Redis: every decided status must equal PostgreSQL's (not checked without it).
    #[arg(long, env = "ALLOT_REDIS_URL")]
    redis_url: Option<String>,
    /// allot's Redis key prefix (its ALLOT_REDIS_PREFIX).
    #[arg(long, env = "ALLOT_REDIS_PREFIX", default_value = "allot")]
    redis_prefix: String,
    /// RabbitMQ, for the publish reference (it uses a queue `bench.reference`).
    #[arg(long, env = "ALLOT_AMQP_URL", default_value_t = PortMap::default().amqp_url(Deployment::Bench.vhost()))]
    amqp_url: String,
    /// The naive design's own database (it creates its table there).
    #[arg(long, env = "ALLOT_BENCH_NAIVE_DATABASE_URL", default_value_t = PortMap::default().database_url(BENCH_NAIVE_DATABASE))]
    naive_database_url: String,
    /// Where the reference servers listen.
    #[arg(long, env = "ALLOT_BENCH_REFERENCE_ADDR", default_value_t = default_reference_addr())]
    reference_addr: SocketAddr,
    /// pid of allot-api, to sample its memory.
    #[arg(long)]
    api_pid: Option<u32>,
    /// pid of allot-worker, to sample its memory.
    #[arg(long)]
    worker_pid: Option<u32>,
    /// The worker's HTTP server (its `/metrics` tells the requests per database transaction).
    #[arg(long)]
    worker_url: Option<String>,
    /// Partitions allot runs with (one accept-scenario product per partition).
    #[arg(long, env = "ALLOT_PARTITIONS", default_value_t = 16)]
    partitions: u16,
    /// Seconds each timed phase runs.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Connections of the closed and open loops.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Connections of the second, lightly loaded accept phase (allot and the naive design).
    #[arg(long, default_value_t = 20)]
    low_connections: usize,
    /// Connections sending `Prefer: wait=5`, besides the accept load of `--connections`.
    #[arg(long, default_value_t = 10)]
    wait_connections: usize,
    /// Open-loop rate as a fraction of the accept scenario's closed-loop rate.
    #[arg(long, default_value_t = 0.7)]
    open_fraction: f64,
    /// Requests of the flash sale.
    #[arg(long, default_value_t = 100_000)]
    flash_requests: u64,
    /// Stock of the flash sale's product.
    #[arg(long, default_value_t = 10_000)]
    flash_stock: i64,
    /// Products of the wide catalogue.
    #[arg(long, default_value_t = 10_000)]
    wide_products: i64,
    /// Tiny everything (1 s phases, 20 connections, 5 for the few-connection phase, 4 waiting,
    /// 2,000 flash requests for 200 units, 200 products): checks that the whole benchmark
    /// works, for CI. Figures are meaningless.
    #[arg(long)]
    smoke: bool,
    /// Write the accept phases' latency percentiles (allot against the references) to this SVG
    /// file (`deploy/local.sh bench` writes docs/bench-latency.svg).
    #[arg(long)]
    chart: Option<std::path::PathBuf>,
    /// Run only this scenario (`accept`, `flash`, `wide`, or `hot`: one hot product over 1, 2
    /// and 4 shards), without the references and the other scenarios; e.g. to profile allot
    /// while it runs.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Internal: serve a reference design (the bench spawns itself with this).
    #[arg(long, value_enum, hide = true)]
    serve_reference: Option<refserver::Kind>,
}

/// A scenario that can run alone (`--only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    /// One hot product over 1, 2 and 4 shards.
    Hot,
    /// The accept scenario (closed loop, open loop, few connections), with its CPU cost.
    Accept,
    /// The flash sale on one hot partition.
    Flash,
    /// The wide catalogue, with its CPU cost.
    Wide,
}

/// The sizes of one run.
pub struct Settings {
    pub partitions: u16,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub low_connections: usize,
    pub wait_connections: usize,
    pub open_fraction: f64,
    pub flash_requests: u64,
    pub flash_stock: i64,
    pub wide_products: i64,
}

impl Settings {
    fn from(args: &Args) -> Self {
        if args.smoke {
            return Self {
                partitions: args.partitions,
                duration: Duration::from_secs(1),
                warmup: Duration::from_millis(200),
                connections: 20,
                low_connections: 5,
                wait_connections: 4,
                open_fraction: 0.5,
                flash_requests: 2_000,
                flash_stock: 200,
                wide_products: 200,
            };
        }
        Self {
            partitions: args.partitions,
            duration: Duration::from_secs(args.duration_secs),
            warmup: Duration::from_secs(2),
            connections: args.connections,
            low_connections: args.low_connections,
            wait_connections: args.wait_connections,
            open_fraction: args.open_fraction,
            flash_requests: args.flash_requests,
            flash_stock: args.flash_stock,
            wide_products: args.wide_products,
        }
    }
}

fn default_reference_addr() -> SocketAddr {
    (PortMap::default().bench_reference_addr().parse()).expect("the port map's address parses")
}

/// The socket address of a `http://127.0.0.1:PORT` base URL (the load generator connects to it
/// directly). Only loopback addresses are accepted: the bench never targets another machine.
fn socket_addr(base_url: &str) -> Result<SocketAddr> {
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

/// What the scenarios share.
pub struct Bench {
    pub addr: SocketAddr,
    pub pool: PgPool,
    /// The set-up calls (creating and restocking products): the kit's client, not measured.
    pub admin: Api,
    /// Correctness violations; any fails the run.
    pub failures: Vec<String>,
}

impl Bench {
    pub fn expect(&mut self, holds: bool, violation: String) {
        if !holds {
            eprintln!("VIOLATION: {violation}");
            self.failures.push(violation);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = match args.serve_reference {
        Some(kind) => runtime.block_on(refserver::serve(
            kind,
            args.reference_addr,
            &args.amqp_url,
            &args.naive_database_url,
        )),
        None => runtime.block_on(run(args)).map(|failures| {
            if failures.is_empty() {
                println!("bench: correctness checks 1 passed, 0 failed");
                return;
            }
            println!("bench: correctness checks 0 passed, 1 failed");
            for failure in &failures {
                println!("  violation: {failure}");
            }
            std::process::exit(1);
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Vec<String>> {
    let settings = Settings::from(&args);
    let addr = socket_addr(&args.base_url)?;
    let pool = PgPool::connect(&args.database_url)
        .await
        .context("connecting to allot's database")?;
    let mut bench = Bench {
        addr,
        pool,
        admin: Api::new(&args.base_url, Some(args.admin_token.clone()), 4)?,
        failures: Vec::new(),
    };
    let memory: Vec<rss::Watched> = [
        ("allot-api", args.api_pid),
        ("allot-worker", args.worker_pid),
    ]
    .into_iter()
    .filter_map(|(name, pid)| pid.map(|pid| rss::Watched::start(name, pid)))
    .collect();

    println!(
        "bench: {} phases of {:?}, {} connections (and {}; {} with Prefer: wait){}",
        if args.smoke { "smoke" } else { "full" },
        settings.duration,
        settings.connections,
        settings.low_connections,
        settings.wait_connections,
        if args.smoke {
            " (figures meaningless)"
        } else {
            ""
        }
    );
    let components = cost::Components {
        api: args.api_pid,
        worker: args.worker_pid,
    };
    if let Some(only) = args.only {
        // One scenario alone, e.g. to profile one process while it runs.
        match only {
            Only::Hot => hot::report(&hot::run(&mut bench, &settings).await?),
            Only::Accept => {
                accept_scenario(&mut bench, &settings, &components).await?;
            }
            Only::Flash => report::flash(&scenarios::flash(&mut bench, &settings).await?),
            Only::Wide => {
                wide_scenario(&mut bench, &settings, &components).await?;
            }
        }
        check_promises(&args, &mut bench).await?;
        return Ok(bench.failures);
    }
    let mut references = Vec::new();
    for (kind, connections) in [
        (refserver::Kind::Bare, &[settings.connections][..]),
        (refserver::Kind::Publish, &[settings.connections]),
        (
            refserver::Kind::Naive,
            &[settings.connections, settings.low_connections],
        ),
    ] {
        for reference in reference(&args, kind, connections, &settings).await? {
            report::load_line(&reference.name(), &reference.tally);
            references.push(reference);
        }
    }
    let accept = accept_scenario(&mut bench, &settings, &components).await?;
    let wait = scenarios::wait(&mut bench, &settings).await?;
    report::wait(&wait);
    let flash = scenarios::flash(&mut bench, &settings).await?;
    report::flash(&flash);
    let wide = wide_scenario(&mut bench, &settings, &components).await?;
    let hot = hot::run(&mut bench, &settings).await?;
    hot::report(&hot);
    check_promises(&args, &mut bench).await?;
    report::batching(&args.base_url, args.worker_url.as_deref()).await;
    report::memory(&memory);
    report::targets(&references, &accept, &wait, &flash, &wide, &memory);
    if let Some(path) = &args.chart {
        let title = format!(
            "allot accept latency{}",
            if args.smoke {
                " (smoke run: figures meaningless)"
            } else {
                ""
            }
        );
        chart::write(path, &title, &references, &accept, &wait)
            .with_context(|| format!("writing the chart {}", path.display()))?;
        println!("chart: {}", path.display());
    }
    Ok(bench.failures)
}

/// The accept scenario, its report and the CPU each component spent per accepted request.
async fn accept_scenario(
    bench: &mut Bench,
    settings: &Settings,
    components: &cost::Components,
) -> Result<scenarios::Accept> {
    let before = components.snapshot();
    let accept = scenarios::accept(bench, settings).await?;
    report::accept(&accept);
    let accepted = [&accept.closed, &accept.open, &accept.low]
        .iter()
        .map(|tally| tally.statuses.get(&202).copied().unwrap_or(0))
        .sum();
    before
        .cost_until(&components.snapshot(), accepted)
        .print("the accept scenario (every request accepted and decided)");
    Ok(accept)
}

/// The wide catalogue, its report and the CPU each component spent per decided request.
async fn wide_scenario(
    bench: &mut Bench,
    settings: &Settings,
    components: &cost::Components,
) -> Result<scenarios::Wide> {
    let before = components.snapshot();
    let wide = scenarios::wide(bench, settings).await?;
    report::wide(&wide, settings.partitions);
    before
        .cost_until(&components.snapshot(), wide.decisions.count)
        .print("the wide catalogue (10,000 products; per decided request)");
    Ok(wide)
}

/// The kit's invariants over the whole database (and, with `--redis-url`, every decided status
/// in Redis); each violation fails the run.
async fn check_promises(args: &Args, bench: &mut Bench) -> Result<()> {
    let mut redis = match &args.redis_url {
        Some(url) => Some(
            redis::aio::ConnectionManager::new(redis::Client::open(url.as_str())?)
                .await
                .context("connecting to allot's Redis")?,
        ),
        None => None,
    };
    let statuses = redis.as_mut().map(|redis| Statuses {
        redis,
        prefix: &args.redis_prefix,
    });
    match invariants::whole_database(&bench.pool, statuses).await {
        Ok(checked) => {
            for violation in &checked.violations {
                bench.expect(false, violation.clone());
            }
            println!("promises: {checked}");
        }
        Err(err) => bench.expect(false, format!("{err:#}")),
    }
    Ok(())
}

/// Runs one reference design in a child process and loads it like allot's accept path, with
/// each of `connections` in turn (one warm-up, before the first).
async fn reference(
    args: &Args,
    kind: refserver::Kind,
    connections: &[usize],
    s: &Settings,
) -> Result<Vec<refserver::Measured>> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve-reference")
        .arg(kind.name())
        .arg("--reference-addr")
        .arg(args.reference_addr.to_string())
        .arg("--amqp-url")
        .arg(&args.amqp_url)
        .arg("--naive-database-url")
        .arg(&args.naive_database_url)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning a reference server")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(args.reference_addr)
        .await
        .is_err()
    {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("reference server {} exited: {status}", kind.name());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "reference server {} did not listen",
            kind.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load = load::Load::new(
        args.reference_addr,
        refserver::PATH,
        Arc::new(|i| {
            bytes::Bytes::from(format!(
                r#"{{"user_id":{},"product_id":1,"quantity":1}}"#,
                i + 1
            ))
        }),
    );
    let counter = Arc::new(AtomicU64::new(0));
    let first = connections.first().copied().unwrap_or(s.connections);
    load::closed_loop(&load, first, u64::MAX, s.warmup, counter.clone()).await;
    let mut measured = Vec::new();
    for &connections in connections {
        let tally =
            load::closed_loop(&load, connections, u64::MAX, s.duration, counter.clone()).await;
        measured.push(refserver::Measured {
            kind,
            connections,
            tally,
        });
    }
    child.kill().await.ok();
    if kind == refserver::Kind::Publish {
        let (connection, channel) = refserver::open_channel(&args.amqp_url).await?;
        channel
            .queue_delete(refserver::REFERENCE_QUEUE.into(), Default::default())
            .await?;
        connection.close(200, "done".into()).await.ok();
    }
    Ok(measured)
}
