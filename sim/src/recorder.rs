//! What a run records as it goes: the history (`Recorder`, stamped with simulated time, with a
//! streamed duplicate check for the progress bar), the run-wide device counters, and the
//! simulation's push provider, which records each notification as a `push` event.
//!
//! It does not judge anything (the checkers do, at the end) and holds no simulation logic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use nodes::proto::Id;
use nodes::push::{Notification, PushError, PushProvider};
use tokio::time::Instant;

use crate::history::{Event, Record};

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
    pub fn new(start: Instant, monitor: bool) -> Self {
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

    /// Simulated seconds since the run started.
    pub fn now_s(&self) -> f64 {
        Instant::now().duration_since(self.start).as_secs_f64()
    }

    /// Events recorded so far.
    pub fn events(&self) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn violations(&self) -> u64 {
        self.monitor.as_ref().map_or(0, |m| {
            m.lock().unwrap_or_else(|p| p.into_inner()).violations
        })
    }

    pub fn take(&self) -> Vec<Record> {
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

/// The counters' values at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub sends: u64,
    pub acks: u64,
    pub delivers: u64,
    pub presence: u64,
    pub connects: u64,
    pub heartbeats: u64,
    pub chars: u64,
    pub text_bytes: u64,
    pub bad_inputs: u64,
}

impl Counters {
    pub fn totals(&self) -> Totals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            sends: get(&self.sends),
            acks: get(&self.acks),
            delivers: get(&self.delivers),
            presence: get(&self.presence),
            connects: get(&self.connects),
            heartbeats: get(&self.heartbeats),
            chars: get(&self.chars),
            text_bytes: get(&self.text_bytes),
            bad_inputs: get(&self.bad_inputs),
        }
    }

    /// Error codes the devices were shown, with counts.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

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
pub struct HistoryPush {
    pub recorder: Recorder,
    /// Notifications asked for (a run-wide total).
    pub pushes: Arc<AtomicU64>,
}

impl PushProvider for HistoryPush {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.recorder.record(Event::Push {
            user: n.user,
            device: n.device,
            message_id: n.message_id,
            collapse_id: Some(n.collapse_id()),
        });
        Box::pin(async { Ok(()) })
    }
}
