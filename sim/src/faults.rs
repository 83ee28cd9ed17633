//! Applies a fault schedule to the running simulation, and records every fault and heal in
//! the history.
//!
//! madsim's clogs, pauses and network settings are plain on/off switches, while schedules
//! overlap (two partitions may cut the same link; a tunnel may start inside a partition). The
//! injector therefore counts, per link, per node and per setting, how many active faults want
//! it, and flips madsim's switch only on the first and the last.
//!
//! What each fault does in madsim:
//!
//! | fault | madsim | what the nodes see |
//! |---|---|---|
//! | partition | `clog_link` a->b (and b->a) | writes buffer, reads stall, no error; new connects refused |
//! | disconnect | the device app drops its connection | both ends see it close at once |
//! | tunnel | `clog_node` of the device | as a partition from everyone |
//! | crash | `kill`, then `restart` | peers see EOF; kv loses unsynced writes |
//! | clock_step | `SkewedClock::step` on the idgen machine's clock | idgen's clock jumps |
//! | pause | `pause`, then `resume` | nothing runs on the node; its peers' calls time out |
//! | latency / loss | `NetSim::update_config` | slower links; loss delays bytes and fails connects |
//! | disk_loss | `kill`, `SimDisk::wipe`, then `restart` | the kv node returns empty; its replicas rejoin and catch up |
//! | leader_partition | `clog_link` between the shard leader's node and the shard's other replicas (both ways) | the leader can reach no quorum: it must acknowledge nothing; the others elect a new one |
//! | torn_write | `kill` with `SimDisk::crash_torn`, then `restart` | a seeded subset of unsynced sectors survives |
//! | corruption | `SimDisk::corrupt` | flipped bits fail their sector checksum when read; the replica rebuilds from peers |
//! | slow_disk | `SimDisk::set_fsync_delay` | every fsync of the node takes seconds |
//! | force_recover | `KvForceRecover` RPC to the node's replicas of shards that lost their quorum | the operator's last resort |
//!
//! The injector also notes what the run must report in words: a shard whose quorum of
//! disks was lost (data loss by definition), and forced recoveries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use madsim::task::NodeId;
use nodes::kv::placement::Placement;
use nodes::proto::internal::{Request, Response};
use rand::rngs::StdRng;
use rand::SeedableRng;
use scenarios::{Fault, Role, Schedule, Target};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::history::Event;
use crate::recorder::Recorder;

/// The default link latency (madsim's own default) that latency faults return to.
const DEFAULT_LATENCY: std::ops::Range<Duration> =
    Duration::from_millis(1)..Duration::from_millis(10);

/// How long a `torn_write` waits for an fsync in flight on its node before killing it anyway.
const TORN_WAIT_MAX: Duration = Duration::from_secs(5);

/// Reference counts of what the active faults switched on.
#[derive(Default)]
struct Active {
    links: BTreeMap<(NodeId, NodeId), u32>,
    clogged_nodes: BTreeMap<NodeId, u32>,
    paused: BTreeMap<NodeId, u32>,
    crashed: BTreeMap<(Role, u32), u32>,
    /// Fault index -> (min, max) latency in ms.
    latency: BTreeMap<usize, (u64, u64)>,
    /// Fault index -> loss per mille.
    loss: BTreeMap<usize, u32>,
}

/// Adds one to a count; true when it went from 0 to 1.
fn up<K: Ord>(m: &mut BTreeMap<K, u32>, k: K) -> bool {
    let n = m.entry(k).or_insert(0);
    *n += 1;
    *n == 1
}

/// Takes one from a count; true when it reached 0.
fn down<K: Ord>(m: &mut BTreeMap<K, u32>, k: K) -> bool {
    match m.get_mut(&k) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            m.remove(&k);
            true
        }
        None => false,
    }
}

/// What the injector holds of a device: its node, and the counter whose bump drops its
/// connection.
pub struct DeviceHandle {
    pub node: NodeId,
    pub kick: tokio::sync::watch::Sender<u64>,
}

pub struct Injector<'c> {
    cluster: &'c Cluster,
    /// Each device, by workload index.
    devices: Vec<DeviceHandle>,
    recorder: Recorder,
    active: Active,
    /// A node of the simulation (not a server) the injector makes RPCs from: to find a
    /// shard's leader, to force a recovery.
    control: NodeHandle,
    placement: Placement,
    /// Draws torn sectors and flipped bits.
    rng: StdRng,
    /// kv nodes whose disks are lost now (a `disk_loss` active).
    lost_disks: BTreeSet<u32>,
    /// kv nodes whose data is gone (a disk lost or corrupted) until every replica on them
    /// is seen a voter again.
    rejoining: BTreeSet<u32>,
    /// Hold back disk faults that would leave a shard without a majority of data holders
    /// (`Schedule::keep_quorums`).
    keep_quorums: bool,
    /// Faults held back (by index): their heals are skipped too.
    held_back: BTreeSet<usize>,
    /// Shards that lost a quorum of their disks and were not forcibly recovered yet.
    quorum_lost: BTreeSet<u32>,
    /// Leader partitions in force, by fault index: the links cut.
    cuts: BTreeMap<usize, Vec<(NodeId, NodeId)>>,
    /// Targets and detail known only when a fault started (a shard's leader, corrupt
    /// sectors), by fault index: its heal names the same.
    healed_names: BTreeMap<usize, (Vec<String>, String)>,
    /// Nodes that come back on a machine at a new address when they restart.
    to_move: BTreeSet<(Role, u32)>,
    /// Writes kv disks lost to crashes.
    pub lost_writes: u64,
    /// What the run must say in words (quorum losses, forced recoveries).
    pub notes: Vec<String>,
}

impl<'c> Injector<'c> {
    pub fn new(
        cluster: &'c Cluster,
        devices: Vec<DeviceHandle>,
        recorder: Recorder,
        control: NodeHandle,
        seed: u64,
    ) -> Self {
        Self {
            placement: cluster
                .map
                .placement()
                .expect("the options were checked before the run"),
            cluster,
            devices,
            recorder,
            active: Active::default(),
            control,
            rng: StdRng::seed_from_u64(seed ^ 0x6469_736b_6661_756c),
            lost_disks: BTreeSet::new(),
            rejoining: BTreeSet::new(),
            keep_quorums: true,
            held_back: BTreeSet::new(),
            quorum_lost: BTreeSet::new(),
            cuts: BTreeMap::new(),
            healed_names: BTreeMap::new(),
            to_move: BTreeSet::new(),
            lost_writes: 0,
            notes: Vec::new(),
        }
    }

    fn node(&self, t: Target) -> NodeId {
        match t {
            Target::Node(role, i) => self.cluster.node_id(role, i),
            Target::Device(i) => self.devices[i as usize].node,
        }
    }

    /// Runs the schedule to its end: each fault starts at `start + at_ms` and heals
    /// `duration_ms` later. At one instant, heals of earlier faults go first, then new faults,
    /// then the heals of instant faults.
    pub async fn run(&mut self, schedule: &Schedule, start: Instant) {
        self.keep_quorums = schedule.keep_quorums;
        let schedule = &schedule.faults;
        // (at_ms, order, fault index, is_start)
        let mut timeline: Vec<(u64, u8, usize, bool)> = Vec::new();
        for (i, f) in schedule.iter().enumerate() {
            timeline.push((f.at_ms, 1, i, true));
            let order = if f.duration_ms == 0 { 2 } else { 0 };
            timeline.push((f.at_ms + f.duration_ms, order, i, false));
        }
        timeline.sort();
        for (at_ms, _, i, is_start) in timeline {
            tokio::time::sleep_until(start + Duration::from_millis(at_ms)).await;
            let f = &schedule[i].fault;
            if is_start && self.keep_quorums && self.would_lose_a_quorum(f).await {
                self.held_back.insert(i);
            }
            if self.held_back.contains(&i) {
                continue;
            }
            let mut targets: Vec<String> = f.targets().iter().map(Target::to_string).collect();
            let mut detail = f.detail();
            let said = if is_start {
                self.apply(i, f).await
            } else {
                self.heal(i, f);
                self.healed_names.remove(&i)
            };
            if let Some((t, d)) = said {
                targets = t;
                detail = Some(d);
                if is_start {
                    self.healed_names
                        .insert(i, (targets.clone(), detail.clone().unwrap_or_default()));
                }
            }
            let kind = f.kind().to_string();
            self.recorder.record(if is_start {
                Event::Fault {
                    kind,
                    targets,
                    detail,
                }
            } else {
                Event::Heal {
                    kind,
                    targets,
                    detail,
                }
            });
        }
    }

    fn links(&self, a: &[Target], b: &[Target], two_way: bool) -> Vec<(NodeId, NodeId)> {
        let mut out = Vec::new();
        for x in a {
            for y in b {
                let (nx, ny) = (self.node(*x), self.node(*y));
                if nx == ny {
                    continue;
                }
                out.push((nx, ny));
                if two_way {
                    out.push((ny, nx));
                }
            }
        }
        out
    }

    /// Applies a fault. Answers the targets and detail the history should name when they
    /// are known only now.
    async fn apply(&mut self, i: usize, f: &Fault) -> Option<(Vec<String>, String)> {
        let net = NetSim::current();
        let handle = Handle::current();
        match f {
            Fault::Partition { a, b, two_way } => {
                for link in self.links(a, b, *two_way) {
                    if up(&mut self.active.links, link) {
                        net.clog_link(link.0, link.1);
                    }
                }
            }
            // The device drops the connection it holds now (once it is back in its loop); a
            // connection opened after the bump is not affected.
            Fault::Disconnect { device } => {
                self.devices[*device as usize].kick.send_modify(|n| *n += 1)
            }
            Fault::Tunnel { device } => {
                let n = self.node(Target::Device(*device));
                if up(&mut self.active.clogged_nodes, n) {
                    net.clog_node(n);
                }
            }
            Fault::Crash { target, moved } => {
                if let Target::Node(role, index) = *target {
                    if *moved {
                        self.to_move.insert((role, index));
                    }
                    if up(&mut self.active.crashed, (role, index)) {
                        self.lost_writes += self.cluster.kill(role, index);
                    }
                }
            }
            Fault::DiskLoss { kv, moved } => {
                if up(&mut self.active.crashed, (Role::Kv, *kv)) {
                    self.lost_writes += self.cluster.kill(Role::Kv, *kv);
                }
                if *moved {
                    self.to_move.insert((Role::Kv, *kv));
                }
                self.cluster.disks[kv].wipe();
                self.lost_disks.insert(*kv);
                self.rejoining.insert(*kv);
                self.note_quorum_losses();
            }
            Fault::TornWrite { kv } => {
                if up(&mut self.active.crashed, (Role::Kv, *kv)) {
                    // The power goes in the middle of an fsync (they are frequent; a busy
                    // node has one in flight within milliseconds).
                    let disk = &self.cluster.disks[kv];
                    let give_up = Instant::now() + TORN_WAIT_MAX;
                    while !disk.sync_in_flight() && Instant::now() < give_up {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    self.lost_writes += self.cluster.kill_torn(*kv, &mut self.rng);
                }
            }
            Fault::Corruption { kv, sectors } => {
                // A replica whose storage fails a check is rebuilt from its peers.
                self.rejoining.insert(*kv);
                let hit = self.cluster.disks[kv].corrupt(&mut self.rng, *sectors as usize);
                let detail = if hit.is_empty() {
                    "nothing stored yet".into()
                } else {
                    let files: Vec<String> = hit
                        .iter()
                        .map(|(file, s)| format!("{} sectors of {file}", s.len()))
                        .collect();
                    files.join(", ")
                };
                return Some((vec![format!("kv-{kv}")], detail));
            }
            Fault::SlowDisk { kv, delay_ms } => {
                self.cluster.disks[kv].set_fsync_delay(Duration::from_millis(*delay_ms))
            }
            Fault::LeaderPartition { shard } => return Some(self.cut_leader(i, *shard).await),
            Fault::ForceRecover { kv } => return Some(self.force_recover(*kv).await),
            Fault::ClockStep { idgen, delta_ms } => self.cluster.clocks[idgen].step(*delta_ms),
            Fault::Pause { target } => {
                let n = self.node(*target);
                if up(&mut self.active.paused, n) {
                    handle.pause(n);
                }
            }
            Fault::Latency { min_ms, max_ms } => {
                self.active.latency.insert(i, (*min_ms, *max_ms));
                self.update_network();
            }
            Fault::Loss { per_mille } => {
                self.active.loss.insert(i, *per_mille);
                self.update_network();
            }
        }
        None
    }

    fn heal(&mut self, i: usize, f: &Fault) {
        let net = NetSim::current();
        let handle = Handle::current();
        match f {
            Fault::Partition { a, b, two_way } => {
                for link in self.links(a, b, *two_way) {
                    if down(&mut self.active.links, link) {
                        net.unclog_link(link.0, link.1);
                    }
                }
            }
            Fault::Disconnect { .. } => {}
            Fault::Tunnel { device } => {
                let n = self.node(Target::Device(*device));
                if down(&mut self.active.clogged_nodes, n) {
                    net.unclog_node(n);
                }
            }
            Fault::Crash { target, .. } => {
                if let Target::Node(role, index) = *target {
                    self.restart(role, index);
                }
            }
            Fault::DiskLoss { kv, .. } => {
                // Back on an empty (or new) disk, at a new address if it `moved`.
                self.lost_disks.remove(kv);
                self.restart(Role::Kv, *kv);
            }
            Fault::TornWrite { kv } => self.restart(Role::Kv, *kv),
            Fault::Corruption { .. } | Fault::ForceRecover { .. } => {}
            Fault::SlowDisk { kv, .. } => self.cluster.disks[kv].set_fsync_delay(Duration::ZERO),
            Fault::LeaderPartition { .. } => {
                for link in self.cuts.remove(&i).unwrap_or_default() {
                    if down(&mut self.active.links, link) {
                        net.unclog_link(link.0, link.1);
                    }
                }
            }
            Fault::ClockStep { idgen, delta_ms } => self.cluster.clocks[idgen].step(-delta_ms),
            Fault::Pause { target } => {
                let n = self.node(*target);
                if down(&mut self.active.paused, n) {
                    handle.resume(n);
                }
            }
            Fault::Latency { .. } => {
                self.active.latency.remove(&i);
                self.update_network();
            }
            Fault::Loss { .. } => {
                self.active.loss.remove(&i);
                self.update_network();
            }
        }
    }

    /// Restarts a crashed node once no fault keeps it down.
    fn restart(&mut self, role: Role, index: u32) {
        if down(&mut self.active.crashed, (role, index)) {
            if self.to_move.remove(&(role, index)) {
                let at = self.cluster.move_node(role, index);
                self.notes.push(format!(
                    "{}-{index} came back on a new machine at {at} at {:.1} s (found through etcd)",
                    role.name(),
                    self.recorder.now_s()
                ));
            } else {
                self.cluster.restart(role, index);
            }
            // A restarted process is still stalled if a pause is active on it.
            let n = self.node(Target::Node(role, index));
            if self.active.paused.contains_key(&n) {
                Handle::current().pause(n);
            }
        }
    }

    /// Whether `f` would destroy the data of a kv node while too few other replicas of one
    /// of its shards hold theirs (a node is counted back once every replica on it answers
    /// as a voter). A node whose disk holds corrupt sectors no read has caught yet does not
    /// count either: once a replica reads one, it is rebuilt, so its data is as good as lost.
    /// Notes the fault as held back when so.
    async fn would_lose_a_quorum(&mut self, f: &Fault) -> bool {
        let Some(kv) = f.loses_disk() else {
            return false;
        };
        for node in self.rejoining.clone() {
            if let Some(Response::KvStatus(list)) = self.call_kv(node, Request::KvStatus).await {
                let voter = |s: &nodes::proto::internal::ShardStatus| {
                    matches!(s.role.as_str(), "leader" | "follower")
                };
                if !list.is_empty() && list.iter().all(voter) {
                    self.rejoining.remove(&node);
                }
            }
        }
        // What each other node says of its replicas now: one rebuilding (joining, or a
        // learner catching up) for a cause this injector did not pick holds no data either.
        // A candidate holds its data: an election is not a rebuild.
        let mut not_voters: BTreeSet<(u32, u32)> = BTreeSet::new();
        for node in 0..self.placement.nodes {
            if node == kv {
                continue;
            }
            if let Some(Response::KvStatus(list)) = self.call_kv(node, Request::KvStatus).await {
                for s in list
                    .iter()
                    .filter(|s| matches!(s.role.as_str(), "joining" | "learner"))
                {
                    not_voters.insert((node, s.shard));
                }
            }
        }
        let majority = self.placement.replicas as usize / 2 + 1;
        let damaged: BTreeSet<u32> = self
            .cluster
            .disks
            .iter()
            .filter(|(_, d)| d.damaged_sectors() > 0)
            .map(|(n, _)| *n)
            .collect();
        for shard in self.placement.shards_on(kv) {
            let holders: Vec<u32> = self
                .placement
                .replicas_of(shard)
                .into_iter()
                .filter(|n| {
                    *n != kv
                        && !self.rejoining.contains(n)
                        && !damaged.contains(n)
                        && !not_voters.contains(&(*n, shard))
                })
                .collect();
            if holders.len() < majority {
                let rebuilding = not_voters
                    .iter()
                    .filter(|(_, s)| *s == shard)
                    .map(|(n, _)| *n);
                let back: Vec<String> = self
                    .rejoining
                    .union(&damaged)
                    .copied()
                    .chain(rebuilding)
                    .collect::<BTreeSet<u32>>()
                    .iter()
                    .map(|n| format!("kv-{n}"))
                    .collect();
                self.notes.push(format!(
                    "held back: {} {} at {:.1} s: shard {shard} would keep {} of {} replicas \
                     holding its data ({} not rejoined yet, or holding corrupt sectors)",
                    f.kind(),
                    Target::Node(Role::Kv, kv),
                    self.recorder.now_s(),
                    holders.len(),
                    self.placement.replicas,
                    back.join(", ")
                ));
                return true;
            }
        }
        false
    }

    /// Shards whose quorum of disks is lost and not force-recovered.
    pub fn quorum_lost(&self) -> Vec<u32> {
        self.quorum_lost.iter().copied().collect()
    }

    /// Notes every shard whose lost disks now hold a majority of its replicas.
    fn note_quorum_losses(&mut self) {
        for shard in 0..self.placement.shards {
            let replicas = self.placement.replicas_of(shard);
            let lost: Vec<u32> = replicas
                .iter()
                .copied()
                .filter(|s| self.lost_disks.contains(s))
                .collect();
            if lost.len() * 2 > replicas.len() && self.quorum_lost.insert(shard) {
                let names: Vec<String> = lost.iter().map(|s| format!("kv-{s}")).collect();
                self.notes.push(format!(
                    "quorum lost: shard {shard} lost the disks of {} of its {} replicas at {:.1} s ({}): \
                     writes only they held are gone (data loss by definition)",
                    lost.len(),
                    replicas.len(),
                    self.recorder.now_s(),
                    names.join(", ")
                ));
            }
        }
    }

    /// Calls a kv node from the control node.
    async fn call_kv(&self, slot: u32, req: Request) -> Option<Response> {
        let addr = self.cluster.kv_addr(slot);
        let operator = self.cluster.operator.clone();
        self.control
            .spawn(async move {
                nodes::rpc::RpcClient::new(addr, operator)
                    .call_timeout(req, Duration::from_secs(1))
                    .await
                    .ok()
            })
            .await
            .ok()
            .flatten()
    }

    /// Cuts the current leader of `shard` off from the shard's other replicas, both ways.
    async fn cut_leader(&mut self, i: usize, shard: u32) -> (Vec<String>, String) {
        let replicas = self.placement.replicas_of(shard);
        let mut leader: Option<(u64, u32)> = None;
        for &slot in &replicas {
            if let Some(Response::KvStatus(list)) = self.call_kv(slot, Request::KvStatus).await {
                for st in list
                    .iter()
                    .filter(|s| s.shard == shard && s.role == "leader")
                {
                    if leader.is_none_or(|(term, _)| st.term > term) {
                        leader = Some((st.term, slot));
                    }
                }
            }
        }
        let Some((term, l)) = leader else {
            let all = replicas.iter().map(|s| format!("kv-{s}")).collect();
            return (all, format!("shard {shard}: no leader to cut off"));
        };
        let others: Vec<u32> = replicas.iter().copied().filter(|s| *s != l).collect();
        let a = [Target::Node(Role::Kv, l)];
        let b: Vec<Target> = others.iter().map(|s| Target::Node(Role::Kv, *s)).collect();
        let links = self.links(&a, &b, true);
        let net = NetSim::current();
        for link in &links {
            if up(&mut self.active.links, *link) {
                net.clog_link(link.0, link.1);
            }
        }
        self.cuts.insert(i, links);
        let names = std::iter::once(l)
            .chain(others)
            .map(|s| format!("kv-{s}"))
            .collect();
        (
            names,
            format!("shard {shard}: leader kv-{l} (term {term}) cut off from its followers"),
        )
    }

    /// The operator's forced recovery from `kv`, for each shard of it that lost its quorum.
    async fn force_recover(&mut self, kv: u32) -> (Vec<String>, String) {
        let shards: Vec<u32> = self
            .quorum_lost
            .iter()
            .copied()
            .filter(|s| self.placement.replicas_of(*s).contains(&kv))
            .collect();
        let mut done = Vec::new();
        for shard in shards {
            let ok = matches!(
                self.call_kv(kv, Request::KvForceRecover { shard }).await,
                Some(Response::Ok)
            );
            if ok {
                self.quorum_lost.remove(&shard);
                done.push(shard);
            }
            self.notes.push(format!(
                "forced recovery: shard {shard} from kv-{kv} at {:.1} s {}",
                self.recorder.now_s(),
                if ok {
                    "(its only voter now; the others rejoin from it)"
                } else {
                    "FAILED"
                }
            ));
        }
        (
            vec![format!("kv-{kv}")],
            format!("shards recovered: {done:?}"),
        )
    }

    /// The network settings of the worst active latency and loss faults (defaults when none).
    fn update_network(&self) {
        let latency = self
            .active
            .latency
            .values()
            .max_by_key(|(_, max)| *max)
            .map(|&(lo, hi)| Duration::from_millis(lo)..Duration::from_millis(hi.max(lo + 1)))
            .unwrap_or(DEFAULT_LATENCY);
        let loss = self.active.loss.values().max().copied().unwrap_or(0);
        NetSim::current().update_config(|c| {
            c.send_latency = latency;
            c.packet_loss_rate = loss as f64 / 1000.0;
        });
    }
}
