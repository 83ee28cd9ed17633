//! Criterion benchmarks of the per-message hot paths, measured on the real build:
//! - client frame JSON: parse a `send`, serialize a `message` (every message crosses both);
//! - idgen: one Snowflake id;
//! - kv: one `Append` committed alone (redb, in-memory backend: the transaction cost without
//!   fsync);
//! - kv group commit: 64 `Append`s as one batch (one durable commit) vs one at a time;
//! - fanout: queueing one message to the 99 other members' sessions on one chat server;
//! - device: handing one in-order message to the device state machine.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use nodes::client::device::DeviceState;
use nodes::idgen::{Snowflake, EPOCH_MS};
use nodes::kv::Store;
use nodes::proto::client::{ChatMessage, ClientFrame, ServerFrame};
use nodes::proto::internal::{AppendRequest, ChannelKind, ChannelRecord, Request};

fn message(seq: u64, text: &str) -> ChatMessage {
    ChatMessage {
        channel: 7,
        seq,
        message_id: 1_000_000 + seq,
        sender: 1,
        sender_device: 10,
        client_msg_id: seq,
        text: text.into(),
        sent_at_ms: 1_700_000_000_000,
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for chars in [40usize, 2_000] {
        let text = "é".repeat(chars);
        let send = serde_json::to_string(&ClientFrame::Send {
            client_msg_id: 1,
            channel: 7,
            text: text.clone(),
        })
        .unwrap();
        g.throughput(Throughput::Bytes(send.len() as u64));
        g.bench_function(format!("parse_send_{chars}_chars"), |b| {
            b.iter(|| nodes::chat::validate::parse_frame(black_box(&send)).unwrap())
        });
        let frame = ServerFrame::Message(message(1, &text));
        g.bench_function(format!("serialize_message_{chars}_chars"), |b| {
            b.iter(|| serde_json::to_string(black_box(&frame)).unwrap())
        });
    }
    g.finish();
}

fn idgen(c: &mut Criterion) {
    let mut g = Snowflake::new(1);
    let mut now = EPOCH_MS + 1_000_000;
    c.bench_function("idgen_next", |b| {
        b.iter(|| {
            now += 1;
            g.next(black_box(now / 4), None)
        })
    });
}

fn kv_append(c: &mut Criterion) {
    let db = redb::Database::builder()
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .unwrap();
    let store = Store::open(db).unwrap();
    let record = ChannelRecord {
        channel: 7,
        kind: ChannelKind::Group,
        name: "g".into(),
        members: (1..=100).collect(),
        last_seq: 0,
        last_message_id: 0,
    };
    store.apply(Request::CreateChannel { record });
    let mut n = 0u64;
    c.bench_function("kv_append_100_member_group", |b| {
        b.iter(|| {
            n += 1;
            store.apply(Request::Append(AppendRequest {
                channel: 7,
                sender: 1,
                sender_device: 10,
                client_msg_id: n,
                message_id: n,
                text: "hello there, a typical short message".into(),
                sent_at_ms: 0,
                skip_dedup: false,
            }))
        })
    });
}

fn kv_group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("bench.redb")).unwrap();
    let store = Store::open(db).unwrap();
    let record = ChannelRecord {
        channel: 7,
        kind: ChannelKind::Group,
        name: "g".into(),
        members: (1..=100).collect(),
        last_seq: 0,
        last_message_id: 0,
    };
    store.apply(Request::CreateChannel { record });
    let mut n = 0u64;
    let mut append = move || {
        n += 1;
        Request::Append(AppendRequest {
            channel: 7,
            sender: 1,
            sender_device: 10,
            client_msg_id: n,
            message_id: n,
            text: "hello there, a typical short message".into(),
            sent_at_ms: 0,
            skip_dedup: false,
        })
    };
    let mut g = c.benchmark_group("kv_durable_append");
    g.sample_size(10);
    g.throughput(Throughput::Elements(64));
    g.bench_function("64_one_fsync_each", |b| {
        b.iter(|| {
            for _ in 0..64 {
                store.apply(append());
            }
        })
    });
    g.bench_function("64_group_committed", |b| {
        b.iter(|| store.apply_batch((0..64).map(|_| append()).collect()))
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    use nodes::chat::server::{ChatState, Closer, Outbound, SessionHandle};
    let local = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let map = nodes::cluster::ClusterMap {
        coordination: nodes::coord::Coordination::Discovery(local(1)),
        kv: vec![local(2)],
        kv_shards: 0,
        kv_replicas: 1,
        idgen: vec![local(3)],
        presence: vec![local(4)],
        push: vec![local(5)],
    };
    let state = ChatState::new(nodes::chat::ChatConfig {
        server: 0,
        ws_listen: local(6),
        rpc_listen: local(7),
        ws_advertise: String::new(),
        rpc_advertise: String::new(),
        peers: nodes::cluster::Peers::new(
            map,
            nodes::canary::Canaries::none(),
            nodes::tls::TestCa::new(1).node(
                nodes::tls::Principal::Node(nodes::cluster::Role::Chat, 0),
                false,
            ),
        ),
        token_key: nodes::auth::TokenKey::new(1, b"0123456789abcdef0123456789abcdef".to_vec()),
        metrics: nodes::metrics::Metrics::new(),
        sends_in_flight_max: nodes::limits::SENDS_IN_FLIGHT_MAX,
        admission_target: None,
        tls: None,
    });
    let mut outboxes = Vec::new();
    let devices: Vec<u64> = (1..=99).collect();
    for &d in &devices {
        let (tx, rx) = tokio::sync::mpsc::channel::<Outbound>(nodes::limits::SESSION_OUTBOX_MAX);
        outboxes.push(rx);
        state.attach(
            d,
            SessionHandle {
                user: d,
                epoch: d,
                connection: 1,
                tx,
                closer: Closer::new(),
                last_heartbeat_ms: Default::default(),
            },
        );
    }
    let frame = ServerFrame::Message(message(1, "hello there, a typical short message"));
    c.bench_function("fanout_local_99_sessions", |b| {
        b.iter(|| {
            let n = state.deliver_local(black_box(&devices), &frame);
            for rx in &mut outboxes {
                let _ = rx.try_recv();
            }
            n
        })
    });
}

fn device(c: &mut Criterion) {
    let mut d = DeviceState::new(2, 20, false);
    let mut seq = 0;
    c.bench_function("device_on_message_in_order", |b| {
        b.iter(|| {
            seq += 1;
            d.on_frame(ServerFrame::Message(message(seq, "hi")))
        })
    });
}

/// One login's password check (what signup's hash costs too), at both costs.
fn passwords(c: &mut Criterion) {
    use nodes::auth::{PasswordCost, Passwords};
    use rand::SeedableRng;
    let mut g = c.benchmark_group("password_verify");
    g.sample_size(20);
    for (name, cost) in [
        ("standard", PasswordCost::Standard),
        ("minimal", PasswordCost::Minimal),
    ] {
        let p = Passwords::new(cost, rand::rngs::StdRng::seed_from_u64(1));
        let stored = p.hash("correct horse battery staple");
        g.bench_function(name, |b| {
            b.iter(|| p.verify("alice", black_box("correct horse battery staple"), &stored))
        });
    }
}

/// What mutual TLS costs internal RPC, on loopback sockets (both ends on this thread, so a
/// figure is the CPU of both): a full handshake (TCP connect, TLS 1.3 with both
/// certificates, Ed25519), and one 256-byte frame written and read over TLS against the same
/// over plain TCP.
fn internal_rpc_tls(c: &mut Criterion) {
    use nodes::cluster::Role;
    use nodes::tls::{Principal, TestCa};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut ca = TestCa::new(1);
    let server = ca.node(Principal::Node(Role::Kv, 0), false);
    let client = ca.node(Principal::Node(Role::Chat, 0), false);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("an address");
    let pair = |tls: bool| {
        rt.block_on(async {
            let (dialled, accepted) = tokio::join!(nodes::net::connect(addr), listener.accept());
            let (dialled, (accepted, _)) = (dialled.expect("connect"), accepted.expect("accept"));
            let accepted = nodes::net::Stream::new(accepted);
            if tls {
                let (c, s) = tokio::join!(client.connect(dialled), server.accept(accepted));
                let s = s.expect("the server side of the handshake").0;
                (
                    Box::new(c.expect("the client side")) as Box<dyn Io>,
                    Box::new(s) as Box<dyn Io>,
                )
            } else {
                (
                    Box::new(dialled) as Box<dyn Io>,
                    Box::new(accepted) as Box<dyn Io>,
                )
            }
        })
    };
    let mut g = c.benchmark_group("internal_rpc_tls");
    g.bench_function("mtls_handshake", |b| b.iter(|| drop(pair(true))));
    let frame = [7u8; 256];
    for tls in [false, true] {
        let (mut a, mut z) = pair(tls);
        let mut buf = [0u8; 256];
        g.throughput(Throughput::Bytes(256));
        g.bench_function(
            if tls {
                "frame_256_bytes_tls"
            } else {
                "frame_256_bytes_plain"
            },
            |b| {
                b.iter(|| {
                    rt.block_on(async {
                        a.write_all(&frame).await.expect("write");
                        a.flush().await.expect("flush");
                        z.read_exact(&mut buf).await.expect("read");
                    })
                })
            },
        );
    }
}

/// Either end of a loopback connection, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Io for T {}

criterion_group!(
    benches,
    codec,
    idgen,
    kv_append,
    kv_group_commit,
    fanout,
    device,
    passwords,
    internal_rpc_tls
);
criterion_main!(benches);
