//! The sale: concurrent clients buying one unit at a time, round robin over the products, and
//! the ledger of what every request was answered. Every 25th request is deliberately invalid
//! (quantity 0) and must be answered 422 whatever fault is running.
//!
//! During an outage the fault marks (broker or Redis down), a request sent after the outage
//! began and answered before it ended must not get a 202: the ledger records a violation.

use crate::api::{Answer, Api};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Everything the clients were answered, since the start of the run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every id that got a 202, with its product (quantity is always 1).
    pub accepted: HashMap<Uuid, i64>,
    /// 202s per product.
    pub demand: HashMap<i64, u64>,
    pub refused: u64,
    pub queue_full: u64,
    /// Sold-out answers per product.
    pub sold_out: HashMap<i64, u64>,
    pub invalid: u64,
    pub no_answer: u64,
    /// Slowest 503 seen during a marked outage.
    pub slowest_outage_refusal: Duration,
    pub violations: Vec<String>,
    /// When the current outage began, if one is marked.
    outage_since: Option<Instant>,
}

impl Ledger {
    pub fn accept(&mut self, id: Uuid, product: i64) {
        if self.accepted.insert(id, product).is_none() {
            *self.demand.entry(product).or_default() += 1;
        }
    }

    /// Marks the start (`true`) or end of an outage during which no 202 may be given.
    pub fn mark_outage(&mut self, down: bool) {
        self.outage_since = down.then(Instant::now);
    }

    pub fn record(&mut self, product: i64, sent: Instant, answer: Answer) {
        let in_outage = self.outage_since.is_some_and(|since| sent >= since);
        match answer {
            Answer::Accepted(id) => {
                if in_outage {
                    self.violations.push(format!(
                        "a 202 ({id}) for a request sent while a dependency was down"
                    ));
                }
                self.accept(id, product);
            }
            Answer::Refused { queue_full } => {
                self.refused += 1;
                self.queue_full += u64::from(queue_full);
                if in_outage {
                    self.slowest_outage_refusal = self.slowest_outage_refusal.max(sent.elapsed());
                }
            }
            Answer::SoldOut => *self.sold_out.entry(product).or_default() += 1,
            Answer::Invalid => self.invalid += 1,
            Answer::Unanswered => self.no_answer += 1,
            Answer::Unexpected(what) => self.violations.push(format!("unexpected answer: {what}")),
        }
    }

    pub fn reset_outage_stats(&mut self) {
        self.slowest_outage_refusal = Duration::ZERO;
    }

    /// The counts, for the report.
    pub fn counts(&self) -> Counts {
        Counts {
            accepted: self.accepted.len() as u64,
            refused: self.refused,
            queue_full: self.queue_full,
            sold_out: self.sold_out.values().sum(),
            invalid: self.invalid,
            no_answer: self.no_answer,
        }
    }
}

/// A snapshot of the ledger's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub accepted: u64,
    pub refused: u64,
    pub queue_full: u64,
    pub sold_out: u64,
    pub invalid: u64,
    pub no_answer: u64,
}

impl Counts {
    pub fn since(self, before: Counts) -> Counts {
        Counts {
            accepted: self.accepted - before.accepted,
            refused: self.refused - before.refused,
            queue_full: self.queue_full - before.queue_full,
            sold_out: self.sold_out - before.sold_out,
            invalid: self.invalid - before.invalid,
            no_answer: self.no_answer - before.no_answer,
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "202 {}, 503 {} (queue full {}), 200 sold out {}, 422 {}, no answer {}",
            self.accepted,
            self.refused,
            self.queue_full,
            self.sold_out,
            self.invalid,
            self.no_answer
        )
    }
}

/// Running clients; [`Load::stop`] ends them.
pub struct Load {
    stop: watch::Sender<bool>,
    clients: JoinSet<()>,
}

impl Load {
    /// Starts `clients` buyers over `products`. User ids start at `first_user` (so every run
    /// phase has its own).
    pub fn start(
        api: Arc<Api>,
        ledger: Arc<Mutex<Ledger>>,
        products: Arc<[i64]>,
        clients: usize,
        first_user: i64,
    ) -> Load {
        let (stop, stopped) = watch::channel(false);
        let mut set = JoinSet::new();
        for client in 0..clients {
            let (api, ledger, products, stopped) = (
                api.clone(),
                ledger.clone(),
                products.clone(),
                stopped.clone(),
            );
            let user_base = first_user + client as i64 * 1_000_000;
            set.spawn(buyer(api, ledger, products, stopped, client, user_base));
        }
        Load { stop, clients: set }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.clients.join_next().await.is_some() {}
    }
}

async fn buyer(
    api: Arc<Api>,
    ledger: Arc<Mutex<Ledger>>,
    products: Arc<[i64]>,
    stopped: watch::Receiver<bool>,
    client: usize,
    user_base: i64,
) {
    let mut n: usize = 0;
    while !*stopped.borrow() {
        n += 1;
        let product = products[(client + n) % products.len()];
        let quantity = if n.is_multiple_of(25) { 0 } else { 1 };
        let sent = Instant::now();
        let answer = api
            .add_to_cart(user_base + n as i64, product, quantity)
            .await;
        let pause = matches!(
            answer,
            Answer::Unanswered | Answer::Refused { .. } | Answer::SoldOut
        );
        ledger
            .lock()
            .expect("ledger lock")
            .record(product, sent, answer);
        if pause {
            // What a well-behaved client does with a 503, a refused connection or a sold-out
            // product (shortened): waits a little before trying again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
