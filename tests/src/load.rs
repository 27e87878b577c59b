//! The load generator (the benchmark's): keep-alive HTTP/1.1 connections (hyper's client
//! connection, no pool, no per-request allocation beyond the body), one task per connection.
//!
//! - [`closed_loop`]: a fixed number of connections, each sending its next request as soon as
//!   the previous one was answered: measures the throughput the server sustains.
//! - [`open_loop`]: requests are due at a fixed rate whatever the server does; the latency of
//!   each is measured from its *intended* send time, so a stall shows up as the latency of every
//!   request that had to wait for it (no coordinated omission).

use anyhow::{Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Builds the body of request number `i`.
pub type BodyFn = Arc<dyn Fn(u64) -> Bytes + Send + Sync>;

/// What to send, and where.
#[derive(Clone)]
pub struct Load {
    pub addr: SocketAddr,
    pub path: String,
    pub body: BodyFn,
    /// Sent with every request, besides `Host` and `Content-Type`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Keep every answer ([`Tally::answers`]), for a phase that looks at each one.
    pub keep_answers: bool,
}

impl Load {
    /// `body` POSTed to `path` on `addr`, with no further header, answers not kept.
    pub fn new(addr: SocketAddr, path: &str, body: BodyFn) -> Self {
        Self {
            addr,
            path: path.into(),
            body,
            headers: Vec::new(),
            keep_answers: false,
        }
    }
}

/// One answer, kept when [`Load::keep_answers`] is set.
pub struct Answer {
    pub status: u16,
    /// From the send (or the intended send, open loop) to the whole body received.
    pub latency: Duration,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a run observed.
pub struct Tally {
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// The first body seen for each status, to show what the server said.
    pub samples: BTreeMap<u16, Bytes>,
    /// Requests that got no answer (connection errors).
    pub errors: u64,
    pub first_error: Option<String>,
    /// Open loop: requests still not sent when the run's hard deadline passed.
    pub unsent: u64,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// Every answer, in no particular order; only when [`Load::keep_answers`] is set.
    pub answers: Vec<Answer>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            statuses: BTreeMap::new(),
            samples: BTreeMap::new(),
            errors: 0,
            first_error: None,
            unsent: 0,
            elapsed: Duration::ZERO,
            answers: Vec::new(),
        }
    }

    fn record(&mut self, latency: Duration, answered: Answered, keep: bool) {
        let Answered {
            status,
            headers,
            body,
        } = answered;
        self.latency.saturating_record(micros(latency));
        *self.statuses.entry(status).or_default() += 1;
        self.samples.entry(status).or_insert_with(|| body.clone());
        if keep {
            self.answers.push(Answer {
                status,
                latency,
                headers,
                body,
            });
        }
    }

    fn error(&mut self, error: anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{error:#}"));
    }

    fn merge(&mut self, other: Tally) {
        self.latency.add(&other.latency).expect("same bounds");
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        for (status, body) in other.samples {
            self.samples.entry(status).or_insert(body);
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.unsent += other.unsent;
        self.answers.extend(other.answers);
    }

    /// Answers received.
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Answers per second.
    pub fn rate(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// A latency in whole microseconds, at least 1 (what the histograms record).
pub fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What the server answered.
struct Answered {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// One keep-alive connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    async fn send(
        &mut self,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Answered> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, self.host.as_str())
            .header(CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(body))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answered {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// Sends request `i` on `connection` (re-opening it if it broke) and records the answer with
/// its latency from `since`.
async fn exchange(
    load: &Load,
    connection: &mut Option<Connection>,
    i: u64,
    since: Instant,
    tally: &mut Tally,
    accepted: &AtomicU64,
) {
    let result = async {
        if connection.is_none() {
            *connection = Some(Connection::open(load.addr).await?);
        }
        let open = connection.as_mut().expect("opened above");
        open.send(&load.path, &load.headers, (load.body)(i)).await
    }
    .await;
    match result {
        Ok(answered) => {
            if answered.status == 202 {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            tally.record(since.elapsed(), answered, load.keep_answers);
        }
        Err(error) => {
            *connection = None;
            tally.error(error);
        }
    }
}

/// `connections` connections send requests back to back until `max_requests` were sent or
/// `duration` has passed. `accepted` counts 202 answers as they come (for live progress).
pub async fn closed_loop(
    load: &Load,
    connections: usize,
    max_requests: u64,
    duration: Duration,
    accepted: Arc<AtomicU64>,
) -> Tally {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (load, next, accepted) = (load.clone(), next.clone(), accepted.clone());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let mut connection = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max_requests || Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                exchange(&load, &mut connection, i, sent, &mut tally, &accepted).await;
            }
            tally
        });
    }
    let mut total = Tally::new();
    while let Some(tally) = tasks.join_next().await {
        total.merge(tally.expect("a load task panicked"));
    }
    total.elapsed = start.elapsed();
    total
}

/// Requests due at `rate` per second for `duration`, sent over up to `connections`
/// connections; latency from each request's intended send time. Requests not sent within
/// `duration + grace` are counted as unsent.
pub async fn open_loop(
    load: &Load,
    connections: usize,
    rate: f64,
    duration: Duration,
    grace: Duration,
) -> Tally {
    let total_requests = (rate * duration.as_secs_f64()).round() as u64;
    let (due_tx, due_rx) = tokio::sync::mpsc::channel::<(u64, Instant)>(1 << 16);
    let due_rx = Arc::new(Mutex::new(due_rx));
    let start = Instant::now();
    let hard_deadline = start + duration + grace;
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (load, due_rx, accepted) = (load.clone(), due_rx.clone(), accepted.clone());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let mut connection = None;
            loop {
                let next = due_rx.lock().await.recv().await;
                let Some((i, intended)) = next else { break };
                if Instant::now() >= hard_deadline {
                    tally.unsent += 1;
                    continue;
                }
                exchange(&load, &mut connection, i, intended, &mut tally, &accepted).await;
            }
            tally
        });
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    for i in 0..total_requests {
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended).await;
        if due_tx.send((i, intended)).await.is_err() {
            break;
        }
    }
    drop(due_tx);
    let mut total = Tally::new();
    while let Some(tally) = tasks.join_next().await {
        total.merge(tally.expect("a load task panicked"));
    }
    total.elapsed = start.elapsed();
    total
}

/// Sends one request on a fresh connection (for probes such as "is it re-opened yet").
pub async fn one(addr: SocketAddr, path: &str, body: Bytes) -> Result<(u16, Bytes)> {
    let answered = Connection::open(addr).await?.send(path, &[], body).await?;
    Ok((answered.status, answered.body))
}

/// A deterministic mixer (splitmix64), so "random" product choices repeat from run to run.
pub fn mix(i: u64) -> u64 {
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
