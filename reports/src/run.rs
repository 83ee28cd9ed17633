//! A simulation run's report: what was run, whether every invariant held, latency
//! percentiles, rates over simulated time, per-send costs, and how fast the simulation went.
//! `write` puts `report.md`, `report.json` and the SVG plots in a directory.
//!
//! The figures are computed by the simulator from the run's history (see `sim::metrics`);
//! this module only lays them out.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plot;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub meta: Meta,
    pub invariants: Vec<Invariant>,
    pub latency: Vec<Latency>,
    pub totals: Totals,
    pub per_send: PerSend,
    pub faults: Vec<FaultSpan>,
    /// Per kv fault: how long writes stalled and what sends started inside it waited.
    #[serde(default)]
    pub kv_availability: Vec<KvAvailability>,
    pub series: Series,
    pub speed: Speed,
}

/// One kv fault's availability (see `sim::availability`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvAvailability {
    pub kind: String,
    pub targets: String,
    pub start_s: f64,
    pub duration_s: f64,
    /// The longest a shard's writes stalled around it, and which shard; none if unprobed.
    pub write_stall_s: Option<f64>,
    pub shard: Option<u32>,
    /// The same for linearizable reads.
    #[serde(default)]
    pub read_stall_s: Option<f64>,
    #[serde(default)]
    pub read_shard: Option<u32>,
    /// Sends started inside it by devices that stayed connected until their ack.
    pub sends: u64,
    pub unacked: u64,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub ack_p999_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub seed: u64,
    pub workload: String,
    /// The population scale, `1/N` of the model's DAU.
    pub scale: String,
    pub users: u64,
    pub devices: u64,
    pub groups: u64,
    pub safety_s: f64,
    pub liveness_s: f64,
    /// e.g. `api=2 chat=3 idgen=2 kv=3 discovery=1 presence=1 push=1`.
    pub nodes: String,
    pub faults: String,
    /// The command that reruns exactly this run.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invariant {
    pub name: String,
    pub violations: u64,
}

/// Percentiles of one latency, in simulated milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub name: String,
    /// What is measured, from which history events.
    pub what: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub sends: u64,
    pub acks: u64,
    /// Messages handed to devices (every recipient device, live or by sync).
    pub delivers: u64,
    pub pushes: u64,
    pub presence_changes: u64,
    pub connects: u64,
    pub heartbeats: u64,
    /// Messages the simulated network carried (one per TCP write).
    pub net_messages: u64,
    /// Bytes written to TCP by every node and device.
    pub wire_bytes: u64,
    pub kv_requests: u64,
    pub kv_writes: u64,
    /// Growth of the kv nodes' database files from the end of setup to the end of the run.
    pub storage_bytes: u64,
    /// Most devices connected at once, and the mean over the safety phase after warm-up.
    pub peak_connected: u64,
    pub mean_connected: f64,
}

/// Costs per message sent (first attempts), measured over the whole run (setup excluded where noted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerSend {
    pub deliveries: f64,
    /// Includes heartbeats and presence traffic of the run divided by sends.
    pub net_messages: f64,
    pub wire_bytes: f64,
    pub kv_requests: f64,
    pub kv_writes: f64,
    pub storage_bytes: f64,
    /// Mean characters per send (the workload's length distribution as sent).
    pub chars: f64,
    /// kv operations per send by kind: (operation, requests, write operations), busiest
    /// first.
    #[serde(default)]
    pub kv_by_op: Vec<(String, f64, f64)>,
    /// Growth per send of what the kv tables hold (every replica), in the steady window:
    /// keys and values, and the pages of their B-trees. `storage_bytes` is file length.
    #[serde(default)]
    pub storage_stored_bytes: f64,
    #[serde(default)]
    pub storage_page_bytes: f64,
    /// The same per redb table: (table, stored bytes, page bytes), biggest pages first.
    #[serde(default)]
    pub storage_by_table: Vec<(String, f64, f64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpan {
    pub kind: String,
    pub targets: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// Per-bucket figures over simulated time; `None` where a bucket had nothing to measure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub bucket_s: f64,
    /// When the liveness phase started (faults healed, every device online).
    #[serde(default)]
    pub liveness_s: Option<f64>,
    /// Bucket start times, simulated seconds from the start of traffic.
    pub t_s: Vec<f64>,
    pub sends_per_s: Vec<f64>,
    pub delivers_per_s: Vec<f64>,
    pub pushes_per_s: Vec<f64>,
    pub deliver_p50_ms: Vec<Option<f64>>,
    pub deliver_p99_ms: Vec<Option<f64>>,
    pub deliver_max_ms: Vec<Option<f64>>,
    pub ack_p99_ms: Vec<Option<f64>>,
    /// Devices connected at the bucket's end.
    pub connected: Vec<f64>,
    /// Share of connected devices' presence views that match the truth at the bucket's end.
    pub presence_accuracy: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Speed {
    pub wall_s: f64,
    pub sim_s: f64,
    pub sim_s_per_wall_s: f64,
    pub peak_rss_bytes: u64,
    pub history_events: u64,
    pub history_hash: String,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.invariants.iter().all(|i| i.violations == 0)
    }
}

/// Writes `report.md`, `report.json` and the plots into `dir` (created if missing); returns
/// the files written.
pub fn write(dir: &Path, r: &RunReport) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    let plots = plot::run_plots(r);
    for (name, svg) in &plots {
        let p = dir.join(name);
        std::fs::write(&p, svg)?;
        out.push(p);
    }
    let json = dir.join("report.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(r).expect("reports serialize"),
    )?;
    out.push(json);
    let md = dir.join("report.md");
    let names: Vec<&str> = plots.iter().map(|(n, _)| n.as_str()).collect();
    std::fs::write(&md, markdown(r, &names))?;
    out.push(md);
    Ok(out)
}

fn fmt_n(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        let n = v.round() as i64;
        let s = n.abs().to_string();
        let mut o = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                o.push(',');
            }
            o.push(c);
        }
        if n < 0 {
            format!("-{o}")
        } else {
            o
        }
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The Markdown report.
pub fn markdown(r: &RunReport, plots: &[&str]) -> String {
    let m = &r.meta;
    let mut s = String::new();
    let verdict = if r.passed() {
        "PASS: every invariant held"
    } else {
        "FAIL: invariants violated"
    };
    s += &format!(
        "# chatsim run: seed {}, workload `{}`\n\n**{verdict}.**\n\n",
        m.seed, m.workload
    );
    s += &format!("Rerun: `{}`\n\n", m.command);
    s += "| | |\n|---|---|\n";
    for (k, v) in [
        ("scale", format!("{} of the model's DAU", m.scale)),
        (
            "users / devices / groups",
            format!(
                "{} / {} / {}",
                fmt_n(m.users as f64),
                fmt_n(m.devices as f64),
                fmt_n(m.groups as f64)
            ),
        ),
        (
            "safety phase",
            format!("{} simulated s (traffic and faults)", fmt_n(m.safety_s)),
        ),
        (
            "liveness phase",
            format!(
                "{} simulated s (healed, every device online)",
                fmt_n(m.liveness_s)
            ),
        ),
        ("nodes", m.nodes.clone()),
        ("faults", m.faults.clone()),
    ] {
        s += &format!("| {k} | {v} |\n");
    }
    s += "\n## Invariants\n\n| invariant | violations |\n|---|---|\n";
    for i in &r.invariants {
        s += &format!("| {} | {} |\n", i.name, i.violations);
    }
    s += "\n## Latency (simulated time)\n\n| latency | what | count | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|---|---|\n";
    for l in &r.latency {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            l.name,
            l.what,
            fmt_n(l.count as f64),
            fmt_n(l.p50_ms),
            fmt_n(l.p90_ms),
            fmt_n(l.p99_ms),
            fmt_n(l.p999_ms),
            fmt_n(l.max_ms)
        );
    }
    let t = &r.totals;
    let p = &r.per_send;
    s += "\n## Totals and costs per message sent\n\n| figure | total | per send |\n|---|---|---|\n";
    for (k, total, per) in [
        ("sends", t.sends as f64, None),
        ("acks", t.acks as f64, None),
        ("deliveries", t.delivers as f64, Some(p.deliveries)),
        ("pushes", t.pushes as f64, None),
        ("presence changes shown", t.presence_changes as f64, None),
        ("connects", t.connects as f64, None),
        ("heartbeats", t.heartbeats as f64, None),
        (
            "network messages",
            t.net_messages as f64,
            Some(p.net_messages),
        ),
        ("wire bytes", t.wire_bytes as f64, Some(p.wire_bytes)),
        ("kv requests", t.kv_requests as f64, Some(p.kv_requests)),
        ("kv write operations", t.kv_writes as f64, Some(p.kv_writes)),
        (
            "kv storage growth, bytes",
            t.storage_bytes as f64,
            Some(p.storage_bytes),
        ),
        ("characters", p.chars * t.sends as f64, Some(p.chars)),
    ] {
        s += &format!(
            "| {k} | {} | {} |\n",
            fmt_n(total),
            per.map_or("".into(), fmt_n)
        );
    }
    if !p.storage_by_table.is_empty() {
        s += &format!(
            "\nkv storage growth per message sent (steady window, every replica): file length {} bytes; pages of the tables' B-trees {}; keys and values stored {}. By table:\n\n| table | stored bytes | page bytes |\n|---|---|---|\n",
            fmt_n(p.storage_bytes),
            fmt_n(p.storage_page_bytes),
            fmt_n(p.storage_stored_bytes)
        );
        for (table, stored, pages) in &p.storage_by_table {
            s += &format!("| `{table}` | {} | {} |\n", fmt_n(*stored), fmt_n(*pages));
        }
    }
    if !p.kv_by_op.is_empty() {
        s += "\nkv operations per message sent, by operation (steady window):\n\n| operation | requests | write operations |\n|---|---|---|\n";
        for (op, n, w) in &p.kv_by_op {
            s += &format!("| `{op}` | {} | {} |\n", fmt_n(*n), fmt_n(*w));
        }
    }
    s += &format!(
        "\nDevices connected: peak {}, mean {} over the safety phase after warm-up.\n",
        fmt_n(t.peak_connected as f64),
        fmt_n(t.mean_connected)
    );
    s += "\nPer-send network, kv and wire figures divide the whole run's traffic (heartbeats, presence, sync, setup excluded where it ran before traffic) by messages sent (first attempts): they are what one message costs the system in this workload, not what the send itself carries.\n";
    s += "\n## Plots\n\nTime counts from the start of traffic (after setup). Shaded bands are fault windows of server nodes and the network (from the `fault` to the `heal` event); the dashed line is the start of the liveness phase.\n\n";
    for p in plots {
        s += &format!("![{p}]({p})\n\n");
    }
    if !r.kv_availability.is_empty() {
        s += "## kv faults: availability\n\nWrites (reads) stalled: the longest a shard went without a successful write (linearizable read) of the prober (one tiny write and one read per shard every 100 ms, from 5 s before the fault to 20 s after its heal). Sends: first attempts started inside the fault by devices that stayed connected until their ack.\n\n| kind | targets | at s | for s | writes stalled s | shard | reads stalled s | shard | sends | never acked | ack p50 ms | ack p99 ms | ack p99.9 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        let opt = |v: Option<f64>| v.map_or("-".to_string(), fmt_n);
        for a in &r.kv_availability {
            s += &format!(
                "| {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                a.kind,
                a.targets,
                a.start_s,
                a.duration_s,
                opt(a.write_stall_s),
                a.shard.map_or("-".to_string(), |s| s.to_string()),
                opt(a.read_stall_s),
                a.read_shard.map_or("-".to_string(), |s| s.to_string()),
                a.sends,
                a.unacked,
                opt(a.ack_p50_ms),
                opt(a.ack_p99_ms),
                opt(a.ack_p999_ms)
            );
        }
        s += "\n";
    }
    if !r.faults.is_empty() {
        s += "## Faults\n\n| kind | targets | from s | to s |\n|---|---|---|---|\n";
        for f in r.faults.iter().take(200) {
            s += &format!(
                "| {} | {} | {:.1} | {:.1} |\n",
                f.kind, f.targets, f.start_s, f.end_s
            );
        }
        if r.faults.len() > 200 {
            s += &format!("\n({} more in report.json)\n", r.faults.len() - 200);
        }
    }
    let sp = &r.speed;
    s += &format!(
        "\n## Speed\n\n{} simulated s in {} wall s ({} simulated s per wall s), peak RSS {} MB, {} history events, history hash `{}`.\n",
        fmt_n(sp.sim_s),
        fmt_n(sp.wall_s),
        fmt_n(sp.sim_s_per_wall_s),
        fmt_n(sp.peak_rss_bytes as f64 / 1e6),
        fmt_n(sp.history_events as f64),
        sp.history_hash
    );
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> RunReport {
        let n = 20;
        let t: Vec<f64> = (0..n).map(|i| i as f64 * 5.0).collect();
        RunReport {
            meta: Meta {
                seed: 7,
                workload: "peak-hour".into(),
                scale: "1/250000".into(),
                users: 200,
                devices: 400,
                groups: 30,
                safety_s: 100.0,
                liveness_s: 60.0,
                nodes: "api=2 chat=3".into(),
                faults: "light".into(),
                command: "cargo run -p sim -- --seed 7".into(),
            },
            invariants: vec![Invariant {
                name: "no_loss".into(),
                violations: 0,
            }],
            latency: vec![Latency {
                name: "send_to_ack".into(),
                what: "send -> ack".into(),
                count: 10,
                p50_ms: 5.0,
                p90_ms: 8.0,
                p99_ms: 9.0,
                p999_ms: 9.5,
                max_ms: 10.0,
            }],
            totals: Totals {
                sends: 10,
                acks: 10,
                delivers: 25,
                ..Totals::default()
            },
            per_send: PerSend {
                deliveries: 2.5,
                ..PerSend::default()
            },
            faults: vec![FaultSpan {
                kind: "crash".into(),
                targets: "chat-0".into(),
                start_s: 20.0,
                end_s: 30.0,
            }],
            kv_availability: vec![KvAvailability {
                kind: "crash".into(),
                targets: "kv-1".into(),
                start_s: 40.0,
                duration_s: 5.0,
                write_stall_s: Some(1.1),
                shard: Some(1),
                read_stall_s: Some(1.3),
                read_shard: Some(1),
                sends: 12,
                unacked: 0,
                ack_p50_ms: Some(20.0),
                ack_p99_ms: Some(900.0),
                ack_p999_ms: Some(900.0),
            }],
            series: Series {
                bucket_s: 5.0,
                liveness_s: Some(80.0),
                sends_per_s: t.iter().map(|x| x / 10.0).collect(),
                delivers_per_s: t.iter().map(|x| x / 4.0).collect(),
                pushes_per_s: vec![0.0; n],
                deliver_p50_ms: t.iter().map(|x| Some(x + 1.0)).collect(),
                deliver_p99_ms: t.iter().map(|x| Some(x + 5.0)).collect(),
                deliver_max_ms: t.iter().map(|x| Some(x + 9.0)).collect(),
                ack_p99_ms: vec![None; n],
                connected: t.iter().map(|x| 100.0 + x).collect(),
                presence_accuracy: t.iter().map(|_| Some(0.99)).collect(),
                t_s: t,
            },
            speed: Speed::default(),
        }
    }

    // Proves a report writes its Markdown, JSON and at least three plots, the JSON reads back
    // as the same report, and the Markdown links every plot.
    #[test]
    fn writes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample();
        let files = write(dir.path(), &r).unwrap();
        let svgs: Vec<_> = files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "svg"))
            .collect();
        assert!(svgs.len() >= 3, "{files:?}");
        for f in &svgs {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        }
        let back: RunReport =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back, r);
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("PASS"));
        for f in svgs {
            let name = f.file_name().unwrap().to_str().unwrap();
            assert!(md.contains(&format!("]({name})")), "{name} not linked");
        }
    }

    // Proves numbers print with thousands separators and sensible precision.
    #[test]
    fn numbers() {
        assert_eq!(fmt_n(1234567.0), "1,234,567");
        assert_eq!(fmt_n(12.34), "12.3");
        assert_eq!(fmt_n(0.1234), "0.123");
        assert_eq!(fmt_n(-1500.0), "-1,500");
    }
}
