//! The shop's sales, after the sizes: each releases its requests at one moment and checks the
//! outcome exactly, over HTTP (the database checks of `--database-url` then cover them too).
//!
//! - [`multi_item_sale`]: `n` orders of two products A and B (one unit of each), half listing
//!   A first and half B first, against `n / 4` units of each. All or nothing: exactly `n / 4`
//!   succeed, each with one order number; every other order is rejected `out_of_stock` naming
//!   its first listed item (A and B run out together); A and B end at 0.
//! - [`limit_sale`]: a product with `max_per_buyer` 2 and twice as many units as buyers; each
//!   buyer fires 5 buys at once. Exactly 2 succeed per buyer, the other 3 are rejected
//!   `limit_exceeded`; the stock ends at 0.
//! - [`hold_sale`]: `2k` buyers ask to hold one of `k` units for 2 s: exactly `k` are held (no
//!   order number yet), the others rejected `out_of_stock`. Half the winners check out (each
//!   numbered then), the other half abandon their holds, which expire by themselves; their
//!   units come back; `k` more buyers then buy outright and exactly the released units are sold
//!   to them. All `k` units end sold, none twice; every abandoned hold ends `expired`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use allot_tests::client::{Api, Reply};
use allot_tests::wait::until;
use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

/// How long a checkout waits for its decision, and a poll for a transaction to be decided.
const WAIT: Duration = Duration::from_secs(10);
/// How long a hold of the hold sale lasts.
const HOLD_SECONDS: i64 = 2;

/// One shop sale's result.
pub struct ShopReport {
    pub name: &'static str,
    pub summary: String,
    pub violations: Vec<String>,
}

impl ShopReport {
    pub fn print(&self) {
        let verdict = if self.violations.is_empty() {
            "OK"
        } else {
            "FAIL"
        };
        println!("{:<18} {verdict:<4} {}", self.name, self.summary);
        for violation in &self.violations {
            println!("        - {violation}");
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    fn failed(name: &'static str, error: &anyhow::Error) -> ShopReport {
        ShopReport {
            name,
            summary: "could not run".to_owned(),
            violations: vec![format!("{error:#}")],
        }
    }
}

/// Runs the three sales with `buyers` buyers each (at least 8); `first_user` and up are free
/// user ids.
pub async fn run_all(api: &Api, buyers: usize, first_user: i64) -> Vec<ShopReport> {
    let mut reports = Vec::new();
    let users = (first_user, first_user + 1_000_000, first_user + 2_000_000);
    for (name, result) in [
        (
            "multi-item sale",
            multi_item_sale(api, buyers, users.0).await,
        ),
        ("per-buyer limit", limit_sale(api, buyers, users.1).await),
        ("holds abandoned", hold_sale(api, buyers, users.2).await),
    ] {
        reports.push(match result {
            Ok(mut report) => {
                report.name = name;
                report
            }
            Err(error) => ShopReport::failed(name, &error),
        });
    }
    reports
}

/// Sends every request of `bodies` at once (through `send`), at most 500 on the wire.
async fn fire<F, Fut>(bodies: Vec<Value>, send: F) -> Vec<(Value, Result<Reply, String>)>
where
    F: Fn(Value) -> Fut,
    Fut: Future<Output = Result<Reply, String>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(500));
    let mut tasks = JoinSet::new();
    for body in bodies {
        let permits = Arc::clone(&permits);
        let sent = send(body.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (body, sent.await)
        });
    }
    let mut answers = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        answers.push(joined.expect("a request task panicked"));
    }
    answers
}

/// The transaction ids of the `202`s; any other answer than a `202` or `allowed` (a final
/// answer at once, judged by the caller) is a violation.
fn accepted<'a>(
    answers: &'a [(Value, Result<Reply, String>)],
    violations: &mut Vec<String>,
) -> Vec<(&'a Value, Uuid)> {
    let mut ids = Vec::new();
    for (body, answer) in answers {
        match answer {
            Ok(reply) => match reply.accepted() {
                Some(id) => ids.push((body, id)),
                None if reply.status == reqwest::StatusCode::OK && reply.body["final"] == true => {}
                None => violations.push(format!("{body} was answered {}", reply.describe())),
            },
            Err(why) => violations.push(format!("{body} got no answer: {why}")),
        }
    }
    ids
}

/// Every accepted transaction once decided (not `pending`), by id.
async fn decided(api: &Api, ids: &[Uuid]) -> Result<HashMap<Uuid, Value>> {
    let mut tasks = JoinSet::new();
    let permits = Arc::new(Semaphore::new(200));
    for &id in ids {
        let (api, permits) = (api.clone(), Arc::clone(&permits));
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            for _ in 0..12 {
                let view = api.transaction_json(id, WAIT).await?;
                if view["status"] != "pending" {
                    return Ok((id, view));
                }
            }
            anyhow::bail!("{id} still pending after two minutes")
        });
    }
    let mut views = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, view) = joined.context("a polling task panicked")??;
        views.insert(id, view);
    }
    Ok(views)
}

/// Order numbers of `views` that succeeded: each present, unique.
fn numbers(views: &HashMap<Uuid, Value>, violations: &mut Vec<String>) -> usize {
    let mut seen = HashSet::new();
    for (id, view) in views {
        let number = view["order_number"].as_str();
        match (view["status"].as_str(), number) {
            (Some("succeeded"), Some(number)) if !seen.insert(number.to_owned()) => {
                violations.push(format!("order number {number} given twice"));
            }
            (Some("succeeded"), Some(_)) => {}
            (Some("succeeded"), None) => violations.push(format!("{id} succeeded unnumbered")),
            (_, Some(number)) => violations.push(format!("{id} is numbered {number} but {view}")),
            _ => {}
        }
    }
    seen.len()
}

async fn stock(api: &Api, product: i64) -> Result<(i64, i64)> {
    let view = api.product_json(product).await?;
    let stock = view["stock"].as_i64().context("a product's stock")?;
    Ok((stock, view["held"].as_i64().unwrap_or(0)))
}

/// Buys `body` until it is accepted (its id) or the product shows no stock (`None`), for at
/// most 10 s; any answer but a `202` or the sold-out answer is an error.
async fn buy_while_in_stock(api: &Api, body: &Value, product: i64) -> Result<Option<Uuid>, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = api.add_to_cart_json(body).await?;
        if let Some(id) = reply.accepted() {
            return Ok(Some(id));
        }
        if reply.status != reqwest::StatusCode::OK || reply.body["final"] != true {
            return Err(format!("{body} was answered {}", reply.describe()));
        }
        match stock(api, product).await {
            Ok((0, _)) => return Ok(None),
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(left) => return Err(format!("answered sold out for 10 s with {left:?} left")),
            Err(error) => return Err(format!("{error:#}")),
        }
    }
}

fn unique(what: &str) -> String {
    format!("{what} {:08x}", Uuid::new_v4().as_u128() as u32)
}

/// All or nothing over two products listed in both orders.
pub async fn multi_item_sale(api: &Api, buyers: usize, first_user: i64) -> Result<ShopReport> {
    let units = (buyers / 4).max(1) as i64;
    let a = api
        .create_product(&unique("functional basket A"), units)
        .await?
        .id;
    let b = api
        .create_product(&unique("functional basket B"), units)
        .await?
        .id;
    let bodies: Vec<Value> = (0..buyers)
        .map(|i| {
            let (first, second) = if i % 2 == 0 { (a, b) } else { (b, a) };
            json!({"user_id": first_user + i as i64, "items": [
                {"product_id": first, "quantity": 1}, {"product_id": second, "quantity": 1}]})
        })
        .collect();
    let answers = fire(bodies, |body| {
        let api = api.clone();
        async move { api.place_order(&body).await }
    })
    .await;
    let mut violations = Vec::new();
    let ids = accepted(&answers, &mut violations);
    // An answer at once is the catalogue's sold-out answer, naming the first item listed.
    for (body, answer) in &answers {
        if let Ok(reply) = answer
            && reply.accepted().is_none()
            && reply.body["final"] == true
            && (reply.body["reason"] != "out_of_stock"
                || reply.body["reason_product_id"] != body["items"][0]["product_id"])
        {
            violations.push(format!("{body} answered at once {}", reply.describe()));
        }
    }
    let bodies: HashMap<Uuid, &Value> = ids.iter().map(|(body, id)| (*id, *body)).collect();
    let ids: Vec<Uuid> = bodies.keys().copied().collect();
    let views = decided(api, &ids).await?;
    let sold = numbers(&views, &mut violations);
    for (id, view) in &views {
        let body = bodies[id];
        if view["items"] != body["items"] {
            violations.push(format!("{id} shows items {} for {body}", view["items"]));
        }
        if view["status"] == "rejected"
            && (view["reason"] != "out_of_stock"
                || view["reason_product_id"] != body["items"][0]["product_id"])
        {
            violations.push(format!("{id} rejected {view}, not for its first item"));
        }
    }
    if sold as i64 != units {
        violations.push(format!("{sold} orders succeeded, not exactly {units}"));
    }
    for product in [a, b] {
        let left = stock(api, product).await?;
        if left != (0, 0) {
            violations.push(format!(
                "product {product} ends with (stock, held) {left:?}"
            ));
        }
    }
    Ok(ShopReport {
        name: "",
        summary: format!(
            "{buyers} orders of A and B (half A first, half B first), {units} units each: \
             {} accepted, {sold} succeeded",
            ids.len()
        ),
        violations,
    })
}

/// `max_per_buyer` 2, five buys at once per buyer.
pub async fn limit_sale(api: &Api, buyers: usize, first_user: i64) -> Result<ShopReport> {
    let buyers = (buyers / 4).max(2);
    let units = 2 * buyers as i64;
    let product = api
        .create_product(&unique("functional limited"), units)
        .await?
        .id;
    api.patch_product(product, &json!({"max_per_buyer": 2}))
        .await?;
    let bodies: Vec<Value> = (0..buyers * 5)
        .map(|i| json!({"user_id": first_user + (i / 5) as i64, "product_id": product, "quantity": 1}))
        .collect();
    let answers = fire(bodies, |body| {
        let api = api.clone();
        async move { api.add_to_cart_json(&body).await }
    })
    .await;
    let mut violations = Vec::new();
    let ids = accepted(&answers, &mut violations);
    if ids.len() != answers.len() {
        violations.push(format!(
            "{} of {} buys accepted: the product never sells out before every buyer had 2",
            ids.len(),
            answers.len()
        ));
    }
    let users: HashMap<Uuid, i64> = (ids.iter())
        .map(|(body, id)| (*id, body["user_id"].as_i64().unwrap_or(0)))
        .collect();
    let ids: Vec<Uuid> = users.keys().copied().collect();
    let views = decided(api, &ids).await?;
    let sold = numbers(&views, &mut violations);
    let mut per_buyer: HashMap<i64, (usize, usize)> = HashMap::new();
    for (id, view) in &views {
        let entry = per_buyer.entry(users[id]).or_default();
        match (view["status"].as_str(), view["reason"].as_str()) {
            (Some("succeeded"), _) => entry.0 += 1,
            (Some("rejected"), Some("limit_exceeded")) => entry.1 += 1,
            _ => violations.push(format!("{id}: {view}")),
        }
    }
    let wrong: Vec<_> = (per_buyer.iter())
        .filter(|(_, counts)| **counts != (2, 3))
        .collect();
    if !wrong.is_empty() || per_buyer.len() != buyers {
        violations.push(format!(
            "not every one of {buyers} buyers got exactly 2 (3 limit_exceeded): {:?}",
            &wrong[..wrong.len().min(5)]
        ));
    }
    let left = stock(api, product).await?;
    if left != (0, 0) {
        violations.push(format!("the product ends with (stock, held) {left:?}"));
    }
    Ok(ShopReport {
        name: "",
        summary: format!(
            "{buyers} buyers x 5 buys at once, max_per_buyer 2, {units} units: {sold} succeeded"
        ),
        violations,
    })
}

/// Holds: half the winners check out, half abandon; the released units go to later buyers.
pub async fn hold_sale(api: &Api, buyers: usize, first_user: i64) -> Result<ShopReport> {
    let units = (buyers / 4).max(2) as i64 & !1; // even: half check out, half abandon
    let product = api
        .create_product(&unique("functional held"), units)
        .await?
        .id;
    let bodies: Vec<Value> = (0..2 * units)
        .map(|i| {
            json!({"user_id": first_user + i, "product_id": product, "quantity": 1,
                   "hold_seconds": HOLD_SECONDS})
        })
        .collect();
    let answers = fire(bodies, |body| {
        let api = api.clone();
        async move { api.add_to_cart_json(&body).await }
    })
    .await;
    let mut violations = Vec::new();
    let ids: Vec<Uuid> = (accepted(&answers, &mut violations).into_iter())
        .map(|(_, id)| id)
        .collect();
    let views = decided(api, &ids).await?;
    let held: Vec<Uuid> = (views.iter())
        .filter(|(_, view)| view["status"] == "held")
        .map(|(id, _)| *id)
        .collect();
    for (id, view) in &views {
        let ok = match view["status"].as_str() {
            Some("held") => view["order_number"].is_null() && view["expires_at"].is_string(),
            Some("rejected") => view["reason"] == "out_of_stock",
            _ => false,
        };
        if !ok {
            violations.push(format!("hold request {id}: {view}"));
        }
    }
    if held.len() as i64 != units {
        violations.push(format!("{} holds granted, not exactly {units}", held.len()));
    }
    let (checked_out, abandoned) = held.split_at(held.len() / 2);
    // Half check out at once (well before the expiry); the others walk away.
    let mut numbers_given = HashSet::new();
    for &id in checked_out {
        match api.checkout(id, WAIT).await {
            Ok(reply)
                if reply.status == reqwest::StatusCode::OK
                    && reply.body["status"] == "succeeded" =>
            {
                match reply.body["order_number"].as_str() {
                    Some(number) => {
                        numbers_given.insert(number.to_owned());
                    }
                    None => violations.push(format!("checkout of {id}: {}", reply.describe())),
                }
            }
            Ok(reply) => violations.push(format!("checkout of {id}: {}", reply.describe())),
            Err(why) => violations.push(format!("checkout of {id}: no answer: {why}")),
        }
    }
    if numbers_given.len() != checked_out.len() {
        violations.push("checkouts were not each given their own order number".to_owned());
    }
    // The abandoned holds expire by themselves and give their units back.
    let released = abandoned.len() as i64;
    let back = until(
        "the abandoned units back on sale",
        Duration::from_secs(30),
        || async { (stock(api, product).await.ok() == Some((released, 0))).then_some(()) },
    )
    .await;
    if let Err(error) = back {
        violations.push(format!(
            "{error:#}: (stock, held) {:?}",
            stock(api, product).await.ok()
        ));
    }
    for &id in abandoned {
        let view = api.transaction_json(id, WAIT).await?;
        if view["status"] != "rejected" || view["reason"] != "expired" {
            violations.push(format!("abandoned hold {id} is {view}, not expired"));
        }
    }
    // Later buyers take exactly the released units. An API instance may answer "sold out" at
    // once for up to one refresh of its catalogue snapshot after the units came back (see the
    // README): a buyer told so while the product still shows stock tries again, as a buyer
    // refreshing the page would.
    let mut later = JoinSet::new();
    for i in 0..units {
        let body =
            json!({"user_id": first_user + 2 * units + i, "product_id": product, "quantity": 1});
        let api = api.clone();
        later.spawn(async move { buy_while_in_stock(&api, &body, product).await });
    }
    let mut late = Vec::new();
    while let Some(joined) = later.join_next().await {
        match joined.context("a buyer's task panicked")? {
            Ok(Some(id)) => late.push(id),
            Ok(None) => {}
            Err(why) => violations.push(why),
        }
    }
    let late_views = decided(api, &late).await?;
    let late_sold = numbers(&late_views, &mut violations);
    if late_sold as i64 != released {
        violations.push(format!(
            "{late_sold} later buyers got a unit, not exactly the {released} released"
        ));
    }
    let left = stock(api, product).await?;
    if left != (0, 0) {
        violations.push(format!("the product ends with (stock, held) {left:?}"));
    }
    let sold = checked_out.len() + late_sold;
    if sold as i64 != units {
        violations.push(format!("{sold} units sold in all, not exactly {units}"));
    }
    Ok(ShopReport {
        name: "",
        summary: format!(
            "{} hold requests for {units} units ({HOLD_SECONDS} s): {} held, {} checked out, \
             {released} abandoned and expired, then sold to {late_sold} later buyers",
            2 * units,
            held.len(),
            checked_out.len()
        ),
        violations,
    })
}
