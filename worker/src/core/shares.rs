//! The shares of a product spread over several partitions (`shards` > 1): the pure part of
//! deciding from them, used by [`super::try_decide`].
//!
//! Such a product's stock is the sum of its shares, one per shard, each a row of its own. A
//! batch holds the shares it needs in one of three [`ShareMode`]s, chosen before it locks
//! anything and raised when what it finds asks for more (an [`Escalation`]: the batch's
//! transaction is rolled back and the batch decided again, the product's shares locked as
//! asked):
//!
//! - [`ShareMode::Own`]: only the shares of the shards whose purchases the batch carries (the
//!   product row share-locked, so k partitions decide the product at once). A purchase is
//!   sold from its own shard's share; when that share is short it is **not** refused: the
//!   batch escalates to [`ShareMode::Pooled`]. A refusal `out_of_stock` is never decided here.
//! - [`ShareMode::Pooled`]: every share locked (the product row share-locked). A purchase is
//!   decided from the sum of all shares, which is the product's whole stock: only here, under
//!   the locks of every share, is a purchase refused `out_of_stock`, and only when that sum is
//!   below its quantity. After the batch the remaining stock is split evenly over the shares
//!   again ([`Shares::rebalance`]), so that a share that ran dry has taken from the others.
//! - [`ShareMode::Exclusive`]: the product row locked for update and every share: what needs
//!   the product row besides the stock (a hold and its checkout, cancel or expiry, an order of
//!   several products, a product with a per-buyer limit, a purchase that names no shard).
//!   Decided as in `Pooled`.

use allot_shared::Shard;
use std::collections::BTreeMap;

/// How a batch holds a sharded product's shares; ordered from the least to the most locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShareMode {
    /// The shares of the batch's own shards, the product row share-locked.
    Own,
    /// Every share, the product row share-locked.
    Pooled,
    /// Every share, and the product row locked for update.
    Exclusive,
}

/// What an attempt at a batch cannot decide with the locks it holds: a product needs its
/// shares held in `mode`. Nothing of the attempt may be written; the caller rolls back and
/// decides the batch again with the product held so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escalation {
    pub product: allot_shared::ProductId,
    pub mode: ShareMode,
}

/// A sharded product's shares, as one attempt at a batch locked them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    pub mode: ShareMode,
    /// Units of each locked share, by shard: the batch's own shards in [`ShareMode::Own`],
    /// every shard of the product otherwise.
    pub units: BTreeMap<Shard, i64>,
}

impl Shares {
    /// The units a purchase of shard `home` may be sold from: its own share in
    /// [`ShareMode::Own`] (`None` when that share is not held: it needs every share), the sum
    /// of all shares otherwise.
    pub fn available(&self, home: Option<Shard>) -> Option<i64> {
        match self.mode {
            ShareMode::Own => home.and_then(|shard| self.units.get(&shard).copied()),
            ShareMode::Pooled | ShareMode::Exclusive => Some(self.total()),
        }
    }

    /// The units of every share held.
    pub fn total(&self) -> i64 {
        self.units.values().sum()
    }

    /// Takes `units`, which [`Shares::available`] found there: from the own share in
    /// [`ShareMode::Own`]; otherwise from the own share first, then from the others in shard
    /// order.
    pub fn take(&mut self, home: Option<Shard>, units: i64) {
        let mut left = units;
        if let Some(share) = home.and_then(|shard| self.units.get_mut(&shard)) {
            let taken = left.min(*share);
            *share -= taken;
            left -= taken;
        }
        for share in self.units.values_mut() {
            if left == 0 {
                break;
            }
            let taken = left.min(*share);
            *share -= taken;
            left -= taken;
        }
        assert_eq!(left, 0, "units are taken only when available");
    }

    /// Gives `units` back (a hold released): to the first share held.
    pub fn give_back(&mut self, units: i64) {
        if let Some(share) = self.units.values_mut().next() {
            *share += units;
        }
    }

    /// Splits the units held evenly over the shares held again, when they are every share
    /// (not in [`ShareMode::Own`], whose shares stay as their purchases left them).
    pub fn rebalance(&mut self) {
        if self.mode == ShareMode::Own {
            return;
        }
        let split = even_split(self.total(), self.units.len());
        for (share, units) in self.units.values_mut().zip(split) {
            *share = units;
        }
    }
}

/// `total` units over `shards` shares, as evenly as can be: each gets `total / shards`, and
/// the first `total % shards` one more. Empty for no share.
pub fn even_split(total: i64, shards: usize) -> Vec<i64> {
    if shards == 0 {
        return Vec::new();
    }
    let count = shards as i64;
    let (each, rest) = (total / count, total % count);
    (0..count).map(|i| each + i64::from(i < rest)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shares(mode: ShareMode, units: &[(u16, i64)]) -> Shares {
        Shares {
            mode,
            units: units.iter().map(|&(s, u)| (Shard(s), u)).collect(),
        }
    }

    #[test]
    fn own_mode_sells_from_its_own_share_only() {
        let own = shares(ShareMode::Own, &[(1, 3), (2, 0)]);
        assert_eq!(own.available(Some(Shard(1))), Some(3));
        assert_eq!(own.available(Some(Shard(2))), Some(0));
        assert_eq!(own.available(Some(Shard(0))), None, "not held");
        assert_eq!(own.available(None), None);
        let pooled = shares(ShareMode::Pooled, &[(0, 1), (1, 3), (2, 0)]);
        assert_eq!(pooled.available(Some(Shard(2))), Some(4));
        assert_eq!(pooled.available(None), Some(4));
    }

    #[test]
    fn taking_from_the_pool_starts_with_the_own_share() {
        let mut pooled = shares(ShareMode::Pooled, &[(0, 2), (1, 1), (2, 4)]);
        pooled.take(Some(Shard(1)), 4);
        assert_eq!(pooled, shares(ShareMode::Pooled, &[(0, 0), (1, 0), (2, 3)]));
        pooled.rebalance();
        assert_eq!(pooled, shares(ShareMode::Pooled, &[(0, 1), (1, 1), (2, 1)]));
        let mut own = shares(ShareMode::Own, &[(1, 5)]);
        own.take(Some(Shard(1)), 2);
        own.rebalance();
        assert_eq!(own, shares(ShareMode::Own, &[(1, 3)]), "own shares stay");
    }

    proptest! {
        #[test]
        fn an_even_split_keeps_every_unit_and_differs_by_at_most_one(
            total in 0..1_000_000i64,
            shards in 1..64usize,
        ) {
            let split = even_split(total, shards);
            prop_assert_eq!(split.len(), shards);
            prop_assert_eq!(split.iter().sum::<i64>(), total);
            let (min, max) = (split.iter().min().unwrap(), split.iter().max().unwrap());
            prop_assert!(max - min <= 1);
            prop_assert!(split.windows(2).all(|w| w[0] >= w[1]), "the first shares get the rest");
        }
    }
}
