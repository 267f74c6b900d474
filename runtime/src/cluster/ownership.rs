//! Who owns what: a key hashes to one of a fixed number of shards per service, and each shard
//! belongs to one of the members hosting that service, chosen by rendezvous (highest random
//! weight) hashing over the members' stable names.
//!
//! Pure functions, the same in every process: the hash is FNV-1a 64 followed by a 64-bit
//! finaliser (never `std`'s randomly keyed hasher). A change that moves keys must bump
//! `WIRE_VERSION`, so that nodes placing keys differently never join one cluster (the pinned
//! owners in the tests catch an unintended one). Rendezvous hashing means that
//! removing a member moves only the shards it owned, and that a member that comes back under
//! the same name owns exactly the shards it owned before (its data is still on its disk).

/// Shards per service unless configured otherwise. Fixed for the life of a cluster: changing
/// it re-homes most keys.
pub const DEFAULT_SHARDS: u32 = 64;

/// A stable 64-bit hash of `bytes` (FNV-1a, then the splitmix64 finaliser for avalanche).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The shard of `key` among `shards` (at least 1).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    (stable_hash(key.as_bytes()) % u64::from(shards.max(1))) as u32
}

/// The placement a service's keys follow. A payment is keyed by its order's id and placed
/// as that order is: where the same members host both, an order and its payment share a node,
/// so the saga's payment request and its settlement never cross the network.
fn placed_as(service: &str) -> &str {
    match service {
        "payment" => "order",
        other => other,
    }
}

/// Rendezvous weight of `member` for `shard` of `service`.
fn weight(service: &str, shard: u32, member: &str) -> u64 {
    let service = placed_as(service);
    let mut buf = Vec::with_capacity(service.len() + member.len() + 6);
    buf.extend_from_slice(service.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&shard.to_le_bytes());
    buf.push(0);
    buf.extend_from_slice(member.as_bytes());
    stable_hash(&buf)
}

/// The member owning `shard` of `service`: the one with the highest weight (ties broken by
/// name, so the answer never depends on the order of `members`). `None` when there is none.
pub fn owner<'a, S: AsRef<str>>(service: &str, shard: u32, members: &'a [S]) -> Option<&'a str> {
    members
        .iter()
        .map(AsRef::as_ref)
        .max_by(|a, b| weight(service, shard, a).cmp(&weight(service, shard, b)).then_with(|| b.cmp(a)))
}

/// The owner of `key` of `service`.
pub fn owner_of_key<'a, S: AsRef<str>>(service: &str, key: &str, shards: u32, members: &'a [S]) -> Option<&'a str> {
    owner(service, shard_of(key, shards), members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const PINNED_ORDER: [&str; 8] = ["node-2", "node-1", "node-2", "node-0", "node-1", "node-2", "node-1", "node-0"];
    const PINNED_INVENTORY: [&str; 8] =
        ["node-1", "node-1", "node-0", "node-1", "node-0", "node-2", "node-0", "node-0"];

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn hash_is_stable_across_builds() {
        // Pinned values: a change here re-homes every key of every running cluster.
        assert_eq!(stable_hash(b"ordermesh"), 0xcaf8312f126e734c);
        assert_eq!(stable_hash(b""), 0xf52a15e9a9b5e89b);
        assert_eq!(shard_of("espresso", 64), 17);
        assert_ne!(stable_hash(b"a"), stable_hash(b"b"));
        assert!(shard_of("anything", 0) == 0, "zero shards behaves as one");
    }

    #[test]
    fn owner_does_not_depend_on_member_order() {
        let mut members = names(5);
        let before: Vec<_> = (0..256).map(|s| owner("order", s, &members).map(str::to_owned)).collect();
        members.reverse();
        let after: Vec<_> = (0..256).map(|s| owner("order", s, &members).map(str::to_owned)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn no_members_no_owner() {
        let empty: Vec<String> = vec![];
        assert_eq!(owner("order", 3, &empty), None);
    }

    #[test]
    fn shards_spread_evenly() {
        let members = names(3);
        let mut count: HashMap<&str, usize> = HashMap::new();
        for shard in 0..3000 {
            *count.entry(owner("inventory", shard, &members).unwrap_or("none")).or_default() += 1;
        }
        for m in &members {
            let c = count.get(m.as_str()).copied().unwrap_or(0);
            assert!((800..=1200).contains(&c), "{m} owns {c} of 3000 shards");
        }
    }

    #[test]
    fn removing_a_member_moves_only_its_shards_and_return_restores_them() {
        let all = names(4);
        let without: Vec<String> = all.iter().filter(|m| *m != "node-2").cloned().collect();
        for shard in 0..512 {
            let before = owner("payment", shard, &all);
            let after = owner("payment", shard, &without);
            if before != Some("node-2") {
                assert_eq!(before, after, "shard {shard} moved although its owner stayed");
            }
            assert_eq!(owner("payment", shard, &all), before, "the member's return gives its shards back");
        }
    }

    #[test]
    fn stock_is_placed_independently_of_orders_and_payments() {
        let members = names(3);
        for other in ["order", "payment"] {
            let differ = (0..64).filter(|s| owner(other, *s, &members) != owner("inventory", *s, &members)).count();
            assert!(differ > 10, "inventory should not share the {other} placement ({differ} differ)");
        }
    }

    #[test]
    fn placement_is_pinned() {
        // A change here moves keys between nodes: bump WIRE_VERSION with it.
        let members = names(3);
        let owners = |service| (0..8).map(|s| owner(service, s, &members).unwrap_or("none")).collect::<Vec<_>>();
        assert_eq!(owners("order"), PINNED_ORDER);
        assert_eq!(owners("payment"), PINNED_ORDER);
        assert_eq!(owners("inventory"), PINNED_INVENTORY);
    }

    #[test]
    fn an_order_and_its_payment_share_a_node_when_the_same_members_host_both() {
        let members = names(3);
        for shard in 0..64 {
            assert_eq!(owner("order", shard, &members), owner("payment", shard, &members));
        }
        // With other members, a payment still goes with its order wherever that member hosts
        // payments too.
        let payment_only: Vec<String> = members[1..].to_vec();
        for shard in 0..64 {
            let order_owner = owner("order", shard, &members);
            if order_owner.is_some_and(|m| payment_only.iter().any(|p| p == m)) {
                assert_eq!(owner("payment", shard, &payment_only), order_owner, "shard {shard}");
            }
        }
    }

    #[test]
    fn owner_of_key_is_deterministic() {
        let members = names(3);
        let a = owner_of_key("order", "0190-aaaa", DEFAULT_SHARDS, &members);
        let b = owner_of_key("order", "0190-aaaa", DEFAULT_SHARDS, &members);
        assert_eq!(a, b);
        assert!(a.is_some());
    }
}
