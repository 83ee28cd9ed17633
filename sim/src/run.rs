//! One simulated run, as the sequence of its phases: boot the cluster, let chat servers take
//! their discovery leases, set up users over the api (`setup`), start every device (`device`),
//! apply the fault schedule (the safety phase, `faults`), open every app (the liveness phase),
//! end, and judge the history with the checkers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nodes::canary::{Canaries, Canary};
use nodes::proto::Id;
use scenarios::Role;
use tokio::time::Instant;
use workloads::Workload;

use crate::analysis;
use crate::checkers::{self, Params};
use crate::cli::Opts;
use crate::cluster::{self, Cluster, Sizes};
use crate::device::{self, DeviceCtx};
use crate::history::{Event, Record};
use crate::outcome::{history_hash, peak_rss_bytes, KvCounters, Outcome, Snapshot, Stats};
use crate::plan::{liveness_spread, plan_for, window_start_s, Plan};
use crate::recorder::{Counters, HistoryPush, Recorder};
use crate::setup::{run_setup, Setup};

/// Runs one seed with the schedule its options ask for (panics on an invalid one: for tests).
pub fn run_opts(opts: &Opts, canaries: &Canaries) -> Outcome {
    let plan = plan_for(opts).expect("a valid workload and fault schedule");
    run_on_fresh_thread(opts, canaries, &plan)
}

/// Runs one seed on a fresh OS thread with a fresh runtime (hyper caches per thread; statics
/// must not leak between seeds).
pub fn run_on_fresh_thread(opts: &Opts, canaries: &Canaries, plan: &Plan) -> Outcome {
    let opts = opts.clone();
    let canaries = canaries.clone();
    let plan = plan.clone();
    std::thread::Builder::new()
        .name(format!("seed-{}", opts.seed))
        .stack_size(64 << 20)
        .spawn(move || simulate(&opts, &canaries, &plan))
        .expect("spawn a thread for the seed")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn simulate(opts: &Opts, canaries: &Canaries, plan: &Plan) -> Outcome {
    let wall = std::time::Instant::now();
    let rt = madsim::runtime::Runtime::with_seed_and_config(opts.seed, madsim::Config::default());
    let (history, mut stats, window) =
        rt.block_on(drive(opts.clone(), canaries.clone(), plan.clone()));
    stats.wall_secs = wall.elapsed().as_secs_f64();
    stats.history_hash = history_hash(&history);
    let reports = checkers::run_all(
        &history,
        &Params {
            presence_nodes: u64::from(opts.presence),
            ..Params::default()
        },
    );
    stats.peak_rss_bytes = peak_rss_bytes();
    Outcome {
        convergence: analysis::convergence(&history),
        storms: analysis::storms(&history),
        history,
        reports,
        stats,
        window,
    }
}

async fn drive(
    opts: Opts,
    canaries: Canaries,
    plan: Plan,
) -> (Vec<Record>, Stats, (Snapshot, Snapshot)) {
    let start = Instant::now();
    let progress = crate::progress::Progress::new(&opts);
    let recorder = Recorder::new(start, progress.is_some());
    let counters = Arc::new(Counters::default());
    let pushes = Arc::new(AtomicU64::new(0));
    let workload = plan.workload.clone();
    let schedule = plan.schedule;
    let sizes = Sizes {
        api: opts.api,
        chat: opts.chat,
        idgen: opts.idgen,
        presence: opts.presence,
        push: opts.push,
        kv: opts.kv,
        kv_shards: opts.kv_shards,
        kv_replicas: opts.replicas,
        sends_in_flight: opts.sends_in_flight as usize,
        admission_target: nodes::chat::admission::target(Some(opts.admission_target_ms)),
    };
    let provider = Arc::new(HistoryPush {
        recorder: recorder.clone(),
        pushes: pushes.clone(),
    });
    recorder.record(Event::Phase {
        name: "safety".into(),
    });
    let cluster = Cluster::start(
        &sizes,
        opts.seed,
        &canaries,
        provider,
        schedule.etcd_timeout_rate,
        !opts.client_plaintext,
    );
    let scraper = madsim::runtime::Handle::current()
        .create_node()
        .name("scraper")
        .ip(IpAddr::V4(cluster::SCRAPER_IP))
        .build();
    let progress_task = progress.clone().map(|p| {
        let recorder = recorder.clone();
        tokio::spawn(p.run(start, move || (recorder.events(), recorder.violations())))
    });
    // Let chat servers take their discovery leases.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let setup = run_setup(&cluster, &workload, &recorder).await;
    let traffic_start = Instant::now();
    recorder.record(Event::Phase {
        name: "traffic".into(),
    });
    if let Some(p) = &progress {
        p.setup_done(
            traffic_start.duration_since(start).as_secs(),
            opts.duration
                + opts.liveness_budget
                + liveness_spread(&opts, workload.device_count()).as_secs(),
        );
    }
    let liveness_at = Duration::from_secs(opts.duration);
    let device_nodes = start_devices(
        &cluster,
        &workload,
        &setup,
        &recorder,
        &counters,
        &opts,
        &canaries,
        traffic_start,
    );
    let disks: Vec<Arc<nodes::kv::disk::SimDisk>> = cluster.disks.values().cloned().collect();
    // Takes a snapshot of the run-wide counters (kv counters over the network).
    let snap = {
        let (counters, scraper) = (counters.clone(), scraper.clone());
        let (kv_addrs, chat) = (cluster.kv_addrs(), opts.chat);
        let operator = cluster.operator.clone();
        move || {
            let (counters, scraper, disks) = (counters.clone(), scraper.clone(), disks.clone());
            let (operator, kv_addrs) = (operator.clone(), kv_addrs.clone());
            async move {
                let t_s = Instant::now().duration_since(traffic_start).as_secs_f64();
                let s = scrape(&scraper, &operator, chat, kv_addrs()).await;
                let c = counters.totals();
                Snapshot {
                    t_s,
                    sends: c.sends,
                    acks: c.acks,
                    delivers: c.delivers,
                    heartbeats: c.heartbeats,
                    connects: c.connects,
                    chars: c.chars,
                    text_bytes: c.text_bytes,
                    net_messages: madsim::net::NetSim::current().stat().msg_count,
                    wire_bytes: nodes::net::sim_wire_bytes(),
                    heartbeat_wire_bytes: nodes::net::sim_heartbeat_bytes(),
                    wire_paths: crate::cluster::wire_paths(&nodes::net::sim_wire_bytes_by_path()),
                    kv: s.kv,
                    disk_bytes: disks.iter().map(|d| d.len_bytes() as u64).sum(),
                }
            }
        }
    };
    let window_from = {
        let snap = snap.clone();
        let at = traffic_start + Duration::from_secs(window_start_s(opts.duration));
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            snap().await
        })
    };
    let probes = {
        let kv_faults: Vec<(Duration, Duration)> = schedule
            .faults
            .iter()
            .filter(|f| touches_kv(&f.fault))
            .map(|f| {
                let at = traffic_start.duration_since(start) + Duration::from_millis(f.at_ms);
                (at, at + Duration::from_millis(f.duration_ms))
            })
            .collect();
        crate::prober::start(
            cluster.map.clone(),
            cluster.operator.clone(),
            crate::prober::windows(&kv_faults),
            start,
        )
    };
    if let Some(victims) = victims(&workload, &setup) {
        crate::hostile::start(
            cluster.api_addrs.clone(),
            cluster.client_tls.clone(),
            victims,
            cluster::token_key(),
            recorder.clone(),
            traffic_start + Duration::from_secs(5),
            traffic_start + liveness_at,
        );
    }
    crate::rogue::start(
        &cluster,
        recorder.clone(),
        opts.seed,
        traffic_start + Duration::from_secs(5),
        traffic_start + liveness_at,
    );
    let mut injector = crate::faults::Injector::new(
        &cluster,
        device_nodes,
        recorder.clone(),
        scraper.clone(),
        opts.seed,
    );
    injector.run(&schedule, traffic_start).await;
    let lost_disk_writes = injector.lost_writes;
    let notes = std::mem::take(&mut injector.notes);
    tokio::time::sleep_until(traffic_start + liveness_at).await;
    let window_to = snap().await;
    let window_from = window_from.await.expect("the snapshot task does not panic");
    recorder.record(Event::Phase {
        name: "liveness".into(),
    });
    tokio::time::sleep(
        liveness_spread(&opts, workload.device_count()) + Duration::from_secs(opts.liveness_budget),
    )
    .await;
    recorder.record(Event::Phase { name: "end".into() });
    // The operator's view of the kv groups: healed, or how not (judged by `kv_health`).
    let kv_status = {
        let (map, lost) = (cluster.current_map(), injector.quorum_lost());
        let operator = cluster.operator.clone();
        scraper
            .spawn(async move { crate::kv_view::settled(&map, &operator, lost).await })
            .await
            .expect("the kv view does not panic")
    };
    recorder.record(kv_status);
    if let Some(t) = progress_task {
        t.abort();
    }
    if let Some(p) = &progress {
        p.finish();
    }
    let server_errors = scrape(&scraper, &cluster.operator, opts.chat, Vec::new())
        .await
        .chat_errors;
    let sim_secs = Instant::now().duration_since(start).as_secs_f64();
    let net_messages = madsim::net::NetSim::current().stat().msg_count;
    let history = recorder.take();
    let errors = counters.errors();
    let totals = counters.totals();
    let stats = Stats {
        users: workload.users.len(),
        devices: workload.device_count(),
        groups: workload.groups.len(),
        biggest_group: workload
            .groups
            .iter()
            .map(|g| g.members.len())
            .max()
            .unwrap_or(0),
        sends: totals.sends,
        acks: totals.acks,
        delivers: totals.delivers,
        pushes: pushes.load(Ordering::Relaxed),
        presence_changes: totals.presence,
        connects: totals.connects,
        heartbeats: totals.heartbeats,
        bad_inputs: totals.bad_inputs,
        group_full_refusals: setup.group_full_refusals,
        errors,
        server_errors,
        sim_secs,
        net_messages,
        wire_bytes: nodes::net::sim_wire_bytes(),
        lost_disk_writes,
        notes,
        kv_probes: std::mem::take(&mut *probes.lock().unwrap_or_else(|p| p.into_inner())),
        faults: schedule.faults.len(),
        ..Stats::default()
    };
    (history, stats, (window_from, window_to))
}

/// The hostile device's victims: the first 1:1 channel of the workload and its two members.
fn victims(w: &Workload, setup: &Setup) -> Option<crate::hostile::Victims> {
    let (u, friends) = setup
        .friends
        .iter()
        .enumerate()
        .find(|(_, f)| !f.is_empty())?;
    let (friend, channel) = *friends.values().next()?;
    let i = w.devices.iter().position(|d| d.user as usize == u)?;
    let login = &setup.logins[i];
    Some(crate::hostile::Victims {
        channel,
        users: [login.user, friend],
        device: login.device,
    })
}

/// Whether a fault touches a kv node (the prober watches around it).
fn touches_kv(f: &scenarios::Fault) -> bool {
    use scenarios::{Fault, Target};
    match f {
        Fault::Crash { target, .. } | Fault::Pause { target } => {
            matches!(target, Target::Node(Role::Kv, _))
        }
        Fault::DiskLoss { .. }
        | Fault::LeaderPartition { .. }
        | Fault::TornWrite { .. }
        | Fault::Corruption { .. }
        | Fault::SlowDisk { .. }
        | Fault::ForceRecover { .. } => true,
        _ => false,
    }
}

/// What a scrape of the servers' counters found.
#[derive(Default)]
struct Scrape {
    /// Errors the chat servers sent to devices, by code (since each last started).
    chat_errors: BTreeMap<String, u64>,
    /// Per kv node that answered.
    kv: BTreeMap<u32, KvCounters>,
}

/// Asks the first `chat` chat servers for their error counts and the kv nodes at `kv` (by
/// slot) for their counters, over the simulated network from the scraper node (as a metrics
/// scraper would). A node that does not answer is left out.
async fn scrape(
    node: &madsim::runtime::NodeHandle,
    operator: &nodes::tls::NodeTls,
    chat: u32,
    kv: Vec<SocketAddr>,
) -> Scrape {
    let operator = operator.clone();
    node.spawn(async move {
        let mut out = Scrape::default();
        for i in 0..chat {
            let addr = SocketAddr::new(IpAddr::V4(cluster::ip(Role::Chat, i)), cluster::RPC_PORT);
            let client = nodes::rpc::RpcClient::new(addr, operator.clone());
            if let Ok(nodes::proto::internal::Response::ErrorCounts(counts)) = client
                .call(nodes::proto::internal::Request::ChatStats)
                .await
            {
                for (code, n) in counts {
                    *out.chat_errors
                        .entry(code.as_str().to_string())
                        .or_default() += n;
                }
            }
        }
        for (i, addr) in kv.into_iter().enumerate() {
            let i = i as u32;
            let client = nodes::rpc::RpcClient::new(addr, operator.clone());
            if let Ok(nodes::proto::internal::Response::KvStats {
                requests,
                writes,
                by_op,
                space,
            }) = client.call(nodes::proto::internal::Request::KvStats).await
            {
                out.kv.insert(
                    i,
                    KvCounters {
                        requests,
                        writes,
                        by_op: by_op.into_iter().map(|(op, n, w)| (op, (n, w))).collect(),
                        space: space
                            .into_iter()
                            .map(|t| (t.table, (t.stored_bytes, t.page_bytes)))
                            .collect(),
                    },
                );
            }
        }
        out
    })
    .await
    .expect("the scrape task does not panic")
}

#[allow(clippy::too_many_arguments)]
fn start_devices(
    cluster: &Cluster,
    w: &Workload,
    setup: &Setup,
    recorder: &Recorder,
    counters: &Arc<Counters>,
    opts: &Opts,
    canaries: &Canaries,
    start: Instant,
) -> Vec<crate::faults::DeviceHandle> {
    let handle = madsim::runtime::Handle::current();
    let mut ids = Vec::with_capacity(w.devices.len());
    let all_groups = Arc::new(setup.groups.clone());
    let spread_ms = liveness_spread(opts, w.device_count()).as_millis() as u64;
    // Each user's groups, once (not a scan of every group per device: 100,000 devices x
    // 9,000 groups at 1/1000 scale).
    let mut groups_of: BTreeMap<u32, BTreeMap<u32, Id>> = BTreeMap::new();
    for g in &w.groups {
        for &m in &g.members {
            groups_of
                .entry(m)
                .or_default()
                .insert(g.index, setup.groups[&g.index]);
        }
    }
    for (i, d) in w.devices.iter().enumerate() {
        let (kick, kick_rx) = tokio::sync::watch::channel(0u64);
        let groups = groups_of.get(&d.user).cloned().unwrap_or_default();
        let ctx = DeviceCtx {
            index: i as u32,
            login: setup.logins[i].clone(),
            api: cluster.api_addrs.clone(),
            tls: cluster.client_tls.clone(),
            steps: d.steps.clone(),
            friends: setup.friends[d.user as usize].clone(),
            groups,
            all_groups: all_groups.clone(),
            recorder: recorder.clone(),
            counters: counters.clone(),
            liveness_at: Duration::from_secs(opts.duration),
            liveness_delay: Duration::from_millis(
                spread_ms * ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) / (1 << 24),
            ),
            seed: opts.seed,
            by_message_id: canaries.is_on(Canary::CursorByMessageId),
            kick: kick_rx,
        };
        let node = handle
            .create_node()
            .name(format!("device-{i}"))
            .ip(IpAddr::V4(cluster::device_ip(i as u32)))
            .build();
        node.spawn(device::run(ctx, start));
        ids.push(crate::faults::DeviceHandle {
            node: node.id(),
            kick,
        });
    }
    ids
}
