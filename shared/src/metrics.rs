//! Prometheus metrics for both binaries. The `metrics` facade records (one-line calls where things
//! happen); this module installs the process-wide Prometheus recorder once and hands out the
//! handle each binary renders on its own `GET /metrics` route (no separate listener).
//!
//! Histograms get explicit buckets so they render as Prometheus histograms (aggregatable across
//! replicas), not as summaries.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Buckets of every `*_seconds` histogram: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of the worker's batch-size histogram (requests per batch, up to ALLOT_BATCH_SIZE).
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
/// Buckets of the hold histograms (time from a hold to its checkout, and how late an expiry
/// was released), in seconds: holds last up to an hour by default.
const HOLD_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// The histograms that take [`HOLD_BUCKETS`].
pub const HOLD_HISTOGRAMS: [&str; 2] = [
    "allot_worker_hold_checkout_seconds",
    "allot_worker_expiry_lateness_seconds",
];
/// How often recorded histogram samples are folded in when nobody scrapes, so they cannot pile
/// up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder on first call and returns the handle to render it. Idempotent:
/// when the API and a worker share a process (the integration tests), they share one registry.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full("allot_worker_batch_size".into()),
                        BATCH_SIZE_BUCKETS,
                    )
                })
                .and_then(|builder| {
                    HOLD_HISTOGRAMS.iter().try_fold(builder, |builder, name| {
                        builder.set_buckets_for_metric(Matcher::Full((*name).into()), HOLD_BUCKETS)
                    })
                })
                .expect("the bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(err) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %err, "another metrics recorder is installed; /metrics will stay empty");
            }
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                })
                .expect("a thread can be spawned");
            handle
        })
        .clone()
}

/// The `Content-Type` of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
