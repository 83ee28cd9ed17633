//! Chat server listeners and shared state: the WebSocket listener for devices, the RPC
//! listener for other nodes (`Deliver`, `PresenceFanout`), and the discovery lease loop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;

use super::validate::Buckets;
use crate::auth::TokenKey;
use crate::canary::Canary;
use crate::cluster::Peers;

/// A device's rate buckets, shared by its connections on this server. A std mutex: a few
/// arithmetic operations, never held across an await.
pub type SharedBuckets = Arc<Mutex<Buckets>>;
use crate::limits::{
    BUCKETS_KEPT_MAX, BUCKETS_KEPT_MS, DISCOVERY_LEASE_MS, DISCOVERY_RENEW_MS, SESSION_OUTBOX_MAX,
};
use crate::metrics::Metrics;
use crate::net::{self, Stream};
use crate::proto::client::{ErrorCode, PresenceStatus, ServerFrame};
use crate::proto::internal::{ChatServerInfo, Request, Response};
use crate::proto::Id;
use crate::rpc;

#[derive(Clone)]
pub struct ChatConfig {
    pub server: u32,
    pub ws_listen: SocketAddr,
    pub rpc_listen: SocketAddr,
    /// Addresses other nodes and clients use to reach this server.
    pub ws_advertise: String,
    pub rpc_advertise: String,
    pub peers: Arc<Peers>,
    pub token_key: TokenKey,
    pub metrics: Arc<Metrics>,
    /// `wss://` instead of `ws://` (`[client_tls]`).
    pub tls: Option<crate::client_tls::ServerTls>,
    /// Sends committed at once; past it `overloaded` (`limits::SENDS_IN_FLIGHT_MAX`).
    pub sends_in_flight_max: usize,
    /// With a commit latency target the limit adapts below `sends_in_flight_max`
    /// (`chat::admission`); without, it is fixed.
    pub admission_target: Option<std::time::Duration>,
}

/// What a session's writer task is asked to do. Kept to 16 bytes: every session's queue
/// allocates its slots in blocks of 32 up front (tokio mpsc), an idle connection's largest
/// cost after its read buffer when frames were stored inline (2.6 KB per connection).
#[derive(Debug)]
pub enum Outbound {
    /// Shared: a fanout queues one frame to every local recipient.
    Frame(Arc<ServerFrame>),
    /// Send this error (code, detail), then close the connection.
    Close(Box<(ErrorCode, String)>),
}

/// Ends a session from outside with a reason. The session's writer sends the reason ahead of
/// anything still queued (a full queue is often why) and closes; its reader stops.
///
/// Each subscriber gets its own watch channel, woken in subscription order. One channel with
/// several waiting receivers would not do: tokio's watch parks each waiting receiver on one of
/// 8 `Notify` slots chosen by tokio's thread-local RNG and wakes the slots in index order, so
/// the wake order (and with it madsim's schedule) would follow that RNG, which tokio seeds from
/// a process-wide counter: a second simulation in the same process would diverge.
#[derive(Debug)]
pub struct Closer {
    /// The reason once closed, and one sender per subscriber.
    inner: std::sync::Mutex<CloserInner>,
}

type CloseReason = Option<(ErrorCode, String)>;

#[derive(Debug, Default)]
struct CloserInner {
    reason: CloseReason,
    subscribers: Vec<tokio::sync::watch::Sender<CloseReason>>,
}

impl Closer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: std::sync::Mutex::new(CloserInner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CloserInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes with `code`; later calls keep the first reason.
    pub fn close(&self, code: ErrorCode, detail: impl Into<String>) {
        let mut inner = self.lock();
        if inner.reason.is_some() {
            return;
        }
        let reason = Some((code, detail.into()));
        inner.reason = reason.clone();
        for s in &inner.subscribers {
            // Never fails; a receiver that is gone just does not look.
            s.send_replace(reason.clone());
        }
    }

    /// A receiver that sees the reason once `close` is called (like `watch::Sender::subscribe`,
    /// a reason set before subscribing counts as seen).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<CloseReason> {
        let mut inner = self.lock();
        let (tx, rx) = tokio::sync::watch::channel(inner.reason.clone());
        inner.subscribers.push(tx);
        rx
    }
}

/// One connected device, as the rest of the server sees it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub user: Id,
    pub epoch: u64,
    /// The device's connection number (from `hello`).
    pub connection: u64,
    pub tx: mpsc::Sender<Outbound>,
    /// Ends the session from outside (slow consumer, replaced by a newer connection).
    pub closer: Arc<Closer>,
    /// When the device last heartbeated here, or connected if it has not yet (Unix ms),
    /// re-asserted to a presence node that restarted.
    pub last_heartbeat_ms: Arc<AtomicU64>,
}

/// Most departed devices a chat server remembers for presence re-assertion (about 40 bytes
/// each).
const DEPARTED_MAX: usize = 100_000;

/// State shared by all tasks of one chat server.
pub struct ChatState {
    pub cfg: ChatConfig,
    /// Device -> its session here. A std mutex: never held across an await.
    sessions: Mutex<BTreeMap<Id, SessionHandle>>,
    next_epoch: AtomicU64,
    /// Set while this server holds no discovery lease: peers no longer route to it, so it
    /// takes no device and has closed the ones it had (they reconnect elsewhere and sync).
    fenced: std::sync::atomic::AtomicBool,
    /// When the discovery lease was last renewed (answers `LeaseHeld`). A std mutex: short.
    /// None until the first renewal: a server just started holds no lease yet.
    last_renewed: Mutex<Option<tokio::time::Instant>>,
    /// Per presence node (by index): its boot time last seen, and whether it was seen warming
    /// up since.
    presence_boot: Mutex<BTreeMap<usize, (Option<u64>, bool)>>,
    /// Errors sent to devices, by code (answered to `ChatStats`). A std mutex: short updates.
    errors: Mutex<BTreeMap<ErrorCode, u64>>,
    /// Each device's rate buckets, shared by all its connections here, and when its last
    /// connection closed (None while one is open): kept `BUCKETS_KEPT_MS` after that, so
    /// that reconnecting (or opening a second connection) does not refill them. A std mutex:
    /// short updates.
    buckets: Mutex<BTreeMap<Id, (SharedBuckets, Option<u64>)>>,
    /// Devices whose connection here ended without a logout: (user, last heartbeat, Unix ms).
    /// Presence still counts such a device until its heartbeats time out, so a presence node
    /// that restarts hears of it in the re-assertion too (a device between two connections
    /// is on no server). At most `DEPARTED_MAX`; entries past `PRESENCE_TIMEOUT_MS` go first.
    departed: Mutex<BTreeMap<Id, (Id, u64)>>,
    /// Open WebSocket connections by source address (`WS_CONNECTIONS_PER_ADDR_MAX`); an
    /// address leaves the map with its last connection. A std mutex: short updates.
    per_addr: Mutex<BTreeMap<std::net::IpAddr, u32>>,
    /// Sessions' read cursors waiting for the next batched write (`cursors`).
    pub cursors: Arc<super::cursors::CursorBatcher>,
    /// Admission of sends being committed (`ChatConfig::sends_in_flight_max`).
    pub sends_in_flight: Arc<super::admission::Admission>,
}

/// One open WebSocket connection's place in its source address's count; given back on drop.
pub struct AddrSlot {
    state: Arc<ChatState>,
    addr: std::net::IpAddr,
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        let mut m = self
            .state
            .per_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

impl ChatState {
    pub fn peers(&self) -> &Arc<Peers> {
        &self.cfg.peers
    }

    /// A place for one more connection from `addr`; `None` when it holds
    /// `WS_CONNECTIONS_PER_ADDR_MAX` already.
    pub fn take_addr_slot(self: &Arc<Self>, addr: std::net::IpAddr) -> Option<AddrSlot> {
        let mut m = self.per_addr.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(addr).or_insert(0);
        if *n >= crate::limits::WS_CONNECTIONS_PER_ADDR_MAX {
            return None;
        }
        *n += 1;
        Some(AddrSlot {
            state: self.clone(),
            addr,
        })
    }

    pub fn next_epoch(&self) -> u64 {
        self.next_epoch.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a session, replacing (and closing) an older one of the same device. False,
    /// and nothing changes, if a newer connection of the device is already here.
    pub fn attach(&self, device: Id, handle: SessionHandle) -> bool {
        let old = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if sessions
                .get(&device)
                .is_some_and(|h| h.connection > handle.connection)
            {
                return false;
            }
            sessions.insert(device, handle)
        };
        if let Some(old) = old {
            tracing::debug!(device, "session replaced by a newer connection");
            old.closer.close(
                ErrorCode::SessionReplaced,
                "this device connected again; this connection is closed",
            );
        }
        true
    }

    /// Removes the session if it is still the one with `epoch`.
    /// Ends the device's session `epoch` here; `logged_out`: the device logged out (else it
    /// is remembered as departed for presence's re-assertion).
    pub fn detach(&self, device: Id, epoch: u64, logged_out: bool) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if s.get(&device).is_none_or(|h| h.epoch != epoch) {
            return; // A newer session of the device is attached: it stays.
        }
        let Some(h) = s.remove(&device) else { return };
        drop(s);
        let mut d = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        if logged_out {
            d.remove(&device);
            return;
        }
        let last = h.last_heartbeat_ms.load(Ordering::Relaxed);
        let now = crate::clock::unix_ms();
        if d.len() >= DEPARTED_MAX {
            d.retain(|_, (_, at)| now.saturating_sub(*at) < crate::limits::PRESENCE_TIMEOUT_MS);
            if d.len() >= DEPARTED_MAX {
                // Still full: the oldest goes.
                if let Some(oldest) = d
                    .iter()
                    .min_by_key(|(dev, (_, at))| (*at, **dev))
                    .map(|(dev, _)| *dev)
                {
                    d.remove(&oldest);
                }
            }
        }
        d.insert(device, (h.user, last));
    }

    /// The device's buckets: those its open or recently closed connections here use, else
    /// full ones. The caller must `release_buckets` when its connection ends.
    pub fn take_buckets(&self, device: Id, now_ms: u64) -> SharedBuckets {
        let live = self.load() as usize;
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, closed)) = all.get_mut(&device) {
            if closed.is_none_or(|at| now_ms < at + BUCKETS_KEPT_MS) {
                *closed = None;
                return b.clone();
            }
        }
        // Live connections' entries stay; closed ones are bounded by `BUCKETS_KEPT_MAX`.
        if all.len() >= BUCKETS_KEPT_MAX + live {
            // Full of closed ones: those past their time go, else the oldest.
            all.retain(|_, (_, c)| c.is_none_or(|at| now_ms < at + BUCKETS_KEPT_MS));
            let oldest = all
                .iter()
                .filter_map(|(d, (_, c))| c.map(|at| (at, *d)))
                .min();
            if let Some((_, d)) = oldest {
                all.remove(&d);
            }
        }
        let b: SharedBuckets = Arc::new(Mutex::new(Buckets::new(now_ms)));
        all.insert(device, (b.clone(), None));
        b
    }

    /// A connection of the device ended: once none is left, its buckets are kept only
    /// `BUCKETS_KEPT_MS` more.
    pub fn release_buckets(&self, device: Id, now_ms: u64) {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, closed)) = all.get_mut(&device) {
            // This map's handle and the ending connection's: no other connection holds it.
            if Arc::strong_count(b) <= 2 {
                *closed = Some(now_ms);
            }
        }
    }

    pub fn count_error(&self, code: ErrorCode) {
        self.cfg.metrics.count_error(code);
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    pub fn error_counts(&self) -> Vec<(ErrorCode, u64)> {
        let e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn load(&self) -> u32 {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u32
    }

    /// Queues a frame to each listed device held here. A device whose queue is full is too
    /// slow: it is disconnected (`slow_consumer`) and will resync from its cursor.
    /// The stale-chat-server canary: a server that lost its lease keeps its sessions.
    fn canary_stale(&self) -> bool {
        self.peers().canaries.is_on(Canary::StaleChatServer)
    }

    /// Renewed within the last renewal period. Strict on purpose: when discovery goes down
    /// for everyone, a server that lost its lease (4 s unrenewed) asks peers whose last
    /// renewal is at least 2 s old, so none of them answers fresh and nobody fences.
    fn lease_fresh(&self) -> bool {
        let last = *self.last_renewed.lock().unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|t| t.elapsed() < Duration::from_millis(DISCOVERY_RENEW_MS))
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Ends the sessions here of `device` of `user` (every device of the user with `None`):
    /// their tokens were revoked. Returns how many.
    pub fn end_sessions(&self, user: Id, device: Option<Id>) -> usize {
        let ended: Vec<SessionHandle> = {
            let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            s.iter()
                .filter(|(d, h)| h.user == user && device.is_none_or(|x| x == **d))
                .map(|(_, h)| h.clone())
                .collect()
        };
        for h in &ended {
            h.closer.close(
                ErrorCode::TokenRevoked,
                "this device was logged out: log in again",
            );
        }
        ended.len()
    }

    /// Closes every session here with `code`; returns how many.
    pub fn close_all(&self, code: ErrorCode, detail: &str) -> usize {
        let all: Vec<SessionHandle> =
            std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        for h in &all {
            h.closer.close(code, detail);
        }
        all.len()
    }

    /// (user, device, last heartbeat ms) of every session here whose user presence node
    /// `node` (of `nodes`) holds and which has heartbeated.
    pub fn heartbeats_for_presence_node(&self, node: usize, nodes: usize) -> Vec<(Id, Id, u64)> {
        let mine = |user: Id| (user % nodes.max(1) as u64) as usize == node;
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(Id, Id, u64)> = s
            .iter()
            .filter(|(_, h)| mine(h.user))
            .filter_map(|(device, h)| {
                let at = h.last_heartbeat_ms.load(Ordering::Relaxed);
                (at > 0).then_some((h.user, *device, at))
            })
            .collect();
        // Devices between two connections, as presence would still count them (it drops
        // the ones past its timeout itself).
        let now = crate::clock::unix_ms();
        let d = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(
            d.iter()
                .filter(|(device, (user, at))| {
                    mine(*user)
                        && !s.contains_key(device)
                        && now.saturating_sub(*at) < crate::limits::PRESENCE_TIMEOUT_MS
                })
                .map(|(device, (user, at))| (*user, *device, *at)),
        );
        out
    }

    /// Sends `frame` to every session here; returns how many took it.
    pub fn broadcast(&self, frame: &ServerFrame) -> usize {
        let devices: Vec<Id> = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        self.deliver_local(&devices, frame)
    }

    pub fn deliver_local(&self, devices: &[Id], frame: &ServerFrame) -> usize {
        let targets: Vec<SessionHandle> = {
            let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            devices.iter().filter_map(|d| s.get(d).cloned()).collect()
        };
        let mut n = 0;
        // Live deliveries: age of the message (its id's timestamp) when queued.
        let age_s = match frame {
            ServerFrame::Message(m) => {
                let (at_ms, _, _) = crate::idgen::decode(m.message_id);
                Some(crate::clock::unix_ms().saturating_sub(at_ms) as f64 / 1000.0)
            }
            _ => None,
        };
        let shared = Arc::new(frame.clone());
        for h in targets {
            match h.tx.try_send(Outbound::Frame(shared.clone())) {
                Ok(()) => {
                    n += 1;
                    if let Some(age) = age_s {
                        self.cfg.metrics.send_to_deliver.observe(age);
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(user = h.user, "session outbox full; disconnecting");
                    self.detach_all_of(&h);
                    h.closer.close(
                        ErrorCode::SlowConsumer,
                        format!(
                            "{SESSION_OUTBOX_MAX} frames waiting; reconnect and sync from your cursors"
                        ),
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        n
    }

    fn detach_all_of(&self, h: &SessionHandle) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|_, v| !(v.epoch == h.epoch && v.user == h.user));
    }

    /// Queues a presence frame to the devices here whose user is one of `observers`.
    pub fn deliver_presence(
        &self,
        subject: Id,
        status: PresenceStatus,
        version: u64,
        observers: &[Id],
    ) {
        let wanted: BTreeSet<Id> = observers.iter().copied().collect();
        let targets: Vec<SessionHandle> = {
            let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            s.values()
                .filter(|h| wanted.contains(&h.user))
                .cloned()
                .collect()
        };
        let frame = Arc::new(ServerFrame::Presence {
            user: subject,
            status,
            version,
        });
        for h in targets {
            let _ = h.tx.try_send(Outbound::Frame(frame.clone()));
        }
    }
}

impl ChatState {
    /// A server's state before it listens: no sessions, no lease.
    pub fn new(cfg: ChatConfig) -> ChatState {
        let admission =
            super::admission::Admission::new(cfg.sends_in_flight_max, cfg.admission_target);
        ChatState {
            cfg,
            sessions: Mutex::new(BTreeMap::new()),
            next_epoch: AtomicU64::new(1),
            fenced: std::sync::atomic::AtomicBool::new(false),
            last_renewed: Mutex::new(None),
            presence_boot: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            per_addr: Mutex::new(BTreeMap::new()),
            buckets: Mutex::new(BTreeMap::new()),
            departed: Mutex::new(BTreeMap::new()),
            cursors: Arc::default(),
            sends_in_flight: admission,
        }
    }
}

/// Runs a chat server until the process (or simulated node) dies.
pub async fn run(cfg: ChatConfig) -> anyhow::Result<()> {
    cfg.peers.spawn_membership(None);
    let state = Arc::new(ChatState::new(cfg.clone()));
    let listener = net::bind(cfg.ws_listen).await?;
    let rpc_listener = net::bind(cfg.rpc_listen).await?;
    tokio::spawn(rpc_server(state.clone(), rpc_listener));
    // Subscribe to presence before taking devices: a device's presence snapshot is only
    // complete if every later change reaches this server.
    for _ in 0..SUBSCRIBE_ATTEMPTS {
        if subscribe_presence(&state).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::spawn(lease_loop(state.clone()));
    tokio::spawn(peers_loop(state.clone()));
    tokio::spawn(presence_loop(state.clone()));
    tokio::spawn(sweep_loop(state.clone()));
    tokio::spawn(super::cursors::flush_loop(
        cfg.peers.clone(),
        state.cursors.clone(),
    ));
    tracing::info!(server = cfg.server, ws = %cfg.ws_listen, "chat server up");
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let Some(slot) = state.take_addr_slot(peer.ip()) else {
                    // Closed before anything is read: one host holds too many already.
                    state.cfg.metrics.connection_refused("per_address");
                    tracing::debug!(%peer, "connection refused: too many from this address");
                    drop(tcp);
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    super::session::run(state, Stream::new(tcp)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "ws accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn rpc_server(state: Arc<ChatState>, listener: tokio::net::TcpListener) {
    let tls = state.peers().tls.clone();
    let handler: rpc::Handler = Arc::new(move |req| {
        let resp = match req {
            Request::Deliver { devices, message } => {
                let n = state.deliver_local(&devices, &ServerFrame::Message(message));
                Response::Id(n as u64)
            }
            Request::PresenceFanout {
                subject,
                status,
                version,
                observers,
            } => {
                state.deliver_presence(subject, status, version, &observers);
                Response::Ok
            }
            Request::ChatStats => Response::ErrorCounts(state.error_counts()),
            Request::EndSessions { user, device } => {
                state.end_sessions(user, device);
                Response::Ok
            }
            Request::LeaseHeld => Response::Bool(state.lease_fresh()),
            other => Response::Error {
                code: ErrorCode::BadRequest,
                detail: format!("chat does not serve {other:?}"),
            },
        };
        async move { resp }.boxed()
    });
    if let Err(e) = rpc::serve_on(listener, handler, tls).await {
        tracing::error!(error = %e, "chat rpc listener failed");
    }
}

/// How often abandoned fanouts are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

async fn sweep_loop(state: Arc<ChatState>) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        super::fanout::sweep(state.clone()).await;
    }
}

/// Keeps the discovery lease alive and the list of peer chat servers fresh.
/// Attempts (200 ms apart) to subscribe to presence before accepting devices anyway (presence
/// may be down; the lease loop keeps trying).
const SUBSCRIBE_ATTEMPTS: u32 = 15;

fn info(state: &ChatState) -> ChatServerInfo {
    ChatServerInfo {
        server: state.cfg.server,
        ws_addr: state.cfg.ws_advertise.clone(),
        rpc_addr: state.cfg.rpc_advertise.clone(),
        load: state.load(),
        tls: state.cfg.tls.is_some(),
    }
}

/// Subscribes (or renews the subscription) to every presence node's changes. When a presence
/// node restarted (its boot time changed, or it was warming up) every session is told to ask
/// for its friends' presence again: changes published before the restart, or lost with it,
/// would otherwise leave views stale. True if every node took the subscription.
async fn subscribe_presence(state: &ChatState) -> bool {
    let nodes = state.peers().presence_nodes().to_vec();
    let calls = nodes.iter().enumerate().map(|(i, node)| {
        let req = Request::SubscribePresence { info: info(state) };
        async move { (i, node.call(req).await) }
    });
    let (mut refresh, mut all) = (false, true);
    let mut settling = Vec::new();
    for (i, answer) in futures::future::join_all(calls).await {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(presence = i, error = %e, "presence subscription failed");
                all = false;
                continue;
            }
        };
        let mut boots = state
            .presence_boot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let seen = boots.entry(i).or_insert((None, false));
        match answer {
            Response::Id(boot) => {
                refresh |= seen.0.is_some_and(|b| b != boot) || seen.1;
                *seen = (Some(boot), false);
            }
            _ => {
                seen.1 = true;
                settling.push(i);
            }
        }
    }
    // Settling nodes hear at once which devices heartbeat here, instead of waiting for each
    // device's next heartbeat.
    for i in settling {
        reassert(state, i).await;
    }
    if refresh {
        let n = state.broadcast(&ServerFrame::PresenceRefresh);
        tracing::info!(
            sessions = n,
            "a presence node restarted; sessions told to refresh"
        );
    }
    all
}

/// A server that could not renew its lease for this long has lost it (two renewal periods,
/// less than the lease). If it is cut off (some peer still renews, or no peer answers), it
/// fences itself: discovery drops it after `DISCOVERY_LEASE_MS`, peers
/// then stop delivering to it, and its devices would silently miss live messages. If every
/// peer answers and none holds a lease, discovery itself is down: fencing would turn that
/// into a total outage, so the server keeps serving (peers keep their last map meanwhile, and
/// fanouts a peer could not deliver stay pending until they can).
///
/// Slow versus cut off: a renewal etcd does not answer within its 1 s deadline keeps the
/// lease and is tried again after `RENEW_RETRY_MS`, so about three tries fit before the
/// fence; only "lease not found" takes a new lease. A slow etcd (one that answers some
/// requests late) costs a server its lease only if every one of those tries fails.
const FENCE_AFTER_MS: u64 = DISCOVERY_LEASE_MS - DISCOVERY_RENEW_MS;

/// Whether a server that lost its lease is cut off (true: some peer still renews, or no peer
/// can be reached) rather than sharing an outage of discovery with its peers (false: some
/// peer answers and none renews).
async fn cut_off_alone(state: &ChatState) -> bool {
    let me = state.cfg.server;
    let peers: Vec<_> = state
        .peers()
        .chat_servers()
        .into_iter()
        .filter(|(s, _)| *s != me)
        .collect();
    if peers.is_empty() {
        return false; // Alone in the tier: nothing to compare with.
    }
    let mut reached = 0;
    for (_, peer) in &peers {
        match peer.call(Request::LeaseHeld).await {
            Ok(Response::Bool(true)) => {
                tracing::debug!("a peer still renews its lease: this server is cut off");
                return true;
            }
            Ok(_) => reached += 1,
            Err(_) => {}
        }
    }
    // Every peer unreachable: this server is isolated. Some peer reachable and none renewing:
    // discovery is down for them too (an unreachable peer may be down for its own reasons).
    reached == 0
}

/// Tells settling presence node `i` which of this server's devices heartbeat and when each
/// last did, in batches, the last one marked done.
async fn reassert(state: &ChatState, i: usize) {
    let nodes = state.peers().presence_nodes();
    let node = &nodes[i];
    let all = state.heartbeats_for_presence_node(i, nodes.len());
    let batches: Vec<Vec<(Id, Id, u64)>> = if all.is_empty() {
        vec![Vec::new()]
    } else {
        all.chunks(crate::presence::REASSERT_BATCH_MAX)
            .map(<[_]>::to_vec)
            .collect()
    };
    let last = batches.len() - 1;
    for (b, heartbeats) in batches.into_iter().enumerate() {
        let req = Request::PresenceReassert {
            server: state.cfg.server,
            heartbeats,
            done: b == last,
        };
        if let Err(e) = node.call(req).await {
            tracing::debug!(presence = i, error = %e, "re-assertion failed; again next period");
            return;
        }
    }
}

/// Renews the presence subscription every renewal period, apart from the discovery lease so
/// a slow presence node never stretches the lease cycle.
async fn presence_loop(state: Arc<ChatState>) {
    loop {
        subscribe_presence(&state).await;
        tokio::time::sleep(Duration::from_millis(DISCOVERY_RENEW_MS)).await;
    }
}

async fn lease_loop(state: Arc<ChatState>) {
    loop {
        let info = info(&state);
        let started = tokio::time::Instant::now();
        match state.peers().discovery.register(info).await {
            Ok(_) => {
                // The lease runs from when the request left, not when the answer came.
                *state.last_renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
                if state.fenced.swap(false, Ordering::Relaxed) {
                    tracing::info!("discovery lease back; taking devices again");
                }
            }
            Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
        }
        let renewed_now = state
            .last_renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t >= started);
        let unrenewed = state
            .last_renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64);
        if unrenewed >= FENCE_AFTER_MS
            && !state.canary_stale()
            && !state.is_fenced()
            && cut_off_alone(&state).await
            && !state.fenced.swap(true, Ordering::Relaxed)
        {
            let n = state.close_all(
                ErrorCode::Unavailable,
                "this chat server lost its discovery lease; reconnect",
            );
            tracing::warn!(
                sessions = n,
                unrenewed,
                "no discovery lease; closed every session"
            );
        }
        // The next renewal is due a period after this one started, however long its
        // answer took. A failed one is tried again soon: several tries fit before the fence,
        // so one slow answer from etcd does not cost the lease.
        let next = if renewed_now {
            started + Duration::from_millis(DISCOVERY_RENEW_MS)
        } else {
            tokio::time::Instant::now() + Duration::from_millis(RENEW_RETRY_MS)
        };
        tokio::time::sleep_until(next).await;
    }
}

/// Re-reads the other chat servers every renewal period, apart from the lease so a slow
/// list never delays a renewal.
async fn peers_loop(state: Arc<ChatState>) {
    loop {
        let started = tokio::time::Instant::now();
        let _ = state.peers().refresh_chat_servers().await;
        tokio::time::sleep_until(started + Duration::from_millis(DISCOVERY_RENEW_MS)).await;
    }
}

/// Pause before trying a failed lease renewal again.
const RENEW_RETRY_MS: u64 = 250;
