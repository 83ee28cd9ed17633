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

use std::collections::BTreeMap;
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::Handle;
use madsim::task::NodeId;
use scenarios::{Fault, Role, ScheduledFault, Target};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::history::Event;
use crate::recorder::Recorder;

/// The default link latency (madsim's own default) that latency faults return to.
const DEFAULT_LATENCY: std::ops::Range<Duration> =
    Duration::from_millis(1)..Duration::from_millis(10);

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
    /// Writes kv disks lost to crashes.
    pub lost_writes: u64,
}

impl<'c> Injector<'c> {
    pub fn new(cluster: &'c Cluster, devices: Vec<DeviceHandle>, recorder: Recorder) -> Self {
        Self {
            cluster,
            devices,
            recorder,
            active: Active::default(),
            lost_writes: 0,
        }
    }

    fn node(&self, t: Target) -> NodeId {
        match t {
            Target::Node(role, i) => self.cluster.nodes[&(role, i)],
            Target::Device(i) => self.devices[i as usize].node,
        }
    }

    /// Runs the schedule to its end: each fault starts at `start + at_ms` and heals
    /// `duration_ms` later. At one instant, heals of earlier faults go first, then new faults,
    /// then the heals of instant faults.
    pub async fn run(&mut self, schedule: &[ScheduledFault], start: Instant) {
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
            if is_start {
                self.apply(i, f);
            } else {
                self.heal(i, f);
            }
            let kind = f.kind().to_string();
            let targets = f.targets().iter().map(Target::to_string).collect();
            let detail = f.detail();
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

    fn apply(&mut self, i: usize, f: &Fault) {
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
            Fault::Crash { target } => {
                if let Target::Node(role, index) = *target {
                    if up(&mut self.active.crashed, (role, index)) {
                        self.lost_writes += self.cluster.kill(role, index);
                    }
                }
            }
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
            Fault::Crash { target } => {
                if let Target::Node(role, index) = *target {
                    if down(&mut self.active.crashed, (role, index)) {
                        self.cluster.restart(role, index);
                        // A restarted process is still stalled if a pause is active on it.
                        let n = self.node(*target);
                        if self.active.paused.contains_key(&n) {
                            handle.pause(n);
                        }
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
