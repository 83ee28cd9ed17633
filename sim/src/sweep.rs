//! Many runs: `--seeds A..B` (a range of seeds, a summary of failures with their repro
//! commands) and `--shrink` (delta debugging over a failing run's fault schedule).
//!
//! Each run is a child process of this binary, started with the run's own repro arguments:
//! a finished madsim runtime does not free its nodes' memory (about 90 MB per default run),
//! so hundreds of runs in one process would exhaust memory; a child also isolates a run that
//! crashes, and the command it ran is exactly the repro command printed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nodes::canary::Canaries;
use scenarios::Schedule;

use crate::cli::Opts;
use crate::outcome::Outcome;
use crate::output::repro_command;
use crate::plan::schedule_for;

/// One seed's result in a sweep.
struct SeedResult {
    seed: u64,
    failed: Vec<String>,
    faults: usize,
    wall_secs: f64,
    sim_secs: f64,
    repro: String,
}

/// What a child run reported.
struct ChildRun {
    /// Invariants that failed (`crash` if the child died without a verdict).
    failed: Vec<String>,
    faults: usize,
    sim_secs: f64,
    wall_secs: f64,
}

/// Runs `opts` (its repro arguments) in a child process of this binary and reads its verdict.
fn run_child(opts: &Opts) -> ChildRun {
    let wall = std::time::Instant::now();
    let exe = std::env::current_exe().expect("the path of this binary");
    let args: Vec<String> = opts
        .repro_args()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let out = std::process::Command::new(exe)
        .args(&args)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .output();
    let wall_secs = wall.elapsed().as_secs_f64();
    let Ok(out) = out else {
        return ChildRun {
            failed: vec!["crash".into()],
            faults: 0,
            sim_secs: 0.0,
            wall_secs,
        };
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut failed: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once(" violated ").map(|(name, _)| name.to_string()))
        .collect();
    let verdict = text.lines().any(|l| l.starts_with("result: "));
    if !verdict || (!out.status.success() && failed.is_empty()) {
        failed.push(format!("crash (exit {:?})", out.status.code()));
    }
    let faults = text
        .lines()
        .find_map(|l| l.strip_prefix("schedule: "))
        .and_then(|l| {
            l.rsplit_once(" (")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let sim_secs = text
        .lines()
        .find_map(|l| l.strip_prefix("time: simulated "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    ChildRun {
        failed,
        faults,
        sim_secs,
        wall_secs,
    }
}

/// Runs every seed of `--seeds` (`--jobs` at a time, each on a fresh thread with a fresh
/// runtime), prints one line per seed as it finishes and a summary; exit 1 if any failed.
pub fn seeds(opts: &Opts, _canaries: &Canaries) -> i32 {
    let range = match opts.seed_range() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let total = range.end - range.start;
    println!(
        "seeds {}..{} ({total} runs, {} at a time); each: {}",
        range.start,
        range.end,
        opts.jobs.max(1),
        Opts {
            seed: range.start,
            seeds: None,
            ..opts.clone()
        }
        .repro_args()
        .replacen(&format!("--seed {}", range.start), "--seed N", 1)
    );
    let wall = std::time::Instant::now();
    let next = AtomicU64::new(range.start);
    let results: Mutex<Vec<SeedResult>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= range.end {
                    return;
                }
                let o = Opts {
                    seed,
                    seeds: None,
                    ..opts.clone()
                };
                let r = match schedule_for(&o) {
                    Ok(_) => {
                        let c = run_child(&o);
                        SeedResult {
                            seed,
                            failed: c.failed,
                            faults: c.faults,
                            wall_secs: c.wall_secs,
                            sim_secs: c.sim_secs,
                            repro: repro_command(&o),
                        }
                    }
                    Err(e) => SeedResult {
                        seed,
                        failed: vec!["schedule".into()],
                        faults: 0,
                        wall_secs: 0.0,
                        sim_secs: 0.0,
                        repro: format!("(no schedule: {e})"),
                    },
                };
                println!(
                    "seed {:>6}: {} ({} faults, {:.0} simulated s in {:.1} s wall){}",
                    r.seed,
                    if r.failed.is_empty() { "PASS" } else { "FAIL" },
                    r.faults,
                    r.sim_secs,
                    r.wall_secs,
                    if r.failed.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", r.failed.join(", "))
                    }
                );
                results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.seed);
    let failed: Vec<&SeedResult> = results.iter().filter(|r| !r.failed.is_empty()).collect();
    let elapsed = wall.elapsed().as_secs_f64();
    println!();
    println!(
        "summary: {} of {} seeds passed ({:.1} %); {:.1} s wall, {:.0} seeds per hour",
        results.len() - failed.len(),
        results.len(),
        100.0 * (results.len() - failed.len()) as f64 / results.len().max(1) as f64,
        elapsed,
        results.len() as f64 * 3600.0 / elapsed.max(1e-9)
    );
    for r in &failed {
        println!(
            "  FAIL seed {} [{}]: {}",
            r.seed,
            r.failed.join(", "),
            r.repro
        );
    }
    i32::from(!failed.is_empty())
}

/// Delta debugging (Zeller's ddmin) over the fault schedule of a failing run: replays the seed
/// with subsets of the faults and keeps the smallest subset under which one of the invariants
/// that failed still fails. Writes it as a schedule file and prints the command that replays
/// it. Exit 1 (the run failed) unless the schedule could not be written.
pub fn shrink(opts: &Opts, _canaries: &Canaries, schedule: &Schedule, failing: &Outcome) -> i32 {
    let target: BTreeSet<&str> = failing.failed().into_iter().collect();
    let all = schedule.faults.clone();
    let mut runs = 0usize;
    println!();
    println!(
        "shrink: {} faults; looking for a smaller schedule that still fails [{}] (at most {} runs)",
        all.len(),
        target.iter().copied().collect::<Vec<_>>().join(", "),
        opts.shrink_runs
    );
    let scratch = std::env::temp_dir().join(format!(
        "chatsim-shrink-{}-seed-{}.json",
        std::process::id(),
        opts.seed
    ));
    let mut fails = |subset: &[usize]| -> Option<bool> {
        if runs >= opts.shrink_runs {
            return None;
        }
        runs += 1;
        let candidate = Schedule {
            name: "shrinking".into(),
            faults: subset.iter().map(|&i| all[i].clone()).collect(),
            keep_quorums: schedule.keep_quorums,
            etcd_timeout_rate: schedule.etcd_timeout_rate,
        };
        let text = serde_json::to_string(&candidate).expect("schedules serialize");
        if let Err(e) = std::fs::write(&scratch, text) {
            eprintln!("error: writing {}: {e}", scratch.display());
            return None;
        }
        let replay = Opts {
            schedule: Some(scratch.clone()),
            ..opts.clone()
        };
        let c = run_child(&replay);
        let failed = c.failed.iter().any(|f| target.contains(f.as_str()));
        println!(
            "shrink: run {runs}: {} faults -> {}",
            subset.len(),
            if failed { "still fails" } else { "passes" }
        );
        Some(failed)
    };
    let mut current: Vec<usize> = (0..all.len()).collect();
    // A failure that needs no fault at all is the workload's alone.
    if fails(&[]) == Some(true) {
        current.clear();
    }
    let mut n = 2usize;
    'outer: while current.len() >= 2 {
        let chunk = current.len().div_ceil(n);
        let parts: Vec<Vec<usize>> = current.chunks(chunk).map(<[usize]>::to_vec).collect();
        for p in &parts {
            match fails(p) {
                Some(true) => {
                    current = p.clone();
                    n = 2;
                    continue 'outer;
                }
                Some(false) => {}
                None => break 'outer,
            }
        }
        if parts.len() > 2 {
            for i in 0..parts.len() {
                let complement: Vec<usize> = parts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, p)| p.iter().copied())
                    .collect();
                match fails(&complement) {
                    Some(true) => {
                        current = complement;
                        n = (n - 1).max(2);
                        continue 'outer;
                    }
                    Some(false) => {}
                    None => break 'outer,
                }
            }
        }
        if n >= current.len() {
            break;
        }
        n = (n * 2).min(current.len());
    }
    let _ = std::fs::remove_file(&scratch);
    let shrunk = Schedule {
        name: format!(
            "shrunk from {} ({} faults) for seed {}",
            schedule.name,
            all.len(),
            opts.seed
        ),
        faults: current.iter().map(|&i| all[i].clone()).collect(),
        keep_quorums: schedule.keep_quorums,
        etcd_timeout_rate: schedule.etcd_timeout_rate,
    };
    let path = opts
        .shrink_out
        .clone()
        .unwrap_or_else(|| format!("shrunk-seed-{}.json", opts.seed).into());
    let text = serde_json::to_string_pretty(&shrunk).expect("schedules serialize");
    if let Err(e) = std::fs::write(&path, text + "\n") {
        eprintln!("error: writing {}: {e}", path.display());
        return 2;
    }
    println!();
    println!(
        "shrink: {} of {} faults still fail [{}] after {runs} runs{}:",
        shrunk.faults.len(),
        all.len(),
        target.iter().copied().collect::<Vec<_>>().join(", "),
        if runs >= opts.shrink_runs {
            " (run budget spent; may shrink further)"
        } else {
            ""
        }
    );
    for f in &shrunk.faults {
        println!("  {f}");
    }
    let replay = Opts {
        schedule: Some(path.clone()),
        ..opts.clone()
    };
    println!("shrink: written to {}", path.display());
    println!("replay: {}", repro_command(&replay));
    1
}
