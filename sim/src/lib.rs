//! The simulator. Its public pieces: the history format and the invariant checkers (they
//! judge any history in the format, from the simulation or from a real run). Built with
//! `--cfg madsim` it also holds the simulation itself: the cluster and every device as madsim
//! nodes (`cluster`, `device`), what a run runs (`plan`), its phases (`run`: `setup`, then
//! `faults`), what it records (`recorder`) and produces (`outcome`), and how that is printed
//! and reported (`output`, `report`). `entry` dispatches; the `sim` binary (`main.rs`) is the
//! front door.

pub mod analysis;
pub mod availability;
pub mod checkers;
pub mod cli;
pub mod history;
pub mod kv_view;
#[cfg(not(madsim))]
pub mod launcher;
pub mod metrics;

#[cfg(madsim)]
pub mod capacity;
#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod device;
#[cfg(madsim)]
pub mod entry;
#[cfg(madsim)]
pub mod faults;
#[cfg(madsim)]
pub mod hostile;
#[cfg(madsim)]
pub mod outcome;
#[cfg(madsim)]
pub mod output;
#[cfg(madsim)]
pub mod plan;
#[cfg(madsim)]
pub mod prober;
#[cfg(madsim)]
pub mod progress;
#[cfg(madsim)]
pub mod recorder;
#[cfg(madsim)]
pub mod report;
#[cfg(madsim)]
pub mod rogue;
#[cfg(madsim)]
pub mod run;
#[cfg(madsim)]
pub mod setup;
#[cfg(madsim)]
pub mod sweep;
