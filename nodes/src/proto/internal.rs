//! The internal protocol: one request and one response per call, JSON in length-delimited
//! frames (see `rpc`). One enum for all roles keeps routing errors impossible to miss: a node
//! answers a request meant for another role with `Response::Error` code `bad_request`,
//! naming the request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::client::{ChatMessage, ErrorCode, PresenceStatus, PushTarget};
use super::Id;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Direct,
    Group,
}

/// A user's record in kv.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user: Id,
    pub name: String,
    /// The password's hash (`auth`): an argon2id PHC string, or a legacy salted SHA-256
    /// that the next login upgrades.
    pub password_hash: String,
    pub devices: Vec<Id>,
    /// Friend -> the 1:1 channel shared with them.
    pub friends: BTreeMap<Id, Id>,
    pub channels: Vec<Id>,
    /// Device -> where its push notifications go. Omitted when empty, so records (and the
    /// simulation's histories) written before push targets existed encode the same.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub push_targets: BTreeMap<Id, PushTarget>,
    /// Device -> tokens of that device issued at or before this time (Unix ms) are revoked
    /// (its logouts). Omitted when empty, as above.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revoked_before_ms: BTreeMap<Id, u64>,
    /// Users who asked to be this user's friend -> when (Unix ms); at most
    /// `FRIEND_REQUESTS_MAX`. Omitted when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub friend_requests: BTreeMap<Id, u64>,
    /// Groups this user is invited to: channel -> who invited; at most `GROUP_INVITES_MAX`.
    /// Omitted when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_invites: BTreeMap<Id, Id>,
    /// Every token of the user issued at or before this time is revoked ("log out
    /// everywhere"); 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revoked_all_before_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl UserRecord {
    /// Whether a token with `claims` (already verified: signature and expiry) still stands:
    /// its device is still the user's, and it was issued after the device's last logout and
    /// the user's last "log out everywhere".
    pub fn accepts(&self, claims: &crate::auth::Claims) -> Result<(), ErrorCode> {
        let revoked_before = self
            .revoked_before_ms
            .get(&claims.device)
            .copied()
            .unwrap_or(0)
            .max(self.revoked_all_before_ms);
        if claims.user != self.user
            || !self.devices.contains(&claims.device)
            || claims.issued_at_ms() <= revoked_before
        {
            return Err(ErrorCode::TokenRevoked);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub channel: Id,
    pub kind: ChannelKind,
    pub name: String,
    pub members: Vec<Id>,
    pub last_seq: u64,
    pub last_message_id: Id,
}

/// Where a device's WebSocket session lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub user: Id,
    pub device: Id,
    pub server: u32,
    /// Distinguishes successive sessions of one device on one server.
    pub epoch: u64,
    /// The device's connection number (from `hello`): a registration never replaces the entry
    /// of a newer connection, however late it arrives.
    #[serde(default)]
    pub connection: u64,
}

/// One redb table's size: the bytes of its keys and values, and the bytes of the pages its
/// B-tree uses (leaves and branches, at redb's page size). File length beyond the pages of
/// every table is the allocator's: free pages, redb's own tables, slack from growth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpace {
    pub table: String,
    pub stored_bytes: u64,
    pub page_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatServerInfo {
    pub server: u32,
    pub ws_addr: String,
    pub rpc_addr: String,
    pub load: u32,
    /// Whether devices connect with `wss://` (the server has `[client_tls]`).
    #[serde(default)]
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendRequest {
    pub channel: Id,
    pub sender: Id,
    pub sender_device: Id,
    pub client_msg_id: Id,
    pub message_id: Id,
    pub text: String,
    pub sent_at_ms: u64,
    /// Canary `no-dedup`: skip the (sender_device, client_msg_id) dedup check.
    #[serde(default)]
    pub skip_dedup: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Request {
    // ---- kv
    AllocId {
        kind: String,
    },
    ReserveName {
        name: String,
        user: Id,
    },
    LookupName {
        name: String,
    },
    PutUser {
        record: UserRecord,
    },
    GetUser {
        user: Id,
    },
    GetUsers {
        users: Vec<Id>,
    },
    AddDevice {
        user: Id,
        device: Id,
    },
    /// Removes a device from its user (and its push target).
    /// Revokes the tokens of `device` (or, with `None`, of every device of the user) issued
    /// at or before `at_ms`.
    RevokeTokens {
        user: Id,
        device: Option<Id>,
        at_ms: u64,
    },
    /// `from` asks `user` to be friends (kept on `user`'s record until answered); nothing if
    /// they are friends already.
    RequestFriend {
        user: Id,
        from: Id,
        at_ms: u64,
    },
    /// `by` invites `user` to group `channel` (nothing if already in it).
    InviteToGroup {
        user: Id,
        channel: Id,
        by: Id,
    },
    /// `user` declines the invitation to `channel`.
    DropGroupInvite {
        user: Id,
        channel: Id,
    },
    /// `user` declines `from`'s request.
    DropFriendRequest {
        user: Id,
        from: Id,
    },
    RemoveDevice {
        user: Id,
        device: Id,
    },
    /// Sets (or with `None` clears) the push target of one of `user`'s devices; refused with
    /// `unknown_device` if `device` is not the user's.
    SetPushTarget {
        user: Id,
        device: Id,
        target: Option<PushTarget>,
    },
    /// Adds `friend` (and the shared 1:1 channel) to `user`'s record; idempotent.
    LinkFriend {
        user: Id,
        friend: Id,
        channel: Id,
    },
    /// Adds or removes `channel` in `user`'s channel list; idempotent.
    SetUserChannel {
        user: Id,
        channel: Id,
        member: bool,
    },
    CreateChannel {
        record: ChannelRecord,
    },
    GetChannel {
        channel: Id,
    },
    AddMember {
        channel: Id,
        user: Id,
    },
    RemoveMember {
        channel: Id,
        user: Id,
    },
    Append(AppendRequest),
    ReadLog {
        channel: Id,
        after_seq: u64,
        limit: u32,
        /// The user reading: refused `not_a_member` unless a member, checked in the same
        /// read as the log (so a removal, one write of the channel's members, takes effect
        /// at once however stale the user's own channel list is). `None`: an internal read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reader: Option<Id>,
    },
    /// Canary `cursor-by-message-id`: messages with id above `after_message_id`.
    ReadLogByMessageId {
        channel: Id,
        after_message_id: Id,
        limit: u32,
    },
    /// The fanout (live delivery and push) of (channel, seq) is finished.
    FanoutDone {
        channel: Id,
        seq: u64,
    },
    /// Committed messages whose fanout was not finished by `committed_before_ms`.
    PendingFanouts {
        committed_before_ms: u64,
        limit: u32,
    },
    /// Moves the device's cursors forward (never back), in one write.
    SetCursors {
        device: Id,
        /// (channel, seq) pairs.
        cursors: Vec<(Id, u64)>,
    },
    /// `SetCursors` for several devices in one write: a chat server's cursors for one shard,
    /// gathered over [`CURSOR_FLUSH_MS`](crate::chat::cursors::CURSOR_FLUSH_MS). At most
    /// [`CURSOR_BATCH_DEVICES_MAX`](crate::limits::CURSOR_BATCH_DEVICES_MAX) devices.
    SetCursorsBatch {
        /// (device, [(channel, seq)]).
        devices: Vec<(Id, Vec<(Id, u64)>)>,
    },
    GetCursors {
        device: Id,
    },
    SetSession {
        entry: SessionEntry,
    },
    ClearSession {
        entry: SessionEntry,
    },
    GetSessions {
        users: Vec<Id>,
    },
    SetLastActive {
        user: Id,
        at_ms: u64,
    },
    /// Claims the right to notify `device` of `message_id`: answers true if nobody notified it
    /// yet and no other live claim holds it (a claim is live for `PUSH_CLAIM_TTL_MS` after
    /// `now_ms`; the same `claim` may retry). The claimer notifies, then confirms.
    ClaimPush {
        message_id: Id,
        device: Id,
        claim: u64,
        now_ms: u64,
    },
    /// The notification was handed to the platform: no claim will be granted again.
    ConfirmPush {
        message_id: Id,
        device: Id,
    },
    /// `ClaimPush` for several devices of one message in one write (the push node claims
    /// every device of a `Notify` at once, on the message's channel shard): answers
    /// `PushClaims`. At most
    /// [`PUSH_CLAIM_DEVICES_MAX`](crate::limits::PUSH_CLAIM_DEVICES_MAX) devices; repeated devices count once.
    ClaimPushes {
        message_id: Id,
        devices: Vec<Id>,
        claim: u64,
        now_ms: u64,
    },
    /// `ConfirmPush` for several devices of one message in one write; with `fanout_done`
    /// (channel, seq), also `FanoutDone` in the same write (the push node finished the last
    /// step of the message's fanout).
    ConfirmPushes {
        message_id: Id,
        devices: Vec<Id>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fanout_done: Option<(Id, u64)>,
    },
    /// Deletes the push claims of messages whose id was issued before `before_ms` (claims are
    /// kept
    /// [`PUSH_CLAIMS_KEPT_MS`](crate::kv::store::PUSH_CLAIMS_KEPT_MS), not forever), at most
    /// [`PUSH_CLAIMS_EXPIRED_PER_CALL`](crate::kv::store::PUSH_CLAIMS_EXPIRED_PER_CALL)
    /// rows per call: answers `Count` (rows deleted); the caller repeats while it gets the
    /// maximum.
    ExpirePushClaims {
        before_ms: u64,
    },
    /// idgen time lease: stores max(stored, `until_ms`) for `worker`; answers the previous
    /// value (`Id`, 0 if none).
    LeaseIdTime {
        worker: u16,
        until_ms: u64,
    },
    // ---- kv replication (node to node, and clients to a shard)
    /// A kv request for one shard, to a replica of it: its leader serves it, a follower
    /// answers `NotLeader`.
    Shard {
        shard: u32,
        req: Box<Request>,
    },
    /// Raft messages for one shard's replica on the receiving node (protobuf, base64). Answered
    /// `Ok` at once: Raft tolerates lost messages and retries by itself.
    RaftMessages {
        shard: u32,
        msgs: Vec<B64>,
    },
    /// A replica with an empty disk asks the shard's leader to add it (Raft id `id`) as a
    /// learner; once caught up it replaces the old replica of its node.
    KvJoin {
        shard: u32,
        id: u64,
    },
    /// Every shard replica on the node: role, term, leader, indexes, membership, lag.
    KvStatus,
    /// Operator's last resort after a quorum of a shard lost its disks: this replica becomes
    /// the shard's only voter (what the lost replicas alone held is gone), and the others
    /// rejoin from it. Data loss by definition; reported as such.
    KvForceRecover {
        shard: u32,
    },
    // ---- idgen
    NextId {
        /// The id must be greater than this (the channel's last id).
        after: Option<Id>,
    },
    // ---- discovery
    RegisterChat {
        info: ChatServerInfo,
    },
    PickChat {
        /// Spreads clients over lightly loaded servers.
        hint: u64,
        /// A server the client just failed to reach: picked only if it is the only one.
        #[serde(default)]
        avoid: Option<u32>,
    },
    ListChat,
    // ---- presence
    /// A chat server asks for presence changes (renewed like a lease; it lapses after
    /// `DISCOVERY_LEASE_MS`). Sent before the server accepts devices.
    SubscribePresence {
        info: ChatServerInfo,
    },
    Heartbeat {
        user: Id,
        device: Id,
        /// When the chat server received it (Unix ms). Presence counts the timeout from here,
        /// not from arrival: a heartbeat held up by a partition proves nothing about now.
        #[serde(default)]
        at_ms: u64,
    },
    Logout {
        user: Id,
        device: Id,
    },
    /// A chat server tells a presence node that is settling after a (re)start which of its
    /// devices heartbeat there, and when each last did (Unix ms; only users this node
    /// holds), in batches of at most `REASSERT_BATCH_MAX`. `done` marks the last batch: the
    /// node then counts this server as heard, and once every registered chat server is, it
    /// has settled.
    PresenceReassert {
        server: u32,
        heartbeats: Vec<(Id, Id, u64)>,
        done: bool,
    },
    PresenceOf {
        users: Vec<Id>,
    },
    // ---- chat (server to server)
    Deliver {
        devices: Vec<Id>,
        message: ChatMessage,
    },
    /// Ends the sessions of `device` of `user` (every device with `None`) on this chat
    /// server, telling each `token_revoked`: its token was just revoked.
    EndSessions {
        user: Id,
        device: Option<Id>,
    },
    /// Counters of a chat server (errors sent to devices, by code).
    ChatStats,
    /// Operation counters of a kv node since it started (`KvStats`).
    KvStats,
    /// Does this chat server hold a fresh discovery lease? (`Bool`.) A server that lost its
    /// own asks its peers, to tell "I am cut off" from "discovery is down for everyone".
    LeaseHeld,
    PresenceFanout {
        subject: Id,
        status: PresenceStatus,
        version: u64,
        observers: Vec<Id>,
    },
    // ---- push
    /// Answers `Bool(true)` when every device was handled and, as `fanout_done` asked, the
    /// message's fanout was recorded done (in the claims' confirmation: one kv write fewer);
    /// `Ok` when every device was handled and nothing more was written.
    Notify {
        message: ChatMessage,
        users: Vec<Id>,
        /// The caller delivered to every online device: record the fanout done when the push
        /// is.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fanout_done: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendOutcome {
    Committed {
        seq: u64,
        message_id: Id,
        members: Vec<Id>,
        /// True when (sender_device, client_msg_id) was already committed: this is that message.
        duplicate: bool,
        sent_at_ms: u64,
    },
    /// The id is not above the channel's last id: ask idgen for one after `last_message_id`.
    StaleId {
        last_message_id: Id,
    },
    Refused {
        code: ErrorCode,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok,
    Id(Id),
    /// `ReserveName`: whether the name was free (else `user` holds it).
    Reserved {
        fresh: bool,
        user: Id,
    },
    MaybeId(Option<Id>),
    User(Option<UserRecord>),
    Users(Vec<UserRecord>),
    Channel(Option<ChannelRecord>),
    Members(Vec<Id>),
    Append(AppendOutcome),
    Log {
        messages: Vec<ChatMessage>,
        last_seq: u64,
    },
    Cursors(BTreeMap<Id, u64>),
    /// Messages with an unfinished fanout, each with its channel's members.
    Pending(Vec<(ChatMessage, Vec<Id>)>),
    Sessions(Vec<SessionEntry>),
    Bool(bool),
    /// `ClaimPushes`: the devices this claim may notify now, and those another live claim
    /// holds (retry after it lapses). Devices already notified are in neither.
    PushClaims {
        granted: Vec<Id>,
        held: Vec<Id>,
    },
    /// How many rows a request affected.
    Count(u64),
    /// Errors sent to devices since the server started, by code.
    ErrorCounts(Vec<(ErrorCode, u64)>),
    /// A kv node's operations since it started: requests served and, of those, the ones that
    /// committed a write transaction (each an fsync when durable). Reads are the rest.
    KvStats {
        requests: u64,
        writes: u64,
        /// (operation, requests, write transactions) per request kind, by name.
        #[serde(default)]
        by_op: Vec<(String, u64, u64)>,
        /// What the node's replicas store, per redb table (summed over its replicas), as of
        /// their last commit.
        #[serde(default)]
        space: Vec<TableSpace>,
    },
    Chat(Option<ChatServerInfo>),
    ChatList(Vec<ChatServerInfo>),
    /// (user, status, version of the last change).
    Presence(Vec<(Id, PresenceStatus, u64)>),
    Error {
        code: ErrorCode,
        detail: String,
    },
    /// This replica does not lead the shard; `leader` is the node (slot) that does, if known.
    NotLeader {
        leader: Option<u32>,
    },
    KvStatus(Vec<ShardStatus>),
}

/// One shard replica as its node sees it (`KvStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: u32,
    /// This replica's Raft id (the node's slot + 1 in the low 16 bits, its incarnation above).
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `pre_candidate`, `learner`, `joining` (an empty
    /// replica not yet a member), or `failed` (storage failed; being rebuilt).
    pub role: String,
    pub term: u64,
    /// The leader's node (slot), if known.
    pub leader: Option<u32>,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// The voters (during a membership change, of the new configuration).
    pub voters: Vec<u64>,
    /// The old configuration's voters while a membership change is under way (joint
    /// consensus: both need a majority); empty otherwise.
    #[serde(default)]
    pub voters_outgoing: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: per peer id, how many entries it is behind the leader's last index.
    pub lag: Vec<(u64, u64)>,
}

/// Bytes inside a JSON frame, as a base64 string (a JSON array of numbers would be 3-4x).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct B64(pub Vec<u8>);

impl std::fmt::Debug for B64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "B64({} bytes)", self.0.len())
    }
}

impl Serialize for B64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(s.as_bytes())
            .map(B64)
            .map_err(serde::de::Error::custom)
    }
}

impl Request {
    /// A kv request that only reads: served after a read index confirms the leader holds
    /// every acknowledged write, never written to the Raft log.
    pub fn is_kv_read(&self) -> bool {
        matches!(
            self,
            Request::LookupName { .. }
                | Request::GetUser { .. }
                | Request::GetUsers { .. }
                | Request::GetChannel { .. }
                | Request::ReadLog { .. }
                | Request::ReadLogByMessageId { .. }
                | Request::PendingFanouts { .. }
                | Request::GetCursors { .. }
                | Request::GetSessions { .. }
        )
    }
}
