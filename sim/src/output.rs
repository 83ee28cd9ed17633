//! What a run prints: the seed and options first, a table per invariant, counts, speed, and
//! on failure the first violations and the exact command that reproduces the run.

use nodes::canary::Canaries;

use crate::cli::Opts;
use crate::run::Outcome;

pub fn print_header(opts: &Opts, canaries: &Canaries) {
    println!("seed={}", opts.seed);
    println!(
        "options: users={} duration={}s liveness_budget={}s rate={}/user/min faults={} nodes: api={} chat={} idgen={} kv={} discovery=1 presence=1 push=1 canaries=[{}]",
        opts.users,
        opts.duration,
        opts.liveness_budget,
        opts.rate,
        if opts.no_faults { "none" } else { "light" },
        opts.api,
        opts.chat,
        opts.idgen,
        opts.kv,
        canaries.names().join(",")
    );
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
    let features = if opts.canary.is_empty() {
        ""
    } else {
        " --features canaries"
    };
    println!(
        "reproduce: cargo run -p sim{features} -- {} --history history.jsonl",
        opts.repro_args()
    );
    1
}
