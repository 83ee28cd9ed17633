//! Proves, on real TCP sockets against a `chatd all-in-one` process, that bad input is answered
//! as in the simulation and leaves the server healthy. Each test starts its own process (so
//! its error counters are its own), sends one family of bad input through the client library
//! or, for what that library would refuse to send, through raw tokio-tungstenite or TCP, and
//! checks: the error code each refusal names, whether the connection was closed or stays
//! usable, that `/metrics` counted the errors by code, that `/healthz` answers ok, and that a
//! well-behaved client on another connection can still sign up, connect, send and receive.
//!
//! Families: oversize frames and texts; a client that never reads while others flood it
//! (disconnected with bounded server memory: VmRSS is sampled and logged); send floods above
//! the rate limit and junk/binary frame floods; bad tokens, no hello, and bad HTTP requests
//! (bad bearer tokens, malformed and oversize bodies).
//!
//! Nothing asserts a timing: deadlines only bound how long a test waits for an outcome.

#![cfg(not(madsim))]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nodes::api::throttle::{ADDR_FAILURES_MAX, LOGIN_FAILURES_MAX};
use nodes::auth::TokenKey;
use nodes::client::http::HttpClient;
use nodes::client::ws::{Incoming, WsConn};
use nodes::client::ClientError;
use nodes::limits::{
    API_BODY_BYTES_MAX, API_BODY_READ_TIMEOUT_MS, CONTROL_FRAMES_PER_SECOND_MAX,
    DEVICES_PER_USER_MAX, GROUP_NAME_CHARS_MAX, MESSAGE_CHARS_MAX, SENDS_PER_SECOND_MAX,
    SESSION_OUTBOX_MAX, SYNC_BURST_MAX, WS_FRAME_BYTES_MAX, WS_WRITE_TIMEOUT_MS,
};
use nodes::proto::client::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ------------------------------------------------------------------ the server process

/// Ports one server uses: discovery at the base ... kv shards, and the api at base + 20.
const PORT_BLOCK: u16 = 21;

mod common;

fn free_base() -> u16 {
    common::free_base(PORT_BLOCK)
}

struct Server {
    child: Child,
    http: SocketAddr,
    _data: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let data = tempfile::tempdir().expect("temp dir");
        let base = free_base();
        let (child, http) = common::spawn_all_in_one(data.path(), base, "error");
        let server = Server {
            child,
            http,
            _data: data,
        };
        wait_ready(http).await;
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn data(&self) -> &Path {
        self._data.path()
    }

    /// The key the server signs tokens with (key id 1, the secret in `<data>/token.secret`).
    fn token_key(&self) -> TokenKey {
        let secret = std::fs::read(self.data().join("token.secret")).expect("token secret");
        TokenKey::new(1, secret)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(http: SocketAddr) {
    for _ in 0..400 {
        let c = HttpClient::new(http);
        let login = LoginRequest {
            name: "nobody".into(),
            password: "x".into(),
            device: None,
        };
        let r: Result<LoginResponse, _> = c.post("/v1/login", &login).await;
        if matches!(r, Err(ClientError::Refused { .. })) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chatd did not become ready at {http}");
}

/// The server's resident set, in KiB (`VmRSS` of /proc/<pid>/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Kernel queues (send, receive) of the loopback TCP socket `local_port` -> `remote_port`,
/// from /proc/net/tcp.
fn tcp_queues(local_port: u16, remote_port: u16) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 || port(f[1])? != local_port || port(f[2])? != remote_port {
            return None;
        }
        let (tx, rx) = f[4].split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

// ------------------------------------------------------------------ raw HTTP

struct RawResponse {
    status: u16,
    content_type: String,
    /// The `Retry-After` header, in seconds.
    retry_after: Option<u64>,
    body: Vec<u8>,
}

impl RawResponse {
    /// The `{"error": code, "detail": ...}` body; panics if the body is not one.
    fn error(&self) -> ErrorBody {
        assert!(
            self.content_type.starts_with("application/json"),
            "status {} with content type {:?}: {}",
            self.status,
            self.content_type,
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: not an error body ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Writes `head` (a request's line and headers, and whatever of a body) on a fresh connection
/// and returns what comes back within `wait`, and how long the answer took.
async fn raw_http_head(addr: SocketAddr, head: &str, wait: Duration) -> (String, Duration) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect api");
    let t0 = Instant::now();
    tcp.write_all(head.as_bytes()).await.expect("write head");
    let (answer, _) = read_answer(&mut tcp, wait).await;
    (String::from_utf8_lossy(&answer).to_string(), t0.elapsed())
}

/// Reads until the server closes or `wait` is up; whether it closed in time.
async fn read_answer(tcp: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (answer, closed)
}

/// One HTTP/1.1 request on its own connection, written and read by hand, so any header and
/// any body can be sent and the answer is seen as it is.
async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    raw_http_from(None, addr, method, path, headers, body).await
}

/// [`raw_http`] from source address `from` (another loopback address: throttles per address
/// must not lock out the other tests sharing the server).
async fn raw_http_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut tcp = match from {
        None => TcpStream::connect(addr).await.expect("connect api"),
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4().expect("a socket");
            s.bind(SocketAddr::new(ip, 0))
                .expect("bind the source address");
            s.connect(addr).await.expect("connect api")
        }
    };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    // The server may answer (and close) before reading a body it refuses: a failed write is
    // fine as long as the answer can be read.
    let _ = tcp.write_all(&request).await;
    let (answer, closed) = read_answer(&mut tcp, Duration::from_secs(10)).await;
    assert!(closed, "{method} {path}: no answer within 10 s");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {path}: no HTTP answer: {:?}",
                String::from_utf8_lossy(&answer)
            )
        });
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let retry_after = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().ok())
            .flatten()
    });
    let mut body = answer[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        content_type,
        retry_after,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// The value of one sample of `/metrics` (`name` with its labels, as printed), 0 if absent.
/// `/metrics` is served on the api's admin address (all-in-one: the port below the api's),
/// not on the public one.
async fn metric(http: SocketAddr, sample: &str) -> f64 {
    let public = raw_http(http, "GET", "/metrics", &[], b"").await;
    assert_eq!(public.status, 404, "/metrics on the public address");
    let admin = SocketAddr::new(http.ip(), http.port() - 1);
    let r = raw_http(admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200, "/metrics");
    let text = String::from_utf8(r.body).expect("metrics are text");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().expect("a number"))
        })
        .unwrap_or(0.0)
}

async fn errors_counted(http: SocketAddr, code: ErrorCode) -> u64 {
    metric(
        http,
        &format!("chatsim_errors_total{{code=\"{}\"}}", code.as_str()),
    )
    .await as u64
}

async fn assert_healthy(http: SocketAddr) {
    let r = raw_http(http, "GET", "/healthz", &[], b"").await;
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).trim()),
        (200, "ok"),
        "/healthz"
    );
}

// ------------------------------------------------------------------ users and devices

async fn signup(http: SocketAddr, name: &str) -> u64 {
    let r: SignupResponse = HttpClient::new(http)
        .post(
            "/v1/signup",
            &SignupRequest {
                name: name.into(),
                password: format!("{name}-pw"),
            },
        )
        .await
        .expect("signup");
    r.user
}

/// Logs in as a new device; answers an authenticated api client and the login.
async fn login(http: SocketAddr, name: &str) -> (HttpClient, LoginResponse) {
    login_as(http, name, None).await
}

/// Logs in as `device` (None: a new device); answers an authenticated api client and the login.
async fn login_as(
    http: SocketAddr,
    name: &str,
    device: Option<u64>,
) -> (HttpClient, LoginResponse) {
    let r: LoginResponse = HttpClient::new(http)
        .post(
            "/v1/login",
            &LoginRequest {
                name: name.into(),
                password: format!("{name}-pw"),
                device,
            },
        )
        .await
        .expect("login");
    let mut authed = HttpClient::new(http);
    authed.token = Some(r.token.clone());
    (authed, r)
}

/// `a` asks `b` to be friends and `b` accepts (adds `a` back); answers their 1:1 channel.
async fn befriend(a: &HttpClient, b: &HttpClient) -> u64 {
    let me = |h: &HttpClient| {
        let h = h.clone();
        async move { h.get::<Profile>("/v1/me").await.expect("profile").user }
    };
    let (a_user, b_user) = (me(a).await, me(b).await);
    let asked: AddFriendResponse = a
        .post("/v1/friends", &AddFriendRequest { user: b_user })
        .await
        .expect("friend request");
    assert_eq!(asked.status, FriendStatus::Requested);
    let r: AddFriendResponse = b
        .post("/v1/friends", &AddFriendRequest { user: a_user })
        .await
        .expect("accept");
    assert_eq!(r.status, FriendStatus::Friends);
    r.channel.expect("friends have a channel")
}

/// Asks for a chat server, retrying while none is live yet (just after start).
async fn chat_url(http: &HttpClient) -> String {
    for _ in 0..150 {
        match http.get::<ChatServerResponse>("/v1/chat-server").await {
            Ok(cs) => return cs.url,
            Err(ClientError::Refused {
                code: ErrorCode::NoChatServer,
                ..
            }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("chat server lookup failed: {e}"),
        }
    }
    panic!("no chat server became live");
}

fn hello(token: &str) -> ClientFrame {
    ClientFrame::Hello {
        token: token.into(),
        connection: 0,
    }
}

/// Connects with the client library and authenticates.
async fn connect(http: &HttpClient, token: &str) -> WsConn {
    let mut ws = WsConn::connect(&chat_url(http).await, None)
        .await
        .expect("ws connect");
    ws.send(&hello(token)).await.expect("hello");
    match next(&mut ws).await {
        ServerFrame::Welcome { .. } => ws,
        other => panic!("expected welcome, got {other:?}"),
    }
}

async fn next(ws: &mut WsConn) -> ServerFrame {
    match tokio::time::timeout(Duration::from_secs(20), ws.recv()).await {
        Ok(Incoming::Frame(f)) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// Reads frames until one matches (presence and other frames in between are skipped).
async fn until<T>(ws: &mut WsConn, mut f: impl FnMut(ServerFrame) -> Option<T>) -> T {
    for _ in 0..10_000 {
        if let Some(t) = f(next(ws).await) {
            return t;
        }
    }
    panic!("no matching frame in 10,000");
}

/// The next error frame's code; panics on an ack (the send should have been refused).
async fn next_error(ws: &mut WsConn) -> (ErrorCode, Option<u64>) {
    until(ws, |f| match f {
        ServerFrame::Error {
            code,
            client_msg_id,
            ..
        } => Some((code, client_msg_id)),
        ServerFrame::Ack { client_msg_id, .. } => {
            panic!("send {client_msg_id} acknowledged, expected a refusal")
        }
        _ => None,
    })
    .await
}

/// Sends and waits for the ack; answers the seq. Retries `unavailable` and `rate_limited`
/// with the same `client_msg_id`, as a real client's outbox does.
async fn send_acked(ws: &mut WsConn, client_msg_id: u64, channel: u64, text: &str) -> u64 {
    for _ in 0..50 {
        let send = ClientFrame::Send {
            client_msg_id,
            channel,
            text: text.into(),
        };
        ws.send(&send).await.expect("send");
        let answer = until(ws, |f| match f {
            ServerFrame::Ack {
                client_msg_id: id,
                seq,
                ..
            } if id == client_msg_id => Some(Ok(seq)),
            ServerFrame::Error {
                code,
                client_msg_id: Some(id),
                ..
            } if id == client_msg_id => Some(Err(code)),
            _ => None,
        })
        .await;
        match answer {
            Ok(seq) => return seq,
            Err(code) if code.retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(code) => panic!("send {client_msg_id} refused with {code:?}"),
        }
    }
    panic!("send {client_msg_id} never acknowledged");
}

/// The next delivered message.
async fn next_message(ws: &mut WsConn) -> ChatMessage {
    until(ws, |f| match f {
        ServerFrame::Message(m) => Some(m),
        _ => None,
    })
    .await
}

/// Every message of a channel, through the api's history pages.
async fn history(http: &HttpClient, channel: u64) -> Vec<ChatMessage> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |m: &ChatMessage| m.seq);
        let page: HistoryResponse = http
            .get(&format!(
                "/v1/channels/{channel}/messages?after_seq={after}"
            ))
            .await
            .expect("history");
        if page.messages.is_empty() {
            return all;
        }
        all.extend(page.messages);
    }
}

/// The server stays usable for everyone else: two new users sign up, befriend, connect, and
/// one's message reaches the other.
async fn well_behaved_pair_chats(http: SocketAddr, tag: &str) {
    let (a_name, b_name) = (format!("{tag}-a"), format!("{tag}-b"));
    signup(http, &a_name).await;
    signup(http, &b_name).await;
    let (a_http, a) = login(http, &a_name).await;
    let (b_http, b) = login(http, &b_name).await;
    let channel = befriend(&a_http, &b_http).await;
    let mut a_ws = connect(&a_http, &a.token).await;
    let mut b_ws = connect(&b_http, &b.token).await;
    let text = format!("{tag}: still working");
    send_acked(&mut a_ws, 1, channel, &text).await;
    let got = next_message(&mut b_ws).await;
    assert_eq!((got.channel, got.text.as_str()), (channel, text.as_str()));
    assert_healthy(http).await;
}

// ------------------------------------------------------------------ raw WebSocket

type RawWs = WebSocketStream<TcpStream>;

/// A WebSocket client with no size limits of its own, for frames the library would refuse.
async fn raw_ws(url: &str) -> RawWs {
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("ws url");
    raw_ws_on(url, TcpStream::connect(addr).await.expect("connect")).await
}

async fn raw_ws_on(url: &str, tcp: TcpStream) -> RawWs {
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .expect("websocket handshake");
    ws
}

async fn raw_send(ws: &mut RawWs, frame: &ClientFrame) {
    let text = serde_json::to_string(frame).expect("frames serialize");
    ws.send(Message::text(text)).await.expect("raw send");
}

/// What a raw connection received until it ended (or `wait` passed with nothing new).
#[derive(Debug, Default)]
struct Ending {
    errors: Vec<ErrorCode>,
    messages: usize,
    welcomed: bool,
    closed: bool,
}

async fn read_to_end(ws: &mut RawWs, wait: Duration) -> Ending {
    let mut seen = Ending::default();
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return seen, // Still open.
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                seen.closed = true;
                return seen;
            }
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(&t) {
                Ok(ServerFrame::Error { code, .. }) => seen.errors.push(code),
                Ok(ServerFrame::Message(_)) => seen.messages += 1,
                Ok(ServerFrame::Welcome { .. }) => seen.welcomed = true,
                Ok(_) => {}
                Err(e) => panic!("unparsable server frame ({e}): {t:.200}"),
            },
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// A raw connection that said `hello` and was welcomed.
async fn raw_authed(url: &str, token: &str) -> RawWs {
    let mut ws = raw_ws(url).await;
    raw_send(&mut ws, &hello(token)).await;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Ok(ServerFrame::Welcome { .. }) = serde_json::from_str(&t) {
                    return ws;
                }
            }
            other => panic!("expected welcome, got {other:?}"),
        }
    }
}

// ------------------------------------------------------------------ 1. oversize

// Proves: a text of MESSAGE_CHARS_MAX + 1 characters in a legal frame is refused with
// `message_too_long` and the connection stays usable; texts of exactly MESSAGE_CHARS_MAX
// characters of 1- to 4-byte UTF-8, of JSON-escaped control characters, and of emoji written
// as escaped UTF-16 surrogate pairs (12 bytes each) are accepted and delivered intact; a frame
// over WS_FRAME_BYTES_MAX, and a message fragmented into legal
// frames that adds up to more, get `frame_too_large` and are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_and_texts() {
    let server = Server::start().await;
    let http = server.http;
    signup(http, "alice").await;
    signup(http, "bob").await;
    let (alice_http, alice) = login(http, "alice").await;
    let (bob_http, bob) = login(http, "bob").await;
    let channel = befriend(&alice_http, &bob_http).await;
    let mut a = connect(&alice_http, &alice.token).await;
    let mut b = connect(&bob_http, &bob.token).await;

    // One character too many, in a legal frame: refused, connection usable.
    let too_long = ClientFrame::Send {
        client_msg_id: 1,
        channel,
        text: "a".repeat(MESSAGE_CHARS_MAX + 1),
    };
    a.send(&too_long).await.expect("send");
    assert_eq!(
        next_error(&mut a).await,
        (ErrorCode::MessageTooLong, Some(1))
    );
    let too_long_4b = ClientFrame::Send {
        client_msg_id: 2,
        channel,
        text: "😀".repeat(MESSAGE_CHARS_MAX + 1),
    };
    a.send(&too_long_4b).await.expect("send");
    assert_eq!(
        next_error(&mut a).await,
        (ErrorCode::MessageTooLong, Some(2))
    );

    // Exactly the limit, in every width JSON can carry a character in: stored and delivered
    // byte for byte. A control character is sent escaped (`\u0001`, six bytes).
    let mixed: String = "aé中😀\u{1}"
        .chars()
        .cycle()
        .take(MESSAGE_CHARS_MAX)
        .collect();
    let texts = [
        "a".repeat(MESSAGE_CHARS_MAX),
        "é".repeat(MESSAGE_CHARS_MAX),
        "中".repeat(MESSAGE_CHARS_MAX),
        "😀".repeat(MESSAGE_CHARS_MAX),
        "\u{1}".repeat(MESSAGE_CHARS_MAX),
        mixed,
    ];
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(text.chars().count(), MESSAGE_CHARS_MAX);
        let id = 10 + i as u64;
        let frame_bytes = serde_json::to_string(&ClientFrame::Send {
            client_msg_id: id,
            channel,
            text: text.clone(),
        })
        .expect("serialize")
        .len();
        eprintln!("text {i}: {} bytes, frame {frame_bytes} bytes", text.len());
        send_acked(&mut a, id, channel, text).await;
        let got = next_message(&mut b).await;
        assert_eq!(got.client_msg_id, id);
        assert!(got.text == *text, "text {i} delivered intact");
    }

    // The emoji text again, as JSON libraries that escape non-ASCII write it: every
    // character a surrogate pair, `\uD83D\uDE00`, 12 bytes (1.2 MB in all).
    let url = chat_url(&alice_http).await;
    let escaped = format!(
        "{{\"type\":\"send\",\"client_msg_id\":50,\"channel\":{channel},\"text\":\"{}\"}}",
        "\\uD83D\\uDE00".repeat(MESSAGE_CHARS_MAX)
    );
    assert!(escaped.len() > 12 * MESSAGE_CHARS_MAX, "{}", escaped.len());
    let (_, alice4) = login(http, "alice").await;
    let mut raw = raw_authed(&url, &alice4.token).await;
    raw.send(Message::text(escaped)).await.expect("send");
    let got = next_message(&mut b).await;
    assert_eq!(got.client_msg_id, 50);
    assert!(
        got.text == "😀".repeat(MESSAGE_CHARS_MAX),
        "escaped emoji delivered intact"
    );

    // A frame over the limit: `frame_too_large`, then the connection is closed.
    let (_, alice2) = login(http, "alice").await;
    let mut raw = raw_authed(&url, &alice2.token).await;
    let _ = raw
        .send(Message::text("x".repeat(WS_FRAME_BYTES_MAX + 1)))
        .await;
    let end = read_to_end(&mut raw, Duration::from_secs(10)).await;
    assert_eq!(end.errors, vec![ErrorCode::FrameTooLarge], "{end:?}");
    assert!(
        end.closed,
        "an oversize frame closes the connection: {end:?}"
    );

    // Legal frames, a message over the limit in total: the same.
    let (_, alice3) = login(http, "alice").await;
    let mut raw = raw_authed(&url, &alice3.token).await;
    let chunk = "y".repeat(WS_FRAME_BYTES_MAX / 4);
    let mut fragments = 0;
    for i in 0..5 {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(chunk.clone(), opcode, i == 4);
        if raw.send(Message::Frame(frame)).await.is_err() {
            break;
        }
        fragments += 1;
    }
    let end = read_to_end(&mut raw, Duration::from_secs(10)).await;
    eprintln!("fragmented oversize message: {fragments} fragments written");
    assert_eq!(end.errors, vec![ErrorCode::FrameTooLarge], "{end:?}");
    assert!(
        end.closed,
        "an oversize message closes the connection: {end:?}"
    );

    // The first connection was never disturbed.
    send_acked(&mut a, 100, channel, "after the oversize frames").await;
    assert_eq!(next_message(&mut b).await.text, "after the oversize frames");
    assert_eq!(errors_counted(http, ErrorCode::MessageTooLong).await, 2);
    assert_eq!(errors_counted(http, ErrorCode::FrameTooLarge).await, 2);
    well_behaved_pair_chats(http, "oversize").await;
}

// ------------------------------------------------------------------ 2. never reads

/// Text of each flood message; with SESSION_OUTBOX_MAX queued frames that is 16 MiB.
const FLOOD_TEXT_BYTES: usize = 16 * 1024;
const FLOODERS: usize = 6;
/// Each flooder stays under the rate limit.
const FLOOD_SENDS_PER_SECOND: u64 = 40;

// Proves: a device that authenticates and then never reads its socket while six friends
// flood it is disconnected by the server (its session ends, `slow_consumer` is counted)
// even though its socket never drains, so a writer blocked on a full socket cannot hold the
// connection open; the kernel queue and the server's RSS stay bounded during the flood
// (sampled and logged; the RSS bound asserted is generous); what reached the socket can
// still be read, ending in a close; and on reconnect the device syncs every acknowledged
// message, nothing lost. Then /healthz and a new pair of users work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_client_is_disconnected_with_bounded_memory() {
    let server = Server::start().await;
    let http = server.http;
    signup(http, "slow").await;
    let (slow_http, slow) = login(http, "slow").await;
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        let name = format!("flooder{i}");
        signup(http, &name).await;
        let (fh, fl) = login(http, &name).await;
        let channel = befriend(&fh, &slow_http).await;
        flooders.push((fh, fl, channel));
    }

    // The device that never reads: a tiny receive buffer, welcomed, then never polled.
    let url = chat_url(&slow_http).await;
    let ws_addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("ws url");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(ws_addr).await.expect("connect");
    let slow_port = tcp.local_addr().expect("local addr").port();
    let mut slow_ws = raw_ws_on(&url, tcp).await;
    raw_send(&mut slow_ws, &hello(&slow.token)).await;
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), slow_ws.next()).await;
        if let Ok(Some(Ok(Message::Text(t)))) = &f {
            if t.contains("\"welcome\"") {
                break;
            }
        } else {
            panic!("expected welcome, got {f:?}");
        }
    }

    let mut conns = Vec::new();
    for (fh, fl, channel) in &flooders {
        conns.push((connect(fh, &fl.token).await, *channel));
    }
    let sessions_before = metric(http, "chatsim_ws_connections").await;
    assert_eq!(sessions_before, (FLOODERS + 1) as f64);
    let rss_before = rss_kib(server.pid());

    // Sample the server's RSS and the kernel queue of the slow connection while flooding.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (stop, pid) = (stop.clone(), server.pid());
        let server_port = ws_addr.port();
        async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let q = tcp_queues(server_port, slow_port);
                samples.push((rss_kib(pid), q));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            samples
        }
    });
    let started = Instant::now();
    let flood = conns
        .into_iter()
        .enumerate()
        .map(|(i, (mut ws, channel))| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let text = format!("{i}").repeat(FLOOD_TEXT_BYTES);
                let pace = Duration::from_millis(1000 / FLOOD_SENDS_PER_SECOND);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) && sent < 2_000 {
                    let t0 = Instant::now();
                    sent += 1;
                    send_acked(&mut ws, sent, channel, &text).await;
                    tokio::time::sleep(pace.saturating_sub(t0.elapsed())).await;
                }
                (ws, channel, sent)
            })
        })
        .collect::<Vec<_>>();

    // The slow session must end. A generous deadline: the outbox fills within seconds, and a
    // blocked writer gives up after WS_WRITE_TIMEOUT_MS.
    let deadline = Duration::from_millis(WS_WRITE_TIMEOUT_MS) + Duration::from_secs(50);
    let mut disconnected_after = None;
    while started.elapsed() < deadline {
        if metric(http, "chatsim_ws_connections").await == FLOODERS as f64 {
            disconnected_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rss_at_disconnect = rss_kib(server.pid());
    // Flood on a little longer without the slow device: the RSS trend now is what the flood
    // itself costs (storage), to compare with the trend while the slow device was connected.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for f in flood {
        let (ws, channel, sent) = f.await.expect("flooder");
        acked.insert(channel, sent);
        drop(ws);
    }
    let samples = sampler.await.expect("sampler");
    let rss_peak = samples.iter().map(|s| s.0).max().unwrap_or(rss_before);
    let send_q_max = samples.iter().filter_map(|s| s.1).map(|q| q.0).max();
    let flood_msgs: u64 = acked.values().sum();
    eprintln!(
        "slow reader: disconnected after {disconnected_after:?}; {flood_msgs} messages of \
         {FLOOD_TEXT_BYTES} B flooded ({} MiB); server RSS {} MiB before, peak {} MiB, {} MiB \
         at disconnect; kernel send queue of the slow connection at most {send_q_max:?} B",
        (flood_msgs * FLOOD_TEXT_BYTES as u64) >> 20,
        rss_before >> 10,
        rss_peak >> 10,
        rss_at_disconnect >> 10,
    );
    let trace: Vec<String> = samples
        .iter()
        .step_by(5)
        .map(|(rss, q)| format!("{}M/{}K", rss >> 10, q.map_or(0, |q| q.0 >> 10)))
        .collect();
    eprintln!("RSS/send-queue every second: {}", trace.join(" "));
    assert!(
        disconnected_after.is_some(),
        "the server still holds the never-reading connection {deadline:?} after the flood began"
    );
    assert!(errors_counted(http, ErrorCode::SlowConsumer).await >= 1);
    // Generous: the outbox of SESSION_OUTBOX_MAX frames and a few copies of it in flight,
    // plus what storing the flood costs whoever reads it (redb caches what it wrote: RSS grows
    // with the flood at the same rate before and after the slow device is gone), and slack.
    let bound_kib = (4 * SESSION_OUTBOX_MAX * FLOOD_TEXT_BYTES
        + 4 * flood_msgs as usize * FLOOD_TEXT_BYTES) as u64
        / 1024
        + 256 * 1024;
    assert!(
        rss_peak.saturating_sub(rss_before) < bound_kib,
        "server RSS grew by {} KiB, bound {bound_kib} KiB",
        rss_peak - rss_before
    );

    // Reading now: what the kernel held arrives, then the end of the connection.
    let end = read_to_end(&mut slow_ws, Duration::from_secs(10)).await;
    eprintln!(
        "slow reader then read {} messages, errors {:?}, closed {}",
        end.messages, end.errors, end.closed
    );
    assert!(end.closed, "the connection was closed: {end:?}");
    assert!(
        end.errors.iter().all(|c| *c == ErrorCode::SlowConsumer),
        "{end:?}"
    );

    // Reconnected, the device syncs everything that was acknowledged.
    let mut again = connect(&slow_http, &slow.token).await;
    again
        .send(&ClientFrame::Sync {
            cursors: vec![],
            max_message_id: None,
        })
        .await
        .expect("sync");
    let mut synced: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    loop {
        match next(&mut again).await {
            ServerFrame::Message(m) => {
                synced.entry(m.channel).or_default().insert(m.client_msg_id);
            }
            ServerFrame::Synced { .. } => break,
            _ => {}
        }
    }
    for (channel, sent) in &acked {
        let got = synced.get(channel).map_or(0, |s| s.len() as u64);
        assert_eq!(
            got, *sent,
            "channel {channel}: every acked message is synced"
        );
    }
    well_behaved_pair_chats(http, "slow").await;
}

// ------------------------------------------------------------------ 3. floods

// Proves: 500 sends written at once on one connection are each answered once, by an ack or by
// `rate_limited` carrying its client_msg_id; no more are acked than the token bucket allows
// (SENDS_PER_SECOND_MAX, plus that rate for the time taken); resending the refused ones at a
// legal pace gets them all acked on the same connection, and the channel's history holds each
// of the 500 exactly once. 300 junk text frames get 300 `malformed_json`, 100 binary frames
// 100 `binary_frame`, and the connection still sends. /metrics counts each code exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_are_refused_and_the_connection_stays_open() {
    let server = Server::start().await;
    let http = server.http;
    signup(http, "alice").await;
    signup(http, "bob").await;
    let (alice_http, alice) = login(http, "alice").await;
    let (bob_http, _) = login(http, "bob").await;
    let channel = befriend(&alice_http, &bob_http).await;
    let mut a = connect(&alice_http, &alice.token).await;

    const SENDS: u64 = 500;
    let started = Instant::now();
    for id in 1..=SENDS {
        let send = ClientFrame::Send {
            client_msg_id: id,
            channel,
            text: format!("flood {id}"),
        };
        a.send(&send).await.expect("send");
    }
    let (mut acked, mut limited) = (BTreeSet::new(), BTreeSet::new());
    while acked.len() + limited.len() < SENDS as usize {
        match next(&mut a).await {
            ServerFrame::Ack { client_msg_id, .. } => assert!(acked.insert(client_msg_id)),
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                client_msg_id: Some(id),
                channel: Some(ch),
                ..
            } => {
                assert_eq!(ch, channel);
                assert!(limited.insert(id));
            }
            ServerFrame::Error { code, .. } => panic!("unexpected {code:?}"),
            _ => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{SENDS} sends in {elapsed:.2} s: {} acked, {} rate_limited",
        acked.len(),
        limited.len()
    );
    assert!(acked.is_disjoint(&limited));
    let allowed = SENDS_PER_SECOND_MAX as f64 * (1.0 + elapsed) + 1.0;
    assert!(
        acked.len() as f64 <= allowed,
        "{} acked in {elapsed:.2} s, the bucket allows {allowed:.0}",
        acked.len()
    );
    assert!(acked.len() >= SENDS_PER_SECOND_MAX as usize, "the burst");
    assert!(!limited.is_empty(), "sends beyond the rate are refused");
    let mut rate_limited = limited.len() as u64;

    // The client retries the refused ones, at a legal pace, on the same connection.
    let pace = Duration::from_millis(2000 / SENDS_PER_SECOND_MAX as u64);
    for &id in &limited {
        let text = format!("flood {id}");
        loop {
            a.send(&ClientFrame::Send {
                client_msg_id: id,
                channel,
                text: text.clone(),
            })
            .await
            .expect("resend");
            let answer = until(&mut a, |f| match f {
                ServerFrame::Ack { client_msg_id, .. } if client_msg_id == id => Some(None),
                ServerFrame::Error { code, .. } => Some(Some(code)),
                _ => None,
            })
            .await;
            tokio::time::sleep(pace).await;
            match answer {
                None => break,
                Some(ErrorCode::RateLimited) => rate_limited += 1,
                Some(code) => panic!("resend of {id} refused with {code:?}"),
            }
        }
    }
    let stored: Vec<u64> = history(&alice_http, channel)
        .await
        .iter()
        .map(|m| m.client_msg_id)
        .collect();
    let unique: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored.len(), SENDS as usize, "each send stored once");
    assert_eq!(unique, (1..=SENDS).collect(), "every send stored");

    // Junk and binary floods: one refusal each, the connection stays open.
    let junk = [
        "{",
        "",
        "null",
        "[]",
        "42",
        "\"send\"",
        "{\"type\":\"teleport\"}",
        "{\"type\":\"send\"}",
        "{\"type\":\"send\",\"client_msg_id\":\"x\",\"channel\":1,\"text\":\"t\"}",
        "{\"type\":\"send\",\"client_msg_id\":-1,\"channel\":1,\"text\":\"t\"}",
        "{\"type\":\"send\",\"client_msg_id\":99999999999999999999999,\"channel\":1,\"text\":\"t\"}",
        "{\"type\":\"hello\",\"token\":5}",
        "\u{0}\u{1}\u{2}",
        "{\"type\":\"read\",\"channel\":1,\"seq\":1}}",
        "{\"type\":\"presence_query\",\"users\":\"everyone\"}",
    ];
    const JUNK: usize = 300;
    const BINARY: usize = 100;
    for i in 0..JUNK {
        a.send_raw(Message::text(junk[i % junk.len()]))
            .await
            .expect("junk");
    }
    for i in 0..BINARY {
        a.send_raw(Message::binary(vec![i as u8; 1 + i]))
            .await
            .expect("binary");
    }
    let mut refused: BTreeMap<ErrorCode, usize> = BTreeMap::new();
    while refused.values().sum::<usize>() < JUNK + BINARY {
        if let ServerFrame::Error { code, .. } = next(&mut a).await {
            *refused.entry(code).or_default() += 1;
        }
    }
    assert_eq!(
        refused,
        BTreeMap::from([
            (ErrorCode::MalformedJson, JUNK),
            (ErrorCode::BinaryFrame, BINARY)
        ])
    );
    send_acked(&mut a, SENDS + 1, channel, "after the junk").await;

    assert_eq!(
        errors_counted(http, ErrorCode::RateLimited).await,
        rate_limited
    );
    assert_eq!(
        errors_counted(http, ErrorCode::MalformedJson).await,
        JUNK as u64
    );
    assert_eq!(
        errors_counted(http, ErrorCode::BinaryFrame).await,
        BINARY as u64
    );
    well_behaved_pair_chats(http, "flood").await;
}

/// Writes `frames` at once and reads until each got its answer; answers how many were
/// refused `rate_limited` (with the refusals' details) and how many answered otherwise
/// (`answered` says which frames count).
async fn flood(
    ws: &mut WsConn,
    frames: &[ClientFrame],
    mut answered: impl FnMut(&ServerFrame) -> bool,
) -> (usize, usize, BTreeSet<String>) {
    for f in frames {
        ws.send(f).await.expect("flood frame");
    }
    let (mut limited, mut ok, mut details) = (0, 0, BTreeSet::new());
    while limited + ok < frames.len() {
        let f = next(ws).await;
        match &f {
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                detail,
                ..
            } => {
                limited += 1;
                details.insert(detail.clone());
            }
            other if answered(other) => ok += 1,
            _ => {}
        }
    }
    (limited, ok, details)
}

// Proves: heartbeats beyond CONTROL_FRAMES_PER_SECOND_MAX x 2 written at once are refused
// `rate_limited` (each answered once, by an ack or the refusal), syncs beyond SYNC_BURST_MAX
// too, and the connection stays open and sends; and that reconnecting does not refill the
// send bucket: a second connection right after a flood gets far fewer than a fresh burst of
// sends acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_kind_is_throttled_and_reconnecting_refills_nothing() {
    let server = Server::start().await;
    let http = server.http;
    signup(http, "alice").await;
    signup(http, "bob").await;
    let (alice_http, alice) = login(http, "alice").await;
    let (bob_http, _) = login(http, "bob").await;
    let channel = befriend(&alice_http, &bob_http).await;
    let mut a = connect(&alice_http, &alice.token).await;

    let beats = vec![ClientFrame::Heartbeat; 4 * CONTROL_FRAMES_PER_SECOND_MAX as usize];
    let (limited, acked, details) =
        flood(&mut a, &beats, |f| matches!(f, ServerFrame::HeartbeatAck)).await;
    eprintln!(
        "{} heartbeats: {acked} acked, {limited} rate_limited",
        beats.len()
    );
    assert!(limited > 0, "a heartbeat flood is throttled");
    assert!(
        acked >= 2 * CONTROL_FRAMES_PER_SECOND_MAX as usize,
        "the burst passes"
    );
    assert!(
        details
            .iter()
            .all(|d| d.contains("frames other than sends")),
        "{details:?}"
    );

    tokio::time::sleep(Duration::from_secs(3)).await; // the control bucket refills
    let syncs = vec![
        ClientFrame::Sync {
            cursors: Vec::new(),
            max_message_id: None,
        };
        4 * SYNC_BURST_MAX as usize
    ];
    let (limited, synced, details) =
        flood(&mut a, &syncs, |f| matches!(f, ServerFrame::Synced { .. })).await;
    eprintln!(
        "{} syncs: {synced} answered, {limited} rate_limited",
        syncs.len()
    );
    assert!(
        limited > 0 && synced >= SYNC_BURST_MAX as usize,
        "{synced} / {limited}"
    );
    assert!(details.iter().all(|d| d.contains("syncs")), "{details:?}");
    send_acked(&mut a, 1, channel, "still open").await;

    // A send flood, then a new connection at once: the bucket is the device's, not the
    // connection's.
    let sends = |from: u64| -> Vec<ClientFrame> {
        (from..from + 2 * SENDS_PER_SECOND_MAX as u64)
            .map(|id| ClientFrame::Send {
                client_msg_id: id,
                channel,
                text: format!("flood {id}"),
            })
            .collect()
    };
    // The bucket refills from when the first flood drained it (when its frames arrived, not
    // when their acks came back): the clock starts before it, so a slow server cannot make
    // the bound below fail a correct one.
    let t = Instant::now();
    flood(&mut a, &sends(100), |f| {
        matches!(f, ServerFrame::Ack { .. })
    })
    .await;
    drop(a);
    let mut b = connect(&alice_http, &alice.token).await;
    let (_, acked, _) = flood(&mut b, &sends(1000), |f| {
        matches!(f, ServerFrame::Ack { .. })
    })
    .await;
    let waited = t.elapsed().as_secs_f64();
    eprintln!("after reconnecting ({waited:.2} s since the first flood): {acked} acked");
    let refilled = (SENDS_PER_SECOND_MAX as f64 * waited).ceil() as usize + 1;
    assert!(
        acked <= refilled,
        "{acked} acked right after a reconnect; the bucket refills {refilled} in {waited:.2} s"
    );
    well_behaved_pair_chats(http, "throttle").await;
}

// Proves an account holds at most DEVICES_PER_USER_MAX devices: the next login without a
// device id is refused 409 `limit_reached` with the way out in its detail, a login with one
// of them still works, and `DELETE /v1/devices/{device}` frees a place (a stranger's device
// is `unknown_device`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_per_account_are_capped() {
    let server = Server::start().await;
    let http = server.http;
    signup(http, "dave").await;
    let mut devices = Vec::new();
    for _ in 0..DEVICES_PER_USER_MAX {
        devices.push(login(http, "dave").await.1.device);
    }
    let body = serde_json::to_vec(&serde_json::json!({ "name": "dave", "password": "dave-pw" }))
        .expect("json");
    let r = raw_http(http, "POST", "/v1/login", &[], &body).await;
    assert_eq!(
        r.status,
        409,
        "device {} of one account",
        DEVICES_PER_USER_MAX + 1
    );
    assert_eq!(r.error().error, ErrorCode::LimitReached);
    assert!(
        r.error().detail.contains("DELETE /v1/devices"),
        "{:?}",
        r.error()
    );
    let (dave, again) = login_as(http, "dave", Some(devices[3])).await;
    assert_eq!(again.device, devices[3], "the device is kept");
    let bearer = format!("Bearer {}", dave.token.clone().expect("a token"));
    signup(http, "erin").await;
    let erin_device = login(http, "erin").await.1.device;
    let r = raw_http(
        http,
        "DELETE",
        &format!("/v1/devices/{erin_device}"),
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(r.status, 404, "another account's device");
    assert_eq!(r.error().error, ErrorCode::UnknownDevice);
    let r = raw_http(
        http,
        "DELETE",
        &format!("/v1/devices/{}", devices[0]),
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "removing one of dave's devices");
    let fresh = login(http, "dave").await.1.device;
    assert!(
        !devices.contains(&fresh),
        "a new device took the freed place"
    );
}

// ------------------------------------------------------------------ 4. bad tokens

async fn refused_hello(url: &str, token: &str) -> Ending {
    let mut ws = raw_ws(url).await;
    raw_send(&mut ws, &hello(token)).await;
    read_to_end(&mut ws, Duration::from_secs(10)).await
}

// Proves: `hello` with a garbage token, a token signed with another secret, one with an
// unknown key id, and an expired one (signed with the server's own secret) each get their
// code (`bad_token`, `token_expired`) and are closed; frames before `hello` get
// `not_authenticated` and the connection can still say hello; a connection that never says
// hello gets `not_authenticated` and is closed after the hello timeout, and one that never
// finishes the WebSocket handshake is dropped. On HTTP, missing, garbage, foreign and expired
// bearer tokens are 401 with a JSON error body, malformed bodies are 400 `malformed_json`,
// and a body over API_BODY_BYTES_MAX is 413 `body_too_large` (at once when Content-Length
// announces it, even 10 GB), a body that never arrives is 408 `body_timeout` after
// API_BODY_READ_TIMEOUT_MS, and a group name over GROUP_NAME_CHARS_MAX characters or with a
// control character is 400 `bad_request`, and after LOGIN_FAILURES_MAX wrong passwords a
// name is refused 429 `rate_limited`, with its right password too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_bad_requests_are_refused() {
    let server = Server::start().await;
    let http = server.http;
    // Headers complete, the body never sent: answered once the body timeout is up (run
    // alongside the rest).
    let stalled_body = tokio::spawn(raw_http_head(
        http,
        "POST /v1/signup HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{",
        Duration::from_millis(API_BODY_READ_TIMEOUT_MS + 5_000),
    ));
    let alice_user = signup(http, "alice").await;
    let (alice_http, alice) = login(http, "alice").await;
    let url = chat_url(&alice_http).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let key = server.token_key();
    let day_ms = 24 * 3600 * 1000;
    let foreign = TokenKey::new(1, "another deployment's secret, 32+ chars");
    let foreign_token = foreign.sign(alice_user, alice.device, now_ms + day_ms);
    let other_key_id = TokenKey::new(
        2,
        std::fs::read(server.data().join("token.secret")).unwrap(),
    )
    .sign(alice_user, alice.device, now_ms + day_ms);
    let expired = key.sign(alice_user, alice.device, now_ms - 1000);
    // The key read back from disk is the server's: a fresh token from it is accepted.
    let forged_valid = key.sign(alice_user, alice.device, now_ms + day_ms);
    drop(raw_authed(&url, &forged_valid).await);

    // Silent connections, started first: their timeouts run while the rest is checked.
    let silent_hello = tokio::spawn({
        let url = url.clone();
        async move {
            let mut ws = raw_ws(&url).await;
            let t0 = Instant::now();
            let end = read_to_end(&mut ws, Duration::from_secs(30)).await;
            (end, t0.elapsed())
        }
    });
    let silent_tcp = tokio::spawn({
        let addr: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("ws url");
        async move {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await;
            matches!(r, Ok(Ok(0)) | Ok(Err(_)))
        }
    });

    let cases = [
        (
            "garbage",
            "not a token at all".to_string(),
            ErrorCode::BadToken,
        ),
        (
            "tampered",
            format!("00{}", &forged_valid[2..]),
            ErrorCode::BadToken,
        ),
        ("another secret", foreign_token.clone(), ErrorCode::BadToken),
        ("unknown key id", other_key_id.clone(), ErrorCode::BadToken),
        ("expired", expired.clone(), ErrorCode::TokenExpired),
    ];
    for (what, token, code) in &cases {
        let end = refused_hello(&url, token).await;
        assert_eq!(end.errors, vec![*code], "{what}: {end:?}");
        assert!(end.closed && !end.welcomed, "{what} closes: {end:?}");
    }

    // Frames before hello are refused, and hello still works afterwards.
    let mut ws = raw_ws(&url).await;
    raw_send(&mut ws, &ClientFrame::Heartbeat).await;
    ws.send(Message::text("{nope")).await.expect("junk");
    ws.send(Message::binary(vec![0u8; 8]))
        .await
        .expect("binary");
    raw_send(&mut ws, &hello(&alice.token)).await;
    let end = read_to_end(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(
        end.errors,
        vec![
            ErrorCode::NotAuthenticated,
            ErrorCode::MalformedJson,
            ErrorCode::BinaryFrame
        ],
        "{end:?}"
    );
    assert!(end.welcomed && !end.closed, "{end:?}");
    drop(ws);

    // HTTP: bad bearer tokens are 401 with a JSON error body.
    let bearer = |t: &str| format!("Bearer {t}");
    // (what, Authorization header, the code it gets)
    let auth_cases = [
        ("no header", None, ErrorCode::NotAuthenticated),
        (
            "not bearer",
            Some("Basic YWxpY2U6cHc=".to_string()),
            ErrorCode::NotAuthenticated,
        ),
        ("garbage", Some(bearer("garbage")), ErrorCode::BadToken),
        (
            "another secret",
            Some(bearer(&foreign_token)),
            ErrorCode::BadToken,
        ),
        (
            "unknown key id",
            Some(bearer(&other_key_id)),
            ErrorCode::BadToken,
        ),
        ("expired", Some(bearer(&expired)), ErrorCode::TokenExpired),
    ];
    let mut http_bad_token = 0;
    for (what, header, code) in &auth_cases {
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|v| ("authorization", v.as_str()))
            .collect();
        for (method, path, body) in [
            ("GET", "/v1/me", &b""[..]),
            ("GET", "/v1/chat-server", b""),
            ("POST", "/v1/friends", b"{\"user\":1}"),
        ] {
            let r = raw_http(http, method, path, &headers, body).await;
            assert_eq!(r.status, 401, "{what}: {method} {path}");
            assert_eq!(r.error().error, *code, "{what}: {method} {path}");
            if *code == ErrorCode::BadToken {
                http_bad_token += 1;
            }
        }
    }

    // HTTP bodies: malformed JSON is 400 `malformed_json`; too large is 413 `body_too_large`.
    let authed = [("authorization", bearer(&alice.token))];
    let authed: Vec<(&str, &str)> = authed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let malformed: [&[u8]; 5] = [
        b"",
        b"{oops",
        b"{\"name\":5,\"password\":\"x\"}",
        b"[]",
        b"\xff\xfe",
    ];
    let mut http_malformed = 0;
    for body in malformed {
        for (path, headers) in [
            ("/v1/signup", &[][..]),
            ("/v1/login", &[][..]),
            ("/v1/groups", &authed[..]),
        ] {
            let r = raw_http(http, "POST", path, headers, body).await;
            let what = format!("POST {path} {:?}", String::from_utf8_lossy(body));
            assert_eq!(r.status, 400, "{what}");
            assert_eq!(r.error().error, ErrorCode::MalformedJson, "{what}");
            http_malformed += 1;
        }
    }
    let mut http_too_large = 0;
    for size in [API_BODY_BYTES_MAX + 1, 4 << 20] {
        for (path, headers) in [("/v1/signup", &[][..]), ("/v1/groups", &authed[..])] {
            let mut body = b"{\"name\":\"".to_vec();
            body.resize(size - 2, b'x');
            body.extend_from_slice(b"\"}");
            let r = raw_http(http, "POST", path, headers, &body).await;
            assert_eq!(r.status, 413, "POST {path} with {size} bytes");
            assert_eq!(r.error().error, ErrorCode::BodyTooLarge, "{path} {size}");
            http_too_large += 1;
        }
    }
    // A body at the limit is read (and judged on its content).
    let mut body = b"{\"name\":\"".to_vec();
    body.resize(API_BODY_BYTES_MAX - 2, b'x');
    body.extend_from_slice(b"\"}");
    let r = raw_http(http, "POST", "/v1/signup", &[], &body).await;
    assert_eq!(r.status, 400, "a body at the limit is parsed");
    assert_eq!(r.error().error, ErrorCode::MalformedJson, "no password");
    http_malformed += 1;

    // A body announced far over the limit: refused before any of it is read.
    let (answer, took) = raw_http_head(
        http,
        "POST /v1/signup HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000000\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    assert!(
        took < Duration::from_secs(5),
        "answered at once, not after the body"
    );
    http_too_large += 1;
    let (answer, took) = stalled_body.await.expect("stalled body");
    eprintln!("a body that never arrives: answered after {took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        took >= Duration::from_millis(API_BODY_READ_TIMEOUT_MS - 100),
        "{took:?}"
    );

    // Group names: at most GROUP_NAME_CHARS_MAX characters, none a control character.
    for (name, ok) in [
        ("é".repeat(GROUP_NAME_CHARS_MAX), true),
        ("é".repeat(GROUP_NAME_CHARS_MAX + 1), false),
        ("tab\there".to_string(), false),
        ("bell\u{7}".to_string(), false),
        (String::new(), false),
    ] {
        let body =
            serde_json::to_vec(&serde_json::json!({ "name": name, "members": [] })).expect("json");
        let r = raw_http(http, "POST", "/v1/groups", &authed, &body).await;
        if ok {
            assert_eq!(r.status, 200, "group name {name:?}");
        } else {
            assert_eq!(r.status, 400, "group name {name:?}");
            assert_eq!(r.error().error, ErrorCode::BadRequest, "{name:?}");
        }
    }

    // Password guessing: LOGIN_FAILURES_MAX wrong passwords are 401, then the name is locked
    // (429 `rate_limited`, the right password too); other names are not.
    signup(http, "mallory-target").await;
    let login_body = |name: &str, password: &str| {
        serde_json::to_vec(&serde_json::json!({ "name": name, "password": password }))
            .expect("json")
    };
    for k in 0..LOGIN_FAILURES_MAX {
        let r = raw_http(
            http,
            "POST",
            "/v1/login",
            &[],
            &login_body("mallory-target", "guess"),
        )
        .await;
        assert_eq!(r.status, 401, "wrong password {k}");
    }
    for password in ["guess", "mallory-target-pw"] {
        let r = raw_http(
            http,
            "POST",
            "/v1/login",
            &[],
            &login_body("mallory-target", password),
        )
        .await;
        assert_eq!(r.status, 429, "locked name, password {password:?}");
        assert_eq!(r.error().error, ErrorCode::RateLimited);
        assert!(
            r.retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "429 carries Retry-After: {:?}",
            r.retry_after
        );
    }
    let r = raw_http(
        http,
        "POST",
        "/v1/login",
        &[],
        &login_body("alice", "alice-pw"),
    )
    .await;
    assert_eq!(r.status, 200, "another name logs in");

    // Credential stuffing: one address (127.0.0.77, used by nothing else) guessing many names
    // is locked after ADDR_FAILURES_MAX failures, whatever the name, the right password too;
    // a name with characters no name may have counts against the address and never reaches
    // the table as a name. Other addresses still log in.
    let stuffer: std::net::IpAddr = [127, 0, 0, 77].into();
    let mut guesses = 0;
    let locked = loop {
        let name = if guesses % 2 == 0 {
            format!("nobody-{guesses}")
        } else {
            format!("addr:127.0.0.{guesses}")
        };
        let r = raw_http_from(
            Some(stuffer),
            http,
            "POST",
            "/v1/login",
            &[],
            &login_body(&name, "guess"),
        )
        .await;
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 401, "guess {guesses}");
        guesses += 1;
        assert!(guesses <= ADDR_FAILURES_MAX, "the address is never locked");
    };
    assert!(
        locked.error().detail.contains("this address"),
        "{:?}",
        locked.error()
    );
    assert!(locked.retry_after.is_some_and(|s| (1..=60).contains(&s)));
    assert_eq!(
        guesses, ADDR_FAILURES_MAX,
        "locked after exactly its failures"
    );
    let r = raw_http_from(
        Some(stuffer),
        http,
        "POST",
        "/v1/login",
        &[],
        &login_body("alice", "alice-pw"),
    )
    .await;
    assert_eq!(r.status, 429, "the address is locked for every name");
    let r = raw_http(
        http,
        "POST",
        "/v1/login",
        &[],
        &login_body("alice", "alice-pw"),
    )
    .await;
    assert_eq!(r.status, 200, "other addresses still log in");

    // The silent connections.
    let (end, after) = silent_hello.await.expect("silent hello");
    eprintln!("no hello: {end:?} after {after:?}");
    assert_eq!(end.errors, vec![ErrorCode::NotAuthenticated], "{end:?}");
    assert!(end.closed, "a connection without hello is closed: {end:?}");
    assert!(
        silent_tcp.await.expect("silent tcp"),
        "a connection without a WebSocket handshake is dropped"
    );

    let ws_bad_token = 4;
    assert_eq!(
        errors_counted(http, ErrorCode::BadToken).await,
        ws_bad_token + http_bad_token
    );
    assert_eq!(
        errors_counted(http, ErrorCode::TokenExpired).await,
        1 + 3,
        "one hello, three HTTP requests"
    );
    assert_eq!(
        errors_counted(http, ErrorCode::NotAuthenticated).await,
        2 + 2 * 3,
        "a frame before hello, a silent connection; six HTTP requests"
    );
    assert_eq!(
        errors_counted(http, ErrorCode::MalformedJson).await,
        1 + http_malformed
    );
    assert_eq!(
        errors_counted(http, ErrorCode::BodyTooLarge).await,
        http_too_large
    );
    well_behaved_pair_chats(http, "tokens").await;
}

// ------------------------------------------------------------------ node ports

/// The review's critical finding: anyone who reached a kv port could replace a password hash
/// with `put_user` and take the account over. The node ports now speak mutual TLS only: an
/// outsider with the old JSON frames, or with TLS but no certificate of the cluster's CA, is
/// not answered and changes nothing; the operator's certificate (created by chatd in
/// `<data>/tls`) is answered.
#[tokio::test]
async fn an_outsider_on_a_node_port_takes_nothing_over() {
    use nodes::proto::internal::{Request, Response, UserRecord};
    use nodes::rpc::{call_on_stream, RpcClient};
    use nodes::tls::{connect_anonymous, NodeCert, NodeTls, Principal};
    let server = Server::start().await;
    // `chatd all-in-one`'s layout: kv node 0 at base + 9 (the api at base + 20).
    let kv = SocketAddr::from(([127, 0, 0, 1], server.http.port() - 20 + 9));
    let user = signup(server.http, "victim").await;
    let takeover = |shard| Request::Shard {
        shard,
        req: Box::new(Request::PutUser {
            record: UserRecord {
                user,
                name: "victim".into(),
                password_hash: "attacker-chosen".into(),
                devices: Vec::new(),
                friends: BTreeMap::new(),
                channels: Vec::new(),
                push_targets: BTreeMap::new(),
                revoked_before_ms: BTreeMap::new(),
                friend_requests: BTreeMap::new(),
                group_invites: BTreeMap::new(),
                revoked_all_before_ms: 0,
            },
        }),
    };
    let wait = Duration::from_secs(3);
    let tcp = nodes::net::connect(kv).await.expect("the kv port is open");
    assert_eq!(call_on_stream(tcp, takeover(0), wait).await, None, "plain");
    let tls_dir = server.data().join("tls");
    let read =
        |f: &str| std::fs::read_to_string(tls_dir.join(f)).expect("chatd wrote its certificates");
    let ca = NodeCert::from_pem(
        &read("ca.crt"),
        &read("operator.crt"),
        &read("operator.key"),
    )
    .expect("the operator's certificate");
    let tcp = nodes::net::connect(kv).await.expect("the kv port is open");
    if let Ok(tls) = connect_anonymous(&ca.ca, tcp).await {
        assert_eq!(
            call_on_stream(tls, takeover(0), wait).await,
            None,
            "anonymous"
        );
    }
    // The account is still the victim's.
    let (_, r) = login(server.http, "victim").await;
    assert_eq!(r.user, user);
    // The operator's certificate is answered.
    let operator = NodeTls::new(ca, false).expect("a TLS config");
    assert_eq!(operator.principal(), Principal::Operator);
    match RpcClient::new(kv, operator).call(Request::KvStatus).await {
        Ok(Response::KvStatus(list)) => assert!(!list.is_empty()),
        other => panic!("the operator was not answered: {other:?}"),
    }
}

// ------------------------------------------------------------------ tokens

/// The review's finding: a token kept working after logout, over HTTP and WebSocket. Now
/// `POST /v1/logout` revokes the device's tokens and ends its live session within the call
/// (`token_revoked`); the old token is refused by the api and at `hello`; another device of
/// the user is untouched until "log out everywhere", which ends it too.
#[tokio::test]
async fn logout_revokes_the_token_and_ends_the_session() {
    let server = Server::start().await;
    let user = signup(server.http, "leaver").await;
    let (http_a, a) = login(server.http, "leaver").await;
    let (http_b, b) = login(server.http, "leaver").await;
    assert_eq!((a.user, b.user), (user, user));
    let mut ws_a = connect(&http_a, &a.token).await;
    let mut ws_b = connect(&http_b, &b.token).await;

    let t = Instant::now();
    let out: LogoutResponse = http_a.post("/v1/logout", &()).await.expect("logout");
    assert_eq!((out.user, out.device), (user, Some(a.device)));
    let (code, _) = until(&mut ws_a, |f| match f {
        ServerFrame::Error { code, .. } => Some((code, ())),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::TokenRevoked);
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), ws_a.recv()).await,
        Ok(Incoming::Closed)
    ));
    eprintln!("logout ended the live session in {:?}", t.elapsed());
    // The old token, over HTTP and at hello.
    match http_a.get::<Profile>("/v1/me").await {
        Err(ClientError::Refused {
            status: 401,
            code: ErrorCode::TokenRevoked,
            ..
        }) => {}
        other => panic!("a revoked token was answered: {other:?}"),
    }
    let mut again = WsConn::connect(&chat_url(&http_b).await, None)
        .await
        .expect("ws");
    again.send(&hello(&a.token)).await.expect("hello");
    assert!(matches!(
        next(&mut again).await,
        ServerFrame::Error {
            code: ErrorCode::TokenRevoked,
            ..
        }
    ));
    // The other device still works; a new login of the first works too.
    let _: Profile = http_b
        .get("/v1/me")
        .await
        .expect("device b is still logged in");
    let (http_a2, a2) = login_as(server.http, "leaver", Some(a.device)).await;
    let _: Profile = http_a2.get("/v1/me").await.expect("a new login works");
    // Everywhere: device b's session ends, and both tokens are refused.
    let out: LogoutResponse = http_b
        .post("/v1/logout?everywhere=true", &())
        .await
        .expect("logout everywhere");
    assert_eq!(out.device, None);
    let (code, _) = until(&mut ws_b, |f| match f {
        ServerFrame::Error { code, .. } => Some((code, ())),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::TokenRevoked);
    for h in [&http_a2, &http_b] {
        assert!(matches!(
            h.get::<Profile>("/v1/me").await,
            Err(ClientError::Refused { status: 401, .. })
        ));
    }
    drop(a2);
}

// ------------------------------------------------------------------ connections per address

/// One host cannot hold more than `WS_CONNECTIONS_PER_ADDR_MAX` connections open on a chat
/// server: the next is closed before anything is read (and counted), while other addresses
/// connect as usual; the host's places come back as its connections close.
#[tokio::test]
async fn connections_per_source_address_are_capped() {
    use nodes::limits::WS_CONNECTIONS_PER_ADDR_MAX;
    let server = Server::start().await;
    signup(server.http, "capped").await;
    let (http, login) = login(server.http, "capped").await;
    let url = chat_url(&http).await;
    let ws_addr: SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .expect("host:port");
    let from = |ip: [u8; 4]| async move {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::from((ip, 0)))
            .expect("bind a loopback source");
        sock.connect(ws_addr).await.expect("connect")
    };
    let mut held = Vec::new();
    for _ in 0..WS_CONNECTIONS_PER_ADDR_MAX {
        held.push(from([127, 0, 0, 91]).await);
    }
    // Each is counted when accepted: the last one's place is taken once the server saw it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut over = from([127, 0, 0, 91]).await;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf))
        .await
        .expect("closed at once, not held")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection over the cap is closed");
    let refused = metric(
        server.http,
        "chatsim_connections_refused_total{reason=\"per_address\"}",
    )
    .await;
    assert!(refused >= 1.0, "{refused}");
    // Another address is served meanwhile.
    let ws = connect(&http, &login.token).await;
    drop(ws);
    // Closing the held connections gives the places back.
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stream = from([127, 0, 0, 91]).await;
    let url_host = url.clone();
    let (mut ws, _) = tokio_tungstenite::client_async(url_host.as_str(), stream)
        .await
        .expect("a WebSocket from the address again");
    ws.send(Message::text(
        serde_json::to_string(&hello(&login.token)).expect("json"),
    ))
    .await
    .expect("hello");
    let welcome = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer");
    assert!(
        matches!(&welcome, Some(Ok(Message::Text(t))) if t.contains("welcome")),
        "{welcome:?}"
    );
}

// ------------------------------------------------------------------ group admin

/// Only a group's admin (its creator) removes others; anyone may leave. A removed member
/// reads nothing more (the history route, and a sync naming the channel), whatever its own
/// channel list says: kv checks the reader against the channel's members in the same read.
#[tokio::test]
async fn only_the_admin_removes_members_and_removal_takes_effect_at_once() {
    let server = Server::start().await;
    let http = server.http;
    let ids: Vec<u64> =
        futures::future::join_all(["gadmin", "gbob", "gcarol"].map(|n| signup(http, n))).await;
    let (admin, _) = login(http, "gadmin").await;
    let (bob, _) = login(http, "gbob").await;
    let (carol_http, carol) = login(http, "gcarol").await;
    let g: GroupResponse = admin
        .post(
            "/v1/groups",
            &CreateGroupRequest {
                name: "team".into(),
                members: vec![ids[1], ids[2]],
            },
        )
        .await
        .expect("create");
    assert_eq!(g.invited, vec![ids[1], ids[2]]);
    let join = format!("/v1/groups/{}/join", g.channel);
    for h in [&bob, &carol_http] {
        let _: GroupResponse = h.post(&join, &()).await.expect("join");
    }
    let path = |u: u64| format!("/v1/groups/{}/members/{u}", g.channel);
    match bob.delete::<GroupResponse>(&path(ids[2])).await {
        Err(ClientError::Refused {
            status: 403,
            code: ErrorCode::NotAdmin,
            ..
        }) => {}
        other => panic!("a member removed another: {other:?}"),
    }
    let mut ws = connect(&carol_http, &carol.token).await;
    let after: GroupResponse = admin.delete(&path(ids[2])).await.expect("admin removes");
    assert_eq!(after.members, vec![ids[0], ids[1]]);
    let history = format!("/v1/channels/{}/messages?after_seq=0", g.channel);
    assert!(matches!(
        carol_http.get::<HistoryResponse>(&history).await,
        Err(ClientError::Refused {
            code: ErrorCode::NotAMember,
            ..
        })
    ));
    // A sync naming the channel answers nothing of it.
    ws.send(&ClientFrame::Sync {
        cursors: vec![Cursor {
            channel: g.channel,
            seq: 0,
        }],
        max_message_id: None,
    })
    .await
    .expect("sync");
    let synced = until(&mut ws, |f| match f {
        ServerFrame::Message(m) if m.channel == g.channel => panic!("read after removal: {m:?}"),
        ServerFrame::Synced { cursors } => Some(cursors),
        _ => None,
    })
    .await;
    assert!(synced.iter().all(|c| c.channel != g.channel || c.seq == 0));
    // Anyone may leave.
    let left: GroupResponse = bob.delete(&path(ids[1])).await.expect("bob leaves");
    assert_eq!(left.members, vec![ids[0]]);
}
