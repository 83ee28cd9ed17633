//! A simulated device: one madsim node running a user's app, driven by its workload script.
//!
//! It speaks only the real client protocol (HTTP to api nodes, WebSocket to chat servers)
//! through `nodes::client`, and records what the user observed into the history. The app's
//! local state (cursors, outbox) lives in a `DeviceState` that survives app closes, as a
//! phone's local database does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nodes::client::device::{DeviceState, Observation};
use nodes::client::http::HttpClient;
use nodes::client::ws::{Incoming, WsConn};
use nodes::proto::client::{ChatServerResponse, ClientFrame, LoginResponse, ServerFrame};
use nodes::proto::Id;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use workloads::{Action, BadInput, Step, Target};

use crate::history::Event;
use crate::run::{Counters, Recorder};

/// Heartbeat period (the product's 5 s).
const HEARTBEAT: Duration = Duration::from_millis(nodes::limits::HEARTBEAT_INTERVAL_MS);
/// Friends' presence is asked again this often (repairs a missed change).
const PRESENCE_REFRESH: Duration = Duration::from_secs(60);
/// A write that takes longer than this means the connection is stuck: reconnect.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that brought nothing (not even a `heartbeat_ack`) for this long is dead: a
/// partition or a tunnel raises no TCP error, so silence is the only sign.
const SERVER_SILENT: Duration = Duration::from_millis(3 * nodes::limits::HEARTBEAT_INTERVAL_MS);
/// The whole connect sequence (chat server lookup, WebSocket handshake, welcome) must finish
/// in this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds: the backoff doubles from the minimum to the maximum while
/// attempts fail; each wait is drawn from [backoff/2, backoff] ("equal jitter").
///
/// The cap was 5 s (plus up to half of it). At the 1/1000 `peak-hour` scale, when the liveness
/// phase opened 100,000 apps at once, attempts queued longer in the chat servers' accept
/// queues than the 10 s connect deadline: servers then accepted mostly connections whose
/// devices had already given up, and the devices' retries every ~15 s kept the queues full.
/// Connected devices stalled at ~7,000 per chat server for the rest of the run (a metastable
/// retry storm). With a 30 s cap a 16,000-device herd on one api and one chat server drained
/// after ~80 s; the liveness phase now also spreads its app opens (`run::liveness_spread`).
const BACKOFF_MIN_MS: u64 = 200;
const BACKOFF_MAX_MS: u64 = 30_000;

/// What a device knows before it starts: its login and its user's channels.
pub struct DeviceCtx {
    pub index: u32,
    pub login: LoginResponse,
    pub api: Vec<SocketAddr>,
    pub steps: Vec<Step>,
    /// Friend user index -> (friend user id, 1:1 channel).
    pub friends: BTreeMap<u32, (Id, Id)>,
    /// Group index -> channel, of this user's groups.
    pub groups: BTreeMap<u32, Id>,
    /// Group index -> channel, of every group (to probe one the user is not in).
    pub all_groups: Arc<BTreeMap<u32, Id>>,
    pub recorder: Recorder,
    pub counters: Arc<Counters>,
    pub liveness_at: Duration,
    /// This device opens its app this long after the liveness phase starts (see
    /// `run::liveness_spread`).
    pub liveness_delay: Duration,
    pub seed: u64,
    pub by_message_id: bool,
    /// Bumped by a `disconnect` fault: a connection opened before the bump is torn down, and
    /// both ends see it (a reset, a Wi-Fi switch). A silent death is a short `tunnel` instead.
    pub kick: tokio::sync::watch::Receiver<u64>,
}

struct App {
    ctx: DeviceCtx,
    state: DeviceState,
    conn: Option<WsConn>,
    /// The app is open (heartbeating, by the workload's ground truth).
    open: bool,
    rng: StdRng,
    next_client_msg_id: Id,
    backoff_ms: u64,
    next_connect: Instant,
    /// Connections attempted so far: numbers each `hello`, so servers can tell a stale
    /// connection from the live one.
    connections: u64,
    /// When the current connection last brought a frame.
    last_heard: Instant,
    /// The chat server of the current connection.
    server: Option<u32>,
    /// The `disconnect` count when the current connection opened.
    kicks_at_connect: u64,
    /// False once the fault injector is gone.
    kicks_open: bool,
    /// A server this device just failed to reach or lost: asked to be avoided on reconnect.
    avoid: Option<u32>,
    start: Instant,
}

/// What the script driver hands the device loop.
enum Cue {
    Step(Action),
    Liveness,
}

/// Hands the device loop each scripted step at its time (steps at or after the liveness
/// phase are dropped), then the liveness cue `delay` after the phase starts, from a task of
/// its own.
///
/// madsim's timers cannot be cancelled: every poll of a pending `sleep` adds a heap entry that
/// lives until its deadline. A far-off step sleep polled on every wakeup of the device loop
/// (frames, heartbeats) left a dead entry each time; the timer heap was the largest cost of
/// the 1/1000 `peak-hour` traffic phase (17 % in `Timer::expire`). Here each step's sleep is
/// polled once; the loop waits on a channel, which needs no timer (5,000 users: 8 % less
/// memory, 3 % less time).
fn drive_script(
    steps: Vec<Step>,
    start: Instant,
    liveness_at: Instant,
    delay: Duration,
) -> mpsc::Receiver<Cue> {
    // One cue in flight: the driver sleeps toward the next step only once the loop took this
    // one, as the loop itself did before.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for step in steps {
            let at = start + Duration::from_millis(step.at_ms);
            if at >= liveness_at {
                break;
            }
            tokio::time::sleep_until(at).await;
            if tx.send(Cue::Step(step.action)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep_until(liveness_at + delay).await;
        let _ = tx.send(Cue::Liveness).await;
    });
    rx
}

pub async fn run(ctx: DeviceCtx, start: Instant) {
    let rng =
        StdRng::seed_from_u64(ctx.seed ^ (ctx.index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let state = DeviceState::new(ctx.login.user, ctx.login.device, ctx.by_message_id);
    let mut app = App {
        ctx,
        state,
        conn: None,
        open: false,
        rng,
        next_client_msg_id: 1,
        backoff_ms: BACKOFF_MIN_MS,
        next_connect: start,
        connections: 0,
        last_heard: start,
        server: None,
        kicks_at_connect: 0,
        kicks_open: true,
        avoid: None,
        start,
    };
    app.main_loop().await;
}

impl App {
    fn user(&self) -> Id {
        self.ctx.login.user
    }
    fn device(&self) -> Id {
        self.ctx.login.device
    }

    fn record(&self, ev: Event) {
        self.ctx.recorder.record(ev);
    }

    async fn main_loop(&mut self) {
        let steps = std::mem::take(&mut self.ctx.steps);
        let liveness_at = self.start + self.ctx.liveness_at;
        let mut script = drive_script(steps, self.start, liveness_at, self.ctx.liveness_delay);
        let mut heartbeat = tokio::time::interval_at(self.start + HEARTBEAT, HEARTBEAT);
        let mut presence =
            tokio::time::interval_at(self.start + PRESENCE_REFRESH, PRESENCE_REFRESH);
        let mut liveness_done = false;
        loop {
            if self.open && self.conn.is_none() && Instant::now() >= self.next_connect {
                self.connect().await;
            }
            let want_connect = self.open && self.conn.is_none();
            tokio::select! {
                biased;
                next = script.recv(), if !liveness_done => match next {
                    Some(Cue::Step(action)) => self.on_step(action).await,
                    Some(Cue::Liveness) | None => {
                        liveness_done = true;
                        self.on_liveness().await;
                    }
                },
                incoming = recv(&mut self.conn) => self.on_incoming(incoming).await,
                kicked = self.ctx.kick.changed(), if self.conn.is_some() && self.kicks_open => {
                    match kicked {
                        Ok(()) if *self.ctx.kick.borrow_and_update() > self.kicks_at_connect => {
                            self.lost_connection("disconnected").await
                        }
                        Ok(()) => {}
                        // The fault schedule is over (its sender dropped): no more kicks, and
                        // `changed` would now be ready forever.
                        Err(_) => self.kicks_open = false,
                    }
                }
                _ = heartbeat.tick() => self.on_heartbeat().await,
                _ = presence.tick() => self.ask_presence().await,
                _ = tokio::time::sleep_until(self.next_connect), if want_connect => {}
            }
        }
    }

    async fn connect(&mut self) {
        self.connections += 1;
        let api = self.ctx.api[self.rng.gen_range(0..self.ctx.api.len())];
        let mut http = HttpClient::new(api);
        http.token = Some(self.ctx.login.token.clone());
        let path = match self.avoid {
            Some(s) => format!("/v1/chat-server?avoid={s}"),
            None => "/v1/chat-server".to_string(),
        };
        let mut picked = None;
        let attempt = async {
            let cs: ChatServerResponse = http.get(&path).await?;
            picked = Some(cs.server);
            let mut ws = WsConn::connect(&cs.url).await?;
            ws.send(&ClientFrame::Hello {
                token: self.ctx.login.token.clone(),
                connection: self.connections,
            })
            .await?;
            match tokio::time::timeout(Duration::from_secs(5), ws.recv()).await {
                Ok(Incoming::Frame(ServerFrame::Welcome { server, .. })) => Ok((ws, server)),
                other => Err(nodes::client::ClientError::Ws(format!(
                    "no welcome: {other:?}"
                ))),
            }
        };
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(nodes::client::ClientError::Ws("connect timed out".into())),
        };
        match result {
            Ok((ws, server)) => {
                self.conn = Some(ws);
                self.server = Some(server);
                self.kicks_at_connect = *self.ctx.kick.borrow_and_update();
                self.avoid = None;
                self.last_heard = Instant::now();
                self.backoff_ms = BACKOFF_MIN_MS;
                self.ctx.counters.add_connect();
                self.record(Event::Connected {
                    user: self.user(),
                    device: self.device(),
                    server: format!("chat-{server}"),
                });
                let frames = self.state.on_connected();
                self.send_all(frames).await;
                self.send_frame(ClientFrame::Heartbeat).await;
                self.ctx.counters.add_heartbeat();
                self.ask_presence().await;
            }
            Err(e) => {
                tracing::debug!(device = self.device(), error = %e, "connect failed");
                if picked.is_some() {
                    self.avoid = picked;
                }
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
        tracing::trace!(device = self.device(), ?frame, "send");
        if let Some(ws) = self.conn.as_mut() {
            match tokio::time::timeout(WRITE_TIMEOUT, ws.send(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.lost_connection("send failed").await,
                Err(_) => self.lost_connection("send timed out").await,
            }
        }
    }

    async fn send_all(&mut self, frames: Vec<ClientFrame>) {
        for f in frames {
            self.send_frame(f).await;
        }
    }

    async fn lost_connection(&mut self, reason: &str) {
        if let Some(ws) = self.conn.take() {
            drop(ws);
            self.avoid = self.server.take();
            self.record(Event::Disconnected {
                user: self.user(),
                device: self.device(),
                reason: reason.into(),
            });
            self.schedule_reconnect();
        }
    }

    async fn close_app(&mut self, logout: bool) {
        if !self.open {
            return;
        }
        if logout {
            self.send_frame(ClientFrame::Logout).await;
        }
        if let Some(ws) = self.conn.take() {
            // The close handshake waits for the server; do not let a busy server hold the app.
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close()).await;
            self.record(Event::Disconnected {
                user: self.user(),
                device: self.device(),
                reason: if logout { "logout" } else { "app closed" }.into(),
            });
        }
        self.open = false;
        self.record(Event::HeartbeatStop {
            user: self.user(),
            device: self.device(),
        });
    }

    fn open_app(&mut self) {
        if self.open {
            return;
        }
        self.open = true;
        self.next_connect = Instant::now();
        self.backoff_ms = BACKOFF_MIN_MS;
        self.record(Event::HeartbeatStart {
            user: self.user(),
            device: self.device(),
        });
    }

    /// The liveness phase: every app opens. A device already connected does nothing more: a
    /// forced resync here would deliver whatever the servers failed to fan out and hide it
    /// from no_loss (it hid fanouts stuck behind a slow push node for ~90 s).
    async fn on_liveness(&mut self) {
        self.open_app();
    }

    async fn on_step(&mut self, action: Action) {
        tracing::trace!(device = self.device(), ?action, "step");
        match action {
            Action::Online => self.open_app(),
            Action::Offline { logout } => self.close_app(logout).await,
            Action::Send { to, chars } => self.send_message(to, chars).await,
            Action::SendAndClose { to, chars } => {
                self.send_message(to, chars).await;
                self.close_app(false).await;
            }
            Action::DropConnection => self.lost_connection("dropped by the network").await,
            Action::Bad(b) => self.bad_input(b).await,
        }
    }

    fn channel_of(&self, to: Target) -> Option<Id> {
        match to {
            Target::Direct(f) => self.ctx.friends.get(&f).map(|(_, c)| *c),
            Target::Group(g) => self.ctx.groups.get(&g).copied(),
        }
    }

    fn text(&mut self, chars: u32) -> String {
        // Mostly ASCII with some multi-byte characters, so bytes and characters differ.
        let alphabet = ['a', 'b', 'c', ' ', 'é', 'ж', '字', '😀'];
        (0..chars)
            .map(|_| alphabet[self.rng.gen_range(0..alphabet.len())])
            .collect()
    }

    async fn send_message(&mut self, to: Target, chars: u32) {
        if !self.open {
            return;
        }
        let Some(channel) = self.channel_of(to) else {
            return;
        };
        let text = self.text(chars);
        self.send_text(channel, text).await;
    }

    async fn send_text(&mut self, channel: Id, text: String) {
        let client_msg_id = self.next_client_msg_id;
        self.next_client_msg_id += 1;
        self.record(Event::Send {
            user: self.user(),
            device: self.device(),
            channel,
            client_msg_id,
            bytes: text.len() as u64,
            chars: text.chars().count() as u64,
        });
        self.ctx.counters.add_send();
        self.ctx
            .counters
            .add_text(text.chars().count() as u64, text.len() as u64);
        let frame = self.state.send(client_msg_id, channel, text);
        self.send_frame(frame).await;
    }

    async fn bad_input(&mut self, b: BadInput) {
        if !self.open || self.conn.is_none() {
            return;
        }
        self.ctx.counters.add_bad_input();
        match b {
            BadInput::TooLong => {
                let Some(channel) = self.ctx.friends.values().next().map(|(_, c)| *c) else {
                    return;
                };
                let text = "x".repeat(nodes::limits::MESSAGE_CHARS_MAX + 1);
                self.send_text(channel, text).await;
            }
            BadInput::NotMember(g) => {
                if let Some(channel) = self.ctx.all_groups.get(&g).copied() {
                    self.send_text(channel, "not my group".into()).await;
                }
            }
            BadInput::UnknownChannel => self.send_text(u64::MAX / 2, "nowhere".into()).await,
            BadInput::MalformedJson => self.send_raw(Message::text("{\"type\":\"send\",")).await,
            BadInput::BinaryFrame => self.send_raw(Message::binary(vec![0u8, 1, 2, 3])).await,
        }
    }

    async fn send_raw(&mut self, m: Message) {
        if let Some(ws) = self.conn.as_mut() {
            match tokio::time::timeout(WRITE_TIMEOUT, ws.send_raw(m)).await {
                Ok(Ok(())) => {}
                _ => self.lost_connection("send failed").await,
            }
        }
    }

    async fn on_heartbeat(&mut self) {
        if self.conn.is_none() {
            return;
        }
        if Instant::now().duration_since(self.last_heard) > SERVER_SILENT {
            self.lost_connection("server silent").await;
            return;
        }
        self.send_frame(ClientFrame::Heartbeat).await;
        self.ctx.counters.add_heartbeat();
        let mut frames = self.state.take_reads();
        frames.extend(self.state.on_tick());
        self.send_all(frames).await;
    }

    async fn ask_presence(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let users = self.ctx.friends.values().map(|(u, _)| *u).collect();
        self.send_frame(ClientFrame::PresenceQuery { users }).await;
    }

    async fn on_incoming(&mut self, incoming: Incoming) {
        tracing::trace!(device = self.device(), ?incoming, "incoming");
        let frame = match incoming {
            Incoming::Frame(f) => {
                self.last_heard = Instant::now();
                f
            }
            Incoming::Unparsed(t) => {
                tracing::warn!(device = self.device(), frame = %t, "unparsed server frame");
                return;
            }
            Incoming::Closed => {
                self.lost_connection("closed by server").await;
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
        let counters = &self.ctx.counters;
        match &o {
            Observation::Ack { .. } => counters.add_ack(),
            Observation::Deliver(_) => counters.add_deliver(),
            Observation::Presence { .. } => counters.add_presence(),
            Observation::Error { code, .. } => counters.add_error(code.as_str()),
            Observation::SendFailed { .. } | Observation::PresenceRefresh => {}
        }
        if let Some(ev) = Event::observed(self.user(), self.device(), o) {
            self.record(ev);
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
