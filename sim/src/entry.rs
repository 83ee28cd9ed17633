//! The simulated binary's entry point: parses nothing (`main.rs` did), dispatches to a listing,
//! the capacity plan, a sweep, a determinism check or one run, and writes what was asked for
//! (history file, report). The only module that drives `run`.

use nodes::canary::Canaries;

use crate::cli::{CapacityOpts, Opts};
use crate::history::Record;
use crate::plan::{plan_for, Plan};
use crate::run::run_on_fresh_thread;

/// Entry point of the simulated binary.
pub fn main(opts: Opts) -> i32 {
    // Logs only when asked (RUST_LOG=debug, ...): they go to stderr and do not touch the history.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_timer(SimulatedTime)
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
        return capacity(c, &canaries);
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

/// `sim capacity`: the measurement run, then the plan from it.
pub fn capacity(c: &CapacityOpts, canaries: &Canaries) -> i32 {
    let (opts, plan) = match crate::capacity::measurement(c) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let outcome = run_on_fresh_thread(&opts, canaries, &plan);
    crate::capacity::write_plan(c, &opts, &plan, &outcome)
}

/// Log lines carry the simulated time (seconds since the run's start, as in the history's
/// `t_us`), read from madsim's clock; outside a simulated runtime, nothing.
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match madsim::time::TimeHandle::try_current() {
            Some(t) => write!(w, "{:>11.6}", t.elapsed().as_secs_f64()),
            None => write!(w, "{:>11}", "-"),
        }
    }
}
