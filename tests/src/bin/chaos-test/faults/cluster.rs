//! Faults of the cluster form: a RabbitMQ node killed (the one leading the most partition
//! queues) or stopped while the other two keep a majority, one of two API instances killed,
//! one of three workers killed, and a rolling restart of every node and every instance.
//!
//! While each fault lasts, a [`Prober`] sends one request after another to the probe products
//! (one per partition, never sold out), through every API instance in turn, and keeps what each
//! was answered and when: from that come the time until every partition accepts again after the
//! fault, the longest pause of accepts on one partition, and the share of requests refused
//! (`503`) while the fault lasted. While a majority of nodes is up, accepts must go on: a
//! partition that accepts nothing for [`MAX_PAUSE`], or a refused share above
//! [`MAX_REFUSED_SHARE`], is a violation. The time until every partition decides again is
//! measured by fresh requests once the fault is injected.

use super::under_load;
use crate::apps::Role;
use crate::load::{Ledger, Reply, Users};
use crate::system::System;
use allot_tests::broker::Broker;
use allot_tests::client::{Api, Order};
use allot_tests::invariants;
use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest a partition may accept nothing while a majority of nodes and one API instance
/// are up: a reconnection to another node plus a leader election take a few seconds.
const MAX_PAUSE: Duration = Duration::from_secs(20);
/// The largest share of the probes' answers that may be `503` while a majority is up.
const MAX_REFUSED_SHARE: f64 = 0.5;
/// Pause between two probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// One probe's answer.
#[derive(Debug, Clone, Copy)]
struct Probe {
    sent: Instant,
    partition: usize,
    accepted: bool,
    refused: bool,
    /// A `503 queue_full`: the partition's queue was at its bound.
    queue_full: bool,
}

/// Requests to every partition, one after another, through every API instance in turn.
pub struct Prober {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Probe>>,
}

impl Prober {
    pub fn start(system: &System) -> Prober {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(probe(
            system.apis.clone(),
            system.ledger.clone(),
            system.users.clone(),
            system.probes.clone(),
            stopped,
        ));
        Prober { stop, task }
    }

    async fn stop(self) -> Vec<Probe> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

async fn probe(
    apis: Arc<[Arc<Api>]>,
    ledger: Arc<Mutex<Ledger>>,
    users: Arc<Users>,
    probes: Vec<i64>,
    stopped: watch::Receiver<bool>,
) -> Vec<Probe> {
    let mut seen = Vec::new();
    let mut n = 0usize;
    while !*stopped.borrow() {
        let partition = n % probes.len();
        let api = &apis[(n / probes.len()) % apis.len()];
        n += 1;
        let user = users.next();
        let order = Order {
            user_id: user,
            product_id: probes[partition],
            quantity: 1,
        };
        let sent = Instant::now();
        let reply = Reply::of(&order, api.add_to_cart(order).await);
        seen.push(Probe {
            sent,
            partition,
            accepted: matches!(reply, Reply::Accepted(_)),
            refused: matches!(reply, Reply::Refused { .. }),
            queue_full: matches!(reply, Reply::Refused { queue_full: true }),
        });
        ledger
            .lock()
            .expect("ledger")
            .record(user, probes[partition], sent, reply);
        tokio::time::sleep(PROBE_EVERY).await;
    }
    seen
}

/// The deepest partition queue seen while a fault lasts (a passive declare on every queue,
/// every 100 ms, through the first node that answers): whether a `503 queue_full` meant a queue
/// really at the API's bound.
struct DepthSampler {
    stop: watch::Sender<bool>,
    /// The deepest depth, and how many samples were read.
    task: JoinHandle<(u32, usize)>,
}

impl DepthSampler {
    fn start(system: &System) -> DepthSampler {
        let (stop, stopped) = watch::channel(false);
        let urls: Vec<String> = (system.services.rabbitmq_nodes().iter())
            .map(|node| node.amqp_url("/"))
            .collect();
        let topology = system.topology.clone();
        let task = tokio::spawn(async move {
            let bounded = Duration::from_secs(2);
            let (mut deepest, mut samples) = (0, 0);
            let mut broker = None;
            let mut next = 0;
            while !*stopped.borrow() {
                if broker.is_none() {
                    let url = &urls[next % urls.len()];
                    next += 1;
                    let connected = Broker::connect(url, topology.clone());
                    broker = tokio::time::timeout(bounded, connected)
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                if let Some(connected) = &broker {
                    match tokio::time::timeout(bounded, connected.deepest()).await {
                        Ok(Ok(depth)) => {
                            deepest = deepest.max(depth);
                            samples += 1;
                        }
                        _ => broker = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (deepest, samples)
        });
        DepthSampler { stop, task }
    }

    async fn stop(self) -> (u32, usize) {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// What the probes of one fault showed.
struct Measured {
    /// From the fault until every partition had accepted a request sent after it.
    accepts_resumed: Option<Duration>,
    /// The longest time one partition accepted nothing, from the fault on.
    longest_pause: Duration,
    accepted: usize,
    refused: usize,
    /// Of the refused, those refused because the queue was full.
    queue_full: usize,
    unanswered: usize,
}

impl Measured {
    fn of(probes: &[Probe], fault: Instant, end: Instant, partitions: usize) -> Measured {
        let window: Vec<&Probe> = (probes.iter())
            .filter(|probe| probe.sent >= fault && probe.sent <= end)
            .collect();
        let mut first = BTreeMap::new();
        let mut last_accept: Vec<Instant> = vec![fault; partitions];
        let mut longest_pause = Duration::ZERO;
        for probe in &window {
            if probe.accepted {
                first.entry(probe.partition).or_insert(probe.sent - fault);
                let pause = probe.sent - last_accept[probe.partition];
                longest_pause = longest_pause.max(pause);
                last_accept[probe.partition] = probe.sent;
            }
        }
        for last in last_accept {
            longest_pause = longest_pause.max(end.saturating_duration_since(last));
        }
        let accepts_resumed =
            (first.len() == partitions).then(|| first.values().copied().max().unwrap_or_default());
        let accepted = window.iter().filter(|probe| probe.accepted).count();
        let refused = window.iter().filter(|probe| probe.refused).count();
        let queue_full = window.iter().filter(|probe| probe.queue_full).count();
        Measured {
            queue_full,
            accepts_resumed,
            longest_pause,
            accepted,
            refused,
            unanswered: window.len() - accepted - refused,
        }
    }

    fn refused_share(&self) -> f64 {
        match self.accepted + self.refused {
            0 => 1.0,
            answered => self.refused as f64 / answered as f64,
        }
    }

    /// Prints the figures; returns the violations (`majority`: the bounds apply).
    fn report(&self, what: &str, majority: bool) -> Vec<String> {
        let resumed = match self.accepts_resumed {
            Some(took) => format!("{:.2} s", took.as_secs_f64()),
            None => "not within the fault".into(),
        };
        println!(
            "    {what}: every partition accepting {resumed} after it; longest pause of one partition {:.2} s; probes 202 {}, 503 {} ({:.1} %; queue_full {}), no answer {}",
            self.longest_pause.as_secs_f64(),
            self.accepted,
            self.refused,
            100.0 * self.refused_share(),
            self.queue_full,
            self.unanswered
        );
        let mut violations = Vec::new();
        if majority && self.longest_pause > MAX_PAUSE {
            violations.push(format!(
                "{what}: a partition accepted nothing for {:.1} s while a majority was up",
                self.longest_pause.as_secs_f64()
            ));
        }
        if majority && self.refused_share() > MAX_REFUSED_SHARE {
            violations.push(format!(
                "{what}: {:.0} % of the probes were refused while a majority was up",
                100.0 * self.refused_share()
            ));
        }
        violations
    }
}

/// Sends one request to every partition (a probe product each), through whichever API instance
/// accepts it (the first may be the one that is down), and waits until all of them are
/// decided: how long that took, or `None` past `deadline`.
async fn every_partition_decides(system: &System, deadline: Duration) -> Result<Option<Duration>> {
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut n = 0;
    for &product in &system.probes {
        loop {
            let api = system.apis[n % system.apis.len()].clone();
            n += 1;
            if let Reply::Accepted(id) = system.order_via(&api, product).await {
                ids.push(id);
                break;
            }
            if started.elapsed() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let left = deadline.saturating_sub(started.elapsed());
    Ok(invariants::wait_decided(&system.pool, &ids, left)
        .await
        .ok()
        .map(|_| started.elapsed()))
}

/// What a fault, or its repair, does.
#[derive(Debug, Clone, Copy)]
enum Action {
    KillNode(u8),
    StopNode(u8),
    StartNode(u8),
    Kill(Role),
    Terminate(Role),
    /// Started again (an API instance: until it is ready).
    Spawn(Role),
}

async fn act(system: &mut System, action: Action) -> Result<()> {
    let started = Instant::now();
    let services = system.services.services().clone();
    match action {
        Action::KillNode(node) => services.kill_node(node).await?,
        Action::StopNode(node) => services.stop_node(node).await?,
        Action::StartNode(node) => services.start_node(node).await?,
        Action::Kill(role) => {
            let before = Instant::now();
            system.kill(role).await?;
            if role.is_api() {
                (system.ledger.lock().expect("ledger")).api_killed(before, Instant::now());
            }
        }
        Action::Terminate(role) => {
            system.terminate(role).await?;
        }
        Action::Spawn(role) => {
            system.spawn(role).await?;
            if role.is_api() {
                system.wait_api_ready(role, Duration::from_secs(60)).await?;
            }
        }
    }
    println!(
        "    {action:?} took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Injects `fault` under the prober and keeps it for `hold` at least, then `restore`s; measures
/// accepts (from the probes, from the fault until the restore) and decisions (fresh requests
/// to every partition, from the fault on). `majority`: the bounds on accepts apply.
async fn measured(
    system: &mut System,
    what: &str,
    hold: Duration,
    fault: Action,
    restore: Action,
) -> Result<Vec<String>> {
    let prober = Prober::start(system);
    under_load(Duration::from_millis(1500)).await;
    let depths = DepthSampler::start(system);
    let injected = Instant::now();
    act(system, fault).await.with_context(|| what.to_owned())?;
    let mut violations = Vec::new();
    match every_partition_decides(system, Duration::from_secs(60)).await? {
        Some(_) => println!(
            "    {what}: every partition deciding again {:.2} s after the fault",
            injected.elapsed().as_secs_f64()
        ),
        None => violations.push(format!("{what}: not every partition decided within 60 s")),
    }
    let held = injected.elapsed();
    if held < hold {
        under_load(hold - held).await;
    }
    let end = Instant::now();
    let (deepest, samples) = depths.stop().await;
    println!(
        "    {what}: deepest partition queue meanwhile {deepest} messages ({samples} samples; the API refuses at {})",
        system.queue_bound()
    );
    act(system, restore)
        .await
        .with_context(|| format!("after {what}"))?;
    under_load(Duration::from_millis(1000)).await;
    let probes = prober.stop().await;
    let partitions = system.probes.len();
    violations.extend(Measured::of(&probes, injected, end, partitions).report(what, true));
    Measured::of(&probes, end, Instant::now(), partitions).report("  after the repair", false);
    Ok(violations)
}

/// The partition queues' leaders and members, as a running node reports them.
async fn queues(system: &System) -> Result<Vec<(String, String, Vec<String>)>> {
    let services = system.services.services();
    for node in services.rabbitmq_nodes() {
        if services.node_pid(node.index).await.is_none() {
            continue;
        }
        let output = services
            .rabbitmqctl_on(
                &node,
                &[
                    "-q",
                    "list_queues",
                    "name",
                    "leader",
                    "members",
                    "--formatter",
                    "json",
                ],
            )
            .await?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(output.trim())
            .with_context(|| format!("reading list_queues: {output}"))?;
        return Ok(rows
            .iter()
            .map(|row| {
                let text = |value: &serde_json::Value| value.as_str().unwrap_or("").to_owned();
                let members = row["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                (text(&row["name"]), text(&row["leader"]), members)
            })
            .collect());
    }
    anyhow::bail!("no RabbitMQ node runs")
}

/// Prints how many partition queues each node leads, checks that every queue has a member on
/// every node; returns the node (index) that leads the most.
async fn leaders(system: &System) -> Result<(u8, Vec<String>)> {
    let nodes = system.services.rabbitmq_nodes();
    let queues = queues(system).await?;
    let mut led: BTreeMap<u8, usize> = nodes.iter().map(|node| (node.index, 0)).collect();
    let mut violations = Vec::new();
    for (name, leader, members) in &queues {
        if let Some(node) = nodes.iter().find(|node| node.name == *leader) {
            *led.entry(node.index).or_default() += 1;
        }
        if members.len() != nodes.len() {
            violations.push(format!(
                "queue {name} has {} members ({members:?}), not {}",
                members.len(),
                nodes.len()
            ));
        }
    }
    let shown: Vec<String> = (led.iter())
        .map(|(node, count)| format!("node {node} {count}"))
        .collect();
    println!(
        "    {} partition queues, {} members each; leaders: {}",
        queues.len(),
        nodes.len(),
        shown.join(", ")
    );
    let busiest = (led.iter())
        .max_by_key(|(node, count)| (**count, std::cmp::Reverse(**node)))
        .map(|(node, _)| *node)
        .unwrap_or(1);
    Ok((busiest, violations))
}

/// `kill -9` (or a clean stop) of the RabbitMQ node that leads the most partition queues, for
/// `down_for` under load, then started again (it rejoins the cluster by itself).
pub async fn node_down(system: &mut System, down_for: Duration, kill: bool) -> Result<Vec<String>> {
    let (node, mut violations) = leaders(system).await?;
    let how = if kill { "killed (SIGKILL)" } else { "stopped" };
    let fault = if kill {
        Action::KillNode(node)
    } else {
        Action::StopNode(node)
    };
    let what = format!("RabbitMQ node {node} (the most leaders) {how}");
    violations.extend(measured(system, &what, down_for, fault, Action::StartNode(node)).await?);
    let (_, members) = leaders(system).await?;
    violations.extend(members);
    Ok(violations)
}

/// `kill -9` of one of the two API instances; the clients move to the other; then it is
/// started again.
pub async fn api_instance_crash(system: &mut System) -> Result<Vec<String>> {
    let role = Role::ApiB;
    let what = format!("API instance {} killed (SIGKILL)", role.name());
    measured(
        system,
        &what,
        Duration::from_secs(3),
        Action::Kill(role),
        Action::Spawn(role),
    )
    .await
}

/// `kill -9` of one of the three workers: the others take its partitions over; then it is
/// started again.
pub async fn worker_instance_crash(system: &mut System) -> Result<Vec<String>> {
    let role = Role::WorkerC;
    let what = format!("worker {} killed (SIGKILL)", role.name());
    measured(
        system,
        &what,
        Duration::from_secs(3),
        Action::Kill(role),
        Action::Spawn(role),
    )
    .await
}

/// Every RabbitMQ node stopped and started, one at a time, then every API instance and every
/// worker restarted (SIGTERM), one at a time; accepts and decisions measured at each step.
pub async fn rolling_restart(system: &mut System) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    for node in system.services.rabbitmq_nodes() {
        let index = node.index;
        let what = format!("rolling: RabbitMQ node {index} stopped");
        violations.extend(
            measured(
                system,
                &what,
                Duration::from_secs(2),
                Action::StopNode(index),
                Action::StartNode(index),
            )
            .await?,
        );
    }
    let (_, members) = leaders(system).await?;
    violations.extend(members);
    // Each stop hands the node's leaders to the others, so the last node stopped leads none
    // and the first may lead all: what an operator does after a rolling restart.
    let services = system.services.services().clone();
    let first = services.rabbitmq_node(1)?;
    services
        .rabbitmq_queues_on(&first, &["-q", "rebalance", "quorum"])
        .await?;
    println!("    rabbitmq-queues rebalance quorum:");
    let (_, members) = leaders(system).await?;
    violations.extend(members);
    for role in system.api_roles().into_iter().chain(system.worker_roles()) {
        let what = format!("rolling: {} restarted (SIGTERM)", role.name());
        violations.extend(
            measured(
                system,
                &what,
                Duration::from_secs(1),
                Action::Terminate(role),
                Action::Spawn(role),
            )
            .await?,
        );
    }
    Ok(violations)
}

/// Two of the three RabbitMQ nodes stopped for `down_for`: no queue has a majority, so nothing
/// may be accepted (a `202` to a request sent meanwhile is a violation, checked by the ledger);
/// then one node started again (a majority: accepts must resume, measured), then the other.
pub async fn majority_lost(system: &mut System, down_for: Duration) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let prober = Prober::start(system);
    under_load(Duration::from_millis(1500)).await;
    let services = system.services.services().clone();
    for node in [3, 2] {
        act(system, Action::StopNode(node)).await?;
    }
    system.ledger.lock().expect("ledger").mark_outage(true);
    let down = Instant::now();
    under_load(down_for).await;
    let end = Instant::now();
    system.ledger.lock().expect("ledger").mark_outage(false);
    act(system, Action::StartNode(2)).await?;
    let back = Instant::now();
    match every_partition_decides(system, Duration::from_secs(90)).await? {
        Some(_) => println!(
            "    majority back (node 2 started): every partition deciding again {:.2} s after it answered",
            back.elapsed().as_secs_f64()
        ),
        None => violations.push("majority back: not every partition decided within 90 s".into()),
    }
    under_load(Duration::from_secs(2)).await;
    let probes_until = Instant::now();
    act(system, Action::StartNode(3)).await?;
    under_load(Duration::from_millis(1000)).await;
    let probes = prober.stop().await;
    let partitions = system.probes.len();
    let outage = Measured::of(&probes, down, end, partitions);
    outage.report("two nodes of three down", false);
    if outage.accepted > 0 {
        violations.push(format!(
            "{} probes accepted while two nodes of three were down",
            outage.accepted
        ));
    }
    violations.extend(
        Measured::of(&probes, back, probes_until, partitions)
            .report("majority back (node 2 started)", true),
    );
    let (_, members) = leaders(system).await?;
    violations.extend(members);
    services
        .rabbitmq_queues_on(&services.rabbitmq_node(1)?, &["-q", "rebalance", "quorum"])
        .await?;
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(fault: Instant, ms: u64, partition: usize, answer: &str) -> Probe {
        Probe {
            sent: fault + Duration::from_millis(ms),
            partition,
            accepted: answer == "202",
            refused: answer != "202" && answer != "none",
            queue_full: answer == "queue_full",
        }
    }

    #[test]
    fn the_measures_of_a_fault_come_from_its_probes_alone() {
        let fault = Instant::now() + Duration::from_secs(10);
        let before = Probe {
            sent: fault - Duration::from_millis(100),
            ..probe(fault, 0, 0, "503")
        };
        let probes = [
            before,
            probe(fault, 100, 0, "202"),
            probe(fault, 200, 1, "503"),
            probe(fault, 300, 0, "queue_full"),
            probe(fault, 400, 1, "none"),
            probe(fault, 900, 1, "202"),
            probe(fault, 1000, 0, "202"),
            probe(fault, 5000, 0, "202"),
        ];
        let end = fault + Duration::from_millis(1200);
        let measured = Measured::of(&probes, fault, end, 2);
        // Partition 1 first accepted 0.9 s after the fault: every partition by then.
        assert_eq!(measured.accepts_resumed, Some(Duration::from_millis(900)));
        // Partition 1 accepted nothing from the fault until 0.9 s.
        assert_eq!(measured.longest_pause, Duration::from_millis(900));
        assert_eq!(
            (
                measured.accepted,
                measured.refused,
                measured.queue_full,
                measured.unanswered
            ),
            (3, 2, 1, 1)
        );
        assert!((measured.refused_share() - 0.4).abs() < 1e-9);
        assert!(measured.report("test", true).is_empty());

        // A partition that never accepts within the window: no resumption, and its pause runs
        // to the window's end.
        let silent = Measured::of(&probes[..5], fault, end, 2);
        assert_eq!(silent.accepts_resumed, None);
        assert_eq!(silent.longest_pause, Duration::from_millis(1200));
        let over = Measured::of(&probes[2..4], fault, fault + MAX_PAUSE * 2, 2);
        assert_eq!(over.report("test", true).len(), 2);
        assert!(over.report("test", false).is_empty());
    }
}
