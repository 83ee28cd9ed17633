//! Per-node capacities for the capacity plan (`reports::capacity`), measured on this machine
//! with the real build: durable kv writes per second on a redb file (one fsync per write, and
//! 64 writes per fsync, as the kv node group-commits under load), Snowflake ids
//! per second, client frames per second (parse a send, serialize a message), and heartbeats
//! per second a real presence node absorbs over loopback RPC (the driver on the same cores).
//!
//! `cargo run --release -p benches --bin node-capacity -- --out benches/results/node-capacity.json`
//!
//! Wall-clock timing of a fixed amount of work, repeated and the best run kept (the machine's
//! capacity, not its noise). The kv file lives in a temporary directory on the same disk as
//! the working directory.

use std::time::{Duration, Instant};

use nodes::idgen::{Snowflake, EPOCH_MS};
use nodes::kv::Store;
use nodes::proto::client::{ChatMessage, ClientFrame, ServerFrame};
use nodes::proto::internal::{AppendRequest, ChannelKind, ChannelRecord, Request};
use reports::capacity::Bench;

fn best<F: FnMut() -> u64>(runs: usize, mut f: F) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let n = f();
            n as f64 / t.elapsed().max(Duration::from_nanos(1)).as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn kv_durable(dir: &std::path::Path) -> f64 {
    let db = redb::Database::create(dir.join("kv.redb")).expect("create a redb file");
    let store = Store::open(db).expect("open the store");
    let record = ChannelRecord {
        channel: 7,
        kind: ChannelKind::Group,
        name: "g".into(),
        members: (1..=20).collect(),
        last_seq: 0,
        last_message_id: 0,
    };
    store.apply(Request::CreateChannel { record });
    let mut n = 0u64;
    best(3, || {
        for _ in 0..200 {
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
            }));
        }
        200
    })
}

fn kv_group_commit(dir: &std::path::Path) -> f64 {
    const T: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("log");
    let db = redb::Database::create(dir.join("group.redb")).expect("create a redb file");
    let value = vec![7u8; 200];
    let mut n = 0u64;
    best(3, || {
        for _ in 0..50 {
            let txn = db.begin_write().expect("begin");
            {
                let mut t = txn.open_table(T).expect("table");
                for _ in 0..64 {
                    n += 1;
                    t.insert((7, n), value.as_slice()).expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        50 * 64
    })
}

fn idgen() -> f64 {
    let mut g = Snowflake::new(1);
    let mut now = EPOCH_MS + 1_000_000;
    best(3, || {
        for _ in 0..2_000_000 {
            now += 1;
            std::hint::black_box(g.next(now / 4, None));
        }
        2_000_000
    })
}

fn codec() -> f64 {
    let send = serde_json::to_string(&ClientFrame::Send {
        client_msg_id: 1,
        channel: 7,
        text: "hello there, a typical short message".into(),
    })
    .expect("serialize");
    let frame = ServerFrame::Message(ChatMessage {
        channel: 7,
        seq: 1,
        message_id: 1,
        sender: 1,
        sender_device: 10,
        client_msg_id: 1,
        text: "hello there, a typical short message".into(),
        sent_at_ms: 1_700_000_000_000,
    });
    best(3, || {
        for _ in 0..200_000 {
            std::hint::black_box(nodes::chat::validate::parse_frame(&send).expect("parse"));
            std::hint::black_box(serde_json::to_string(&frame).expect("serialize"));
        }
        200_000
    })
}

/// Heartbeats per second one presence node absorbs: the real node (`presence::server::run`)
/// on loopback, 10,240 devices of 256 users heartbeating again and again through 4 RPC
/// connections with 256 calls in flight (the chat servers' relays), driver and node sharing
/// this machine's cores. The first round brings the users online (256 changes, whose
/// publishing finds no kv and gives up in the background); the timed rounds are refreshes,
/// as nearly every heartbeat at the peak is.
fn presence() -> f64 {
    use nodes::canary::Canaries;
    use nodes::cluster::{ClusterMap, Peers};
    use nodes::coord::Coordination;
    use nodes::rpc::RpcClient;
    const USERS: u64 = 256;
    const DEVICES_PER_USER: u64 = 40;
    const CLIENTS: usize = 4;
    const IN_FLIGHT: usize = 256;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let (listen, nowhere) = (free(), free());
        let map = ClusterMap {
            coordination: Coordination::Discovery(nowhere),
            kv: vec![nowhere],
            kv_shards: 0,
            kv_replicas: 0,
            // Never called by a presence node; the map wants one of each.
            idgen: vec![nowhere],
            presence: vec![listen],
            push: vec![nowhere],
        };
        // Mutual TLS as in a deployment: the presence node's and the chat servers' certificates.
        let mut ca = nodes::tls::TestCa::new(1);
        let chat = ca.node(
            nodes::tls::Principal::Node(nodes::cluster::Role::Chat, 0),
            false,
        );
        let node = ca.node(
            nodes::tls::Principal::Node(nodes::cluster::Role::Presence, 0),
            false,
        );
        let peers = Peers::new(map, Canaries::none(), node);
        tokio::spawn(nodes::presence::server::run(
            nodes::presence::server::PresenceConfig {
                listen,
                peers,
                metrics: nodes::metrics::Metrics::new(),
            },
        ));
        let clients: Vec<RpcClient> = (0..CLIENTS)
            .map(|_| RpcClient::new(listen, chat.clone()))
            .collect();
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let round = |clients: Vec<RpcClient>| async move {
            use futures::StreamExt;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let calls = (0..USERS * DEVICES_PER_USER).map(|i| {
                let c = clients[i as usize % CLIENTS].clone();
                async move {
                    let req = nodes::proto::internal::Request::Heartbeat {
                        user: i % USERS,
                        device: i,
                        at_ms: now,
                    };
                    c.call(req).await.expect("the presence node answers")
                }
            });
            futures::stream::iter(calls)
                .buffer_unordered(IN_FLIGHT)
                .count()
                .await as u64
        };
        round(clients.clone()).await;
        let mut best_rate = 0.0f64;
        for _ in 0..5 {
            let t = Instant::now();
            let n = round(clients.clone()).await;
            best_rate = best_rate.max(n as f64 / t.elapsed().as_secs_f64());
        }
        best_rate
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1));
    let dir = tempfile::tempdir_in(".").expect("a temporary directory here");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let bench = Bench {
        measured_on: format!(
            "a {cores}-core {} machine, unix time {unix}, release build",
            std::env::consts::OS
        ),
        command: "cargo run --release -p benches --bin node-capacity -- --out benches/results/node-capacity.json".into(),
        kv_durable_writes_per_s: kv_durable(dir.path()),
        kv_group_commit_writes_per_s: kv_group_commit(dir.path()),
        idgen_ids_per_s: idgen(),
        codec_frames_per_s: codec(),
        presence_heartbeats_per_s: presence(),
    };
    let json = serde_json::to_string_pretty(&bench).expect("serialize");
    println!("{json}");
    if let Some(path) = out {
        std::fs::write(path, json + "\n").expect("write the results file");
        eprintln!("wrote {path}");
    }
}
