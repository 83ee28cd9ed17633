//! Simulation tests of the named workloads, the run report and the capacity plan (build with
//! `--cfg madsim`): every named workload passes at a small scale and writes a consistent
//! report; a named workload replays byte-identically; the capacity command writes a plan
//! whose figures agree with each other.

#![cfg(madsim)]

use nodes::canary::Canaries;
use sim::cli::{CapacityOpts, Opts};
use sim::plan::plan_for;
use sim::run::run_on_fresh_thread;

fn small(workload: &str, seed: u64) -> Opts {
    Opts {
        seed,
        workload: workload.into(),
        users: 300,
        duration: 150,
        liveness_budget: 60,
        ..Opts::defaults()
    }
}

// Proves every named workload keeps every invariant at 300 users under the default light
// faults, and its report holds: the files (Markdown, JSON, >= 3 SVG plots), deliveries >=
// messages, heartbeats that match the connected devices at one per 5 s, and kv figures that
// match their per-operation breakdown.
#[test]
fn named_workloads_pass_and_report() {
    for (name, _) in workloads::WORKLOADS {
        let opts = small(name, 1);
        let plan = plan_for(&opts).unwrap();
        let o = run_on_fresh_thread(&opts, &Canaries::none(), &plan);
        for r in &o.reports {
            assert_eq!(
                r.violation_count, 0,
                "{name}: {} violated: {:?}",
                r.name, r.violations
            );
        }
        let r = sim::report::build(&opts, &plan, &o);
        let dir = tempfile::tempdir().unwrap();
        let files = reports::run::write(dir.path(), &r).unwrap();
        let svgs = files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "svg"))
            .count();
        assert!(svgs >= 3, "{name}: {files:?}");
        assert!(dir.path().join("report.md").exists() && dir.path().join("report.json").exists());
        let t = &r.totals;
        assert!(t.acks > 0, "{name}: no message acknowledged");
        assert!(
            t.delivers >= t.acks,
            "{name}: {} deliveries < {} messages",
            t.delivers,
            t.acks
        );
        // Heartbeats: one per 5 s per connected device, summed over the series.
        let s = &r.series;
        let device_s: f64 = s.connected.iter().map(|c| c * s.bucket_s).sum();
        let expected = device_s / 5.0;
        let ratio = t.heartbeats as f64 / expected;
        assert!(
            (0.85..1.15).contains(&ratio),
            "{name}: {} heartbeats, {expected:.0} expected",
            t.heartbeats
        );
        // kv figures agree with their breakdown, across the light scenario's kv restart.
        let by_op: f64 = r.per_send.kv_by_op.iter().map(|x| x.1).sum();
        assert!(
            r.per_send.kv_requests > 0.0 && (by_op - r.per_send.kv_requests).abs() < 1e-6 * by_op,
            "{name}: kv requests per send {} vs {by_op} by operation",
            r.per_send.kv_requests
        );
        let lat = |n: &str| r.latency.iter().find(|l| l.name == n).unwrap().clone();
        assert!(
            lat("send_to_ack").count > 0 && lat("send_to_ack").p50_ms > 0.0,
            "{name}"
        );
        if *name == "mobile-commute" {
            assert!(plan
                .schedule
                .faults
                .iter()
                .any(|f| f.fault.kind() == "tunnel"));
        }
    }
}

// Proves a named workload (with its tunnels as faults) replays byte-identically.
#[test]
fn named_workload_is_deterministic() {
    let opts = small("mobile-commute", 3);
    let plan = plan_for(&opts).unwrap();
    let a = run_on_fresh_thread(&opts, &Canaries::none(), &plan);
    let b = run_on_fresh_thread(&opts, &Canaries::none(), &plan);
    assert_eq!(a.stats.history_hash, b.stats.history_hash);
}

// Proves `capacity` writes capacity.md and capacity.json with every figure the issue names,
// each with a provenance, and that they agree: heartbeats/s = connections / 5, a year of
// storage is 365 days, deliveries >= messages, at least two of every server.
#[test]
fn capacity_plan_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let c = CapacityOpts {
        dau: 50_000_000,
        out: dir.path().to_path_buf(),
        workload: "peak-hour".into(),
        users: 400,
        duration: 150,
        seed: 1,
    };
    assert_eq!(sim::entry::capacity(&c, &Canaries::none()), 0);
    assert!(dir.path().join("capacity.md").exists());
    assert!(dir.path().join("measurement/report.md").exists());
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("capacity.json")).unwrap())
            .unwrap();
    let v = |n: &str| {
        let f = &j["figures"][n];
        assert!(f["provenance"]["kind"].is_string(), "{n}: {f}");
        f["value"].as_f64().unwrap_or_else(|| panic!("{n}: {f}"))
    };
    assert_eq!(v("dau"), 50e6);
    let conn = v("peak_concurrent_connections");
    assert!(conn > 1e6, "{conn} connections for 50M DAU");
    assert!((v("heartbeats_per_s") - conn / 5.0).abs() < 1e-6 * conn);
    assert!(
        (v("storage_bytes_per_year") - 365.0 * v("storage_bytes_per_day")).abs()
            < 1e-6 * v("storage_bytes_per_year")
    );
    assert!(v("peak_deliveries_per_s") >= v("peak_messages_per_s"));
    assert!(
        v("peak_messages_per_s") > 0.0 && v("kv_writes_per_s") > 0.0 && v("kv_reads_per_s") > 0.0
    );
    assert!(v("bandwidth_bytes_per_s") > 0.0);
    for n in ["chat_servers", "kv_nodes", "presence_nodes", "idgen_nodes"] {
        assert!(v(n) >= 2.0, "{n}");
    }
}
