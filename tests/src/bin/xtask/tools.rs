//! The tools a team would use against allot, as `test` runs them against a fresh allot: the
//! Postman collection (newman), the web page in headless Chromium (playwright-core),
//! schemathesis on the served OpenAPI document, and the Python checks of the JSON logs and of
//! `deploy/docker-compose.yml`. Debian's packages (chromium, nodejs, python3-venv) are
//! installed by `deploy/local.sh` before; here the Node packages from the committed lock file
//! and the Python ones into a venv under the state folder, in the background of the first steps.

use crate::Local;
use crate::run::{cmd, cmd_logged, command, status};
use crate::test::Fresh;
use anyhow::{Context as _, Result, ensure};
use std::path::PathBuf;
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir(local: &Local) -> PathBuf {
    local.repo.join("tests/browser")
}

fn venv(local: &Local) -> PathBuf {
    local.state.join("venv")
}

/// npm ci and pip, their output in `<state>/logs/tools-install.log` (`test` runs this in the
/// background, beside clippy and the tests).
pub async fn install(local: Local) -> Result<()> {
    let log = local.logs().join("tools-install.log");
    std::fs::create_dir_all(local.logs())?;
    let _ = std::fs::remove_file(&log);
    let npm_ci = ["ci", "--no-audit", "--no-fund", "--loglevel=error"];
    cmd_logged(&browser_dir(&local), &log, "npm", &npm_ci).await?;
    let venv = venv(&local);
    if !venv.join("bin/python").exists() {
        let venv = venv.display().to_string();
        cmd_logged(&local.repo, &log, "python3", &["-m", "venv", &venv]).await?;
    }
    let requirements = local.repo.join("tests/tools/requirements.txt");
    let pip = venv.join("bin/pip").display().to_string();
    let install = [
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-r",
        &requirements.display().to_string(),
    ];
    cmd_logged(&local.repo, &log, &pip, &install).await?;
    ensure!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing (deploy/local.sh test installs Debian's chromium)"
    );
    Ok(())
}

/// The Postman collection, run by newman.
pub async fn newman(local: &Local, fresh: &Fresh) -> Result<()> {
    let postman = local.repo.join("deploy/postman");
    let mut newman = command("npx");
    newman
        .current_dir(browser_dir(local))
        .args(["--no-install", "newman", "run"])
        .arg(postman.join("allot.postman_collection.json"))
        .arg("--environment")
        .arg(postman.join("allot.postman_environment.json"))
        .args(["--env-var", &format!("baseUrl={}", fresh.allot.base_url)])
        .args(["--env-var", &format!("adminToken={}", fresh.token)])
        .args([
            "--reporters",
            "cli",
            "--color",
            "off",
            "--timeout",
            "120000",
        ]);
    status(newman, None).await
}

/// The web page in headless Chromium: load, buy, see the order number; keeps a screenshot.
pub async fn browser(local: &Local, fresh: &Fresh) -> Result<()> {
    let artifacts = local.artifacts();
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    let mut node = command("node");
    node.current_dir(browser_dir(local))
        .env("ALLOT_BASE_URL", &fresh.allot.base_url)
        .env("ALLOT_ADMIN_TOKEN", &fresh.token)
        .env("ALLOT_ARTIFACTS", &artifacts)
        .env("CHROMIUM", CHROMIUM)
        .args(["--test", "--test-reporter=spec", "page.test.mjs"]);
    status(node, None).await
}

/// schemathesis against the served OpenAPI document: generated requests to every operation
/// (the staff ones with the token), bounded in examples and time; any 5xx fails. From the
/// state folder, where it keeps its cache (.schemathesis/, .hypothesis/).
pub async fn schemathesis(local: &Local, fresh: &Fresh) -> Result<()> {
    let mut schemathesis = command(venv(local).join("bin/schemathesis"));
    schemathesis
        .current_dir(&local.state)
        .arg("run")
        .arg(format!("{}/api-docs/openapi.json", fresh.allot.base_url))
        .args(["--checks", "not_a_server_error"])
        .args([
            "--max-examples",
            "25",
            "--max-time",
            "90",
            "--request-timeout",
            "20",
        ])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", fresh.token),
        ])
        .arg("--no-color");
    status(schemathesis, Some(Duration::from_secs(300))).await
}

/// The tools' allot logged JSON (ALLOT_LOG_FORMAT=json): every line is a JSON object, and the
/// lines logged inside a request carry its request id (newman sends a known one).
pub async fn json_logs(local: &Local) -> Result<()> {
    let python = venv(local).join("bin/python").display().to_string();
    let script = local.repo.join("tests/tools/check_json_logs.py");
    let log = local.logs().join("functional-api.log");
    cmd(
        &local.repo,
        &python,
        &[
            &script.display().to_string(),
            &log.display().to_string(),
            "newman-create-product",
        ],
    )
    .await
}

/// deploy/docker-compose.yml must at least be valid YAML of the expected shape: no Docker
/// engine here to run it (`docker compose config` is used as well when the plugin is present).
pub async fn compose(local: &Local) -> Result<()> {
    let python = venv(local).join("bin/python").display().to_string();
    let script = local.repo.join("tests/tools/check_compose.py");
    let file = local
        .repo
        .join("deploy/docker-compose.yml")
        .display()
        .to_string();
    cmd(
        &local.repo,
        &python,
        &[&script.display().to_string(), &file],
    )
    .await?;
    let docker_compose = command("docker")
        .args(["compose", "version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success());
    if docker_compose {
        cmd(
            &local.repo,
            "docker",
            &["compose", "-f", &file, "config", "--quiet"],
        )
        .await?;
    }
    Ok(())
}
