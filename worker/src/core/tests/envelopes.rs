//! Property tests of the core on batch envelopes, as the consumer sees them: requests packed in
//! arrival order into envelopes of random sizes, an item carried by two envelopes, envelopes
//! delivered twice, deliveries grouped into batches, a batch whose first attempt rolled back,
//! and a batch redelivered after its commit (a lost ack). Each attempt is decided as
//! `Decider::decide_and_commit` does it: the stock of the batch's existing products, the
//! outcomes stored for its ids as `decided`, [`decide`], [`Decisions::number`] from the day's
//! counter, then (if it commits) the new stock and the fresh outcomes stored.
//!
//! Against a sequential model that decides each distinct request once, in the order of its
//! first arrival in a committed batch.

use super::*;
use proptest::sample::Index;

/// What PostgreSQL holds between batches.
struct Store {
    stock: HashMap<ProductId, i64>,
    outcomes: HashMap<TransactionId, Outcome>,
    last_seq: i64,
}

impl Store {
    /// One attempt at `batch`: decided like `decide_and_commit`, stored only if `commit`.
    fn attempt(&mut self, batch: &[Order], commit: bool) -> Vec<Decided> {
        let locked: HashMap<ProductId, i64> = batch
            .iter()
            .filter_map(|r| {
                let product = r.lines[0].product_id;
                Some((product, *self.stock.get(&product)?))
            })
            .collect();
        let decided = batch
            .iter()
            .filter_map(|r| Some((r.transaction_id, *self.outcomes.get(&r.transaction_id)?)))
            .collect();
        let mut state = PartitionState {
            stock: locked.clone(),
            decided,
            ..PartitionState::default()
        };
        let decisions = decide(&mut state, batch);
        // `persist::reserve_order_numbers`: the next numbers of the day, 1 when nothing sold.
        let first_seq = if decisions.sold() == 0 {
            1
        } else {
            self.last_seq + 1
        };
        let outcomes = decisions.number(day(), first_seq);
        if commit {
            self.last_seq += decisions.sold();
            for (id, units) in &state.stock {
                if locked.get(id) != Some(units) {
                    self.stock.insert(*id, *units);
                }
            }
            for (request, decided) in batch.iter().zip(&outcomes).filter(|(_, d)| d.fresh) {
                // The primary key would refuse a second decision, rolling the batch back.
                let earlier = self
                    .outcomes
                    .insert(request.transaction_id, decided.outcome);
                assert!(
                    earlier.is_none(),
                    "{} decided twice",
                    request.transaction_id
                );
            }
        }
        outcomes
    }
}

/// What becomes of a batch of deliveries.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Committed and acked.
    Commits,
    /// The first attempt rolls back (say, PostgreSQL restarted); the retry commits.
    RollsBackFirst,
    /// Committed, but its ack is lost: redelivered, whole, after a later batch.
    RedeliveredAfter(Index),
}

/// The raw material of one run: stock of products 1..=n, requests (product up to n + 1, so
/// that some do not exist), how they are packed and delivered.
#[derive(Debug, Clone)]
struct Scenario {
    stock: Vec<i64>,
    requests: Vec<(i64, i64)>,
    envelope_sizes: Vec<usize>,
    /// An item also carried by another envelope.
    copies: Vec<(Index, Index)>,
    /// An envelope delivered a second time, at some position of the delivery order.
    duplicates: Vec<(Index, Index)>,
    batch_sizes: Vec<usize>,
    fates: Vec<Fate>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let fate = prop_oneof![
        6 => Just(Fate::Commits),
        1 => Just(Fate::RollsBackFirst),
        1 => any::<Index>().prop_map(Fate::RedeliveredAfter),
    ];
    prop::collection::vec(0..15i64, 1..4).prop_flat_map(move |stock| {
        let products = stock.len() as i64 + 1;
        (
            Just(stock),
            prop::collection::vec((1..=products, 1..=4i64), 0..60),
            prop::collection::vec(1..=8usize, 60),
            prop::collection::vec(any::<(Index, Index)>(), 0..8),
            prop::collection::vec(any::<(Index, Index)>(), 0..8),
            prop::collection::vec(1..=4usize, 80),
            prop::collection::vec(fate.clone(), 80),
        )
            .prop_map(
                |(stock, requests, envelope_sizes, copies, duplicates, batch_sizes, fates)| {
                    Scenario {
                        stock,
                        requests,
                        envelope_sizes,
                        copies,
                        duplicates,
                        batch_sizes,
                        fates,
                    }
                },
            )
    })
}

/// The batches a consumer decides, in order, each with whether the attempt commits.
fn deliveries(scenario: &Scenario) -> Vec<(Vec<Order>, bool)> {
    let requests: Vec<Order> = scenario
        .requests
        .iter()
        .enumerate()
        .map(|(id, &(product, quantity))| request(id as u128, product, quantity))
        .collect();
    // Packed in arrival order, as the API's lanes do.
    let mut envelopes: Vec<Vec<Order>> = Vec::new();
    let mut rest = requests.as_slice();
    for &size in scenario.envelope_sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (envelope, tail) = rest.split_at(size.min(rest.len()));
        envelopes.push(envelope.to_vec());
        rest = tail;
    }
    if !requests.is_empty() {
        for (item, envelope) in &scenario.copies {
            let copy = requests[item.index(requests.len())].clone();
            let envelope = envelope.index(envelopes.len());
            envelopes[envelope].push(copy);
        }
    }
    let mut order: Vec<usize> = (0..envelopes.len()).collect();
    if !envelopes.is_empty() {
        for (envelope, position) in &scenario.duplicates {
            let position = position.index(order.len() + 1);
            order.insert(position, envelope.index(envelopes.len()));
        }
    }
    let mut batches: Vec<Vec<Order>> = Vec::new();
    let mut rest = order.as_slice();
    for &size in scenario.batch_sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (batch, tail) = rest.split_at(size.min(rest.len()));
        batches.push(batch.iter().flat_map(|&e| envelopes[e].clone()).collect());
        rest = tail;
    }
    // Fates: a rollback retried at once; a lost ack redelivered after some later batch.
    let mut attempts: Vec<(Vec<Order>, bool)> = Vec::new();
    let mut redeliveries: Vec<(usize, Vec<Order>)> = Vec::new();
    let count = batches.len();
    for (index, (batch, fate)) in batches.into_iter().zip(scenario.fates.iter()).enumerate() {
        if matches!(fate, Fate::RollsBackFirst) {
            attempts.push((batch.clone(), false));
        }
        attempts.push((batch.clone(), true));
        if let Fate::RedeliveredAfter(later) = fate {
            redeliveries.push((index + later.index(count - index), batch));
        }
        redeliveries.sort_by_key(|(after, _)| *after);
        while redeliveries
            .first()
            .is_some_and(|(after, _)| *after <= index)
        {
            attempts.push((redeliveries.remove(0).1, true));
        }
    }
    attempts.extend(redeliveries.into_iter().map(|(_, batch)| (batch, true)));
    attempts
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every delivered item gets the outcome the sequential model gives its request, decided
    /// once in first-arrival order; the stock never goes below zero and falls by exactly the
    /// units sold; the order numbers of the successes are 1..=N, each once.
    #[test]
    fn envelopes_duplicates_and_redeliveries_match_the_sequential_model(scenario in scenario()) {
        let initial = state(&scenario.stock.iter().enumerate()
            .map(|(i, &units)| (i as i64 + 1, units)).collect::<Vec<_>>()).stock;
        let mut store = Store { stock: initial.clone(), outcomes: HashMap::new(), last_seq: 0 };

        let mut model_stock = initial.clone();
        let mut model: HashMap<TransactionId, Outcome> = HashMap::new();
        let mut model_seq = 0;
        let mut rolled_back: Option<Vec<Decided>> = None;

        for (batch, commit) in deliveries(&scenario) {
            let got = store.attempt(&batch, commit);
            prop_assert_eq!(got.len(), batch.len());
            if !commit {
                rolled_back = Some(got);
                continue;
            }
            if let Some(first_try) = rolled_back.take() {
                prop_assert_eq!(&first_try, &got, "a retried batch decides as its rolled-back try did");
            }
            for (request, got) in batch.iter().zip(&got) {
                let expected = *model.entry(request.transaction_id).or_insert_with(|| {
                    let line = request.lines[0];
                    match model_stock.get_mut(&line.product_id) {
                        None => rejected(RejectReason::UnknownProduct),
                        Some(units) if *units >= line.quantity.get() => {
                            *units -= line.quantity.get();
                            model_seq += 1;
                            succeeded(model_seq)
                        }
                        Some(_) => rejected(RejectReason::OutOfStock),
                    }
                });
                prop_assert_eq!(got.outcome, expected, "{}", request.transaction_id);
            }
            prop_assert!(store.stock.values().all(|&units| units >= 0));
        }

        prop_assert_eq!(store.outcomes.len(), scenario.requests.len(), "every request decided");
        prop_assert_eq!(&store.outcomes, &model);
        prop_assert_eq!(&store.stock, &model_stock);
        let mut seqs: Vec<i64> = store.outcomes.values().filter_map(|outcome| match outcome {
            Outcome::Succeeded(number) => Some(number.seq),
            Outcome::Rejected(_) | Outcome::Held { .. } => None,
        }).collect();
        seqs.sort_unstable();
        prop_assert_eq!(&seqs, &(1..=store.last_seq).collect::<Vec<_>>(), "gapless, each once");
        let sold: i64 = scenario.requests.iter().enumerate()
            .filter(|(id, _)| matches!(model[&TransactionId(uuid::Uuid::from_u128(*id as u128))], Outcome::Succeeded(_)))
            .map(|(_, &(_, quantity))| quantity)
            .sum();
        prop_assert_eq!(sold, initial.values().sum::<i64>() - store.stock.values().sum::<i64>());
    }
}
