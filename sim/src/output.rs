//! What a run prints: the seed and options first, a table per invariant, counts, speed, and
//! on failure the first violations and the exact command that reproduces the run.

use nodes::canary::Canaries;

use crate::cli::{FaultSource, Opts};
use crate::outcome::Outcome;
use crate::plan::Plan;

pub fn print_header(opts: &Opts, canaries: &Canaries) {
    println!("seed={}", opts.seed);
    println!(
        "options: workload={} users={} duration={}s liveness_budget={}s rate={}/user/min faults={} nodes: api={} chat={} idgen={} kv={} etcd=1 presence={} push={} kv_shards={} replicas={} canaries=[{}]",
        opts.workload,
        opts.users,
        opts.duration,
        opts.liveness_budget,
        opts.rate,
        match opts.fault_source() {
            FaultSource::None => "none".to_string(),
            FaultSource::Scenario(n) => n,
            FaultSource::Swarm => "swarm".to_string(),
            FaultSource::File(p) => format!("schedule file {}", p.display()),
        },
        opts.api,
        opts.chat,
        opts.idgen,
        opts.kv,
        opts.presence,
        opts.push,
        if opts.kv_shards == 0 {
            "one per kv node".to_string()
        } else {
            opts.kv_shards.to_string()
        },
        opts.replicas,
        canaries.names().join(",")
    );
}

/// Prints what the schedule holds: for swarm the plan drawn from the seed, then the count of
/// faults by kind; every fault with --print-schedule.
pub fn print_schedule(opts: &Opts, plan: &Plan) {
    let schedule = &plan.schedule;
    if opts.fault_source() == FaultSource::Swarm {
        let devices = plan.workload.device_count() as u32;
        println!(
            "{}",
            scenarios::swarm(&crate::plan::scenario_ctx(opts, devices))
        );
    }
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &schedule.faults {
        *kinds.entry(f.fault.kind()).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}={n}")).collect();
    println!(
        "schedule: {} ({} faults: {}){}",
        schedule.name,
        schedule.faults.len(),
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(" ")
        },
        if schedule.etcd_timeout_rate > 0.0 {
            format!(
                "; etcd-slow: {:.1} % of etcd requests held 5-15 s and failed",
                schedule.etcd_timeout_rate * 100.0
            )
        } else {
            String::new()
        }
    );
    if opts.print_schedule {
        for f in &schedule.faults {
            println!("  {f}");
        }
    }
}

fn secs(us: Option<u64>) -> String {
    us.map_or("never".to_string(), |u| format!("{:.1} s", u as f64 / 1e6))
}

/// Prints the outcome; returns the exit code (0 when every invariant holds).
pub fn print_outcome(opts: &Opts, o: &Outcome) -> i32 {
    let s = &o.stats;
    println!();
    println!("{:<16} {:>10} {:>11}", "invariant", "checks", "violations");
    println!("{:-<16} {:->10} {:->11}", "", "", "");
    for r in &o.reports {
        println!("{:<16} {:>10} {:>11}", r.name, r.checks, r.violation_count);
    }
    for r in &o.reports {
        for note in &r.notes {
            println!("{}: {note}", r.name);
        }
    }
    println!();
    println!(
        "workload: {} users, {} devices, {} groups (largest {} members)",
        s.users, s.devices, s.groups, s.biggest_group
    );
    println!(
        "counts: sent={} acked={} delivered={} pushes={} presence_changes={} connects={} bad_inputs={} group_full_refusals={}",
        s.sends, s.acks, s.delivers, s.pushes, s.presence_changes, s.connects, s.bad_inputs, s.group_full_refusals
    );
    if !s.errors.is_empty() {
        let errs: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("errors shown to devices: {}", errs.join(" "));
    }
    if !s.server_errors.is_empty() {
        let errs: Vec<String> = s
            .server_errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "errors counted by chat servers (since their last start): {}",
            errs.join(" ")
        );
    }
    let c = &o.convergence;
    println!(
        "after the heal: backlog delivered in {} ({} deliveries), presence settled in {}, every device connected in {}{}",
        secs(c.backlog_delivered_after_us),
        c.backlog_deliveries,
        secs(c.presence_settled_after_us),
        secs(c.all_connected_after_us),
        if c.devices_not_connected > 0 {
            format!(" ({} devices not connected at the end)", c.devices_not_connected)
        } else {
            String::new()
        }
    );
    for st in &o.storms {
        println!(
            "reconnect storm: {} crashed at {:.1} s with {} devices; peak {} connects per simulated s; reconnect p50 {} p99 {}; all back in {}",
            st.server,
            st.crashed_at_us as f64 / 1e6,
            st.dropped,
            st.peak_connects_per_s,
            secs(st.reconnect_p50_us),
            secs(st.reconnect_p99_us),
            secs(st.all_back_after_us)
        );
    }
    if s.faults > 0 {
        println!(
            "faults: {} applied; disk sectors undone by kv crashes (never synced): {}",
            s.faults, s.lost_disk_writes
        );
    }
    for note in &s.notes {
        println!("faults: {note}");
    }
    let every = crate::prober::PROBE_EVERY.as_micros() as u64;
    for a in crate::availability::kv_faults(&o.history, &s.kv_probes, every) {
        println!("kv availability: {}", crate::availability::describe(&a));
    }
    for a in crate::availability::node_faults(&o.history) {
        println!("availability: {}", crate::availability::describe(&a));
    }
    println!(
        "time: simulated {:.1} s, wall {:.2} s, {:.1} simulated s per wall s; network {} messages, {:.0} per wall s; history {} events, hash {}",
        s.sim_secs,
        s.wall_secs,
        s.sim_secs / s.wall_secs.max(1e-9),
        s.net_messages,
        s.net_messages as f64 / s.wall_secs.max(1e-9),
        o.history.len(),
        &s.history_hash[..16.min(s.history_hash.len())]
    );
    let failed: Vec<_> = o.reports.iter().filter(|r| r.violation_count > 0).collect();
    if failed.is_empty() {
        println!("result: PASS");
        return 0;
    }
    println!();
    for r in &failed {
        println!("{} violated {} times; first:", r.name, r.violation_count);
        for v in r.violations.iter().take(opts.show_violations) {
            println!("  - {v}");
        }
    }
    println!();
    println!("result: FAIL");
    println!("reproduce: {}", repro_command(opts));
    1
}

/// The exact command that replays this run.
pub fn repro_command(opts: &Opts) -> String {
    let features = if opts.canary.is_empty() {
        ""
    } else {
        " --features canaries"
    };
    format!(
        "cargo run --release -p sim{features} -- {} --history history.jsonl",
        opts.repro_args()
    )
}
