//! A worker: its slice of devices as real WebSocket clients, and the open-loop send schedule.
//!
//! Each device is a task running the same device runtime as the simulation's devices
//! (`nodes::client::runtime`: connect, heartbeats, silence, reconnect with jittered backoff,
//! `DeviceState` for cursors, reorder buffer and outbox). This file adds the open-loop cues
//! and the observer that writes the history file.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nodes::client::device::{DeviceState, Observation};
use nodes::client::runtime::{
    Command, DeviceEvent, DeviceRuntime, Exit, Flow, Login, Observer, SendCmd, Settings, Text,
};
use nodes::proto::Id;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sim::history::Event;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::{Plan, PlannedDevice, Recorder};

/// Reconnect backoff cap: shorter than the simulated devices' 30 s, so the reconnect figures
/// after a kill measure the servers, not a device's long wait (a local cluster has no herd of
/// 100,000 apps to spread).
const BACKOFF_MAX_MS: u64 = 5_000;
/// Commands waiting for one device task. Full means the driver itself cannot keep up: the send
/// is counted as dropped (reported), never silently delayed.
const CUES_MAX: usize = 1024;
/// Source addresses per worker: device j of worker k connects from 127.1.k.(1 + j % this).
const SOURCE_IPS: usize = 200;

/// Counts a worker reports when it ends (one JSON line on stdout).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerSummary {
    pub devices: u64,
    pub connected_at_end: u64,
    pub sends: u64,
    pub dropped_sends: u64,
    pub connects: u64,
    pub connect_failures: u64,
    /// Sends a chat server refused `overloaded` (the device library holds them for a backoff
    /// and sends them again, so one send may count several times).
    #[serde(default)]
    pub overloaded: u64,
    /// Sends held at once because their device was backing off.
    #[serde(default)]
    pub held: u64,
    /// Send->ack (due to acknowledged, microseconds) of the sends that went out at once and
    /// no server refused `overloaded`. At most `ACCEPTED_SAMPLES_MAX` per worker; later ones
    /// are not kept.
    #[serde(default)]
    pub accepted_ack_us: Vec<u64>,
    /// Attempt->ack of every acknowledged send: from the transmission the server accepted
    /// (the first, or the last release from a backoff) to its ack. The latency of accepted
    /// work under admission control, whatever the device waited before. Same bound.
    #[serde(default)]
    pub attempt_ack_us: Vec<u64>,
}

/// Accepted send->ack samples one worker keeps.
pub const ACCEPTED_SAMPLES_MAX: usize = 2_000_000;

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    sends: AtomicU64,
    dropped: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    overloaded: AtomicU64,
    held: AtomicU64,
    /// A std mutex: one short push per ack.
    accepted_ack_us: std::sync::Mutex<Vec<u64>>,
    attempt_ack_us: std::sync::Mutex<Vec<u64>>,
}

/// Runs slice `slice` of `of` until the plan's end; returns the summary.
pub async fn run_worker(plan: Arc<Plan>, slice: usize, of: usize, rec: Recorder) -> WorkerSummary {
    let mine: Vec<PlannedDevice> = plan
        .devices
        .iter()
        .enumerate()
        .filter(|(i, _)| i % of == slice)
        .map(|(_, d)| d.clone())
        .collect();
    let counters = Arc::new(Counters::default());
    // The history's zero as an Instant (it may still be ahead: workers start before it).
    let now_unix = super::unix_us();
    let t0 = if plan.t0_unix_us >= now_unix {
        Instant::now() + Duration::from_micros(plan.t0_unix_us - now_unix)
    } else {
        Instant::now() - Duration::from_micros(now_unix - plan.t0_unix_us)
    };
    let n = mine.len().max(1);
    // One TLS config for every device of the worker (the plan's certificate was checked
    // when the run started).
    let tls = plan.ca_cert_pem.as_deref().map(|pem| {
        nodes::client_tls::ClientTls::trusting_pem(pem.as_bytes())
            .expect("the run checked the certificate")
    });
    let mut cues = Vec::new();
    let mut tasks = Vec::new();
    for (j, d) in mine.iter().enumerate() {
        let (tx, rx) = mpsc::channel(CUES_MAX);
        // The app opens at its time in the ramp (the runtime starts then).
        tx.try_send(Command::Open)
            .expect("a new channel has room for the first command");
        cues.push(tx);
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            1,
            slice as u8,
            (1 + j % SOURCE_IPS) as u8,
        ));
        let open_at = t0 + Duration::from_micros(plan.ramp_us * j as u64 / n as u64);
        let settings = Settings {
            source_ip: Some(src),
            backoff_max_ms: BACKOFF_MAX_MS,
            missed_heartbeats: MissedTickBehavior::Delay,
            tls: tls.clone(),
            ..Settings::new(vec![plan.api])
        };
        let login = Login {
            user: d.user,
            device: d.device,
            token: d.token.clone(),
        };
        let observer = Recording {
            user: d.user,
            device: d.device,
            rec: rec.clone(),
            counters: counters.clone(),
            pending: Default::default(),
        };
        let runtime = DeviceRuntime::new(
            login,
            settings,
            DeviceState::new(d.user, d.device, false),
            StdRng::seed_from_u64(plan.seed ^ d.device),
            observer,
        )
        .with_friends(d.friends.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(open_at).await;
            runtime.run(rx, open_at).await
        }));
    }
    // The open-loop schedule: Poisson arrivals at this worker's share of the rate.
    let rate = plan.rate / of as f64;
    let mut rng = StdRng::seed_from_u64(plan.seed ^ (slice as u64).wrapping_mul(0x9e37_79b9));
    let mut due_us = plan.traffic_start_us as f64;
    if rate > 0.0 && !mine.is_empty() {
        loop {
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            due_us += -u.ln() / rate * 1e6;
            if due_us >= plan.traffic_end_us as f64 {
                break;
            }
            let j = rng.gen_range(0..mine.len());
            let d = &mine[j];
            let channel = match (d.group, d.direct) {
                (Some(g), _) if rng.gen_bool(plan.group_share) => g,
                (_, Some(c)) => c,
                (Some(g), None) => g,
                (None, None) => continue,
            };
            tokio::time::sleep_until(t0 + Duration::from_micros(due_us as u64)).await;
            let cue = Command::Send(SendCmd {
                channel,
                text: Text::Random { chars: plan.chars },
                due: Some(due_us as u64),
            });
            if cues[j].try_send(cue).is_err() {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tokio::time::sleep_until(t0 + Duration::from_micros(plan.end_us)).await;
    for tx in &cues {
        // Behind any cues still queued: the traffic window is over, so there are none.
        let _ = tx.send(Command::Stop).await;
    }
    for t in tasks {
        if let Ok(Exit::Stopped { connected: true }) = t.await {
            counters.connected.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = rec.flush();
    let take = |v: &std::sync::Mutex<Vec<u64>>| {
        std::mem::take(&mut *v.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let accepted_ack_us = take(&counters.accepted_ack_us);
    let attempt_ack_us = take(&counters.attempt_ack_us);
    WorkerSummary {
        devices: mine.len() as u64,
        connected_at_end: counters.connected.load(Ordering::Relaxed),
        sends: counters.sends.load(Ordering::Relaxed),
        dropped_sends: counters.dropped.load(Ordering::Relaxed),
        connects: counters.connects.load(Ordering::Relaxed),
        connect_failures: counters.connect_failures.load(Ordering::Relaxed),
        overloaded: counters.overloaded.load(Ordering::Relaxed),
        held: counters.held.load(Ordering::Relaxed),
        accepted_ack_us,
        attempt_ack_us,
    }
}

/// Records a device's events into the worker's history file and counters.
struct Recording {
    user: Id,
    device: Id,
    rec: Recorder,
    counters: Arc<Counters>,
    /// Sends awaiting their ack (bounded by the device's outbox).
    pending: std::collections::HashMap<Id, Pending>,
}

struct Pending {
    /// When the send was due.
    due_us: u64,
    /// When its last attempt went out.
    attempt_us: u64,
    /// Refused `overloaded` or held by a backoff at least once.
    delayed: bool,
}

fn keep_sample(v: &std::sync::Mutex<Vec<u64>>, us: u64) {
    let mut v = v.lock().unwrap_or_else(|p| p.into_inner());
    if v.len() < ACCEPTED_SAMPLES_MAX {
        v.push(us);
    }
}

impl Observer for Recording {
    async fn observe(&mut self, ev: DeviceEvent) -> Flow {
        let c = &self.counters;
        let mut at = None;
        match &ev {
            DeviceEvent::Connected { .. } => {
                c.connects.fetch_add(1, Ordering::Relaxed);
            }
            DeviceEvent::ConnectFailed(e) => {
                tracing::debug!(device = self.device, error = %e.error, "connect failed");
                c.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            DeviceEvent::Sending {
                due, client_msg_id, ..
            } => {
                c.sends.fetch_add(1, Ordering::Relaxed);
                // Stamped with the time the send was due: time spent queued in the driver
                // counts.
                at = *due;
                let t = due.unwrap_or_else(|| self.rec.now_us());
                let p = Pending {
                    due_us: t,
                    attempt_us: t,
                    delayed: false,
                };
                self.pending.insert(*client_msg_id, p);
            }
            DeviceEvent::Held { client_msg_id } => {
                c.held.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = self.pending.get_mut(client_msg_id) {
                    p.delayed = true;
                }
            }
            DeviceEvent::Released { client_msg_ids } => {
                let now = self.rec.now_us();
                for id in client_msg_ids {
                    if let Some(p) = self.pending.get_mut(id) {
                        p.attempt_us = now;
                    }
                }
            }
            DeviceEvent::Observed(Observation::Error {
                code,
                detail,
                client_msg_id,
            }) => {
                if *code == nodes::proto::client::ErrorCode::Overloaded {
                    c.overloaded.fetch_add(1, Ordering::Relaxed);
                    if let Some(p) = client_msg_id.and_then(|id| self.pending.get_mut(&id)) {
                        p.delayed = true;
                    }
                }
                tracing::debug!(device = self.device, ?code, %detail, "server error");
            }
            DeviceEvent::Observed(Observation::Ack { client_msg_id, .. }) => {
                if let Some(p) = self.pending.remove(client_msg_id) {
                    let now = self.rec.now_us();
                    if !p.delayed {
                        keep_sample(&c.accepted_ack_us, now.saturating_sub(p.due_us));
                    }
                    keep_sample(&c.attempt_ack_us, now.saturating_sub(p.attempt_us));
                }
            }
            DeviceEvent::Observed(Observation::SendFailed { client_msg_id, .. }) => {
                self.pending.remove(client_msg_id);
            }
            _ => {}
        }
        if let Some(ev) = Event::of_device(self.user, self.device, ev) {
            match at {
                Some(t_us) => self.rec.record_at(t_us, ev),
                None => self.rec.record(ev),
            }
        }
        Flow::Continue
    }
}
