//! Builds a run's report (`--report DIR`) from its options, plan and outcome: the figures
//! of `metrics` over the history plus the run's counters.

use reports::run::{Invariant, Meta, PerSend, RunReport, Speed, Totals};

use crate::cli::Opts;
use crate::outcome::Outcome;
use crate::plan::Plan;

pub fn build(opts: &Opts, plan: &Plan, o: &Outcome) -> RunReport {
    let m = crate::metrics::measure(
        &o.history,
        crate::plan::window_start_s(opts.duration) as f64,
    );
    let st = &o.stats;
    let w = &plan.workload;
    let storage = o.window.1.disk_bytes.saturating_sub(o.window.0.disk_bytes);
    let window = o.window.1.since(&o.window.0);
    let kv = o.window.1.kv_since(&o.window.0);
    let mut kv_by_op: Vec<(String, f64, f64)> = kv
        .by_op
        .iter()
        .map(|(op, (n, w))| {
            (
                op.clone(),
                *n as f64 / window.sends.max(1) as f64,
                *w as f64 / window.sends.max(1) as f64,
            )
        })
        .collect();
    kv_by_op.retain(|(_, n, w)| *n > 0.0 || *w > 0.0);
    kv_by_op.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let space = o.window.1.kv_space_since(&o.window.0);
    let mut storage_by_table: Vec<(String, f64, f64)> = space
        .iter()
        .map(|(t, s, p)| {
            let per = |x: i64| x as f64 / window.sends.max(1) as f64;
            (t.clone(), per(*s), per(*p))
        })
        .filter(|(_, s, p)| *s != 0.0 || *p != 0.0)
        .collect();
    storage_by_table.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let sends = st.sends.max(1) as f64;
    let window_sends = window.sends.max(1) as f64;
    let mut series = m.series;
    series.bucket_s = series.bucket_s.max(f64::MIN_POSITIVE);
    let faults = m.faults;
    let device_faults = faults.len() - reports::plot::cluster_faults(&faults).len();
    RunReport {
        meta: Meta {
            seed: opts.seed,
            workload: opts.workload.clone(),
            scale: reports::scale_label(opts.users as f64 / opts.dau as f64),
            users: w.users.len() as u64,
            devices: w.device_count() as u64,
            groups: w.groups.len() as u64,
            safety_s: opts.duration as f64,
            liveness_s: opts.liveness_budget as f64,
            nodes: format!(
                "api={} chat={} idgen={} kv={} etcd=1 presence={} push={}",
                opts.api, opts.chat, opts.idgen, opts.kv, opts.presence, opts.push
            ),
            faults: format!(
                "{} ({} faults; {device_faults} hit only devices and are not shaded)",
                plan.schedule.name,
                plan.schedule.faults.len()
            ),
            command: crate::output::repro_command(opts),
        },
        invariants: o
            .reports
            .iter()
            .map(|r| Invariant {
                name: r.name.to_string(),
                violations: r.violation_count,
            })
            .collect(),
        latency: m.latency,
        totals: Totals {
            sends: st.sends,
            acks: st.acks,
            delivers: st.delivers,
            pushes: st.pushes,
            presence_changes: st.presence_changes,
            connects: st.connects,
            heartbeats: st.heartbeats,
            net_messages: st.net_messages,
            wire_bytes: st.wire_bytes,
            kv_requests: kv.requests,
            kv_writes: kv.writes,
            storage_bytes: storage,
            peak_connected: m.peak_connected,
            mean_connected: m.mean_connected,
        },
        per_send: PerSend {
            deliveries: st.delivers as f64 / sends,
            net_messages: window.net_messages as f64 / window_sends,
            wire_bytes: window.wire_bytes as f64 / window_sends,
            kv_requests: kv.requests as f64 / window_sends,
            kv_writes: kv.writes as f64 / window_sends,
            storage_bytes: storage as f64 / window_sends,
            chars: window.chars as f64 / window.sends.max(1) as f64,
            kv_by_op,
            storage_stored_bytes: storage_by_table.iter().map(|t| t.1).sum(),
            storage_page_bytes: storage_by_table.iter().map(|t| t.2).sum(),
            storage_by_table,
        },
        faults,
        kv_availability: kv_availability(o),
        series,
        speed: Speed {
            wall_s: st.wall_secs,
            sim_s: st.sim_secs,
            sim_s_per_wall_s: st.sim_secs / st.wall_secs.max(1e-9),
            peak_rss_bytes: st.peak_rss_bytes,
            history_events: o.history.len() as u64,
            history_hash: st.history_hash.clone(),
        },
    }
}

fn kv_availability(o: &Outcome) -> Vec<reports::run::KvAvailability> {
    let every = crate::prober::PROBE_EVERY.as_micros() as u64;
    crate::availability::kv_faults(&o.history, &o.stats.kv_probes, every)
        .into_iter()
        .map(|a| {
            let ms = |us: u64| us as f64 / 1e3;
            reports::run::KvAvailability {
                kind: a.kind,
                targets: a.targets.join(","),
                start_s: a.start_us as f64 / 1e6,
                duration_s: a.end_us.saturating_sub(a.start_us) as f64 / 1e6,
                write_stall_s: a.stall.map(|(_, us)| us as f64 / 1e6),
                shard: a.stall.map(|(s, _)| s),
                read_stall_s: a.read_stall.map(|(_, us)| us as f64 / 1e6),
                read_shard: a.read_stall.map(|(s, _)| s),
                sends: a.sends,
                unacked: a.unacked,
                ack_p50_ms: a.ack_us.map(|(p, _, _)| ms(p)),
                ack_p99_ms: a.ack_us.map(|(_, p, _)| ms(p)),
                ack_p999_ms: a.ack_us.map(|(_, _, p)| ms(p)),
            }
        })
        .collect()
}
