//! Replicated kv in the real world: three `chatd kv` processes on loopback, three shards of
//! three replicas each (redb on disk), driven through the same shard client every node uses.
//!
//! 1. Names are reserved on every shard; the leader of shard 0 is killed (`kill -9`) and
//!    writes go on without it; it restarts and catches up from the log.
//! 2. A node loses its disk: killed, its directory deleted, restarted empty (no bootstrap).
//!    Its replicas join their groups and catch up (a snapshot, then the log).
//! 3. The proof the rebuilt node holds the data: with each of the two old nodes down in
//!    turn, the rebuilt node is half of every quorum, and every name written reads back.

#![cfg(not(madsim))]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nodes::canary::Canaries;
use nodes::cluster::Peers;
use nodes::deploy::config::ClusterSizes;
use nodes::deploy::Config;
use nodes::proto::internal::{Request, Response, ShardStatus};
use nodes::rpc::RpcClient;

mod common;

const NODES: usize = 3;
const SHARDS: u32 = 3;

/// A `chatd kv` process, killed (`kill -9`) when dropped.
struct KvProc(Child);

impl Drop for KvProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    cfg: Config,
    path: PathBuf,
    procs: Vec<Option<KvProc>>,
    /// Where each kv node listens now (a replaced one may have moved).
    addrs: Vec<SocketAddr>,
    /// The etcd member, when the cluster coordinates on one.
    _etcd: Option<KvProc>,
}

impl Cluster {
    fn new(data: &Path) -> Cluster {
        Cluster::with_etcd(data, false)
    }

    /// With `etcd`: one Debian etcd member (TLS with client certificates, as
    /// `local-cluster` runs it), where the kv nodes keep their layout and addresses.
    fn with_etcd(data: &Path, etcd: bool) -> Cluster {
        let base = common::free_base(NODES as u16 + 3);
        let sizes = ClusterSizes {
            etcd: u16::from(etcd),
            presence: 1,
            push: 1,
            kv: NODES as u16,
            kv_shards: SHARDS as u16,
            kv_replicas: 3,
            idgen: 1,
            chat: 1,
            api: 1,
        };
        let mut cfg = Config::loopback_cluster(
            data.to_path_buf(),
            SocketAddr::from(([127, 0, 0, 1], base + 10)),
            &sizes,
        )
        .expect("config");
        for (i, n) in cfg.kv.iter_mut().enumerate() {
            n.listen = SocketAddr::from(([127, 0, 0, 1], base + i as u16));
            n.admin = None;
        }
        let etcd_proc = etcd.then(|| {
            let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            cfg.etcd[0].client = at(base + NODES as u16 + 1).to_string();
            cfg.etcd[0].peer = Some(at(base + NODES as u16 + 2));
            nodes::deploy::certs::ensure(&cfg).expect("the cluster CA and etcd's certificate");
            let (_, args) = nodes::deploy::supervisor::etcd_members(&cfg).remove(0);
            let log = std::fs::File::create(data.join("etcd.log")).expect("etcd log");
            KvProc(
                Command::new("etcd")
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start etcd: run scripts/install-deps.sh (Debian's etcd-server)"),
            )
        });
        let path = data.join("cluster.toml");
        std::fs::write(&path, cfg.to_toml()).expect("write config");
        cfg.mark_kv_bootstrap().expect("bootstrap marks");
        Cluster {
            addrs: cfg.kv.iter().map(|n| n.listen).collect(),
            cfg,
            path,
            procs: (0..NODES).map(|_| None).collect(),
            _etcd: etcd_proc,
        }
    }

    fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    fn start_with(&mut self, i: usize, extra: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_chatd"))
            .args(["kv", "--config"])
            .arg(&self.path)
            .args(["--index", &i.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start chatd kv");
        self.procs[i] = Some(KvProc(child));
    }

    /// `kill -9`, and wait until the process is gone.
    fn kill(&mut self, i: usize) {
        drop(self.procs[i].take().expect("running"));
    }

    fn wipe(&mut self, i: usize) {
        let dir = self.cfg.kv_dir(i);
        std::fs::remove_dir_all(&dir).expect("delete the kv directory");
    }

    /// The operator's certificate (created with the cluster's at first start).
    fn operator(&self) -> nodes::tls::NodeTls {
        nodes::deploy::certs::node_tls(&self.cfg, nodes::tls::Principal::Operator)
            .expect("the operator's certificate")
    }

    /// The kv clients every node has (following etcd when the cluster has one).
    fn peers(&self) -> std::sync::Arc<Peers> {
        let peers = Peers::new(self.cfg.cluster_map(), Canaries::none(), self.operator());
        peers.spawn_membership(None);
        peers
    }

    async fn status(&self, i: usize) -> Option<Vec<ShardStatus>> {
        let client = RpcClient::new(self.addrs[i], self.operator());
        match tokio::time::timeout(Duration::from_secs(2), client.call(Request::KvStatus)).await {
            Ok(Ok(Response::KvStatus(list))) => Some(list),
            _ => None,
        }
    }

    /// The node that leads `shard`, once one does.
    async fn leader_of(&self, shard: u32) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for i in 0..NODES {
                if let Some(list) = self.status(i).await {
                    if list.iter().any(|s| s.shard == shard && s.role == "leader") {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "shard {shard} elected no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every replica on node `i` is a voter in a settled membership (not joint,
    /// no learner, one voter per node) and has applied what its leader has committed.
    async fn caught_up(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mine = self.status(i).await.unwrap_or_default();
            let mut done = mine.len() == SHARDS as usize;
            for s in &mine {
                let settled = s.voters.len() == NODES
                    && s.voters_outgoing.is_empty()
                    && s.learners.is_empty();
                let voter = settled && matches!(s.role.as_str(), "leader" | "follower");
                let leader_commit = match s.leader {
                    Some(l) => self
                        .status(l as usize)
                        .await
                        .and_then(|list| list.into_iter().find(|x| x.shard == s.shard))
                        .map_or(u64::MAX, |x| x.commit),
                    None => u64::MAX,
                };
                done &= voter && s.applied >= leader_commit;
            }
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kv-{i} did not catch up: {mine:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn name(k: u64) -> String {
    format!("user-{k:05}")
}

/// Reserves names `range` on their shards (a retry of the same reservation answers Ok).
async fn write(peers: &Peers, range: std::ops::Range<u64>) {
    for k in range {
        let req = Request::ReserveName {
            name: name(k),
            user: 1_000 + k,
        };
        let mut tries = 0;
        loop {
            match peers.kv_for_name(&name(k)).call(req.clone()).await {
                Ok(Response::Reserved { user, .. }) => {
                    assert_eq!(user, 1_000 + k, "{} taken by another user", name(k));
                    break;
                }
                other => {
                    tries += 1;
                    assert!(tries < 10, "reserve {}: {other:?}", name(k));
                }
            }
        }
    }
}

/// Every name in `range` reads back as its user.
async fn read_all(peers: &Peers, range: std::ops::Range<u64>) {
    for k in range {
        let mut tries = 0;
        loop {
            let got = peers
                .kv_for_name(&name(k))
                .call(Request::LookupName { name: name(k) })
                .await;
            match got {
                Ok(Response::MaybeId(Some(u))) if u == 1_000 + k => break,
                Ok(Response::MaybeId(other)) => panic!("{} reads back as {other:?}", name(k)),
                other => {
                    tries += 1;
                    assert!(tries < 10, "lookup {}: {other:?}", name(k));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_survives_a_leader_crash_and_a_lost_disk() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut c = Cluster::new(data.path());
    for i in 0..NODES {
        c.start(i);
    }
    let peers = c.peers();
    for shard in 0..SHARDS {
        c.leader_of(shard).await;
    }
    write(&peers, 0..300).await;

    // 1. The leader of shard 0 crashes; writes go on; it comes back and catches up.
    let leader = c.leader_of(0).await;
    c.kill(leader);
    write(&peers, 300..500).await;
    c.start(leader);
    c.caught_up(leader).await;

    // 2. A node (not the one just restarted) loses its disk and rejoins empty.
    let lost = (leader + 1) % NODES;
    c.kill(lost);
    c.wipe(lost);
    write(&peers, 500..700).await;
    c.start(lost);
    c.caught_up(lost).await;
    for s in c.status(lost).await.expect("status") {
        assert!(
            s.applied > 0,
            "shard {} on kv-{lost} is empty: {s:?}",
            s.shard
        );
    }

    // 3. The rebuilt node is half of every quorum while each old node is down in turn.
    let mut written = 700;
    for down in (0..NODES).filter(|&i| i != lost) {
        c.kill(down);
        read_all(&peers, 0..written).await;
        write(&peers, written..written + 50).await;
        written += 50;
        c.start(down);
        c.caught_up(down).await;
    }
    read_all(&peers, 0..written).await;
}

/// A kv node's machine is replaced by one at another address, and nobody's config is edited:
/// the new node publishes its address in etcd (`chatd kv --replace --listen`), and the other
/// kv nodes (its shards' leaders must reach it to rebuild it) and every client find it there.
/// The proof: with one of the two old nodes down, the moved node is half of every quorum, and
/// everything written before and after the move reads back. A node whose config disagrees
/// with the layout in etcd refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_node_replaced_at_a_new_address_is_found_through_etcd() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut c = Cluster::with_etcd(data.path(), true);
    for i in 0..NODES {
        c.start(i);
    }
    let peers = c.peers();
    for shard in 0..SHARDS {
        c.leader_of(shard).await;
    }
    write(&peers, 0..200).await;

    // kv-1's machine dies with its disk; the replacement listens elsewhere.
    let moved = 1;
    c.kill(moved);
    write(&peers, 200..300).await;
    let new_addr = SocketAddr::from(([127, 0, 0, 1], common::free_base(1)));
    let listen = new_addr.to_string();
    c.start_with(moved, &["--replace", "--listen", &listen]);
    c.addrs[moved] = new_addr;
    c.caught_up(moved).await;
    assert_ne!(new_addr, c.cfg.kv[moved].listen, "the node did move");

    // etcd names the new address, and the clients moved there.
    let operator = c.operator();
    let etcd =
        nodes::coord::etcd::Etcd::for_coordination(&c.cfg.cluster_map().coordination, &operator)
            .expect("the cluster is on etcd");
    let in_etcd = nodes::coord::members::kv_addresses(&etcd)
        .await
        .expect("etcd answers");
    assert_eq!(in_etcd.get(&(moved as u32)), Some(&new_addr), "{in_etcd:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while peers.kv_node(moved).addr() != new_addr {
        assert!(
            Instant::now() < deadline,
            "the clients never moved to {new_addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // With kv-0 down, every quorum needs the moved node.
    c.kill(0);
    read_all(&peers, 0..300).await;
    write(&peers, 300..350).await;
    c.start(0);
    c.caught_up(0).await;
    read_all(&peers, 0..350).await;

    // A config that gives the cluster another shape is refused, naming both.
    let mut wrong = c.cfg.clone();
    wrong.kv_shards = SHARDS + 1;
    let wrong_path = data.path().join("wrong.toml");
    std::fs::write(&wrong_path, wrong.to_toml()).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["kv", "--config"])
        .arg(&wrong_path)
        .args(["--index", "2", "--listen", "127.0.0.1:1"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run chatd kv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a node of another layout started");
    assert!(
        stderr.contains("resharding is not supported") && stderr.contains("4 shards"),
        "{stderr}"
    );
}

/// A kv node whose storage fails for good (here its directory cannot be created: a file is in
/// the way; a full disk fails the same way) says so on `/healthz` (503 with the error), and
/// after `EXIT_AFTER_IO_FAILURES` failures in a row it exits non-zero, for its supervisor to
/// restart it, instead of answering "ok" while it never works again.
#[test]
fn a_kv_node_whose_storage_fails_reports_it_and_exits() {
    use std::io::{Read, Write};
    let data = tempfile::tempdir().expect("temp dir");
    let base = common::free_base(2);
    let sizes = ClusterSizes {
        etcd: 0,
        presence: 1,
        push: 1,
        kv: 1,
        kv_shards: 1,
        kv_replicas: 1,
        idgen: 1,
        chat: 1,
        api: 1,
    };
    let mut cfg = Config::loopback_cluster(
        data.path().to_path_buf(),
        SocketAddr::from(([127, 0, 0, 1], base + 10)),
        &sizes,
    )
    .expect("config");
    let admin = SocketAddr::from(([127, 0, 0, 1], base + 1));
    cfg.kv[0].listen = SocketAddr::from(([127, 0, 0, 1], base));
    cfg.kv[0].admin = Some(admin);
    let path = data.path().join("cluster.toml");
    std::fs::write(&path, cfg.to_toml()).expect("write config");
    std::fs::write(cfg.kv_dir(0), b"not a directory").expect("block the kv directory");
    let mut child = KvProc(
        Command::new(env!("CARGO_BIN_EXE_chatd"))
            .args(["kv", "--config"])
            .arg(&path)
            .args(["--index", "0"])
            .env("RUST_LOG", "error")
            .spawn()
            .expect("start chatd kv"),
    );
    let healthz = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(admin).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let start = Instant::now();
    let mut unhealthy = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(r) = healthz() {
            if r.starts_with("HTTP/1.1 503") {
                unhealthy = Some(r);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = unhealthy.expect("/healthz turned 503");
    assert!(r.contains("shard 0: replica failed"), "{r}");
    eprintln!("unhealthy after {:?}", start.elapsed());
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the node did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status}");
    eprintln!("exited ({status}) after {:?}", start.elapsed());
}
