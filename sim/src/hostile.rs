//! The hostile user: a device (10.0.0.5) with an account of its own, no friends and no
//! channels, that tries what the security review tried against `chatd` from outside. Every
//! [`EVERY`] of the safety phase it makes one attempt, in turn:
//!
//! | how | request | answered when |
//! |---|---|---|
//! | `forged_token` | `hello` with a token for a victim's device signed by a key of its own | `welcome` |
//! | `expired_token` | `hello` with its own token, expired an hour ago | `welcome` |
//! | `revoked_token` | `hello` with the token of a device it logged out (`POST /v1/logout`) | `welcome` |
//! | `revoked_token`, `expired_token` | `GET /v1/me` | HTTP 200 |
//! | `user` | `send` to a 1:1 channel of two other users | `ack` |
//! | `user` | `sync` with a cursor at 0 in that channel | any `message` of it |
//! | `user` | `presence_query` for the two strangers | any `presence` of them |
//! | `user` | `GET /v1/channels/{that}/messages` | HTTP 200 |
//! | `user` | `POST /v1/friends` naming a stranger (who never answers) | `friends` (not `requested`) |
//!
//! Each attempt that reached a server is an `intrusion` event, with the answer if there was
//! one; `checkers::security` requires that there never is. An attempt that reached nothing
//! (the chat server or api down or cut off) is not recorded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use nodes::client::http::HttpClient;
use nodes::client::ws::{Incoming, WsConn};
use nodes::client::ClientError;
use nodes::proto::client::*;
use nodes::proto::Id;
use tokio::time::Instant;

use crate::history::Event;
use crate::recorder::Recorder;

/// The hostile device's address.
pub const HOSTILE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
/// Pause between two attempts.
pub const EVERY: Duration = Duration::from_secs(10);
/// How long an attempt waits for an answer (a refusal comes in milliseconds).
const WAIT: Duration = Duration::from_secs(3);
const ATTEMPTS: [(&str, &str); 10] = [
    ("forged_token", "hello"),
    ("expired_token", "hello"),
    ("revoked_token", "hello"),
    ("revoked_token", "me"),
    ("expired_token", "me"),
    ("user", "send"),
    ("user", "sync"),
    ("user", "presence_query"),
    ("user", "history"),
    ("user", "befriend"),
];

/// Whom to attack: a 1:1 channel and its two members, none of them the attacker's.
#[derive(Clone, Debug)]
pub struct Victims {
    pub channel: Id,
    pub users: [Id; 2],
    /// A device of the first user (the forged token names it).
    pub device: Id,
}

/// Starts the hostile device: it signs up, then attacks from `from` until `until`.
pub fn start(
    api: Vec<SocketAddr>,
    tls: Option<nodes::client_tls::ClientTls>,
    victims: Victims,
    token_key: nodes::auth::TokenKey,
    recorder: Recorder,
    from: Instant,
    until: Instant,
) {
    let node = madsim::runtime::Handle::current()
        .create_node()
        .name("hostile")
        .ip(IpAddr::V4(HOSTILE_IP))
        .build();
    node.spawn(async move {
        let http = |i: usize, token: Option<&str>| {
            let mut h = HttpClient::new(api[i % api.len()]).with_tls(tls.clone(), None);
            h.token = token.map(str::to_string);
            h
        };
        let (name, password) = ("mallory".to_string(), "mallory-pw".to_string());
        let mut i = 0usize;
        let login: LoginResponse = loop {
            i += 1;
            let _: Result<SignupResponse, _> = http(i, None)
                .post(
                    "/v1/signup",
                    &SignupRequest {
                        name: name.clone(),
                        password: password.clone(),
                    },
                )
                .await;
            let req = LoginRequest {
                name: name.clone(),
                password: password.clone(),
                device: None,
            };
            if let Ok(l) = http(i, None).post("/v1/login", &req).await {
                break l;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let forger = nodes::auth::TokenKey::new(1, "mallory's own key, not the cluster's");
        // A second device, logged out at once: its token is revoked.
        let revoked: LoginResponse = loop {
            i += 1;
            let req = LoginRequest {
                name: name.clone(),
                password: password.clone(),
                device: None,
            };
            let Ok(l) = http(i, None)
                .post::<_, LoginResponse>("/v1/login", &req)
                .await
            else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if http(i, Some(&l.token))
                .post::<_, LogoutResponse>("/v1/logout", &())
                .await
                .is_ok()
            {
                break l;
            }
        };
        tokio::time::sleep_until(from).await;
        let mut round = 0usize;
        while Instant::now() < until {
            let (how, request) = ATTEMPTS[round % ATTEMPTS.len()];
            round += 1;
            let token = match how {
                "forged_token" => {
                    forger.sign(victims.users[0], victims.device, now_ms() + 3_600_000)
                }
                "expired_token" => token_key.sign(login.user, login.device, now_ms() - 3_600_000),
                "revoked_token" => revoked.token.clone(),
                _ => login.token.clone(),
            };
            let api = http(round, Some(&token));
            let outcome = if request == "me" {
                match api.get::<Profile>("/v1/me").await {
                    Ok(p) => Some(Some(format!("the profile of user {}", p.user))),
                    Err(ClientError::Refused { .. }) => Some(None),
                    Err(_) => None,
                }
            } else if request == "befriend" {
                let ask = AddFriendRequest {
                    user: victims.users[(round / ATTEMPTS.len()) % 2],
                };
                match api.post::<_, AddFriendResponse>("/v1/friends", &ask).await {
                    Ok(r) if r.status == FriendStatus::Friends => {
                        Some(Some(format!("friends, channel {:?}", r.channel)))
                    }
                    Ok(_) | Err(ClientError::Refused { .. }) => Some(None),
                    Err(_) => None,
                }
            } else if request == "history" {
                let path = format!("/v1/channels/{}/messages?after_seq=0", victims.channel);
                match api.get::<HistoryResponse>(&path).await {
                    Ok(h) => Some(Some(format!("{} messages", h.messages.len()))),
                    Err(ClientError::Refused { .. }) => Some(None),
                    Err(_) => None,
                }
            } else {
                attempt_ws(&http(round, Some(&login.token)), &token, request, &victims).await
            };
            if let Some(answered) = outcome {
                recorder.record(Event::Intrusion {
                    target: if matches!(request, "history" | "me" | "befriend") {
                        "api"
                    } else {
                        "chat"
                    }
                    .into(),
                    how: how.into(),
                    request: request.into(),
                    answered,
                });
            }
            tokio::time::sleep(EVERY).await;
        }
    });
}

/// One attempt over a WebSocket: `None` if no chat server was reached; `Some(None)` if the
/// attempt was refused or went unanswered; `Some(Some(what))` if it was answered.
async fn attempt_ws(
    api: &HttpClient,
    token: &str,
    request: &str,
    v: &Victims,
) -> Option<Option<String>> {
    // The lookup is made with the attacker's real token: the forged one is for `hello`.
    let server: ChatServerResponse = api.get("/v1/chat-server").await.ok()?;
    let mut ws = tokio::time::timeout(WAIT, WsConn::connect(&server.url, api.tls.as_ref()))
        .await
        .ok()?
        .ok()?;
    ws.send(&ClientFrame::Hello {
        token: token.to_string(),
        connection: 1,
    })
    .await
    .ok()?;
    let deadline = Instant::now() + WAIT;
    let mut welcomed = false;
    let frame = match request {
        "hello" => None,
        "send" => Some(ClientFrame::Send {
            client_msg_id: 1,
            channel: v.channel,
            text: "mallory was here".into(),
        }),
        "sync" => Some(ClientFrame::Sync {
            cursors: vec![Cursor {
                channel: v.channel,
                seq: 0,
            }],
            max_message_id: None,
        }),
        _ => Some(ClientFrame::PresenceQuery {
            users: v.users.to_vec(),
        }),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, ws.recv()).await;
        let Ok(Incoming::Frame(f)) = next else {
            // Closed, unparsable or silent: nothing was answered (if the session was never
            // welcomed, the server may also just have been unreachable mid-way).
            return if welcomed || request == "hello" {
                Some(None)
            } else {
                None
            };
        };
        match (request, f) {
            ("hello", ServerFrame::Welcome { user, device, .. }) => {
                return Some(Some(format!("welcome as user {user} device {device}")))
            }
            ("hello", ServerFrame::Error { .. }) => return Some(None),
            (_, ServerFrame::Welcome { .. }) => {
                welcomed = true;
                if let Some(f) = &frame {
                    ws.send(f).await.ok()?;
                }
            }
            ("send", ServerFrame::Ack { seq, .. }) => return Some(Some(format!("ack seq {seq}"))),
            (
                "send",
                ServerFrame::Error {
                    client_msg_id: Some(1),
                    ..
                },
            ) => return Some(None),
            ("sync", ServerFrame::Message(m)) if m.channel == v.channel => {
                return Some(Some(format!("message seq {} of the channel", m.seq)))
            }
            ("sync", ServerFrame::Synced { .. }) => return Some(None),
            ("presence_query", ServerFrame::Presence { user, status, .. })
                if v.users.contains(&user) =>
            {
                return Some(Some(format!("user {user} is {status:?}")))
            }
            _ => {}
        }
    }
}
