//! Every decoder that reads bytes from outside the process or from disk, by name, with valid
//! samples of what it reads. Each `decode` is the production entry point (the same function
//! the server calls), reduced to "did it decode". The fuzz command
//! (`cargo run --release -p benches --bin fuzz-decoders`) and the proptests in
//! `nodes/tests/decoders.rs` feed them malformed and mutated input: a decoder must answer an
//! error, never panic.
//!
//! | decoder | reads | entry point |
//! |---|---|---|
//! | `client_frame` | a WebSocket text frame from a device | UTF-8, then `chat::validate::parse_frame`, then `check_text` on a send |
//! | `http_body` | a request body of every JSON route | `api::routes::decode_body` into each route's type |
//! | `rpc_request` / `rpc_response` | an internal RPC frame (after its length prefix) | `rpc::decode_request` / `rpc::decode_response` |
//! | `kv_record` | a stored user, channel, message or session row | `kv::store::decode_record`, and `decode_message` for a log row (postcard or JSON) |
//! | `raft_entry` | a Raft log entry (stored, or in a snapshot or message) and what applying it reads | `kv::replica::decode_log_entry` |
//! | `raft_message` | a Raft message from a peer | protobuf `Message::parse_from_bytes` |

use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};

use crate::api::routes::decode_body;
use crate::proto::client::{
    AddFriendRequest, AddMemberRequest, ChatMessage, ClientFrame, CreateGroupRequest, Cursor,
    LoginRequest, PresenceStatus, PushTarget, SignupRequest,
};
use crate::proto::internal::{
    AppendRequest, ChannelKind, ChannelRecord, ChatServerInfo, Request, Response, SessionEntry,
    UserRecord,
};

/// One decoder: its name, the production entry point (true: decoded), and valid inputs.
pub struct Decoder {
    pub name: &'static str,
    pub decode: fn(&[u8]) -> bool,
    pub samples: fn() -> Vec<Vec<u8>>,
}

/// Every decoder.
pub const ALL: &[Decoder] = &[
    Decoder {
        name: "client_frame",
        decode: client_frame,
        samples: client_frames,
    },
    Decoder {
        name: "http_body",
        decode: http_body,
        samples: http_bodies,
    },
    Decoder {
        name: "rpc_request",
        decode: |b| crate::rpc::decode_request(b).is_ok(),
        samples: rpc_requests,
    },
    Decoder {
        name: "rpc_response",
        decode: |b| crate::rpc::decode_response(b).is_ok(),
        samples: rpc_responses,
    },
    Decoder {
        name: "kv_record",
        decode: kv_record,
        samples: kv_records,
    },
    Decoder {
        name: "raft_entry",
        decode: |b| crate::kv::replica::decode_log_entry(b).is_ok(),
        samples: raft_entries,
    },
    Decoder {
        name: "raft_message",
        decode: |b| Message::parse_from_bytes(b).is_ok(),
        samples: raft_messages,
    },
];

fn client_frame(bytes: &[u8]) -> bool {
    // tungstenite hands a text frame over only as valid UTF-8.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    match crate::chat::validate::parse_frame(text) {
        Ok(ClientFrame::Send { text, .. }) => crate::chat::validate::check_text(&text).is_ok(),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Tries the body as every route's request type (any one decoding counts).
fn http_body(bytes: &[u8]) -> bool {
    let mut ok = decode_body::<SignupRequest>(bytes).is_ok();
    ok |= decode_body::<LoginRequest>(bytes).is_ok();
    ok |= decode_body::<AddFriendRequest>(bytes).is_ok();
    ok |= decode_body::<CreateGroupRequest>(bytes).is_ok();
    ok |= decode_body::<AddMemberRequest>(bytes).is_ok();
    ok |= decode_body::<PushTarget>(bytes).is_ok();
    ok
}

fn kv_record(bytes: &[u8]) -> bool {
    use crate::kv::store::decode_record;
    let mut ok = decode_record::<UserRecord>(bytes).is_ok();
    ok |= decode_record::<ChannelRecord>(bytes).is_ok();
    ok |= decode_record::<ChatMessage>(bytes).is_ok();
    ok |= decode_record::<SessionEntry>(bytes).is_ok();
    ok |= crate::kv::store::decode_message((7, 3), bytes).is_ok();
    ok
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("samples serialize")
}

fn message() -> ChatMessage {
    ChatMessage {
        channel: 7,
        seq: 3,
        message_id: 290_336_586_162_245_642,
        sender: 15,
        sender_device: 73,
        client_msg_id: 9,
        text: "hello there, a typical short message \u{1f600} \"quoted\"".into(),
        sent_at_ms: 1_700_000_000_000,
    }
}

fn user() -> UserRecord {
    serde_json::from_value(serde_json::json!({
        "user": 15,
        "name": "alice",
        "password_hash": "salt$hash",
        "devices": [73, 74],
        "friends": { "16": 7 },
        "channels": [7, 8],
        "push_targets": {},
    }))
    .expect("a valid user record")
}

fn channel() -> ChannelRecord {
    ChannelRecord {
        channel: 8,
        kind: ChannelKind::Group,
        name: "climbing".into(),
        members: vec![15, 16, 17],
        last_seq: 41,
        last_message_id: 290_336_586_162_245_642,
    }
}

fn client_frames() -> Vec<Vec<u8>> {
    [
        ClientFrame::Hello {
            token: "eyJ1c2VyIjoxNX0.c2lnbmF0dXJl".into(),
            connection: 2,
        },
        ClientFrame::Send {
            client_msg_id: 9,
            channel: 7,
            text: "hello \u{1f600} \\u escapes and \"quotes\"".into(),
        },
        ClientFrame::Sync {
            cursors: vec![Cursor { channel: 7, seq: 3 }],
            max_message_id: None,
        },
        ClientFrame::Read { channel: 7, seq: 3 },
        ClientFrame::Heartbeat,
        ClientFrame::PresenceQuery {
            users: vec![16, 17],
        },
        ClientFrame::Logout,
    ]
    .iter()
    .map(json)
    .collect()
}

fn http_bodies() -> Vec<Vec<u8>> {
    vec![
        json(&SignupRequest {
            name: "alice".into(),
            password: "correct horse".into(),
        }),
        json(&LoginRequest {
            name: "alice".into(),
            password: "correct horse".into(),
            device: Some(73),
        }),
        json(&AddFriendRequest { user: 16 }),
        json(&CreateGroupRequest {
            name: "climbing".into(),
            members: vec![16, 17],
        }),
        json(&AddMemberRequest { user: 18 }),
        json(&PushTarget::Apns {
            device_token: "a1b2c3".into(),
        }),
        json(&PushTarget::WebPush {
            endpoint: "https://push.example.com/send/abc".into(),
            p256dh: "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM".into(),
            auth: "tBHItJI5svbpez7KI4CCXg".into(),
        }),
    ]
}

fn rpc_requests() -> Vec<Vec<u8>> {
    let info = ChatServerInfo {
        server: 1,
        ws_addr: "ws://10.0.3.2:9000/ws".into(),
        tls: false,
        rpc_addr: "10.0.3.2:7000".into(),
        load: 12,
    };
    [
        Request::GetUser { user: 15 },
        Request::Heartbeat {
            user: 15,
            device: 73,
            at_ms: 1_700_000_000_000,
        },
        Request::Append(AppendRequest {
            channel: 7,
            sender: 15,
            sender_device: 73,
            client_msg_id: 9,
            message_id: 290_336_586_162_245_642,
            text: "hello".into(),
            sent_at_ms: 1_700_000_000_000,
            skip_dedup: false,
        }),
        Request::Notify {
            message: message(),
            users: vec![16, 17],
            fanout_done: true,
        },
        Request::ClaimPushes {
            message_id: 290_336_586_162_245_642,
            devices: vec![73, 74],
            claim: 5,
            now_ms: 1_700_000_000_000,
        },
        Request::SetCursorsBatch {
            devices: vec![(73, vec![(7, 12)]), (74, vec![(7, 11), (8, 2)])],
        },
        Request::SubscribePresence { info },
        Request::PresenceReassert {
            server: 1,
            heartbeats: vec![(15, 73, 1_700_000_000_000)],
            done: true,
        },
        Request::PresenceFanout {
            subject: 15,
            status: PresenceStatus::Online,
            version: 3,
            observers: vec![16],
        },
    ]
    .into_iter()
    .enumerate()
    .map(enveloped)
    .collect()
}

/// The `i`th body as the RPC layer frames it (ids from 1).
fn enveloped<T: serde::Serialize>((i, body): (usize, T)) -> Vec<u8> {
    json(&crate::rpc::Envelope {
        id: i as u64 + 1,
        body,
    })
}

fn rpc_responses() -> Vec<Vec<u8>> {
    [
        Response::Ok,
        Response::Bool(true),
        Response::Id(1_700_000_000_000),
        Response::User(Some(user())),
        Response::Presence(vec![(16, PresenceStatus::Online, 3)]),
        Response::PushClaims {
            granted: vec![73],
            held: vec![74],
        },
        Response::Error {
            code: crate::proto::client::ErrorCode::Unavailable,
            detail: "kv shard 2 has no leader".into(),
        },
    ]
    .into_iter()
    .enumerate()
    .map(enveloped)
    .collect()
}

fn kv_records() -> Vec<Vec<u8>> {
    vec![
        json(&user()),
        json(&channel()),
        json(&message()),
        crate::kv::store::encode_message(&message()),
        json(&SessionEntry {
            user: 15,
            device: 73,
            server: 1,
            epoch: 4,
            connection: 2,
        }),
    ]
}

fn raft_entries() -> Vec<Vec<u8>> {
    let mut normal = Entry::default();
    normal.set_entry_type(EntryType::EntryNormal);
    normal.index = 42;
    normal.term = 3;
    normal.data = json(&vec![Request::GetUser { user: 15 }]).into();
    let mut cc = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ConfChangeType::AddLearnerNode);
    single.node_id = 195_798_794_829_826;
    cc.set_changes(vec![single].into());
    let mut conf = Entry::default();
    conf.set_entry_type(EntryType::EntryConfChangeV2);
    conf.index = 43;
    conf.term = 3;
    conf.data = cc.write_to_bytes().expect("encodes").into();
    vec![
        normal.write_to_bytes().expect("encodes"),
        conf.write_to_bytes().expect("encodes"),
        Entry::default().write_to_bytes().expect("encodes"),
    ]
}

fn raft_messages() -> Vec<Vec<u8>> {
    let entries = raft_entries();
    let mut m = Message::default();
    m.set_msg_type(raft::prelude::MessageType::MsgAppend);
    m.from = 1;
    m.to = 2;
    m.term = 3;
    m.log_term = 3;
    m.index = 41;
    m.commit = 40;
    m.set_entries(
        entries
            .iter()
            .map(|b| Entry::parse_from_bytes(b).expect("a sample entry"))
            .collect::<Vec<_>>()
            .into(),
    );
    let mut hb = Message::default();
    hb.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    hb.from = 2;
    hb.to = 1;
    hb.term = 3;
    vec![
        m.write_to_bytes().expect("encodes"),
        hb.write_to_bytes().expect("encodes"),
    ]
}

/// Seeded mutations of valid inputs, the way a fuzzer mutates its corpus: bit flips, byte
/// changes, deletions, insertions (of random bytes and of JSON's and protobuf's structural
/// bytes), truncations, duplicated runs and splices of two samples, one to eight per input.
pub fn mutate(samples: &[Vec<u8>], rng: &mut impl rand::Rng) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b":",
        b",",
        b"\\",
        b"\\u",
        b"\\uD83D",
        b"\\uDE00",
        b"null",
        b"true",
        b"-",
        b"1e999",
        b"18446744073709551616",
        b"0.5",
        b"\xff",
        b"\x00",
        b"\x08",
        b"\x0a",
        b"\x12",
        b"\xff\xff\xff\xff\x0f",
    ];
    let mut out = samples[rng.gen_range(0..samples.len())].clone();
    for _ in 0..rng.gen_range(1..=8) {
        let len = out.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                out[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                out[i] = rng.gen();
            }
            2 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(16));
                out.drain(i..i + n);
            }
            3 => {
                let i = rng.gen_range(0..=len);
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                out.splice(i..i, t.iter().copied());
            }
            4 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                out.splice(i..i, bytes);
            }
            5 if len > 0 => out.truncate(rng.gen_range(0..len)),
            6 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(64));
                let run: Vec<u8> = out[i..i + n].to_vec();
                let at = rng.gen_range(0..=len);
                out.splice(at..at, run);
            }
            _ => {
                let other = &samples[rng.gen_range(0..samples.len())];
                if !other.is_empty() {
                    let cut = rng.gen_range(0..=len);
                    let from = rng.gen_range(0..other.len());
                    out.truncate(cut);
                    out.extend_from_slice(&other[from..]);
                }
            }
        }
    }
    out
}

/// Deeply nested JSON (arrays and objects), which recursive decoders overflow the stack on
/// unless they bound the depth (serde_json stops at 128).
pub fn nested(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(depth * 6);
    for i in 0..depth {
        v.extend_from_slice(if i % 2 == 0 { b"[" } else { b"{\"a\":" });
    }
    v
}
