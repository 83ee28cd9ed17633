//! `cargo run -p sim -- --seed 42`: the chat system in the deterministic simulator.
//!
//! Built without `--cfg madsim` this binary is only a launcher that re-runs cargo with the flag
//! into its own target dir (see `launcher`). Built with it, it runs the simulation: the
//! cluster and every device as madsim nodes (`cluster`, `device`), the run's phases and faults
//! (`run`), the history (`history`) and the checkers that judge it (`checkers`).

mod cli;
#[cfg(madsim)]
use sim::{checkers, history};
#[cfg(madsim)]
mod cluster;
#[cfg(madsim)]
mod device;
#[cfg(not(madsim))]
mod launcher;
#[cfg(madsim)]
mod output;
#[cfg(madsim)]
mod run;

#[cfg(not(madsim))]
fn main() {
    std::process::exit(launcher::relaunch());
}

#[cfg(madsim)]
fn main() {
    use clap::Parser;
    let opts = cli::Opts::parse();
    std::process::exit(run::main(opts));
}
