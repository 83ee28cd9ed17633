//! The device runtime: one device's connection lifecycle, the same code in both worlds and
//! for every client (the simulated devices, the load driver's real clients, `chat follow`).
//!
//! It owns what every client must do the same way: ask the api for a chat server (avoiding the
//! one just lost), connect, `hello`, wait for `welcome`; heartbeat every 5 s and treat 15 s of
//! silence as a dead connection (a partition or tunnel raises no TCP error); reconnect with a
//! doubling, jittered backoff; feed every server frame to [`DeviceState`] and send what it
//! answers; ask friends' presence at connect, on `presence_refresh` and periodically.
//!
//! What differs between clients comes in through three small interfaces:
//! - [`Command`]s on a bounded channel: the script or driver that decides when the app opens,
//!   closes and sends (the workload script, the load driver's open-loop cues, a terminal);
//! - an [`Observer`]: where [`DeviceEvent`]s go (the simulation's history recorder, the load
//!   driver's history file, the CLI's output);
//! - [`Settings`] and the RNG: api addresses, source address, backoff, numbering.
//!   Time is `tokio::time` (simulated under madsim); the RNG is passed in, never thread-local.
//!
//! It does not decide what to send or when, does not know the history format, and does not
//! persist anything: the app's local state ([`DeviceState`]) lives as long as the runtime.
//! One-shot exchanges (the CLI's `send` and `presence`) use [`open_session`] alone.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::device::{sent_ids, DeviceState, Observation};
use super::http::HttpClient;
use super::ws::{Incoming, WsConn, EARLY_FRAMES_MAX};
use super::ClientError;
use crate::client_tls::ClientTls;
use crate::limits::HEARTBEAT_INTERVAL_MS;
use crate::proto::client::{ChatServerResponse, ClientFrame, ErrorCode, ServerFrame};
use crate::proto::Id;

/// Heartbeat period (the product's 5 s).
pub const HEARTBEAT: Duration = Duration::from_millis(HEARTBEAT_INTERVAL_MS);
/// Friends' presence is asked again this often by default (repairs a missed change).
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(60);
/// A write that takes longer than this means the connection is stuck: reconnect.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that brought nothing (not even a `heartbeat_ack`) for this long is dead: a
/// partition or a tunnel raises no TCP error, so silence is the only sign.
pub const SERVER_SILENT: Duration = Duration::from_millis(3 * HEARTBEAT_INTERVAL_MS);
/// The whole connect sequence (chat server lookup, WebSocket handshake, welcome) must finish
/// in this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After `hello`, the server must answer `welcome` within this long.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
/// The close handshake at app close waits for the server at most this long: a busy server
/// must not hold the app.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default reconnect backoff bounds: the backoff doubles from the minimum to the maximum while
/// attempts fail; each wait is drawn from [backoff/2, backoff] ("equal jitter").
///
/// The cap was 5 s (plus up to half of it). At the 1/1000 `peak-hour` scale, when the liveness
/// phase opened 100,000 apps at once, attempts queued longer in the chat servers' accept
/// queues than the 10 s connect deadline: servers then accepted mostly connections whose
/// devices had already given up, and the devices' retries every ~15 s kept the queues full.
/// Connected devices stalled at ~7,000 per chat server for the rest of the run (a metastable
/// retry storm). With a 30 s cap a 16,000-device herd on one api and one chat server drained
/// after ~80 s; the simulation's liveness phase also spreads its app opens.
pub const BACKOFF_MIN_MS: u64 = 200;
pub const BACKOFF_MAX_MS: u64 = 30_000;

/// Who the device is: what `POST /v1/login` answered.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: Id,
    pub device: Id,
    pub token: String,
}

/// How a device connects and paces itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// api nodes; each connect asks one drawn at random.
    pub api: Vec<SocketAddr>,
    /// The local address to connect from (a load driver spreads its clients over many);
    /// `None` lets the system choose. Ignored in the simulation (a node has one address).
    pub source_ip: Option<IpAddr>,
    /// https and `wss://` trusting these roots; `None`: plain http (a `wss://` chat server
    /// is then checked against the public web's roots).
    pub tls: Option<ClientTls>,
    /// The name the api's certificate must hold (a DNS name); default: each api address.
    pub api_name: Option<String>,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Ask friends' presence again this often while connected (`None`: only at connect and
    /// when the server asks).
    pub presence_refresh: Option<Duration>,
    /// What to do with heartbeat ticks missed while the loop was busy (a slow connect).
    pub missed_heartbeats: MissedTickBehavior,
    /// `hello.connection` of the first connection; each later one adds 1. Servers keep the
    /// highest, so a client that shares a device across processes starts from the clock.
    pub first_connection: u64,
    /// `client_msg_id` of the first send; each later one adds 1 (unique per device).
    pub first_client_msg_id: Id,
}

impl Settings {
    /// The defaults every client starts from (the simulated devices use them unchanged).
    pub fn new(api: Vec<SocketAddr>) -> Self {
        Self {
            api,
            source_ip: None,
            tls: None,
            api_name: None,
            backoff_min_ms: BACKOFF_MIN_MS,
            backoff_max_ms: BACKOFF_MAX_MS,
            presence_refresh: Some(PRESENCE_REFRESH),
            missed_heartbeats: MissedTickBehavior::Burst,
            first_connection: 1,
            first_client_msg_id: 1,
        }
    }
}

/// The text of a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    Given(String),
    /// `chars` characters drawn from the device's RNG (see [`random_text`]).
    Random {
        chars: u32,
    },
}

/// A send asked of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendCmd {
    pub channel: Id,
    pub text: Text,
    /// When the driver meant it to happen, in the driver's own time (an open-loop load driver
    /// stamps its sends so queueing in the driver counts as latency). Passed to the observer.
    pub due: Option<u64>,
}

/// A frame a client should never send, to see the server refuse it (only while connected).
#[derive(Debug, Clone, PartialEq)]
pub enum BadFrame {
    /// A send the server must refuse (too long, not a member, unknown channel).
    Send { channel: Id, text: String },
    /// A raw WebSocket message (malformed JSON, a binary frame).
    Raw(Message),
}

/// What the driver asks of the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// The app opens: it heartbeats and connects (a no-op if open).
    Open,
    /// The app closes; with `logout` it tells the server first (presence goes offline at once).
    Close { logout: bool },
    /// A send (dropped while the app is closed; queued in the outbox while disconnected).
    Send(SendCmd),
    /// A send, then the app closes before the ack can arrive.
    SendAndClose(SendCmd),
    /// The network drops the connection (the device notices; it reconnects).
    DropConnection,
    /// A malformed or forbidden frame (only while connected).
    Bad(BadFrame),
    /// The users whose presence to ask for.
    SetFriends(Vec<Id>),
    /// End the runtime.
    Stop,
}

/// What happened on the device, for its observer.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    /// The app opened: it heartbeats from now on (the ground truth presence is judged by).
    AppOpened,
    /// The app closed (after its `Disconnected`, if it was connected).
    AppClosed {
        logout: bool,
    },
    Connected {
        server: u32,
    },
    ConnectFailed(ConnectError),
    Disconnected {
        reason: &'static str,
    },
    /// A send handed to the client library (first attempt only; retries are not new sends).
    Sending {
        channel: Id,
        client_msg_id: Id,
        bytes: u64,
        chars: u64,
        /// `device::text_digest` of the text.
        digest: String,
        due: Option<u64>,
    },
    /// A send held back by a running backoff (a server's retry-after hint) instead of going
    /// out; `Released` says when it does.
    Held {
        client_msg_id: Id,
    },
    /// Unanswered sends went out again: held ones (a backoff's wait ended, or the one before
    /// was answered), refused ones at a tick, or all of them after a reconnect.
    Released {
        client_msg_ids: Vec<Id>,
    },
    HeartbeatSent,
    /// A `sync` frame went out (its answer is `Observed(Observation::Synced)`, in order).
    SyncAsked,
    /// A [`BadFrame`] is about to go out.
    BadInput,
    /// What the device state machine observed (acks, deliveries, presence, errors).
    Observed(Observation),
}

/// Whether the runtime goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Where a device's events go. Called in the device loop: a slow observer slows the device.
pub trait Observer: Send {
    fn observe(&mut self, ev: DeviceEvent) -> impl Future<Output = Flow> + Send;
}

/// Why the runtime ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `Command::Stop`, or the observer said stop; `connected` tells whether a connection
    /// was up at the end.
    Stopped { connected: bool },
    /// The server refused the device's token for good (bad, expired, revoked): the app must
    /// log in again. Retrying would not help.
    LoggedOut { code: ErrorCode, detail: String },
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub error: String,
    /// The error code, when a server refused (api or chat server).
    pub refused: Option<ErrorCode>,
    /// The chat server the api picked, if it got that far (to avoid on the next attempt).
    pub server: Option<u32>,
}

impl ConnectError {
    /// A refusal that no retry can fix: the token is no good.
    pub fn ends_login(&self) -> bool {
        self.refused.is_some_and(ErrorCode::ends_login)
    }
}

/// One connection attempt: ask the api `api` reaches for a chat server (avoiding `avoid`
/// unless it is the only one), connect from `source_ip` (over TLS with `api`'s roots when
/// the server is `wss://`), say `hello` as connection number `connection`, and wait for
/// `welcome`, all within [`CONNECT_TIMEOUT`]. Answers the connection and the server's number.
pub async fn open_session(
    api: &HttpClient,
    token: &str,
    avoid: Option<u32>,
    connection: u64,
    source_ip: Option<IpAddr>,
) -> Result<(WsConn, u32), ConnectError> {
    let mut http = api.clone();
    http.token = Some(token.to_string());
    let path = match avoid {
        Some(s) => format!("/v1/chat-server?avoid={s}"),
        None => "/v1/chat-server".to_string(),
    };
    let mut picked = None;
    let attempt = async {
        let cs: ChatServerResponse = http.get(&path).await.map_err(refusal)?;
        picked = Some(cs.server);
        let mut ws = WsConn::connect_from(&cs.url, source_ip, http.tls.as_ref())
            .await
            .map_err(refusal)?;
        let hello = ClientFrame::Hello {
            token: token.to_string(),
            connection,
        };
        ws.send(&hello).await.map_err(refusal)?;
        // Presence and messages may come before `welcome` (the session is live as soon as it
        // is registered): kept for the caller's first `recv`, not a failed connect.
        let mut early = Vec::new();
        let welcome = async {
            loop {
                match ws.recv().await {
                    Incoming::Frame(ServerFrame::Welcome { server, .. }) => return Ok(server),
                    Incoming::Frame(ServerFrame::Error { code, detail, .. }) => {
                        return Err((format!("refused: {}: {detail}", code.as_str()), Some(code)))
                    }
                    Incoming::Frame(f) if early.len() < EARLY_FRAMES_MAX => early.push(f),
                    Incoming::Frame(_) => {
                        return Err(("too many frames before welcome".to_string(), None))
                    }
                    other => return Err((format!("no welcome: {other:?}"), None)),
                }
            }
        };
        match tokio::time::timeout(WELCOME_TIMEOUT, welcome).await {
            Ok(Ok(server)) => {
                // Kept for the first `recv`s, in arrival order.
                for f in early {
                    ws.keep_early(f);
                }
                Ok((ws, server))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(("no welcome: timed out".to_string(), None)),
        }
    };
    let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(("connect timed out".to_string(), None)),
    };
    result.map_err(|(error, refused)| ConnectError {
        error,
        refused,
        server: picked,
    })
}

fn refusal(e: ClientError) -> (String, Option<ErrorCode>) {
    let code = match &e {
        ClientError::Refused { code, .. } => Some(*code),
        _ => None,
    };
    (e.to_string(), code)
}

/// A text of `chars` characters drawn from `rng`: mostly ASCII with some multi-byte
/// characters, so bytes and characters differ.
pub fn random_text(rng: &mut StdRng, chars: u32) -> String {
    let alphabet = ['a', 'b', 'c', ' ', 'é', 'ж', '字', '😀'];
    (0..chars)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
        .collect()
}

/// One device: its state, its connection and its pacing.
pub struct DeviceRuntime<O> {
    login: Login,
    settings: Settings,
    state: DeviceState,
    observer: O,
    rng: StdRng,
    conn: Option<WsConn>,
    /// The app is open (heartbeating).
    open: bool,
    friends: Vec<Id>,
    next_client_msg_id: Id,
    backoff_ms: u64,
    next_connect: Instant,
    /// `hello.connection` of the last attempt.
    connection: u64,
    /// When the current connection last brought a frame.
    last_heard: Instant,
    /// The chat server of the current connection.
    server: Option<u32>,
    /// A server this device just failed to reach or lost: asked to be avoided on reconnect.
    avoid: Option<u32>,
    /// Bumped from outside to tear down the connection (a simulated `disconnect` fault: a
    /// reset both ends see). A connection opened after the bump stays.
    disconnects: Option<watch::Receiver<u64>>,
    /// The `disconnects` count when the current connection opened.
    disconnects_at_connect: u64,
    /// When the sends held by a server's retry-after hint go out (`DeviceState::back_off`).
    release_held_at: Option<Instant>,
    /// Set when the loop must end.
    exit: Option<Exit>,
}

impl<O: Observer> DeviceRuntime<O> {
    /// A closed app with no connection; `Command::Open` opens it.
    pub fn new(
        login: Login,
        settings: Settings,
        state: DeviceState,
        rng: StdRng,
        observer: O,
    ) -> Self {
        let now = Instant::now();
        Self {
            next_client_msg_id: settings.first_client_msg_id,
            connection: settings.first_connection.saturating_sub(1),
            backoff_ms: settings.backoff_min_ms,
            login,
            settings,
            state,
            observer,
            rng,
            conn: None,
            open: false,
            friends: Vec::new(),
            next_connect: now,
            last_heard: now,
            server: None,
            avoid: None,
            disconnects: None,
            disconnects_at_connect: 0,
            release_held_at: None,
            exit: None,
        }
    }

    /// The friends whose presence the device asks for.
    pub fn with_friends(mut self, friends: Vec<Id>) -> Self {
        self.friends = friends;
        self
    }

    /// Tears the connection down whenever the watched count goes up (see `disconnects`).
    pub fn with_disconnects(mut self, rx: watch::Receiver<u64>) -> Self {
        self.disconnects = Some(rx);
        self
    }

    /// Runs until `Command::Stop`, the observer's `Flow::Stop` or a lost login. Heartbeat
    /// and presence ticks are phased from `ticks_from`. When the command channel closes the
    /// device goes on as it is (an open app stays open and connected).
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, ticks_from: Instant) -> Exit {
        let mut heartbeat = tokio::time::interval_at(ticks_from + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(self.settings.missed_heartbeats);
        let refresh = self.settings.presence_refresh;
        // A year stands for "never": the branch is disabled, so the interval is never polled.
        let every = refresh.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let mut presence = tokio::time::interval_at(ticks_from + every, every);
        let mut commands_open = true;
        let mut disconnects_open = self.disconnects.is_some();
        loop {
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            if self.open && self.conn.is_none() && Instant::now() >= self.next_connect {
                self.connect().await;
                continue;
            }
            let want_connect = self.open && self.conn.is_none();
            tokio::select! {
                biased;
                next = commands.recv(), if commands_open => match next {
                    Some(c) => self.on_command(c).await,
                    None => commands_open = false,
                },
                incoming = recv(&mut self.conn) => self.on_incoming(incoming).await,
                bumped = changed(&mut self.disconnects), if self.conn.is_some() && disconnects_open => {
                    match bumped {
                        Some(n) if n > self.disconnects_at_connect => {
                            self.lost_connection("disconnected").await
                        }
                        Some(_) => {}
                        // The sender is gone: no more bumps, and `changed` would now be ready
                        // forever.
                        None => disconnects_open = false,
                    }
                }
                _ = heartbeat.tick() => self.on_heartbeat().await,
                _ = presence.tick(), if refresh.is_some() => self.ask_presence().await,
                _ = tokio::time::sleep_until(self.next_connect), if want_connect => {}
                _ = sleep_until_some(self.release_held_at), if self.release_held_at.is_some() && self.conn.is_some() => {
                    self.release_held_at = None;
                    let frames = self.state.release_held();
                    self.send_resends(frames).await;
                }
            }
        }
    }

    /// Sends `frames`; the sends among them (all resends: none is new) are reported as
    /// `Released` once written.
    async fn send_resends(&mut self, frames: Vec<ClientFrame>) {
        let client_msg_ids = sent_ids(&frames);
        self.send_all(frames).await;
        if !client_msg_ids.is_empty() && self.conn.is_some() {
            self.emit(DeviceEvent::Released { client_msg_ids }).await;
        }
    }

    async fn emit(&mut self, ev: DeviceEvent) {
        if self.observer.observe(ev).await == Flow::Stop && self.exit.is_none() {
            self.exit = Some(Exit::Stopped {
                connected: self.conn.is_some(),
            });
        }
    }

    async fn on_command(&mut self, c: Command) {
        tracing::trace!(device = self.login.device, ?c, "command");
        match c {
            Command::Open => self.open_app().await,
            Command::Close { logout } => self.close_app(logout).await,
            Command::Send(s) => self.send_message(s).await,
            Command::SendAndClose(s) => {
                self.send_message(s).await;
                self.close_app(false).await;
            }
            Command::DropConnection => self.lost_connection("dropped by the network").await,
            Command::Bad(b) => self.bad_input(b).await,
            Command::SetFriends(f) => self.friends = f,
            Command::Stop => {
                self.exit = Some(Exit::Stopped {
                    connected: self.conn.is_some(),
                })
            }
        }
    }

    async fn connect(&mut self) {
        self.connection += 1;
        let api = self.settings.api[self.rng.gen_range(0..self.settings.api.len())];
        let api = HttpClient::new(api)
            .with_tls(self.settings.tls.clone(), self.settings.api_name.clone());
        let result = open_session(
            &api,
            &self.login.token,
            self.avoid,
            self.connection,
            self.settings.source_ip,
        )
        .await;
        match result {
            Ok((ws, server)) => {
                self.conn = Some(ws);
                self.server = Some(server);
                self.disconnects_at_connect = self
                    .disconnects
                    .as_mut()
                    .map_or(0, |rx| *rx.borrow_and_update());
                self.avoid = None;
                self.last_heard = Instant::now();
                self.backoff_ms = self.settings.backoff_min_ms;
                self.release_held_at = None; // `on_connected` sends everything unanswered.
                self.emit(DeviceEvent::Connected { server }).await;
                let frames = self.state.on_connected();
                self.send_resends(frames).await;
                self.send_frame(ClientFrame::Heartbeat).await;
                self.emit(DeviceEvent::HeartbeatSent).await;
                self.ask_presence().await;
            }
            Err(e) => {
                tracing::debug!(device = self.login.device, error = %e.error, "connect failed");
                if e.server.is_some() {
                    self.avoid = e.server;
                }
                if e.ends_login() {
                    self.exit = Some(Exit::LoggedOut {
                        code: e.refused.expect("ends_login implies a code"),
                        detail: e.error.clone(),
                    });
                }
                self.emit(DeviceEvent::ConnectFailed(e)).await;
                self.schedule_reconnect();
            }
        }
    }

    fn schedule_reconnect(&mut self) {
        let wait = self.rng.gen_range(self.backoff_ms / 2..=self.backoff_ms);
        self.next_connect = Instant::now() + Duration::from_millis(wait);
        self.backoff_ms = (self.backoff_ms * 2).min(self.settings.backoff_max_ms);
    }

    async fn send_frame(&mut self, frame: ClientFrame) {
        tracing::trace!(device = self.login.device, ?frame, "send");
        let sync = matches!(frame, ClientFrame::Sync { .. });
        if let Some(ws) = self.conn.as_mut() {
            let write = ws.send(&frame);
            let written = if frame == ClientFrame::Heartbeat {
                tokio::time::timeout(WRITE_TIMEOUT, crate::net::heartbeat_write(write)).await
            } else {
                tokio::time::timeout(WRITE_TIMEOUT, write).await
            };
            match written {
                Ok(Ok(())) if sync => self.emit(DeviceEvent::SyncAsked).await,
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

    async fn lost_connection(&mut self, reason: &'static str) {
        if let Some(ws) = self.conn.take() {
            drop(ws);
            // Held sends go out with everything unanswered at the next connect.
            self.release_held_at = None;
            self.avoid = self.server.take();
            self.emit(DeviceEvent::Disconnected { reason }).await;
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
        self.release_held_at = None;
        if let Some(ws) = self.conn.take() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close()).await;
            let reason = if logout { "logout" } else { "app closed" };
            self.emit(DeviceEvent::Disconnected { reason }).await;
        }
        self.open = false;
        self.emit(DeviceEvent::AppClosed { logout }).await;
    }

    async fn open_app(&mut self) {
        if self.open {
            return;
        }
        self.open = true;
        self.next_connect = Instant::now();
        self.backoff_ms = self.settings.backoff_min_ms;
        self.emit(DeviceEvent::AppOpened).await;
    }

    async fn send_message(&mut self, s: SendCmd) {
        if !self.open {
            return;
        }
        let text = match s.text {
            Text::Given(t) => t,
            Text::Random { chars } => random_text(&mut self.rng, chars),
        };
        self.send_text(s.channel, text, s.due).await;
    }

    async fn send_text(&mut self, channel: Id, text: String, due: Option<u64>) {
        let client_msg_id = self.next_client_msg_id;
        self.next_client_msg_id += 1;
        self.emit(DeviceEvent::Sending {
            channel,
            client_msg_id,
            bytes: text.len() as u64,
            chars: text.chars().count() as u64,
            digest: super::device::text_digest(&text),
            due,
        })
        .await;
        match self.state.send(client_msg_id, channel, text) {
            Some(frame) => self.send_frame(frame).await,
            None => self.emit(DeviceEvent::Held { client_msg_id }).await,
        }
    }

    async fn bad_input(&mut self, b: BadFrame) {
        if !self.open || self.conn.is_none() {
            return;
        }
        self.emit(DeviceEvent::BadInput).await;
        match b {
            BadFrame::Send { channel, text } => self.send_text(channel, text, None).await,
            BadFrame::Raw(m) => self.send_raw(m).await,
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
        self.emit(DeviceEvent::HeartbeatSent).await;
        let mut frames = self.state.take_reads();
        frames.extend(self.state.on_tick());
        self.send_resends(frames).await;
    }

    async fn ask_presence(&mut self) {
        if self.conn.is_none() || self.friends.is_empty() {
            return;
        }
        let users = self.friends.clone();
        self.send_frame(ClientFrame::PresenceQuery { users }).await;
    }

    async fn on_incoming(&mut self, incoming: Incoming) {
        tracing::trace!(device = self.login.device, ?incoming, "incoming");
        let frame = match incoming {
            Incoming::Frame(f) => {
                self.last_heard = Instant::now();
                f
            }
            Incoming::Unparsed(t) => {
                tracing::warn!(device = self.login.device, frame = %t, "unparsed server frame");
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
            if let Observation::Error { code, detail, .. } = &o {
                if code.ends_login() && self.exit.is_none() {
                    self.exit = Some(Exit::LoggedOut {
                        code: *code,
                        detail: detail.clone(),
                    });
                }
            }
            self.emit(DeviceEvent::Observed(o)).await;
        }
        // Sends in the answer are held ones going out again (a backoff draining).
        self.send_resends(out).await;
        if let Some(ms) = self.state.take_backoff() {
            // Jitter, as for reconnects: devices refused together do not come back together.
            let wait = self.rng.gen_range(ms / 2..=ms);
            self.release_held_at = Some(Instant::now() + Duration::from_millis(wait));
        }
        if refresh {
            self.ask_presence().await;
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

/// The watched count after its next change; `None` once its sender is gone.
async fn changed(rx: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    let rx = rx.as_mut()?;
    match rx.changed().await {
        Ok(()) => Some(*rx.borrow_and_update()),
        Err(_) => None,
    }
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
