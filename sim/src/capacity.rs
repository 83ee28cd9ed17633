//! `sim capacity --dau N --out DIR`: measures the model's peak hour on the real node code in
//! simulation at a small scale (no injected faults; the workload's own tunnels and drops
//! stay), then writes the capacity plan for N daily active users (`reports::capacity`) and the
//! measurement run's report.

use reports::capacity::{self, Assumptions, Measurement};
use workloads::model::Model;

use crate::cli::{CapacityOpts, Opts};
use crate::outcome::Outcome;
use crate::plan::{plan_for, Plan};

/// The measurement run's options and plan, announced on stdout.
pub fn measurement(c: &CapacityOpts) -> Result<(Opts, Plan), String> {
    let opts = Opts {
        seed: c.seed,
        users: c.users,
        workload: c.workload.clone(),
        duration: c.duration,
        dau: c.dau,
        no_faults: true,
        command: None,
        report: Some(c.out.join("measurement")),
        ..Opts::defaults()
    };
    let plan = plan_for(&opts)?;
    println!(
        "capacity: measuring workload `{}` with {} users ({} devices) for {} simulated s, seed {}, no injected faults",
        opts.workload,
        opts.users,
        plan.workload.device_count(),
        opts.duration,
        opts.seed
    );
    Ok((opts, plan))
}

/// Writes the measurement run's report and, if it broke no invariant, the plan.
pub fn write_plan(c: &CapacityOpts, opts: &Opts, plan: &Plan, outcome: &Outcome) -> i32 {
    let (opts, plan) = (opts.clone(), plan);
    let code = crate::output::print_outcome(&opts, outcome);
    let report = crate::report::build(&opts, plan, outcome);
    if let Err(e) = reports::run::write(&c.out.join("measurement"), &report) {
        eprintln!("error: writing the measurement report: {e}");
        return 2;
    }
    if code != 0 {
        eprintln!("error: the measurement run broke an invariant; no plan is written from it");
        return code;
    }
    let w = outcome.window.1.since(&outcome.window.0);
    let kv = outcome.window.1.kv_since(&outcome.window.0);
    let space = outcome.window.1.kv_space_since(&outcome.window.0);
    let history = space
        .iter()
        .filter(|t| reports::capacity::HISTORY_TABLES.contains(&t.0.as_str()));
    let m = Measurement {
        workload: opts.workload.clone(),
        seed: opts.seed,
        scale: opts.users as f64 / c.dau as f64,
        users: opts.users as u64,
        window_s: w.t_s,
        mean_connected: report.totals.mean_connected,
        sends: w.sends,
        acks: w.acks,
        delivers: w.delivers,
        heartbeats: w.heartbeats,
        connects: w.connects,
        net_messages: w.net_messages,
        wire_bytes: w.wire_bytes,
        heartbeat_wire_bytes: w.heartbeat_wire_bytes,
        wire_by_path: w.wire_paths.clone().into_iter().collect(),
        kv_requests: kv.requests,
        kv_writes: kv.writes,
        storage_bytes: w.disk_bytes,
        kv_replicas: opts.replicas.max(1),
        storage_page_bytes: space.iter().map(|t| t.2).sum(),
        storage_stored_bytes: space.iter().map(|t| t.1).sum(),
        storage_history_page_bytes: history.clone().map(|t| t.2).sum(),
        storage_history_stored_bytes: history.map(|t| t.1).sum(),
        chars: w.chars,
        text_bytes: w.text_bytes,
        kv_by_op: kv
            .by_op
            .iter()
            .map(|(op, (n, wr))| (op.clone(), *n, *wr))
            .collect(),
    };
    let p = capacity::plan(
        c.dau,
        &Model::default(),
        &m,
        &capacity::default_bench(),
        &Assumptions::default(),
    );
    match capacity::write(&c.out, &p) {
        Ok(files) => {
            for (name, f) in &p.figures {
                println!("  {name:<32} {:>18.1} {}", f.value, f.unit);
            }
            for f in files {
                println!("wrote {}", f.display());
            }
            0
        }
        Err(e) => {
            eprintln!("error: writing the plan to {}: {e}", c.out.display());
            2
        }
    }
}
