//! One simulated run: boot the cluster, set up users, friends and groups over the api, start
//! every device, apply the fault schedule (safety phase), bring every device online
//! (liveness phase), stop, and judge the history with the checkers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use nodes::canary::{Canaries, Canary};
use nodes::client::http::HttpClient;
use nodes::client::ClientError;
use nodes::proto::client::*;
use nodes::proto::Id;
use nodes::push::{Notification, PushError, PushProvider};
use scenarios::{Role, Schedule};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use workloads::Workload;

use crate::analysis::{self, Convergence, Storm};
use crate::checkers::{self, CheckReport, Params};
use crate::cli::{FaultSource, Opts};
use crate::cluster::{self, Cluster, Sizes};
use crate::device::{self, DeviceCtx};
use crate::history::{Event, MemberOp, Record};

/// The history being written: a shared, append-only list stamped with simulated time.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    /// A std mutex: appends are synchronous and short.
    records: Arc<Mutex<Vec<Record>>>,
    /// Streamed checks for the progress bar (only when it is drawn).
    monitor: Option<Arc<Mutex<Monitor>>>,
}

impl Recorder {
    fn new(start: Instant, monitor: bool) -> Self {
        Self {
            start,
            records: Arc::new(Mutex::new(Vec::new())),
            monitor: monitor.then(|| Arc::new(Mutex::new(Monitor::default()))),
        }
    }

    pub fn record(&self, ev: Event) {
        let t_us = Instant::now().duration_since(self.start).as_micros() as u64;
        if let Some(m) = &self.monitor {
            m.lock().unwrap_or_else(|p| p.into_inner()).observe(&ev);
        }
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Record { t_us, ev });
    }

    fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn violations(&self) -> u64 {
        self.monitor.as_ref().map_or(0, |m| {
            m.lock().unwrap_or_else(|p| p.into_inner()).violations
        })
    }

    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The no_duplicates checks that can run as the history is written, for the progress bar:
/// (a) a device is handed a message at most once, (b) a send (sender device, client_msg_id)
/// is one message_id across acks and deliveries. The full checkers still judge the run.
#[derive(Default)]
pub struct Monitor {
    delivered: std::collections::HashSet<(Id, Id)>,
    message_of: std::collections::HashMap<(Id, Id), Id>,
    violations: u64,
}

impl Monitor {
    fn observe(&mut self, ev: &Event) {
        let (key, message_id) = match ev {
            Event::Ack {
                device,
                client_msg_id,
                message_id,
                ..
            } => ((*device, *client_msg_id), *message_id),
            Event::Deliver {
                device,
                sender_device,
                client_msg_id,
                message_id,
                ..
            } => {
                if sender_device != device && !self.delivered.insert((*device, *message_id)) {
                    self.violations += 1;
                }
                ((*sender_device, *client_msg_id), *message_id)
            }
            _ => return,
        };
        if *self.message_of.entry(key).or_insert(message_id) != message_id {
            self.violations += 1;
        }
    }
}

/// Run-wide counters the devices bump (what the output table shows besides the history).
#[derive(Default)]
pub struct Counters {
    sends: AtomicU64,
    acks: AtomicU64,
    delivers: AtomicU64,
    presence: AtomicU64,
    connects: AtomicU64,
    heartbeats: AtomicU64,
    chars: AtomicU64,
    text_bytes: AtomicU64,
    bad_inputs: AtomicU64,
    /// Error codes the devices were shown. A std mutex: short, synchronous.
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    pub fn add_send(&self) {
        self.sends.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_text(&self, chars: u64, bytes: u64) {
        self.chars.fetch_add(chars, Ordering::Relaxed);
        self.text_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn add_heartbeat(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_ack(&self) {
        self.acks.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_deliver(&self) {
        self.delivers.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_presence(&self) {
        self.presence.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_connect(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_bad_input(&self) {
        self.bad_inputs.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_error(&self, code: &str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code.to_string())
            .or_default() += 1;
    }
}

/// The simulation's push provider: records what the platform gateway was asked to deliver.
struct HistoryPush {
    recorder: Recorder,
    pushes: Arc<AtomicU64>,
}

impl PushProvider for HistoryPush {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.recorder.record(Event::Push {
            user: n.user,
            device: n.device,
            message_id: n.message_id,
        });
        Box::pin(async { Ok(()) })
    }
}

/// What a run produced.
pub struct Outcome {
    pub history: Vec<Record>,
    pub reports: Vec<CheckReport>,
    pub stats: Stats,
    pub convergence: Convergence,
    pub storms: Vec<Storm>,
    /// Counters at the start and end of the steady window (after warm-up, before the
    /// liveness phase).
    pub window: (Snapshot, Snapshot),
}

/// Run-wide counters at one moment of simulated time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Simulated seconds since traffic started.
    pub t_s: f64,
    pub sends: u64,
    pub acks: u64,
    pub delivers: u64,
    pub heartbeats: u64,
    pub connects: u64,
    pub chars: u64,
    /// UTF-8 bytes of the texts sent.
    pub text_bytes: u64,
    pub net_messages: u64,
    pub wire_bytes: u64,
    /// Per kv node (by index): its counters since it last started; a node that did not
    /// answer is missing.
    pub kv: BTreeMap<u32, KvCounters>,
    /// Bytes of every kv node's database file.
    pub disk_bytes: u64,
}

/// One kv node's operation counters (`KvStats`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvCounters {
    pub requests: u64,
    pub writes: u64,
    /// Per operation: (requests, write operations).
    pub by_op: BTreeMap<String, (u64, u64)>,
}

/// kv counters over a window, summed over nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvWindow {
    pub requests: u64,
    pub writes: u64,
    pub by_op: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    /// `self - earlier`, field by field (a kv restart resets its counters: never negative).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            t_s: self.t_s - earlier.t_s,
            sends: self.sends.saturating_sub(earlier.sends),
            acks: self.acks.saturating_sub(earlier.acks),
            delivers: self.delivers.saturating_sub(earlier.delivers),
            heartbeats: self.heartbeats.saturating_sub(earlier.heartbeats),
            connects: self.connects.saturating_sub(earlier.connects),
            chars: self.chars.saturating_sub(earlier.chars),
            text_bytes: self.text_bytes.saturating_sub(earlier.text_bytes),
            net_messages: self.net_messages.saturating_sub(earlier.net_messages),
            wire_bytes: self.wire_bytes.saturating_sub(earlier.wire_bytes),
            kv: self.kv.clone(),
            disk_bytes: self.disk_bytes.saturating_sub(earlier.disk_bytes),
        }
    }

    /// kv operations between `earlier` and this snapshot, node by node: a node whose counters
    /// went down restarted in between, and counts from its restart (what it did before the
    /// crash is lost with its process).
    pub fn kv_since(&self, earlier: &Snapshot) -> KvWindow {
        let mut out = KvWindow::default();
        let zero = KvCounters::default();
        for (node, now) in &self.kv {
            let before = earlier.kv.get(node).unwrap_or(&zero);
            let base = if now.requests < before.requests {
                &zero
            } else {
                before
            };
            out.requests += now.requests - base.requests;
            out.writes += now.writes.saturating_sub(base.writes);
            for (op, (n, w)) in &now.by_op {
                let (n0, w0) = base.by_op.get(op).copied().unwrap_or_default();
                let e = out.by_op.entry(op.clone()).or_default();
                e.0 += n.saturating_sub(n0);
                e.1 += w.saturating_sub(w0);
            }
        }
        out
    }
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.reports.iter().all(|r| r.violation_count == 0)
    }

    /// Names of the invariants that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.reports
            .iter()
            .filter(|r| r.violation_count > 0)
            .map(|r| r.name)
            .collect()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub users: usize,
    pub devices: usize,
    pub groups: usize,
    pub biggest_group: usize,
    pub sends: u64,
    pub acks: u64,
    pub delivers: u64,
    pub pushes: u64,
    pub presence_changes: u64,
    pub connects: u64,
    pub heartbeats: u64,
    pub bad_inputs: u64,
    pub group_full_refusals: u64,
    pub errors: BTreeMap<String, u64>,
    /// Errors the chat servers counted sending, by code (since each last started).
    pub server_errors: BTreeMap<String, u64>,
    pub sim_secs: f64,
    /// Messages the simulated network carried (madsim's count: one per flushed TCP write).
    pub net_messages: u64,
    /// kv writes lost to crashes (not yet synced when the node died).
    pub lost_disk_writes: u64,
    pub faults: usize,
    pub wall_secs: f64,
    pub history_hash: String,
    /// Bytes written to TCP by every node and device.
    pub wire_bytes: u64,
    /// The process's peak resident set (VmHWM), bytes; 0 where /proc is missing.
    pub peak_rss_bytes: u64,
}

/// Entry point of the simulated binary.
pub fn main(opts: Opts) -> i32 {
    // Logs only when asked (RUST_LOG=debug, ...): they go to stderr and do not touch the history.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .without_time()
            .try_init();
    }
    let canaries = match Canaries::parse(opts.canary.iter().map(String::as_str)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if opts.list_scenarios {
        for (name, what) in scenarios::SCENARIOS {
            println!("{name:<20} {what}");
        }
        return 0;
    }
    if opts.list_workloads {
        for (name, what) in workloads::WORKLOADS {
            println!("{name:<16} {what}");
        }
        return 0;
    }
    if let Some(crate::cli::Command::Capacity(c)) = &opts.command {
        return crate::capacity::run(c, &canaries);
    }
    if opts.seeds.is_some() {
        return crate::sweep::seeds(&opts, &canaries);
    }
    let plan = match plan_for(&opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    crate::output::print_header(&opts, &canaries);
    crate::output::print_schedule(&opts, &plan);
    if opts.check_determinism {
        return check_determinism(&opts, &canaries, &plan);
    }
    let outcome = run_on_fresh_thread(&opts, &canaries, &plan);
    if let Some(path) = &opts.history {
        if let Err(e) = write_history(path, &outcome.history) {
            eprintln!("error: writing {}: {e}", path.display());
            return 2;
        }
    }
    let code = crate::output::print_outcome(&opts, &outcome);
    if let Some(dir) = &opts.report {
        let report = crate::report::build(&opts, &plan, &outcome);
        match reports::run::write(dir, &report) {
            Ok(files) => println!(
                "report: {} ({} files: {})",
                dir.display(),
                files.len(),
                files
                    .iter()
                    .filter_map(|f| f.file_name().and_then(|n| n.to_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => {
                eprintln!("error: writing the report to {}: {e}", dir.display());
                return 2;
            }
        }
    }
    if code != 0 && opts.shrink {
        return crate::sweep::shrink(&opts, &canaries, &plan.schedule, &outcome);
    }
    code
}

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
        kv: opts.kv,
        devices,
    }
}

/// The workload and fault schedule the options ask for, drawn from the seed (the schedule
/// may come from a file). A named workload's tunnels join the schedule as `tunnel` faults,
/// except when the schedule is replayed from a file (which already holds them).
pub fn plan_for(opts: &Opts) -> Result<Plan, String> {
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

fn check_determinism(opts: &Opts, canaries: &Canaries, plan: &Plan) -> i32 {
    let a = run_on_fresh_thread(opts, canaries, plan);
    let b = run_on_fresh_thread(opts, canaries, plan);
    println!("history hash run 1: {}", a.stats.history_hash);
    println!("history hash run 2: {}", b.stats.history_hash);
    if a.stats.history_hash == b.stats.history_hash {
        println!("determinism: OK ({} events)", a.history.len());
        0
    } else {
        let first = a
            .history
            .iter()
            .zip(&b.history)
            .position(|(x, y)| x != y)
            .unwrap_or(a.history.len().min(b.history.len()));
        println!("determinism: MISMATCH; first difference at event {first}");
        if let Some(x) = a.history.get(first) {
            println!("  run 1: {}", x.to_line());
        }
        if let Some(y) = b.history.get(first) {
            println!("  run 2: {}", y.to_line());
        }
        println!(
            "reproduce: cargo run -p sim -- {} --check-determinism",
            opts.repro_args()
        );
        1
    }
}

fn write_history(path: &std::path::Path, history: &[Record]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in history {
        writeln!(f, "{}", r.to_line())?;
    }
    f.flush()
}

pub fn history_hash(history: &[Record]) -> String {
    let mut h = Sha256::new();
    for r in history {
        h.update(r.to_line().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

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
    let reports = checkers::run_all(&history, &Params::default());
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

/// The process's peak resident set size (VmHWM in /proc/self/status), or 0.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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
        kv: opts.kv,
    };
    let provider = Arc::new(HistoryPush {
        recorder: recorder.clone(),
        pushes: pushes.clone(),
    });
    recorder.record(Event::Phase {
        name: "safety".into(),
    });
    let cluster = Cluster::start(&sizes, opts.seed, &canaries, provider);
    let scraper = madsim::runtime::Handle::current()
        .create_node()
        .name("scraper")
        .ip(IpAddr::V4(cluster::SCRAPER_IP))
        .build();
    let progress_task = progress.clone().map(|p| {
        let recorder = recorder.clone();
        tokio::spawn(p.run(start, move || (recorder.len(), recorder.violations())))
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
        let (kv, chat) = (opts.kv, opts.chat);
        move || {
            let (counters, scraper, disks) = (counters.clone(), scraper.clone(), disks.clone());
            async move {
                let t_s = Instant::now().duration_since(traffic_start).as_secs_f64();
                let s = scrape(&scraper, chat, kv).await;
                Snapshot {
                    t_s,
                    sends: counters.sends.load(Ordering::Relaxed),
                    acks: counters.acks.load(Ordering::Relaxed),
                    delivers: counters.delivers.load(Ordering::Relaxed),
                    heartbeats: counters.heartbeats.load(Ordering::Relaxed),
                    connects: counters.connects.load(Ordering::Relaxed),
                    chars: counters.chars.load(Ordering::Relaxed),
                    text_bytes: counters.text_bytes.load(Ordering::Relaxed),
                    net_messages: madsim::net::NetSim::current().stat().msg_count,
                    wire_bytes: nodes::net::sim_wire_bytes(),
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
    let mut injector = crate::faults::Injector::new(&cluster, device_nodes, recorder.clone());
    injector.run(&schedule.faults, traffic_start).await;
    let lost_disk_writes = injector.lost_writes;
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
    if let Some(t) = progress_task {
        t.abort();
    }
    if let Some(p) = &progress {
        p.finish();
    }
    let server_errors = scrape(&scraper, opts.chat, 0).await.chat_errors;
    let sim_secs = Instant::now().duration_since(start).as_secs_f64();
    let net_messages = madsim::net::NetSim::current().stat().msg_count;
    let history = recorder.take();
    let errors = counters
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
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
        sends: counters.sends.load(Ordering::Relaxed),
        acks: counters.acks.load(Ordering::Relaxed),
        delivers: counters.delivers.load(Ordering::Relaxed),
        pushes: pushes.load(Ordering::Relaxed),
        presence_changes: counters.presence.load(Ordering::Relaxed),
        connects: counters.connects.load(Ordering::Relaxed),
        heartbeats: counters.heartbeats.load(Ordering::Relaxed),
        bad_inputs: counters.bad_inputs.load(Ordering::Relaxed),
        group_full_refusals: setup.group_full_refusals,
        errors,
        server_errors,
        sim_secs,
        net_messages,
        wire_bytes: nodes::net::sim_wire_bytes(),
        lost_disk_writes,
        faults: schedule.faults.len(),
        ..Stats::default()
    };
    (history, stats, (window_from, window_to))
}

/// What a scrape of the servers' counters found.
#[derive(Default)]
struct Scrape {
    /// Errors the chat servers sent to devices, by code (since each last started).
    chat_errors: BTreeMap<String, u64>,
    /// Per kv node that answered.
    kv: BTreeMap<u32, KvCounters>,
}

/// Asks the first `chat` chat servers and `kv` kv nodes for their counters, over the
/// simulated network from the scraper node (as a metrics scraper would). A node that does not
/// answer is left out.
async fn scrape(node: &madsim::runtime::NodeHandle, chat: u32, kv: u32) -> Scrape {
    node.spawn(async move {
        let mut out = Scrape::default();
        for i in 0..chat {
            let addr = SocketAddr::new(IpAddr::V4(cluster::ip(Role::Chat, i)), cluster::RPC_PORT);
            let client = nodes::rpc::RpcClient::new(addr);
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
        for i in 0..kv {
            let addr = SocketAddr::new(IpAddr::V4(cluster::ip(Role::Kv, i)), cluster::RPC_PORT);
            let client = nodes::rpc::RpcClient::new(addr);
            if let Ok(nodes::proto::internal::Response::KvStats {
                requests,
                writes,
                by_op,
            }) = client.call(nodes::proto::internal::Request::KvStats).await
            {
                out.kv.insert(
                    i,
                    KvCounters {
                        requests,
                        writes,
                        by_op: by_op.into_iter().map(|(op, n, w)| (op, (n, w))).collect(),
                    },
                );
            }
        }
        out
    })
    .await
    .expect("the scrape task does not panic")
}

/// What setup learned: server ids for the workload's users, devices and channels.
struct Setup {
    /// Per workload device: its login.
    logins: Vec<LoginResponse>,
    /// Per user index: friend index -> (friend id, channel).
    friends: Vec<BTreeMap<u32, (Id, Id)>>,
    /// Group index -> channel.
    groups: BTreeMap<u32, Id>,
    group_full_refusals: u64,
}

/// Retries an api call until it succeeds (the api may be starting or a kv node down).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = Duration::from_millis(100);
    for attempt in 0.. {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                if attempt % 10 == 9 {
                    tracing::warn!(what, error = %e, attempt, "setup call failing");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    unreachable!("the loop only ends by returning")
}

/// Signs up every user, logs in every device, makes friends and groups — over HTTP, from a
/// setup client node — and records devices and memberships.
async fn run_setup(cluster: &Cluster, w: &Workload, recorder: &Recorder) -> Setup {
    let node = madsim::runtime::Handle::current()
        .create_node()
        .name("setup")
        .ip(IpAddr::V4(cluster::SETUP_IP))
        .build();
    let api: Vec<SocketAddr> = cluster.api_addrs.clone();
    let w = w.clone();
    let recorder = recorder.clone();
    node.spawn(async move {
        let cluster_api = api;
        let c = |i: usize, t: Option<&str>| {
            let mut h = HttpClient::new(cluster_api[i % cluster_api.len()]);
            h.token = t.map(str::to_string);
            h
        };
        setup_inner(&w, &recorder, &c).await
    })
    .await
    .expect("the setup task does not panic")
}

async fn setup_inner(
    w: &Workload,
    recorder: &Recorder,
    c: &(dyn Fn(usize, Option<&str>) -> HttpClient + Sync),
) -> Setup {
    let user_ids: Vec<Id> = concurrently(&w.users, |u| {
        async move {
            let body = SignupRequest {
                name: u.name.clone(),
                password: u.password.clone(),
            };
            let h = c(u.index as usize, None);
            let r: SignupResponse = retry("signup", || h.post("/v1/signup", &body)).await;
            r.user
        }
        .boxed()
    })
    .await;
    let logins: Vec<LoginResponse> = concurrently(&w.devices, |d| {
        async move {
            let u = &w.users[d.user as usize];
            let body = LoginRequest {
                name: u.name.clone(),
                password: u.password.clone(),
                device: None,
            };
            let h = c(d.user as usize, None);
            retry("login", || h.post("/v1/login", &body)).await
        }
        .boxed()
    })
    .await;
    let mut tokens: BTreeMap<u32, String> = BTreeMap::new();
    for (i, (d, r)) in w.devices.iter().zip(&logins).enumerate() {
        recorder.record(Event::Device {
            user: r.user,
            device: r.device,
            index: Some(i as u32),
        });
        tokens.entry(d.user).or_insert_with(|| r.token.clone());
    }
    let (user_ids_ref, tokens_ref) = (&user_ids, &tokens);
    let channels: Vec<Id> = concurrently(&w.friendships, |&(a, b)| {
        async move {
            let body = AddFriendRequest {
                user: user_ids_ref[b as usize],
            };
            let h = c(a as usize, Some(&tokens_ref[&a]));
            let r: AddFriendResponse = retry("friend", || h.post("/v1/friends", &body)).await;
            r.channel
        }
        .boxed()
    })
    .await;
    let mut friends: Vec<BTreeMap<u32, (Id, Id)>> = vec![BTreeMap::new(); w.users.len()];
    for (&(a, b), &channel) in w.friendships.iter().zip(&channels) {
        friends[a as usize].insert(b, (user_ids[b as usize], channel));
        friends[b as usize].insert(a, (user_ids[a as usize], channel));
        for (n, u) in [(1, a), (2, b)] {
            recorder.record(Event::Membership {
                channel,
                user: user_ids[u as usize],
                op: MemberOp::Join,
                members: n,
            });
        }
    }
    let mut groups = BTreeMap::new();
    let mut group_full_refusals = 0;
    let created: Vec<GroupResponse> = concurrently(&w.groups, |g| {
        async move {
            let owner = g.members[0];
            let body = CreateGroupRequest {
                name: format!("group{}", g.index),
                members: g.members[1..]
                    .iter()
                    .map(|m| user_ids_ref[*m as usize])
                    .collect(),
            };
            let h = c(owner as usize, Some(&tokens_ref[&owner]));
            retry("group", || h.post("/v1/groups", &body)).await
        }
        .boxed()
    })
    .await;
    for (g, r) in w.groups.iter().zip(created) {
        for (n, u) in r.members.iter().enumerate() {
            recorder.record(Event::Membership {
                channel: r.channel,
                user: *u,
                op: MemberOp::Join,
                members: n as u32 + 1,
            });
        }
        groups.insert(g.index, r.channel);
        if r.members.len() >= nodes::limits::GROUP_MEMBERS_MAX {
            let probe = GroupProbe {
                owner: g.members[0],
                members: &g.members,
                channel: r.channel,
            };
            group_full_refusals +=
                probe_group_full(w, &user_ids, &tokens, probe, recorder, c).await;
        }
    }
    Setup {
        logins,
        friends,
        groups,
        group_full_refusals,
    }
}

/// Api calls setup keeps in flight at once (users sign up in parallel, as they would).
const SETUP_CONCURRENCY: usize = 256;

/// Runs `f` over `items` with at most `SETUP_CONCURRENCY` in flight; results in item order.
///
/// The futures are boxed: with plain `async` closures over borrowed items the spawned setup
/// task fails rustc's higher-ranked `Send` check ("FnOnce is not general enough").
async fn concurrently<'a, T: Sync, R, F>(items: &'a [T], f: F) -> Vec<R>
where
    F: Fn(&'a T) -> BoxFuture<'a, R>,
{
    use futures::StreamExt;
    let futures: Vec<BoxFuture<'a, R>> = items.iter().map(f).collect();
    futures::stream::iter(futures)
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await
}

/// A full group to probe.
struct GroupProbe<'a> {
    owner: u32,
    members: &'a [u32],
    channel: Id,
}

/// Tries to add a 101st member: refused with `group_full` counts 1. Any other answer is what
/// the setup client observed: an accepted add is recorded as the join it is (the limits checker
/// then reports the 101-member group); another error is logged.
async fn probe_group_full(
    w: &Workload,
    user_ids: &[Id],
    tokens: &BTreeMap<u32, String>,
    g: GroupProbe<'_>,
    recorder: &Recorder,
    c: &(dyn Fn(usize, Option<&str>) -> HttpClient + Sync),
) -> u64 {
    let Some(outsider) = w.users.iter().find(|u| !g.members.contains(&u.index)) else {
        return 0;
    };
    let user = user_ids[outsider.index as usize];
    let path = format!("/v1/groups/{}/members", g.channel);
    let r: Result<GroupResponse, _> = c(g.owner as usize, Some(&tokens[&g.owner]))
        .post(&path, &AddMemberRequest { user })
        .await;
    match r {
        Err(ClientError::Refused {
            code: ErrorCode::GroupFull,
            ..
        }) => 1,
        Ok(grown) => {
            recorder.record(Event::Membership {
                channel: g.channel,
                user,
                op: MemberOp::Join,
                members: grown.members.len() as u32,
            });
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "the 101st-member probe got no answer");
            0
        }
    }
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
