//! A worker: its slice of devices as real WebSocket clients, and the open-loop send schedule.
//!
//! Each device is a task running the same client state machine as the simulation's devices
//! (`nodes::client::device::DeviceState`: cursors, reorder buffer, outbox resent after a
//! reconnect), with heartbeats, presence queries and reconnects with jittered backoff.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nodes::client::device::{DeviceState, Observation};
use nodes::client::http::HttpClient;
use nodes::client::ws::{Incoming, WsConn};
use nodes::proto::client::{ChatServerResponse, ClientFrame, ServerFrame};
use nodes::proto::Id;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sim::history::Event;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Plan, PlannedDevice, Recorder};

const HEARTBEAT: Duration = Duration::from_millis(nodes::limits::HEARTBEAT_INTERVAL_MS);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SERVER_SILENT: Duration = Duration::from_millis(3 * nodes::limits::HEARTBEAT_INTERVAL_MS);
const BACKOFF_MIN_MS: u64 = 200;
const BACKOFF_MAX_MS: u64 = 5_000;
/// Sends waiting for one device task. Full means the driver itself cannot keep up: the send
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
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    sends: AtomicU64,
    dropped: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
}

struct Cue {
    channel: Id,
    due_us: u64,
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
    let (stop_tx, stop_rx) = watch::channel(false);
    // The history's zero as an Instant (it may still be ahead: workers start before it).
    let now_unix = super::unix_us();
    let t0 = if plan.t0_unix_us >= now_unix {
        Instant::now() + Duration::from_micros(plan.t0_unix_us - now_unix)
    } else {
        Instant::now() - Duration::from_micros(now_unix - plan.t0_unix_us)
    };
    let n = mine.len().max(1);
    let mut cues = Vec::new();
    let mut tasks = Vec::new();
    for (j, d) in mine.iter().enumerate() {
        let (tx, rx) = mpsc::channel(CUES_MAX);
        cues.push(tx);
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            1,
            slice as u8,
            (1 + j % SOURCE_IPS) as u8,
        ));
        let open_at = t0 + Duration::from_micros(plan.ramp_us * j as u64 / n as u64);
        let app = App {
            d: d.clone(),
            api: plan.api,
            src,
            state: DeviceState::new(d.user, d.device, false),
            conn: None,
            rec: rec.clone(),
            counters: counters.clone(),
            rng: StdRng::seed_from_u64(plan.seed ^ d.device),
            next_client_msg_id: 1,
            backoff_ms: BACKOFF_MIN_MS,
            next_connect: open_at,
            connections: 0,
            last_heard: open_at,
            server: None,
            chars: plan.chars,
        };
        tasks.push(tokio::spawn(app.run(rx, stop_rx.clone(), open_at)));
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
            let cue = Cue {
                channel,
                due_us: due_us as u64,
            };
            if cues[j].try_send(cue).is_err() {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tokio::time::sleep_until(t0 + Duration::from_micros(plan.end_us)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = rec.flush();
    WorkerSummary {
        devices: mine.len() as u64,
        connected_at_end: counters.connected.load(Ordering::Relaxed),
        sends: counters.sends.load(Ordering::Relaxed),
        dropped_sends: counters.dropped.load(Ordering::Relaxed),
        connects: counters.connects.load(Ordering::Relaxed),
        connect_failures: counters.connect_failures.load(Ordering::Relaxed),
    }
}

struct App {
    d: PlannedDevice,
    api: SocketAddr,
    src: IpAddr,
    state: DeviceState,
    conn: Option<WsConn>,
    rec: Recorder,
    counters: Arc<Counters>,
    rng: StdRng,
    next_client_msg_id: Id,
    backoff_ms: u64,
    next_connect: Instant,
    connections: u64,
    last_heard: Instant,
    server: Option<u32>,
    chars: u32,
}

impl App {
    async fn run(
        mut self,
        mut cues: mpsc::Receiver<Cue>,
        mut stop: watch::Receiver<bool>,
        open_at: Instant,
    ) {
        tokio::time::sleep_until(open_at).await;
        self.rec.record(Event::HeartbeatStart {
            user: self.d.user,
            device: self.d.device,
        });
        let mut heartbeat = tokio::time::interval_at(open_at + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() && Instant::now() >= self.next_connect {
                self.connect().await;
            }
            let want_connect = self.conn.is_none();
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                cue = cues.recv() => match cue {
                    Some(c) => self.send(c).await,
                    None => break,
                },
                incoming = recv(&mut self.conn) => self.on_incoming(incoming).await,
                _ = heartbeat.tick() => self.on_heartbeat().await,
                _ = tokio::time::sleep_until(self.next_connect), if want_connect => {}
            }
        }
        if self.conn.is_some() {
            self.counters.connected.fetch_add(1, Ordering::Relaxed);
        }
        // The process exits right after: connections close with it.
    }

    async fn connect(&mut self) {
        self.connections += 1;
        let mut http = HttpClient::new(self.api);
        http.token = Some(self.d.token.clone());
        let path = match self.server {
            Some(s) => format!("/v1/chat-server?avoid={s}"),
            None => "/v1/chat-server".to_string(),
        };
        let src = self.src;
        let token = self.d.token.clone();
        let connection = self.connections;
        let attempt = async move {
            let cs: ChatServerResponse = http.get(&path).await.map_err(|e| e.to_string())?;
            let addr: SocketAddr = cs
                .url
                .strip_prefix("ws://")
                .and_then(|r| r.split('/').next())
                .and_then(|hp| hp.parse().ok())
                .ok_or_else(|| format!("bad chat server url {}", cs.url))?;
            let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            sock.bind(SocketAddr::new(src, 0))
                .map_err(|e| format!("bind {src}: {e}"))?;
            let tcp = sock.connect(addr).await.map_err(|e| e.to_string())?;
            let mut ws = WsConn::handshake(&cs.url, nodes::net::Stream::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
            ws.send(&ClientFrame::Hello { token, connection })
                .await
                .map_err(|e| e.to_string())?;
            match ws.recv().await {
                Incoming::Frame(ServerFrame::Welcome { server, .. }) => Ok((ws, server)),
                other => Err(format!("no welcome: {other:?}")),
            }
        };
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err("connect timed out".to_string()),
        };
        match result {
            Ok((ws, server)) => {
                self.conn = Some(ws);
                self.server = Some(server);
                self.backoff_ms = BACKOFF_MIN_MS;
                self.last_heard = Instant::now();
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                self.rec.record(Event::Connected {
                    user: self.d.user,
                    device: self.d.device,
                    server: format!("chat-{server}"),
                });
                let frames = self.state.on_connected();
                self.send_all(frames).await;
                self.send_frame(ClientFrame::Heartbeat).await;
                self.ask_presence().await;
            }
            Err(e) => {
                tracing::debug!(device = self.d.device, error = %e, "connect failed");
                self.counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.schedule_reconnect();
            }
        }
    }

    fn schedule_reconnect(&mut self) {
        let wait = self.rng.gen_range(self.backoff_ms / 2..=self.backoff_ms);
        self.next_connect = Instant::now() + Duration::from_millis(wait);
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
    }

    async fn send_frame(&mut self, frame: ClientFrame) {
        if let Some(ws) = self.conn.as_mut() {
            match tokio::time::timeout(WRITE_TIMEOUT, ws.send(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.lost("send failed"),
                Err(_) => self.lost("send timed out"),
            }
        }
    }

    async fn send_all(&mut self, frames: Vec<ClientFrame>) {
        for f in frames {
            self.send_frame(f).await;
        }
    }

    fn lost(&mut self, reason: &str) {
        if self.conn.take().is_some() {
            self.rec.record(Event::Disconnected {
                user: self.d.user,
                device: self.d.device,
                reason: reason.into(),
            });
            self.schedule_reconnect();
        }
    }

    fn text(&mut self) -> String {
        // Mostly ASCII with some multi-byte characters, as in the simulation.
        let alphabet = ['a', 'b', 'c', ' ', 'é', 'ж', '字', '😀'];
        (0..self.chars)
            .map(|_| alphabet[self.rng.gen_range(0..alphabet.len())])
            .collect()
    }

    async fn send(&mut self, cue: Cue) {
        let client_msg_id = self.next_client_msg_id;
        self.next_client_msg_id += 1;
        let text = self.text();
        // Stamped with the time the send was due: time spent queued in the driver counts.
        self.rec.record_at(
            cue.due_us,
            Event::Send {
                user: self.d.user,
                device: self.d.device,
                channel: cue.channel,
                client_msg_id,
                bytes: text.len() as u64,
                chars: text.chars().count() as u64,
            },
        );
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        let frame = self.state.send(client_msg_id, cue.channel, text);
        self.send_frame(frame).await;
    }

    async fn on_heartbeat(&mut self) {
        if self.conn.is_none() {
            return;
        }
        if self.last_heard.elapsed() > SERVER_SILENT {
            self.lost("server silent");
            return;
        }
        self.send_frame(ClientFrame::Heartbeat).await;
        let mut frames = self.state.take_reads();
        frames.extend(self.state.on_tick());
        self.send_all(frames).await;
    }

    async fn ask_presence(&mut self) {
        if !self.d.friends.is_empty() {
            let users = self.d.friends.clone();
            self.send_frame(ClientFrame::PresenceQuery { users }).await;
        }
    }

    async fn on_incoming(&mut self, incoming: Incoming) {
        let frame = match incoming {
            Incoming::Frame(f) => {
                self.last_heard = Instant::now();
                f
            }
            Incoming::Unparsed(t) => {
                tracing::warn!(device = self.d.device, frame = %t, "unparsed server frame");
                return;
            }
            Incoming::Closed => {
                self.lost("closed by server");
                return;
            }
        };
        let (obs, out) = self.state.on_frame(frame);
        let mut refresh = false;
        for o in obs {
            refresh |= o == Observation::PresenceRefresh;
            self.observe(o);
        }
        self.send_all(out).await;
        if refresh {
            self.ask_presence().await;
        }
    }

    fn observe(&self, o: Observation) {
        if let Observation::Error { code, detail } = &o {
            tracing::debug!(device = self.d.device, ?code, %detail, "server error");
        }
        if let Some(ev) = Event::observed(self.d.user, self.d.device, o) {
            self.rec.record(ev);
        }
    }
}

/// Waits for the next frame, or forever when not connected.
async fn recv(conn: &mut Option<WsConn>) -> Incoming {
    match conn.as_mut() {
        Some(ws) => ws.recv().await,
        None => std::future::pending().await,
    }
}
