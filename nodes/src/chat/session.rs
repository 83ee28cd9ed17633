//! One device connection: WebSocket handshake, `hello` with a token, then frames until the
//! device leaves, goes silent, or is closed from outside.
//!
//! Frames are handled in order on the reader; a device's sends are therefore committed one at
//! a time, in the order it sent them. Heartbeats and cursor writes are relayed in the
//! background so a slow kv never delays a heartbeat. Every refusal names an error code and,
//! except where [`ErrorCode::closes_connection`], the connection stays usable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::fanout::fanout;
use super::send::{commit, commit_write_behind, SendRequest};
use super::server::{ChatState, Closer, Outbound, SessionHandle};
use super::validate::{check_text, parse_frame};
use crate::auth::Claims;
use crate::canary::Canary;
use crate::client_tls::MaybeTls;
use crate::clock::unix_ms;
use crate::limits::{
    OVERLOAD_RETRY_AFTER_MS, PRESENCE_QUERY_USERS_MAX, SESSION_OUTBOX_MAX, SYNC_PAGE_MAX,
    WS_FRAME_BYTES_MAX, WS_WRITE_TIMEOUT_MS,
};
use crate::net::Stream;
use crate::proto::client::{ClientFrame, Cursor, ErrorCode, ServerFrame};
use crate::proto::internal::{Request, Response, SessionEntry};
use crate::proto::Id;

/// A connection that sends nothing (not even a heartbeat) for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Channels whose cursor a session remembers between two writes (a device is in far fewer).
const READS_PENDING_MAX: usize = 10_000;
/// Attempts (0.5 s apart) to register a session before the connection is refused.
const REGISTER_ATTEMPTS: u32 = 4;
/// Attempts (1 s apart) to read the friend list for a presence query.
const PRESENCE_QUERY_ATTEMPTS: u32 = 15;
/// Time allowed for the WebSocket handshake, and then for a valid `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// See [`WS_WRITE_TIMEOUT_MS`].
const WS_WRITE_TIMEOUT: Duration = Duration::from_millis(WS_WRITE_TIMEOUT_MS);

/// Bytes of a connection's WebSocket read buffer, allocated for its whole life: the largest
/// cost of an idle connection (measured with massif on chatd: 4,096 of 12,200 bytes per idle
/// connection at 4 KB). Sends are small; a larger frame grows the buffer as it arrives and is
/// read this many bytes per syscall.
pub const WS_READ_BUFFER_BYTES: usize = 1024;

/// WebSocket settings: small buffers (an idle connection should cost a few KB), frames capped.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(WS_FRAME_BYTES_MAX))
        .max_frame_size(Some(WS_FRAME_BYTES_MAX))
}

type Ws = WebSocketStream<MaybeTls>;

/// Serves one device connection to the end.
pub async fn run(state: Arc<ChatState>, stream: Stream) {
    // The TLS handshake (with `[client_tls]`) and the WebSocket upgrade share one deadline.
    let upgrade = async {
        let stream = match &state.cfg.tls {
            None => MaybeTls::Plain(stream),
            Some(tls) => tls.accept(stream).await.ok()?,
        };
        tokio_tungstenite::accept_async_with_config(stream, Some(ws_config()))
            .await
            .ok()
    };
    let ws = match Box::pin(tokio::time::timeout(HELLO_TIMEOUT, upgrade)).await {
        Ok(Some(ws)) => ws,
        _ => return,
    };
    let metrics = state.cfg.metrics.clone();
    metrics.ws_accepted.inc();
    metrics.ws_connections.inc();
    // Decrements on every way out of this function.
    struct Open(Arc<crate::metrics::Metrics>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.ws_connections.dec();
        }
    }
    let _open = Open(metrics);
    let (sink, mut frames) = ws.split();
    let (tx, rx) = mpsc::channel::<Outbound>(SESSION_OUTBOX_MAX);
    let closer = Closer::new();
    let writer = tokio::spawn(write_loop(state.clone(), sink, rx, closer.clone()));
    // One deadline for the whole greeting: junk frames do not extend it.
    // Boxed, like every step that is not the idle wait: a task's future is as large as its
    // largest state, and an idle connection should not carry the greeting's or a send's.
    let greeted = Box::pin(tokio::time::timeout(
        HELLO_TIMEOUT,
        hello(&state, &mut frames, &tx),
    ))
    .await;
    let Ok(Some((claims, connection))) = greeted else {
        if greeted.is_err() {
            let detail = format!("no valid hello within {HELLO_TIMEOUT:?}");
            let _ = tx.try_send(Outbound::Close(Box::new((
                ErrorCode::NotAuthenticated,
                detail,
            ))));
        }
        drop(tx);
        let _ = writer.await;
        return;
    };
    let Some(mut session) = Box::pin(Session::open(state, claims, connection, tx, closer)).await
    else {
        let _ = writer.await;
        return;
    };
    session.serve(&mut frames).await;
    Box::pin(session.close()).await;
    let _ = writer.await;
}

/// Sends queued frames; every error frame a device is sent is counted here, by code. A close
/// from outside (`Closer`) jumps the queue: its reason is sent next, then the connection ends.
///
/// Every write is bounded by [`WS_WRITE_TIMEOUT`]: a device that stops reading fills its
/// socket, and a writer waiting on it forever would hold the connection (and the reader, and
/// whatever is queued) open forever, since the reason it is being closed can never get through.
async fn write_loop(
    state: Arc<ChatState>,
    mut sink: futures::stream::SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    closer: Arc<Closer>,
) {
    let mut closed = closer.subscribe();
    loop {
        let out = tokio::select! {
            biased;
            // Cannot fail: this task holds the closer, and with it the sending side.
            _ = closed.changed() => {
                let reason = closed.borrow().clone();
                match reason {
                    Some(reason) => Outbound::Close(Box::new(reason)),
                    None => continue,
                }
            }
            out = rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
        };
        let (frame, close) = match out {
            Outbound::Frame(f) => (f, false),
            Outbound::Close(reason) => {
                let (code, detail) = *reason;
                (Arc::new(ServerFrame::error(code, detail)), true)
            }
        };
        match &*frame {
            ServerFrame::Error { code, .. } => state.count_error(*code),
            ServerFrame::Message(_) => {
                state.cfg.metrics.messages_out.inc();
            }
            _ => {}
        }
        let text = serde_json::to_string(&*frame).expect("server frames serialize");
        let heartbeat = matches!(&*frame, ServerFrame::HeartbeatAck);
        let send = sink.send(Message::text(text));
        let write = async {
            if heartbeat {
                // Counted apart by the simulation's wire accounting.
                crate::net::heartbeat_write(send).await
            } else {
                send.await
            }
        };
        // Boxed: the idle writer waits in the select above and should not carry this state.
        match Box::pin(tokio::time::timeout(WS_WRITE_TIMEOUT, write)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                on_write_stalled(&state, &closer, close);
                // No close handshake: it would wait on the same full socket. Dropping the
                // sink (and the reader, which the closer stops) closes the socket.
                return;
            }
        }
        if close {
            break;
        }
    }
    let _ = Box::pin(tokio::time::timeout(WS_WRITE_TIMEOUT, sink.close())).await;
}

/// The device has not taken a frame for [`WS_WRITE_TIMEOUT`]: it is a slow consumer. Stops
/// the session's reader and counts the reason, unless the stalled frame was itself a close
/// reason (already counted).
fn on_write_stalled(state: &ChatState, closer: &Closer, stalled_on_close: bool) {
    tracing::warn!("device socket full for {WS_WRITE_TIMEOUT:?}; dropping the connection");
    closer.close(
        ErrorCode::SlowConsumer,
        format!("nothing read for {WS_WRITE_TIMEOUT:?}; reconnect and sync from your cursors"),
    );
    if !stalled_on_close {
        state.count_error(ErrorCode::SlowConsumer);
    }
}

/// Waits for `hello` and verifies its token.
async fn hello(
    state: &ChatState,
    frames: &mut futures::stream::SplitStream<Ws>,
    tx: &mpsc::Sender<Outbound>,
) -> Option<(Claims, u64)> {
    loop {
        let msg = match frames.next().await {
            Some(Ok(m)) => m,
            _ => return None,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                let _ = tx.try_send(err(ErrorCode::BinaryFrame, "text frames only"));
                continue;
            }
            Message::Close(_) => return None,
            _ => continue,
        };
        match parse_frame(&text) {
            Ok(ClientFrame::Hello { token, connection }) => {
                return match state.cfg.token_key.verify(&token, unix_ms()) {
                    Ok(c) => Some((c, connection)),
                    Err(code) => {
                        let _ =
                            tx.try_send(Outbound::Close(Box::new((code, "token refused".into()))));
                        None
                    }
                };
            }
            Ok(_) => {
                let _ = tx.try_send(err(ErrorCode::NotAuthenticated, "send hello first"));
            }
            Err((code, detail)) => {
                let _ = tx.try_send(err(code, detail));
            }
        }
    }
}

fn err(code: ErrorCode, detail: impl Into<String>) -> Outbound {
    Outbound::Frame(Arc::new(ServerFrame::error(code, detail)))
}

/// An authenticated session.
struct Session {
    state: Arc<ChatState>,
    user: Id,
    device: Id,
    epoch: u64,
    /// The device's connection number (from `hello`).
    connection: u64,
    tx: mpsc::Sender<Outbound>,
    closer: Arc<Closer>,
    /// Sees the closer's reason: the reader stops when it is set.
    closed: tokio::sync::watch::Receiver<Option<(ErrorCode, String)>>,
    /// This device's rate buckets (shared with its other connections here, and kept by the
    /// server across its reconnections).
    rate: super::server::SharedBuckets,
    /// Cursors reported by `read` and not yet written (channel -> seq).
    reads: BTreeMap<Id, u64>,
    /// Shared with this session's handle (see `SessionHandle::last_heartbeat_ms`).
    last_heartbeat_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When the token expires: the session ends then (checked at every frame).
    expires_at_ms: u64,
    /// The device logged out: not remembered as departed when the session ends.
    logged_out: bool,
    /// The user's channels as read at `hello` (after the registration), and when: the first
    /// sync, which follows at once, uses them instead of reading the user again (one kv read
    /// fewer per connection). Taken by that sync; ignored after `HELLO_CHANNELS_FRESH`.
    hello_channels: Option<(tokio::time::Instant, Vec<Id>)>,
}

/// How long the channel list read at `hello` serves the first sync. Any message committed
/// after the registration is delivered live, so a list this old misses nothing a fresh read
/// would find: a channel joined since shows its messages live, and a gap syncs it.
const HELLO_CHANNELS_FRESH: Duration = Duration::from_secs(2);

impl Session {
    /// Attaches and registers the session, then welcomes the device. `None` when the session
    /// registry cannot be written: without it the device would silently miss live messages,
    /// so it is told `unavailable` and reconnects later.
    async fn open(
        state: Arc<ChatState>,
        claims: Claims,
        connection: u64,
        tx: mpsc::Sender<Outbound>,
        closer: Arc<Closer>,
    ) -> Option<Self> {
        if state.is_fenced() {
            closer.close(
                ErrorCode::Unavailable,
                "this chat server lost its discovery lease; ask for another",
            );
            return None;
        }
        let epoch = state.next_epoch();
        // A session that has not heartbeated yet is alive as of its hello: a presence node
        // that restarts now must hear of it in the re-assertion, or it settles without the
        // device and shows its user offline (swarm seed 183000 at 800 users: a chat server
        // fenced, its devices reconnected, and presence settled before their first heartbeat).
        let last_heartbeat_ms = Arc::new(std::sync::atomic::AtomicU64::new(unix_ms()));
        let handle = SessionHandle {
            user: claims.user,
            epoch,
            connection,
            tx: tx.clone(),
            closer: closer.clone(),
            last_heartbeat_ms: last_heartbeat_ms.clone(),
        };
        if !state.attach(claims.device, handle) {
            closer.close(
                ErrorCode::SessionReplaced,
                "a newer connection of this device is open",
            );
            return None;
        }
        let mut s = Session {
            user: claims.user,
            device: claims.device,
            epoch,
            connection,
            tx,
            closed: closer.subscribe(),
            closer,
            rate: state.take_buckets(claims.device, unix_ms()),
            reads: BTreeMap::new(),
            last_heartbeat_ms,
            expires_at_ms: claims.expires_at_ms,
            logged_out: false,
            hello_channels: None,
            state,
        };
        // Register before welcoming: the device syncs after `welcome`, and every message
        // committed after this registration is delivered live, so sync + live leave no hole.
        match s.register().await {
            Ok(true) => {}
            Ok(false) => {
                // A newer connection of this device registered first: this one is stale.
                s.closer.close(
                    ErrorCode::SessionReplaced,
                    "a newer connection of this device is open",
                );
                s.state.detach(s.device, s.epoch, false);
                s.state.release_buckets(s.device, unix_ms());
                return None;
            }
            Err(e) => {
                tracing::warn!(device = s.device, error = %e, "session registration failed; refusing");
                let detail = format!("session registry unavailable: {}", e.public_detail());
                s.closer.close(ErrorCode::Unavailable, detail);
                s.state.detach(s.device, s.epoch, false);
                s.state.release_buckets(s.device, unix_ms());
                return None;
            }
        }
        // Revocation is checked after the registration: a logout revokes, then reads the
        // registry to end sessions. A session registered before that read is ended by it; one
        // registered after it finds the revocation here (both are linearizable kv operations).
        let revoked = match s
            .state
            .peers()
            .kv_for_user(s.user)
            .call(Request::GetUser { user: s.user })
            .await
        {
            Ok(Response::User(Some(u))) => {
                let refused = u.accepts(&claims).err();
                s.hello_channels = Some((tokio::time::Instant::now(), u.channels));
                refused.map(|code| (code, "this token was revoked: log in again".to_string()))
            }
            Ok(_) => Some((ErrorCode::TokenRevoked, "no such user".to_string())),
            Err(e) => Some((
                ErrorCode::Unavailable,
                format!("account unavailable: {}", e.public_detail()),
            )),
        };
        if let Some((code, detail)) = revoked {
            // The session ends at once through the usual path (its registry entry cleared).
            s.closer.close(code, detail);
            return Some(s);
        }
        s.send(ServerFrame::Welcome {
            user: s.user,
            device: s.device,
            server: s.state.cfg.server,
        })
        .await;
        Some(s)
    }

    /// Writes the registry entry; `Ok(false)` if a newer connection of the device holds it.
    async fn register(&self) -> Result<bool, crate::rpc::RpcError> {
        let kv = self.state.peers().kv_for_user(self.user).clone();
        let mut last = None;
        for _ in 0..REGISTER_ATTEMPTS {
            match kv
                .call(Request::SetSession {
                    entry: self.entry(),
                })
                .await
            {
                Ok(answer) => return Ok(answer != Response::Bool(false)),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last.expect("at least one attempt was made"))
    }

    fn entry(&self) -> SessionEntry {
        SessionEntry {
            user: self.user,
            device: self.device,
            server: self.state.cfg.server,
            epoch: self.epoch,
            connection: self.connection,
        }
    }

    async fn send(&self, frame: ServerFrame) {
        let _ = self.tx.send(Outbound::Frame(Arc::new(frame))).await;
    }

    async fn serve(&mut self, frames: &mut futures::stream::SplitStream<Ws>) {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.closed.changed() => return,
                n = tokio::time::timeout(IDLE_TIMEOUT, frames.next()) => n,
            };
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e)))) => {
                    let detail = format!("{e}; at most {WS_FRAME_BYTES_MAX} bytes");
                    let _ = self.tx.try_send(Outbound::Close(Box::new((
                        ErrorCode::FrameTooLarge,
                        detail,
                    ))));
                    return;
                }
                // Closed, broken, or silent past the idle timeout.
                _ => return,
            };
            match msg {
                Message::Text(t) if !Box::pin(self.on_text(&t)).await => return,
                Message::Text(_) => {}
                Message::Binary(_) => {
                    self.send(ServerFrame::error(
                        ErrorCode::BinaryFrame,
                        "text frames only",
                    ))
                    .await
                }
                Message::Close(_) => return,
                // Pings are answered by tungstenite; pongs need nothing.
                _ => {}
            }
        }
    }

    /// Handles one text frame; false ends the session.
    async fn on_text(&mut self, text: &str) -> bool {
        if unix_ms() >= self.expires_at_ms {
            self.closer
                .close(ErrorCode::TokenExpired, "the token expired: log in again");
            return false;
        }
        let frame = match parse_frame(text) {
            Ok(f) => f,
            Err((code, detail)) => {
                self.send(ServerFrame::error(code, detail)).await;
                return true;
            }
        };
        // Every frame but a send, a read or a logout takes a control token, a sync a sync
        // token too: past them the frame is refused and dropped (its work never starts), the
        // connection stays. Reads only update a bounded map (flushed at heartbeats), and a
        // client reports one per moved channel at each tick; a logout ends the session (a
        // refused one would leave the user online until the presence timeout).
        if !matches!(
            frame,
            ClientFrame::Send { .. } | ClientFrame::Read { .. } | ClientFrame::Logout
        ) {
            let now = unix_ms();
            let limited = {
                let mut b = self.rate.lock().unwrap_or_else(|p| p.into_inner());
                let mut limited = b.control.take(now);
                if limited.is_ok() && matches!(frame, ClientFrame::Sync { .. }) {
                    limited = b.syncs.take(now);
                }
                limited
            };
            if let Err((code, detail)) = limited {
                self.send(ServerFrame::error(code, detail)).await;
                return true;
            }
        }
        match frame {
            ClientFrame::Hello { .. } => {
                self.send(ServerFrame::error(
                    ErrorCode::BadRequest,
                    "already authenticated",
                ))
                .await
            }
            ClientFrame::Send {
                client_msg_id,
                channel,
                text,
            } => self.on_send(client_msg_id, channel, text).await,
            ClientFrame::Sync {
                cursors,
                max_message_id,
            } => self.on_sync(cursors, max_message_id).await,
            ClientFrame::Read { channel, seq } => self.on_read(channel, seq),
            ClientFrame::Heartbeat => {
                self.on_heartbeat();
                // Past its use (the first sync follows the hello at once): not kept for the
                // session's life (up to 6,000 channel ids).
                self.hello_channels = None;
                self.flush_reads();
                self.send(ServerFrame::HeartbeatAck).await;
            }
            ClientFrame::PresenceQuery { users } => self.on_presence_query(users).await,
            ClientFrame::Logout => {
                let req = Request::Logout {
                    user: self.user,
                    device: self.device,
                };
                let _ = self.state.peers().presence_for(self.user).call(req).await;
                self.logged_out = true;
                return false;
            }
        }
        true
    }

    async fn on_send(&mut self, client_msg_id: Id, channel: Id, text: String) {
        let refuse = |code, detail| ServerFrame::Error {
            code,
            detail,
            client_msg_id: Some(client_msg_id),
            channel: Some(channel),
            retry_after_ms: None,
        };
        let taken = check_text(&text).and_then(|()| {
            let mut b = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            b.sends.take(unix_ms())
        });
        if let Err((code, detail)) = taken {
            self.send(refuse(code, detail)).await;
            return;
        }
        // Admission: a send past the server's limit in flight is refused now, not queued
        // behind the others (their latency would grow without bound under overload).
        let Some(mut in_flight) = self.state.sends_in_flight.try_admit() else {
            let frame = ServerFrame::Error {
                code: ErrorCode::Overloaded,
                detail: format!(
                    "this chat server is committing {} sends; retry later",
                    self.state.sends_in_flight.limit()
                ),
                client_msg_id: Some(client_msg_id),
                channel: Some(channel),
                retry_after_ms: Some(OVERLOAD_RETRY_AFTER_MS),
            };
            self.send(frame).await;
            return;
        };
        let req = SendRequest {
            user: self.user,
            device: self.device,
            channel,
            client_msg_id,
            text,
        };
        let peers = self.state.peers();
        let started = tokio::time::Instant::now();
        let result = if peers.canaries.is_on(Canary::AckBeforePersist) {
            commit_write_behind(peers, req).await
        } else {
            commit(peers, req).await
        };
        // Committed or refused: the slot is not held while the answer waits for room in a
        // slow device's queue. A failure is no latency sample (`chat::admission`).
        if result.is_err() {
            in_flight.failed();
        }
        drop(in_flight);
        match result {
            Ok(c) => {
                self.send(ServerFrame::Ack {
                    client_msg_id,
                    channel,
                    message_id: c.message.message_id,
                    seq: c.message.seq,
                })
                .await;
                let m = &self.state.cfg.metrics;
                m.messages_in.inc();
                m.send_to_ack.observe(started.elapsed().as_secs_f64());
                // A retry of a committed message is fanned out again: the first fanout may
                // have died with its server. Devices drop what they already have.
                tokio::spawn(fanout(self.state.clone(), c));
            }
            Err(r) => self.send(refuse(r.code, r.detail)).await,
        }
    }

    async fn on_sync(&mut self, cursors: Vec<Cursor>, max_message_id: Option<Id>) {
        let cursors = cursors.into_iter().map(|c| (c.channel, c.seq)).collect();
        match self.sync(cursors, max_message_id).await {
            Ok(done) => {
                let cursors = done
                    .into_iter()
                    .map(|(channel, seq)| Cursor { channel, seq })
                    .collect();
                self.send(ServerFrame::Synced { cursors }).await
            }
            Err(e) => {
                tracing::debug!(device = self.device, error = %e, "sync failed");
                self.send(ServerFrame::error(
                    ErrorCode::Unavailable,
                    format!("sync: {}", e.public_detail()),
                ))
                .await
            }
        }
    }

    /// Sends every message after the cursors, channel by channel, page by page.
    async fn sync(
        &mut self,
        mut cursors: BTreeMap<Id, u64>,
        max_message_id: Option<Id>,
    ) -> Result<BTreeMap<Id, u64>, crate::rpc::RpcError> {
        let peers = self.state.peers().clone();
        let user_kv = peers.kv_for_user(self.user);
        let hello = self
            .hello_channels
            .take()
            .filter(|(at, _)| at.elapsed() <= HELLO_CHANNELS_FRESH);
        let mut channels = match hello {
            Some((_, channels)) => channels,
            None => match user_kv.call(Request::GetUser { user: self.user }).await? {
                Response::User(Some(u)) => u.channels,
                _ => Vec::new(),
            },
        };
        let skip_check = peers.canaries.is_on(Canary::SkipMembershipCheck);
        if skip_check {
            // Canary `skip-membership-check`: the channels the cursors name are read too.
            channels.extend(
                cursors
                    .keys()
                    .filter(|c| !channels.contains(c))
                    .copied()
                    .collect::<Vec<_>>(),
            );
        }
        let stored = match user_kv
            .call(Request::GetCursors {
                device: self.device,
            })
            .await?
        {
            Response::Cursors(c) => c,
            _ => BTreeMap::new(),
        };
        let by_id = peers.canaries.is_on(Canary::CursorByMessageId);
        let mut done = BTreeMap::new();
        for ch in channels {
            let kv = peers.kv_for_channel(ch);
            let mut after = cursors
                .remove(&ch)
                .or_else(|| stored.get(&ch).copied())
                .unwrap_or(0);
            loop {
                let req = match (by_id, max_message_id) {
                    (true, Some(max_id)) => Request::ReadLogByMessageId {
                        channel: ch,
                        after_message_id: max_id,
                        limit: u32::MAX,
                    },
                    _ => Request::ReadLog {
                        channel: ch,
                        after_seq: after,
                        limit: SYNC_PAGE_MAX as u32,
                        // kv checks membership in the same read (canary
                        // `skip-membership-check`: it does not).
                        reader: (!skip_check).then_some(self.user),
                    },
                };
                let messages = match kv.call(req).await {
                    Ok(Response::Log { messages, .. }) => messages,
                    Ok(_) => break,
                    // Removed from the channel (the user's channel list may lag): skipped.
                    Err(crate::rpc::RpcError::Remote {
                        code: ErrorCode::NotAMember,
                        ..
                    }) => break,
                    Err(e) => return Err(e),
                };
                let n = messages.len();
                for m in messages {
                    after = after.max(m.seq);
                    self.send(ServerFrame::Message(m)).await;
                }
                if by_id || n < SYNC_PAGE_MAX {
                    break;
                }
            }
            done.insert(ch, after);
        }
        Ok(done)
    }

    /// Remembers the cursor; cursors are written to kv in one batch per heartbeat and at close
    /// (a cursor lost in a crash only makes the device be offered messages it already has).
    fn on_read(&mut self, channel: Id, seq: u64) {
        if self.reads.len() >= READS_PENDING_MAX && !self.reads.contains_key(&channel) {
            return; // Bounded: the device reports again at its next heartbeat.
        }
        let e = self.reads.entry(channel).or_default();
        *e = (*e).max(seq);
    }

    /// Hands the remembered cursors to the server's batcher (`cursors`), which writes them
    /// within `CURSOR_FLUSH_MS`.
    fn flush_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.reads);
        let peers = self.state.peers();
        let shard = peers.kv_shard_of_user(self.user);
        if let Some(full) = self.state.cursors.add(shard, self.device, reads) {
            let peers = peers.clone();
            tokio::spawn(async move { super::cursors::write(&peers, full).await });
        }
    }

    /// Writes the remembered cursors and those still waiting in the batcher in one kv call,
    /// in the background: the session is closing, and its device may sync elsewhere soon.
    fn write_reads_now(&mut self) {
        let mut reads = std::mem::take(&mut self.reads);
        let peers = self.state.peers();
        let shard = peers.kv_shard_of_user(self.user);
        super::cursors::merge(
            &mut reads,
            self.state.cursors.take_device(shard, self.device),
        );
        // Within kv's limit for one write (the rest: the device is offered them again).
        while reads.len() > crate::limits::CURSOR_BATCH_PAIRS_MAX {
            reads.pop_last();
        }
        if reads.is_empty() {
            return;
        }
        let cursors = reads.into_iter().collect();
        let kv = peers.kv_shard(shard).clone();
        let device = self.device;
        tokio::spawn(async move {
            let _ = kv.call(Request::SetCursors { device, cursors }).await;
        });
    }

    fn on_heartbeat(&self) {
        let presence = self.state.peers().presence_for(self.user).clone();
        let at_ms = unix_ms();
        self.last_heartbeat_ms
            .store(at_ms, std::sync::atomic::Ordering::Relaxed);
        let req = Request::Heartbeat {
            user: self.user,
            device: self.device,
            at_ms,
        };
        tokio::spawn(async move {
            if let Err(e) = presence.call(req).await {
                tracing::debug!(error = %e, "heartbeat relay failed");
            }
        });
    }

    /// Answers, in the background, with the presence of those of `users` who are friends of
    /// this user. The friend list is read from kv, retried through a kv restart.
    async fn on_presence_query(&self, users: Vec<Id>) {
        if users.len() > PRESENCE_QUERY_USERS_MAX {
            let detail = format!(
                "{} users asked, at most {PRESENCE_QUERY_USERS_MAX}",
                users.len()
            );
            self.send(ServerFrame::error(ErrorCode::BadRequest, detail))
                .await;
            return;
        }
        let peers = self.state.peers().clone();
        let (user, tx) = (self.user, self.tx.clone());
        tokio::spawn(async move {
            let mut friends = None;
            for _ in 0..PRESENCE_QUERY_ATTEMPTS {
                let req = Request::GetUser { user };
                match peers.kv_for_user(user).call(req).await {
                    Ok(Response::User(Some(u))) => {
                        friends = Some(u.friends);
                        break;
                    }
                    Ok(_) => return,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            let Some(friends) = friends else { return };
            let strangers_too = peers.canaries.is_on(Canary::PresenceToStrangers);
            let asked: Vec<Id> = users
                .into_iter()
                .filter(|u| strangers_too || friends.contains_key(u))
                .collect();
            // One query per presence node holding some of them, answered as each node
            // answers. A node may be unreachable (partitioned, restarting, warming up): keep
            // asking it, as the friend list above, rather than leave the device with stale
            // views.
            let mut pending = peers.users_by_presence_node(&asked);
            for attempt in 1..=PRESENCE_QUERY_ATTEMPTS {
                if pending.is_empty() {
                    return;
                }
                let calls = pending.iter().map(|(node, users)| {
                    let req = Request::PresenceOf {
                        users: users.clone(),
                    };
                    let client = peers.presence_nodes()[*node].clone();
                    async move { (*node, client.call(req).await) }
                });
                for (node, r) in futures::future::join_all(calls).await {
                    match r {
                        Ok(Response::Presence(list)) => {
                            pending.remove(&node);
                            for (user, status, version) in list {
                                let frame = ServerFrame::Presence {
                                    user,
                                    status,
                                    version,
                                };
                                if tx.send(Outbound::Frame(Arc::new(frame))).await.is_err() {
                                    return; // The session ended.
                                }
                            }
                        }
                        other => tracing::debug!(
                            user,
                            node,
                            attempt,
                            ?other,
                            "presence query unanswered; retrying"
                        ),
                    }
                }
                if pending.is_empty() || tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::warn!(user, "presence query unanswered; gave up");
        });
    }

    async fn close(mut self) {
        self.write_reads_now();
        self.state.detach(self.device, self.epoch, self.logged_out);
        self.state.release_buckets(self.device, unix_ms());
        let mut entry = self.entry();
        let kv = self.state.peers().kv_for_user(self.user).clone();
        if self.state.peers().canaries.is_on(Canary::StaleChatServer) {
            // The canary's bug: clear whatever entry the device has now, even a newer session's.
            let req = Request::GetSessions {
                users: vec![self.user],
            };
            if let Ok(Response::Sessions(list)) = kv.call(req).await {
                if let Some(current) = list.into_iter().find(|e| e.device == self.device) {
                    entry = current;
                }
            }
        }
        let _ = kv.call(Request::ClearSession { entry }).await;
    }
}
