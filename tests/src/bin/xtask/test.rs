//! `test`: what CI runs (`.ci/run` calls `deploy/local.sh test`, which builds the release
//! binaries and hands over to this). Every step is numbered, timed, and named when it fails;
//! the first failure ends the run. Whatever the run started is stopped on every exit path
//! ([`cleanup`]); with `CI=true` the services too.

use crate::Local;
use crate::run::{Background, Steps, cmd, command, status};
use crate::services::announce;
use crate::up::random_token;
use crate::{bench, tools};
use allot_tests::ports::{Deployment, TEST_VHOST};
use allot_tests::system::{Allot, AllotSpec, stop_recorded_named};
use anyhow::Result;
use std::time::Duration;

/// The processes of the fresh allots this pipeline starts.
const FRESH: [&str; 4] = [
    "functional-api",
    "functional-worker",
    "bench-api",
    "bench-worker",
];

pub async fn test(local: &Local) -> Result<()> {
    let repo = &local.repo;
    let services = local.services();
    let functional = local.ports.api_addr(Deployment::Functional);
    let mut steps = Steps::new(15);
    // Started now, awaited when first needed: both wait on the disk and the network far more
    // than on the CPU, which fmt, clippy and the tests keep busy meanwhile.
    let services_up = Background::start(start_quietly(local.clone()));
    let tools_installed = Background::start(tools::install(local.clone()));
    steps
        .run(
            "cargo fmt --all --check",
            cmd(repo, "cargo", &["fmt", "--all", "--check"]),
        )
        .await?;
    steps
        .run(
            "cargo clippy --workspace --all-targets -- -D warnings",
            cmd(
                repo,
                "cargo",
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            ),
        )
        .await?;
    steps
        .run(
            "services (started in the background at the beginning)",
            async {
                services_up.wait().await?;
                announce(local);
                Ok(())
            },
        )
        .await?;
    steps
        .run(
            "preparing test resources (a fresh vhost allot-test)",
            services.recreate_vhost(TEST_VHOST),
        )
        .await?;
    steps.run("cargo tests", cargo_tests(local)).await?;
    steps
        .run(
            &format!("functional test against a fresh allot on {functional}"),
            functional_test(local),
        )
        .await?;
    steps
        .run(
            "the test tools (npm ci, pip; installed in the background since the beginning)",
            tools_installed.wait(),
        )
        .await?;
    let tools_allot = steps
        .run(
            &format!("a fresh allot on {functional} for the tools, logging JSON"),
            fresh_functional(local, &[("ALLOT_LOG_FORMAT", "json")]),
        )
        .await?;
    steps
        .run(
            "Postman collection (newman)",
            against(&tools_allot, tools::newman(local, &tools_allot)),
        )
        .await?;
    steps
        .run(
            "web page in headless Chromium",
            against(&tools_allot, tools::browser(local, &tools_allot)),
        )
        .await?;
    steps
        .run(
            "schemathesis against /api-docs/openapi.json",
            against(&tools_allot, tools::schemathesis(local, &tools_allot)),
        )
        .await?;
    steps
        .run("JSON logs carry request ids", tools::json_logs(local))
        .await?;
    steps
        .run("deploy/docker-compose.yml is valid", tools::compose(local))
        .await?;
    tools_allot.allot.stop().await;
    let chart = local.artifacts().join("bench-latency-smoke.svg");
    let smoke = [
        "--smoke".to_owned(),
        "--chart".to_owned(),
        chart.display().to_string(),
    ];
    steps
        .run(
            &format!(
                "benchmark smoke run (no timing assertions) on {}",
                local.ports.api_addr(Deployment::Bench)
            ),
            bench::run(local, &smoke),
        )
        .await?;
    steps
        .run(
            &format!(
                "chaos test (short form) on its own services, port offset {}",
                local.chaos_ports.offset()
            ),
            chaos(local),
        )
        .await?;
    steps.summary();
    println!(
        "==> all test steps passed; screenshot of the web page: {}",
        local.artifacts().join("web-page.png").display()
    );
    if !local.ci {
        println!("==> the services stay up for the next run; deploy/local.sh down stops them");
    }
    Ok(())
}

/// Starts the services with their output in `<state>/logs/services.log`.
async fn start_quietly(local: Local) -> Result<()> {
    local.services().quiet().start_all().await
}

/// Stops what a `test` run started, on every exit path: the fresh allots, the chaos copy, and
/// with `CI=true` everything.
pub async fn cleanup(local: &Local) {
    let run_dir = local.run_dir();
    let _ = tokio::task::spawn_blocking(move || {
        stop_recorded_named(&run_dir, &FRESH, Duration::from_secs(10))
    })
    .await;
    if local.chaos_state.exists()
        && let Err(err) = local.chaos_services().down().await
    {
        eprintln!("warning: could not stop the chaos test's copy: {err:#}");
    }
    if local.ci {
        println!("==> CI=true: stopping the services");
        if let Err(err) = local.services().down().await {
            eprintln!("warning: could not stop the services: {err:#}");
        }
    }
}

/// Unit, property and integration tests: nextest when installed, else cargo test. The
/// integration tests get the services' URLs from the port map.
async fn cargo_tests(local: &Local) -> Result<()> {
    let nextest = command("cargo")
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success());
    let mut tests = command("cargo");
    if nextest {
        tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("warning: cargo-nextest is not installed; using cargo test");
        tests.args(["test", "--workspace", "--no-fail-fast"]);
    }
    tests.current_dir(&local.repo).envs(local.ports.test_env());
    status(tests, None).await
}

/// A fresh allot of the `Functional` deployment and its admin token.
pub struct Fresh {
    pub allot: Allot,
    pub token: String,
}

/// A fresh allot (release binaries, its own empty database, vhost and Redis database, a new
/// admin token), with `extra` added to its environment. Its logs hold this instance only.
pub async fn fresh_functional(local: &Local, extra: &[(&str, &str)]) -> Result<Fresh> {
    let deployment = Deployment::Functional;
    stop_recorded_named(
        &local.run_dir(),
        &["functional-api", "functional-worker"],
        Duration::from_secs(10),
    );
    local.services().fresh_deployment(deployment).await?;
    let token = random_token();
    let mut env = local.ports.allot_env(deployment);
    env.push(("ALLOT_ADMIN_TOKEN".into(), token.clone()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let allot = start_fresh(local, deployment, env).await?;
    Ok(Fresh { allot, token })
}

/// Starts `<deployment>-api` and `<deployment>-worker` with fresh logs.
pub async fn start_fresh(
    local: &Local,
    deployment: Deployment,
    env: Vec<(String, String)>,
) -> Result<Allot> {
    let name = |role: &str| format!("{}-{role}", deployment.name());
    for role in ["api", "worker"] {
        let _ = std::fs::remove_file(local.logs().join(format!("{}.log", name(role))));
    }
    Allot::start(&AllotSpec {
        api_name: name("api"),
        worker_name: name("worker"),
        bin_dir: local.bin_dir.clone(),
        env,
        api_addr: local.ports.api_addr(deployment),
        worker_addr: local.ports.worker_addr(deployment),
        run_dir: local.run_dir(),
        log_dir: local.logs(),
    })
    .await
}

/// `functional-test` against a fresh allot, which it also checks in PostgreSQL and Redis.
async fn functional_test(local: &Local) -> Result<()> {
    let fresh = fresh_functional(local, &[]).await?;
    let deployment = Deployment::Functional;
    let mut test = command(local.binary("functional-test"));
    test.args(["--base-url", &fresh.allot.base_url])
        .args(["--admin-token", &fresh.token])
        .args([
            "--database-url",
            &local.ports.database_url(deployment.database()),
        ])
        .args([
            "--redis-url",
            &local.ports.redis_url(deployment.redis_database()),
        ]);
    against(&fresh, status(test, None)).await?;
    fresh.allot.stop().await;
    Ok(())
}

/// Runs `step` against a fresh allot; on failure shows the allot's logs.
async fn against<T>(fresh: &Fresh, step: impl Future<Output = Result<T>>) -> Result<T> {
    let outcome = step.await;
    if outcome.is_err() {
        fresh.allot.show_logs();
    }
    outcome
}

/// The chaos test, short form: it starts its own services (the chaos copy) and allot
/// processes, injects every fault under load, checks the promises in PostgreSQL and Redis,
/// and stops everything it started; it bounds its own run time.
async fn chaos(local: &Local) -> Result<()> {
    let mut chaos = command(local.binary("chaos-test"));
    chaos
        .args(["--port-offset", &local.chaos_ports.offset().to_string()])
        .arg("--state")
        .arg(&local.chaos_state)
        .arg("--bin-dir")
        .arg(&local.bin_dir)
        .env("ALLOT_REPO", &local.repo);
    status(chaos, None).await
}
