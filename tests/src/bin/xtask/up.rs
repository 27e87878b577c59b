//! `up`: the services, then a long-running allot on them (the `Main` deployment), in the
//! background, restarted with the fresh binaries when it already runs.

use crate::Local;
use crate::services::start;
use allot_tests::ports::Deployment;
use allot_tests::system::{Allot, AllotSpec, stop_recorded_named};
use anyhow::{Context as _, Result};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

pub async fn up(local: &Local) -> Result<()> {
    start(local).await?;
    let services = local.services();
    let deployment = Deployment::Main;
    services.ensure_database(deployment.database()).await?;
    let (token, token_source) = admin_token(&local.state.join("admin-token"))?;
    stop_main(local);
    let mut env = local.ports.allot_env(deployment);
    env.push(("ALLOT_ADMIN_TOKEN".into(), token));
    let spec = AllotSpec {
        api_name: "api".into(),
        worker_name: "worker".into(),
        bin_dir: local.bin_dir.clone(),
        env,
        api_addr: local.ports.api_addr(deployment),
        worker_addr: local.ports.worker_addr(deployment),
        run_dir: local.run_dir(),
        log_dir: local.logs(),
    };
    let allot = Allot::start(&spec).await?;
    let (api_log, worker_log) = (
        allot.api.log().display().to_string(),
        allot.worker.log().display().to_string(),
    );
    let (api, worker) = (&spec.api_addr, &spec.worker_addr);
    allot.detach();
    println!(
        "
allot is running at http://{api}
  web page:     http://{api}/
  API docs:     http://{api}/docs/  (OpenAPI: http://{api}/api-docs/openapi.json)
  metrics:      http://{api}/metrics  and the worker's http://{worker}/metrics
  admin token:  {token_source}
  logs:         {api_log}
                {worker_log}
  try:          curl -fsS http://{api}/readyz
  stop:         deploy/local.sh down"
    );
    Ok(())
}

/// Stops the `up` allot of an earlier run, if one is recorded (only those two: the other
/// recorded processes belong to other runs).
fn stop_main(local: &Local) {
    for stopped in stop_recorded_named(
        &local.run_dir(),
        &["api", "worker"],
        Duration::from_secs(10),
    ) {
        println!("==> stopped {} (pid {})", stopped.name, stopped.pid);
    }
}

/// `ALLOT_ADMIN_TOKEN` from the environment, else the one kept in `path` (created, mode 600).
fn admin_token(path: &Path) -> Result<(String, String)> {
    if let Ok(token) = std::env::var("ALLOT_ADMIN_TOKEN")
        && !token.is_empty()
    {
        return Ok((token, "ALLOT_ADMIN_TOKEN (from your environment)".into()));
    }
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let token = match existing.trim() {
        "" => {
            let token = random_token();
            std::fs::write(path, format!("{token}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            token
        }
        token => token.to_owned(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok((token, path.display().to_string()))
}

/// A fresh secret: two random (v4) UUIDs, 244 random bits, as 64 hex digits.
pub fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}
