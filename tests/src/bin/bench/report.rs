//! Printing: one line per load, the decisions, memory, and the targets as ratios of figures
//! measured in the same run.

use crate::db::Decisions;
use crate::refserver::{Kind, Measured};
use crate::rss::Watched;
use crate::scenarios::{Accept, Flash, WAIT_SECS, Wait, Wide};
use allot_tests::load::Tally;
use hdrhistogram::Histogram;

pub fn load_line(name: &str, tally: &Tally) {
    println!(
        "{name:<28} {:>8} req {:>9.0} req/s  p50 {:>7.2} p90 {:>7.2} p99 {:>7.2} p99.9 {:>7.2} ms  statuses {:?}{}",
        tally.answered(),
        tally.rate(),
        tally.ms(0.5),
        tally.ms(0.9),
        tally.ms(0.99),
        tally.ms(0.999),
        tally.statuses,
        errors(tally)
    );
}

fn errors(tally: &Tally) -> String {
    let mut text = String::new();
    if tally.errors > 0 {
        text += &format!(
            "  errors {} (first: {})",
            tally.errors,
            tally.first_error.as_deref().unwrap_or("")
        );
    }
    if tally.unsent > 0 {
        text += &format!("  unsent {}", tally.unsent);
    }
    text
}

fn decisions_line(name: &str, d: &Decisions) {
    let ms = |q| d.latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<28} {:>8} decided ({} succeeded) {:>9.0} decisions/s  accept-to-decided p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ms  partitions {}",
        d.count,
        d.succeeded,
        d.per_second,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        d.latency.max() as f64 / 1000.0,
        d.partitions
    );
}

pub fn accept(a: &Accept) {
    load_line(
        &format!("accept closed loop {} conns", a.connections),
        &a.closed,
    );
    load_line(&format!("accept open loop {:.0}/s", a.open_rate), &a.open);
    decisions_line("accept decisions", &a.decisions);
    load_line(
        &format!("accept closed loop {} conns", a.low_connections),
        &a.low,
    );
    decisions_line(
        &format!("accept {} conns decisions", a.low_connections),
        &a.low_decisions,
    );
}

/// Milliseconds at quantile `q` of a histogram of microseconds.
fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Quantile `q` of sorted values, in milliseconds.
fn sorted_ms(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

pub fn wait(w: &Wait) {
    load_line("wait phase accept load", &w.background);
    load_line(
        &format!("Prefer: wait={WAIT_SECS} {} conns", w.connections),
        &w.waited,
    );
    println!(
        "Prefer: wait={WAIT_SECS}: {} final (200), {} still pending after the wait (202); answer p50 {:.1} p90 {:.1} p99 {:.1} ms, accept-to-decided of the same requests p50 {:.1} p90 {:.1} p99 {:.1} ms; per final answer, answer minus accept-to-decided p50 {:.1} p99 {:.1} max {:.1} ms",
        w.final_answers,
        w.pending,
        ms(&w.answer_latency, 0.5),
        ms(&w.answer_latency, 0.9),
        ms(&w.answer_latency, 0.99),
        ms(&w.decided_latency, 0.5),
        ms(&w.decided_latency, 0.9),
        ms(&w.decided_latency, 0.99),
        sorted_ms(&w.excess, 0.5),
        sorted_ms(&w.excess, 0.99),
        sorted_ms(&w.excess, 1.0),
    );
}

pub fn flash(f: &Flash) {
    load_line("flash sale", &f.sale);
    decisions_line("flash decisions", &f.decisions);
    load_line("sold out", &f.sold_out);
    match f.reopened_after {
        Some(after) => println!(
            "restock re-opened the product after {:.1} ms",
            after.as_secs_f64() * 1000.0
        ),
        None => println!("restock: the product did NOT re-open"),
    }
}

pub fn wide(w: &Wide, partitions: u16) {
    load_line("wide catalogue", &w.closed);
    decisions_line("wide decisions", &w.decisions);
    println!(
        "wide backlog (accepted, not yet decided): max {} sampled every 0.5 s, {} at the end of the load; partitions busy {}/{partitions}",
        w.max_backlog, w.final_backlog, w.decisions.partitions
    );
}

pub fn memory(watched: &[Watched]) {
    for process in watched {
        let (max, hwm) = process.mib();
        println!(
            "memory {:<13} max VmRSS {max:.1} MiB, VmHWM {}",
            process.name,
            hwm.map_or("?".into(), |h| format!("{h:.1} MiB"))
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// The targets of issue 4 (and, for the phases issue 10 added, of issue 10), each computed
/// from this run's figures.
pub fn targets(
    references: &[Measured],
    a: &Accept,
    wait: &Wait,
    f: &Flash,
    w: &Wide,
    memory: &[Watched],
) {
    let rate = |kind, connections| {
        references
            .iter()
            .find(|m| m.kind == kind && m.connections == connections)
            .map_or(f64::NAN, |m| m.tally.rate())
    };
    let (bare, publish, naive) = (
        rate(Kind::Bare, a.connections),
        rate(Kind::Publish, a.connections),
        rate(Kind::Naive, a.connections),
    );
    let naive_low = rate(Kind::Naive, a.low_connections);
    let accept = a.closed.rate();
    println!("\ntargets (ratios of this run's figures):");
    let row = |name: &str, value: String, goal: &str, met: bool| {
        println!(
            "  {name:<44} {value:>14}   goal {goal:<12} {}",
            verdict(met)
        );
    };
    row(
        "1. accept / axum+confirmed publish",
        format!("{:.2}x", accept / publish),
        ">= 1.5x",
        accept / publish >= 1.5,
    );
    row(
        "1. accept / naive hot row",
        format!("{:.1}x", accept / naive),
        ">= 10x",
        accept / naive >= 10.0,
    );
    row(
        "1. accept p99 (closed loop)",
        format!("{:.1} ms", a.closed.ms(0.99)),
        "<= 15 ms",
        a.closed.ms(0.99) <= 15.0,
    );
    row(
        "1. accept p99 (open loop, from intended send)",
        format!("{:.1} ms", a.open.ms(0.99)),
        "<= 25 ms",
        a.open.ms(0.99) <= 25.0,
    );
    let low = a.low.rate();
    row(
        &format!("1. accept / naive, both at {} conns", a.low_connections),
        format!("{:.1}x", low / naive_low),
        ">= 3x",
        low / naive_low >= 3.0,
    );
    row(
        &format!("1. accept p99 ({} conns)", a.low_connections),
        format!("{:.1} ms", a.low.ms(0.99)),
        "<= 10 ms",
        a.low.ms(0.99) <= 10.0,
    );
    let flash_rate = f.decisions.per_second;
    row(
        "2. flash decisions/s, one partition",
        format!("{flash_rate:.0}/s"),
        ">= 20000/s",
        flash_rate >= 20_000.0,
    );
    let a2d = f.decisions.latency.value_at_quantile(0.99) as f64 / 1000.0;
    row(
        "2. flash accept-to-decided p99",
        format!("{a2d:.1} ms"),
        "<= 100 ms",
        a2d <= 100.0,
    );
    row(
        "2. flash units sold",
        format!("{}", f.decisions.succeeded),
        "== stock",
        f.decisions.succeeded == f.stock,
    );
    row(
        "3. sold-out answers / bare axum",
        format!("{:.2}x", f.sold_out.rate() / bare),
        ">= 0.8x",
        f.sold_out.rate() / bare >= 0.8,
    );
    let reopen = f
        .reopened_after
        .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0);
    row(
        "3. restock re-opens after",
        format!("{reopen:.1} ms"),
        "<= 1000 ms",
        reopen <= 1000.0,
    );
    let wide_ratio = w.closed.rate() / accept;
    row(
        "4. wide accept / accept",
        format!("{wide_ratio:.2}x"),
        ">= 0.9x",
        wide_ratio >= 0.9,
    );
    row(
        "4. wide partitions busy",
        format!("{}", w.decisions.partitions),
        "all",
        true,
    );
    for process in memory {
        let (max, _) = process.mib();
        let limit = if process.name == "allot-api" {
            64.0
        } else {
            128.0
        };
        row(
            &format!("5. {} max RSS", process.name),
            format!("{max:.1} MiB"),
            &format!("< {limit} MiB"),
            max < limit,
        );
    }
    let (answer, decided) = (
        ms(&wait.answer_latency, 0.99),
        ms(&wait.decided_latency, 0.99),
    );
    row(
        &format!("6. wait={WAIT_SECS} answer p99 - accept-to-decided p99"),
        format!("{:+.1} ms", answer - decided),
        "<= +5 ms",
        !wait.answer_latency.is_empty() && answer <= decided + 5.0,
    );
    println!(
        "     (answer p99 {answer:.1} ms, accept-to-decided p99 {decided:.1} ms of the same requests; {} final answers, {} still pending after the wait)",
        wait.final_answers, wait.pending
    );
    println!(
        "  (reference rates: bare {bare:.0}/s, axum+confirmed publish {publish:.0}/s, naive {naive:.0}/s; at {} conns: naive {naive_low:.0}/s)",
        a.low_connections
    );
}

/// The batching, as allot's own metrics count it: the mean number of requests per broker
/// message (the API's `allot_api_envelope_requests`) and per database transaction (the
/// worker's `allot_worker_batch_size`), over the whole run.
pub async fn batching(api_url: &str, worker_url: Option<&str>) {
    let mean = allot_tests::metrics::sum_and_count;
    let fetch = |url: String| async move { reqwest::get(&url).await.ok()?.text().await.ok() };
    if let Some(metrics) = fetch(format!("{}/metrics", api_url.trim_end_matches('/'))).await
        && let Some((requests, messages)) = mean(&metrics, "allot_api_envelope_requests")
    {
        println!(
            "batching: {requests:.0} requests in {messages:.0} broker messages, {:.1} per message",
            requests / messages.max(1.0)
        );
    }
    if let Some(url) = worker_url
        && let Some(metrics) = fetch(format!("{}/metrics", url.trim_end_matches('/'))).await
        && let Some((requests, batches)) = mean(&metrics, "allot_worker_batch_size")
    {
        println!(
            "batching: {requests:.0} requests in {batches:.0} database transactions, {:.1} per transaction",
            requests / batches.max(1.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::sorted_ms;

    #[test]
    fn quantiles_of_sorted_values_are_nearest_rank() {
        let micros: Vec<i64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(sorted_ms(&micros, 0.5), 50.0);
        assert_eq!(sorted_ms(&micros, 0.99), 99.0);
        assert_eq!(sorted_ms(&micros, 1.0), 100.0);
        assert_eq!(sorted_ms(&micros, 0.0), 1.0);
        assert_eq!(sorted_ms(&[-2000], 0.99), -2.0);
        assert!(sorted_ms(&[], 0.99).is_nan());
    }
}
