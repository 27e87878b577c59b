//! The sale: concurrent clients buying one unit at a time, round robin over the products, and
//! the ledger of what every request was answered. Every 25th request is deliberately invalid
//! (quantity 0) and must be answered 422 whatever fault is running.
//!
//! During an outage the fault marks (broker or Redis down), a request sent after the outage
//! began and answered before it ended must not get a 202: the ledger records a violation.
//!
//! Every request the chaos test sends through the API carries a user id of its own (from
//! [`Users`]), so a row in `transactions` tells which request it came from even when the client
//! never learnt its transaction id (a 503, a sold-out answer, an answer lost to a `kill -9`).
//!
//! Besides the sale, shoppers ([`Load::start_shop`]) place orders of two products (listed in
//! either order, all or nothing) and ask for holds that take a place of a slot, then check out,
//! cancel or abandon each hold (it expires by itself); the checks prove after every fault that
//! each of those products and the slot kept their units and places exactly.

use allot_tests::client::{self, Answer, Api, Order, Unavailable};
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Hands out user ids, one per request for the whole run.
#[derive(Debug)]
pub struct Users(AtomicI64);

impl Default for Users {
    fn default() -> Users {
        Users(AtomicI64::new(1))
    }
}

impl Users {
    pub fn next(&self) -> i64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// How one `addToCart` of the sale was answered, as the ledger counts it (the kit's client has
/// judged the answer strictly: exact bodies, `Retry-After` and a documented code on a 503).
#[derive(Debug, Clone)]
pub enum Reply {
    /// 202 with a pending transaction and a matching `Location`.
    Accepted(Uuid),
    /// 503 with `Retry-After`; `queue_full` when its code says the queue was full.
    Refused { queue_full: bool },
    /// 200 `rejected` `out_of_stock` with `"final": true`: the API's sold-out short-circuit, a
    /// final answer that records nothing (no transaction id).
    SoldOut,
    /// 422 `invalid_body`, for the deliberately bad requests (quantity 0).
    Invalid,
    /// No HTTP answer (the API is down or restarting).
    Unanswered,
    /// Anything else: a broken promise, described.
    Unexpected(String),
}

impl Reply {
    /// What `answer` to `order` means for the sale.
    pub fn of(order: &Order, answer: Answer) -> Reply {
        match answer {
            Answer::Accepted(id) => Reply::Accepted(id),
            Answer::Refused { reason, .. } => Reply::Refused {
                queue_full: reason == Unavailable::QueueFull,
            },
            Answer::SoldOut if order.quantity > 0 => Reply::SoldOut,
            Answer::Error { status, code, .. }
                if order.quantity == 0
                    && status == StatusCode::UNPROCESSABLE_ENTITY
                    && code == "invalid_body" =>
            {
                Reply::Invalid
            }
            Answer::Unanswered(_) => Reply::Unanswered,
            other => Reply::Unexpected(format!(
                "{} for quantity {}",
                other.describe(),
                order.quantity
            )),
        }
    }
}

impl Reply {
    /// What an answer to an order of several products or a hold request means for the sale.
    pub fn of_shop(answer: Result<client::Reply, String>) -> Reply {
        let reply = match answer {
            Ok(reply) => reply,
            Err(_) => return Reply::Unanswered,
        };
        if let Some(id) = reply.accepted() {
            return Reply::Accepted(id);
        }
        if let Some(code) = reply.refused() {
            return match Unavailable::from_code(code) {
                Some(reason) => Reply::Refused {
                    queue_full: reason == Unavailable::QueueFull,
                },
                None => Reply::Unexpected(format!("a 503 of unknown code: {}", reply.describe())),
            };
        }
        if reply.status == StatusCode::OK
            && reply.body["final"] == true
            && reply.body["reason"] == "out_of_stock"
        {
            return Reply::SoldOut;
        }
        Reply::Unexpected(reply.describe())
    }
}

/// What the client of one request (one user id) was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// 202 with this transaction id.
    Accepted(Uuid),
    /// 503: not taken, never to be sold.
    Refused,
    /// 200 sold out, final: nothing recorded.
    SoldOut,
    /// 422: nothing recorded.
    Invalid,
    /// No answer: sent at `sent`, given up at `gave_up`.
    Lost { sent: Instant, gave_up: Instant },
    /// An answer that broke a promise (already a violation).
    Unexpected,
}

/// One request a client sent through the API.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub product: i64,
    pub said: Said,
}

/// Everything the clients were answered, since the start of the run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every id that got a 202, with its product (quantity is always 1).
    pub accepted: HashMap<Uuid, i64>,
    /// 202s per product.
    pub demand: HashMap<i64, u64>,
    /// Every request sent through the API, by its user id (each has its own).
    pub requests: HashMap<i64, Request>,
    pub refused: u64,
    pub queue_full: u64,
    /// Sold-out answers per product.
    pub sold_out: HashMap<i64, u64>,
    pub invalid: u64,
    /// Requests without an answer, per product.
    pub lost: HashMap<i64, u64>,
    /// Every `kill -9` of the API: just before the signal, and once the process was gone. Only a
    /// request in flight across one may have been decided without its client seeing the answer.
    pub api_kills: Vec<(Instant, Instant)>,
    /// Slowest 503 seen during a marked outage.
    pub slowest_outage_refusal: Duration,
    /// Holds whose checkout was answered `200` (succeeded): they must be sold.
    pub checked_out: Vec<Uuid>,
    /// Holds whose cancel was answered `200` (rejected, cancelled): they must be released.
    pub cancelled: Vec<Uuid>,
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

    /// Records the answer to the request of `user` (a fresh user id from [`Users`]).
    pub fn record(&mut self, user: i64, product: i64, sent: Instant, reply: Reply) {
        let in_outage = self.outage_since.is_some_and(|since| sent >= since);
        let said = match reply {
            Reply::Accepted(id) => {
                if in_outage {
                    self.violations.push(format!(
                        "a 202 ({id}) for a request sent while a dependency was down"
                    ));
                }
                self.accept(id, product);
                Said::Accepted(id)
            }
            Reply::Refused { queue_full } => {
                self.refused += 1;
                self.queue_full += u64::from(queue_full);
                if in_outage {
                    self.slowest_outage_refusal = self.slowest_outage_refusal.max(sent.elapsed());
                }
                Said::Refused
            }
            Reply::SoldOut => {
                *self.sold_out.entry(product).or_default() += 1;
                Said::SoldOut
            }
            Reply::Invalid => {
                self.invalid += 1;
                Said::Invalid
            }
            Reply::Unanswered => {
                *self.lost.entry(product).or_default() += 1;
                Said::Lost {
                    sent,
                    gave_up: Instant::now(),
                }
            }
            Reply::Unexpected(what) => {
                self.violations.push(format!("unexpected answer: {what}"));
                Said::Unexpected
            }
        };
        if self
            .requests
            .insert(user, Request { product, said })
            .is_some()
        {
            self.violations
                .push(format!("the chaos test sent two requests as user {user}"));
        }
    }

    /// Records a `kill -9` of the API: `before` just before the signal, `after` once it was gone.
    pub fn api_killed(&mut self, before: Instant, after: Instant) {
        self.api_kills.push((before, after));
    }

    /// Whether a request sent at `sent` and given up at `gave_up` was in flight across a
    /// `kill -9` of the API.
    pub fn cut_by_kill(&self, sent: Instant, gave_up: Instant) -> bool {
        (self.api_kills.iter()).any(|&(before, after)| sent <= after && gave_up >= before)
    }

    /// The requests in flight across the kill `(before, after)`, by user id.
    pub fn cut_by(&self, before: Instant, after: Instant) -> Vec<i64> {
        (self.requests.iter())
            .filter(|(_, request)| {
                matches!(request.said, Said::Lost { sent, gave_up } if sent <= after && gave_up >= before)
            })
            .map(|(user, _)| *user)
            .collect()
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
            no_answer: self.lost.values().sum(),
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
    /// Starts `clients` buyers over `products`, each request with a fresh user id from `users`,
    /// spread over the API instances `apis` (a client whose API does not answer moves on to the
    /// next, as behind a load balancer).
    pub fn start(
        apis: Arc<[Arc<Api>]>,
        ledger: Arc<Mutex<Ledger>>,
        users: Arc<Users>,
        products: Arc<[i64]>,
        clients: usize,
    ) -> Load {
        let (stop, stopped) = watch::channel(false);
        let mut set = JoinSet::new();
        for client in 0..clients {
            let (apis, ledger, users, products, stopped) = (
                apis.clone(),
                ledger.clone(),
                users.clone(),
                products.clone(),
                stopped.clone(),
            );
            set.spawn(buyer(apis, ledger, users, products, stopped, client));
        }
        Load { stop, clients: set }
    }

    /// Starts `clients` shoppers of `shop`: half place orders of its two products, half ask
    /// for holds of its held product with a place of its slot.
    pub fn start_shop(
        api: Arc<Api>,
        ledger: Arc<Mutex<Ledger>>,
        users: Arc<Users>,
        shop: Shop,
        clients: usize,
    ) -> Load {
        let (stop, stopped) = watch::channel(false);
        let mut set = JoinSet::new();
        for client in 0..clients {
            let (api, ledger, users, stopped) =
                (api.clone(), ledger.clone(), users.clone(), stopped.clone());
            set.spawn(shopper(api, ledger, users, shop, stopped, client));
        }
        Load { stop, clients: set }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.clients.join_next().await.is_some() {}
    }
}

async fn buyer(
    apis: Arc<[Arc<Api>]>,
    ledger: Arc<Mutex<Ledger>>,
    users: Arc<Users>,
    products: Arc<[i64]>,
    stopped: watch::Receiver<bool>,
    client: usize,
) {
    let mut n: usize = 0;
    let mut api = client;
    while !*stopped.borrow() {
        n += 1;
        let product = products[(client + n) % products.len()];
        let quantity = if n.is_multiple_of(25) { 0 } else { 1 };
        let user = users.next();
        let sent = Instant::now();
        let order = Order {
            user_id: user,
            product_id: product,
            quantity,
        };
        let reply = Reply::of(&order, apis[api % apis.len()].add_to_cart(order).await);
        if matches!(reply, Reply::Unanswered) {
            api += 1;
        }
        let pause = matches!(
            reply,
            Reply::Unanswered | Reply::Refused { .. } | Reply::SoldOut
        );
        ledger
            .lock()
            .expect("ledger lock")
            .record(user, product, sent, reply);
        if pause {
            // What a well-behaved client does with a 503, a refused connection or a sold-out
            // product (shortened): waits a little before trying again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The shop's products the shoppers buy: two bought together in orders, one bought as holds
/// that take a place of the slot.
#[derive(Debug, Clone, Copy)]
pub struct Shop {
    pub basket: [i64; 2],
    pub held: i64,
    pub slot: i64,
}

/// How long a shopper's hold lasts.
const HOLD_SECONDS: i64 = 2;
/// How long a shopper waits for a decision.
const WAIT: Duration = Duration::from_secs(3);

async fn shopper(
    api: Arc<Api>,
    ledger: Arc<Mutex<Ledger>>,
    users: Arc<Users>,
    shop: Shop,
    stopped: watch::Receiver<bool>,
    client: usize,
) {
    let mut n: usize = 0;
    while !*stopped.borrow() {
        n += 1;
        let user = users.next();
        let sent = Instant::now();
        let holds = client % 2 == 1;
        let (product, answer) = if holds {
            let body = json!({"user_id": user, "product_id": shop.held, "quantity": 1,
                              "hold_seconds": HOLD_SECONDS, "slot_id": shop.slot});
            (shop.held, api.add_to_cart_json(&body).await)
        } else {
            let [a, b] = shop.basket;
            let items = if n.is_multiple_of(2) { [a, b] } else { [b, a] };
            let body = json!({"user_id": user, "items": [
                {"product_id": items[0], "quantity": 1}, {"product_id": items[1], "quantity": 1}]});
            (items[0], api.place_order(&body).await)
        };
        let reply = Reply::of_shop(answer);
        let pause = matches!(
            reply,
            Reply::Unanswered | Reply::Refused { .. } | Reply::SoldOut
        );
        let accepted = match reply {
            Reply::Accepted(id) => Some(id),
            _ => None,
        };
        ledger
            .lock()
            .expect("ledger lock")
            .record(user, product, sent, reply);
        if let Some(id) = accepted.filter(|_| holds) {
            settle(&api, &ledger, id, n % 3).await;
        }
        if pause {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Once the hold `id` is granted: checks it out (`choice` 0), cancels it (1) or abandons it
/// (2), and records a `200`; any other documented answer (`202`, `409`, `503`, none) is allowed
/// under faults, anything else is a violation.
async fn settle(api: &Api, ledger: &Mutex<Ledger>, id: Uuid, choice: usize) {
    let Ok(view) = api.transaction_json(id, WAIT).await else {
        return;
    };
    if view["status"] != "held" || choice == 2 {
        return;
    }
    let answer = if choice == 0 {
        api.checkout(id, WAIT).await
    } else {
        api.cancel(id, WAIT).await
    };
    let Ok(reply) = answer else { return };
    let mut ledger = ledger.lock().expect("ledger lock");
    match (reply.status, choice) {
        (StatusCode::OK, 0) if reply.body["status"] == "succeeded" => ledger.checked_out.push(id),
        (StatusCode::OK, 1) if reply.body["status"] == "rejected" => ledger.cancelled.push(id),
        (StatusCode::ACCEPTED | StatusCode::SERVICE_UNAVAILABLE, _) => {}
        (StatusCode::CONFLICT, _)
            if matches!(reply.error_code(), Some("not_held" | "hold_expired")) => {}
        _ => ledger.violations.push(format!(
            "unexpected answer to {} of {id}: {}",
            ["checkout", "cancel"][choice],
            reply.describe()
        )),
    }
}
