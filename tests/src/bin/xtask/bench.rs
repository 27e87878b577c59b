//! `bench [--smoke] [bench flags]`: the benchmark (tests/src/bin/bench) against a fresh allot
//! of its own (the `Bench` deployment: database, vhost, Redis database, ports), with the naive
//! reference design's database beside it; everything is stopped when it ends.

use crate::Local;
use crate::run::{command, status};
use crate::services::start;
use crate::test::start_fresh;
use crate::up::random_token;
use allot_tests::ports::{BENCH_NAIVE_DATABASE, Deployment};
use anyhow::Result;
use std::time::Duration;

/// The `bench` command: the services, then the benchmark. Its latency chart goes to
/// docs/bench-latency.svg, beside docs/benchmarks.md; a smoke run's (meaningless figures) to
/// the artifacts folder; unless the flags name a `--chart` of their own.
pub async fn bench(local: &Local, args: &[String]) -> Result<()> {
    start(local).await?;
    let mut args = args.to_vec();
    let own_chart = args
        .iter()
        .any(|arg| arg == "--chart" || arg.starts_with("--chart="));
    if !own_chart {
        let chart = if args.iter().any(|arg| arg == "--smoke") {
            local.artifacts().join("bench-latency-smoke.svg")
        } else {
            local.repo.join("docs/bench-latency.svg")
        };
        args.extend(["--chart".to_owned(), chart.display().to_string()]);
    }
    run(local, &args).await
}

/// The benchmark against a fresh allot; `args` go to the bench.
pub async fn run(local: &Local, args: &[String]) -> Result<()> {
    let ports = local.ports;
    let deployment = Deployment::Bench;
    let services = local.services();
    services.fresh_deployment(deployment).await?;
    services.recreate_database(BENCH_NAIVE_DATABASE).await?;
    let token = random_token();
    let mut env = ports.allot_env(deployment);
    env.push(("ALLOT_ADMIN_TOKEN".into(), token.clone()));
    let allot = start_fresh(local, deployment, env).await?;
    let mut bench = command(local.binary("bench"));
    bench
        .args(["--base-url", &allot.base_url])
        .args(["--admin-token", &token])
        .args(["--database-url", &ports.database_url(deployment.database())])
        .args(["--amqp-url", &ports.amqp_url(deployment.vhost())])
        .args(["--redis-url", &ports.redis_url(deployment.redis_database())])
        .args([
            "--naive-database-url",
            &ports.database_url(BENCH_NAIVE_DATABASE),
        ])
        .args(["--reference-addr", &ports.bench_reference_addr()])
        .args(["--api-pid", &allot.api.pid().to_string()])
        .args(["--worker-pid", &allot.worker.pid().to_string()])
        .args(["--worker-url", &allot.worker_url])
        .args(args);
    let outcome = status(bench, Some(Duration::from_secs(1200))).await;
    if outcome.is_err() {
        allot.show_logs();
    }
    allot.stop().await;
    outcome
}
