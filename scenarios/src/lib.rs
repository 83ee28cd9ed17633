//! Fault schedules: what goes wrong, when, to whom.
//!
//! A schedule is a list of [`ScheduledFault`]s: a [`Fault`] that starts at `at_ms` (simulated
//! milliseconds after traffic starts) and heals `duration_ms` later. Schedules come from a
//! named scenario ([`SCENARIOS`]), from a seeded swarm plan ([`swarm`]), or from a JSON file
//! (`--schedule FILE`, written by `--shrink`). Everything here is pure: the simulator applies
//! the schedule; this crate only decides it, from the seed.
//!
//! Every fault heals before the safety phase ends (`at_ms + duration_ms <= duration_ms` of the
//! run), so the liveness phase starts from a healed system.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The roles a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Api,
    /// The simulated etcd (one in-memory server): partitioned and paused, never crashed (a
    /// restart would lose its whole state, which a real etcd cluster's quorum does not).
    Etcd,
    Chat,
    Idgen,
    Kv,
    Presence,
    Push,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Api,
        Role::Etcd,
        Role::Chat,
        Role::Idgen,
        Role::Kv,
        Role::Presence,
        Role::Push,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Etcd => "etcd",
            Role::Chat => "chat",
            Role::Idgen => "idgen",
            Role::Kv => "kv",
            Role::Presence => "presence",
            Role::Push => "push",
        }
    }
}

/// A node a fault can hit: a server node by role and index, or a client device by its index in
/// the workload. Written `chat-0`, `kv-2`, `device-17` in schedules and in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Node(Role, u32),
    Device(u32),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(r, i) => write!(f, "{}-{}", r.name(), i),
            Target::Device(i) => write!(f, "device-{i}"),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, index) = s
            .rsplit_once('-')
            .ok_or_else(|| format!("target `{s}`: expected ROLE-INDEX, e.g. chat-0 or device-3"))?;
        let index: u32 = index
            .parse()
            .map_err(|_| format!("target `{s}`: `{index}` is not an index"))?;
        if name == "device" {
            return Ok(Target::Device(index));
        }
        Role::ALL
            .iter()
            .find(|r| r.name() == name)
            .map(|r| Target::Node(*r, index))
            .ok_or_else(|| format!("target `{s}`: unknown role `{name}`"))
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What goes wrong. The history names each by [`Fault::kind`], exactly these names:
/// `partition`, `disconnect`, `tunnel`, `crash`, `clock_step`, `pause`, `latency`, `loss`,
/// and for kv storage and replication `disk_loss`, `leader_partition`, `torn_write`,
/// `corruption`, `slow_disk`, `force_recover`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Links from every node of `a` to every node of `b` carry nothing (and back, when
    /// `two_way`). Like a real partition, nothing errors: writes buffer, reads stall; new
    /// connections across it are refused.
    Partition {
        a: Vec<Target>,
        b: Vec<Target>,
        two_way: bool,
    },
    /// A device's connections are torn down (a NAT rebinding, a cell handover). Instant.
    Disconnect { device: u32 },
    /// A device loses all connectivity, then comes back. A short tunnel may leave its TCP
    /// connection alive; a long one lets both ends time it out.
    Tunnel { device: u32 },
    /// The node is killed (in-memory state lost; kv keeps what it synced and loses unsynced
    /// writes) and restarted when the fault heals. `moved` (presence, push and idgen nodes):
    /// it comes back on another machine, at the next free address of the IP plan's
    /// replacement range; nobody's config names it, and every node must find it through etcd
    /// (kv nodes move with `disk_loss`).
    Crash {
        target: Target,
        #[serde(default)]
        moved: bool,
    },
    /// An idgen node's wall clock steps by `delta_ms` (negative: backwards) and is corrected
    /// (stepped back) when the fault heals, as an NTP resync would.
    ClockStep { idgen: u32, delta_ms: i64 },
    /// The node's process stalls (a GC pause, a stopped VM): no task runs until it heals.
    Pause { target: Target },
    /// Every link's one-way latency becomes `min_ms..max_ms` until the fault heals.
    Latency { min_ms: u64, max_ms: u64 },
    /// Every link loses this share of packets (per mille) until the fault heals: established
    /// TCP streams slow down with retransmissions, new connections may fail.
    Loss { per_mille: u32 },
    /// A kv node's disk is lost: the node is killed and its disk wiped; at the heal it starts
    /// again on an empty disk (a replaced machine), and its replicas rejoin their shards and
    /// catch up from their peers. `moved`: the replacement machine has another address (the
    /// next free one of the IP plan's replacement range); nobody's config names it, and
    /// every node must find it through etcd.
    DiskLoss {
        kv: u32,
        #[serde(default)]
        moved: bool,
    },
    /// Whichever kv node leads `shard` when the fault starts is cut off from the shard's
    /// other replicas, both ways, until the heal; callers still reach it. It must acknowledge
    /// nothing while cut off.
    LeaderPartition { shard: u32 },
    /// A kv node dies in the middle of writing: each sector written since its last fsync
    /// survives or not (seeded), not just the synced prefix. It restarts at the heal.
    TornWrite { kv: u32 },
    /// Bit rot: `sectors` seeded sectors of each of a kv node's files (one per shard replica)
    /// flip a bit, without the disk noticing until they are read. Instant.
    Corruption { kv: u32, sectors: u32 },
    /// Every fsync of a kv node takes `delay_ms` until the heal.
    SlowDisk { kv: u32, delay_ms: u64 },
    /// The operator's last resort after a quorum of kv shards lost their disks: each shard's
    /// replica on `kv` becomes its only voter (what only the lost replicas held is gone).
    /// Instant.
    ForceRecover { kv: u32 },
}

impl Fault {
    /// The history's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition { .. } => "partition",
            Fault::Disconnect { .. } => "disconnect",
            Fault::Tunnel { .. } => "tunnel",
            Fault::Crash { .. } => "crash",
            Fault::ClockStep { .. } => "clock_step",
            Fault::Pause { .. } => "pause",
            Fault::Latency { .. } => "latency",
            Fault::Loss { .. } => "loss",
            Fault::DiskLoss { .. } => "disk_loss",
            Fault::LeaderPartition { .. } => "leader_partition",
            Fault::TornWrite { .. } => "torn_write",
            Fault::Corruption { .. } => "corruption",
            Fault::SlowDisk { .. } => "slow_disk",
            Fault::ForceRecover { .. } => "force_recover",
        }
    }

    /// Faults that destroy what a kv node's disk holds (its replicas must be rebuilt from
    /// their peers): a quorum of one shard's disks lost at once is data loss by definition.
    pub fn loses_disk(&self) -> Option<u32> {
        match self {
            Fault::DiskLoss { kv, .. } | Fault::Corruption { kv, .. } => Some(*kv),
            _ => None,
        }
    }

    /// The history's `targets`: the nodes the fault hits (for a partition, side `a` then side
    /// `b`; network-wide faults have none).
    pub fn targets(&self) -> Vec<Target> {
        match self {
            Fault::Partition { a, b, .. } => a.iter().chain(b).copied().collect(),
            Fault::Disconnect { device } | Fault::Tunnel { device } => {
                vec![Target::Device(*device)]
            }
            Fault::Crash { target, .. } | Fault::Pause { target } => vec![*target],
            Fault::ClockStep { idgen, .. } => vec![Target::Node(Role::Idgen, *idgen)],
            Fault::Latency { .. } | Fault::Loss { .. } => Vec::new(),
            Fault::DiskLoss { kv, .. }
            | Fault::TornWrite { kv }
            | Fault::Corruption { kv, .. }
            | Fault::SlowDisk { kv, .. }
            | Fault::ForceRecover { kv } => vec![Target::Node(Role::Kv, *kv)],
            // Which node leads is known only when the fault starts (the history names it);
            // here every kv node may be touched.
            Fault::LeaderPartition { .. } => Vec::new(),
        }
    }

    /// Parameters beyond kind and targets, for the history's `detail` and the printed plan.
    pub fn detail(&self) -> Option<String> {
        match self {
            Fault::Partition { a, b, two_way } => Some(format!(
                "{} | {} {}",
                summarize(a),
                summarize(b),
                if *two_way { "two-way" } else { "one-way" }
            )),
            Fault::ClockStep { delta_ms, .. } => Some(format!("delta_ms={delta_ms}")),
            Fault::Latency { min_ms, max_ms } => Some(format!("{min_ms}..{max_ms} ms")),
            Fault::Loss { per_mille } => Some(format!("{per_mille} per mille")),
            Fault::LeaderPartition { shard } => Some(format!("shard {shard}")),
            Fault::Corruption { sectors, .. } => Some(format!("{sectors} sectors")),
            Fault::SlowDisk { delay_ms, .. } => Some(format!("fsync {delay_ms} ms")),
            Fault::DiskLoss { moved: true, .. } | Fault::Crash { moved: true, .. } => {
                Some("back at a new address".into())
            }
            _ => None,
        }
    }
}

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledFault {
    /// Simulated milliseconds after traffic starts.
    pub at_ms: u64,
    /// How long until it heals (0 for an instant fault such as `disconnect`).
    pub duration_ms: u64,
    pub fault: Fault,
}

impl fmt::Display for ScheduledFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>8.1}s {:<10} {:>6.1}s  {}",
            self.at_ms as f64 / 1000.0,
            self.fault.kind(),
            self.duration_ms as f64 / 1000.0,
            summarize(&self.fault.targets()),
        )?;
        if let Some(d) = self.fault.detail() {
            write!(f, "  ({d})")?;
        }
        Ok(())
    }
}

/// A short description of many targets: servers by name, devices by count when there are
/// more than a few (`chat-0, kv-1 + 210 devices`).
pub fn summarize(targets: &[Target]) -> String {
    let devices = targets
        .iter()
        .filter(|t| matches!(t, Target::Device(_)))
        .count();
    if devices <= 4 {
        return describe(targets);
    }
    let servers: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|t| matches!(t, Target::Node(..)))
        .collect();
    if servers.is_empty() {
        format!("{devices} devices")
    } else {
        format!("{} + {devices} devices", describe(&servers))
    }
}

/// A compact list of targets: `chat-0, kv-1, device-3..=9`.
pub fn describe(targets: &[Target]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < targets.len() {
        if let Target::Device(first) = targets[i] {
            let mut j = i;
            while let Some(Target::Device(n)) = targets.get(j + 1) {
                if *n != first + (j + 1 - i) as u32 {
                    break;
                }
                j += 1;
            }
            if j > i + 1 {
                parts.push(format!("device-{first}..={}", first + (j - i) as u32));
                i = j + 1;
                continue;
            }
        }
        parts.push(targets[i].to_string());
        i += 1;
    }
    if parts.is_empty() {
        "network".into()
    } else {
        parts.join(", ")
    }
}

/// A schedule with the name of what produced it: the `--schedule FILE` format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// `light`, a scenario name, `swarm`, or `shrunk from ...`.
    pub name: String,
    pub faults: Vec<ScheduledFault>,
    /// The injector holds back a disk fault that would leave a kv shard without a majority
    /// of replicas holding its data (another node's disk is lost or still rejoining): data
    /// loss by definition, which only `quorum-loss` sets out to cause. Default true.
    #[serde(default = "yes")]
    pub keep_quorums: bool,
    /// `etcd-slow`: the share of etcd requests (0 to 1) the simulated etcd holds 5-15 s and
    /// then fails as timed out (madsim's `timeout_rate`), for the whole run: the simulator
    /// fixes it when the server starts, and the server cannot restart without losing its
    /// state. Default 0.
    #[serde(default)]
    pub etcd_timeout_rate: f64,
}

fn yes() -> bool {
    true
}

impl Schedule {
    /// Sorted by start time, then kind (a stable order for printing and applying).
    pub fn sorted(mut self) -> Self {
        self.faults
            .sort_by(|x, y| (x.at_ms, x.fault.kind()).cmp(&(y.at_ms, y.fault.kind())));
        self
    }

    /// Checks the schedule against the cluster it will run on: every target exists, every
    /// fault heals inside the safety phase.
    pub fn validate(&self, ctx: &Ctx) -> Result<(), String> {
        for f in &self.faults {
            for t in f.fault.targets() {
                let ok = match t {
                    Target::Device(i) => i < ctx.devices,
                    Target::Node(role, i) => i < ctx.count(role),
                };
                if !ok {
                    return Err(format!("fault `{f}`: no node {t} in this cluster"));
                }
            }
            if let Fault::Crash {
                target: Target::Device(_),
                ..
            } = f.fault
            {
                return Err(format!(
                    "fault `{f}`: devices do not crash (use tunnel or disconnect)"
                ));
            }
            if let Fault::Crash {
                target: Target::Node(role, _),
                moved: true,
            } = f.fault
            {
                if !MOVABLE.contains(&role) {
                    return Err(format!(
                        "fault `{f}`: only presence, push and idgen nodes move with a crash (kv \
                         nodes move with disk_loss; chat servers register wherever they are)"
                    ));
                }
            }
            if let Fault::Crash {
                target: Target::Node(Role::Etcd, _),
                ..
            } = f.fault
            {
                return Err(format!(
                    "fault `{f}`: the simulated etcd keeps its state in memory and a crash would \
                     lose it all (a real etcd cluster keeps it on a quorum); partition or pause it"
                ));
            }
            match f.fault {
                Fault::Loss { per_mille } if per_mille > 1000 => {
                    return Err(format!("fault `{f}`: loss over 1000 per mille"));
                }
                Fault::Latency { min_ms, max_ms } if min_ms > max_ms => {
                    return Err(format!("fault `{f}`: latency min above max"));
                }
                Fault::LeaderPartition { shard } if shard >= ctx.kv_shards => {
                    return Err(format!(
                        "fault `{f}`: no shard {shard} ({} shards)",
                        ctx.kv_shards
                    ));
                }
                _ => {}
            }
            if f.at_ms + f.duration_ms > ctx.duration_ms {
                return Err(format!(
                    "fault `{f}`: heals at {} ms, after the safety phase ends at {} ms",
                    f.at_ms + f.duration_ms,
                    ctx.duration_ms
                ));
            }
        }
        Ok(())
    }
}

/// What a schedule is drawn for: the cluster's size and the safety phase's length.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub seed: u64,
    /// Simulated milliseconds of the safety phase; every fault heals inside it.
    pub duration_ms: u64,
    pub api: u32,
    pub chat: u32,
    pub idgen: u32,
    pub presence: u32,
    pub push: u32,
    pub kv: u32,
    /// kv shards (Raft groups) and copies of each.
    pub kv_shards: u32,
    pub kv_replicas: u32,
    /// Client devices in the workload.
    pub devices: u32,
}

impl Ctx {
    pub fn count(&self, role: Role) -> u32 {
        match role {
            Role::Api => self.api,
            Role::Chat => self.chat,
            Role::Idgen => self.idgen,
            Role::Kv => self.kv,
            Role::Presence => self.presence,
            Role::Push => self.push,
            Role::Etcd => 1,
        }
    }

    /// Every server node, in role order.
    pub fn servers(&self) -> Vec<Target> {
        Role::ALL
            .iter()
            .flat_map(|r| (0..self.count(*r)).map(move |i| Target::Node(*r, i)))
            .collect()
    }

    pub fn all_devices(&self) -> Vec<Target> {
        (0..self.devices).map(Target::Device).collect()
    }

    fn rng(&self, salt: &str) -> StdRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in salt.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        StdRng::seed_from_u64(self.seed ^ h)
    }

    /// A start time in [from, to) percent of the run that leaves room to heal.
    fn at(&self, rng: &mut StdRng, from_pct: u64, to_pct: u64, duration_ms: u64) -> u64 {
        let lo = self.duration_ms * from_pct / 100;
        let hi =
            (self.duration_ms * to_pct / 100).min(self.duration_ms.saturating_sub(duration_ms));
        if hi <= lo {
            return self.duration_ms.saturating_sub(duration_ms).min(lo);
        }
        rng.gen_range(lo..hi)
    }
}

/// The named scenarios, `--scenario NAME`, with one line each for `--list-scenarios`.
pub const SCENARIOS: &[(&str, &str)] = &[
    ("light", "the default: a chat server crash (10 s) at ~40 %, a kv crash (5 s) at ~65 %"),
    ("none", "no injected faults (scripted connection drops stay)"),
    ("chat-crash", "kill the chat server holding the most devices (chat-0) for 20 s: the reconnect storm"),
    ("kv-crash", "kill two kv nodes in turn, losing their unsynced writes"),
    ("idgen-clock-back", "step idgen clocks back 5 s and 30 s (and one forward), corrected later"),
    ("partition-halves", "split servers and devices into two halves for 30 s, then a one-way split"),
    ("tunnel-commute", "40 % of devices go through tunnels of 1 s to 3 min, some shorter than the presence timeout"),
    ("presence-partition", "cut presence from the chat servers (two-way, then one-way) and pause it"),
    ("etcd-down", "cut etcd off from every server for 40 s, then from half of them for 30 s, then pause it 10 s"),
    ("etcd-slow", "light faults while etcd holds 10 % of requests 5-15 s and then fails them (the whole run)"),
    ("rolling-restart", "restart every server node in turn, 3 s down each"),
    ("kv-disk-loss", "two kv nodes lose their disks in turn and come back empty (the second at a new address): their replicas catch up from peers"),
    ("node-moves", "every presence, push and idgen node, then a kv node, is replaced by a machine at a new address, found through etcd"),
    ("kv-leader-partition", "cut two shards' leaders off from their followers (20 s, then 10 s)"),
    ("kv-storage-faults", "torn writes in kv crashes, bit rot read back after a restart, seconds-long fsyncs"),
    ("quorum-loss", "a majority of kv nodes lose their disks at once, then a forced recovery: data loss, reported as such"),
    ("everything", "all of the above but quorum-loss, overlapping"),
    ("swarm", "fault kinds, rates and targets drawn from the seed (also: --faults swarm)"),
];

/// The `etcd-slow` scenario's share of etcd requests held 5-15 s and then failed.
pub const ETCD_SLOW_RATE: f64 = 0.10;

/// The schedule of a named scenario.
pub fn scenario(name: &str, ctx: &Ctx) -> Result<Schedule, String> {
    let faults = match name {
        "light" => light(ctx),
        "none" => Vec::new(),
        "chat-crash" => chat_crash(ctx),
        "kv-crash" => kv_crash(ctx),
        "idgen-clock-back" => idgen_clock_back(ctx),
        "partition-halves" => partition_halves(ctx),
        "tunnel-commute" => tunnel_commute(ctx),
        "presence-partition" => presence_partition(ctx),
        "etcd-down" => etcd_down(ctx),
        "etcd-slow" => light(ctx),
        "rolling-restart" => rolling_restart(ctx),
        "node-moves" => node_moves(ctx),
        "kv-disk-loss" => kv_disk_loss(ctx),
        "kv-leader-partition" => kv_leader_partition(ctx),
        "kv-storage-faults" => kv_storage_faults(ctx),
        "quorum-loss" => quorum_loss(ctx),
        "everything" => everything(ctx),
        "swarm" => return Ok(swarm(ctx).schedule),
        _ => {
            let names: Vec<&str> = SCENARIOS.iter().map(|s| s.0).collect();
            return Err(format!(
                "unknown scenario `{name}`; known: {}",
                names.join(", ")
            ));
        }
    };
    // A short run squeezes the scenario: every fault heals by the end of the safety phase.
    let faults = faults
        .into_iter()
        .filter(|f| f.at_ms < ctx.duration_ms)
        .map(|mut f| {
            f.duration_ms = f.duration_ms.min(ctx.duration_ms - f.at_ms);
            f
        })
        .collect();
    let s = Schedule {
        name: name.to_string(),
        faults,
        keep_quorums: name != "quorum-loss",
        etcd_timeout_rate: if name == "etcd-slow" {
            ETCD_SLOW_RATE
        } else {
            0.0
        },
    }
    .sorted();
    s.validate(ctx)?;
    Ok(s)
}

fn crash(at_ms: u64, duration_ms: u64, role: Role, index: u32) -> ScheduledFault {
    ScheduledFault {
        at_ms,
        duration_ms,
        fault: Fault::Crash {
            target: Target::Node(role, index),
            moved: false,
        },
    }
}

/// The default run's light faults: a chat server crash (down 10 s) around 40 % of the run and
/// a kv crash (down 5 s) around 65 %, targets drawn from the seed.
pub fn light(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x4641_554c_5453);
    let mut out = Vec::new();
    if ctx.chat > 0 {
        let at = ctx.duration_ms * rng.gen_range(35..45) / 100;
        out.push(crash(at, 10_000, Role::Chat, rng.gen_range(0..ctx.chat)));
    }
    if ctx.kv > 0 {
        let at = ctx.duration_ms * rng.gen_range(60..70) / 100;
        out.push(crash(at, 5_000, Role::Kv, rng.gen_range(0..ctx.kv)));
    }
    out.retain(|f| f.at_ms + f.duration_ms <= ctx.duration_ms);
    out
}

/// chat-0 is the first server discovery knows, so it holds the most devices when the run
/// starts; killing it sends a third or more of the devices to reconnect at once.
fn chat_crash(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("chat-crash");
    vec![crash(
        ctx.at(&mut rng, 40, 45, 20_000),
        20_000,
        Role::Chat,
        0,
    )]
}

fn kv_crash(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("kv-crash");
    let first = rng.gen_range(0..ctx.kv.max(1));
    let second = (first + 1) % ctx.kv.max(1);
    vec![
        crash(ctx.at(&mut rng, 25, 35, 8_000), 8_000, Role::Kv, first),
        crash(ctx.at(&mut rng, 55, 65, 3_000), 3_000, Role::Kv, second),
    ]
}

fn idgen_clock_back(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("idgen-clock-back");
    let other = if ctx.idgen > 1 { 1 } else { 0 };
    vec![
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 20, 30, 60_000),
            duration_ms: 60_000,
            fault: Fault::ClockStep {
                idgen: 0,
                delta_ms: -5_000,
            },
        },
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 45, 55, 40_000),
            duration_ms: 40_000,
            fault: Fault::ClockStep {
                idgen: other,
                delta_ms: -30_000,
            },
        },
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 70, 80, 20_000),
            duration_ms: 20_000,
            fault: Fault::ClockStep {
                idgen: 0,
                delta_ms: 15_000,
            },
        },
        // A restart while the clock is behind: the lease must keep ids above what was issued.
        crash(ctx.at(&mut rng, 50, 55, 2_000), 2_000, Role::Idgen, other),
    ]
}

/// Splits every server role and the devices into two halves (even / odd index).
fn halves(ctx: &Ctx) -> (Vec<Target>, Vec<Target>) {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for t in ctx.servers().into_iter().chain(ctx.all_devices()) {
        let i = match t {
            Target::Node(_, i) | Target::Device(i) => i,
        };
        if i % 2 == 0 {
            a.push(t);
        } else {
            b.push(t);
        }
    }
    (a, b)
}

fn partition_halves(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("partition-halves");
    let (a, b) = halves(ctx);
    vec![
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 30, 40, 30_000),
            duration_ms: 30_000,
            fault: Fault::Partition {
                a: a.clone(),
                b: b.clone(),
                two_way: true,
            },
        },
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 65, 75, 20_000),
            duration_ms: 20_000,
            fault: Fault::Partition {
                a: b,
                b: a,
                two_way: false,
            },
        },
    ]
}

/// A tunnel length, log-uniform between 1 s and 3 min: most are short, some outlast the
/// presence timeout (30 s) and the server's idle timeout.
fn tunnel_ms(rng: &mut StdRng) -> u64 {
    let x: f64 = rng.gen_range(0.0..1.0);
    (1_000.0 * 180f64.powf(x)) as u64
}

fn tunnel_commute(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("tunnel-commute");
    let mut devices: Vec<u32> = (0..ctx.devices).collect();
    devices.shuffle(&mut rng);
    devices.truncate((ctx.devices as usize * 2).div_ceil(5));
    devices.sort_unstable();
    let mut out = Vec::new();
    for d in devices {
        // One or two tunnels per commuting device.
        for _ in 0..rng.gen_range(1..=2) {
            let len = tunnel_ms(&mut rng);
            out.push(ScheduledFault {
                at_ms: ctx.at(&mut rng, 5, 90, len),
                duration_ms: len,
                fault: Fault::Tunnel { device: d },
            });
        }
    }
    out
}

fn presence_partition(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("presence-partition");
    let presence: Vec<Target> = (0..ctx.presence.max(1))
        .map(|i| Target::Node(Role::Presence, i))
        .collect();
    let chats: Vec<Target> = (0..ctx.chat).map(|i| Target::Node(Role::Chat, i)).collect();
    vec![
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 25, 35, 20_000),
            duration_ms: 20_000,
            fault: Fault::Partition {
                a: presence.clone(),
                b: chats.clone(),
                two_way: true,
            },
        },
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 50, 60, 15_000),
            duration_ms: 15_000,
            fault: Fault::Partition {
                a: chats[..1.min(chats.len())].to_vec(),
                b: presence.clone(),
                two_way: false,
            },
        },
        ScheduledFault {
            at_ms: ctx.at(&mut rng, 75, 85, 8_000),
            duration_ms: 8_000,
            fault: Fault::Pause {
                target: presence[0],
            },
        },
    ]
}

/// etcd unreachable for a window: existing sessions and committed traffic go on; new
/// connections are handed out from the api's last list; idgen stops issuing once its worker
/// lease can no longer be renewed (`coord::worker`), so sends wait.
fn etcd_down(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("etcd-down");
    let etcd = Target::Node(Role::Etcd, 0);
    let others: Vec<Target> = ctx.servers().into_iter().filter(|t| *t != etcd).collect();
    let half: Vec<Target> = others
        .iter()
        .copied()
        .filter(|_| rng.gen_bool(0.5))
        .collect();
    let mut faults = vec![ScheduledFault {
        at_ms: ctx.at(&mut rng, 25, 35, 40_000),
        duration_ms: 40_000,
        fault: Fault::Partition {
            a: vec![etcd],
            b: others,
            two_way: true,
        },
    }];
    if !half.is_empty() {
        faults.push(ScheduledFault {
            at_ms: ctx.at(&mut rng, 60, 70, 30_000),
            duration_ms: 30_000,
            fault: Fault::Partition {
                a: vec![etcd],
                b: half,
                two_way: true,
            },
        });
    }
    faults.push(ScheduledFault {
        at_ms: ctx.at(&mut rng, 85, 92, 10_000),
        duration_ms: 10_000,
        fault: Fault::Pause { target: etcd },
    });
    faults
}

fn rolling_restart(ctx: &Ctx) -> Vec<ScheduledFault> {
    // Not etcd: see `Role::Etcd`.
    let servers: Vec<Target> = ctx
        .servers()
        .into_iter()
        .filter(|t| !matches!(t, Target::Node(Role::Etcd, _)))
        .collect();
    let step = (ctx.duration_ms * 8 / 10 / servers.len().max(1) as u64).clamp(3_000, 15_000);
    servers
        .into_iter()
        .enumerate()
        .map(|(i, t)| ScheduledFault {
            at_ms: ctx.duration_ms / 10 + i as u64 * step,
            duration_ms: 3_000,
            fault: Fault::Crash {
                target: t,
                moved: false,
            },
        })
        .filter(|f| f.at_ms + f.duration_ms <= ctx.duration_ms)
        .collect()
}

/// The roles whose nodes a `crash` may bring back at a new address.
pub const MOVABLE: [Role; 3] = [Role::Presence, Role::Push, Role::Idgen];

/// Each presence, push and idgen node in turn, then a kv node (with its disk), is replaced by
/// a machine at a new address: down 3 s (kv 5 s), found by everyone through etcd.
fn node_moves(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("node-moves");
    let nodes: Vec<Target> = ctx
        .servers()
        .into_iter()
        .filter(|t| matches!(t, Target::Node(r, _) if MOVABLE.contains(r)))
        .collect();
    let step = (ctx.duration_ms * 6 / 10 / (nodes.len() + 1) as u64).clamp(3_000, 30_000);
    let mut out: Vec<ScheduledFault> = nodes
        .into_iter()
        .enumerate()
        .map(|(i, t)| ScheduledFault {
            at_ms: ctx.duration_ms / 10 + i as u64 * step,
            duration_ms: 3_000,
            fault: Fault::Crash {
                target: t,
                moved: true,
            },
        })
        .collect();
    let kv = Fault::DiskLoss {
        kv: rng.gen_range(0..ctx.kv.max(1)),
        moved: true,
    };
    out.push(at_kv(ctx.at(&mut rng, 75, 85, 5_000), 5_000, kv));
    out.retain(|f| f.at_ms + f.duration_ms <= ctx.duration_ms);
    out
}

fn at_kv(at_ms: u64, duration_ms: u64, fault: Fault) -> ScheduledFault {
    ScheduledFault {
        at_ms,
        duration_ms,
        fault,
    }
}

/// Two kv nodes lose their disks, one after the other (the second long after the first
/// caught up): each comes back empty and rebuilds its replicas from its peers. The second
/// comes back on a machine at a new address, found through etcd.
fn kv_disk_loss(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("kv-disk-loss");
    let n = ctx.kv.max(1);
    let first = rng.gen_range(0..n);
    let second = (first + 1) % n;
    vec![
        at_kv(
            ctx.at(&mut rng, 25, 35, 10_000),
            10_000,
            Fault::DiskLoss {
                kv: first,
                moved: false,
            },
        ),
        at_kv(
            ctx.at(&mut rng, 60, 70, 5_000),
            5_000,
            Fault::DiskLoss {
                kv: second,
                moved: true,
            },
        ),
    ]
}

fn kv_leader_partition(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("kv-leader-partition");
    let shards = ctx.kv_shards.max(1);
    vec![
        at_kv(
            ctx.at(&mut rng, 25, 35, 20_000),
            20_000,
            Fault::LeaderPartition { shard: 0 },
        ),
        at_kv(
            ctx.at(&mut rng, 60, 70, 10_000),
            10_000,
            Fault::LeaderPartition { shard: 1 % shards },
        ),
    ]
}

/// Torn writes, bit rot (read back once a restart empties the caches) and a slow disk.
fn kv_storage_faults(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("kv-storage-faults");
    let n = ctx.kv.max(1);
    let (a, b, c) = (
        rng.gen_range(0..n),
        rng.gen_range(0..n),
        rng.gen_range(0..n),
    );
    let rot = ctx.at(&mut rng, 35, 40, 0);
    vec![
        at_kv(
            ctx.at(&mut rng, 15, 25, 3_000),
            3_000,
            Fault::TornWrite { kv: a },
        ),
        at_kv(rot, 0, Fault::Corruption { kv: b, sectors: 40 }),
        crash(rot + 10_000, 3_000, Role::Kv, b),
        at_kv(
            ctx.at(&mut rng, 60, 70, 20_000),
            20_000,
            Fault::SlowDisk {
                kv: c,
                delay_ms: 2_000,
            },
        ),
        at_kv(
            ctx.at(&mut rng, 80, 85, 3_000),
            3_000,
            Fault::TornWrite { kv: b },
        ),
    ]
}

/// A majority of shard 0's replicas (kv-0, kv-1 by default) lose their disks at once: that
/// is data loss by definition. The operator then makes a surviving replica each lost
/// shard's only voter; the empty nodes rejoin from it.
fn quorum_loss(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut rng = ctx.rng("quorum-loss");
    let majority = ctx.kv_replicas.max(1) / 2 + 1;
    let at = ctx.at(&mut rng, 35, 45, 40_000);
    let mut out: Vec<ScheduledFault> = (0..majority.min(ctx.kv))
        .map(|k| {
            let lost = Fault::DiskLoss {
                kv: k,
                moved: false,
            };
            at_kv(at, 15_000, lost)
        })
        .collect();
    if majority < ctx.kv {
        out.push(at_kv(at + 20_000, 0, Fault::ForceRecover { kv: majority }));
    }
    out
}

fn everything(ctx: &Ctx) -> Vec<ScheduledFault> {
    let mut out = Vec::new();
    for f in [
        chat_crash,
        kv_crash,
        idgen_clock_back,
        partition_halves,
        tunnel_commute,
        presence_partition,
        etcd_down,
        rolling_restart,
        kv_disk_loss,
        kv_leader_partition,
        kv_storage_faults,
    ] {
        out.extend(f(ctx));
    }
    keep_quorums(out)
}

/// How long a kv node with a new disk gets to catch up before another disk may go: until
/// then its shards still count its old replica among their voters.
pub const DISK_CATCH_UP_MS: u64 = 60_000;

/// Drops every fault that would destroy a kv disk while another one is lost or still
/// catching up: a quorum of a shard's disks lost at once is data loss by definition, which a
/// run without `quorum-loss` must not provoke.
fn keep_quorums(mut faults: Vec<ScheduledFault>) -> Vec<ScheduledFault> {
    faults.sort_by_key(|f| f.at_ms);
    let mut busy: Option<(u32, u64)> = None;
    faults
        .into_iter()
        .filter(|f| {
            let Some(kv) = f.fault.loses_disk() else {
                return true;
            };
            if let Some((node, until)) = busy {
                if node != kv && f.at_ms < until {
                    return false;
                }
            }
            let until = f.at_ms + f.duration_ms + DISK_CATCH_UP_MS;
            busy = Some((kv, busy.map_or(until, |(_, u)| u.max(until))));
            true
        })
        .collect()
}

/// A swarm plan: which fault kinds this seed uses, how often, and the schedule drawn from it.
#[derive(Debug, Clone)]
pub struct Swarm {
    /// (kind, mean seconds between two faults of that kind).
    pub rates: Vec<(&'static str, f64)>,
    /// Server roles crashes and pauses may hit.
    pub roles: Vec<Role>,
    pub schedule: Schedule,
}

impl fmt::Display for Swarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self
            .rates
            .iter()
            .map(|(k, s)| format!("{k} every ~{s:.0} s"))
            .collect();
        let roles: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        write!(
            f,
            "swarm: {}; crash/pause roles: {}; {} faults",
            kinds.join(", "),
            roles.join(","),
            self.schedule.faults.len()
        )
    }
}

const SWARM_KINDS: [&str; 13] = [
    "partition",
    "disconnect",
    "tunnel",
    "crash",
    "clock_step",
    "pause",
    "latency",
    "loss",
    "disk_loss",
    "leader_partition",
    "torn_write",
    "corruption",
    "slow_disk",
];

/// Draws a swarm plan from the seed (as FoundationDB's and TigerBeetle's simulators do): each
/// fault kind is on with probability 1/2 (at least one is), each with its own mean interval;
/// crashes and pauses hit a seeded subset of roles; targets, durations and parameters are
/// drawn per fault. Every fault heals inside the safety phase.
pub fn swarm(ctx: &Ctx) -> Swarm {
    let mut rng = ctx.rng("swarm");
    let mut kinds: Vec<&'static str> = SWARM_KINDS
        .iter()
        .copied()
        .filter(|_| rng.gen_bool(0.5))
        // With fewer than 3 copies one lost disk is a lost quorum.
        .filter(|k| ctx.kv_replicas >= 3 || !matches!(*k, "disk_loss" | "corruption"))
        .collect();
    if kinds.is_empty() {
        kinds.push(SWARM_KINDS[rng.gen_range(0..SWARM_KINDS.len())]);
    }
    let mut roles: Vec<Role> = Role::ALL
        .iter()
        .copied()
        .filter(|_| rng.gen_bool(0.6))
        .collect();
    if roles.is_empty() {
        roles.push(Role::Chat);
    }
    let rates: Vec<(&'static str, f64)> = kinds
        .iter()
        .map(|k| {
            let (lo, hi) = match *k {
                "disconnect" | "tunnel" => (2.0, 20.0),
                "latency" | "loss" => (60.0, 180.0),
                _ => (20.0, 90.0),
            };
            (*k, rng.gen_range(lo..hi))
        })
        .collect();
    // A run in three has a slow etcd throughout (its own stream: the draws above and below
    // stay as they were).
    let etcd_timeout_rate = {
        let mut r = ctx.rng("etcd-slow");
        if r.gen_bool(1.0 / 3.0) {
            (r.gen_range(0.01..0.15f64) * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    let mut faults = Vec::new();
    for (kind, mean_s) in &rates {
        let mut t = 2_000.0;
        loop {
            // Exponential gaps: a Poisson process per kind.
            let u: f64 = rng.gen_range(1e-9..1.0);
            t += -u.ln() * mean_s * 1000.0;
            let at_ms = t as u64;
            if at_ms >= ctx.duration_ms {
                break;
            }
            let Some((fault, duration_ms)) = swarm_fault(kind, &roles, ctx, &mut rng) else {
                continue;
            };
            if at_ms + duration_ms <= ctx.duration_ms {
                faults.push(ScheduledFault {
                    at_ms,
                    duration_ms,
                    fault,
                });
            }
        }
    }
    Swarm {
        rates,
        roles,
        schedule: Schedule {
            name: "swarm".into(),
            faults: keep_quorums(faults),
            keep_quorums: true,
            etcd_timeout_rate,
        }
        .sorted(),
    }
}

fn pick_node(roles: &[Role], ctx: &Ctx, rng: &mut StdRng) -> Option<Target> {
    let role = *roles.choose(rng)?;
    let n = ctx.count(role);
    (n > 0).then(|| Target::Node(role, rng.gen_range(0..n)))
}

fn swarm_fault(kind: &str, roles: &[Role], ctx: &Ctx, rng: &mut StdRng) -> Option<(Fault, u64)> {
    Some(match kind {
        "partition" => {
            let servers = ctx.servers();
            let (a, b) = match rng.gen_range(0..3) {
                // One server cut off from the other servers (its clients may still reach it).
                0 => {
                    let t = *servers.choose(rng)?;
                    (
                        vec![t],
                        servers.iter().copied().filter(|s| *s != t).collect(),
                    )
                }
                // One server cut off from everything.
                1 => {
                    let t = *servers.choose(rng)?;
                    let rest = servers
                        .iter()
                        .copied()
                        .filter(|s| *s != t)
                        .chain(ctx.all_devices())
                        .collect();
                    (vec![t], rest)
                }
                // A random split of every node.
                _ => {
                    let mut a = Vec::new();
                    let mut b = Vec::new();
                    for t in servers.into_iter().chain(ctx.all_devices()) {
                        if rng.gen_bool(0.5) {
                            a.push(t)
                        } else {
                            b.push(t)
                        }
                    }
                    (a, b)
                }
            };
            if a.is_empty() || b.is_empty() {
                return None;
            }
            (
                Fault::Partition {
                    a,
                    b,
                    two_way: rng.gen_bool(0.7),
                },
                rng.gen_range(2_000..40_000),
            )
        }
        "disconnect" => (
            Fault::Disconnect {
                device: rng.gen_range(0..ctx.devices.max(1)),
            },
            0,
        ),
        "tunnel" => (
            Fault::Tunnel {
                device: rng.gen_range(0..ctx.devices.max(1)),
            },
            tunnel_ms(rng),
        ),
        "crash" => match pick_node(roles, ctx, rng)? {
            // etcd is not crashed (see `Role::Etcd`): cut off from every server instead.
            etcd @ Target::Node(Role::Etcd, _) => (
                Fault::Partition {
                    a: vec![etcd],
                    b: ctx.servers().into_iter().filter(|t| *t != etcd).collect(),
                    two_way: true,
                },
                rng.gen_range(1_000..20_000),
            ),
            target => {
                // A quarter of the presence, push and idgen nodes come back elsewhere.
                let movable = matches!(target, Target::Node(r, _) if MOVABLE.contains(&r));
                let moved = movable && rng.gen_bool(0.25);
                (Fault::Crash { target, moved }, rng.gen_range(1_000..20_000))
            }
        },
        "clock_step" => {
            let size = rng.gen_range(100..30_000i64);
            (
                Fault::ClockStep {
                    idgen: rng.gen_range(0..ctx.idgen.max(1)),
                    delta_ms: if rng.gen_bool(0.7) { -size } else { size },
                },
                rng.gen_range(5_000..60_000),
            )
        }
        "pause" => (
            Fault::Pause {
                target: pick_node(roles, ctx, rng)?,
            },
            rng.gen_range(500..10_000),
        ),
        "latency" => {
            let min_ms = rng.gen_range(5..50);
            (
                Fault::Latency {
                    min_ms,
                    max_ms: min_ms + rng.gen_range(10..300),
                },
                rng.gen_range(10_000..60_000),
            )
        }
        "loss" => (
            Fault::Loss {
                per_mille: rng.gen_range(10..100),
            },
            rng.gen_range(10_000..30_000),
        ),
        "disk_loss" => (
            Fault::DiskLoss {
                kv: rng.gen_range(0..ctx.kv.max(1)),
                // Half the replacement machines come back at a new address.
                moved: rng.gen_bool(0.5),
            },
            rng.gen_range(1_000..20_000),
        ),
        "leader_partition" => (
            Fault::LeaderPartition {
                shard: rng.gen_range(0..ctx.kv_shards.max(1)),
            },
            rng.gen_range(2_000..30_000),
        ),
        "torn_write" => (
            Fault::TornWrite {
                kv: rng.gen_range(0..ctx.kv.max(1)),
            },
            rng.gen_range(1_000..10_000),
        ),
        "corruption" => (
            Fault::Corruption {
                kv: rng.gen_range(0..ctx.kv.max(1)),
                sectors: rng.gen_range(1..50),
            },
            0,
        ),
        "slow_disk" => (
            Fault::SlowDisk {
                kv: rng.gen_range(0..ctx.kv.max(1)),
                delay_ms: rng.gen_range(200..3_000),
            },
            rng.gen_range(5_000..40_000),
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(seed: u64) -> Ctx {
        Ctx {
            seed,
            duration_ms: 300_000,
            api: 2,
            chat: 3,
            idgen: 2,
            presence: 2,
            push: 2,
            kv: 3,
            kv_shards: 3,
            kv_replicas: 3,
            devices: 400,
        }
    }

    // Proves the light schedule kills one chat and one kv node inside the run, seeded.
    #[test]
    fn light_schedule_is_seeded_and_inside_the_run() {
        let a = light(&ctx(1));
        assert_eq!(a, light(&ctx(1)));
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|f| f.at_ms > 0 && f.at_ms < 300_000));
    }

    // Proves every named scenario draws a valid schedule (targets exist, heals in time) and
    // that the same seed draws the same one.
    #[test]
    fn every_scenario_is_valid_and_seeded() {
        for (name, _) in SCENARIOS {
            for seed in 0..20 {
                let s = scenario(name, &ctx(seed)).unwrap();
                s.validate(&ctx(seed)).unwrap();
                assert_eq!(s, scenario(name, &ctx(seed)).unwrap(), "{name}");
                if *name != "none" && *name != "swarm" {
                    assert!(!s.faults.is_empty(), "{name} has faults");
                }
            }
        }
        assert!(scenario("no-such", &ctx(1))
            .unwrap_err()
            .contains("unknown scenario"));
    }

    // Proves a run too short for a scenario's faults squeezes them inside the safety phase.
    #[test]
    fn short_runs_squeeze_scenarios() {
        for (name, _) in SCENARIOS {
            let c = Ctx {
                duration_ms: 20_000,
                ..ctx(5)
            };
            scenario(name, &c).unwrap().validate(&c).unwrap();
        }
    }

    // Proves swarm plans differ between seeds and cover every fault kind over a few seeds.
    #[test]
    fn swarm_draws_kinds_from_the_seed() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let s = swarm(&ctx(seed));
            assert!(!s.rates.is_empty());
            s.schedule.validate(&ctx(seed)).unwrap();
            kinds.extend(s.schedule.faults.iter().map(|f| f.fault.kind()));
        }
        assert_eq!(kinds.len(), SWARM_KINDS.len(), "{kinds:?}");
        assert_ne!(swarm(&ctx(1)).schedule, swarm(&ctx(2)).schedule);
    }

    // Proves swarm never loses a second kv disk while another is lost or catching up (a
    // quorum of a shard's disks lost at once is data loss), over many seeds.
    #[test]
    fn swarm_keeps_every_quorum() {
        let mut disk_faults = 0;
        for seed in 0..200 {
            let s = swarm(&ctx(seed)).schedule;
            let lost: Vec<(u32, u64, u64)> = s
                .faults
                .iter()
                .filter_map(|f| {
                    f.fault
                        .loses_disk()
                        .map(|kv| (kv, f.at_ms, f.at_ms + f.duration_ms + DISK_CATCH_UP_MS))
                })
                .collect();
            disk_faults += lost.len();
            for (i, a) in lost.iter().enumerate() {
                for b in &lost[i + 1..] {
                    assert!(
                        a.0 == b.0 || b.1 >= a.2,
                        "seed {seed}: kv-{} and kv-{} lose disks together",
                        a.0,
                        b.0
                    );
                }
            }
        }
        assert!(disk_faults > 50, "swarm draws disk faults: {disk_faults}");
        let one_copy = Ctx {
            kv_replicas: 1,
            ..ctx(3)
        };
        for seed in 0..50 {
            let s = swarm(&Ctx {
                seed,
                ..one_copy.clone()
            })
            .schedule;
            assert!(s.faults.iter().all(|f| f.fault.loses_disk().is_none()));
        }
    }

    // Proves targets and schedules round-trip through their text forms.
    #[test]
    fn schedules_round_trip_as_json() {
        for t in ["chat-0", "kv-2", "device-17", "etcd-0"] {
            assert_eq!(t.parse::<Target>().unwrap().to_string(), t);
        }
        assert!("mars-1".parse::<Target>().is_err());
        assert!("chat".parse::<Target>().is_err());
        let s = scenario("everything", &ctx(3)).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), s);
    }

    // Proves validation refuses a target outside the cluster and a fault that outlives the run.
    #[test]
    fn validation_refuses_bad_schedules() {
        let mut s = Schedule {
            name: "t".into(),
            faults: vec![crash(1_000, 1_000, Role::Chat, 9)],
            keep_quorums: true,
            etcd_timeout_rate: 0.0,
        };
        assert!(s.validate(&ctx(1)).unwrap_err().contains("no node chat-9"));
        s.faults = vec![crash(299_000, 5_000, Role::Chat, 0)];
        assert!(s
            .validate(&ctx(1))
            .unwrap_err()
            .contains("after the safety phase"));
    }

    #[test]
    fn describe_compresses_device_runs() {
        let t = vec![
            Target::Node(Role::Chat, 0),
            Target::Device(3),
            Target::Device(4),
            Target::Device(5),
            Target::Device(9),
        ];
        assert_eq!(describe(&t), "chat-0, device-3..=5, device-9");
        let many: Vec<Target> = std::iter::once(Target::Node(Role::Kv, 1))
            .chain((0..10).map(Target::Device))
            .collect();
        assert_eq!(summarize(&many), "kv-1 + 10 devices");
    }
}
