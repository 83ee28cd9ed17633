//! Proves the real build works end to end on real sockets: `chatd all-in-one` is started as a
//! process with a data directory, serving https and wss:// with the self-signed certificate it
//! creates (the default); two users sign up over https, connect real WebSocket clients over
//! TLS, exchange a 1:1 and a group message; bad input gets specific error codes on a
//! connection that stays usable; then the process is killed and restarted on the same
//! directory and the history, the stored cursors and the certificate are still there.

#![cfg(not(madsim))]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use nodes::client::http::HttpClient;
use nodes::client::ws::{Incoming, WsConn};
use nodes::client::ClientError;
use nodes::client_tls::ClientTls;
use nodes::proto::client::*;
use tokio_tungstenite::tungstenite::Message;

mod common;

fn free_base() -> u16 {
    common::free_base(21)
}

struct Server {
    child: Child,
    http: SocketAddr,
    /// An https client of the api, trusting the server's self-signed certificate.
    anon: HttpClient,
}

impl Server {
    fn start(data: &Path, base: u16) -> Server {
        let (child, http) = common::spawn_all_in_one_with(data, base, "warn", &[]);
        let tls = common::trust_self_signed(data);
        let anon = HttpClient::new(http).with_tls(Some(tls), None);
        Server { child, http, anon }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_ready(c: &HttpClient) {
    for _ in 0..200 {
        let r: Result<SignupResponse, _> = c
            .post(
                "/v1/login",
                &LoginRequest {
                    name: "nobody".into(),
                    password: "x".into(),
                    device: None,
                },
            )
            .await;
        if matches!(r, Err(ClientError::Refused { .. })) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chatd did not become ready at {}", c.addr);
}

async fn login(c: &HttpClient, name: &str, device: Option<u64>) -> (HttpClient, LoginResponse) {
    let r: LoginResponse = c
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
    let mut authed = c.clone();
    authed.token = Some(r.token.clone());
    (authed, r)
}

/// Asks for a chat server, retrying while none is live yet (just after start) as a client does.
async fn chat_server(http: &HttpClient) -> ChatServerResponse {
    for _ in 0..100 {
        match http.get::<ChatServerResponse>("/v1/chat-server").await {
            Ok(cs) => return cs,
            Err(ClientError::Refused {
                code: ErrorCode::NoChatServer,
                ..
            }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("chat server lookup failed: {e}"),
        }
    }
    panic!("no chat server became live");
}

async fn connect(http: &HttpClient, token: &str) -> WsConn {
    let cs = chat_server(http).await;
    assert!(
        cs.url.starts_with("wss://"),
        "a TLS api hands out wss://: {}",
        cs.url
    );
    let mut ws = WsConn::connect(&cs.url, http.tls.as_ref())
        .await
        .expect("ws connect");
    ws.send(&ClientFrame::Hello {
        token: token.into(),
        connection: 0,
    })
    .await
    .expect("hello");
    match next(&mut ws).await {
        ServerFrame::Welcome { .. } => ws,
        other => panic!("expected welcome, got {other:?}"),
    }
}

async fn next(ws: &mut WsConn) -> ServerFrame {
    match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
        Ok(Incoming::Frame(f)) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// Sends until acknowledged, resending with the same `client_msg_id` after `unavailable` as a
/// real client's outbox does (the server deduplicates). Answers (channel, seq).
async fn send_until_acked(
    ws: &mut WsConn,
    client_msg_id: u64,
    channel: u64,
    text: &str,
) -> (u64, u64) {
    for _ in 0..20 {
        let send = ClientFrame::Send {
            client_msg_id,
            channel,
            text: text.into(),
        };
        ws.send(&send).await.expect("send");
        let answer = until(ws, |f| match f {
            ServerFrame::Ack { channel, seq, .. } => Some(Ok((channel, seq))),
            ServerFrame::Error { code, .. } => Some(Err(code)),
            _ => None,
        })
        .await;
        match answer {
            Ok(acked) => return acked,
            Err(ErrorCode::Unavailable) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(code) => panic!("send refused with {code:?}"),
        }
    }
    panic!("send never acknowledged");
}

/// Asks for everything after the cursors the server stored for this device.
async fn ask_sync(ws: &mut WsConn) {
    let sync = ClientFrame::Sync {
        cursors: vec![],
        max_message_id: None,
    };
    ws.send(&sync).await.expect("send sync");
}

/// Reads frames until one matches.
async fn until<T>(ws: &mut WsConn, mut f: impl FnMut(ServerFrame) -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(t) = f(next(ws).await) {
            return t;
        }
    }
    panic!("no matching frame in 100");
}

async fn expect_error(ws: &mut WsConn, code: ErrorCode) {
    until(ws, |f| match f {
        ServerFrame::Error { code: c, .. } if c == code => Some(()),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_chat_survives_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let base = free_base();
    let mut server = Server::start(data.path(), base);
    wait_ready(&server.anon).await;
    let anon = server.anon.clone();
    // TLS is the only way in: plain http on the api's port gets no answer, and a client
    // that trusts only the public web's roots refuses the self-signed certificate.
    let plain = HttpClient::new(server.http);
    let e = plain
        .get::<ChatServerResponse>("/healthz")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Http(_)), "plain http: {e}");
    let public = HttpClient::new(server.http).with_tls(Some(ClientTls::public_roots()), None);
    let e = public
        .get::<ChatServerResponse>("/healthz")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let mut ids = Vec::new();
    for name in ["alice", "bob"] {
        let r: SignupResponse = anon
            .post(
                "/v1/signup",
                &SignupRequest {
                    name: name.into(),
                    password: format!("{name}-pw"),
                },
            )
            .await
            .expect("signup");
        ids.push(r.user);
    }
    let (alice_http, alice) = login(&anon, "alice", None).await;
    let (bob_http, bob) = login(&anon, "bob", None).await;
    let asked: AddFriendResponse = alice_http
        .post("/v1/friends", &AddFriendRequest { user: ids[1] })
        .await
        .expect("friend request");
    assert_eq!(
        (asked.status, asked.channel),
        (FriendStatus::Requested, None)
    );
    let direct: AddFriendResponse = bob_http
        .post("/v1/friends", &AddFriendRequest { user: ids[0] })
        .await
        .expect("accept");
    let direct_channel = direct.channel.expect("friends have a channel");
    let group: GroupResponse = alice_http
        .post(
            "/v1/groups",
            &CreateGroupRequest {
                name: "g".into(),
                members: vec![ids[1]],
            },
        )
        .await
        .expect("group");
    assert_eq!(
        (group.members.clone(), group.invited.clone()),
        (vec![ids[0]], vec![ids[1]])
    );
    let joined: GroupResponse = bob_http
        .post(&format!("/v1/groups/{}/join", group.channel), &())
        .await
        .expect("bob joins");
    assert_eq!(joined.members, vec![ids[0], ids[1]]);
    // Malformed JSON over HTTP gets its own code.
    let r: Result<SignupResponse, _> = anon.request("POST", "/v1/signup", "{oops".into()).await;
    assert!(matches!(
        r,
        Err(ClientError::Refused {
            code: ErrorCode::MalformedJson,
            ..
        })
    ));

    let mut a = connect(&alice_http, &alice.token).await;
    let mut b = connect(&bob_http, &bob.token).await;
    ask_sync(&mut b).await;
    until(&mut b, |f| {
        matches!(f, ServerFrame::Synced { .. }).then_some(())
    })
    .await;

    for (i, ch) in [direct_channel, group.channel].into_iter().enumerate() {
        let acked = send_until_acked(&mut a, i as u64 + 1, ch, &format!("hello {i}")).await;
        assert_eq!(acked, (ch, 1));
        let got = until(&mut b, |f| match f {
            ServerFrame::Message(m) => Some(m),
            _ => None,
        })
        .await;
        assert_eq!(
            (got.channel, got.text.as_str()),
            (ch, format!("hello {i}").as_str())
        );
        b.send(&ClientFrame::Read {
            channel: ch,
            seq: got.seq,
        })
        .await
        .unwrap();
    }

    // Bad input: each refusal names its code, and the connection stays usable.
    let long = "x".repeat(nodes::limits::MESSAGE_CHARS_MAX + 1);
    a.send(&ClientFrame::Send {
        client_msg_id: 10,
        channel: direct_channel,
        text: long,
    })
    .await
    .unwrap();
    expect_error(&mut a, ErrorCode::MessageTooLong).await;
    a.send(&ClientFrame::Send {
        client_msg_id: 11,
        channel: 999_999,
        text: "x".into(),
    })
    .await
    .unwrap();
    expect_error(&mut a, ErrorCode::UnknownChannel).await;
    a.send_raw(Message::text("{\"type\":")).await.unwrap();
    expect_error(&mut a, ErrorCode::MalformedJson).await;
    a.send_raw(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    expect_error(&mut a, ErrorCode::BinaryFrame).await;
    // A retried send is one message: same client_msg_id, same id and seq.
    a.send(&ClientFrame::Send {
        client_msg_id: 1,
        channel: direct_channel,
        text: "hello 0".into(),
    })
    .await
    .unwrap();
    let again = until(&mut a, |f| match f {
        ServerFrame::Ack { seq, .. } => Some(seq),
        _ => None,
    })
    .await;
    assert_eq!(again, 1, "the retry is deduplicated");
    // A bad token is refused with its code.
    let cs = chat_server(&alice_http).await;
    let mut bad = WsConn::connect(&cs.url, alice_http.tls.as_ref())
        .await
        .unwrap();
    bad.send(&ClientFrame::Hello {
        token: "forged.token".into(),
        connection: 0,
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::BadToken).await;
    // Close the apps (sessions write their cursors when they end), then crash the process.
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();

    let mut server = Server::start(data.path(), base);
    let restarted = std::time::Instant::now();
    // The same certificate after the restart: clients that trust it keep working.
    wait_ready(&anon).await;
    let (bob_http, bob2) = login(&anon, "bob", Some(bob.device)).await;
    assert_eq!(bob2.device, bob.device, "the device is remembered");
    for ch in [direct_channel, group.channel] {
        let h: HistoryResponse = bob_http
            .get(&format!("/v1/channels/{ch}/messages?after_seq=0"))
            .await
            .expect("history");
        assert_eq!(h.messages.len(), 1, "history of {ch} survived the restart");
    }
    // Sync without cursors: the server uses the stored ones, so nothing is resent.
    let mut b = connect(&bob_http, &bob2.token).await;
    ask_sync(&mut b).await;
    let (resent, cursors) = {
        let mut resent = 0;
        loop {
            match next(&mut b).await {
                ServerFrame::Message(_) => resent += 1,
                ServerFrame::Synced { cursors } => break (resent, cursors),
                _ => {}
            }
        }
    };
    assert_eq!(resent, 0, "cursors survived the restart");
    assert!(cursors.iter().all(|c| c.seq == 1), "{cursors:?}");
    // Presence answers right after the restart: the restarted presence node settles as soon
    // as the chat server re-asserted its devices, not after its 10 s warm-up. The query is
    // repeated as a client does when presence is still settling (it answers nothing then).
    let alice_id = ids[0];
    let answered = loop {
        b.send(&ClientFrame::PresenceQuery {
            users: vec![alice_id],
        })
        .await
        .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if let ServerFrame::Presence { user, status, .. } = next(&mut b).await {
                    if user == alice_id {
                        break status;
                    }
                }
            }
        })
        .await;
        if let Ok(status) = got {
            break status;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "no presence answer 30 s after the restart"
        );
    };
    assert_eq!(answered, PresenceStatus::Offline, "alice closed her apps");
    eprintln!(
        "presence answered {:.1} s after the restart began",
        restarted.elapsed().as_secs_f64()
    );
    server.kill();
}
