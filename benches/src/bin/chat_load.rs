//! `chat-load`: the load driver for a real deployment (see `benches::load`).
//!
//! ```text
//! chat-load run --api 127.0.0.1:8080 --users 1000 --rate 200 --duration 60 --out load-out
//! chat-load run ... --cluster chatsim-cluster --kill chat-0@20 --kill kv-leader@40 --wipe kv-2@60
//! chat-load check load-out/history.jsonl --traffic 10..70
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use benches::load::device::{run_worker, WorkerSummary};
use benches::load::faults::{Cluster, Fault, PROBE_EVERY};
use benches::load::judge::{judge, merge};
use benches::load::setup::{setup, Shape};
use benches::load::{unix_us, Plan, Recorder};
use clap::{Args, Parser, Subcommand};
use sim::history::Event;

#[derive(Debug, Parser)]
#[command(
    name = "chat-load",
    about = "Real WebSocket load against a chatsim deployment"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Set up users, drive traffic from worker processes, merge and judge the history.
    Run(RunArgs),
    /// (internal) One worker process of a run.
    Worker(WorkerArgs),
    /// Judge a history file (from a real run or the simulation).
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The api node.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    /// The api is https and chat servers wss://, with a certificate this PEM file holds or
    /// signed (`chatd local-cluster` writes its self-signed one to `<data>/tls/client.crt`).
    /// Without it: plain http and ws://.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Users (one device and one WebSocket connection each).
    #[arg(long, default_value_t = 1000)]
    users: u32,
    /// Members per group (users are chunked into groups; 1: no groups).
    #[arg(long, default_value_t = 10)]
    group_size: u32,
    /// Share of sends that go to a group (the rest go to a 1:1 friend).
    #[arg(long, default_value_t = 0.3)]
    group_share: f64,
    /// Sends per second, over all devices (open loop, Poisson).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Seconds after traffic for deliveries and reconnects to finish before judging.
    #[arg(long, default_value_t = 15)]
    settle: u64,
    /// Seconds over which devices open their connections (default: 1 s per 1,000 devices,
    /// at least 3).
    #[arg(long)]
    ramp: Option<u64>,
    /// Characters per message.
    #[arg(long, default_value_t = 40)]
    chars: u32,
    /// Worker processes (each holds users/procs connections; keep each under ~18,000).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory: plan, per-worker and merged histories, summary.json.
    #[arg(long, default_value = "load-out")]
    out: PathBuf,
    /// A `chatd local-cluster` data directory (pid files, config): enables --kill, --wipe
    /// and the kv prober (write and read stall times per kv fault).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// `NODE@SECONDS`: kill -9 the node that many seconds into the traffic (repeatable).
    /// `kv-leader@S`: the kv node leading the most shards then.
    #[arg(long = "kill")]
    kills: Vec<String>,
    /// `kv-N@SECONDS`: the kv node loses its disk (stopped, data directory deleted, killed;
    /// restarted empty, it rejoins from the other replicas). Repeatable.
    #[arg(long = "wipe")]
    wipes: Vec<String>,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[arg(long)]
    plan: PathBuf,
    #[arg(long)]
    slice: usize,
    #[arg(long)]
    of: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    history: PathBuf,
    /// The send window in seconds, `A..B` (for throughput).
    #[arg(long)]
    traffic: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Run(a) => {
            let pass = rt.block_on(run(a))?;
            std::process::exit(if pass { 0 } else { 1 });
        }
        Cmd::Worker(a) => rt.block_on(worker(a)),
        Cmd::Check(a) => {
            let history = merge(
                std::slice::from_ref(&a.history),
                &a.history.with_extension("sorted.jsonl"),
            )?;
            let traffic = match a.traffic {
                Some(t) => {
                    let (x, y) = t.split_once("..").context("--traffic A..B")?;
                    let s =
                        |v: &str| -> anyhow::Result<u64> { Ok((v.parse::<f64>()? * 1e6) as u64) };
                    (s(x)?, s(y)?)
                }
                None => (0, history.last().map_or(0, |r| r.t_us)),
            };
            let v = judge(&history, traffic, &[], 0);
            print!("{}", v.render());
            std::process::exit(if v.pass { 0 } else { 1 });
        }
    }
}

async fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_slice(&std::fs::read(&a.plan)?)?;
    let rec = Recorder::create(&a.out, plan.t0_unix_us)?;
    let summary = run_worker(Arc::new(plan), a.slice, a.of, rec).await;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

async fn run(a: RunArgs) -> anyhow::Result<bool> {
    let mut faults = a
        .kills
        .iter()
        .map(|k| Fault::parse(k, false))
        .chain(a.wipes.iter().map(|w| Fault::parse(w, true)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    faults.sort_by(|x, y| x.after_s.total_cmp(&y.after_s));
    let cluster = a.cluster.as_deref().map(Cluster::open).transpose()?;
    if !faults.is_empty() && cluster.is_none() {
        bail!("--kill and --wipe need --cluster DIR (the local-cluster data directory)");
    }
    if a.procs == 0 || a.procs > 250 {
        bail!("--procs must be 1..=250");
    }
    let ca_cert_pem = match &a.ca_cert {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        ),
        None => None,
    };
    let tls = ca_cert_pem
        .as_deref()
        .map(|pem| nodes::client_tls::ClientTls::trusting_pem(pem.as_bytes()))
        .transpose()
        .context("--ca-cert")?;
    std::fs::create_dir_all(&a.out)?;
    let setup_path = a.out.join("history-setup.jsonl");
    // Setup events are stamped t=0; the real zero is set once setup is done.
    let setup_rec = Recorder::create(&setup_path, unix_us())?;
    eprintln!(
        "setting up {} users (groups of {})...",
        a.users, a.group_size
    );
    let started = std::time::Instant::now();
    let devices = setup(
        a.api,
        tls,
        &Shape {
            users: a.users,
            group_size: a.group_size,
        },
        &setup_rec,
    )
    .await?;
    setup_rec.flush()?;
    eprintln!("setup took {:.1} s", started.elapsed().as_secs_f64());
    let ramp_s = a.ramp.unwrap_or((a.users as u64 / 1000).max(3));
    let traffic_start_us = (ramp_s + 3) * 1_000_000;
    let plan = Plan {
        api: a.api,
        ca_cert_pem,
        // Time for the workers to start and read the plan.
        t0_unix_us: unix_us() + 1_000_000,
        ramp_us: ramp_s * 1_000_000,
        traffic_start_us,
        traffic_end_us: traffic_start_us + a.duration * 1_000_000,
        end_us: traffic_start_us + (a.duration + a.settle) * 1_000_000,
        rate: a.rate,
        group_share: a.group_share,
        chars: a.chars,
        seed: a.seed,
        devices,
    };
    let plan_path = a.out.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan)?)?;
    let exe = std::env::current_exe()?;
    let mut workers: Vec<Child> = Vec::new();
    let mut files = vec![setup_path];
    for k in 0..a.procs {
        let out = a.out.join(format!("history-{k}.jsonl"));
        files.push(out.clone());
        workers.push(
            Command::new(&exe)
                .arg("worker")
                .arg("--plan")
                .arg(&plan_path)
                .args(["--slice", &k.to_string(), "--of", &a.procs.to_string()])
                .arg("--out")
                .arg(&out)
                .stdout(Stdio::piped())
                .spawn()
                .context("start a worker")?,
        );
    }
    // This process's own events: phases, and the crashes it causes.
    let own_path = a.out.join("history-driver.jsonl");
    files.push(own_path.clone());
    let rec = Recorder::create(&own_path, plan.t0_unix_us)?;
    let at = |us: u64| {
        tokio::time::Instant::now()
            + Duration::from_micros((plan.t0_unix_us + us).saturating_sub(unix_us()))
    };
    tokio::time::sleep_until(at(plan.traffic_start_us)).await;
    rec.record_at(plan.traffic_start_us, phase("traffic"));
    let probes = cluster
        .as_ref()
        .map(|c| c.start_prober(plan.t0_unix_us, plan.t0_unix_us + plan.end_us));
    eprintln!(
        "traffic: {} sends/s for {} s over {} connections in {} worker(s)",
        a.rate, a.duration, a.users, a.procs
    );
    for f in &faults {
        let t = plan.traffic_start_us + (f.after_s * 1e6) as u64;
        tokio::time::sleep_until(at(t)).await;
        let c = cluster.as_ref().expect("checked above");
        c.inject(f, &rec).await?;
    }
    tokio::time::sleep_until(at(plan.traffic_end_us)).await;
    rec.record_at(plan.traffic_end_us, phase("liveness"));
    tokio::time::sleep_until(at(plan.end_us)).await;
    rec.record_at(plan.end_us, phase("end"));
    if let Some(c) = &cluster {
        // The kv groups after the faults: healed, or how not (judged by `kv_health`).
        rec.record(c.kv_status().await);
    }
    rec.flush()?;
    let mut total = WorkerSummary::default();
    for w in workers {
        let out = tokio::task::spawn_blocking(move || w.wait_with_output()).await??;
        if !out.status.success() {
            bail!("a worker failed: {}", out.status);
        }
        let s: WorkerSummary = serde_json::from_slice(&out.stdout).context("worker summary")?;
        total.devices += s.devices;
        total.connected_at_end += s.connected_at_end;
        total.sends += s.sends;
        total.dropped_sends += s.dropped_sends;
        total.connects += s.connects;
        total.connect_failures += s.connect_failures;
        total.overloaded += s.overloaded;
        total.held += s.held;
        total.accepted_ack_us.extend(s.accepted_ack_us);
        total.attempt_ack_us.extend(s.attempt_ack_us);
    }
    let history = merge(&files, &a.out.join("history.jsonl"))?;
    let probes = probes
        .map(|p| std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner())))
        .unwrap_or_default();
    let verdict = judge(
        &history,
        (plan.traffic_start_us, plan.traffic_end_us),
        &probes,
        PROBE_EVERY.as_micros() as u64,
    );
    eprintln!(
        "workers: {} connects, {} failed connect attempts, {} sends dropped by the driver (cue queue full)",
        total.connects, total.connect_failures, total.dropped_sends
    );
    total.accepted_ack_us.sort_unstable();
    total.attempt_ack_us.sort_unstable();
    let q = |v: &[u64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    let (first, attempt) = (&total.accepted_ack_us, &total.attempt_ack_us);
    println!(
        "admission: {} refusals overloaded, {} sends held by a device's backoff; send->ack of the {} sends neither: p50 {:.0} ms p99 {:.0} ms max {:.0} ms; accepted attempt->ack of all {} acked: p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        total.overloaded,
        total.held,
        first.len(),
        q(first, 0.5),
        q(first, 0.99),
        q(first, 1.0),
        attempt.len(),
        q(attempt, 0.5),
        q(attempt, 0.99),
        q(attempt, 1.0)
    );
    print!("{}", verdict.render());
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "verdict": verdict,
            "workers": total,
            "users": a.users,
            "group_size": a.group_size,
            "rate": a.rate,
            "duration_s": a.duration,
            "procs": a.procs,
        }))?,
    )?;
    Ok(verdict.pass && total.dropped_sends == 0)
}

fn phase(name: &str) -> Event {
    Event::Phase { name: name.into() }
}
