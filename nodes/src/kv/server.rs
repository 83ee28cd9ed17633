//! The kv node shell: hosts this node's replica of every shard placed on it, serves RPCs, and
//! carries Raft messages between nodes.
//!
//! - One task per replica owns it ([`Replica`]): it takes requests off a bounded inbox (what
//!   queued while the last Ready was synced becomes the next entry: group commit), ticks the
//!   Raft clock, and runs each Ready: early messages out, then one durable commit (redb's
//!   fsync on a blocking thread; in the simulation, the simulated disk's delay) while the
//!   replica goes on stepping messages and ticking, then answers and the messages that
//!   needed persistence.
//! - One sender task per peer node carries Raft messages (`RaftMessages`), one call at a time
//!   so they arrive in order; a full queue drops messages (Raft resends) and reports failed
//!   snapshots so the leader tries again.
//! - A replica whose storage fails its checksums is rebuilt: its file is removed and it
//!   rejoins the shard as a new, empty replica that catches up from a snapshot.
//!
//! It does not retry callers' requests (callers follow `NotLeader` hints, `kv::client`), and
//! it never decides membership by itself beyond asking to join.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, oneshot};

use super::disk::SimDisk;
use super::placement::{slot_of, Placement};
use super::replica::{Persisted, Replica, Reply, TICK};
use super::store::{Store, StoreError};
use crate::canary::{Canaries, Canary};
use crate::metrics::{Metrics, OpLabel, ShardLabel, ShardPeerLabel};
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response, B64};
use crate::rpc::{self, RpcClient};

/// Where a kv node keeps its bytes: one redb database per shard replica.
#[derive(Debug, Clone)]
pub enum Storage {
    /// The simulation's in-memory disk that outlives node restarts.
    Sim(Arc<SimDisk>),
    /// A directory of redb files, `shard-{s}.redb` (real deployment).
    Dir(PathBuf),
}

impl Storage {
    fn open(&self, shard: u32) -> Result<redb::Database, StoreError> {
        let opened = match self {
            Storage::Sim(disk) => redb::Database::builder()
                .set_cache_size(SIM_CACHE_BYTES)
                .create_with_backend(disk.backend(&file_name(shard))),
            Storage::Dir(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
                redb::Database::create(dir.join(file_name(shard)))
            }
        };
        opened.map_err(|e| match e {
            redb::DatabaseError::Storage(s) => redb::Error::from(s).into(),
            other => StoreError::Io(other.to_string()),
        })
    }

    /// Removes a replica's file (its data failed its checksums).
    fn remove(&self, shard: u32) {
        match self {
            Storage::Sim(disk) => disk.remove_file(&file_name(shard)),
            Storage::Dir(dir) => {
                let _ = std::fs::remove_file(dir.join(file_name(shard)));
            }
        }
    }

    /// Waits out the fsyncs asked for since the last call, one after another (the simulated
    /// disk's time; a real disk's fsync already blocked inside the commit), after which they
    /// are done: only now may anything that depends on them happen.
    async fn settle(&self) {
        if let Storage::Sim(disk) = self {
            while let Some(wait) = disk.next_sync_wait() {
                tokio::time::sleep(wait).await;
            }
            disk.complete_syncs();
        }
    }
}

/// redb's page cache per replica in the simulation: small, as a production database is much
/// larger than its cache, so reads reach the (simulated) disk and meet what is wrong with it.
const SIM_CACHE_BYTES: usize = 256 << 10;

fn file_name(shard: u32) -> String {
    format!("shard-{shard}.redb")
}

#[derive(Debug, Clone)]
pub struct KvConfig {
    /// This node's place among the kv nodes.
    pub slot: u32,
    /// Every kv node's RPC address, by slot (this node's included).
    pub nodes: Vec<SocketAddr>,
    pub placement: Placement,
    pub listen: SocketAddr,
    pub storage: Storage,
    /// A replica that finds no data starts a new shard (only when the cluster is created);
    /// otherwise it joins the shard as a new replica.
    pub bootstrap: bool,
    /// Seeds the Raft ids of replicas that join with empty disks.
    pub seed: u64,
    pub canaries: Canaries,
    pub metrics: Arc<Metrics>,
    /// This node's certificate (Raft traffic to its peers, and its RPC server).
    pub tls: crate::tls::NodeTls,
    /// What the node's `/healthz` reports (`KvHealth::check`), shared with its admin endpoint.
    pub health: Arc<KvHealth>,
    /// With etcd: the layout checked there, this node's address published there, and its
    /// peers' addresses followed from there (`coord::members`). `None`: the config's addresses.
    pub membership: Option<Membership>,
}

/// A kv node's membership in etcd.
#[cfg(feature = "etcd")]
pub type Membership = crate::coord::members::KvMembership;
/// Without etcd support there is none.
#[cfg(not(feature = "etcd"))]
pub type Membership = std::convert::Infallible;

/// A replica that failed this many times in a row, none of its runs lasting
/// `HEALTHY_RUN`, makes the node unhealthy (`/healthz` answers 503 with its last error).
pub const UNHEALTHY_AFTER: u32 = 3;
/// A replica whose storage failed this many times in a row with an I/O error (not corruption,
/// which is rebuilt from the peers: a full disk, a directory it cannot write) stops the node:
/// `run` returns the error, the process exits non-zero and its supervisor restarts it. With
/// the backoff between attempts (100 ms more each time) that is about 5 s of failing.
pub const EXIT_AFTER_IO_FAILURES: u32 = 10;
/// A replica that ran this long since it last opened counts as recovered.
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// One replica's storage health.
#[derive(Debug, Default)]
struct ReplicaHealth {
    failures_in_a_row: u32,
    last_error: String,
    /// When it last opened (None while it is failed).
    opened_at: Option<tokio::time::Instant>,
}

/// The storage health of a kv node's replicas: failures in a row per shard.
#[derive(Debug, Default)]
pub struct KvHealth {
    /// By shard. A std mutex: short updates.
    shards: std::sync::Mutex<BTreeMap<u32, ReplicaHealth>>,
    /// Set (with the error) when a replica hit `EXIT_AFTER_IO_FAILURES`: `run` returns it.
    fatal: tokio::sync::Notify,
    fatal_error: std::sync::Mutex<Option<String>>,
}

impl KvHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn opened(&self, shard: u32) {
        let mut s = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        s.entry(shard).or_default().opened_at = Some(tokio::time::Instant::now());
    }

    /// Records a failure; true when the node must stop.
    fn failed(&self, shard: u32, err: &StoreError) -> bool {
        let mut s = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let e = s.entry(shard).or_default();
        let recovered = e.opened_at.is_some_and(|t| t.elapsed() >= HEALTHY_RUN);
        e.failures_in_a_row = if recovered {
            1
        } else {
            e.failures_in_a_row + 1
        };
        e.last_error = err.to_string();
        e.opened_at = None;
        let fatal =
            matches!(err, StoreError::Io(_)) && e.failures_in_a_row >= EXIT_AFTER_IO_FAILURES;
        if fatal {
            *self.fatal_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                "shard {shard}: storage failed {} times in a row: {}",
                e.failures_in_a_row, e.last_error
            ));
            self.fatal.notify_one();
        }
        fatal
    }

    /// `Err(reason)` while a replica keeps failing: `UNHEALTHY_AFTER` failures in a row and
    /// not open for `HEALTHY_RUN` since.
    pub fn check(&self) -> Result<(), String> {
        let s = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        for (shard, h) in s.iter() {
            let recovered = h.opened_at.is_some_and(|t| t.elapsed() >= HEALTHY_RUN);
            if h.failures_in_a_row >= UNHEALTHY_AFTER && !recovered {
                return Err(format!(
                    "shard {shard}: replica failed {} times in a row: {}",
                    h.failures_in_a_row, h.last_error
                ));
            }
        }
        Ok(())
    }

    async fn fatal(&self) -> String {
        loop {
            if let Some(e) = self
                .fatal_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return e;
            }
            self.fatal.notified().await;
        }
    }
}

/// Requests waiting for one replica. When full, RPC handlers wait for room (backpressure:
/// the rpc connection stops reading, and callers' deadlines apply).
pub const KV_QUEUE_MAX: usize = 4096;

/// Most client requests in one log entry (one group commit).
pub const GROUP_COMMIT_MAX: usize = 256;

/// Raft messages waiting for one peer node; beyond this they are dropped (Raft resends).
const PEER_QUEUE_MAX: usize = 4096;
/// Deadline of one `RaftMessages` call (a silent peer must not hold the queue long).
const PEER_CALL_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often the kv-ack-before-sync canary fsyncs what it acknowledged.
const CANARY_SYNC_EVERY: Duration = Duration::from_secs(1);

/// What a replica task is asked.
// A client request is the common case and travels inline (about 240 bytes, a user record's
// worth): boxing it would cost an allocation per request to shrink the rare Raft input.
#[allow(clippy::large_enum_variant)]
enum Input {
    Client(Request, Reply),
    Raft(Vec<Message>),
    Join(u64, Reply),
    Status(oneshot::Sender<crate::proto::internal::ShardStatus>),
    SnapshotSent { to: u64, ok: bool },
    Unreachable(u64),
    ForceRecover(Reply),
}

/// Creates this node's replicas of a new cluster's shards, durably, before the node runs
/// (cluster creation; replicas that already hold data are left alone).
pub fn bootstrap(cfg: &KvConfig) -> Result<(), StoreError> {
    for shard in cfg.placement.shards_on(cfg.slot) {
        let task = ReplicaTask {
            cfg: cfg.clone(),
            shard,
            transport: Transport::detached(),
            store_slot: Arc::new(std::sync::Mutex::new(None)),
        };
        task.open(true)?;
    }
    Ok(())
}

/// Runs a kv node until the process (or simulated node) dies.
pub async fn run(cfg: KvConfig) -> anyhow::Result<()> {
    if let Storage::Sim(disk) = &cfg.storage {
        disk.set_skip_verify(cfg.canaries.is_on(Canary::SkipChecksum));
    }
    #[cfg(feature = "etcd")]
    let layout_checked = match &cfg.membership {
        Some(m) => check_layout_first(m, &cfg.placement).await?,
        None => true,
    };
    let transport = Transport::start(&cfg);
    let mut inboxes = BTreeMap::new();
    let mut stores = Vec::new();
    for shard in cfg.placement.shards_on(cfg.slot) {
        let (tx, rx) = mpsc::channel(KV_QUEUE_MAX);
        let shared = Arc::new(std::sync::Mutex::new(None));
        stores.push(shared.clone());
        inboxes.insert(shard, tx.clone());
        transport.register(shard, tx);
        let task = ReplicaTask {
            cfg: cfg.clone(),
            shard,
            transport: transport.clone(),
            store_slot: shared,
        };
        tokio::spawn(task.run(rx));
    }
    tracing::info!(listen = %cfg.listen, slot = cfg.slot, shards = ?inboxes.keys().collect::<Vec<_>>(), "kv node up");
    let inboxes = Arc::new(inboxes);
    let metrics = cfg.metrics.clone();
    let handler: rpc::Handler = Arc::new(move |req| {
        let (inboxes, stores, metrics) = (inboxes.clone(), stores.clone(), metrics.clone());
        async move { handle(req, &inboxes, &stores, &metrics).await }.boxed()
    });
    let health = cfg.health.clone();
    // With etcd: the layout (if etcd did not answer before the start), then this node's
    // address and its peers' (`coord::members::follow`, for as long as the node runs). Ends
    // only with a layout that disagrees.
    #[cfg(feature = "etcd")]
    let membership = {
        let membership = cfg.membership.clone();
        let (placement, clients) = (cfg.placement, transport.clients());
        async move {
            let Some(m) = membership else {
                return std::future::pending().await;
            };
            if !layout_checked {
                let mine = (&placement).into();
                crate::coord::members::check_layout_until_answered(&m.etcd, mine).await?;
            }
            let groups = vec![(crate::cluster::Role::Kv, clients)];
            let me = Some((crate::cluster::Role::Kv, m.slot, m.advertise));
            crate::coord::members::follow(m.etcd.clone(), groups, me, || true).await;
            Ok::<(), crate::coord::members::LayoutError>(())
        }
    };
    #[cfg(not(feature = "etcd"))]
    let membership = std::future::pending::<Result<(), std::convert::Infallible>>();
    tokio::select! {
        biased;
        e = health.fatal() => anyhow::bail!("kv node {} stops: {e}", cfg.slot),
        r = rpc::serve(cfg.listen, handler, cfg.tls.clone()) => r?,
        r = membership => {
            if let Err(e) = r {
                anyhow::bail!("kv node {} stops: {e}", cfg.slot);
            }
        }
    }
    Ok(())
}

/// One try at the layout in etcd before any replica starts: a config that disagrees stops
/// the node here. Whether etcd answered (if not, the check goes on in the background while
/// the node serves).
#[cfg(feature = "etcd")]
async fn check_layout_first(
    m: &crate::coord::members::KvMembership,
    placement: &Placement,
) -> anyhow::Result<bool> {
    match crate::coord::members::check_layout(&m.etcd, placement.into()).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => anyhow::bail!("kv node {} does not start: {e}", m.slot),
        Err(e) => {
            tracing::warn!(error = %e, "etcd did not answer: the kv layout is checked later");
            Ok(false)
        }
    }
}

type Inboxes = BTreeMap<u32, mpsc::Sender<Input>>;
/// Each replica's current store, for the node's counters (`KvStats`).
type StoreSlot = Arc<std::sync::Mutex<Option<Arc<Store>>>>;

async fn handle(req: Request, inboxes: &Inboxes, stores: &[StoreSlot], m: &Metrics) -> Response {
    match req {
        Request::Shard { shard, req } => {
            let op: &'static str = (&*req).into();
            m.kv_requests.get_or_create(&OpLabel { op }).inc();
            ask(inboxes, shard, |r| Input::Client(*req, r)).await
        }
        Request::RaftMessages { shard, msgs } => {
            let Some(inbox) = inboxes.get(&shard) else {
                return Response::Ok;
            };
            let parsed: Vec<Message> = msgs
                .iter()
                .filter_map(|b| Message::parse_from_bytes(&b.0).ok())
                .collect();
            // Full: dropped, as a lossy network would; Raft resends.
            let _ = inbox.try_send(Input::Raft(parsed));
            Response::Ok
        }
        Request::KvJoin { shard, id } => ask(inboxes, shard, |r| Input::Join(id, r)).await,
        Request::KvForceRecover { shard } => ask(inboxes, shard, Input::ForceRecover).await,
        Request::KvStatus => {
            let mut out = Vec::new();
            for inbox in inboxes.values() {
                let (tx, rx) = oneshot::channel();
                if inbox.send(Input::Status(tx)).await.is_ok() {
                    if let Ok(s) = rx.await {
                        out.push(s);
                    }
                }
            }
            Response::KvStatus(out)
        }
        Request::KvStats => {
            let (mut requests, mut writes) = (0, 0);
            let mut by_op: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            let mut tables: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for slot in stores {
                let store = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(store) = store else { continue };
                if let Response::KvStats {
                    requests: r,
                    writes: w,
                    by_op: ops,
                    space,
                } = store.stats()
                {
                    requests += r;
                    writes += w;
                    for (op, n, wr) in ops {
                        let e = by_op.entry(op).or_default();
                        e.0 += n;
                        e.1 += wr;
                    }
                    for t in space {
                        let e = tables.entry(t.table).or_default();
                        e.0 += t.stored_bytes;
                        e.1 += t.page_bytes;
                    }
                }
            }
            Response::KvStats {
                requests,
                writes,
                by_op: by_op.into_iter().map(|(op, (n, w))| (op, n, w)).collect(),
                space: tables
                    .into_iter()
                    .map(
                        |(table, (stored_bytes, page_bytes))| crate::proto::internal::TableSpace {
                            table,
                            stored_bytes,
                            page_bytes,
                        },
                    )
                    .collect(),
            }
        }
        other => Response::Error {
            code: ErrorCode::BadRequest,
            detail: format!("a kv node does not serve {}", <&str>::from(&other)),
        },
    }
}

/// Hands a request to the shard's replica and waits for its answer.
async fn ask(inboxes: &Inboxes, shard: u32, input: impl FnOnce(Reply) -> Input) -> Response {
    let Some(inbox) = inboxes.get(&shard) else {
        return Response::Error {
            code: ErrorCode::BadRequest,
            detail: format!("shard {shard} has no replica on this node"),
        };
    };
    let (tx, rx) = oneshot::channel();
    // The replica could not serve it (stopped, rebuilding, or its leadership unconfirmed):
    // callers try another replica.
    if inbox.send(input(tx)).await.is_err() {
        return Response::NotLeader { leader: None };
    }
    rx.await.unwrap_or(Response::NotLeader { leader: None })
}

fn unavailable(detail: &str) -> Response {
    Response::Error {
        code: ErrorCode::Unavailable,
        detail: detail.into(),
    }
}

/// One replica's task: opens it (rebuilding it if its storage failed) and runs it.
struct ReplicaTask {
    cfg: KvConfig,
    shard: u32,
    transport: Transport,
    store_slot: StoreSlot,
}

impl ReplicaTask {
    async fn run(self, mut inbox: mpsc::Receiver<Input>) {
        let mut bootstrap = self.cfg.bootstrap;
        let mut failures = 0u32;
        loop {
            // redb may panic on a file corrupted outside it (its docs say so): that is corrupt
            // storage too, and the replica is rebuilt, not the node brought down.
            let opened = std::panic::catch_unwind(AssertUnwindSafe(|| self.open(bootstrap)))
                .unwrap_or_else(|p| Err(panicked(p)));
            let err = match opened {
                Ok(replica) => {
                    self.cfg.health.opened(self.shard);
                    AssertUnwindSafe(self.serve(replica, &mut inbox))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(panicked)
                }
                Err(e) => e,
            };
            // After the first start, a replica never bootstraps again: an empty replica joins.
            bootstrap = false;
            failures += 1;
            tracing::error!(shard = self.shard, error = %err, "replica failed");
            if self.cfg.health.failed(self.shard, &err) {
                // `run` returns the error; this task ends (the process is exiting).
                return;
            }
            *self.store_slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
            match err {
                StoreError::Corrupt(_) => {
                    // Corrupt data is never served: drop it and rebuild from the peers.
                    self.cfg.storage.remove(self.shard);
                    self.cfg.metrics.kv_replica_rebuilds.inc();
                }
                StoreError::Io(_) => {}
            }
            // Callers waiting meanwhile are turned away; a repeating failure backs off.
            let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
            let until = tokio::time::Instant::now() + pause;
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(left, inbox.recv()).await {
                    Ok(Some(input)) => turn_away(input),
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
        }
    }

    fn open(&self, bootstrap: bool) -> Result<Replica, StoreError> {
        let db = self.cfg.storage.open(self.shard)?;
        let store = Arc::new(Store::open(db)?);
        *self.store_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(store.clone());
        let seed = self.cfg.seed ^ u64::from(self.shard).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Replica::open(
            self.shard,
            self.cfg.slot,
            store,
            self.cfg.placement,
            self.cfg.canaries.clone(),
            bootstrap,
            // A fresh incarnation for a replica that starts empty: unique per node and time.
            || (seed ^ crate::clock::unix_ms().wrapping_mul(0xff51_afd7_ed55_8ccd)) & 0xffff_ffff,
        )
    }

    /// Runs the replica until its storage fails.
    async fn serve(&self, mut r: Replica, inbox: &mut mpsc::Receiver<Input>) -> StoreError {
        match self.serve_inner(&mut r, inbox).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn serve_inner(
        &self,
        r: &mut Replica,
        inbox: &mut mpsc::Receiver<Input>,
    ) -> Result<std::convert::Infallible, StoreError> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let canary_sync = self.cfg.canaries.is_on(Canary::KvAckBeforeSync);
        let mut last_canary_sync = tokio::time::Instant::now();
        // The Ready whose sync is in flight, when it started, and the sync. The replica
        // steps messages and ticks meanwhile (a slow disk must not silence its heartbeats
        // or its answers to them); the next Ready waits for this one.
        let mut waiting: Option<(Persisted, tokio::time::Instant)> = None;
        let mut sync: Option<futures::future::BoxFuture<'static, Result<(), StoreError>>> = None;
        loop {
            tokio::select! {
                biased;
                done = async { sync.as_mut().expect("guarded").await }, if sync.is_some() => {
                    sync = None;
                    done?;
                    self.cfg.metrics.kv_fsyncs.inc();
                    let (p, started) = waiting.take().expect("a sync has its Ready");
                    let msgs = r.finish(p)?;
                    self.transport.send(self.shard, msgs);
                    r.note_sync_time(started.elapsed());
                }
                input = inbox.recv() => {
                    let Some(input) = input else {
                        return Err(StoreError::Io("the node is shutting down".into()));
                    };
                    let mut batch = Vec::new();
                    self.on_input(r, input, &mut batch)?;
                    while batch.len() < GROUP_COMMIT_MAX {
                        let Ok(more) = inbox.try_recv() else { break };
                        self.on_input(r, more, &mut batch)?;
                    }
                    if !batch.is_empty() {
                        self.cfg.metrics.kv_batch_requests.observe(batch.len() as f64);
                        r.submit(batch)?;
                    }
                }
                _ = ticker.tick() => {
                    let chores = r.tick(sync.is_some())?;
                    if chores.join {
                        self.ask_to_join(r);
                    }
                    if r.tick_count().is_multiple_of(5) {
                        self.export(r);
                    }
                    if canary_sync && sync.is_none() && last_canary_sync.elapsed() >= CANARY_SYNC_EVERY {
                        last_canary_sync = tokio::time::Instant::now();
                        r.sync()?;
                        self.cfg.storage.settle().await;
                    }
                }
            }
            if sync.is_none() {
                if let Some((mut p, started)) = self.run_ready(r)? {
                    sync = Some(self.start_sync(r.store(), p.take_txn()));
                    waiting = Some((p, started));
                }
            }
        }
    }

    /// Runs the replica's Readies until one must wait for the disk (returned, with when it
    /// started) or none is left: their early messages go out at once.
    fn run_ready(
        &self,
        r: &mut Replica,
    ) -> Result<Option<(Persisted, tokio::time::Instant)>, StoreError> {
        let was_leader = r.is_leader();
        let mut out = None;
        while let Some((early, persisted)) = r.persist()? {
            self.transport.send(self.shard, early);
            if persisted.needs_sync() {
                out = Some((persisted, tokio::time::Instant::now()));
                break;
            }
            let msgs = r.finish(persisted)?;
            self.transport.send(self.shard, msgs);
        }
        if r.is_leader() && !was_leader {
            self.cfg.metrics.kv_leader_elected.inc();
            self.export(r);
        }
        Ok(out)
    }

    /// The disk sync of a Ready: the durable commit of its batch (redb's fsync) on a blocking
    /// thread, then (simulation) the simulated disk's time for it.
    fn start_sync(
        &self,
        store: Arc<Store>,
        txn: Option<redb::WriteTransaction>,
    ) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        let storage = self.cfg.storage.clone();
        // The simulated disk's commit is memory work (its time is `settle`'s): done here, in
        // the replica's task, as madsim has no blocking threads.
        #[cfg(madsim)]
        let committed = store.commit_durably(txn).map_err(StoreError::from);
        async move {
            #[cfg(not(madsim))]
            tokio::task::spawn_blocking(move || store.commit_durably(txn))
                .await
                .map_err(|e| StoreError::Io(format!("the sync task failed: {e}")))??;
            #[cfg(madsim)]
            {
                let _ = &store;
                committed?;
            }
            storage.settle().await;
            Ok(())
        }
        .boxed()
    }

    fn on_input(
        &self,
        r: &mut Replica,
        input: Input,
        batch: &mut Vec<(Request, Reply)>,
    ) -> Result<(), StoreError> {
        match input {
            Input::Client(req, reply) => batch.push((req, reply)),
            Input::Raft(msgs) => r.step(msgs),
            Input::Join(id, reply) => {
                let _ = reply.send(r.join(id));
            }
            Input::Status(reply) => {
                let _ = reply.send(r.status());
            }
            Input::SnapshotSent { to, ok } => r.report_snapshot(to, ok),
            Input::Unreachable(to) => r.report_unreachable(to),
            Input::ForceRecover(reply) => {
                r.force_recover()?;
                let _ = reply.send(Response::Ok);
                // Reopened, the replica starts from its new membership.
                return Err(StoreError::Io("reopening after a forced recovery".into()));
            }
        }
        Ok(())
    }

    /// An empty replica asks the shard's other replicas to add it; the leader does.
    fn ask_to_join(&self, r: &Replica) {
        let id = r.id();
        let shard = self.shard;
        let mut targets: Vec<u32> = r.leader_slot().into_iter().collect();
        targets.extend(
            self.cfg
                .placement
                .replicas_of(shard)
                .into_iter()
                .filter(|s| *s != self.cfg.slot && Some(*s) != r.leader_slot()),
        );
        let clients: Vec<RpcClient> = targets
            .into_iter()
            .map(|s| self.transport.client(s))
            .collect();
        tokio::spawn(async move {
            for c in clients {
                match c
                    .call_timeout(Request::KvJoin { shard, id }, PEER_CALL_TIMEOUT)
                    .await
                {
                    Ok(Response::Ok) => {
                        tracing::info!(shard, id, leader = %c.addr(), "asked to join");
                        return;
                    }
                    other => tracing::debug!(shard, id, ?other, "join not taken here"),
                }
            }
        });
    }

    /// The replica's state in the node's metrics.
    fn export(&self, r: &Replica) {
        let s = r.status();
        let m = &self.cfg.metrics;
        let label = ShardLabel {
            shard: s.shard.to_string(),
        };
        m.kv_shard_leader
            .get_or_create(&label)
            .set(i64::from(s.role == "leader"));
        m.kv_shard_term.get_or_create(&label).set(s.term as i64);
        m.kv_shard_applied
            .get_or_create(&label)
            .set(s.applied as i64);
        for (peer, lag) in &s.lag {
            m.kv_shard_lag
                .get_or_create(&ShardPeerLabel {
                    shard: s.shard.to_string(),
                    peer: slot_of(*peer).to_string(),
                })
                .set(*lag as i64);
        }
    }
}

/// A panic under a replica, as the storage failure it stands for.
fn panicked(p: Box<dyn std::any::Any + Send>) -> StoreError {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    StoreError::Corrupt(format!("the replica panicked: {what}"))
}

/// Answers a request that arrived while the replica was down.
fn turn_away(input: Input) {
    match input {
        Input::Client(_, reply) => {
            let _ = reply.send(Response::NotLeader { leader: None });
        }
        Input::Join(_, reply) | Input::ForceRecover(reply) => {
            let _ = reply.send(unavailable("the replica is being rebuilt"));
        }
        Input::Status(_) | Input::Raft(_) | Input::SnapshotSent { .. } | Input::Unreachable(_) => {}
    }
}

/// Raft messages to peer nodes: one queue and one sender task per peer.
/// A peer node: its client, and the queue of (shard, message) for it.
type Peer = (RpcClient, mpsc::Sender<(u32, Message)>);

#[derive(Clone)]
struct Transport {
    peers: Arc<Vec<Peer>>,
    /// Replica inboxes on this node, by shard, for snapshot reports. A std mutex: filled at
    /// start, read without awaiting.
    local: Arc<std::sync::Mutex<BTreeMap<u32, mpsc::Sender<Input>>>>,
}

impl Transport {
    fn start(cfg: &KvConfig) -> Self {
        let local = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let peers = cfg
            .nodes
            .iter()
            .enumerate()
            .map(|(slot, addr)| {
                // Must prove it is that slot's node: the address can move (`coord::members`).
                let who = crate::tls::Principal::Node(crate::cluster::Role::Kv, slot as u32);
                let client = RpcClient::to_node(*addr, cfg.tls.clone(), who);
                let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
                tokio::spawn(send_to_peer(client.clone(), rx, local.clone()));
                (client, tx)
            })
            .collect();
        Self {
            peers: Arc::new(peers),
            local,
        }
    }

    /// A transport that sends nothing (for opening replicas outside a running node).
    fn detached() -> Self {
        Self {
            peers: Arc::new(Vec::new()),
            local: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
        }
    }

    fn register(&self, shard: u32, inbox: mpsc::Sender<Input>) {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard, inbox);
    }

    /// The peer nodes' clients, by slot (clones: moving one moves the transport's).
    #[cfg(feature = "etcd")]
    fn clients(&self) -> Vec<RpcClient> {
        self.peers.iter().map(|(c, _)| c.clone()).collect()
    }

    fn client(&self, slot: u32) -> RpcClient {
        self.peers[slot as usize].0.clone()
    }

    fn send(&self, shard: u32, msgs: Vec<Message>) {
        for m in msgs {
            let slot = slot_of(m.to) as usize;
            let Some((_, queue)) = self.peers.get(slot) else {
                continue;
            };
            let (to, snapshot) = (m.to, m.get_msg_type() == MessageType::MsgSnapshot);
            if queue.try_send((shard, m)).is_err() && snapshot {
                report(&self.local, shard, Input::SnapshotSent { to, ok: false });
            }
        }
    }
}

fn report(local: &std::sync::Mutex<BTreeMap<u32, mpsc::Sender<Input>>>, shard: u32, i: Input) {
    let inbox = local
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&shard)
        .cloned();
    if let Some(inbox) = inbox {
        let _ = inbox.try_send(i);
    }
}

/// Most messages in one `RaftMessages` call.
const MESSAGES_PER_CALL_MAX: usize = 256;

async fn send_to_peer(
    client: RpcClient,
    mut rx: mpsc::Receiver<(u32, Message)>,
    local: Arc<std::sync::Mutex<BTreeMap<u32, mpsc::Sender<Input>>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut by_shard: BTreeMap<u32, Vec<Message>> = BTreeMap::new();
        by_shard.entry(first.0).or_default().push(first.1);
        let mut n = 1;
        while n < MESSAGES_PER_CALL_MAX {
            let Ok((shard, m)) = rx.try_recv() else { break };
            by_shard.entry(shard).or_default().push(m);
            n += 1;
        }
        for (shard, msgs) in by_shard {
            let snapshots: Vec<u64> = msgs
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .map(|m| m.to)
                .collect();
            let to: Vec<u64> = msgs.iter().map(|m| m.to).collect();
            let req = Request::RaftMessages {
                shard,
                msgs: msgs
                    .iter()
                    .map(|m| B64(m.write_to_bytes().expect("raft messages encode")))
                    .collect(),
            };
            let ok = matches!(
                client.call_timeout(req, PEER_CALL_TIMEOUT).await,
                Ok(Response::Ok)
            );
            for s in snapshots {
                report(&local, shard, Input::SnapshotSent { to: s, ok });
            }
            if !ok {
                let mut to = to;
                to.sort_unstable();
                to.dedup();
                for t in to {
                    report(&local, shard, Input::Unreachable(t));
                }
            }
        }
    }
}
