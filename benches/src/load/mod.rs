//! The load driver (`chat-load`): real users on real sockets against a running deployment.
//!
//! `run` signs users up over HTTP, pairs them as friends (1:1 channels) and puts them in
//! groups, then starts worker processes (`chat-load worker`), each holding a slice of the
//! devices as real WebSocket connections from its own 127.x source addresses (past one
//! process's 20,000 files and one address's ephemeral ports). Workers send at a target rate
//! as an open-loop Poisson process: a send's time is when it was *due*, not when the driver
//! got to it, so a stalled server or driver shows up as latency (no coordinated omission).
//! Every worker writes what its devices observed in the simulation's JSON-lines history
//! format; `run` merges the files and judges them with the simulation's checkers, and prints
//! throughput and send->ack / send->deliver percentiles (hdrhistogram).
//!
//! With `--cluster DIR` (a `chatd local-cluster` data directory) it can also hurt nodes in
//! the middle of traffic (`--kill chat-0@20`, `--kill kv-leader@30`, `--wipe kv-1@40`, see
//! `faults`); the supervisor restarts them and the history records each as a `crash` or
//! `disk_loss` fault and its heal. A kv prober then times each shard's write and read stalls.

pub mod device;
pub mod faults;
pub mod judge;
pub mod setup;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nodes::proto::Id;
use serde::{Deserialize, Serialize};
use sim::history::{Event, Record};

/// Microseconds since the Unix epoch (all processes of a run share the machine's clock).
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Everything a worker needs: the devices, their channels and the run's timeline (µs after
/// `t0_unix_us`, which is the history's zero).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub api: SocketAddr,
    /// https and wss://, trusting this certificate (PEM); `None`: plain.
    #[serde(default)]
    pub ca_cert_pem: Option<String>,
    pub t0_unix_us: u64,
    /// Devices open their connections spread over [0, ramp_us].
    pub ramp_us: u64,
    pub traffic_start_us: u64,
    pub traffic_end_us: u64,
    /// Workers stop here; the checkers judge at this instant (`end` phase).
    pub end_us: u64,
    /// Sends per second over all workers.
    pub rate: f64,
    /// Share of sends that go to the sender's group (the rest: its 1:1 channel).
    pub group_share: f64,
    /// Characters per message.
    pub chars: u32,
    pub seed: u64,
    pub devices: Vec<PlannedDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedDevice {
    pub user: Id,
    pub device: Id,
    pub token: String,
    /// Friends' user ids (presence is asked for them).
    pub friends: Vec<Id>,
    pub direct: Option<Id>,
    pub group: Option<Id>,
}

/// Appends history records to a file; cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Recorder {
    t0_unix_us: u64,
    /// A std mutex: each record is one short synchronous write into a buffer.
    out: Arc<Mutex<BufWriter<File>>>,
}

impl Recorder {
    pub fn create(path: &Path, t0_unix_us: u64) -> anyhow::Result<Recorder> {
        let f = File::create(path)?;
        Ok(Recorder {
            t0_unix_us,
            out: Arc::new(Mutex::new(BufWriter::with_capacity(1 << 20, f))),
        })
    }

    /// Now, in history time.
    pub fn now_us(&self) -> u64 {
        unix_us().saturating_sub(self.t0_unix_us)
    }

    pub fn record(&self, ev: Event) {
        self.record_at(self.now_us(), ev);
    }

    pub fn record_at(&self, t_us: u64, ev: Event) {
        let line = Record { t_us, ev }.to_line();
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A full disk ends the run's validity; say so loudly rather than judge a torn file.
        writeln!(out, "{line}").expect("write the history file");
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}
