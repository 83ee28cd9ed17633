//! The history: what clients observed (and what the workload drove), one event per line.
//!
//! This is a public interface (see docs/ARCHITECTURE.md and DESIGN.md): `--history FILE` writes
//! one JSON object per line, ordered by simulated time, with `t_us` and `ev` first. Fields may
//! be added; none may be renamed. The checkers under `checkers/` read only this.
//!
//! It does not hold node internals: a checker that needs a fact the clients could not see is
//! asking the wrong question. Two exceptions are the operator's: the faults injected (and
//! healed), and `kv_status`, what `chatd status` shows of the kv groups once the run is over.

use serde::{Deserialize, Serialize};

/// Integer ids as they appear on the wire (users, devices, channels, messages).
pub type Id = u64;

/// One line of the history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Simulated microseconds since the start of the run.
    pub t_us: u64,
    #[serde(flatten)]
    pub ev: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Offline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberOp {
    Join,
    Leave,
}

/// Every kind of event. The `ev` tag is the snake_case variant name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// A device handed a message to its client library (first attempt only; retries reuse
    /// `client_msg_id` and are not new sends).
    Send {
        user: Id,
        device: Id,
        channel: Id,
        client_msg_id: Id,
        /// UTF-8 bytes of the text.
        bytes: u64,
        /// Characters (Unicode scalar values) of the text: the 100,000 limit counts these.
        chars: u64,
        /// `nodes::client::device::text_digest` of the text: CRC-32 (IEEE, zlib's) of its UTF-8
        /// bytes, 8 hex digits. Absent in histories written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// The server acknowledged a send: the message is durable. Counts as the sending device's
    /// delivery of its own message.
    Ack {
        user: Id,
        device: Id,
        channel: Id,
        client_msg_id: Id,
        message_id: Id,
        /// Position in the channel's commit order (1, 2, 3, ...).
        seq: u64,
        /// Digest of the acknowledged text (see `send`): the device's own copy for an ack, the
        /// stored text when sync found the message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// The server refused a send with an error code, or the device gave up on it.
    SendFailed {
        user: Id,
        device: Id,
        channel: Id,
        client_msg_id: Id,
        reason: String,
    },
    /// A device was handed a message as new (live push over its WebSocket or sync).
    Deliver {
        user: Id,
        device: Id,
        channel: Id,
        message_id: Id,
        sender: Id,
        sender_device: Id,
        client_msg_id: Id,
        seq: u64,
        /// Digest of the delivered text (see `send`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// The presence of `subject` as shown on `observer_device` changed to `status`.
    Presence {
        observer: Id,
        observer_device: Id,
        subject: Id,
        status: Status,
    },
    /// Ground truth from the workload: the device stopped heartbeating (app closed, logout).
    HeartbeatStop { user: Id, device: Id },
    /// Ground truth from the workload: the device started heartbeating.
    HeartbeatStart { user: Id, device: Id },
    /// The push provider was asked to notify `device` of `message_id`.
    Push {
        user: Id,
        device: Id,
        message_id: Id,
        /// The platform's idempotency key the notification carried (APNs
        /// `apns-collapse-id`, FCM `collapse_key`/`tag`, Web Push `Topic`): a later
        /// notification to the device with the same key replaces this one instead of alerting
        /// again. Absent: none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        collapse_id: Option<String>,
    },
    /// Channel membership changed (1:1 channels included); `members` is the count after.
    Membership {
        channel: Id,
        user: Id,
        op: MemberOp,
        members: u32,
    },
    /// A fault was applied. `kind`: partition, disconnect, tunnel, crash, clock_step, pause,
    /// latency, loss, and the kv storage and replication kinds (disk_loss, leader_partition,
    /// torn_write, corruption, slow_disk, force_recover). `targets`: node names (`chat-0`, `device-17` where 17 is the device's
    /// workload index, see `device`); a partition lists side `a` then side `b`. `detail`: the
    /// parameters (partition sides, clock delta, latency range, loss rate).
    Fault {
        kind: String,
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A fault was healed (same `kind`, `targets` and `detail` as its `fault`).
    Heal {
        kind: String,
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Phase boundary: `safety`, `liveness`, `end`.
    Phase { name: String },
    /// A device was registered for a user (its first login). `index` is its place in the
    /// workload: fault targets name it `device-INDEX`.
    Device {
        user: Id,
        device: Id,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
    },
    /// A device's WebSocket session to a chat server was established and authenticated.
    Connected {
        user: Id,
        device: Id,
        server: String,
    },
    /// A device sent `sync` (on this connection; answers come in order).
    Sync { user: Id, device: Id },
    /// A device's `sync` was answered: everything after its cursors, as the server read it
    /// after the request, was handed over before this.
    Synced { user: Id, device: Id },
    /// A device's WebSocket session ended (closed, dropped, or timed out).
    Disconnected {
        user: Id,
        device: Id,
        reason: String,
    },
    /// What an operator's `chatd status` showed once the run was over: every kv node's
    /// replicas (`KvStatus`), the placement (per shard, the kv nodes meant to hold it) and the
    /// shards whose quorum of disks faults destroyed. Judged by `kv_health`.
    KvStatus {
        placement: Vec<Vec<u32>>,
        quorum_lost: Vec<u32>,
        /// The nodes that answered.
        nodes: Vec<KvNodeStatus>,
    },
    /// The rogue (a host on the cluster's network without a certificate of its CA) tried an
    /// internal request on a node. Judged by `security`: `answered` must stay empty.
    Intrusion {
        /// The node attacked (`kv-0`, `chat-1`, ...).
        target: String,
        /// How: `plain` (JSON frames on TCP, the old protocol), `anonymous` (TLS without a
        /// certificate) or `foreign_ca` (a certificate of another CA naming a cluster node).
        how: String,
        /// The request tried (its variant name).
        request: String,
        /// What the node answered, if it did (`None`: refused or silent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answered: Option<String>,
    },
}

/// One kv node's answer to `KvStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvNodeStatus {
    /// The node's slot (`kv-N`).
    pub node: u32,
    pub shards: Vec<nodes::proto::internal::ShardStatus>,
}

impl Event {
    /// The history event for what happened on a device (`nodes::client::runtime`), if it is
    /// one: connect failures, heartbeats sent, bad-input notices, sends held or released by a
    /// backoff, errors not tied to a send and presence-refresh hints are not history events. Shared by the simulated devices and
    /// the real load driver, so both write the same lines.
    pub fn of_device(
        user: Id,
        device: Id,
        ev: nodes::client::runtime::DeviceEvent,
    ) -> Option<Event> {
        use nodes::client::runtime::DeviceEvent as D;
        Some(match ev {
            D::AppOpened => Event::HeartbeatStart { user, device },
            D::AppClosed { .. } => Event::HeartbeatStop { user, device },
            D::Connected { server } => Event::Connected {
                user,
                device,
                server: format!("chat-{server}"),
            },
            D::Disconnected { reason } => Event::Disconnected {
                user,
                device,
                reason: reason.into(),
            },
            D::Sending {
                channel,
                client_msg_id,
                bytes,
                chars,
                digest,
                ..
            } => Event::Send {
                user,
                device,
                channel,
                client_msg_id,
                bytes,
                chars,
                digest: Some(digest),
            },
            D::SyncAsked => Event::Sync { user, device },
            D::Observed(o) => return Self::observed(user, device, o),
            D::ConnectFailed(_)
            | D::HeartbeatSent
            | D::BadInput
            | D::Held { .. }
            | D::Released { .. } => return None,
        })
    }

    /// The history event for what a device's user observed (`DeviceState::on_frame`), if it
    /// is one: errors not tied to a send and presence-refresh hints are not history events.
    fn observed(user: Id, device: Id, o: nodes::client::device::Observation) -> Option<Event> {
        use nodes::client::device::Observation;
        use nodes::proto::client::PresenceStatus;
        Some(match o {
            Observation::Ack {
                channel,
                client_msg_id,
                message_id,
                seq,
                digest,
            } => Event::Ack {
                user,
                device,
                channel,
                client_msg_id,
                message_id,
                seq,
                digest: Some(digest),
            },
            Observation::SendFailed {
                channel,
                client_msg_id,
                code,
            } => Event::SendFailed {
                user,
                device,
                channel,
                client_msg_id,
                reason: code.as_str().into(),
            },
            Observation::Deliver(m) => Event::Deliver {
                user,
                device,
                channel: m.channel,
                message_id: m.message_id,
                sender: m.sender,
                sender_device: m.sender_device,
                client_msg_id: m.client_msg_id,
                seq: m.seq,
                digest: Some(nodes::client::device::text_digest(&m.text)),
            },
            Observation::Presence {
                user: subject,
                status,
            } => Event::Presence {
                observer: user,
                observer_device: device,
                subject,
                status: match status {
                    PresenceStatus::Online => Status::Online,
                    PresenceStatus::Offline => Status::Offline,
                },
            },
            Observation::Synced => Event::Synced { user, device },
            Observation::Error { .. } | Observation::PresenceRefresh => return None,
        })
    }
}

impl Record {
    /// One JSON line (no trailing newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("history records always serialize")
    }
}
