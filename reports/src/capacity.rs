//! The capacity plan: what the model's DAU costs at the peak hour, from a simulation of the
//! real node code at a small scale, per-node capacities from a benchmark file, and labelled
//! assumptions. Every figure carries its provenance.
//!
//! Rates scale linearly with users: the workload keeps per-user behaviour at any scale (same
//! friends, group sizes and send rates per user), so a rate measured at scale `s` stands for
//! `rate / s` in the full system. The plan says which figures were measured that way.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use workloads::model::Model;

/// Where a figure comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Provenance {
    /// Computed from the workload model's constants (workloads/src/model.rs).
    Model { how: String },
    /// Measured in simulation, scaled by 1/scale.
    Simulation {
        workload: String,
        scale: String,
        seed: u64,
        how: String,
    },
    /// From a per-node benchmark file.
    Benchmark { file: String, how: String },
    /// A stated assumption.
    Assumption { how: String },
    /// Derived from other figures of this plan.
    Derived { how: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub value: f64,
    pub unit: String,
    pub provenance: Provenance,
}

/// What a simulation measured over its steady window (after warm-up, before the liveness
/// phase), unscaled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub workload: String,
    pub seed: u64,
    /// Simulated users / model DAU.
    pub scale: f64,
    pub users: u64,
    pub window_s: f64,
    pub mean_connected: f64,
    pub sends: u64,
    pub acks: u64,
    pub delivers: u64,
    pub heartbeats: u64,
    pub connects: u64,
    pub net_messages: u64,
    pub wire_bytes: u64,
    /// Of `wire_bytes`: the devices' heartbeats and the chat servers' answers (WebSocket
    /// framing and TLS included).
    #[serde(default)]
    pub heartbeat_wire_bytes: u64,
    /// `wire_bytes` by path between roles (`device-chat`, `kv-kv`...), both directions.
    #[serde(default)]
    pub wire_by_path: Vec<(String, u64)>,
    pub kv_requests: u64,
    pub kv_writes: u64,
    /// Growth of every kv database file (every replica's).
    pub storage_bytes: u64,
    pub chars: u64,
    /// UTF-8 bytes of the texts sent.
    pub text_bytes: u64,
    /// Per kv operation: (operation, requests, write operations).
    #[serde(default)]
    pub kv_by_op: Vec<(String, u64, u64)>,
    /// Copies of each kv shard in the measured cluster: `storage_bytes` holds that many
    /// copies. 0 (a measurement from before replication): one.
    #[serde(default)]
    pub kv_replicas: u32,
    /// Growth of the kv tables' B-tree pages and of their keys and values (every replica),
    /// beside the file growth.
    #[serde(default)]
    pub storage_page_bytes: i64,
    #[serde(default)]
    pub storage_stored_bytes: i64,
    /// The same two for the tables that grow with history and are kept forever
    /// ([`HISTORY_TABLES`]): what a year of storage is made of. 0 in measurements from
    /// before they were taken (the plan then uses file growth).
    #[serde(default)]
    pub storage_history_page_bytes: i64,
    #[serde(default)]
    pub storage_history_stored_bytes: i64,
}

/// kv tables that grow with every message and are kept forever: the channel logs and the
/// send dedup index. The others are bounded: by users and devices (`users`, `names`,
/// `channels`, `cursors`, `sessions`, `last_active`), by time (`push_claims`, 6 h;
/// `pending_fanout`, until done) or by compaction (the Raft log).
pub const HISTORY_TABLES: [&str; 2] = ["log", "dedup"];

/// Per-node capacities measured by `cargo run --release -p benches --bin node-capacity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bench {
    /// Where the numbers were measured (machine, date, command).
    pub measured_on: String,
    pub command: String,
    /// Durable kv writes per second, one fsync per write transaction (no batching).
    pub kv_durable_writes_per_s: f64,
    /// Durable kv writes per second when 64 writes share one fsync (group commit).
    pub kv_group_commit_writes_per_s: f64,
    /// Snowflake ids per second on one core.
    pub idgen_ids_per_s: f64,
    /// Client frames (parse a send + serialize a message) per second on one core.
    pub codec_frames_per_s: f64,
    /// Heartbeats per second a real presence node absorbs over loopback RPC, the driver on
    /// the same machine (0 in files measured before it was).
    #[serde(default)]
    pub presence_heartbeats_per_s: f64,
}

/// etcd requests per second of one chat server: a lease keep-alive and a load put every
/// 2 s, and the peer list (two range reads) every 2 s.
const ETCD_PER_CHAT_SERVER: f64 = 2.0;
/// etcd requests per second of one idgen node: its worker lease's keep-alive every second.
const ETCD_PER_IDGEN_NODE: f64 = 1.0;
/// etcd requests per second of every node that calls kv, presence, push or idgen nodes (all
/// but etcd): the member addresses, one prefix read every 2 s (`coord::members`).
const ETCD_PER_NODE_MEMBERS: f64 = 0.5;

/// The benchmark file checked into the repository.
pub const BENCH_FILE: &str = "benches/results/node-capacity.json";
pub const BENCH_JSON: &str = include_str!("../../benches/results/node-capacity.json");

pub fn default_bench() -> Bench {
    serde_json::from_str(BENCH_JSON).expect("the checked-in benchmark file parses")
}

/// Planning assumptions (each labelled in the plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assumptions {
    /// Copies of every kv record.
    pub replication: f64,
    /// Connections one chat server holds.
    pub connections_per_chat_server: f64,
    /// Heartbeats per second one presence node absorbs.
    pub heartbeats_per_presence_node: f64,
    /// Usable disk per kv node, bytes.
    pub disk_per_kv_node: f64,
    /// Headroom over the peak (servers run at most at 1/headroom of capacity).
    pub headroom: f64,
    /// RSS per idle WebSocket connection, measured on chatd (`scripts/bench-real.sh idle`:
    /// 6,026 B at 10,000 connections, 6,105 B at 19,000; benches/results/real/idle.txt).
    pub bytes_per_connection: f64,
    /// The seed's back-of-envelope: 1M concurrent users x 10 KB = 10 GB.
    pub seed_concurrent: f64,
    pub seed_bytes_per_connection: f64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Self {
            replication: 3.0,
            connections_per_chat_server: 500_000.0,
            heartbeats_per_presence_node: 200_000.0,
            disk_per_kv_node: 4e12,
            headroom: 1.5,
            bytes_per_connection: 13_842.0,
            seed_concurrent: 1e6,
            seed_bytes_per_connection: 10_000.0,
        }
    }
}

/// The plan: named figures, in a stable order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub dau: u64,
    pub figures: Vec<(String, Figure)>,
    pub measurement: Measurement,
    pub bench: Bench,
    pub assumptions: Assumptions,
}

impl Plan {
    pub fn get(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

/// Builds the plan for `dau` users from the model, a measurement and per-node capacities.
pub fn plan(dau: u64, model: &Model, m: &Measurement, bench: &Bench, a: &Assumptions) -> Plan {
    let scale = m.scale;
    let w = m.window_s.max(1e-9);
    let (_, peak) = model.peak_hour();
    let sim = |how: String| Provenance::Simulation {
        workload: m.workload.clone(),
        scale: crate::scale_label(scale),
        seed: m.seed,
        how,
    };
    let bench_p = |how: &str| Provenance::Benchmark {
        file: BENCH_FILE.into(),
        how: format!("{how} ({}; `{}`)", bench.measured_on, bench.command),
    };
    // A rate of the simulated population, for `dau` users (per-user rates are kept).
    let full = |x: f64| x * dau as f64 / m.users.max(1) as f64;
    let mut f: Vec<(String, Figure)> = Vec::new();
    let mut put = |name: &str, value: f64, unit: &str, p: Provenance| {
        f.push((
            name.to_string(),
            Figure {
                value,
                unit: unit.into(),
                provenance: p,
            },
        ));
    };
    let model_conn = model.connections_per_user(peak) * dau as f64;
    let conn = full(m.mean_connected);
    put(
        "dau",
        dau as f64,
        "users",
        Provenance::Model {
            how: "the product requirement [seed]; --dau overrides".into(),
        },
    );
    put(
        "peak_concurrent_connections",
        conn,
        "connections",
        sim(format!(
            "mean connected devices over the measured window x DAU / simulated users (model expects {:.0}: {:.3} per user at the peak hour)",
            model_conn,
            model.connections_per_user(peak)
        )),
    );
    let msgs = full(m.sends as f64 / w);
    put(
        "peak_messages_per_s",
        msgs,
        "messages/s",
        sim(format!(
            "messages sent (first attempts; retries are one message) per simulated second x DAU / users (model expects {:.0})",
            model.messages_per_user_per_s(peak) * dau as f64
        )),
    );
    put(
        "peak_deliveries_per_s",
        full(m.delivers as f64 / w),
        "deliveries/s",
        sim(format!(
            "messages handed to recipient devices per simulated second x DAU / users ({:.2} per message)",
            m.delivers as f64 / m.sends.max(1) as f64
        )),
    );
    let hb_interval = model.heartbeat_interval_s;
    put(
        "heartbeats_per_s",
        conn / hb_interval,
        "heartbeats/s",
        Provenance::Derived {
            how: format!(
                "peak_concurrent_connections / {hb_interval} s heartbeat interval [design] (simulation counted {:.0}/s scaled)",
                full(m.heartbeats as f64 / w)
            ),
        },
    );
    let kv_writes = full(m.kv_writes as f64 / w);
    let kv_reads = full(m.kv_requests.saturating_sub(m.kv_writes) as f64 / w);
    put(
        "kv_writes_per_s",
        kv_writes,
        "write operations/s",
        sim(format!(
            "kv write operations per simulated second x DAU / users ({:.2} per message, incl. sessions, cursors, presence, push claims)",
            m.kv_writes as f64 / m.sends.max(1) as f64
        )),
    );
    put(
        "kv_reads_per_s",
        kv_reads,
        "read requests/s",
        sim(format!(
            "kv requests that wrote nothing per simulated second x DAU / users ({:.2} per message)",
            m.kv_requests.saturating_sub(m.kv_writes) as f64 / m.sends.max(1) as f64
        )),
    );
    // Storage per message = what the database grew per message beyond the texts themselves
    // (records, indexes, push claims, cursors: measured) + the model's mean text. A run of a
    // few hundred messages is dominated by the few long ones of the length tail, so the texts
    // sent are taken out and the model's mean put back.
    let sent = m.sends.max(1) as f64;
    let bytes_per_char = if m.chars > 0 {
        m.text_bytes as f64 / m.chars as f64
    } else {
        1.0
    };
    // The measurement holds `copies` of everything: one copy's growth, then the plan's
    // replication.
    let copies = m.kv_replicas.max(1) as f64;
    let per_copy = |b: f64| b / copies / sent;
    // The pages of the history tables when measured (what stays: the bounded tables' growth
    // over a short run is not a year's), else the files' growth.
    let (grown, on) = if m.storage_history_page_bytes > 0 {
        (
            m.storage_history_page_bytes as f64,
            format!(
                "the B-tree pages of the tables kept forever ({}: {:.0} B per message and copy in pages, {:.0} B of keys and values; every table: {:.0} B in pages, {:.0} B of keys and values, {:.0} B of file length, the rest bounded by users, devices, time or compaction)",
                HISTORY_TABLES.join(", "),
                per_copy(m.storage_history_page_bytes as f64),
                per_copy(m.storage_history_stored_bytes as f64),
                per_copy(m.storage_page_bytes as f64),
                per_copy(m.storage_stored_bytes as f64),
                per_copy(m.storage_bytes as f64),
            ),
        )
    } else {
        (
            m.storage_bytes as f64,
            format!(
                "redb files ({:.0} B per message and copy in file length, {:.0} B in the tables' pages, {:.0} B of keys and values)",
                per_copy(m.storage_bytes as f64),
                per_copy(m.storage_page_bytes as f64),
                per_copy(m.storage_stored_bytes as f64),
            ),
        )
    };
    let overhead = (grown / copies - m.text_bytes as f64).max(0.0) / sent;
    let text = model.mean_text_chars() * bytes_per_char;
    let per_msg_storage = overhead + text;
    let msgs_per_day = model.messages_per_user_per_day * dau as f64;
    let day = per_msg_storage * msgs_per_day * a.replication;
    put(
        "storage_bytes_per_day",
        day,
        "bytes/day",
        sim(format!(
            "({overhead:.0} B of kv growth per message and copy beyond its text, measured with {copies:.0} copies on {on} + {text:.0} B of text: the model's mean {:.0} characters) x {msgs_per_day:.0} messages/day [model] x replication {} [assumption]",
            model.mean_text_chars(),
            a.replication
        )),
    );
    put(
        "storage_bytes_per_year",
        day * 365.0,
        "bytes/year",
        Provenance::Derived {
            how: format!(
                "365 x storage_bytes_per_day (history kept forever [seed]; replication {} included)",
                a.replication
            ),
        },
    );
    put(
        "bandwidth_bytes_per_s",
        full(m.wire_bytes as f64 / w),
        "bytes/s",
        sim(format!(
            "bytes written to TCP by every node and device (WebSocket, HTTP, RPC; no TCP/IP headers) per simulated second x DAU / users ({:.0} B per message)",
            m.wire_bytes as f64 / m.sends.max(1) as f64
        )),
    );
    let hr = a.headroom;
    put(
        "chat_servers",
        (conn * hr / a.connections_per_chat_server).ceil().max(2.0),
        "nodes",
        Provenance::Assumption {
            how: format!(
                "connections x headroom {hr} / {:.0} connections per server [assumption: {:.1} GB of connection memory at the measured {:.1} KB each, {:.0} heartbeats/s]; at least 2",
                a.connections_per_chat_server,
                a.connections_per_chat_server * a.bytes_per_connection / 1e9,
                a.bytes_per_connection / 1000.0,
                a.connections_per_chat_server / hb_interval
            ),
        },
    );
    // kv nodes group-commit (one fsync per batch of queued requests).
    let by_writes = (kv_writes * hr / bench.kv_group_commit_writes_per_s).ceil();
    // Disk shards hold one copy of the first year (replicas are counted below).
    let by_disk = (day / a.replication * 365.0 / a.disk_per_kv_node).ceil();
    let shards = by_writes.max(by_disk).max(1.0);
    put(
        "kv_nodes",
        shards * a.replication,
        "nodes",
        bench_p(&format!(
            "max(write shards {by_writes:.0} = kv writes x headroom {hr} / {:.0} durable writes/s per node (group commit, 64 writes per fsync in the benchmark; the kv node batches whatever queued during the last fsync, up to 256), disk shards {by_disk:.0} = a year of one copy / {:.0} TB per node [assumption]) x replication {}; history is kept forever, so disk shards grow by as many each year; at one fsync per write ({:.0} writes/s per node) the write shards would be {:.0}",
            bench.kv_group_commit_writes_per_s,
            a.disk_per_kv_node / 1e12,
            a.replication,
            bench.kv_durable_writes_per_s,
            (kv_writes * hr / bench.kv_durable_writes_per_s).ceil()
        )),
    );
    // Measured when the benchmark file has it; the assumption otherwise.
    let (hb_per_node, hb_how) = if bench.presence_heartbeats_per_s > 0.0 {
        (
            bench.presence_heartbeats_per_s,
            "measured: a presence node on loopback RPC, the driver on the same cores",
        )
    } else {
        (a.heartbeats_per_presence_node, "assumption")
    };
    let presence_nodes = (conn / hb_interval * hr / hb_per_node).ceil().max(2.0);
    let presence_how = format!(
        "heartbeats/s x headroom {hr} / {hb_per_node:.0} heartbeats/s per node [{hb_how}]; at least 2"
    );
    put(
        "presence_nodes",
        presence_nodes,
        "nodes",
        if bench.presence_heartbeats_per_s > 0.0 {
            bench_p(&presence_how)
        } else {
            Provenance::Assumption { how: presence_how }
        },
    );
    // A Snowflake worker issues at most 4,096 ids per millisecond (12-bit sequence).
    let ids_per_node = bench.idgen_ids_per_s.min(4_096_000.0);
    put(
        "idgen_nodes",
        (msgs * hr / ids_per_node).ceil().max(2.0),
        "nodes",
        bench_p(&format!(
            "messages/s x headroom {hr} / {ids_per_node:.0} ids/s per node (the benchmark's {:.0}/s, capped by Snowflake's 4,096 per ms); at least 2 for availability [assumption]",
            bench.idgen_ids_per_s
        )),
    );
    // etcd carries coordination only (registrations, loads, worker ids), never traffic: its
    // load is set by the node counts and the code's renewal periods.
    let chat_servers = (conn * hr / a.connections_per_chat_server).ceil().max(2.0);
    let idgen_nodes = (msgs * hr / ids_per_node).ceil().max(2.0);
    let kv_nodes = shards * a.replication;
    let members = chat_servers + idgen_nodes + kv_nodes + presence_nodes;
    put(
        "etcd_requests_per_s",
        chat_servers * ETCD_PER_CHAT_SERVER
            + idgen_nodes * ETCD_PER_IDGEN_NODE
            + members * ETCD_PER_NODE_MEMBERS,
        "requests/s",
        Provenance::Derived {
            how: format!(
                "chat_servers x {ETCD_PER_CHAT_SERVER}/s (a lease keep-alive and a load put every 2 s, the peer list's two range reads every 2 s) + idgen_nodes x {ETCD_PER_IDGEN_NODE}/s (a worker lease keep-alive every second) + (chat, idgen, kv and presence nodes: {members:.0}) x {ETCD_PER_NODE_MEMBERS}/s (the member addresses, read every 2 s); each api and push node adds 0.5/s (the addresses) and an api node at most 2/s more (its list, re-read at most once a second). Measured on `chatd local-cluster` at idle before the member addresses: 8/s for 3 chat servers and 2 idgen nodes"
            ),
        },
    );
    put(
        "etcd_members",
        3.0,
        "members",
        Provenance::Assumption {
            how: "a quorum survives one member's loss (5 would survive two); the load above is a few hundred small requests a second, far below what one etcd cluster serves (etcd's own benchmarks: tens of thousands of writes/s on 8-core members) [assumption]".into(),
        },
    );
    put(
        "connection_memory_bytes",
        conn * a.bytes_per_connection,
        "bytes",
        Provenance::Derived {
            how: format!(
                "peak_concurrent_connections x {:.1} KB per idle WebSocket connection over TLS (wss://, the default; measured on a chatd chat server at 5,000 connections, scripts/bench-real.sh idle, benches/results/real/tls.txt; 6.3 KB over plain ws://)",
                a.bytes_per_connection / 1000.0
            ),
        },
    );
    put(
        "seed_connection_memory_bytes",
        a.seed_concurrent * a.seed_bytes_per_connection,
        "bytes",
        Provenance::Assumption {
            how: "the seed's back-of-envelope: 1M concurrent users x 10 KB = 10 GB".into(),
        },
    );
    put(
        "net_messages_per_send",
        m.net_messages as f64 / m.sends.max(1) as f64,
        "messages",
        sim("network messages (TCP writes) of the whole system per message sent, heartbeats and presence included".into()),
    );
    put(
        "kv_ops_per_send",
        m.kv_requests as f64 / m.sends.max(1) as f64,
        "requests",
        sim("kv requests of the whole system per message sent".into()),
    );
    put(
        "wire_bytes_per_send",
        m.wire_bytes as f64 / m.sends.max(1) as f64,
        "bytes",
        sim("bytes on TCP of the whole system per message sent".into()),
    );
    put(
        "heartbeat_wire_bytes_per_send",
        m.heartbeat_wire_bytes as f64 / m.sends.max(1) as f64,
        "bytes",
        sim("bytes on TCP of the devices' heartbeats and their answers per message sent (the chat servers' relays to presence are in the `chat-presence` path)".into()),
    );
    Plan {
        dau,
        figures: f,
        measurement: m.clone(),
        bench: bench.clone(),
        assumptions: a.clone(),
    }
}

fn human(v: f64, unit: &str) -> String {
    if unit.starts_with("bytes") {
        let (d, u) = [
            (1e15, "PB"),
            (1e12, "TB"),
            (1e9, "GB"),
            (1e6, "MB"),
            (1e3, "KB"),
        ]
        .into_iter()
        .find(|(d, _)| v >= *d)
        .unwrap_or((1.0, "B"));
        let rest = unit.strip_prefix("bytes").unwrap_or("");
        return format!("{:.2} {u}{rest}", v / d);
    }
    let (d, u) = [(1e9, " billion"), (1e6, " million"), (1e3, " thousand")]
        .into_iter()
        .find(|(d, _)| v >= *d)
        .unwrap_or((1.0, ""));
    if d == 1.0 {
        format!("{v:.2} {unit}")
    } else {
        format!("{:.2}{u} {unit}", v / d)
    }
}

fn provenance_cell(p: &Provenance) -> String {
    match p {
        Provenance::Model { how } => format!("model: {how}"),
        Provenance::Simulation {
            workload,
            scale,
            seed,
            how,
        } => format!("simulation (`{workload}`, scale {scale}, seed {seed}): {how}"),
        Provenance::Benchmark { file, how } => format!("benchmark `{file}`: {how}"),
        Provenance::Assumption { how } => format!("assumption: {how}"),
        Provenance::Derived { how } => format!("derived: {how}"),
    }
}

/// The Markdown plan.
pub fn markdown(p: &Plan) -> String {
    let m = &p.measurement;
    let mut s = format!(
        "# Capacity plan for {} daily active users\n\nAt the model's peak hour. Measured on the real node code in simulation: workload `{}` at scale {} ({} users), seed {}, {:.0} simulated s of steady traffic; per-node capacities from `{}`; assumptions labelled. Regenerate: `cargo run --release -p sim -- capacity --dau {} --out DIR`.\n\n| figure | value | provenance |\n|---|---|---|\n",
        human(p.dau as f64, "").trim(),
        m.workload,
        crate::scale_label(m.scale),
        m.users,
        m.seed,
        m.window_s,
        BENCH_FILE,
        p.dau
    );
    for (name, f) in &p.figures {
        s += &format!(
            "| `{name}` | {} | {} |\n",
            human(f.value, &f.unit),
            provenance_cell(&f.provenance)
        );
    }
    let conn = p
        .get("peak_concurrent_connections")
        .map_or(0.0, |f| f.value);
    let mem = p.get("connection_memory_bytes").map_or(0.0, |f| f.value);
    let seed = p
        .get("seed_connection_memory_bytes")
        .map_or(0.0, |f| f.value);
    s += &format!(
        "\n## The seed's back-of-envelope, side by side\n\n| | concurrent connections | bytes each | connection memory |\n|---|---|---|---|\n| seed (chapter) | {} | 10 KB | {} |\n| this plan | {} | {:.1} KB (measured) | {} |\n\nThe seed counts users; this plan counts device connections at the peak hour ({:.2} per DAU), which is why it is larger.\n",
        human(p.assumptions.seed_concurrent, ""),
        human(seed, "bytes"),
        human(conn, ""),
        p.assumptions.bytes_per_connection / 1000.0,
        human(mem, "bytes"),
        conn / p.dau as f64
    );
    s += &format!(
        "\n## Measured window (unscaled)\n\n{:.0} s; {} messages sent, {} acknowledgements seen, {} deliveries, {} heartbeats, {} connects, {:.0} devices connected on average; {} network messages, {} wire bytes, {} kv requests of which {} write operations, {} bytes of kv growth.\n",
        m.window_s, m.sends, m.acks, m.delivers, m.heartbeats, m.connects, m.mean_connected, m.net_messages, m.wire_bytes, m.kv_requests, m.kv_writes, m.storage_bytes
    );
    if !m.wire_by_path.is_empty() {
        let sent = m.sends.max(1) as f64;
        let mut paths = m.wire_by_path.clone();
        paths.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let text = m.text_bytes as f64 / sent;
        let recipients = m.delivers as f64 / sent;
        s += &format!(
            "\n## Wire bytes per message by path (measured)\n\nWhere `wire_bytes_per_send` goes: bytes written to TCP in the measured window between two kinds of hosts, both directions, per message sent (etcd's traffic is not counted). Heartbeats (the devices' `heartbeat` frames and the chat servers' answers, TLS included) are {:.0} B per message, inside `chat-device`; the rest of the system is {:.0} B per message against {:.0} B of text delivered to {:.2} devices (the goal of issue 14, 3 x text x devices + 1 KB, would be {:.0} B).\n\n| path | bytes per message | share |\n|---|---|---|\n",
            m.heartbeat_wire_bytes as f64 / sent,
            (m.wire_bytes - m.heartbeat_wire_bytes.min(m.wire_bytes)) as f64 / sent,
            text,
            recipients,
            3.0 * text * recipients + 1024.0,
        );
        for (path, n) in paths {
            s += &format!(
                "| `{path}` | {:.0} | {:.1} % |\n",
                n as f64 / sent,
                100.0 * n as f64 / m.wire_bytes.max(1) as f64
            );
        }
    }
    if !m.kv_by_op.is_empty() {
        let mut ops = m.kv_by_op.clone();
        ops.retain(|(_, n, w)| *n > 0 || *w > 0);
        ops.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)));
        let sent = m.sends.max(1) as f64;
        s += "\n## kv operations per message (measured)\n\nWhat drives `kv_writes_per_s` and `kv_reads_per_s`: every kv request of the measured window by operation, per message sent.\n\n| operation | requests | write operations |\n|---|---|---|\n";
        for (op, n, w) in ops {
            s += &format!(
                "| `{op}` | {:.2} | {:.2} |\n",
                n as f64 / sent,
                w as f64 / sent
            );
        }
    }
    s += &format!(
        "\n## Per-node capacities (benchmark)\n\n`{}`, measured on {}: {:.0} durable kv writes/s (one fsync each), {:.0} with 64 writes per fsync, {:.0} ids/s, {:.0} client frames/s per core.\n",
        BENCH_FILE,
        p.bench.measured_on,
        p.bench.kv_durable_writes_per_s,
        p.bench.kv_group_commit_writes_per_s,
        p.bench.idgen_ids_per_s,
        p.bench.codec_frames_per_s
    );
    s
}

/// Writes `capacity.md` and `capacity.json` into `dir`.
pub fn write(dir: &Path, p: &Plan) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // JSON: every figure as a field of `figures` (name -> {value, unit, provenance}).
    let figures: serde_json::Map<String, serde_json::Value> = p
        .figures
        .iter()
        .map(|(n, f)| {
            (
                n.clone(),
                serde_json::to_value(f).expect("figures serialize"),
            )
        })
        .collect();
    let json = serde_json::json!({
        "dau": p.dau,
        "figures": figures,
        "measurement": p.measurement,
        "bench": p.bench,
        "bench_file": BENCH_FILE,
        "assumptions": p.assumptions,
    });
    let j = dir.join("capacity.json");
    std::fs::write(&j, serde_json::to_string_pretty(&json).expect("json"))?;
    let md = dir.join("capacity.md");
    std::fs::write(&md, markdown(p))?;
    Ok(vec![md, j])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement() -> Measurement {
        Measurement {
            workload: "peak-hour".into(),
            seed: 1,
            scale: 2_000.0 / 50e6,
            users: 2_000,
            window_s: 500.0,
            mean_connected: 420.0,
            sends: 850,
            acks: 840,
            delivers: 4_000,
            heartbeats: 42_000,
            connects: 500,
            net_messages: 300_000,
            wire_bytes: 60_000_000,
            heartbeat_wire_bytes: 10_000_000,
            wire_by_path: vec![
                ("chat-device".into(), 30_000_000),
                ("kv-kv".into(), 30_000_000),
            ],
            kv_requests: 20_000,
            kv_writes: 8_000,
            storage_bytes: 2_000_000,
            chars: 40_000,
            text_bytes: 40_000,
            kv_by_op: vec![("append".into(), 840, 840)],
            kv_replicas: 1,
            storage_page_bytes: 1_500_000,
            storage_stored_bytes: 900_000,
            storage_history_page_bytes: 0,
            storage_history_stored_bytes: 0,
        }
    }

    // Proves the plan's figures are consistent: heartbeats/s are connections / 5, a year of
    // storage is 365 days of it, deliveries >= messages, figures scale with DAU, and the
    // files are written with every field the issue names.
    #[test]
    fn figures_are_consistent_and_written() {
        let m = measurement();
        let p = plan(
            50_000_000,
            &Model::default(),
            &m,
            &default_bench(),
            &Assumptions::default(),
        );
        let v = |n: &str| p.get(n).unwrap_or_else(|| panic!("{n} missing")).value;
        assert!((v("heartbeats_per_s") - v("peak_concurrent_connections") / 5.0).abs() < 1e-6);
        assert!((v("storage_bytes_per_year") - 365.0 * v("storage_bytes_per_day")).abs() < 1.0);
        assert!(v("peak_deliveries_per_s") >= v("peak_messages_per_s"));
        // 420 connected of 2,000 users -> 10.5 M of 50 M.
        assert!((v("peak_concurrent_connections") - 10.5e6).abs() < 1.0);
        let half = plan(
            25_000_000,
            &Model::default(),
            &m,
            &default_bench(),
            &Assumptions::default(),
        );
        assert!(
            (half.get("peak_messages_per_s").unwrap().value * 2.0 - v("peak_messages_per_s")).abs()
                < 1e-6
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &p).unwrap();
        let j: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("capacity.json")).unwrap(),
        )
        .unwrap();
        for name in [
            "dau",
            "peak_concurrent_connections",
            "peak_messages_per_s",
            "peak_deliveries_per_s",
            "heartbeats_per_s",
            "kv_writes_per_s",
            "kv_reads_per_s",
            "storage_bytes_per_day",
            "storage_bytes_per_year",
            "bandwidth_bytes_per_s",
            "chat_servers",
            "kv_nodes",
            "presence_nodes",
            "idgen_nodes",
            "etcd_requests_per_s",
            "etcd_members",
        ] {
            let f = &j["figures"][name];
            assert!(f["value"].as_f64().is_some(), "{name}: {f}");
            assert!(f["provenance"]["kind"].as_str().is_some(), "{name}: {f}");
        }
        let md = std::fs::read_to_string(dir.path().join("capacity.md")).unwrap();
        assert!(md.contains("10 KB") && md.contains("back-of-envelope"));
    }

    // Proves a measurement with the history tables' pages sizes storage from them (not from
    // the files, which also hold bounded tables), per copy, with the run's text swapped for
    // the model's mean.
    #[test]
    fn storage_comes_from_the_history_tables() {
        let model = Model::default();
        let a = Assumptions::default();
        let day = |m: &Measurement| {
            plan(50_000_000, &model, m, &default_bench(), &a)
                .get("storage_bytes_per_day")
                .expect("storage")
                .value
        };
        let mut m = measurement();
        m.kv_replicas = 3;
        m.storage_history_page_bytes = 3 * (40_000 + 850 * 300);
        m.storage_history_stored_bytes = 3 * (40_000 + 850 * 200);
        let per_message = 300.0 + model.mean_text_chars();
        let msgs = model.messages_per_user_per_day * 50e6;
        assert!((day(&m) - per_message * msgs * a.replication).abs() < 1.0);
        m.storage_history_page_bytes = 0;
        assert!(day(&m) > 0.0, "falls back to file growth");
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(10e9, "bytes"), "10.00 GB");
        assert_eq!(human(2.5e6, "bytes/s"), "2.50 MB/s");
        assert_eq!(human(1234.0, "nodes"), "1.23 thousand nodes");
        assert_eq!(human(12.0, "nodes"), "12.00 nodes");
    }
}
