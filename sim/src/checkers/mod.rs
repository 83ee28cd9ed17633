//! Invariant checkers over the recorded history (DESIGN.md, "Invariants").
//!
//! Every checker reads only `&[Record]`: what the clients observed plus the ground truth the
//! workload drove (heartbeats, connections, memberships, faults, phases). None of them looks at
//! node internals. Records are expected sorted by `t_us` with ties in file order; each checker
//! re-sorts stably (a copy) if they are not, so the result does not depend on the caller.
//!
//! This module holds the runner and its public API (`Params`, `CheckReport`, `run_all`);
//! `index` holds the shared indexes the checkers build from the history (timelines,
//! membership, fault windows, ...); each invariant is its own file. It checks nothing by itself.
//!
//! Determinism: only `BTreeMap`/`BTreeSet`, so the same history always yields the same reports,
//! violations in the same order (history order, or key order for end-of-run checks).

use crate::history::Record;

pub mod ids;
pub mod index;
pub mod integrity;
pub mod kv_health;
pub mod limits;
pub mod no_duplicates;
pub mod no_loss;
pub mod order;
pub mod presence;
pub mod push;
pub mod security;
#[cfg(test)]
pub(crate) mod testutil;

/// One second in simulated microseconds.
pub const SECOND_US: u64 = 1_000_000;

/// At most this many violation messages are stored per checker (all are counted).
pub const MAX_STORED_VIOLATIONS: usize = 100;

/// Fault kinds that a healthy run is expected to survive without any excuse: presence must not
/// flap and pushes must not go to online devices while these happen (a clock step moves only
/// idgen's clock; the kv storage and replication faults touch only kv nodes, whose shards
/// elect a new leader within two seconds). Every other fault kind (partition, tunnel,
/// latency, loss, pause, ...) excuses the timing-sensitive presence and push checks while it
/// is active. Two kv nodes hurt at once are not benign either (see `index::FaultWindows`):
/// a shard may have lost its quorum of healthy replicas.
pub const BENIGN_FAULT_KINDS: &[&str] = &[
    "crash",
    "disconnect",
    "clock_step",
    "disk_loss",
    "leader_partition",
    "torn_write",
    "corruption",
    "slow_disk",
    "force_recover",
];

/// Fault kinds that hit only kv nodes (storage and replication).
pub const KV_FAULT_KINDS: &[&str] = &[
    "disk_loss",
    "leader_partition",
    "torn_write",
    "corruption",
    "slow_disk",
    "force_recover",
];

/// How long a partition, tunnel or pause keeps disturbing after its heal: the simulated
/// network delivers bytes held up by a clog after a retry backoff of up to ~10 s, and a
/// resumed node works off its backlog, so heartbeats sent during the fault arrive late.
pub const SETTLE_AFTER_HEAL_US: u64 = 10 * SECOND_US;

/// Bounds the checkers judge against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// A user is offline this long after its last heartbeat (30 s).
    pub presence_timeout_us: u64,
    /// The stated extra bound on top of the timeout for presence to propagate (10 s).
    pub presence_bound_us: u64,
    /// Devices heartbeat this often (5 s).
    pub heartbeat_interval_us: u64,
    /// Largest allowed group (100).
    pub max_group_members: u32,
    /// Longest allowed message, in characters (100,000).
    pub max_message_chars: u64,
    /// The stated bound for a push: a recipient who stays offline this long after the ack must
    /// get one (30 s: a kv restart plus the chat servers' sweep of abandoned fanouts, which
    /// redoes them after 10 s, every 5 s). One who comes back sooner may get the message by
    /// sync instead.
    pub push_bound_us: u64,
    /// How long a push node's claim on (message, device) holds while it notifies and
    /// confirms (60 s): only after it lapses may another notify the device again.
    pub push_claim_ttl_us: u64,
    /// Presence nodes of the run (user `u` lives on node `u % n`): a presence node's crash
    /// excuses timing judgments about its own users only. 0: unknown (any presence crash
    /// excuses every user).
    pub presence_nodes: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            presence_timeout_us: 30 * SECOND_US,
            presence_bound_us: 10 * SECOND_US,
            heartbeat_interval_us: 5 * SECOND_US,
            max_group_members: 100,
            max_message_chars: 100_000,
            push_bound_us: 30 * SECOND_US,
            push_claim_ttl_us: nodes::kv::store::PUSH_CLAIM_TTL_MS * 1000,
            presence_nodes: 0,
        }
    }
}

impl Params {
    /// Timeout plus stated bound: how long presence may take to show a user offline.
    pub fn offline_within_us(&self) -> u64 {
        self.presence_timeout_us + self.presence_bound_us
    }
}

/// The verdict of one checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub name: &'static str,
    /// Individual assertions evaluated (0 means the history gave this checker nothing to judge).
    pub checks: u64,
    /// Human-readable violations (ids and `t_us` named), the first `MAX_STORED_VIOLATIONS`.
    pub violations: Vec<String>,
    /// Every violation found, stored or not.
    pub violation_count: u64,
    /// What the checker allowed and wants known (printed under the table).
    pub notes: Vec<String>,
}

impl CheckReport {
    pub fn new(name: &'static str) -> Self {
        CheckReport {
            name,
            checks: 0,
            violations: Vec::new(),
            violation_count: 0,
            notes: Vec::new(),
        }
    }

    /// Evaluates one assertion: counts it, and records `msg()` as a violation if `ok` is false.
    pub fn assert(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.violation(msg());
        }
    }

    /// Records a violation (counted always, stored up to the cap).
    pub fn violation(&mut self, msg: String) {
        self.violation_count += 1;
        if self.violations.len() < MAX_STORED_VIOLATIONS {
            self.violations.push(msg);
        }
    }
}

/// Runs every checker, in the fixed order order, no_loss, no_duplicates, ids, integrity,
/// presence, push, limits.
pub fn run_all(history: &[Record], params: &Params) -> Vec<CheckReport> {
    let history = index::sorted(history);
    vec![
        order::check(&history, params),
        no_loss::check(&history, params),
        no_duplicates::check(&history, params),
        ids::check(&history, params),
        integrity::check(&history, params),
        presence::check(&history, params),
        push::check(&history, params),
        limits::check(&history, params),
        kv_health::check(&history, params),
        security::check(&history, params),
    ]
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn healthy_history_passes_every_checker_and_checks_something() {
        // Proves the reference healthy run (see testutil::healthy) satisfies all invariants and
        // that every checker actually evaluated assertions on it (none vacuous).
        let reports = run_all(&healthy(), &Params::default());
        let names: Vec<_> = reports.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "order",
                "no_loss",
                "no_duplicates",
                "ids",
                "integrity",
                "presence",
                "push",
                "limits",
                "kv_health",
                "security"
            ]
        );
        for r in &reports {
            assert!(r.passed(), "{}: {:?}", r.name, r.violations);
            assert!(r.checks > 0, "{} checked nothing", r.name);
        }
    }

    #[test]
    fn empty_history_checks_nothing() {
        // Proves an empty history yields zero checks and zero violations for every checker.
        for r in run_all(&[], &Params::default()) {
            assert_eq!((r.checks, r.violation_count), (0, 0), "{}", r.name);
        }
    }

    #[test]
    fn violations_are_capped_but_all_counted() {
        // Proves at most MAX_STORED_VIOLATIONS messages are stored while every one is counted.
        let mut r = CheckReport::new("x");
        for i in 0..250 {
            r.assert(false, || format!("v{i}"));
        }
        assert_eq!(r.violations.len(), MAX_STORED_VIOLATIONS);
        assert_eq!((r.checks, r.violation_count), (250, 250));
    }

    #[test]
    fn unsorted_input_gives_the_same_verdict_as_sorted() {
        // Proves run_all sorts by t_us (stably) before judging: a reversed healthy history
        // (ties included) gets the same reports as the sorted one.
        let h = healthy();
        let mut rev = h.clone();
        rev.reverse();
        let mut expect = h.clone();
        expect.sort_by_key(|r| r.t_us);
        // Reversal flips tie order, so compare against the stable sort of the reversed input.
        let mut rev_sorted = rev.clone();
        rev_sorted.sort_by_key(|r| r.t_us);
        let p = Params::default();
        assert_eq!(run_all(&rev, &p), run_all(&rev_sorted, &p));
        assert!(run_all(&rev, &p).iter().all(|r| r.checks > 0));
    }

    #[test]
    fn history_round_trips_through_json_lines() {
        // Proves the checkers judge the public JSON-lines format: serializing the healthy run to
        // lines and parsing it back gives identical reports.
        let h = healthy();
        let parsed: Vec<Record> = h
            .iter()
            .map(|r| serde_json::from_str(&r.to_line()).expect("own line parses"))
            .collect();
        let p = Params::default();
        assert_eq!(run_all(&h, &p), run_all(&parsed, &p));
    }
}
