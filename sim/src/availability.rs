//! Availability around faults: for each fault that touched kv, how long writes to a shard
//! were refused or stalled (from the prober), and how long the sends devices started inside
//! it waited for their acks (from the history); for each crash or pause of another server
//! node, the same send->ack figures (a role of N >= 2 nodes should hide one node's loss).
//!
//! A shard's stall in a window is the longest stretch between two successful probes of one
//! kind, writes or linearizable reads (or from the fault's start to the first success),
//! minus the probe's own pause: zero when every probe went through at once. Reads and writes
//! are timed apart: a shard may take writes and still not confirm reads (a read index waits
//! on things a write does not). A send counts for a fault when its first attempt fell
//! between the fault and its heal and its device stayed connected until the ack (an ack after
//! a reconnect measures the device's absence); one never acked is counted apart.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use nodes::proto::internal::{Request, Response};
use nodes::rpc::RpcError;

use crate::history::{Event, Id, Record};

/// A probe of one shard, as the prober records it (see `prober`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub shard: u32,
    /// A linearizable read, else a write.
    pub read: bool,
    pub start_us: u64,
    pub end_us: u64,
    pub ok: bool,
}

impl Probe {
    /// What a probe asks of a shard: a tiny write (a counter the system never reads), or a
    /// linearizable read (of a user that does not exist).
    pub fn request(read: bool) -> Request {
        if read {
            Request::GetUser { user: 0 }
        } else {
            Request::AllocId {
                kind: "probe".into(),
            }
        }
    }

    /// Whether the shard answered the probe as it should.
    pub fn answered(read: bool, r: &Result<Response, RpcError>) -> bool {
        matches!(
            (read, r),
            (false, Ok(Response::Id(_))) | (true, Ok(Response::User(_)))
        )
    }
}

/// One kv fault's availability figures.
#[derive(Debug, Clone, PartialEq)]
pub struct KvFaultAvailability {
    pub kind: String,
    pub targets: Vec<String>,
    pub start_us: u64,
    pub end_us: u64,
    /// The worst shard and how long its writes stalled, if the prober watched.
    pub stall: Option<(u32, u64)>,
    /// The same for linearizable reads.
    pub read_stall: Option<(u32, u64)>,
    pub sends: u64,
    pub unacked: u64,
    /// Send->ack of the acked ones: p50, p99, p99.9, in microseconds.
    pub ack_us: Option<(u64, u64, u64)>,
    /// Devices whose connection dropped inside and that connected again (at any later time).
    pub reconnects: u64,
    /// How long they waited, drop to connected: p50, p99, max, in microseconds.
    pub reconnect_us: Option<(u64, u64, u64)>,
}

/// Whether a fault event is a kv fault.
fn is_kv_fault(kind: &str, targets: &[String]) -> bool {
    crate::checkers::KV_FAULT_KINDS.contains(&kind)
        || (kind == "crash" && targets.iter().any(|t| t.starts_with("kv-")))
}

/// Whether a fault event is a crash or pause of a server node other than kv, or cuts etcd
/// off (a partition with etcd on one side).
fn is_node_fault(kind: &str, targets: &[String]) -> bool {
    let etcd = targets.iter().any(|t| t.starts_with("etcd-"));
    (matches!(kind, "crash" | "pause")
        && !targets.is_empty()
        && targets
            .iter()
            .all(|t| !t.starts_with("kv-") && !t.starts_with("device-")))
        || (kind == "partition" && etcd)
}

/// The figures of every kv fault in the history. `probe_every_us`: the prober's pause.
pub fn kv_faults(
    history: &[Record],
    probes: &[Probe],
    probe_every_us: u64,
) -> Vec<KvFaultAvailability> {
    faults_where(history, is_kv_fault, |start, end| {
        let of = |read: bool| {
            let ps: Vec<Probe> = probes.iter().filter(|p| p.read == read).copied().collect();
            stall(&ps, start, end, probe_every_us)
        };
        (of(false), of(true))
    })
}

/// The send->ack and reconnect figures of every crash or pause of a server node other than
/// kv, and of every partition that cuts etcd off (no probe: `stall` is `None`).
pub fn node_faults(history: &[Record]) -> Vec<KvFaultAvailability> {
    faults_where(history, is_node_fault, |_, _| (None, None))
}

type Stall = Option<(u32, u64)>;

fn faults_where(
    history: &[Record],
    pick: fn(&str, &[String]) -> bool,
    stalls_of: impl Fn(u64, u64) -> (Stall, Stall),
) -> Vec<KvFaultAvailability> {
    let mut open: BTreeMap<(String, Vec<String>), Vec<u64>> = BTreeMap::new();
    let mut spans = Vec::new();
    for r in history {
        match &r.ev {
            Event::Fault { kind, targets, .. } if pick(kind, targets) => open
                .entry((kind.clone(), targets.clone()))
                .or_default()
                .push(r.t_us),
            Event::Heal { kind, targets, .. } if pick(kind, targets) => {
                let key = (kind.clone(), targets.clone());
                if let Some(start) = open
                    .get_mut(&key)
                    .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
                {
                    spans.push((key.0, key.1, start, r.t_us));
                }
            }
            _ => {}
        }
    }
    spans.sort_by_key(|s| s.2);
    // First send time per (device, client_msg_id), and its ack time when the device stayed
    // connected in between (an ack after a reconnect measures the device's absence).
    let mut sent: BTreeMap<(Id, Id), u64> = BTreeMap::new();
    let mut acked: BTreeMap<(Id, Id), u64> = BTreeMap::new();
    let mut away: BTreeMap<(Id, Id), bool> = BTreeMap::new();
    let mut last_drop: BTreeMap<Id, u64> = BTreeMap::new();
    // (dropped at, connected again at) per drop.
    let mut drops: Vec<(u64, Option<u64>)> = Vec::new();
    let mut open_drop: BTreeMap<Id, usize> = BTreeMap::new();
    for r in history {
        match &r.ev {
            Event::Connected { device, .. } => {
                if let Some(i) = open_drop.remove(device) {
                    drops[i].1 = Some(r.t_us);
                }
            }
            Event::Disconnected { device, reason, .. }
                if matches!(reason.as_str(), "logout" | "app closed") =>
            {
                // Closed while still reconnecting: no longer waiting.
                open_drop.remove(device);
            }
            // Drops only: a device whose app closed does not try to connect.
            Event::Disconnected { device, reason, .. }
                if !open_drop.contains_key(device)
                    && !matches!(reason.as_str(), "logout" | "app closed") =>
            {
                open_drop.insert(*device, drops.len());
                drops.push((r.t_us, None));
            }
            _ => {}
        }
        match &r.ev {
            Event::Send {
                device,
                client_msg_id,
                ..
            } => {
                sent.entry((*device, *client_msg_id)).or_insert(r.t_us);
            }
            Event::Disconnected { device, .. } => {
                last_drop.insert(*device, r.t_us);
            }
            Event::Ack {
                device,
                client_msg_id,
                ..
            } => {
                let key = (*device, *client_msg_id);
                if let (Some(&t), false) = (sent.get(&key), acked.contains_key(&key)) {
                    let dropped = last_drop.get(device).is_some_and(|&d| d >= t);
                    away.insert(key, dropped);
                }
                acked.entry(key).or_insert(r.t_us);
            }
            _ => {}
        }
    }
    spans
        .into_iter()
        .map(|(kind, targets, start, end)| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 86_400_000_000, 3)
                .expect("valid histogram bounds");
            let (mut sends, mut unacked) = (0, 0);
            for (key, &t) in sent.range(..) {
                if t < start || t > end {
                    continue;
                }
                match (acked.get(key), away.get(key)) {
                    (Some(_), Some(true)) => continue,
                    (Some(&a), _) => h.saturating_record(a.saturating_sub(t).max(1)),
                    (None, _) => unacked += 1,
                }
                sends += 1;
            }
            let ack_us = (!h.is_empty()).then(|| {
                (
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                )
            });
            let mut w = Histogram::<u64>::new_with_bounds(1, 86_400_000_000, 3)
                .expect("valid histogram bounds");
            for (t, back) in drops.iter().filter(|(t, _)| *t >= start && *t <= end) {
                if let Some(b) = back {
                    w.saturating_record(b.saturating_sub(*t).max(1));
                }
            }
            let (stall, read_stall) = stalls_of(start, end);
            KvFaultAvailability {
                reconnects: w.len(),
                reconnect_us: (!w.is_empty())
                    .then(|| (w.value_at_quantile(0.5), w.value_at_quantile(0.99), w.max())),
                stall,
                read_stall,
                kind,
                targets,
                start_us: start,
                end_us: end,
                sends,
                unacked,
                ack_us,
            }
        })
        .collect()
}

/// The longest stall of any shard over [start, end + 10 s], if probes cover it.
fn stall(probes: &[Probe], start: u64, end: u64, every: u64) -> Stall {
    let until = end + 10_000_000;
    let mut by_shard: BTreeMap<u32, Vec<&Probe>> = BTreeMap::new();
    for p in probes
        .iter()
        .filter(|p| p.end_us >= start && p.start_us <= until)
    {
        by_shard.entry(p.shard).or_default().push(p);
    }
    by_shard
        .into_iter()
        .map(|(shard, ps)| {
            let mut last_ok = start;
            let mut worst = 0;
            for p in ps.iter().filter(|p| p.ok) {
                worst = worst.max(p.end_us.saturating_sub(last_ok));
                last_ok = p.end_us.max(last_ok);
            }
            // Still stalled at the end of the window.
            worst = worst.max(until.saturating_sub(last_ok).min(until - start));
            (shard, worst.saturating_sub(every))
        })
        .max_by_key(|(_, s)| *s)
}

/// One line for the printed report.
pub fn describe(a: &KvFaultAvailability) -> String {
    let secs = |us: u64| us as f64 / 1e6;
    let ms = |us: u64| us as f64 / 1e3;
    let stall = match (a.stall, a.read_stall) {
        (Some((shard, us)), Some((rshard, rus))) => format!(
            "writes stalled up to {:.2} s (shard {shard}), reads {:.2} s (shard {rshard}); ",
            secs(us),
            secs(rus)
        ),
        (Some((shard, us)), None) => {
            format!("writes stalled up to {:.2} s (shard {shard}); ", secs(us))
        }
        _ => String::new(),
    };
    let acks = match a.ack_us {
        Some((p50, p99, p999)) => format!(
            "send->ack p50 {:.0} ms p99 {:.0} ms p99.9 {:.0} ms",
            ms(p50),
            ms(p99),
            ms(p999)
        ),
        None => "no send acked".into(),
    };
    let reconnects = match a.reconnect_us {
        Some((p50, p99, max)) => format!(
            "; {} devices dropped inside reconnected after p50 {:.2} s p99 {:.2} s max {:.2} s",
            a.reconnects,
            secs(p50),
            secs(p99),
            secs(max)
        ),
        None => String::new(),
    };
    // A partition names every node on both sides: name the etcd side only.
    let targets = if a.kind == "partition" {
        format!("of {} nodes cutting etcd-0 off", a.targets.len())
    } else {
        a.targets.join(",")
    };
    format!(
        "{} {} at {:.1} s for {:.1} s: {stall}{} sends started inside ({} never acked), {acks}{reconnects}",
        a.kind,
        targets,
        secs(a.start_us),
        secs(a.end_us.saturating_sub(a.start_us)),
        a.sends,
        a.unacked
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::testutil::{H, S};

    // Proves a crash or pause of a non-kv server node gets its send->ack figures (a send
    // inside it, acked 2 s later, counts; one before it does not), and kv faults and device
    // faults are left to the kv report and to nobody.
    #[test]
    fn node_faults_measure_sends_inside_a_crash() {
        let h = H::new()
            .device(0, 1, 11)
            .up(S, 1, 11)
            .send(5 * S, 11, 100, 1)
            .ack(5 * S + 50_000, 11, 100, 1, 1)
            .fault(10 * S, "crash", "idgen-0")
            .fault(10 * S, "crash", "kv-1")
            .fault(10 * S, "tunnel", "device-0")
            .send(11 * S, 11, 100, 2)
            .ack(13 * S, 11, 100, 2, 2)
            .heal(15 * S, "crash", "idgen-0")
            .heal(15 * S, "crash", "kv-1")
            .heal(15 * S, "tunnel", "device-0")
            .build();
        let got = node_faults(&h);
        assert_eq!(got.len(), 1, "{got:?}");
        let a = &got[0];
        assert_eq!(
            (a.kind.as_str(), a.targets.clone()),
            ("crash", vec!["idgen-0".to_string()])
        );
        assert_eq!(
            (a.sends, a.unacked, a.stall, a.read_stall),
            (1, 0, None, None)
        );
        let (p50, _, _) = a.ack_us.expect("one send acked");
        assert!((1_990_000..=2_010_000).contains(&p50), "{p50}");
        assert!(describe(a).contains("1 sends started inside (0 never acked)"));
        assert_eq!(kv_faults(&h, &[], 100_000).len(), 1);
    }

    // Proves reads and writes stall apart: writes every 100 ms all through, reads failing
    // for 3 s after the fault, give a write stall of 0 and a read stall of 3 s less the
    // probe's own 100 ms pause.
    #[test]
    fn read_and_write_stalls_are_timed_apart() {
        let h = H::new()
            .fault(10 * S, "crash", "kv-2")
            .heal(12 * S, "crash", "kv-2")
            .build();
        let every = 100_000;
        let mut probes = Vec::new();
        let mut t = 5 * S;
        while t < 25 * S {
            for read in [false, true] {
                let ok = !(read && (10 * S..13 * S).contains(&t));
                probes.push(Probe {
                    shard: 0,
                    read,
                    start_us: t,
                    end_us: t + 1_000,
                    ok,
                });
            }
            t += every;
        }
        let got = kv_faults(&h, &probes, every);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].stall, Some((0, 0)));
        let (shard, us) = got[0].read_stall.expect("reads probed");
        assert_eq!(shard, 0);
        assert!((2_850_000..=2_950_000).contains(&us), "{us}");
        assert!(
            describe(&got[0]).contains("reads 2.90 s (shard 0)"),
            "{}",
            describe(&got[0])
        );
    }
}
