//! Availability around kv faults: for each fault that touched kv, how long writes to a shard
//! were refused or stalled (from the prober), and how long the sends devices started inside
//! it waited for their acks (from the history).
//!
//! A shard's stall in a window is the longest stretch between two successful probe writes
//! (or from the fault's start to the first success), minus the probe's own pause: zero when
//! every write went through at once. A send counts for a fault when its first attempt fell
//! between the fault and its heal and its device stayed connected until the ack (an ack after
//! a reconnect measures the device's absence); one never acked is counted apart.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::history::{Event, Id, Record};

/// A probe write, as the prober records it (see `prober`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeWrite {
    pub shard: u32,
    pub start_us: u64,
    pub end_us: u64,
    pub ok: bool,
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
    pub sends: u64,
    pub unacked: u64,
    /// Send->ack of the acked ones: p50, p99, p99.9, in microseconds.
    pub ack_us: Option<(u64, u64, u64)>,
}

/// Whether a fault event is a kv fault.
fn is_kv_fault(kind: &str, targets: &[String]) -> bool {
    crate::checkers::KV_FAULT_KINDS.contains(&kind)
        || (kind == "crash" && targets.iter().any(|t| t.starts_with("kv-")))
}

/// The figures of every kv fault in the history. `probe_every_us`: the prober's pause.
pub fn kv_faults(
    history: &[Record],
    probes: &[ProbeWrite],
    probe_every_us: u64,
) -> Vec<KvFaultAvailability> {
    let mut open: BTreeMap<(String, Vec<String>), Vec<u64>> = BTreeMap::new();
    let mut spans = Vec::new();
    for r in history {
        match &r.ev {
            Event::Fault { kind, targets, .. } if is_kv_fault(kind, targets) => open
                .entry((kind.clone(), targets.clone()))
                .or_default()
                .push(r.t_us),
            Event::Heal { kind, targets, .. } if is_kv_fault(kind, targets) => {
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
    for r in history {
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
            KvFaultAvailability {
                stall: stall(probes, start, end, probe_every_us),
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
fn stall(probes: &[ProbeWrite], start: u64, end: u64, every: u64) -> Option<(u32, u64)> {
    let until = end + 10_000_000;
    let mut by_shard: BTreeMap<u32, Vec<&ProbeWrite>> = BTreeMap::new();
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
    let stall = match a.stall {
        Some((shard, us)) => format!("writes stalled up to {:.2} s (shard {shard})", secs(us)),
        None => "no probe".into(),
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
    format!(
        "{} {} at {:.1} s for {:.1} s: {stall}; {} sends started inside ({} never acked), {acks}",
        a.kind,
        a.targets.join(","),
        secs(a.start_us),
        secs(a.end_us.saturating_sub(a.start_us)),
        a.sends,
        a.unacked
    )
}
