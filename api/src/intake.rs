//! The intake: the one step from a validated purchase request to `Ok(())` (accepted: RabbitMQ
//! confirmed the message that carries it) or a [`Refusal`]. Group commit lives here.
//!
//! Each partition has a lane: a task that takes the requests handed to it, in arrival order,
//! and settles them a message at a time. While one message of the lane is in flight (its
//! pending records written, published, awaiting the broker's confirm), the requests that arrive
//! wait in the lane; the next message carries all of them, up to [`EnvelopeLimits`]. A lone
//! request is sent at once (no linger), so at low load a request costs what it cost before, and
//! as load rises the cost per request falls: one Redis round trip, one publish, one confirm, one
//! delivery and one settlement for a whole message.
//!
//! Settling a message, in order:
//! 1. its requests are recorded as `pending` in Redis, in one pipeline (a failure refuses them
//!    all, nothing was published);
//! 2. the envelope is published and its confirm awaited;
//! 3. a confirm accepts every request in it; a refusal (queue full, broker down) refuses every
//!    one and removes their pending records; a publish the broker may have stored (no confirm
//!    in time, connection lost after sending) withdraws them in PostgreSQL (see
//!    [`stored::withdraw`]): each one a worker decided first was accepted after all, the others
//!    are refused and can never be sold.
//!
//! A request whose client went away meanwhile is settled all the same; its answer is dropped.
//!
//! A checkout or cancel of a hold ([`Command`]) takes the same lanes, to its hold's partition:
//! it has no pending status of its own (its hold's stays as it is), and one the broker may have
//! stored unconfirmed is withdrawn in PostgreSQL too ([`stored::withdraw_commands`]), so that a
//! `503` never confirms or releases a hold.

use crate::publisher::{PublishError, Publisher};
use allot_shared::message::{envelope, envelope_len};
use allot_shared::status_store::StatusStore;
use allot_shared::stored::{self, Withdrawal};
use allot_shared::{
    Clock, Command, CommandOutcome, Order, PartitionId, ProductId, Request, SystemClock,
    TransactionView,
};
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Why a request was not accepted. Each becomes a 503 with `Retry-After`, except
/// [`Refusal::Unroutable`] (a deployment error, 500).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The partition queue is at its bound (the API's own, or the broker's).
    #[error("too many pending orders for this product's partition")]
    QueueFull,
    /// The broker is down or did not confirm.
    #[error("the order queue is unavailable")]
    BrokerUnavailable,
    /// Redis could not record the pending status, or reserve a place in the queue's shared
    /// bound; nothing was published.
    #[error("the status store is unavailable")]
    StoreUnavailable,
    /// The partition queue does not exist.
    #[error("queue {0} does not exist")]
    Unroutable(String),
}

impl Refusal {
    /// The `Retry-After` a client should respect.
    pub fn retry_after_secs(&self) -> u32 {
        match self {
            Refusal::QueueFull | Refusal::StoreUnavailable | Refusal::Unroutable(_) => 1,
            Refusal::BrokerUnavailable => 2,
        }
    }

    fn of_publish(err: &PublishError) -> Refusal {
        match err {
            PublishError::QueueFull => Refusal::QueueFull,
            PublishError::Unroutable(queue) => Refusal::Unroutable(queue.clone()),
            PublishError::Timeout
            | PublishError::Disconnected
            | PublishError::Unreachable(_)
            | PublishError::ConfirmLost(_) => Refusal::BrokerUnavailable,
        }
    }
}

/// How big one message may grow.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeLimits {
    /// Most requests in one message.
    pub max_requests: usize,
    /// Most bytes in one message's body (a single request larger than this still goes alone).
    pub max_bytes: usize,
    /// Messages of one partition in flight at once (published, confirm awaited).
    pub in_flight: usize,
}

/// The lanes of every partition.
pub struct Intake {
    lanes: Vec<mpsc::Sender<Job>>,
    publisher: Arc<Publisher>,
}

/// One request handed to a lane, and where its answer goes.
struct Job {
    request: Request,
    json: Vec<u8>,
    answer: oneshot::Sender<Result<(), Refusal>>,
}

/// What a lane needs to settle a message.
struct Settler {
    publisher: Arc<Publisher>,
    statuses: StatusStore,
    pool: PgPool,
}

impl Intake {
    /// Starts one lane per partition of `publisher`'s topology.
    pub fn start(
        publisher: Arc<Publisher>,
        statuses: StatusStore,
        pool: PgPool,
        limits: EnvelopeLimits,
    ) -> Intake {
        let settler = Arc::new(Settler {
            publisher: publisher.clone(),
            statuses,
            pool,
        });
        let lanes = publisher
            .partitions()
            .map(|partition| {
                let (sender, receiver) = mpsc::channel(limits.max_requests.max(1) * 8);
                tokio::spawn(run_lane(partition, receiver, settler.clone(), limits));
                sender
            })
            .collect();
        Intake { lanes, publisher }
    }

    /// Accepts `request` once the broker confirmed the message that carries it; see the module
    /// documentation. An order of several products goes to the partition of its smallest
    /// product id (the worker locks every product it names, whichever partition it belongs
    /// to).
    /// A purchase decided from one share of its product (`shard` set, see
    /// [`crate::catalogue::Catalogue::assign_shard`]) goes to that shard's partition.
    pub async fn accept(&self, request: Order) -> Result<(), Refusal> {
        let route = request.routing_product();
        let partition = match request.shard {
            Some(shard) => self.publisher.partition_of_shard(route, shard),
            None => self.publisher.partition_of(route),
        };
        self.accept_on(partition, Request::Order(request)).await
    }

    /// Accepts a checkout or cancel of a hold whose orders go to `route`'s partition (its
    /// smallest product), once the broker confirmed the message that carries it.
    pub async fn accept_command(&self, command: Command, route: ProductId) -> Result<(), Refusal> {
        self.accept_in(route, Request::Command(command)).await
    }

    async fn accept_in(&self, route: ProductId, request: Request) -> Result<(), Refusal> {
        self.accept_on(self.publisher.partition_of(route), request)
            .await
    }

    async fn accept_on(&self, partition: PartitionId, request: Request) -> Result<(), Refusal> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            json: request.to_json(),
            request,
            answer,
        };
        // A lane ends only with the process; a missing answer means it is stopping.
        let lane = &self.lanes[usize::from(partition.0)];
        if lane.send(job).await.is_err() {
            return Err(Refusal::BrokerUnavailable);
        }
        answered.await.unwrap_or(Err(Refusal::BrokerUnavailable))
    }
}

/// A partition's lane: gathers what has arrived (up to the limits) into one message and settles
/// it, at most `limits.in_flight` messages at a time.
async fn run_lane(
    partition: PartitionId,
    mut jobs: mpsc::Receiver<Job>,
    settler: Arc<Settler>,
    limits: EnvelopeLimits,
) {
    let in_flight = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    let mut carried: Option<Job> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut bytes = first.json.len();
        let mut batch = vec![first];
        while batch.len() < limits.max_requests {
            let Ok(job) = jobs.try_recv() else { break };
            if envelope_len(bytes + job.json.len(), batch.len() + 1) > limits.max_bytes {
                carried = Some(job);
                break;
            }
            bytes += job.json.len();
            batch.push(job);
        }
        let settler = settler.clone();
        tokio::spawn(async move {
            settler.settle(partition, batch).await;
            drop(permit);
        });
    }
}

impl Settler {
    #[tracing::instrument(skip_all, fields(%partition, requests = batch.len()))]
    async fn settle(&self, partition: PartitionId, batch: Vec<Job>) {
        metrics::histogram!("allot_api_envelope_requests").record(batch.len() as f64);
        let pending: Vec<TransactionView> = batch
            .iter()
            .filter_map(|job| match &job.request {
                Request::Order(order) => Some(TransactionView::pending(order)),
                Request::Command(_) => None,
            })
            .collect();
        // The pending records and the message's place in the queue's bound: one round trip.
        let mut pipe = redis::pipe();
        if let Err(err) = self.statuses.add_pending(&mut pipe, &pending) {
            tracing::error!(error = %format_args!("{err:#}"), "refusing requests: their statuses do not serialise");
            return answer_all(batch, Err(Refusal::StoreUnavailable));
        }
        let place = match self.publisher.backlog().reserve_with(partition, pipe).await {
            Ok(place) => place,
            Err(err) => {
                tracing::warn!(error = %err, "refusing requests: Redis is unavailable");
                return answer_all(batch, Err(Refusal::StoreUnavailable));
            }
        };
        let body = envelope(batch.iter().map(|job| job.json.as_slice()));
        let Err(err) = (self.publisher)
            .publish(partition, &body, batch.len(), place)
            .await
        else {
            return answer_all(batch, Ok(()));
        };
        tracing::warn!(error = %err, "refusing requests: the broker did not confirm their message");
        let refusal = Refusal::of_publish(&err);
        let mut refused = Vec::with_capacity(batch.len());
        if err.is_ambiguous() {
            let withdrawals = self.withdraw(partition, &batch).await;
            for (job, decided) in batch.into_iter().zip(withdrawals) {
                if decided {
                    tracing::info!(transaction_id = %job.request.transaction_id(), "unconfirmed publish was stored and decided after all: accepted");
                    let _ = job.answer.send(Ok(()));
                } else {
                    refused.push(job);
                }
            }
        } else {
            refused = batch;
        }
        let ids: Vec<_> = refused
            .iter()
            .filter_map(|job| match &job.request {
                Request::Order(order) => Some(order.transaction_id),
                Request::Command(_) => None,
            })
            .collect();
        self.statuses.forget(&ids).await;
        answer_all(refused, Err(refusal));
    }

    /// Withdraws the requests of `batch`, whose message may have reached the broker
    /// unconfirmed (see [`stored::withdraw`] and [`stored::withdraw_commands`]), and says for
    /// each whether a worker decided it first (it was accepted after all). If the database
    /// could not be asked, each counts as refused: the 503s then stay ambiguous, the one case
    /// where a refused request may still be decided.
    async fn withdraw(&self, partition: PartitionId, batch: &[Job]) -> Vec<bool> {
        let now = SystemClock.now();
        let orders: Vec<Order> = batch
            .iter()
            .filter_map(|job| match &job.request {
                Request::Order(order) => Some(order.clone()),
                Request::Command(_) => None,
            })
            .collect();
        let commands: Vec<Command> = batch
            .iter()
            .filter_map(|job| match &job.request {
                Request::Command(command) => Some(command.clone()),
                Request::Order(_) => None,
            })
            .collect();
        let orders_decided: Vec<bool> = if orders.is_empty() {
            Vec::new()
        } else {
            match stored::withdraw(&self.pool, &orders, partition, now).await {
                Ok(withdrawals) => withdrawals
                    .into_iter()
                    .map(|withdrawal| withdrawal == Withdrawal::AlreadyDecided)
                    .collect(),
                Err(err) => {
                    tracing::error!(error = %err, count = orders.len(), "could not withdraw unconfirmed requests; they may still be decided");
                    vec![false; orders.len()]
                }
            }
        };
        let commands_decided: Vec<bool> = if commands.is_empty() {
            Vec::new()
        } else {
            match stored::withdraw_commands(&self.pool, &commands, now).await {
                Ok(outcomes) => outcomes
                    .into_iter()
                    .map(|outcome| outcome != CommandOutcome::Withdrawn)
                    .collect(),
                Err(err) => {
                    tracing::error!(error = %err, count = commands.len(), "could not withdraw unconfirmed checkouts or cancels; they may still be decided");
                    vec![false; commands.len()]
                }
            }
        };
        let (mut orders_decided, mut commands_decided) =
            (orders_decided.into_iter(), commands_decided.into_iter());
        batch
            .iter()
            .map(|job| match job.request {
                Request::Order(_) => orders_decided.next().unwrap_or(false),
                Request::Command(_) => commands_decided.next().unwrap_or(false),
            })
            .collect()
    }
}

fn answer_all(batch: Vec<Job>, answer: Result<(), Refusal>) {
    for job in batch {
        let _ = job.answer.send(answer.clone());
    }
}
