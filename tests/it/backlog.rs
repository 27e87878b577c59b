//! The API's own bound on a partition queue (`api/src/backlog.rs`), shared by every API
//! instance through Redis: the estimate's rules one by one against real Redis, then two API
//! instances publishing to one queue, which never accept more messages than the bound.

use crate::helpers::{
    DEADLINE, ExtraApi, Options, accepted_id, partition_of, spawn_app, test_redis_url, wait_for,
};
use allot_api::backlog::{Backlog, bound};
use allot_shared::amqp::Topology;
use allot_shared::{PartitionId, TransactionId, status_store};
use reqwest::StatusCode;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const P: PartitionId = PartitionId(1);

/// A backlog on a prefix of its own, for `partitions` queues limited to `max_length`.
struct Fixture {
    redis: redis::aio::ConnectionManager,
    prefix: String,
    topology: Topology,
}

impl Fixture {
    async fn new(max_length: i64) -> Fixture {
        let url = test_redis_url();
        let redis = status_store::connect(&url, Duration::from_secs(1))
            .await
            .expect("Redis is reachable");
        let prefix = format!("it-{}", uuid::Uuid::new_v4().simple());
        let topology = Topology {
            queue_prefix: prefix.clone(),
            partitions: 4,
            max_length,
            quorum_group_size: None,
        };
        Fixture {
            redis,
            prefix,
            topology,
        }
    }

    /// One API instance's view of the bound (each instance has its own `Backlog`).
    fn instance(&self, hold: Duration) -> Backlog {
        Backlog::new(self.redis.clone(), &self.prefix, &self.topology, hold)
    }

    async fn estimate(&self, backlog: &Backlog) -> i64 {
        backlog.estimate(P).await.unwrap()
    }

    /// The places in flight in `P`'s queue, as Redis holds them (no settlement sent first).
    async fn in_flight(&self) -> i64 {
        let key = format!("{}.backlog:{}:flight", self.prefix, self.topology.queue(P));
        redis::cmd("ZCARD")
            .arg(key)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    /// Deletes the fixture's keys.
    async fn clean(self) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}.backlog:*", self.prefix))
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        if keys.is_empty() {
            return; // nothing kept, nothing in flight: Redis drops empty sets by itself
        }
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
    }
}

const HOLD: Duration = Duration::from_secs(60);

#[tokio::test]
async fn refuses_at_the_bound_and_gives_back_what_was_refused() {
    let fixture = Fixture::new(10).await; // bound 8
    let backlog = fixture.instance(HOLD);
    assert_eq!(backlog.bound(), 8);
    let mut places = Vec::new();
    for _ in 0..8 {
        places.push(backlog.reserve(P).await.unwrap().expect("below the bound"));
    }
    assert!(backlog.reserve(P).await.unwrap().is_none());
    assert_eq!(
        fixture.estimate(&backlog).await,
        8,
        "a refusal reserves nothing"
    );
    assert!(
        backlog.reserve(PartitionId(0)).await.unwrap().is_some(),
        "partitions are separate"
    );
    for place in places {
        place.give_back().await; // every publish was refused by the broker
    }
    assert_eq!(fixture.estimate(&backlog).await, 0);
    fixture.clean().await;
}

#[tokio::test]
async fn settlements_sent_later_reach_redis_on_their_own_or_with_the_next_reservation() {
    let fixture = Fixture::new(10).await; // bound 8
    let backlog = fixture.instance(HOLD);
    let mut places = Vec::new();
    for _ in 0..8 {
        places.push(backlog.reserve(P).await.unwrap().expect("below the bound"));
    }
    assert!(backlog.reserve(P).await.unwrap().is_none());
    // Given back later, with no other call to carry them: they are sent on their own.
    for place in places.drain(..4) {
        place.give_back_later();
    }
    wait_for(
        "the four places given back later to leave Redis",
        || async { (fixture.in_flight().await == 4).then_some(()) },
    )
    .await;
    // Kept later, then a reservation: kept places still count; the bound still holds.
    for place in places.drain(..) {
        place.keep_later();
    }
    let fifth = backlog.reserve(P).await.unwrap().expect("4 of 8 counted");
    drop(fifth); // dropped unsettled: given back
    wait_for("the dropped place to be given back", || async {
        (fixture.in_flight().await == 0).then_some(())
    })
    .await;
    assert_eq!(
        fixture.estimate(&backlog).await,
        4,
        "the four kept places count, nothing else"
    );
    for _ in 0..4 {
        backlog.reserve(P).await.unwrap().unwrap().keep_later();
    }
    assert!(
        backlog.reserve(P).await.unwrap().is_none(),
        "places kept later count at once"
    );
    fixture.clean().await;
}

#[tokio::test]
async fn a_read_replaces_what_was_kept_before_it_was_sent() {
    let fixture = Fixture::new(10).await;
    let backlog = fixture.instance(HOLD);
    for _ in 0..3 {
        backlog.reserve(P).await.unwrap().unwrap().keep().await;
    }
    let read = backlog.begin_reads().await.unwrap();
    // Confirmed while the read was on its way.
    backlog.reserve(P).await.unwrap().unwrap().keep().await;
    backlog.record_read(P, read, 2).await.unwrap(); // a worker took one of the three
    assert_eq!(fixture.estimate(&backlog).await, 3);
    fixture.clean().await;
}

#[tokio::test]
async fn a_publish_in_flight_during_a_read_still_counts_after_it() {
    let fixture = Fixture::new(10).await;
    let backlog = fixture.instance(HOLD);
    backlog.reserve(P).await.unwrap().unwrap().keep().await;
    let second = backlog.reserve(P).await.unwrap().unwrap(); // sent, not yet confirmed
    let read = backlog.begin_reads().await.unwrap();
    backlog.record_read(P, read, 1).await.unwrap(); // the broker had only the first
    assert_eq!(
        fixture.estimate(&backlog).await,
        2,
        "the second still counts"
    );
    second.keep().await;
    assert_eq!(fixture.estimate(&backlog).await, 2);
    let read = backlog.begin_reads().await.unwrap();
    backlog.record_read(P, read, 2).await.unwrap();
    assert_eq!(fixture.estimate(&backlog).await, 2);
    fixture.clean().await;
}

#[tokio::test]
async fn a_refused_publish_is_given_back_once_and_a_failed_read_changes_nothing() {
    let fixture = Fixture::new(10).await;
    let backlog = fixture.instance(HOLD);
    let refused = backlog.reserve(P).await.unwrap().unwrap();
    let read = backlog.begin_reads().await.unwrap();
    backlog.record_read(P, read, 0).await.unwrap(); // the broker did not store it
    refused.give_back().await;
    assert_eq!(fixture.estimate(&backlog).await, 0);
    backlog.reserve(P).await.unwrap().unwrap().keep().await;
    let read = backlog.begin_reads().await.unwrap();
    backlog.end_reads(read, &[None; 4]).await.unwrap(); // every read failed
    assert_eq!(fixture.estimate(&backlog).await, 1);
    fixture.clean().await;
}

#[tokio::test]
async fn small_limits_are_kept_exactly() {
    let fixture = Fixture::new(2).await;
    let backlog = fixture.instance(HOLD);
    assert_eq!(bound(2), 2);
    backlog.reserve(P).await.unwrap().unwrap().keep().await;
    backlog.reserve(P).await.unwrap().unwrap().keep().await;
    assert!(backlog.reserve(P).await.unwrap().is_none());
    fixture.clean().await;
}

#[tokio::test]
async fn instances_share_one_estimate_and_the_latest_read_wins() {
    let fixture = Fixture::new(10).await; // bound 8
    let (a, b) = (fixture.instance(HOLD), fixture.instance(HOLD));
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        a.reserve(P).await.unwrap().unwrap().keep().await;
        in_flight.push(b.reserve(P).await.unwrap().unwrap());
    }
    assert_eq!(fixture.estimate(&a).await, 8);
    assert!(
        a.reserve(P).await.unwrap().is_none(),
        "b's places count for a"
    );
    assert!(
        b.reserve(P).await.unwrap().is_none(),
        "a's places count for b"
    );
    for place in in_flight {
        place.keep().await;
    }
    let read = b.begin_reads().await.unwrap();
    a.record_read(P, read, 0).await.unwrap(); // workers took all eight
    assert_eq!(
        fixture.estimate(&b).await,
        0,
        "a read by one instance serves all"
    );

    // Two reads on their way at once: the one sent later (after more places were kept) is
    // recorded, whichever answer arrives last.
    let early = a.begin_reads().await.unwrap();
    b.reserve(P).await.unwrap().unwrap().keep().await;
    let late = b.begin_reads().await.unwrap();
    b.record_read(P, late, 3).await.unwrap();
    assert_eq!(fixture.estimate(&a).await, 3);
    a.record_read(P, early, 0).await.unwrap(); // an older answer, arriving last: ignored
    assert_eq!(fixture.estimate(&a).await, 3);
    fixture.clean().await;
}

#[tokio::test]
async fn a_place_whose_instance_died_stops_counting_after_its_hold() {
    let fixture = Fixture::new(10).await;
    let hold = Duration::from_millis(300);
    let backlog = fixture.instance(hold);
    // An instance killed between its reservation and the broker's answer never settles.
    std::mem::forget(backlog.reserve(P).await.unwrap().unwrap());
    assert_eq!(fixture.estimate(&backlog).await, 1);
    wait_for("the abandoned place to expire", || async {
        (fixture.estimate(&backlog).await == 0).then_some(())
    })
    .await;
    fixture.clean().await;
}

#[tokio::test]
async fn a_read_sent_before_the_counters_were_lost_is_ignored() {
    let fixture = Fixture::new(10).await;
    let backlog = fixture.instance(HOLD);
    for _ in 0..3 {
        backlog.reserve(P).await.unwrap().unwrap().keep().await;
    }
    let read = backlog.begin_reads().await.unwrap();
    // Redis restarted empty (or the keys expired) while the read was on its way.
    let hash = format!("{}.backlog:{}", fixture.prefix, fixture.topology.queue(P));
    let _: () = redis::cmd("DEL")
        .arg(&hash)
        .query_async(&mut fixture.redis.clone())
        .await
        .unwrap();
    backlog.record_read(P, read, 3).await.unwrap();
    // The stale read is dropped (else it would subtract three places never kept since)...
    assert_eq!(fixture.estimate(&backlog).await, 0);
    // ...and the next read is recorded as usual.
    backlog.reserve(P).await.unwrap().unwrap().keep().await;
    let read = backlog.begin_reads().await.unwrap();
    backlog.record_read(P, read, 4).await.unwrap();
    assert_eq!(fixture.estimate(&backlog).await, 4);
    fixture.clean().await;
}

/// Two API instances, six clients sending as fast as they are answered to one partition, no
/// worker: the queue ends with exactly the bound in messages (8 for a limit of 10), never more,
/// and every request answered 202, none of those answered 503, is then decided.
#[sqlx::test(migrator = "allot_shared::db::MIGRATOR")]
async fn two_api_instances_never_accept_more_than_the_bound_together(pool: sqlx::PgPool) {
    let mut app = spawn_app(
        pool,
        Options {
            queue_max_length: 10,
            ..Options::without_worker()
        },
    )
    .await;
    let second = ExtraApi::start(&app, &app.api_config).await;
    let product = app.create_product("contested queue", 1_000).await;
    let partition = partition_of(product);
    let bases = [app.address.clone(), second.address.clone()];

    // Each client sends until it has been refused 20 times after the queue was seen holding
    // the bound (a refusal before may be on a transient overestimate: it keeps trying).
    let full = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..6i64 {
        let base = bases[(client % 2) as usize].clone();
        let http = app.client.clone();
        let full = full.clone();
        clients.spawn(async move {
            let (mut accepted, mut refused) = (Vec::new(), 0);
            let mut refused_when_full = 0;
            let deadline = tokio::time::Instant::now() + DEADLINE;
            let mut sent = 0i64;
            while refused_when_full < 20 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the queue never filled up ({} accepted by client {client})",
                    accepted.len()
                );
                sent += 1;
                let user = client * 1_000_000 + sent;
                let was_full = full.load(Ordering::Relaxed);
                let response = http
                    .post(format!("{base}/api/v1/order/addToCart"))
                    .json(
                        &serde_json::json!({"user_id": user, "product_id": product, "quantity": 1}),
                    )
                    .send()
                    .await
                    .unwrap();
                match response.status() {
                    StatusCode::ACCEPTED => accepted.push(accepted_id(response).await),
                    StatusCode::SERVICE_UNAVAILABLE => {
                        refused += 1;
                        refused_when_full += u32::from(was_full);
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            (accepted, refused)
        });
    }
    wait_for("the queue to hold the bound", || async {
        (app.queue_depth(partition).await >= 8).then_some(())
    })
    .await;
    full.store(true, Ordering::Relaxed);
    let mut accepted: Vec<TransactionId> = Vec::new();
    let mut refused = 0;
    while let Some(done) = clients.join_next().await {
        let (ids, count) = done.unwrap();
        accepted.extend(ids);
        refused += count;
    }
    assert_eq!(
        app.queue_depth(partition).await,
        8,
        "exactly the bound of messages was accepted by both instances together"
    );
    assert!(refused > 0, "requests past the bound were refused");

    // Every 202 is decided once; nothing refused is.
    second.stop().await;
    app.start_worker(Arc::new(allot_shared::SystemClock));
    for id in &accepted {
        let view = app.wait_final(*id).await;
        assert_eq!(view["status"], "succeeded");
    }
    let decided: BTreeSet<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM transactions")
        .fetch_all(&app.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let expected: BTreeSet<uuid::Uuid> = accepted.iter().map(|id| id.0).collect();
    assert_eq!(
        decided, expected,
        "exactly the accepted requests are decided"
    );
    app.shutdown().await;
}
