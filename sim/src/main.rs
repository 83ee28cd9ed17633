//! `cargo run -p sim -- --seed 42`: the chat system in the deterministic simulator.
//!
//! Built without `--cfg madsim` this binary is only a launcher that re-runs cargo with the flag
//! into its own target dir (see `sim::launcher`). Built with it, it runs the simulation.

#[cfg(not(madsim))]
fn main() {
    std::process::exit(sim::launcher::relaunch());
}

#[cfg(madsim)]
fn main() {
    use clap::Parser;
    let opts = sim::cli::Opts::parse().resolve();
    std::process::exit(sim::entry::main(opts));
}
