//! Presence: a user is online while any of their devices heartbeats (every 5 s); offline
//! `PRESENCE_TIMEOUT_MS` after the last heartbeat of the last device, or at once when the last
//! device logs out. Changes are published to the user's friends (not to group members: large
//! groups are not fanned out).
//!
//! [`Presence`] is the I/O-free core: `on_heartbeat`, `on_logout`, `on_tick` take `now_ms` and
//! return the status changes to publish. The shell (`server`) relays them. State is in memory
//! only: after a restart every user is offline until their devices' next heartbeat.
//!
//! **Settling.** Until a (re)started node has heard of every connected device it publishes
//! no offline change: a user who logs out one device then, while two others are connected
//! but have not heartbeated here yet, is not shown offline (swarm seed 500012). Online
//! changes (a heartbeat is proof) still go out. Chat servers re-assert their devices' last
//! heartbeats as soon as they see the node settling (`PresenceReassert`, within one
//! subscription period, 2 s): every session (one without a heartbeat yet as of its hello),
//! and the devices that left them without a logout within the presence timeout (between two
//! connections a device is on no server; swarm seed 183000 at 800 users); the node settles once every chat server registered when it
//! started has done so, and after [`WARMUP_MS`] (two heartbeat intervals: every live device
//! has heartbeated) at the latest. The shell answers no status query while settling, and
//! once settled chat servers tell their sessions to ask again (the boot time changed),
//! which corrects any view the restart left stale.

pub mod server;

use std::collections::BTreeMap;

use crate::canary::{Canaries, Canary};
use crate::limits::{HEARTBEAT_INTERVAL_MS, PRESENCE_TIMEOUT_MS};

/// After a (re)start presence knows nobody: every live device has had time to heartbeat after
/// two intervals. Until then (or until every chat server re-asserted its devices) it
/// publishes no offline change and answers no query.
pub const WARMUP_MS: u64 = 2 * HEARTBEAT_INTERVAL_MS;

/// Heartbeats per `PresenceReassert` batch (about 40 bytes each as JSON: 400 KB).
pub const REASSERT_BATCH_MAX: usize = 10_000;
use crate::proto::client::PresenceStatus;
use crate::proto::Id;

/// A change to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub user: Id,
    pub status: PresenceStatus,
    /// Orders changes and answers about one user: a device keeps the highest it saw, so a
    /// stale query answer arriving after a newer change is ignored.
    pub version: u64,
}

#[derive(Debug, Default)]
pub struct Presence {
    /// Online users -> their heartbeating devices -> last heartbeat (ms).
    online: BTreeMap<Id, BTreeMap<Id, u64>>,
    /// Version of each user's last change (bounded by the number of users).
    versions: BTreeMap<Id, u64>,
    /// Next version to hand out; starts from the clock so a restarted node outranks itself.
    next_version: u64,
    /// The version of "no change since this node started": above every version a previous
    /// incarnation handed out, so an answer after a restart replaces what devices showed.
    base_version: u64,
    /// Until then no offline change is published (see "Settling" above).
    settled_at_ms: u64,
    canaries: Canaries,
}

impl Presence {
    /// `now_ms` seeds the version counter (versions grow across restarts).
    pub fn new(canaries: Canaries, now_ms: u64) -> Self {
        Self {
            online: BTreeMap::new(),
            versions: BTreeMap::new(),
            next_version: now_ms.saturating_mul(1000) + 1,
            base_version: now_ms.saturating_mul(1000),
            settled_at_ms: now_ms.saturating_add(WARMUP_MS),
            canaries,
        }
    }

    fn change(&mut self, user: Id, status: PresenceStatus) -> Change {
        self.next_version += 1;
        self.versions.insert(user, self.next_version);
        Change {
            user,
            status,
            version: self.next_version,
        }
    }

    /// A heartbeat the device sent at `seen_ms` (as its chat server received it), handled at
    /// `now_ms`. One already older than the timeout (held up by a partition) is ignored; a
    /// late one never moves a device's last heartbeat backwards.
    pub fn on_heartbeat(
        &mut self,
        user: Id,
        device: Id,
        seen_ms: u64,
        now_ms: u64,
    ) -> Option<Change> {
        if now_ms.saturating_sub(seen_ms) >= PRESENCE_TIMEOUT_MS {
            return None;
        }
        let devices = self.online.entry(user).or_default();
        let was_online = !devices.is_empty();
        let last = devices.entry(device).or_insert(seen_ms);
        *last = (*last).max(seen_ms);
        (!was_online).then(|| self.change(user, PresenceStatus::Online))
    }

    /// A device logged out at `now_ms`: the user goes offline if it was their last device
    /// (published only once settled).
    pub fn on_logout(&mut self, user: Id, device: Id, now_ms: u64) -> Option<Change> {
        let devices = self.online.get_mut(&user)?;
        devices.remove(&device);
        if devices.is_empty() {
            self.online.remove(&user);
            return self.offline(user, now_ms);
        }
        None
    }

    /// Every device connected anywhere has been heard of (each chat server re-asserted its
    /// own): settled from `now_ms` on.
    pub fn settle(&mut self, now_ms: u64) {
        self.settled_at_ms = self.settled_at_ms.min(now_ms);
    }

    /// Whether offline changes are published and queries answered.
    pub fn is_settled(&self, now_ms: u64) -> bool {
        now_ms >= self.settled_at_ms
    }

    /// The offline change of `user`, unless this node is still settling.
    fn offline(&mut self, user: Id, now_ms: u64) -> Option<Change> {
        self.is_settled(now_ms)
            .then(|| self.change(user, PresenceStatus::Offline))
    }

    /// Expires silent devices; returns users that went offline.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Change> {
        if self.canaries.is_on(Canary::PresenceNoTimeout) {
            return Vec::new();
        }
        let mut gone = Vec::new();
        self.online.retain(|user, devices| {
            devices.retain(|_, last| now_ms.saturating_sub(*last) < PRESENCE_TIMEOUT_MS);
            if devices.is_empty() {
                gone.push(*user);
            }
            !devices.is_empty()
        });
        gone.into_iter()
            .filter_map(|u| self.offline(u, now_ms))
            .collect()
    }

    pub fn status(&self, user: Id) -> PresenceStatus {
        if self.online.contains_key(&user) {
            PresenceStatus::Online
        } else {
            PresenceStatus::Offline
        }
    }

    /// Status and the version of the last change (the base version: none since this node
    /// started).
    pub fn status_versioned(&self, user: Id) -> (PresenceStatus, u64) {
        (
            self.status(user),
            self.versions
                .get(&user)
                .copied()
                .unwrap_or(self.base_version),
        )
    }

    pub fn online_users(&self) -> usize {
        self.online.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: PresenceStatus = PresenceStatus::Online;
    const OFF: PresenceStatus = PresenceStatus::Offline;

    /// A node settled long before time 0 (its own start is not under test).
    fn settled() -> Presence {
        let mut p = Presence::new(Canaries::none(), 0);
        p.settled_at_ms = 0;
        p
    }

    // Proves a user stays online while any device heartbeats, goes offline exactly at the
    // timeout after the last device's last heartbeat, and a second device keeps them online.
    #[test]
    fn timeout_after_last_device() {
        let mut p = settled();
        assert_eq!(p.on_heartbeat(1, 10, 0, 0).map(|c| c.status), Some(ON));
        assert!(p.on_heartbeat(1, 11, 20_000, 20_000).is_none());
        assert!(p.on_tick(PRESENCE_TIMEOUT_MS - 1).is_empty());
        // Device 10 expires, device 11 still fresh.
        assert!(p.on_tick(PRESENCE_TIMEOUT_MS).is_empty());
        assert_eq!(p.status(1), ON);
        assert!(p.on_tick(20_000 + PRESENCE_TIMEOUT_MS - 1).is_empty());
        let ch = p.on_tick(20_000 + PRESENCE_TIMEOUT_MS);
        assert_eq!(ch.len(), 1);
        assert_eq!((ch[0].user, ch[0].status), (1, OFF));
        assert!(ch[0].version > 0, "changes carry increasing versions");
    }

    // Proves logout of the last device is immediate, logout of one of two is not.
    #[test]
    fn logout_is_immediate_for_last_device() {
        let mut p = settled();
        p.on_heartbeat(1, 10, 0, 0);
        p.on_heartbeat(1, 11, 0, 0);
        assert!(p.on_logout(1, 10, 1).is_none());
        assert_eq!(p.on_logout(1, 11, 1).map(|c| c.status), Some(OFF));
        assert_eq!(p.status(1), OFF);
    }

    // Proves the seed-500012 class cannot happen: a node that just restarted and has heard
    // from one of a user's devices publishes no offline change when that device logs out
    // (the user's other devices have not heartbeated here yet); their next heartbeat shows
    // the user online, and once settled a logout is published again.
    #[test]
    fn restarted_node_publishes_no_offline_while_settling() {
        let boot = 100_000;
        let mut p = Presence::new(Canaries::none(), boot);
        assert!(p.on_heartbeat(1, 10, boot + 1, boot + 1).is_some());
        assert!(
            p.on_logout(1, 10, boot + 2).is_none(),
            "device 11 may be connected"
        );
        assert_eq!(p.status(1), OFF);
        assert!(p.on_tick(boot + WARMUP_MS - 1).is_empty());
        assert_eq!(
            p.on_heartbeat(1, 11, boot + 3, boot + 3).map(|c| c.status),
            Some(ON)
        );
        let settled = boot + WARMUP_MS;
        assert_eq!(p.on_logout(1, 11, settled).map(|c| c.status), Some(OFF));
    }

    // Proves a node whose chat servers all re-asserted their devices settles at once: it
    // publishes offline changes and counts as settled from then on, long before the warm-up
    // ends; settling never moves later.
    #[test]
    fn reassertion_settles_early() {
        let boot = 100_000;
        let mut p = Presence::new(Canaries::none(), boot);
        assert!(!p.is_settled(boot + 1_000));
        // Re-asserted by its chat server: device 10 last heartbeated 3 s before the restart.
        assert!(p.on_heartbeat(1, 10, boot - 3_000, boot + 1_500).is_some());
        p.settle(boot + 2_000);
        assert!(p.is_settled(boot + 2_000));
        assert_eq!(
            p.on_logout(1, 10, boot + 2_500).map(|c| c.status),
            Some(OFF)
        );
        p.settle(boot + 50_000);
        assert!(p.is_settled(boot + 2_000), "settling never moves later");
    }

    // Proves heartbeats every 5 s never produce a flap.
    #[test]
    fn steady_heartbeats_never_flap() {
        let mut p = settled();
        for i in 0..100u64 {
            let now = i * 5_000;
            let c = p.on_heartbeat(1, 10, now, now);
            assert_eq!(c.is_some(), i == 0);
            assert!(p.on_tick(now + 2_500).is_empty());
        }
    }

    // Proves a heartbeat held up by a partition counts from when it was sent: one older than
    // the timeout is ignored, a late one does not extend the device's life past its send time,
    // and it never moves the last heartbeat backwards.
    #[test]
    fn late_heartbeats_count_from_when_they_were_seen() {
        let mut p = settled();
        assert!(p.on_heartbeat(1, 10, 0, PRESENCE_TIMEOUT_MS).is_none());
        assert_eq!(p.status(1), OFF);
        p.on_heartbeat(2, 20, 10_000, 10_000);
        // Sent at 5 s, arrives at 25 s: the device was last seen at 10 s, not 25 s.
        p.on_heartbeat(2, 20, 5_000, 25_000);
        assert_eq!(p.on_tick(10_000 + PRESENCE_TIMEOUT_MS).len(), 1);
        assert_eq!(p.status(2), OFF);
    }

    // Proves a restarted node's answers outrank everything the previous incarnation said.
    #[test]
    fn restart_outranks_old_versions() {
        let mut old = Presence::new(Canaries::none(), 1_000);
        let c = old.on_heartbeat(1, 10, 1_000, 1_000).expect("online");
        let fresh = Presence::new(Canaries::none(), 2_000);
        let (status, v) = fresh.status_versioned(1);
        assert_eq!(status, OFF);
        assert!(v > c.version);
    }
}
