//! What a run produced: the history, the checkers' verdicts, run-wide statistics and counter
//! snapshots of the steady window (from which reports derive per-message costs).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::analysis::{Convergence, Storm};
use crate::checkers::CheckReport;
use crate::history::Record;

/// What a run produced.
pub struct Outcome {
    pub history: Vec<Record>,
    pub reports: Vec<CheckReport>,
    pub stats: Stats,
    pub convergence: Convergence,
    pub storms: Vec<Storm>,
    /// Counters at the start and end of the steady window (after warm-up, before the
    /// liveness phase).
    pub window: (Snapshot, Snapshot),
}

/// Run-wide counters at one moment of simulated time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Simulated seconds since traffic started.
    pub t_s: f64,
    pub sends: u64,
    pub acks: u64,
    pub delivers: u64,
    pub heartbeats: u64,
    pub connects: u64,
    pub chars: u64,
    /// UTF-8 bytes of the texts sent.
    pub text_bytes: u64,
    pub net_messages: u64,
    pub wire_bytes: u64,
    /// Of `wire_bytes`: devices' heartbeats and the chat servers' answers.
    pub heartbeat_wire_bytes: u64,
    /// `wire_bytes` by path (`cluster::wire_paths`).
    pub wire_paths: BTreeMap<String, u64>,
    /// Per kv node (by index): its counters since it last started; a node that did not
    /// answer is missing.
    pub kv: BTreeMap<u32, KvCounters>,
    /// Bytes of every kv node's database file.
    pub disk_bytes: u64,
}

/// One kv node's operation counters (`KvStats`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvCounters {
    pub requests: u64,
    pub writes: u64,
    /// Per operation: (requests, write operations).
    pub by_op: BTreeMap<String, (u64, u64)>,
    /// Per redb table, summed over the node's replicas: (stored bytes, page bytes).
    pub space: BTreeMap<String, (u64, u64)>,
}

/// kv counters over a window, summed over nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvWindow {
    pub requests: u64,
    pub writes: u64,
    pub by_op: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    /// Per redb table, summed over every kv node that answered: (stored bytes, page bytes).
    pub fn kv_space(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for node in self.kv.values() {
            for (table, (stored, pages)) in &node.space {
                let e = out.entry(table.clone()).or_default();
                e.0 += stored;
                e.1 += pages;
            }
        }
        out
    }

    /// How much each table grew since `earlier` (negative: it shrank), as
    /// (table, stored bytes, page bytes), over the kv nodes that answered both times.
    pub fn kv_space_since(&self, earlier: &Snapshot) -> Vec<(String, i64, i64)> {
        let both = |s: &Snapshot| Snapshot {
            kv: s
                .kv
                .iter()
                .filter(|(n, _)| self.kv.contains_key(n) && earlier.kv.contains_key(n))
                .map(|(n, c)| (*n, c.clone()))
                .collect(),
            ..Snapshot::default()
        };
        let (now, before) = (both(self).kv_space(), both(earlier).kv_space());
        let mut tables: Vec<&String> = now.keys().chain(before.keys()).collect();
        tables.sort();
        tables.dedup();
        tables
            .into_iter()
            .map(|t| {
                let (s1, p1) = now.get(t).copied().unwrap_or_default();
                let (s0, p0) = before.get(t).copied().unwrap_or_default();
                (t.clone(), s1 as i64 - s0 as i64, p1 as i64 - p0 as i64)
            })
            .collect()
    }

    /// `self - earlier`, field by field (a kv restart resets its counters: never negative).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            t_s: self.t_s - earlier.t_s,
            sends: self.sends.saturating_sub(earlier.sends),
            acks: self.acks.saturating_sub(earlier.acks),
            delivers: self.delivers.saturating_sub(earlier.delivers),
            heartbeats: self.heartbeats.saturating_sub(earlier.heartbeats),
            connects: self.connects.saturating_sub(earlier.connects),
            chars: self.chars.saturating_sub(earlier.chars),
            text_bytes: self.text_bytes.saturating_sub(earlier.text_bytes),
            net_messages: self.net_messages.saturating_sub(earlier.net_messages),
            wire_bytes: self.wire_bytes.saturating_sub(earlier.wire_bytes),
            heartbeat_wire_bytes: self
                .heartbeat_wire_bytes
                .saturating_sub(earlier.heartbeat_wire_bytes),
            wire_paths: self
                .wire_paths
                .iter()
                .map(|(k, v)| {
                    let before = earlier.wire_paths.get(k).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(before))
                })
                .collect(),
            kv: self.kv.clone(),
            disk_bytes: self.disk_bytes.saturating_sub(earlier.disk_bytes),
        }
    }

    /// kv operations between `earlier` and this snapshot, node by node: a node whose counters
    /// went down restarted in between, and counts from its restart (what it did before the
    /// crash is lost with its process).
    pub fn kv_since(&self, earlier: &Snapshot) -> KvWindow {
        let mut out = KvWindow::default();
        let zero = KvCounters::default();
        for (node, now) in &self.kv {
            let before = earlier.kv.get(node).unwrap_or(&zero);
            let base = if now.requests < before.requests {
                &zero
            } else {
                before
            };
            out.requests += now.requests - base.requests;
            out.writes += now.writes.saturating_sub(base.writes);
            for (op, (n, w)) in &now.by_op {
                let (n0, w0) = base.by_op.get(op).copied().unwrap_or_default();
                let e = out.by_op.entry(op.clone()).or_default();
                e.0 += n.saturating_sub(n0);
                e.1 += w.saturating_sub(w0);
            }
        }
        out
    }
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.reports.iter().all(|r| r.violation_count == 0)
    }

    /// Names of the invariants that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.reports
            .iter()
            .filter(|r| r.violation_count > 0)
            .map(|r| r.name)
            .collect()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub users: usize,
    pub devices: usize,
    pub groups: usize,
    pub biggest_group: usize,
    pub sends: u64,
    pub acks: u64,
    pub delivers: u64,
    pub pushes: u64,
    pub presence_changes: u64,
    pub connects: u64,
    pub heartbeats: u64,
    pub bad_inputs: u64,
    pub group_full_refusals: u64,
    pub errors: BTreeMap<String, u64>,
    /// Errors the chat servers counted sending, by code (since each last started).
    pub server_errors: BTreeMap<String, u64>,
    pub sim_secs: f64,
    /// Messages the simulated network carried (madsim's count: one per flushed TCP write).
    pub net_messages: u64,
    /// kv writes lost to crashes (not yet synced when the node died).
    pub lost_disk_writes: u64,
    /// What the fault injector says in words: quorums lost, forced recoveries.
    pub notes: Vec<String>,
    /// The kv prober's writes around kv faults (see `prober`).
    pub kv_probes: Vec<crate::availability::Probe>,
    pub faults: usize,
    pub wall_secs: f64,
    pub history_hash: String,
    /// Bytes written to TCP by every node and device.
    pub wire_bytes: u64,
    /// The process's peak resident set (VmHWM), bytes; 0 where /proc is missing.
    pub peak_rss_bytes: u64,
}

/// SHA-256 of the history's JSON lines: equal hashes, equal runs.
pub fn history_hash(history: &[Record]) -> String {
    let mut h = Sha256::new();
    for r in history {
        h.update(r.to_line().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The process's peak resident set size (VmHWM in /proc/self/status), or 0.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
