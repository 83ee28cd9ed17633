//! The shared indexes the checkers build from the history: the end time E, per-device
//! timelines (heartbeat, connection), channel membership over time, the devices of a user,
//! acknowledged messages, what each device was handed, and the windows in which a disruptive
//! fault was active. Each is a pure function of the (sorted) history; none checks anything.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use super::{BENIGN_FAULT_KINDS, SETTLE_AFTER_HEAL_US};
use crate::history::{Event, Id, MemberOp, Record};

/// The history sorted by `t_us`, ties in their original order (borrowed if already sorted).
pub(crate) fn sorted(history: &[Record]) -> Cow<'_, [Record]> {
    if history.windows(2).all(|w| w[0].t_us <= w[1].t_us) {
        Cow::Borrowed(history)
    } else {
        let mut owned = history.to_vec();
        owned.sort_by_key(|r| r.t_us); // stable: ties keep file order
        Cow::Owned(owned)
    }
}

/// E: the time of the first `end` phase event, else of the last record (0 if empty).
pub(crate) fn end_time(history: &[Record]) -> u64 {
    history
        .iter()
        .find_map(|r| match &r.ev {
            Event::Phase { name } if name == "end" => Some(r.t_us),
            _ => None,
        })
        .unwrap_or_else(|| history.last().map_or(0, |r| r.t_us))
}

/// An on/off state over time (heartbeating, connected, member). Off before the first change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Timeline {
    /// (t_us, state) in time order; consecutive entries always differ in state.
    changes: Vec<(u64, bool)>,
}

impl Timeline {
    /// Appends a change (ignored if it does not change the state). Times must not decrease.
    pub fn set(&mut self, t: u64, on: bool) {
        if self.changes.last().is_some_and(|&(_, s)| s) != on {
            self.changes.push((t, on));
        }
    }

    /// The state after every change at or before `t`.
    pub fn at(&self, t: u64) -> bool {
        let n = self.changes.partition_point(|&(ct, _)| ct <= t);
        n > 0 && self.changes[n - 1].1
    }

    /// Changes strictly after `a` and at or before `b`.
    fn between(&self, a: u64, b: u64) -> &[(u64, bool)] {
        let lo = self.changes.partition_point(|&(ct, _)| ct <= a);
        let hi = self.changes.partition_point(|&(ct, _)| ct <= b);
        &self.changes[lo..hi.max(lo)]
    }

    /// On at every moment of `[a, b]`.
    pub fn on_throughout(&self, a: u64, b: u64) -> bool {
        self.at(a) && self.between(a, b).is_empty()
    }

    /// Off at every moment of `[a, b]`.
    pub fn off_throughout(&self, a: u64, b: u64) -> bool {
        !self.at(a) && self.between(a, b).is_empty()
    }

    /// On at some moment of `[a, b]`, and every off stretch inside `[a, b]` (clipped to the
    /// window) is shorter than `max_gap`.
    pub fn on_except_short_gaps(&self, a: u64, b: u64, max_gap: u64) -> bool {
        let mut on = self.at(a);
        let mut ever_on = on;
        let mut off_since = a;
        for &(t, state) in self.between(a, b) {
            if state {
                if t - off_since >= max_gap {
                    return false;
                }
                ever_on = true;
            } else {
                off_since = t;
            }
            on = state;
        }
        ever_on && (on || b - off_since < max_gap)
    }

    /// The changes, in time order.
    pub fn changes(&self) -> &[(u64, bool)] {
        &self.changes
    }
}

/// Builds one timeline per key from the events `f` maps to `(key, state)`.
fn timelines(
    history: &[Record],
    f: impl Fn(&Event) -> Option<(Id, bool)>,
) -> BTreeMap<Id, Timeline> {
    let mut out: BTreeMap<Id, Timeline> = BTreeMap::new();
    for r in history {
        if let Some((key, on)) = f(&r.ev) {
            out.entry(key).or_default().set(r.t_us, on);
        }
    }
    out
}

/// Ground-truth heartbeating per device (heartbeat_start / heartbeat_stop).
pub(crate) fn heartbeats(history: &[Record]) -> BTreeMap<Id, Timeline> {
    timelines(history, |ev| match ev {
        Event::HeartbeatStart { device, .. } => Some((*device, true)),
        Event::HeartbeatStop { device, .. } => Some((*device, false)),
        _ => None,
    })
}

/// Connected per device (connected / disconnected).
pub(crate) fn connections(history: &[Record]) -> BTreeMap<Id, Timeline> {
    timelines(history, |ev| match ev {
        Event::Connected { device, .. } => Some((*device, true)),
        Event::Disconnected { device, .. } => Some((*device, false)),
        _ => None,
    })
}

/// Ground truth per user: on while any of its devices heartbeats.
pub(crate) fn user_heartbeats(history: &[Record]) -> BTreeMap<Id, Timeline> {
    let mut beating: BTreeMap<Id, BTreeSet<Id>> = BTreeMap::new();
    let mut out: BTreeMap<Id, Timeline> = BTreeMap::new();
    for r in history {
        let (user, device, on) = match &r.ev {
            Event::HeartbeatStart { user, device } => (*user, *device, true),
            Event::HeartbeatStop { user, device } => (*user, *device, false),
            _ => continue,
        };
        let set = beating.entry(user).or_default();
        if on {
            set.insert(device);
        } else {
            set.remove(&device);
        }
        let any = !set.is_empty();
        out.entry(user).or_default().set(r.t_us, any);
    }
    out
}

/// Timeline lookup where a missing timeline means "off forever".
pub(crate) fn on_throughout(map: &BTreeMap<Id, Timeline>, key: Id, a: u64, b: u64) -> bool {
    map.get(&key).is_some_and(|tl| tl.on_throughout(a, b))
}

/// Timeline lookup where a missing timeline means "off forever".
pub(crate) fn off_throughout(map: &BTreeMap<Id, Timeline>, key: Id, a: u64, b: u64) -> bool {
    map.get(&key).is_none_or(|tl| tl.off_throughout(a, b))
}

/// Channel membership from `membership` events: channel -> user -> joined?
#[derive(Debug, Clone, Default)]
pub(crate) struct Membership {
    by_channel: BTreeMap<Id, BTreeMap<Id, Timeline>>,
}

impl Membership {
    pub fn build(history: &[Record]) -> Self {
        let mut by_channel: BTreeMap<Id, BTreeMap<Id, Timeline>> = BTreeMap::new();
        for r in history {
            if let Event::Membership {
                channel, user, op, ..
            } = &r.ev
            {
                let tl = by_channel.entry(*channel).or_default().entry(*user);
                tl.or_default().set(r.t_us, *op == MemberOp::Join);
            }
        }
        Membership { by_channel }
    }

    /// Whether `user`'s latest membership op for `channel` at or before `t` is a join.
    pub fn is_member(&self, channel: Id, user: Id, t: u64) -> bool {
        self.by_channel
            .get(&channel)
            .and_then(|users| users.get(&user))
            .is_some_and(|tl| tl.at(t))
    }

    /// Every channel `user` ever joined, ascending.
    pub fn channels_of(&self, user: Id) -> Vec<Id> {
        self.by_channel
            .iter()
            .filter(|(_, users)| users.contains_key(&user))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Members of `channel` at `t`, ascending.
    pub fn members_at(&self, channel: Id, t: u64) -> Vec<Id> {
        self.by_channel
            .get(&channel)
            .map_or_else(Vec::new, |users| {
                users
                    .iter()
                    .filter(|(_, tl)| tl.at(t))
                    .map(|(u, _)| *u)
                    .collect()
            })
    }
}

/// The (user, device) pairs an event names, for building the device index.
fn user_devices(ev: &Event) -> Vec<(Id, Id)> {
    match ev {
        Event::Send { user, device, .. }
        | Event::Ack { user, device, .. }
        | Event::SendFailed { user, device, .. }
        | Event::HeartbeatStop { user, device }
        | Event::HeartbeatStart { user, device }
        | Event::Push { user, device, .. }
        | Event::Device { user, device, .. }
        | Event::Connected { user, device, .. }
        | Event::Sync { user, device }
        | Event::Synced { user, device }
        | Event::Disconnected { user, device, .. } => vec![(*user, *device)],
        Event::Deliver {
            user,
            device,
            sender,
            sender_device,
            ..
        } => vec![(*user, *device), (*sender, *sender_device)],
        Event::Presence {
            observer,
            observer_device,
            ..
        } => vec![(*observer, *observer_device)],
        Event::Membership { .. }
        | Event::Fault { .. }
        | Event::Heal { .. }
        | Event::Phase { .. }
        | Event::KvStatus { .. }
        | Event::Intrusion { .. } => vec![],
    }
}

/// Devices of every user: registered ones (`device` events) plus any seen in other events.
#[derive(Debug, Clone, Default)]
pub(crate) struct Devices {
    /// user -> every device id seen for it.
    of_user: BTreeMap<Id, BTreeSet<Id>>,
    /// device -> time of its first `device` event.
    registered: BTreeMap<Id, u64>,
}

impl Devices {
    pub fn build(history: &[Record]) -> Self {
        let mut d = Devices::default();
        for r in history {
            if let Event::Device { device, .. } = &r.ev {
                d.registered.entry(*device).or_insert(r.t_us);
            }
            for (user, device) in user_devices(&r.ev) {
                d.of_user.entry(user).or_default().insert(device);
            }
        }
        d
    }

    /// Every device ever seen for `user`.
    pub fn all_of(&self, user: Id) -> impl Iterator<Item = Id> + '_ {
        self.of_user.get(&user).into_iter().flatten().copied()
    }

    /// Devices of `user` with a `device` event at or before `t`.
    pub fn registered_of(&self, user: Id, t: u64) -> impl Iterator<Item = Id> + '_ {
        self.all_of(user)
            .filter(move |d| self.registered.get(d).is_some_and(|&rt| rt <= t))
    }
}

/// Intervals in which a fault of a kind outside `BENIGN_FAULT_KINDS` was active, each with
/// its scope: a fault whose targets are all devices (a tunnel, a paused phone) disturbs only
/// judgments about those devices; any other (a partition or pause touching a server, latency,
/// loss, a clock step) disturbs every judgment while it lasts.
#[derive(Debug, Clone, Default)]
pub(crate) struct FaultWindows {
    windows: Vec<Window>,
}

#[derive(Debug, Clone)]
struct Window {
    start: u64,
    /// None: never healed (open to the end).
    end: Option<u64>,
    /// Device ids the fault was confined to; None: the whole system.
    devices: Option<BTreeSet<Id>>,
}

impl FaultWindows {
    /// A heal closes the oldest open fault with the same kind and targets; if there is none, it
    /// closes every open fault of that kind. Device targets (`device-INDEX`) are mapped to ids
    /// through the `device` events' `index`; an unknown one makes the fault system-wide.
    ///
    /// kv faults are benign one at a time: a shard keeps a quorum of healthy replicas. Where
    /// two kv nodes are hurt at once (crashed, disk lost or slow, leader cut off; each until
    /// `KV_SETTLE_AFTER_HEAL_US` after its heal), a shard may have lost its quorum and waits
    /// for the slower one: those stretches are disruptive, system-wide.
    pub fn build(history: &[Record]) -> Self {
        let mut w = Self::build_with(history, |kind, _| !BENIGN_FAULT_KINDS.contains(&kind), 0);
        w.windows.extend(kv_quorum_windows(history));
        w
    }

    /// Windows of the faults `select` picks (by kind and targets), each extended by `grace_us`
    /// after its heal.
    pub fn build_with(
        history: &[Record],
        select: impl Fn(&str, &[String]) -> bool,
        grace_us: u64,
    ) -> Self {
        let by_index: BTreeMap<String, Id> = history
            .iter()
            .filter_map(|r| match &r.ev {
                Event::Device {
                    device,
                    index: Some(i),
                    ..
                } => Some((format!("device-{i}"), *device)),
                _ => None,
            })
            .collect();
        let mut windows = Vec::new();
        // Open faults: (kind, targets, index into windows), oldest first.
        let mut open: Vec<(&str, &[String], usize)> = Vec::new();
        for r in history {
            match &r.ev {
                Event::Fault { kind, targets, .. } if select(kind, targets) => {
                    let devices: Option<BTreeSet<Id>> = if targets.is_empty() {
                        None
                    } else {
                        targets.iter().map(|t| by_index.get(t).copied()).collect()
                    };
                    open.push((kind.as_str(), targets.as_slice(), windows.len()));
                    windows.push(Window {
                        start: r.t_us,
                        end: None,
                        devices,
                    });
                }
                Event::Heal { kind, targets, .. } => {
                    let exact = open
                        .iter()
                        .position(|(k, tg, _)| k == kind && *tg == targets.as_slice());
                    let closing: Vec<usize> = match exact {
                        Some(i) => vec![i],
                        None => (0..open.len()).filter(|&i| open[i].0 == kind).collect(),
                    };
                    // Held-up bytes and stalled work land after the heal (madsim retries a
                    // clogged link with a backoff of up to ~10 s): their effects outlive it.
                    let settle = match kind.as_str() {
                        "partition" | "tunnel" | "pause" => SETTLE_AFTER_HEAL_US,
                        _ => 0,
                    };
                    for &i in closing.iter().rev() {
                        let (_, _, w) = open.remove(i);
                        windows[w].end = Some(r.t_us + grace_us + settle);
                    }
                }
                _ => {}
            }
        }
        FaultWindows { windows }
    }

    /// Whether some disruptive fault that disturbs any of `devices` (or the whole system) was
    /// active at some moment of `[a, b]`.
    pub fn overlaps_for(&self, a: u64, b: u64, devices: &[Id]) -> bool {
        self.windows.iter().any(|w| {
            w.start <= b
                && w.end.is_none_or(|e| e >= a)
                && w.devices
                    .as_ref()
                    .is_none_or(|set| devices.iter().any(|d| set.contains(d)))
        })
    }
}

/// How long a kv node counts as hurt after its fault healed: a restarted replica catches up,
/// a cut-off leader's group settles.
pub(crate) const KV_SETTLE_AFTER_HEAL_US: u64 = 10 * super::SECOND_US;

/// The kv node a fault hurts, if it hurts one: kv storage faults and crashes of `kv-N` hit
/// their target; a leader partition hits the leader (its first target). Instant faults
/// (corruption, a forced recovery) hurt nobody for long.
fn hurt_kv_node(kind: &str, targets: &[String]) -> Option<String> {
    let first = targets.first().filter(|t| t.starts_with("kv-"))?;
    match kind {
        "crash" | "pause" | "disk_loss" | "torn_write" | "slow_disk" | "leader_partition" => {
            Some(first.clone())
        }
        _ => None,
    }
}

/// Stretches in which two or more kv nodes were hurt at once (see `FaultWindows::build`).
fn kv_quorum_windows(history: &[Record]) -> Vec<Window> {
    // Per node, its hurt intervals; a fault's heal closes the oldest open one of the same
    // kind and targets.
    let mut open: Vec<(String, Vec<String>, String, u64)> = Vec::new();
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    for r in history {
        match &r.ev {
            Event::Fault { kind, targets, .. } => {
                if let Some(node) = hurt_kv_node(kind, targets) {
                    open.push((kind.clone(), targets.clone(), node, r.t_us));
                }
            }
            Event::Heal { kind, targets, .. } => {
                if let Some(i) = open
                    .iter()
                    .position(|(k, tg, _, _)| k == kind && tg == targets)
                {
                    let (_, _, node, start) = open.remove(i);
                    spans.push((start, r.t_us + KV_SETTLE_AFTER_HEAL_US, node));
                }
            }
            _ => {}
        }
    }
    spans.extend(
        open.into_iter()
            .map(|(_, _, node, start)| (start, u64::MAX, node)),
    );
    // Sweep: (time, +1/-1 as 1/0 with ends first at a tie, node).
    let mut edges: Vec<(u64, u8, String)> = Vec::new();
    for (a, b, node) in spans {
        edges.push((a, 1, node.clone()));
        edges.push((b, 0, node));
    }
    edges.sort();
    let mut hurt: BTreeMap<String, u32> = BTreeMap::new();
    let mut out = Vec::new();
    let mut since: Option<u64> = None;
    for (t, up, node) in edges {
        let n = hurt.entry(node.clone()).or_default();
        if up == 1 {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                hurt.remove(&node);
            }
        }
        match (hurt.len() >= 2, since) {
            (true, None) => since = Some(t),
            (false, Some(s)) => {
                out.push(Window {
                    start: s,
                    end: (t != u64::MAX).then_some(t),
                    devices: None,
                });
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        out.push(Window {
            start: s,
            end: None,
            devices: None,
        });
    }
    out
}

/// An acknowledged message, from its first `ack` (and its `send`, if recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckedMessage {
    pub channel: Id,
    pub message_id: Id,
    pub sender: Id,
    pub sender_device: Id,
    pub client_msg_id: Id,
    pub seq: u64,
    pub ack_t: u64,
    pub send_t: Option<u64>,
}

impl AckedMessage {
    /// When the message was sent: its `send` event, else its first ack.
    pub fn sent_at(&self) -> u64 {
        self.send_t.unwrap_or(self.ack_t)
    }
}

/// First `send` time per (user, device, client_msg_id, channel).
pub(crate) fn send_times(history: &[Record]) -> BTreeMap<(Id, Id, Id, Id), u64> {
    let mut out = BTreeMap::new();
    for r in history {
        if let Event::Send {
            user,
            device,
            channel,
            client_msg_id,
            ..
        } = &r.ev
        {
            out.entry((*user, *device, *client_msg_id, *channel))
                .or_insert(r.t_us);
        }
    }
    out
}

/// Acknowledged messages keyed by (channel, message_id); the first ack wins.
pub(crate) fn acked_messages(history: &[Record]) -> BTreeMap<(Id, Id), AckedMessage> {
    let sends = send_times(history);
    let mut out = BTreeMap::new();
    for r in history {
        if let Event::Ack {
            user,
            device,
            channel,
            client_msg_id,
            message_id,
            seq,
            ..
        } = &r.ev
        {
            let send_t = sends
                .get(&(*user, *device, *client_msg_id, *channel))
                .copied();
            out.entry((*channel, *message_id))
                .or_insert_with(|| AckedMessage {
                    channel: *channel,
                    message_id: *message_id,
                    sender: *user,
                    sender_device: *device,
                    client_msg_id: *client_msg_id,
                    seq: *seq,
                    ack_t: r.t_us,
                    send_t,
                });
        }
    }
    out
}

/// A message seen by a device: its own `ack` or a `deliver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub t: u64,
    /// The device that saw it, and its user.
    pub user: Id,
    pub device: Id,
    pub channel: Id,
    pub message_id: Id,
    pub seq: u64,
    pub sender: Id,
    pub sender_device: Id,
    pub client_msg_id: Id,
    /// True for an ack (the device's own message), false for a deliver.
    pub own: bool,
    /// The text's digest, when the history records it.
    pub digest: Option<String>,
}

impl Seen {
    pub fn kind(&self) -> &'static str {
        if self.own {
            "ack"
        } else {
            "deliver"
        }
    }
}

/// Every ack and deliver, in history order.
pub(crate) fn seen(history: &[Record]) -> Vec<Seen> {
    history.iter().filter_map(seen_one).collect()
}

fn seen_one(r: &Record) -> Option<Seen> {
    match &r.ev {
        Event::Ack {
            user,
            device,
            channel,
            client_msg_id,
            message_id,
            seq,
            digest,
        } => Some(Seen {
            t: r.t_us,
            user: *user,
            device: *device,
            channel: *channel,
            message_id: *message_id,
            seq: *seq,
            sender: *user,
            sender_device: *device,
            client_msg_id: *client_msg_id,
            own: true,
            digest: digest.clone(),
        }),
        Event::Deliver {
            user,
            device,
            channel,
            message_id,
            sender,
            sender_device,
            client_msg_id,
            seq,
            digest,
        } => Some(Seen {
            t: r.t_us,
            user: *user,
            device: *device,
            channel: *channel,
            message_id: *message_id,
            seq: *seq,
            sender: *sender,
            sender_device: *sender_device,
            client_msg_id: *client_msg_id,
            own: false,
            digest: digest.clone(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::testutil::*;
    use crate::history::Event;

    #[test]
    fn timeline_semantics() {
        // Proves Timeline's window predicates: state is off before the first change, a change
        // at exactly t counts at t, and short-gap tolerance clips gaps to the window.
        let mut tl = Timeline::default();
        tl.set(10, true);
        tl.set(20, false);
        tl.set(25, true);
        assert!(!tl.at(9) && tl.at(10) && !tl.at(20) && tl.at(30));
        assert!(tl.on_throughout(10, 19) && !tl.on_throughout(10, 20));
        assert!(tl.off_throughout(0, 9) && !tl.off_throughout(0, 10));
        assert!(tl.on_except_short_gaps(10, 40, 6));
        assert!(!tl.on_except_short_gaps(10, 40, 5));
        assert!(tl.on_except_short_gaps(22, 40, 4)); // gap clipped to [22, 25)
        assert!(!tl.on_except_short_gaps(0, 5, 100)); // never on in the window
    }

    #[test]
    fn fault_windows_match_heals() {
        // Proves benign kinds open no window, a heal closes the matching fault (a partition
        // or tunnel keeps disturbing SETTLE_AFTER_HEAL_US after it), an unhealed fault stays
        // open to the end, and a fault confined to known devices disturbs only judgments about
        // them (an unknown device name makes it system-wide).
        let h = H::new()
            .device(0, 1, 11)
            .device(0, 2, 21)
            .fault(10 * S, "crash", "chat-1")
            .fault(20 * S, "partition", "a|b")
            .heal(30 * S, "partition", "a|b")
            .fault(60 * S, "tunnel", "device-0")
            .heal(65 * S, "tunnel", "device-0")
            .fault(100 * S, "tunnel", "dev-1")
            .build();
        let mut h = h;
        for r in &mut h {
            if let Event::Device { device, index, .. } = &mut r.ev {
                *index = Some(if *device == 11 { 0 } else { 1 });
            }
        }
        let fw = FaultWindows::build(&h);
        assert!(!fw.overlaps_for(0, 15 * S, &[]));
        assert!(fw.overlaps_for(25 * S, 26 * S, &[]));
        assert!(
            fw.overlaps_for(39 * S, 39 * S, &[]),
            "settling after the heal"
        );
        assert!(!fw.overlaps_for(41 * S, 59 * S, &[11, 21]));
        assert!(
            fw.overlaps_for(61 * S, 62 * S, &[11]),
            "the tunnel of device-0 (id 11)"
        );
        assert!(
            !fw.overlaps_for(61 * S, 62 * S, &[21]),
            "not about device 21"
        );
        assert!(
            fw.overlaps_for(1_000 * S, 2_000 * S, &[]),
            "unknown target: system-wide"
        );
    }

    // Proves one kv fault at a time is benign, and two kv nodes hurt at once (until 10 s
    // after the first heal) disturb every judgment; other roles' crashes do not count.
    #[test]
    fn two_kv_nodes_hurt_at_once_are_disruptive() {
        use crate::checkers::testutil::{H, S};
        let h = H::new()
            .fault(10 * S, "crash", "kv-0")
            .heal(12 * S, "crash", "kv-0")
            .fault(30 * S, "slow_disk", "kv-1")
            .fault(35 * S, "crash", "chat-0")
            .fault(40 * S, "crash", "kv-2")
            .heal(45 * S, "crash", "kv-2")
            .heal(50 * S, "slow_disk", "kv-1")
            .heal(52 * S, "crash", "chat-0")
            .build();
        let w = FaultWindows::build(&h);
        // kv-0 alone (and its 10 s settle) overlaps nothing else.
        assert!(!w.overlaps_for(10 * S, 29 * S, &[1]));
        // chat-0's crash is benign and kv-1 alone is too.
        assert!(!w.overlaps_for(31 * S, 39 * S, &[1]));
        // kv-1 slow and kv-2 crashed: from 40 s to kv-2's heal + 10 s.
        assert!(w.overlaps_for(40 * S, 40 * S, &[1]));
        assert!(w.overlaps_for(54 * S, 54 * S, &[1]));
        assert!(!w.overlaps_for(56 * S, 90 * S, &[1]));
    }
}
