//! Internal RPC: JSON requests and responses in length-delimited frames over mutual TLS
//! (`tls`), many calls in flight per connection, matched by a call id. A node answers only
//! callers holding a certificate of the cluster's CA, and each request only if `tls::authorize`
//! allows it to that caller.
//!
//! A simulated partition neither errors nor times out a TCP stream (MADSIM_NOTES.md), so every
//! call has a deadline; a call that misses it drops the connection, and the next call dials
//! again. Retrying is the caller's decision: this module never resends a request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::limits::{RPC_FRAME_BYTES_MAX, RPC_IN_FLIGHT_MAX};
use crate::net;
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response};
use crate::tls::{self, NodeTls, SecureStream};

/// Default deadline of one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a connect, TLS handshake included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node waits for a caller's TLS handshake before closing the connection (a
/// caller that connects and says nothing holds a descriptor only this long).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("call to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connection to {0} closed before the answer")]
    Closed(SocketAddr),
    #[error("remote error {code:?}: {detail}")]
    Remote { code: ErrorCode, detail: String },
    #[error("unexpected response {0}")]
    Unexpected(String),
    /// The coordination service (etcd) failed or did not answer in time.
    #[error("coordination: {0}")]
    Coordination(String),
}

impl RpcError {
    /// The words to show a client for this failure: the remote node's own words for a
    /// refusal, else a generic one. Internal addresses stay in the logs.
    pub fn public_detail(&self) -> String {
        match self {
            RpcError::Remote {
                code: ErrorCode::Forbidden,
                ..
            } => "an internal service refused the call; retry".to_string(),
            RpcError::Remote { detail, .. } => detail.clone(),
            _ => "an internal service did not answer; retry".to_string(),
        }
    }

    /// The code to show a client for this failure. A node refused as a caller is a
    /// misconfigured cluster, not the client's doing: shown as unavailable.
    pub fn code(&self) -> ErrorCode {
        match self {
            RpcError::Remote {
                code: ErrorCode::Forbidden,
                ..
            } => ErrorCode::Unavailable,
            RpcError::Remote { code, .. } => *code,
            _ => ErrorCode::Unavailable,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

/// Decodes one request frame (after the length prefix) as a node's RPC server does.
pub fn decode_request(frame: &[u8]) -> Result<Envelope<Request>, serde_json::Error> {
    serde_json::from_slice(frame)
}

/// Decodes one answer frame as an RPC client does.
pub fn decode_response(frame: &[u8]) -> Result<Envelope<Response>, serde_json::Error> {
    serde_json::from_slice(frame)
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(RPC_FRAME_BYTES_MAX)
        .new_codec()
}

/// One call on a stream the caller set up, without authentication of its own (a plain TCP
/// stream, an anonymous TLS one): what an outsider speaking the RPC protocol gets. `Some`
/// answer if the node answered within `timeout`; `None` if it closed the connection or said
/// nothing.
pub async fn call_on_stream<S>(stream: S, req: Request, timeout: Duration) -> Option<Response>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, codec());
    let bytes = serde_json::to_vec(&Envelope { id: 1, body: req }).expect("requests serialize");
    let exchange = async {
        framed.send(Bytes::from(bytes)).await.ok()?;
        let frame = framed.next().await?.ok()?;
        decode_response(&frame).ok().map(|e| e.body)
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// Frames coalesced into one flush at most (bounds the write buffer to about this many frames).
const FRAMES_PER_FLUSH_MAX: usize = 256;

type FrameSink = futures::stream::SplitSink<Framed<SecureStream, LengthDelimitedCodec>, Bytes>;

/// Writes queued frames, coalescing what is queued into one flush, as TCP's send buffer does:
/// flushes are at least [`net::MIN_FLUSH_INTERVAL`] apart, and each carries every frame queued
/// since the last one (up to `FRAMES_PER_FLUSH_MAX`). In simulation this is what keeps a busy
/// link (a 4,000-device reconnect storm's heartbeats and presence queries) from queueing
/// seconds of one-frame messages; see `net::MIN_FLUSH_INTERVAL`.
async fn write_frames(mut sink: FrameSink, mut rx: mpsc::Receiver<Bytes>) {
    let mut last_flush: Option<tokio::time::Instant> = None;
    while let Some(frame) = rx.recv().await {
        if sink.feed(frame).await.is_err() {
            return;
        }
        if let Some(at) = last_flush {
            let next = at + net::MIN_FLUSH_INTERVAL;
            if tokio::time::Instant::now() < next {
                tokio::time::sleep_until(next).await;
            }
        }
        for _ in 1..FRAMES_PER_FLUSH_MAX {
            let Ok(more) = rx.try_recv() else { break };
            if sink.feed(more).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
        last_flush = Some(tokio::time::Instant::now());
    }
}

/// Handles one request; called concurrently.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Response> + Send + Sync>;

/// Accepts connections on `addr` forever, answering each request with `handler`; callers
/// authenticate with `tls`.
pub async fn serve(addr: SocketAddr, handler: Handler, tls: NodeTls) -> std::io::Result<()> {
    serve_on(net::bind(addr).await?, handler, tls).await
}

/// Like [`serve`], on a listener bound by the caller (who may need it bound before telling
/// others where to call).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    handler: Handler,
    tls: NodeTls,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "rpc accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (handler, tls) = (handler.clone(), tls.clone());
        tokio::spawn(async move {
            let stream = net::Stream::new(tcp);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok((stream, who))) => serve_connection(stream, who, handler, tls).await,
                Ok(Err(e)) => {
                    tracing::warn!(%addr, %peer, error = %e, "rpc caller refused at the handshake")
                }
                Err(_) => tracing::warn!(%addr, %peer, "rpc caller's handshake timed out"),
            }
        });
    }
}

/// Serves one authenticated connection. `who`: the caller, `None` only under the
/// `unauthenticated-rpc` canary (every request is then allowed). A caller whose certificate
/// is revoked while connected is refused from its next request on, and the connection
/// closed.
async fn serve_connection(
    stream: SecureStream,
    who: Option<tls::Caller>,
    handler: Handler,
    tls: NodeTls,
) {
    let (sink, mut frames) = Framed::new(stream, codec()).split();
    // Bounded: when the writer falls behind, request handling waits (backpressure on reads).
    let (tx, rx) = mpsc::channel::<Bytes>(RPC_IN_FLIGHT_MAX);
    let writer = tokio::spawn(write_frames(sink, rx));
    // At most RPC_IN_FLIGHT_MAX requests of one connection are handled at once; past that the
    // connection is not read until one finishes (the caller's writes back up: backpressure,
    // not a task per frame without end).
    let handling = Arc::new(tokio::sync::Semaphore::new(RPC_IN_FLIGHT_MAX));
    while let Some(Ok(frame)) = frames.next().await {
        let envelope = match decode_request(&frame) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "malformed rpc frame; closing connection");
                break;
            }
        };
        if let Some(caller) = &who {
            if tls.is_revoked(&caller.serial) {
                tracing::warn!(caller = %caller.principal, "rpc caller's certificate revoked; closing");
                break;
            }
            let who = &caller.principal;
            if let Err(why) = tls::authorize(who, &envelope.body) {
                tracing::warn!(caller = %who, %why, "rpc request refused");
                let out = Envelope {
                    id: envelope.id,
                    body: Response::Error {
                        code: ErrorCode::Forbidden,
                        detail: why,
                    },
                };
                let bytes = serde_json::to_vec(&out).expect("responses always serialize");
                if tx.send(Bytes::from(bytes)).await.is_err() {
                    break;
                }
                continue;
            }
        }
        let Ok(permit) = handling.clone().acquire_owned().await else {
            break;
        };
        let handler = handler.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let body = handler(envelope.body).await;
            let out = Envelope {
                id: envelope.id,
                body,
            };
            let bytes = serde_json::to_vec(&out).expect("responses always serialize");
            let _ = tx.send(Bytes::from(bytes)).await;
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// One open connection and its calls in flight.
struct Conn {
    out: mpsc::Sender<Bytes>,
    /// A std mutex: held only to insert or remove, never across an await.
    pending: Mutex<BTreeMap<u64, oneshot::Sender<Response>>>,
    next_id: AtomicU64,
    dead: AtomicBool,
    /// Wakes the reader task so a stalled (partitioned) connection is closed, not leaked.
    shutdown: tokio::sync::Notify,
    /// When the last answer arrived. A std mutex: set and read without awaiting.
    last_answer: Mutex<tokio::time::Instant>,
}

impl Conn {
    /// No answer at all for `window`: the stream is stalled (a partition), not just one slow call.
    fn stalled(&self, window: Duration) -> bool {
        let last = *self.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        last.elapsed() >= window
    }
}

impl Conn {
    fn fail_all(&self) {
        self.dead.store(true, Ordering::Relaxed);
        self.shutdown.notify_one();
        let drained = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        drop(drained);
    }
}

/// A client of one remote node. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RpcClient {
    /// Where the node is; clones share it, and [`RpcClient::repoint`] moves them all. A std
    /// mutex: never held across await.
    addr: Arc<Mutex<SocketAddr>>,
    /// The node this client must find at `addr` (its certificate names it), if it checks.
    expect: Option<tls::Principal>,
    /// This node's certificate: how the remote node knows who calls.
    tls: NodeTls,
    /// A tokio mutex: held across the connect so concurrent callers dial once.
    slot: Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RpcClient({})", self.addr())
    }
}

impl RpcClient {
    pub fn new(addr: SocketAddr, tls: NodeTls) -> Self {
        Self {
            addr: Arc::new(Mutex::new(addr)),
            expect: None,
            tls,
            slot: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// A client of node `who`, first looked for at `addr`: a connection to a node whose
    /// certificate names anyone else fails (`PermissionDenied`). For addresses that can move
    /// ([`RpcClient::repoint`]).
    pub fn to_node(addr: SocketAddr, tls: NodeTls, who: tls::Principal) -> Self {
        Self {
            expect: Some(who),
            ..Self::new(addr, tls)
        }
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node moved to `addr`: this client and its clones call it there from now on, on a
    /// new connection (calls in flight on the old one fail). False if it was already there.
    ///
    /// The address changes at once (callers that dial from now on dial it); the connection
    /// in place, or one a dial in flight installs, is failed next (one redial if that dial
    /// already went to the new address). Nothing waits when the address did not change.
    pub async fn repoint(&self, addr: SocketAddr) -> bool {
        {
            let mut at = self.addr.lock().unwrap_or_else(|p| p.into_inner());
            if *at == addr {
                return false;
            }
            *at = addr;
        }
        if let Some(old) = self.slot.lock().await.take() {
            old.fail_all();
        }
        true
    }

    /// Calls with the default deadline.
    pub async fn call(&self, req: Request) -> Result<Response, RpcError> {
        self.call_timeout(req, CALL_TIMEOUT).await
    }

    /// Calls and turns `Response::Error` into `RpcError::Remote`.
    pub async fn call_timeout(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, RpcError> {
        let conn = self.conn().await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let bytes = serde_json::to_vec(&Envelope { id, body: req }).expect("requests serialize");
        if conn.out.send(Bytes::from(bytes)).await.is_err() {
            self.drop_conn(&conn).await;
            return Err(RpcError::Closed(self.addr()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Response::Error { code, detail })) => Err(RpcError::Remote { code, detail }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(RpcError::Closed(self.addr())),
            Err(_) => {
                conn.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                // A partition stalls the stream silently: start over on a fresh connection. But
                // one slow call on a live connection must not fail every other call on it.
                if conn.stalled(timeout) {
                    self.drop_conn(&conn).await;
                }
                Err(RpcError::Timeout(self.addr()))
            }
        }
    }

    async fn drop_conn(&self, conn: &Arc<Conn>) {
        conn.fail_all();
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
    }

    async fn conn(&self) -> Result<Arc<Conn>, RpcError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.dead.load(Ordering::Relaxed) {
                return Ok(c.clone());
            }
        }
        let addr = self.addr();
        let dial = async {
            let tcp = net::connect(addr).await?;
            self.tls.connect_to(tcp, self.expect).await
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(RpcError::Connect { addr, source }),
            Err(_) => return Err(RpcError::Timeout(addr)),
        };
        let conn = start(stream);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// The certificate this client dials with.
    pub fn tls(&self) -> &NodeTls {
        &self.tls
    }
}

fn start(stream: SecureStream) -> Arc<Conn> {
    let (sink, mut frames) = Framed::new(stream, codec()).split();
    let (out, rx) = mpsc::channel::<Bytes>(RPC_IN_FLIGHT_MAX);
    let conn = Arc::new(Conn {
        out,
        pending: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(1),
        dead: AtomicBool::new(false),
        shutdown: tokio::sync::Notify::new(),
        last_answer: Mutex::new(tokio::time::Instant::now()),
    });
    tokio::spawn(write_frames(sink, rx));
    let reader = conn.clone();
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                biased;
                _ = reader.shutdown.notified() => break,
                f = frames.next() => f,
            };
            let Some(Ok(frame)) = frame else { break };
            let Ok(env) = decode_response(&frame) else {
                tracing::warn!("malformed rpc response; closing connection");
                break;
            };
            *reader.last_answer.lock().unwrap_or_else(|p| p.into_inner()) =
                tokio::time::Instant::now();
            let waiter = reader
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&env.id);
            if let Some(w) = waiter {
                let _ = w.send(env.body);
            }
        }
        reader.fail_all();
    });
    conn
}
