//! Test-only: a history builder and the reference healthy history.

use std::collections::BTreeMap;

use nodes::proto::internal::ShardStatus;

use crate::history::{Event, Id, KvNodeStatus, MemberOp, Record, Status};

/// One second in microseconds, short for tests.
pub const S: u64 = super::SECOND_US;

/// Test shorthand for "no violation found".
pub trait Passed {
    fn passed(&self) -> bool;
}

impl Passed for super::CheckReport {
    fn passed(&self) -> bool {
        self.violation_count == 0
    }
}

/// The text digest the builder gives message `mid`.
pub fn digest_of(mid: Id) -> String {
    format!("{mid:08x}")
}

/// The client message id the builder derives from a message id.
pub fn cmid(mid: Id) -> Id {
    mid + 1_000_000
}

/// History builder. Device-level helpers take a device id and look up its user, so every
/// device must be declared first with `device` or `up`.
#[derive(Default)]
pub struct H {
    recs: Vec<Record>,
    owner: BTreeMap<Id, Id>,
    /// message id -> (channel, sender device, seq), from `ack`.
    msgs: BTreeMap<Id, (Id, Id, u64)>,
}

impl H {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn ev(mut self, t: u64, ev: Event) -> Self {
        self.recs.push(Record { t_us: t, ev });
        self
    }

    pub fn user(&self, device: Id) -> Id {
        // Tests declare devices before using them; a missing one is a bug in the test.
        *self.owner.get(&device).expect("device declared in test")
    }

    /// The healthy end-of-run kv view (`healthy_kv_view`).
    pub fn kv_status(self, t: u64) -> Self {
        let (placement, nodes) = healthy_kv_view();
        self.ev(
            t,
            Event::KvStatus {
                placement,
                quorum_lost: Vec::new(),
                nodes,
            },
        )
    }

    pub fn device(mut self, t: u64, user: Id, device: Id) -> Self {
        self.owner.insert(device, user);
        self.ev(
            t,
            Event::Device {
                user,
                device,
                index: None,
            },
        )
    }

    /// Registers, connects and starts heartbeating a device at `t`.
    pub fn up(self, t: u64, user: Id, device: Id) -> Self {
        self.device(t, user, device)
            .connect(t, device)
            .hb_start(t, device)
    }

    pub fn join(self, t: u64, channel: Id, user: Id, members: u32) -> Self {
        let op = MemberOp::Join;
        self.ev(
            t,
            Event::Membership {
                channel,
                user,
                op,
                members,
            },
        )
    }

    pub fn leave(self, t: u64, channel: Id, user: Id, members: u32) -> Self {
        let op = MemberOp::Leave;
        self.ev(
            t,
            Event::Membership {
                channel,
                user,
                op,
                members,
            },
        )
    }

    /// A send of 5 characters; `mid` only names the client message id (`cmid(mid)`).
    pub fn send(self, t: u64, device: Id, channel: Id, mid: Id) -> Self {
        self.send_chars(t, device, channel, mid, 5)
    }

    pub fn send_chars(self, t: u64, device: Id, channel: Id, mid: Id, chars: u64) -> Self {
        let user = self.user(device);
        let client_msg_id = cmid(mid);
        let (bytes, chars) = (chars, chars);
        self.ev(
            t,
            Event::Send {
                user,
                device,
                channel,
                client_msg_id,
                bytes,
                chars,
                digest: Some(digest_of(mid)),
            },
        )
    }

    pub fn ack(mut self, t: u64, device: Id, channel: Id, mid: Id, seq: u64) -> Self {
        self.msgs.insert(mid, (channel, device, seq));
        let user = self.user(device);
        let (client_msg_id, message_id) = (cmid(mid), mid);
        self.ev(
            t,
            Event::Ack {
                user,
                device,
                channel,
                client_msg_id,
                message_id,
                seq,
                digest: Some(digest_of(mid)),
            },
        )
    }

    /// Delivers an acked message (channel, sender and seq taken from its ack).
    pub fn deliver(self, t: u64, device: Id, mid: Id) -> Self {
        self.deliver_digest(t, device, mid, &digest_of(mid))
    }

    /// Delivers an acked message whose text has digest `digest` (the sent one is
    /// `digest_of(mid)`).
    pub fn deliver_digest(self, t: u64, device: Id, mid: Id, digest: &str) -> Self {
        // Tests ack a message before delivering it; a missing one is a bug in the test.
        let &(channel, sender_device, seq) = self.msgs.get(&mid).expect("acked in test");
        let ev = Event::Deliver {
            user: self.user(device),
            device,
            channel,
            message_id: mid,
            sender: self.user(sender_device),
            sender_device,
            client_msg_id: cmid(mid),
            seq,
            digest: Some(digest.to_string()),
        };
        self.ev(t, ev)
    }

    pub fn presence(self, t: u64, observer_device: Id, subject: Id, status: Status) -> Self {
        let observer = self.user(observer_device);
        self.ev(
            t,
            Event::Presence {
                observer,
                observer_device,
                subject,
                status,
            },
        )
    }

    pub fn sync(self, t: u64, device: Id) -> Self {
        let user = self.user(device);
        self.ev(t, Event::Sync { user, device })
    }

    pub fn synced(self, t: u64, device: Id) -> Self {
        let user = self.user(device);
        self.ev(t, Event::Synced { user, device })
    }

    pub fn hb_start(self, t: u64, device: Id) -> Self {
        let user = self.user(device);
        self.ev(t, Event::HeartbeatStart { user, device })
    }

    pub fn hb_stop(self, t: u64, device: Id) -> Self {
        let user = self.user(device);
        self.ev(t, Event::HeartbeatStop { user, device })
    }

    pub fn connect(self, t: u64, device: Id) -> Self {
        let (user, server) = (self.user(device), "chat-1".to_string());
        self.ev(
            t,
            Event::Connected {
                user,
                device,
                server,
            },
        )
    }

    pub fn disconnect(self, t: u64, device: Id) -> Self {
        let (user, reason) = (self.user(device), "dropped".to_string());
        self.ev(
            t,
            Event::Disconnected {
                user,
                device,
                reason,
            },
        )
    }

    /// A push carrying the message id as its collapse id, as the push node sends it.
    pub fn push(self, t: u64, device: Id, mid: Id) -> Self {
        self.push_keyed(t, device, mid, Some(mid.to_string()))
    }

    pub fn push_keyed(self, t: u64, device: Id, mid: Id, collapse_id: Option<String>) -> Self {
        let user = self.user(device);
        self.ev(
            t,
            Event::Push {
                user,
                device,
                message_id: mid,
                collapse_id,
            },
        )
    }

    pub fn fault(self, t: u64, kind: &str, target: &str) -> Self {
        let (kind, targets) = (kind.to_string(), vec![target.to_string()]);
        self.ev(
            t,
            Event::Fault {
                kind,
                targets,
                detail: None,
            },
        )
    }

    pub fn heal(self, t: u64, kind: &str, target: &str) -> Self {
        let (kind, targets) = (kind.to_string(), vec![target.to_string()]);
        self.ev(
            t,
            Event::Heal {
                kind,
                targets,
                detail: None,
            },
        )
    }

    pub fn phase(self, t: u64, name: &str) -> Self {
        self.ev(
            t,
            Event::Phase {
                name: name.to_string(),
            },
        )
    }

    /// The records, stably sorted by time.
    pub fn build(self) -> Vec<Record> {
        let mut recs = self.recs;
        recs.sort_by_key(|r| r.t_us);
        recs
    }
}

/// The healthy prefix shared by most tests: users 1 (devices 11, 12) and 2 (device 21)
/// online from 1 s, user 3 (device 31) registered but offline until 100 s; all three in
/// channel 100. Message 1000 (seq 1) from device 11 at 5 s, retried and acked twice;
/// message 1001 (seq 2) from device 21 at 6 s; device 31 gets pushes, then syncs both at
/// 100.5 s. A server crash drops device 11 for 3 s at 50 s. User 2 goes silent at 120 s
/// and device 11 shows it offline at 150 s. Phases: liveness at 90 s, end at 200 s.
pub fn healthy_builder() -> H {
    use Status::{Offline, Online};
    H::new()
        .phase(0, "safety")
        .up(S, 1, 11)
        .up(S, 1, 12)
        .up(S, 2, 21)
        .device(S, 3, 31)
        .join(S, 100, 1, 1)
        .join(S, 100, 2, 2)
        .join(S, 100, 3, 3)
        .presence(2 * S, 21, 1, Online)
        .presence(2 * S, 11, 2, Online)
        .send(5 * S, 11, 100, 1000)
        .ack(5 * S + 10_000, 11, 100, 1000, 1)
        .deliver(5 * S + 20_000, 12, 1000)
        .deliver(5 * S + 20_000, 21, 1000)
        .push(5 * S + 50_000, 31, 1000)
        .ack(5 * S + 500_000, 11, 100, 1000, 1)
        .send(6 * S, 21, 100, 1001)
        .ack(6 * S + 10_000, 21, 100, 1001, 2)
        .deliver(6 * S + 20_000, 11, 1001)
        .deliver(6 * S + 20_000, 12, 1001)
        .push(6 * S + 50_000, 31, 1001)
        .fault(50 * S, "crash", "chat-1")
        .disconnect(50 * S, 11)
        .connect(53 * S, 11)
        .heal(55 * S, "crash", "chat-1")
        .phase(90 * S, "liveness")
        .connect(100 * S, 31)
        .hb_start(100 * S, 31)
        .deliver(100 * S + 500_000, 31, 1000)
        .deliver(100 * S + 500_000, 31, 1001)
        .presence(100 * S + 600_000, 31, 1, Online)
        .presence(101 * S, 21, 3, Online)
        .hb_stop(120 * S, 21)
        .disconnect(120 * S, 21)
        .presence(150 * S, 11, 2, Offline)
        .ev(
            7 * S,
            Event::Intrusion {
                target: "kv-0".into(),
                how: "plain".into(),
                request: "GetUser".into(),
                answered: None,
            },
        )
        .phase(200 * S, "end")
        .kv_status(201 * S)
}

/// Three kv nodes, three shards of three replicas, each led by its preferred node; all
/// caught up: (placement, view).
pub fn healthy_kv_view() -> (Vec<Vec<u32>>, Vec<KvNodeStatus>) {
    let placement = vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1]];
    let replica = |shard: u32, slot: u32, leader: u32| ShardStatus {
        shard,
        id: u64::from(slot) + 1,
        role: if slot == leader { "leader" } else { "follower" }.into(),
        term: 3,
        leader: Some(leader),
        commit: 500,
        applied: 500,
        first_index: 1,
        last_index: 500,
        voters: vec![1, 2, 3],
        voters_outgoing: Vec::new(),
        learners: Vec::new(),
        lag: Vec::new(),
    };
    let nodes = (0..3u32)
        .map(|slot| KvNodeStatus {
            node: slot,
            shards: placement
                .iter()
                .enumerate()
                .map(|(shard, p)| replica(shard as u32, slot, p[0]))
                .collect(),
        })
        .collect();
    (placement, nodes)
}

pub fn healthy() -> Vec<Record> {
    healthy_builder().build()
}

/// Runs one checker on a history with default params.
pub fn run(
    check: fn(&[Record], &super::Params) -> super::CheckReport,
    h: &[Record],
) -> super::CheckReport {
    check(h, &super::Params::default())
}
