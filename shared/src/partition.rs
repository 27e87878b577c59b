//! Which partition decides a product, and what its queue is called.
//!
//! A product always maps to the same partition for a given partition count, so all requests for
//! it are decided serially by one consumer. Changing `ALLOT_PARTITIONS` while messages are queued
//! moves products between queues; correctness then still holds (the database locks product rows
//! and refuses a second decision for a transaction id), only the strict arrival order does not.

use crate::ids::{PartitionId, ProductId, Shard};

/// The partition of `product` among `partitions` partitions.
///
/// Plain modulo: product ids are dense sequence values, so consecutive products land on
/// consecutive partitions and a catalogue spreads evenly.
pub fn partition_for(product: ProductId, partitions: u16) -> PartitionId {
    assert!(partitions > 0, "there is at least one partition");
    let index = (product.get() as u64 % u64::from(partitions)) as u16;
    PartitionId(index)
}

/// The partition that decides `shard` of a product spread over several partitions: the
/// product's own partition for shard 0, the next ones (wrapping around) for the others, so that
/// the `shards` (at most `partitions`) shares of a product are decided by distinct partitions.
pub fn shard_partition(product: ProductId, shard: Shard, partitions: u16) -> PartitionId {
    let base = partition_for(product, partitions).0;
    let index = (u32::from(base) + u32::from(shard.0)) % u32::from(partitions);
    PartitionId(index as u16)
}

/// The durable queue that holds a partition's pending requests, e.g. `allot.partition.03`.
pub fn queue_name(prefix: &str, partition: PartitionId) -> String {
    format!("{prefix}.partition.{:02}", partition.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn queue_names_are_stable() {
        assert_eq!(queue_name("allot", PartitionId(3)), "allot.partition.03");
        assert_eq!(queue_name("t1", PartitionId(15)), "t1.partition.15");
    }

    proptest! {
        #[test]
        fn every_product_maps_to_a_valid_partition_deterministically(
            id in 1..i64::MAX,
            partitions in 1..=1024u16,
        ) {
            let product = ProductId::try_from(id).unwrap();
            let partition = partition_for(product, partitions);
            prop_assert!(partition.0 < partitions);
            prop_assert_eq!(partition, partition_for(product, partitions));
        }
    }

    #[test]
    fn the_shards_of_a_product_take_distinct_partitions_from_its_own_on() {
        let product = ProductId::try_from(14).unwrap();
        let partitions: Vec<u16> = (0..16)
            .map(|shard| shard_partition(product, Shard(shard), 16).0)
            .collect();
        assert_eq!(partitions[0], partition_for(product, 16).0);
        assert_eq!(&partitions[..3], &[14, 15, 0]);
        let distinct: std::collections::BTreeSet<u16> = partitions.iter().copied().collect();
        assert_eq!(distinct.len(), 16);
    }

    #[test]
    fn consecutive_products_spread_evenly() {
        let mut counts = [0u32; 16];
        for id in 1..=1600 {
            counts[partition_for(ProductId::try_from(id).unwrap(), 16).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 100), "{counts:?}");
    }
}
