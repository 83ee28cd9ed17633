//! The progress bar of long runs: simulated time, history events and streamed violations so
//! far, on stderr, drawn only when stderr is a terminal (and not with --no-progress). It reads
//! counters and never touches the history or the simulation's RNG, so runs with and without
//! it are identical.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

use crate::cli::Opts;

/// How often (simulated) the bar is updated.
const EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar if stderr is a terminal and the options allow it.
    pub fn new(opts: &Opts) -> Option<Self> {
        if opts.no_progress || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(
            Some(3 + opts.duration + opts.liveness_budget),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            ProgressStyle::with_template("sim {pos}/{len} s [{bar:30}] {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Some(Self { bar })
    }

    /// Setup is over after `setup_s` simulated seconds: the bar's length becomes setup plus
    /// traffic plus liveness.
    pub fn setup_done(&self, setup_s: u64, traffic_s: u64) {
        self.bar.set_length(setup_s + traffic_s);
    }

    /// Updates the bar every simulated second until the task is aborted. `probe` gives
    /// (history events, violations so far).
    pub async fn run(self, start: Instant, probe: impl Fn() -> (usize, u64) + Send + 'static) {
        loop {
            tokio::time::sleep(EVERY).await;
            let (events, violations) = probe();
            self.bar
                .set_position(Instant::now().duration_since(start).as_secs());
            self.bar.set_message(format!(
                "{events} events, {violations} duplicate/id violations so far"
            ));
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
