//! `chaos-test`: runs a flash sale on a copy of allot it owns whole, injects every fault allot
//! promises to survive, one after the other, and after each checks the promises against
//! PostgreSQL (and the statuses in Redis):
//!
//! - every id that got a 202 has exactly one final outcome, and none was withdrawn;
//! - request by request (each carries a user id of its own, so its row is found even without
//!   its transaction id): no request answered 503 was sold, none answered sold out or 422 was
//!   recorded, no request has two outcomes, and a request whose answer was lost has an outcome
//!   only if a `kill -9` of the API cut it; so every success is a 202 or such a request;
//! - no stock below zero; per product, units sold == min(demand, initial stock + restocks) and
//!   the stock left is the supply minus the units sold (demand: the 202s, and the requests a
//!   kill cut that a worker decided);
//! - every Redis status is the stored final one (of the 202s and of those requests);
//! - each day's order numbers are exactly 1..N, no gap, no duplicate, N the day's counter, and
//!   only successes are numbered;
//! - bad input (every 25th request) is answered 422 `invalid_body` throughout, and no 202 is
//!   given while the broker or Redis is down;
//! - the shop, bought alongside the sale by a quarter as many shoppers: orders of two products
//!   (listed in either order) and holds of a third product with a place of a slot, each hold
//!   then checked out, cancelled or abandoned (it expires in 2 s). Once every hold has ended:
//!   for each of those products `stock + held + sold == initial stock + restocks` (an order is
//!   all or nothing; a hold's units are counted once, held, sold or back), every product's
//!   `held` and the slot's `taken` and `held` equal the open holds and bookings, every
//!   checkout answered 200 is sold and every cancel answered 200 released.
//!
//! The faults: worker `kill -9` (the other replica takes over, the killed one comes back as a
//! standby), a rolling SIGTERM restart of the workers, RabbitMQ stopped and started, PostgreSQL
//! stopped (or killed) and started, Redis stopped and started, a flood against bounded queues,
//! poison messages, SIGTERM to the API, `kill -9` of the API while batches are in flight (3
//! times, 8 in the long form, with 32 more clients on products that never sell out, so every
//! partition has a message awaiting its confirm), duplicated messages.
//!
//! The cluster form (`--cluster`) runs the same sale on a cluster of three RabbitMQ nodes,
//! with two API instances (the clients spread over both) and three workers, the partition
//! queues replicated on every node: a node `kill -9`ed (the one leading the most partition
//! queues), a node stopped and started, two nodes of three stopped (no majority: no 202) and
//! started one at a time, one API instance `kill -9`ed, one worker `kill -9`ed, and a rolling
//! restart of every node and every instance, one at a time. After each, the same
//! checks; during each, the time until accepts and decisions resume, the longest pause of
//! accepts on one partition and the share of requests refused, measured by probes (see
//! [`faults::node_down`]); while a majority of nodes is up, accepts must go on.
//!
//! It is a scenario over the test kit (`allot_tests`): its services are a private copy
//! ([`allot_tests::system::Services`]: state folder `--state`, port offset `--port-offset`, both
//! its own, started and stopped through `deploy/services.sh`), its requests go through the
//! kit's client, its checks are the kit's invariants plus its own, request by request. It
//! spawns `allot-api` and two `allot-worker`s from the folder of its own binary. Everything it
//! started is stopped on every exit path; `--deadline-secs` bounds the whole run. It exits 1 on
//! any violation.
//!
//! ```text
//! cargo build --release --bins && target/release/chaos-test          # the short form (CI)
//! target/release/chaos-test --long                                    # the long form
//! target/release/chaos-test --cluster [--long]                        # the cluster form
//! ```

mod apps;
mod check;
mod faults;
mod load;
mod system;

use allot_tests::ports::{CHAOS_OFFSET, PortMap};
use allot_tests::system::Services;
use anyhow::{Context as _, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use system::System;

/// Fault injection under load against a private copy of allot; checks the promises in PostgreSQL.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// The long form: more load, several kills and restarts of each kind.
    #[arg(long, env = "ALLOT_CHAOS_LONG")]
    long: bool,

    /// The cluster form: three RabbitMQ nodes, two API instances, three workers, and the
    /// faults of a cluster instead of the single node's.
    #[arg(long, env = "ALLOT_CHAOS_CLUSTER")]
    cluster: bool,

    /// Port offset of the chaos copy (see tests/src/ports.rs). The default puts the service
    /// ports above Linux's ephemeral range (32768-60999), where no outgoing connection can hold
    /// one for a moment while it is being restarted.
    #[arg(long, env = "ALLOT_CHAOS_PORT_OFFSET", default_value_t = CHAOS_OFFSET)]
    port_offset: u16,

    /// State folder of the chaos copy (wiped at the start); default `<repo>/.allot/chaos`.
    #[arg(long, env = "ALLOT_CHAOS_STATE")]
    state: Option<PathBuf>,

    /// Folder of allot-api and allot-worker; default: this binary's folder.
    #[arg(long, env = "ALLOT_CHAOS_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    /// The whole run must end within this many seconds (then everything is stopped).
    #[arg(long, env = "ALLOT_CHAOS_DEADLINE_SECS")]
    deadline_secs: Option<u64>,

    /// Concurrent buyers.
    #[arg(long, default_value_t = 16)]
    clients: usize,

    /// Sale products (one more product is the poison fault's).
    #[arg(long, default_value_t = 4)]
    products: usize,

    /// Units restocked per product at the start of each fault; demand always exceeds them.
    #[arg(long)]
    restock: Option<i64>,

    /// Partition queue length limit (x-max-length), in messages. Small enough that the flood
    /// fills a queue within its window: a lane publishes one batch envelope per confirm, so a
    /// queue grows by messages at the confirm rate, whatever the number of requests they carry
    /// (with 1000, the flood's queues reached 78-757 messages in 60 s on a loaded machine).
    #[arg(long, default_value_t = 200)]
    queue_max_length: i64,

    /// Seconds allowed after a fault's load stops until every accepted request is decided.
    #[arg(long, default_value_t = 120)]
    drain_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    args.restock.get_or_insert(if args.long { 400 } else { 60 });
    let deadline = Duration::from_secs(args.deadline_secs.unwrap_or(
        match (args.long, args.cluster) {
            (true, _) => 1800,
            (false, true) => 600,
            (false, false) => 420,
        },
    ));
    let repo = match std::env::var_os("ALLOT_REPO") {
        Some(repo) => PathBuf::from(repo),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    let repo = repo.canonicalize().unwrap_or(repo);
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| repo.join(".allot/chaos"));
    let nodes = if args.cluster { 3 } else { 1 };
    let ports =
        match PortMap::new(args.port_offset).and_then(|ports| ports.with_rabbitmq_nodes(nodes)) {
            Ok(ports) => ports,
            Err(err) => {
                eprintln!("chaos-test: {err:#}");
                return ExitCode::from(2);
            }
        };
    let services = Services::new(&repo, state, ports).quiet();
    let started = Instant::now();

    let outcome = tokio::select! {
        outcome = tokio::time::timeout(deadline, run(&args, services.clone())) => match outcome {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("the run did not finish within its deadline of {deadline:?}")),
        },
        () = allot_shared::shutdown::signal() => Err(anyhow::anyhow!("interrupted")),
    };
    // The system died with `run` (its processes and services are stopped on drop); should it
    // have failed before owning them, stop what an earlier run may have left.
    if let Err(err) = services.down().await {
        eprintln!("chaos-test: stopping the services failed: {err:#}");
    }
    let took = started.elapsed().as_secs_f64();
    match outcome {
        Ok(0) => {
            println!("\nchaos-test: every promise held through every fault ({took:.0} s)");
            ExitCode::SUCCESS
        }
        Ok(violations) => {
            println!(
                "\nchaos-test: FAILED, {violations} violations ({took:.0} s); logs in {}",
                services.logs().display()
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            println!(
                "\nchaos-test: FAILED: {err:#} ({took:.0} s); logs in {}",
                services.logs().display()
            );
            ExitCode::FAILURE
        }
    }
}

/// The faults in order; returns the number of violations.
async fn run(args: &Args, services: Services) -> Result<usize> {
    let mut system = System::start(args, services)
        .await
        .context("starting the system")?;
    if args.cluster {
        return run_cluster(args, &mut system).await;
    }
    let (kills, restarts, down, api_kills) = if args.long {
        (6, 2, Duration::from_secs(6), 8)
    } else {
        (2, 1, Duration::from_secs(3), 3)
    };
    let mut violations = 0;
    macro_rules! phase {
        ($name:expr, $fault:expr) => {{
            let name = String::from($name);
            let phase = system.begin(&name).await?;
            let mut seen = $fault.with_context(|| format!("injecting: {name}"))?;
            for violation in &seen {
                println!("    VIOLATION: {violation}");
            }
            let checked = system
                .end(phase)
                .await
                .with_context(|| format!("checking after: {name}"))?;
            seen.extend(checked);
            violations += seen.len();
        }};
    }
    phase!(
        format!(
            "worker crash: kill -9 a worker replica mid-sale, {kills} times, and bring it back"
        ),
        faults::worker_crash(&mut system, kills).await
    );
    phase!(
        "worker rolling restart: SIGTERM each replica in turn",
        faults::worker_rolling_restart(&mut system).await
    );
    for round in 0..restarts {
        let kill = round % 2 == 1;
        let how = if kill { "killed (SIGKILL)" } else { "stopped" };
        phase!(
            format!(
                "RabbitMQ {how} for {down:?} and started ({}/{restarts})",
                round + 1
            ),
            faults::broker_restart(&mut system, down, kill).await
        );
    }
    for round in 0..restarts {
        let kill = round % 2 == 1;
        let how = if kill {
            "killed (SIGKILL)"
        } else {
            "stopped (fast shutdown)"
        };
        phase!(
            format!(
                "PostgreSQL {how} for {down:?} and started ({}/{restarts})",
                round + 1
            ),
            faults::postgres_restart(&mut system, down, kill).await
        );
    }
    phase!(
        format!("Redis stopped for {down:?} and started"),
        faults::redis_restart(&mut system, down).await
    );
    phase!(
        "flood: workers stopped, 64 more clients against bounded queues",
        faults::flood(&mut system, args.queue_max_length).await
    );
    phase!(
        "poison: unparseable, unreadable and undecidable messages",
        faults::poison(&mut system).await
    );
    phase!(
        "API SIGTERM during the sale, then restarted",
        faults::api_restart(&mut system).await
    );
    phase!(
        format!("API kill -9 while batches are in flight, {api_kills} times, restarted each time"),
        faults::api_crash(&mut system, api_kills).await
    );
    phase!(
        "duplicates: decided messages published again, fresh ones twice",
        faults::duplicates(&mut system).await
    );
    Ok(violations)
}

/// The cluster form's faults in order; returns the number of violations.
async fn run_cluster(args: &Args, system: &mut System) -> Result<usize> {
    let (node_kills, node_stops, down) = if args.long {
        (3, 2, Duration::from_secs(15))
    } else {
        (1, 1, Duration::from_secs(6))
    };
    let mut violations = 0;
    macro_rules! phase {
        ($name:expr, $fault:expr) => {{
            let name = String::from($name);
            let phase = system.begin(&name).await?;
            let mut seen = $fault.with_context(|| format!("injecting: {name}"))?;
            for violation in &seen {
                println!("    VIOLATION: {violation}");
            }
            let checked = system
                .end(phase)
                .await
                .with_context(|| format!("checking after: {name}"))?;
            seen.extend(checked);
            violations += seen.len();
        }};
    }
    for round in 0..node_kills {
        phase!(
            format!(
                "cluster: kill -9 of the RabbitMQ node leading the most partition queues, {down:?}, then started ({}/{node_kills})",
                round + 1
            ),
            faults::node_down(system, down, true).await
        );
    }
    for round in 0..node_stops {
        phase!(
            format!(
                "cluster: the RabbitMQ node leading the most partition queues stopped for {down:?} and started ({}/{node_stops})",
                round + 1
            ),
            faults::node_down(system, down, false).await
        );
    }
    phase!(
        format!(
            "cluster: two RabbitMQ nodes of three stopped for {down:?} (no majority), then started one at a time"
        ),
        faults::majority_lost(system, down).await
    );
    phase!(
        "cluster: kill -9 of one of two API instances, restarted",
        faults::api_instance_crash(system).await
    );
    phase!(
        "cluster: kill -9 of one of three workers, restarted",
        faults::worker_instance_crash(system).await
    );
    phase!(
        "cluster: rolling restart of every RabbitMQ node, every API instance and every worker, one at a time",
        faults::rolling_restart(system).await
    );
    Ok(violations)
}
