//! Resident memory of allot's processes, sampled from `/proc/<pid>/status` while the scenarios
//! run: the largest `VmRSS` seen, and the kernel's own high-water mark `VmHWM`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A process being watched.
pub struct Watched {
    pub name: &'static str,
    pub pid: u32,
    /// Largest VmRSS seen, KiB.
    max_rss: Arc<AtomicU64>,
}

/// One of `/proc/<pid>/status`'s kB fields.
fn field_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Watched {
    /// Starts sampling `pid` every 100 ms for as long as the bench runs.
    pub fn start(name: &'static str, pid: u32) -> Self {
        let max_rss = Arc::new(AtomicU64::new(0));
        let sampled = max_rss.clone();
        tokio::spawn(async move {
            loop {
                if let Some(rss) = field_kib(pid, "VmRSS:") {
                    sampled.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { name, pid, max_rss }
    }

    /// (largest VmRSS seen, VmHWM) in MiB.
    pub fn mib(&self) -> (f64, Option<f64>) {
        let max = self.max_rss.load(Ordering::Relaxed) as f64 / 1024.0;
        (
            max,
            field_kib(self.pid, "VmHWM:").map(|k| k as f64 / 1024.0),
        )
    }
}
