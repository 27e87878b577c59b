//! Waiting for a condition with a deadline, never with a bare sleep.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How often [`until`] checks.
const EVERY: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, or fails naming `what` once `within` has passed.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(EVERY).await;
    }
}
