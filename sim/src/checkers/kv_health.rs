//! kv health: once the run is over and its faults healed, every kv shard is a whole Raft
//! group again. A system that keeps answering while a group limps on two replicas, stuck in
//! a membership change or with a replica that never caught up, passes every client-side
//! check and dies at the next failure; this is the check that sees it.
//!
//! From the last `kv_status` event: what an operator's `chatd status` showed after the run
//! (every kv node's replicas, the placement, and the shards whose quorum of disks the faults
//! destroyed: those are not expected to heal by themselves and are skipped). Per shard:
//!
//! - (a) every node the placement puts a replica on answered for it (one check per replica);
//! - (b) each replica is a voter of a settled membership: role leader or follower, no
//!   joint configuration, no learner, exactly one voter per placement node, and its own id
//!   among them (a node's replica after a lost disk is a new id that must have replaced the
//!   old one); one check per replica;
//! - (c) one leader, and every replica names it (one check per shard);
//! - (d) every replica has applied all but `MAX_LAG` of what its leader committed (one check
//!   per replica).
//!
//! It does NOT check: what the replicas hold (the client-side checkers do), how long the
//! groups took to heal, or anything before the last `kv_status`. A history without one (an
//! old file, a real run without `--cluster`) gives it nothing to judge.

use std::collections::{BTreeMap, BTreeSet};

use nodes::kv::placement::slot_of;
use nodes::proto::internal::ShardStatus;

use super::{CheckReport, Params};
use crate::history::{Event, KvNodeStatus, Record};

/// How far a replica may trail its leader's commit and still count as caught up (the view
/// is not one instant: nodes answer one after the other while writes go on).
pub const MAX_LAG: u64 = 100;

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let mut report = CheckReport::new("kv_health");
    let last = history.iter().rev().find_map(|r| match &r.ev {
        Event::KvStatus {
            placement,
            quorum_lost,
            nodes,
        } => Some((r.t_us, placement, quorum_lost, nodes)),
        _ => None,
    });
    if let Some((t_us, placement, quorum_lost, nodes)) = last {
        judge(placement, quorum_lost, nodes, &mut report);
        for v in &mut report.violations {
            v.push_str(&format!(" (kv_status at t_us {t_us})"));
        }
    }
    report
}

/// The problems of one view, for the report and for callers that wait for a healthy view.
pub fn problems(
    placement: &[Vec<u32>],
    quorum_lost: &[u32],
    nodes: &[KvNodeStatus],
) -> Vec<String> {
    let mut report = CheckReport::new("kv_health");
    judge(placement, quorum_lost, nodes, &mut report);
    report.violations
}

fn judge(
    placement: &[Vec<u32>],
    quorum_lost: &[u32],
    nodes: &[KvNodeStatus],
    report: &mut CheckReport,
) {
    let lost: BTreeSet<u32> = quorum_lost.iter().copied().collect();
    // (shard, slot) -> that node's replica.
    let mut replicas: BTreeMap<(u32, u32), &ShardStatus> = BTreeMap::new();
    for n in nodes {
        for s in &n.shards {
            replicas.insert((s.shard, n.node), s);
        }
    }
    for (shard, expected) in placement.iter().enumerate() {
        let shard = shard as u32;
        if lost.contains(&shard) {
            continue;
        }
        let want: BTreeSet<u32> = expected.iter().copied().collect();
        let mut present = Vec::new();
        for &slot in expected {
            // (a)
            let r = replicas.get(&(shard, slot));
            report.assert(r.is_some(), || {
                format!("shard {shard}: kv-{slot} did not answer for its replica")
            });
            if let Some(r) = r {
                present.push((slot, *r));
            }
        }
        for &(slot, r) in &present {
            // (b)
            let voter_slots: Vec<u32> = r.voters.iter().map(|v| slot_of(*v)).collect();
            let one_each = voter_slots.len() == want.len()
                && voter_slots.iter().copied().collect::<BTreeSet<_>>() == want;
            let settled = matches!(r.role.as_str(), "leader" | "follower")
                && r.voters_outgoing.is_empty()
                && r.learners.is_empty()
                && one_each
                && r.voters.contains(&r.id);
            report.assert(settled, || {
                format!(
                    "shard {shard}: kv-{slot}'s replica (id {}) is not a voter of a settled \
                     membership: role {}, voters {:?}, outgoing {:?}, learners {:?}",
                    r.id, r.role, r.voters, r.voters_outgoing, r.learners
                )
            });
        }
        // (c)
        let leaders: Vec<u32> = present
            .iter()
            .filter(|(_, r)| r.role == "leader")
            .map(|(slot, _)| *slot)
            .collect();
        let named: BTreeSet<Option<u32>> = present.iter().map(|(_, r)| r.leader).collect();
        let agreed = leaders.len() == 1 && named == BTreeSet::from([Some(leaders[0])]);
        report.assert(agreed, || {
            format!(
                "shard {shard}: no single agreed leader: {:?} lead, the replicas name {:?}",
                leaders, named
            )
        });
        // (d)
        if let Some(commit) = present
            .iter()
            .find(|(_, r)| r.role == "leader")
            .map(|(_, r)| r.commit)
        {
            for &(slot, r) in &present {
                report.assert(r.applied + MAX_LAG >= commit, || {
                    format!(
                        "shard {shard}: kv-{slot} applied {} of the leader's {commit} committed \
                         entries",
                        r.applied
                    )
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::testutil::*;

    fn history(placement: Vec<Vec<u32>>, lost: Vec<u32>, nodes: Vec<KvNodeStatus>) -> Vec<Record> {
        H::new()
            .ev(
                9 * S,
                Event::KvStatus {
                    placement,
                    quorum_lost: lost,
                    nodes,
                },
            )
            .build()
    }

    #[test]
    fn a_healthy_view_passes_with_checks() {
        let (p, n) = healthy_kv_view();
        let r = run(check, &history(p, vec![], n));
        assert!(r.passed(), "{:?}", r.violations);
        // 9 (a) + 9 (b) + 3 (c) + 9 (d)
        assert_eq!(r.checks, 30);
    }

    #[test]
    fn no_view_judges_nothing() {
        let r = run(check, &H::new().build());
        assert_eq!((r.checks, r.violation_count), (0, 0));
    }

    #[test]
    fn a_stuck_joint_membership_fails() {
        let (p, mut n) = healthy_kv_view();
        // Shard 1: kv-2 lost its disk, rejoined as id 2<<16|3, and the group never left the
        // joint configuration.
        let new = (2u64 << 16) | 3;
        for node in &mut n {
            let s = &mut node.shards[1];
            s.voters = vec![1, 2, new];
            s.voters_outgoing = vec![1, 2, 3];
            if node.node == 2 {
                s.id = new;
            }
        }
        let r = run(check, &history(p, vec![], n));
        assert_eq!(r.violation_count, 3, "{:?}", r.violations);
        assert!(
            r.violations[0].contains("outgoing [1, 2, 3]"),
            "{}",
            r.violations[0]
        );
    }

    #[test]
    fn a_missing_node_a_lagging_replica_and_two_leaders_fail() {
        let (p, mut n) = healthy_kv_view();
        n.retain(|x| x.node != 1);
        let r = run(check, &history(p.clone(), vec![], n));
        // kv-1 holds a replica of every shard and leads shard 1.
        assert_eq!(r.violation_count, 4, "{:?}", r.violations);
        let silent = r
            .violations
            .iter()
            .filter(|v| v.contains("kv-1 did not answer"));
        assert_eq!(silent.count(), 3);
        assert!(r.violations[2].starts_with("shard 1: no single agreed leader"));

        let (_, mut n) = healthy_kv_view();
        n[2].shards[0].applied = 10;
        let r = run(check, &history(p.clone(), vec![], n));
        assert_eq!(r.violation_count, 1);
        assert!(
            r.violations[0].contains("kv-2 applied 10"),
            "{}",
            r.violations[0]
        );

        let (_, mut n) = healthy_kv_view();
        n[1].shards[0].role = "leader".into();
        let r = run(check, &history(p, vec![], n));
        assert!(r
            .violations
            .iter()
            .any(|v| v.contains("no single agreed leader")));
    }

    #[test]
    fn shards_whose_quorum_was_lost_are_skipped() {
        let (p, mut n) = healthy_kv_view();
        for node in &mut n {
            node.shards[0].role = "pre_candidate".into();
        }
        let r = run(check, &history(p.clone(), vec![0], n.clone()));
        assert!(r.passed(), "{:?}", r.violations);
        let r = run(check, &history(p, vec![], n));
        assert!(!r.passed());
    }
}
