//! What a run runs, decided before it starts from the options and the seed: the workload, the
//! fault schedule (the workload's tunnels included), and the phase timings that follow from
//! them (the liveness phase's spread of app opens, the steady window's start).

use std::sync::Arc;
use std::time::Duration;

use scenarios::Schedule;
use workloads::Workload;

use crate::cli::{FaultSource, Opts};

/// What a run runs: its workload and fault schedule (the workload's tunnels included).
#[derive(Clone)]
pub struct Plan {
    pub workload: Arc<Workload>,
    pub schedule: Schedule,
}

/// The workload the options ask for.
pub fn workload_for(opts: &Opts) -> Result<Workload, String> {
    workloads::build(
        &workloads::Spec {
            name: opts.workload.clone(),
            users: opts.users,
            duration_ms: opts.duration * 1000,
            stress_rate: opts.rate,
            model: workloads::model::Model::default(),
        },
        opts.seed,
    )
}

/// The scenario's context for this run: the cluster's size, the workload's device count and
/// the safety phase's length.
pub fn scenario_ctx(opts: &Opts, devices: u32) -> scenarios::Ctx {
    scenarios::Ctx {
        seed: opts.seed,
        duration_ms: opts.duration * 1000,
        api: opts.api,
        chat: opts.chat,
        idgen: opts.idgen,
        presence: opts.presence,
        push: opts.push,
        kv: opts.kv,
        kv_shards: if opts.kv_shards == 0 {
            opts.kv
        } else {
            opts.kv_shards
        },
        kv_replicas: opts.replicas,
        devices,
    }
}

/// The workload and fault schedule the options ask for, drawn from the seed (the schedule
/// may come from a file). A named workload's tunnels join the schedule as `tunnel` faults,
/// except when the schedule is replayed from a file (which already holds them).
pub fn plan_for(opts: &Opts) -> Result<Plan, String> {
    let shards = if opts.kv_shards == 0 {
        opts.kv
    } else {
        opts.kv_shards
    };
    nodes::kv::placement::Placement::new(opts.kv, shards, opts.replicas)?;
    let workload = workload_for(opts)?;
    let ctx = scenario_ctx(opts, workload.device_count() as u32);
    let source = opts.fault_source();
    let mut schedule = match &source {
        FaultSource::None => scenarios::scenario("none", &ctx)?,
        FaultSource::Scenario(name) => scenarios::scenario(name, &ctx)?,
        FaultSource::Swarm => scenarios::swarm(&ctx).schedule,
        FaultSource::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let s: Schedule = serde_json::from_str(&text)
                .map_err(|e| format!("{} is not a schedule: {e}", path.display()))?;
            s.sorted()
        }
    };
    if !matches!(source, FaultSource::File(_)) && !workload.tunnels.is_empty() {
        schedule.name = format!(
            "{} + {} workload tunnels",
            schedule.name,
            workload.tunnels.len()
        );
        schedule
            .faults
            .extend(workload.tunnels.iter().map(|t| scenarios::ScheduledFault {
                at_ms: t.at_ms,
                duration_ms: t.duration_ms,
                fault: scenarios::Fault::Tunnel { device: t.device },
            }));
        schedule = schedule.sorted();
    }
    schedule.validate(&ctx)?;
    Ok(Plan {
        workload: Arc::new(workload),
        schedule,
    })
}

/// The fault schedule the options ask for (see [`plan_for`]).
pub fn schedule_for(opts: &Opts) -> Result<Schedule, String> {
    plan_for(opts).map(|p| p.schedule)
}

/// App opens per simulated second per api or chat node the liveness phase aims at: half of
/// what one simulated accept loop admits (madsim sleeps 1 ms per accept).
pub const LIVENESS_OPENS_PER_NODE_PER_S: u64 = 500;

/// Over how long the liveness phase opens every app: all at once is a herd that, beyond
/// ~10,000 devices per accept loop, queues connections longer than the devices' 10 s connect
/// deadline and stalls in a retry storm (the 1/1000 `peak-hour` run stalled at 20,867 of
/// 100,003 devices). Spread over `devices / (min(api, chat) x 500/s)`: under a second at the
/// default size, 100 s at 1/1000 scale. The liveness budget counts from the last open.
pub fn liveness_spread(opts: &Opts, devices: usize) -> Duration {
    let nodes = opts.api.min(opts.chat).max(1) as u64;
    Duration::from_millis(devices as u64 * 1000 / (nodes * LIVENESS_OPENS_PER_NODE_PER_S))
}

/// Where the steady window starts: after the devices online at the start have connected and
/// synced (warm-up plus 30 s), or at half-time in a short run.
pub fn window_start_s(duration_s: u64) -> u64 {
    let settled = workloads::named::WARM_UP_MS / 1000 + 30;
    if duration_s >= 2 * settled {
        settled
    } else {
        duration_s / 2
    }
}
