//! Which worker instance should decide which partition: pure, no I/O.
//!
//! Every worker computes the same [`assign`]ment from the same list of live workers (see
//! [`crate::membership`]), so they agree without talking to each other. The assignment is
//! even (the shares of any two workers differ by at most one partition: 16 partitions over 3
//! workers are 6, 5 and 5), covers every partition exactly once, and depends only on the set of
//! workers, not on their order or on history.
//!
//! It is a balanced rendezvous hash: every (partition, worker) pair has a pseudo-random score
//! ([`score`], a fixed hash, the same in every build), and pairs are taken from the highest
//! score down, each partition going to the first worker that still has room. So a partition
//! stays with its worker as long as that worker keeps room, and a worker that joins takes
//! mostly partitions where it scores highest, from whoever holds them, rather than shifting
//! every partition along as `partition mod n` would.
//!
//! [`should_yield`] is the rule a worker applies when RabbitMQ hands it a partition it was
//! not assigned: see [`crate::seats`].

use std::time::Duration;

/// A worker instance's identity in the membership list.
pub type WorkerId = str;

/// The owner of each partition (`owners[p]` is an index into `workers`), for `partitions`
/// partitions over `workers` (each listed once; empty gives no owner at all). Even, complete,
/// and independent of the order of `workers`.
pub fn assign(workers: &[&WorkerId], partitions: u16) -> Vec<Option<usize>> {
    let count = usize::from(partitions);
    if workers.is_empty() {
        return vec![None; count];
    }
    let n = workers.len();
    let base = count / n;
    // How many workers may hold one more than `base`.
    let mut larger = count % n;
    let mut pairs: Vec<(u64, u16, usize)> = Vec::with_capacity(count * n);
    for partition in 0..partitions {
        for (index, worker) in workers.iter().enumerate() {
            pairs.push((score(worker, partition), partition, index));
        }
    }
    // Highest score first; ties (practically never) broken by partition and worker name, so
    // the result does not depend on the order of `workers`.
    pairs.sort_unstable_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(workers[a.2].cmp(workers[b.2]))
    });
    let mut owners = vec![None; count];
    let mut held = vec![0usize; n];
    let mut left = count;
    for (_, partition, worker) in pairs {
        if left == 0 {
            break;
        }
        let slot = &mut owners[usize::from(partition)];
        if slot.is_some() {
            continue;
        }
        let room = held[worker] < base || (held[worker] == base && larger > 0);
        if !room {
            continue;
        }
        if held[worker] == base {
            larger -= 1;
        }
        held[worker] += 1;
        *slot = Some(worker);
        left -= 1;
    }
    owners
}

/// The score of `worker` for `partition`: FNV-1a over both, then a SplitMix64 finaliser. Fixed
/// (not `std`'s hasher, which may change between Rust releases): workers of different builds
/// must compute the same assignment.
pub fn score(worker: &WorkerId, partition: u16) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in worker
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(&partition.to_be_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Whether this worker's seat on a partition is assigned to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// No membership list yet (just started, or Redis unreachable since): keep what RabbitMQ
    /// gives.
    Unknown,
    Owned,
    NotOwned,
}

/// Whether to hand over a partition RabbitMQ just delivered to this worker: only if it is
/// assigned to another worker, and not more often than once per `cooldown` (`since_last`: time
/// since this seat last handed it over, `None` if never). The batch in hand is decided first
/// either way: handing over never leaves a delivery undecided, and a partition whose owner is
/// gone (not yet out of the list) keeps being decided by whoever RabbitMQ hands it to.
pub fn should_yield(
    ownership: Ownership,
    since_last: Option<Duration>,
    cooldown: Duration,
) -> bool {
    ownership == Ownership::NotOwned && since_last.is_none_or(|since| since >= cooldown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i:02}")).collect()
    }

    fn shares(owners: &[Option<usize>], n: usize) -> Vec<usize> {
        let mut shares = vec![0; n];
        for owner in owners.iter().flatten() {
            shares[*owner] += 1;
        }
        shares
    }

    #[test]
    fn sixteen_partitions_over_three_workers_are_six_five_five() {
        let workers = names(3);
        let refs: Vec<&str> = workers.iter().map(String::as_str).collect();
        let owners = assign(&refs, 16);
        assert!(owners.iter().all(Option::is_some));
        let mut shares = shares(&owners, 3);
        shares.sort_unstable();
        assert_eq!(shares, vec![5, 5, 6]);
    }

    #[test]
    fn no_worker_no_owner_and_one_worker_owns_everything() {
        assert_eq!(assign(&[], 4), vec![None; 4]);
        assert_eq!(assign(&["only"], 4), vec![Some(0); 4]);
    }

    #[test]
    fn the_score_is_fixed_across_builds() {
        // Pinned (computed independently, in Python, from the definition above): a change
        // here would make workers of two builds disagree during a rolling upgrade.
        assert_eq!(score("w", 0), 0x205e_cfdc_dd43_fdc4);
        assert_ne!(score("w", 1), score("w", 0));
        assert_ne!(score("w1", 0), score("w", 10));
    }

    #[test]
    fn a_worker_that_joins_takes_its_share_without_a_reshuffle() {
        // Over many sets of names: the partitions that change owner when a third worker joins
        // two are on average close to the third's share (16/3 = 5.3; measured 5.8 over 1,000
        // sets), where `p mod n` moves 10.
        let mut moved_total = 0;
        let runs = 200;
        for run in 0..runs {
            let workers: Vec<String> = (0..3).map(|i| format!("run{run}-w{i}")).collect();
            let two: Vec<&str> = workers[..2].iter().map(String::as_str).collect();
            let three: Vec<&str> = workers.iter().map(String::as_str).collect();
            let before = assign(&two, 16);
            let after = assign(&three, 16);
            moved_total += before.iter().zip(&after).filter(|(a, b)| a != b).count();
        }
        let average = moved_total as f64 / runs as f64;
        assert!(
            average < 6.5,
            "on average {average} partitions moved for a share of 5 or 6"
        );
    }

    proptest! {
        #[test]
        fn even_complete_and_independent_of_order(
            n in 1usize..12,
            partitions in 1u16..300,
            salt in any::<u32>(),
            rotate in any::<usize>(),
        ) {
            let workers: Vec<String> = (0..n).map(|i| format!("{salt:x}-{i}")).collect();
            let refs: Vec<&str> = workers.iter().map(String::as_str).collect();
            let owners = assign(&refs, partitions);
            prop_assert_eq!(owners.len(), usize::from(partitions));
            prop_assert!(owners.iter().all(Option::is_some), "every partition has an owner");
            let shares = shares(&owners, n);
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            prop_assert!(max - min <= 1, "shares {:?}", shares);
            prop_assert_eq!(shares.iter().sum::<usize>(), usize::from(partitions));

            // Another order of the same workers: the same owner for every partition.
            let mut shuffled = refs.clone();
            shuffled.rotate_left(rotate % n);
            shuffled.reverse();
            let again = assign(&shuffled, partitions);
            let by_name = |owners: &[Option<usize>], list: &[&str]| -> Vec<String> {
                owners.iter().map(|o| list[o.unwrap()].to_owned()).collect()
            };
            prop_assert_eq!(by_name(&owners, &refs), by_name(&again, &shuffled));
        }

        #[test]
        fn a_worker_that_leaves_gives_its_partitions_and_few_others_move(
            n in 2usize..8,
            partitions in 1u16..200,
            salt in any::<u32>(),
            leaver in any::<usize>(),
        ) {
            let workers: Vec<String> = (0..n).map(|i| format!("{salt:x}-{i}")).collect();
            let all: Vec<&str> = workers.iter().map(String::as_str).collect();
            let leaver = leaver % n;
            let rest: Vec<&str> = all.iter().enumerate().filter(|(i, _)| *i != leaver).map(|(_, w)| *w).collect();
            let before = assign(&all, partitions);
            let after = assign(&rest, partitions);
            // Every partition of the leaver moves; of the others, only what rebalancing needs.
            let leaver_held: BTreeSet<usize> = (0..usize::from(partitions)).filter(|&p| before[p] == Some(leaver)).collect();
            for &p in &leaver_held {
                prop_assert!(after[p].is_some());
            }
            let others_moved = (0..usize::from(partitions))
                .filter(|p| !leaver_held.contains(p))
                .filter(|&p| all[before[p].unwrap()] != rest[after[p].unwrap()])
                .count();
            prop_assert!(
                others_moved <= leaver_held.len() + n,
                "{} other partitions moved when {} were freed", others_moved, leaver_held.len()
            );
        }
    }

    #[test]
    fn yielding_needs_another_owner_and_respects_the_cooldown() {
        let second = Duration::from_secs(1);
        assert!(!should_yield(Ownership::Owned, None, second));
        assert!(!should_yield(Ownership::Unknown, None, second));
        assert!(should_yield(Ownership::NotOwned, None, second));
        assert!(!should_yield(
            Ownership::NotOwned,
            Some(Duration::from_millis(300)),
            second
        ));
        assert!(should_yield(Ownership::NotOwned, Some(second), second));
    }
}
