//! Merging worker histories and judging a real run: the simulation's checkers, throughput,
//! latency percentiles, and how fast clients came back after each crash.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use sim::availability::{self, Probe};
use sim::checkers::{self, CheckReport, Params};
use sim::history::{Event, Id, Record};

/// Reads every history file, sorts by time (stable), writes the merged file.
pub fn merge(inputs: &[std::path::PathBuf], out: &Path) -> anyhow::Result<Vec<Record>> {
    let mut all = Vec::new();
    for p in inputs {
        let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            let r: Record = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a history record", p.display(), n + 1))?;
            all.push(r);
        }
    }
    all.sort_by_key(|r| r.t_us);
    let mut w = BufWriter::new(std::fs::File::create(out)?);
    for r in &all {
        writeln!(w, "{}", r.to_line())?;
    }
    w.flush()?;
    Ok(all)
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn hist() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Reconnects after one crash: devices that lost their connection within 2 s after it.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub node: String,
    pub at_s: f64,
    pub dropped: u64,
    pub back: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// From the crash until the last of them was connected again.
    pub all_back_ms: f64,
}

/// One kv fault's availability (see `sim::availability`).
#[derive(Debug, Clone, Serialize)]
pub struct KvFault {
    pub kind: String,
    pub targets: Vec<String>,
    pub at_s: f64,
    pub healed_after_s: f64,
    /// The worst shard's longest write stall, if the prober ran.
    pub stall_shard: Option<u32>,
    pub stall_ms: Option<f64>,
    /// The same for linearizable reads.
    pub read_stall_shard: Option<u32>,
    pub read_stall_ms: Option<f64>,
    pub sends: u64,
    pub unacked: u64,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub ack_p999_ms: Option<f64>,
    /// The one-line summary printed.
    pub line: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub devices: u64,
    pub connected_at_end: u64,
    pub sends: u64,
    pub acked: u64,
    pub delivered: u64,
    pub traffic_s: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    /// Send due -> ack, every ack of a first send.
    pub send_to_ack: Percentiles,
    /// Send due -> deliver, every first delivery to a recipient device.
    pub send_to_deliver: Percentiles,
    pub recoveries: Vec<Recovery>,
    /// Per kv fault (a kv node crashed or wiped): write and read stalls from the prober, and the
    /// send->ack of sends started inside it.
    pub kv_faults: Vec<KvFault>,
    pub checks: Vec<(String, u64, u64)>,
    pub violations: Vec<String>,
    pub pass: bool,
}

/// Judges a merged history. `traffic` is the [start, end) of the send window (µs);
/// `probes` the kv prober's writes and reads (may be empty), `probe_every_us` its pause.
pub fn judge(
    history: &[Record],
    traffic: (u64, u64),
    probes: &[Probe],
    probe_every_us: u64,
) -> Verdict {
    let reports: Vec<CheckReport> = checkers::run_all(history, &Params::default());
    let mut sends: BTreeMap<(Id, Id, Id), u64> = BTreeMap::new();
    let mut devices = BTreeSet::new();
    let mut connected: BTreeMap<Id, bool> = BTreeMap::new();
    let (mut ack_h, mut del_h) = (hist(), hist());
    let mut acked = BTreeSet::new();
    let mut delivered = BTreeSet::new();
    let (mut acked_in, mut delivered_in) = (0u64, 0u64);
    let end = history
        .iter()
        .rev()
        .find(|r| matches!(&r.ev, Event::Phase { name } if name == "end"))
        .map_or(u64::MAX, |r| r.t_us);
    // Crash recovery: for each crash, the devices dropped just after it and when each was back.
    let crashes: Vec<(String, u64)> = history
        .iter()
        .filter_map(|r| match &r.ev {
            Event::Fault { kind, targets, .. } if kind == "crash" => {
                Some((targets.join(","), r.t_us))
            }
            _ => None,
        })
        .collect();
    let mut dropped: Vec<BTreeMap<Id, Option<u64>>> = vec![BTreeMap::new(); crashes.len()];
    for r in history.iter().filter(|r| r.t_us <= end) {
        match &r.ev {
            Event::Device { device, .. } => {
                devices.insert(*device);
            }
            Event::Send {
                device,
                channel,
                client_msg_id,
                ..
            } => {
                sends.insert((*device, *client_msg_id, *channel), r.t_us);
            }
            Event::Ack {
                device,
                channel,
                client_msg_id,
                ..
            } => {
                let key = (*device, *client_msg_id, *channel);
                if let Some(&t) = sends.get(&key) {
                    if acked.insert(key) {
                        let _ = ack_h.record(r.t_us.saturating_sub(t).max(1));
                        if r.t_us >= traffic.0 && r.t_us < traffic.1 {
                            acked_in += 1;
                        }
                    }
                }
            }
            Event::Deliver {
                device,
                sender_device,
                client_msg_id,
                channel,
                message_id,
                ..
            } => {
                if let Some(&t) = sends.get(&(*sender_device, *client_msg_id, *channel)) {
                    if delivered.insert((*device, *message_id)) {
                        let _ = del_h.record(r.t_us.saturating_sub(t).max(1));
                        if r.t_us >= traffic.0 && r.t_us < traffic.1 {
                            delivered_in += 1;
                        }
                    }
                }
            }
            Event::Connected { device, .. } => {
                connected.insert(*device, true);
                for (k, (_, at)) in crashes.iter().enumerate() {
                    if let Some(slot @ None) = dropped[k].get_mut(device) {
                        if r.t_us >= *at {
                            *slot = Some(r.t_us);
                        }
                    }
                }
            }
            Event::Disconnected { device, .. } => {
                connected.insert(*device, false);
                for (k, (_, at)) in crashes.iter().enumerate() {
                    if r.t_us >= *at && r.t_us <= at + 2_000_000 {
                        dropped[k].entry(*device).or_insert(None);
                    }
                }
            }
            _ => {}
        }
    }
    let recoveries = crashes
        .iter()
        .zip(&dropped)
        .map(|((node, at), d)| {
            let mut h = hist();
            let mut last = *at;
            for back in d.values().flatten() {
                let _ = h.record((back - at).max(1));
                last = last.max(*back);
            }
            Recovery {
                node: node.clone(),
                at_s: *at as f64 / 1e6,
                dropped: d.len() as u64,
                back: h.len(),
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                all_back_ms: (last - at) as f64 / 1000.0,
            }
        })
        .collect::<Vec<_>>();
    let traffic_s = traffic.1.saturating_sub(traffic.0) as f64 / 1e6;
    let connected_at_end = devices
        .iter()
        .filter(|d| connected.get(d).copied().unwrap_or(false))
        .count() as u64;
    let violations: Vec<String> = reports
        .iter()
        .flat_map(|r| r.violations.iter().map(move |v| format!("{}: {v}", r.name)))
        .collect();
    let all_back = recoveries.iter().all(|r| r.back == r.dropped);
    let pass = reports.iter().all(|r| r.violation_count == 0)
        && connected_at_end == devices.len() as u64
        && all_back;
    let ms = |us: u64| us as f64 / 1e3;
    let kv_faults = availability::kv_faults(history, probes, probe_every_us)
        .iter()
        .map(|f| KvFault {
            kind: f.kind.clone(),
            targets: f.targets.clone(),
            at_s: f.start_us as f64 / 1e6,
            healed_after_s: f.end_us.saturating_sub(f.start_us) as f64 / 1e6,
            stall_shard: f.stall.map(|s| s.0),
            stall_ms: f.stall.map(|s| ms(s.1)),
            read_stall_shard: f.read_stall.map(|s| s.0),
            read_stall_ms: f.read_stall.map(|s| ms(s.1)),
            sends: f.sends,
            unacked: f.unacked,
            ack_p50_ms: f.ack_us.map(|a| ms(a.0)),
            ack_p99_ms: f.ack_us.map(|a| ms(a.1)),
            ack_p999_ms: f.ack_us.map(|a| ms(a.2)),
            line: availability::describe(f),
        })
        .collect();
    Verdict {
        devices: devices.len() as u64,
        connected_at_end,
        sends: sends.len() as u64,
        acked: acked.len() as u64,
        delivered: delivered.len() as u64,
        traffic_s,
        acked_per_s: acked_in as f64 / traffic_s.max(1e-9),
        delivered_per_s: delivered_in as f64 / traffic_s.max(1e-9),
        send_to_ack: percentiles(&ack_h),
        send_to_deliver: percentiles(&del_h),
        recoveries,
        kv_faults,
        checks: reports
            .iter()
            .map(|r| (r.name.to_string(), r.checks, r.violation_count))
            .collect(),
        violations,
        pass,
    }
}

impl Verdict {
    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let p = |name: &str, x: &Percentiles| {
            format!(
                "{name:<16} n={:<8} p50 {:>8.1} ms  p99 {:>8.1} ms  p99.9 {:>8.1} ms  max {:>8.1} ms\n",
                x.count, x.p50_ms, x.p99_ms, x.p999_ms, x.max_ms
            )
        };
        s += &format!(
            "devices {} (connected at end {}), sends {}, acked {}, delivered {}\n",
            self.devices, self.connected_at_end, self.sends, self.acked, self.delivered
        );
        s += &format!(
            "throughput over {:.0} s of traffic: {:.1} acked msgs/s, {:.1} deliveries/s\n",
            self.traffic_s, self.acked_per_s, self.delivered_per_s
        );
        s += &p("send->ack", &self.send_to_ack);
        s += &p("send->deliver", &self.send_to_deliver);
        for r in &self.recoveries {
            s += &format!(
                "crash of {} at {:.1} s: {} devices dropped, {} back; reconnect p50 {:.0} ms p99 {:.0} ms; all back in {:.0} ms\n",
                r.node, r.at_s, r.dropped, r.back, r.p50_ms, r.p99_ms, r.all_back_ms
            );
        }
        for f in &self.kv_faults {
            s += &format!("kv: {}\n", f.line);
        }
        s += "checker          checks  violations\n";
        for (name, checks, v) in &self.checks {
            s += &format!("{name:<16} {checks:>7} {v:>11}\n");
        }
        for v in self.violations.iter().take(20) {
            s += &format!("  {v}\n");
        }
        s += if self.pass {
            "result: PASS\n"
        } else {
            "result: FAIL\n"
        };
        s
    }
}
