//! The worker's metrics: batches (size, commit latency, decisions by outcome) and queue depth
//! per partition. Depth: every [`PROBE_EVERY`], a passive declare of each
//! partition queue reads how many messages wait there (`allot_queue_depth{partition}`; ready
//! messages, not those delivered and still unacked). A growing depth means the workers fall
//! behind; the gauge is what to alert on before `x-max-length` turns requests into 503s.

use crate::decider::{BatchOutcome, Settlement};
use allot_shared::amqp::Topology;
use lapin::Connection;
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the depths are read.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// The `outcome` labels of `allot_worker_decisions_total`.
const OUTCOMES: [&str; 5] = ["succeeded", "rejected", "held", "replayed", "dead_lettered"];
/// The `event` labels of `allot_worker_holds_total`.
const HOLD_EVENTS: [&str; 4] = ["held", "confirmed", "cancelled", "expired"];
/// The `mode` labels of `allot_worker_share_escalations_total`.
const SHARE_MODES: [&str; 2] = ["pooled", "exclusive"];

/// Installs the metrics recorder (see [`allot_shared::metrics::install`]) and registers the
/// worker's counters and unlabelled histograms, so that `/metrics` shows them from the start,
/// at 0 (an alert on `allot_worker_set_aside_total` needs the series before the first poison
/// message). The queue depths are not: a depth of 0 before the first probe would be a guess.
pub fn install_metrics() -> PrometheusHandle {
    let handle = allot_shared::metrics::install();
    // `increment(0)`, not `absolute(0)`: the registry is per process, and may already count.
    for outcome in OUTCOMES {
        metrics::counter!("allot_worker_decisions_total", "outcome" => outcome).increment(0);
    }
    metrics::counter!("allot_worker_set_aside_total").increment(0);
    metrics::counter!("allot_worker_handovers_total").increment(0);
    for mode in SHARE_MODES {
        metrics::counter!("allot_worker_share_escalations_total", "mode" => mode).increment(0);
    }
    // Registered (an empty histogram renders its buckets at 0), nothing recorded.
    let _ = metrics::histogram!("allot_worker_batch_size");
    let _ = metrics::histogram!("allot_worker_commit_duration_seconds");
    let _ = metrics::histogram!("allot_worker_group_batches");
    for event in HOLD_EVENTS {
        metrics::counter!("allot_worker_holds_total", "event" => event).increment(0);
    }
    // The open holds are counted by the expiry sweeper from the database at its first round,
    // a moment after start.
    metrics::gauge!("allot_holds_open").increment(0.0);
    for name in allot_shared::metrics::HOLD_HISTOGRAMS {
        let _ = metrics::histogram!(name);
    }
    handle
}

/// Reads every partition's depth until `stop` is cancelled. Failures (broker restarting) are
/// logged at debug level and retried on a fresh channel at the next probe.
pub async fn watch_queue_depths(
    connection: &Connection,
    topology: Topology,
    stop: CancellationToken,
) {
    let mut channel = None;
    loop {
        if channel.is_none() {
            channel = connection.create_channel().await.ok();
        }
        if let Some(open) = &channel
            && let Err(err) = probe(open, &topology).await
        {
            tracing::debug!(error = %err, "could not read the queue depths");
            channel = None; // a failed passive declare closes the channel
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

async fn probe(channel: &lapin::Channel, topology: &Topology) -> lapin::Result<()> {
    for partition in topology.partitions() {
        let depth = topology.depth(channel, partition).await?;
        metrics::gauge!("allot_queue_depth", "partition" => partition.to_string())
            .set(f64::from(depth));
    }
    Ok(())
}

/// Records an attempt at a group of batches rolled back and decided again because a product
/// spread over several partitions needed more of its shares locked (`pooled`: a share ran
/// short; `exclusive`: the product row was needed).
pub fn record_escalation(mode: crate::core::ShareMode) {
    let label = match mode {
        crate::core::ShareMode::Own | crate::core::ShareMode::Pooled => SHARE_MODES[0],
        crate::core::ShareMode::Exclusive => SHARE_MODES[1],
    };
    metrics::counter!("allot_worker_share_escalations_total", "mode" => label).increment(1);
}

/// Records a committed batch: its size, how long its commit took, and its decisions by outcome
/// (`succeeded`, `rejected`, `replayed` for redelivered requests decided before,
/// `dead_lettered` for unparseable messages).
pub fn record_batch(outcome: &BatchOutcome, size: usize, commit_started: Instant) {
    metrics::histogram!("allot_worker_batch_size").record(size as f64);
    metrics::histogram!("allot_worker_commit_duration_seconds")
        .record(commit_started.elapsed().as_secs_f64());
    let counts = [
        outcome.succeeded,
        outcome.rejected,
        outcome.held,
        outcome.replayed,
        outcome.dead_lettered,
    ];
    for (label, count) in OUTCOMES.into_iter().zip(counts) {
        metrics::counter!("allot_worker_decisions_total", "outcome" => label)
            .increment(count as u64);
    }
    let events = [
        outcome.held,
        outcome.confirmed,
        outcome.cancelled,
        outcome.expired,
    ];
    for (label, count) in HOLD_EVENTS.into_iter().zip(events) {
        if count > 0 {
            metrics::counter!("allot_worker_holds_total", "event" => label).increment(count as u64);
        }
    }
}

/// Records the holds a batch settled: how long after it was granted each checkout came
/// (`allot_worker_hold_checkout_seconds`), and how late each expiry was released
/// (`allot_worker_expiry_lateness_seconds`: from its `expires_at` to the commit that released
/// it).
pub fn record_settlements(settlements: &[Settlement]) {
    for settlement in settlements {
        match *settlement {
            Settlement::Confirmed { after_secs } => {
                metrics::histogram!("allot_worker_hold_checkout_seconds").record(after_secs);
            }
            Settlement::Expired { late_secs } => {
                metrics::histogram!("allot_worker_expiry_lateness_seconds").record(late_secs);
            }
            Settlement::Cancelled => {}
        }
    }
}

/// Sets the number of open holds, as the expiry sweeper counted them.
pub fn record_open_holds(open: i64) {
    metrics::gauge!("allot_holds_open").set(open as f64);
}

/// Counts a message set aside on its own after it failed every time (poison), with its reason
/// in `dead_letters`.
pub fn record_set_aside() {
    metrics::counter!("allot_worker_set_aside_total").increment(1);
}
