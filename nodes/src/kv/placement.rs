//! Where shards live: which kv nodes hold each shard's replicas, which of them should lead,
//! and how Raft ids name replicas.
//!
//! A cluster is created with `nodes` kv nodes (slots 0..nodes, each an address in the
//! cluster map), `shards` Raft groups and `replicas` copies of each. Shard `s` lives on the
//! `replicas` consecutive slots from `s % nodes`; the first of them is its preferred leader, so
//! leaders spread over nodes (one shard per node leads when `shards == nodes`). Keys map to
//! shards by the rule in `cluster` (user % shards, channel % shards, name hash % shards).
//!
//! A replica's Raft id carries its slot (low 16 bits, slot + 1) and its incarnation above: a
//! node that comes back with an empty disk is a new replica with a new incarnation, never the
//! old id (a replica that forgot its votes and its log must not vote as if it remembered).
//! Messages for an id go to its slot's address.

/// Most kv nodes a cluster can name (slots fit the id's low 16 bits).
pub const NODES_MAX: u32 = 0xFFFF;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub nodes: u32,
    pub shards: u32,
    pub replicas: u32,
}

impl Placement {
    pub fn new(nodes: u32, shards: u32, replicas: u32) -> Result<Self, String> {
        if nodes == 0 || nodes > NODES_MAX {
            return Err(format!("kv nodes must be 1..={NODES_MAX}, got {nodes}"));
        }
        if shards == 0 {
            return Err("kv shards must be at least 1".into());
        }
        if replicas == 0 || replicas > nodes {
            return Err(format!(
                "kv replicas must be 1..={nodes} (the kv nodes), got {replicas}"
            ));
        }
        Ok(Self {
            nodes,
            shards,
            replicas,
        })
    }

    /// The slots holding `shard`, its preferred leader first.
    pub fn replicas_of(&self, shard: u32) -> Vec<u32> {
        (0..self.replicas)
            .map(|k| (shard + k) % self.nodes)
            .collect()
    }

    /// The shards with a replica on `slot`.
    pub fn shards_on(&self, slot: u32) -> Vec<u32> {
        (0..self.shards)
            .filter(|s| self.replicas_of(*s).contains(&slot))
            .collect()
    }

    /// `slot`'s place in `shard`'s preference order (0: the preferred leader).
    pub fn rank(&self, shard: u32, slot: u32) -> Option<u32> {
        self.replicas_of(shard)
            .iter()
            .position(|s| *s == slot)
            .map(|r| r as u32)
    }

    /// The Raft ids of a new shard's first replicas (incarnation 0).
    pub fn boot_voters(&self, shard: u32) -> Vec<u64> {
        self.replicas_of(shard)
            .into_iter()
            .map(|slot| raft_id(slot, 0))
            .collect()
    }
}

/// The Raft id of `slot`'s replica in its `incarnation` (0 for a shard's first replicas).
pub fn raft_id(slot: u32, incarnation: u64) -> u64 {
    (incarnation << 16) | (slot as u64 + 1)
}

/// The slot a Raft id lives on.
pub fn slot_of(id: u64) -> u32 {
    ((id & 0xFFFF) as u32).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves replicas sit on distinct consecutive slots, preferred leaders spread one per node
    // when shards == nodes, and ids round-trip their slot across incarnations.
    #[test]
    fn placement_and_ids() {
        let p = Placement::new(3, 3, 3).unwrap();
        assert_eq!(p.replicas_of(0), vec![0, 1, 2]);
        assert_eq!(p.replicas_of(1), vec![1, 2, 0]);
        assert_eq!(p.replicas_of(2), vec![2, 0, 1]);
        let leaders: Vec<u32> = (0..3).map(|s| p.replicas_of(s)[0]).collect();
        assert_eq!(leaders, vec![0, 1, 2]);
        let p = Placement::new(5, 4, 3).unwrap();
        for s in 0..4 {
            let r = p.replicas_of(s);
            let mut d = r.clone();
            d.dedup();
            assert_eq!(d.len(), 3, "distinct slots for shard {s}");
        }
        assert_eq!(p.shards_on(0), vec![0, 3]);
        assert_eq!(p.rank(3, 4), Some(1));
        assert_eq!(p.rank(0, 4), None);
        for slot in [0, 1, 7, 300] {
            for inc in [0, 1, 0xdead_beef] {
                assert_eq!(slot_of(raft_id(slot, inc)), slot);
            }
        }
        assert!(Placement::new(2, 3, 3).is_err());
        assert!(Placement::new(3, 0, 1).is_err());
    }
}
