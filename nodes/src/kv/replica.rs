//! One shard replica: raft-rs's [`RawNode`] over the replica's log ([`LogStore`]) and state
//! machine ([`Store`]), and everything a kv node does with it. No sockets and no clock: the
//! shell feeds it requests, peer messages and ticks, and sends the messages it returns.
//!
//! - **Writes** queued together are proposed as one log entry (group commit); each caller is
//!   answered when its entry is applied, which happens only once a quorum holds it durably.
//! - **Reads** queued together take one read index: the leader confirms with a quorum that it
//!   still leads and serves them once it has applied up to that index (linearizable; a
//!   cut-off leader cannot confirm, so it serves nothing stale).
//! - A **follower** answers `NotLeader` with the leader it knows, so callers go there.
//! - **Ready** handling is split in two ([`Replica::persist`], [`Replica::finish`]): messages
//!   that may leave before persistence, then the snapshot, new entries, hard state and the
//!   applied entries written in the replica's batch transaction, committed durably when
//!   entries or the term or vote changed. raft-rs's asynchronous Ready: the shell syncs the
//!   batch off the replica's loop while the node goes on stepping messages and ticking (a
//!   slow disk does not silence its heartbeats); then the messages that needed persistence
//!   go, and callers are answered. Applies ride along with the next durable commit (or the
//!   next second's): the log holds them durably, so a crash only re-applies them, and a
//!   replica commits once per Ready instead of twice.
//! - **Membership**: a replica that starts empty asks to join (a new Raft id); the leader adds
//!   it as a learner, and once it caught up, swaps it for the old replica of its node in one
//!   joint change. The leader hands leadership to the shard's preferred replica when that one
//!   is caught up, so leaders spread over nodes.
//! - **Election timeouts** are fixed per replica (4 ticks plus 1 per rank in the shard's
//!   preference order) instead of raft-rs's random ones: raft-rs draws them from `thread_rng`,
//!   which the simulation cannot seed; distinct fixed timeouts avoid split votes just as well.
//!
//! It does not retry anything: a caller whose request could not be served is told so, and
//! retries. A storage error fails the replica (`Err`), and the node rebuilds it from peers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry,
    EntryType, Message, MessageType, Ready,
};
use raft::{RawNode, ReadOnlyOption, ReadState, SnapshotStatus, StateRole};
use tokio::sync::oneshot;

use super::placement::{raft_id, slot_of, Placement};
use super::raftlog::LogStore;
use super::store::{Store, StoreError};
use crate::canary::{Canaries, Canary};
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response, ShardStatus};

/// Where a caller's answer goes.
pub type Reply = oneshot::Sender<Response>;

/// Callers and what to answer them (in order).
type Answers = Vec<(Vec<Reply>, Vec<Response>)>;

/// How often the shell calls [`Replica::tick`]: the leader heartbeats every tick.
pub const TICK: Duration = Duration::from_millis(200);
/// A follower that hears no leader for this many ticks, plus [`RANK_TICKS`] per rank in its
/// shard's preference order, campaigns (0.8 s for the preferred replica, 1.0 s and 1.2 s
/// for the others): a leader crash costs about that much, well inside a caller's 2 s. The
/// leader lease every replica respects (it turns candidates away while it heard from a
/// leader within [`ELECTION_TICKS`]) is the same for all, so the next replica in line is not
/// held off by a later one's longer timeout.
pub const ELECTION_TICKS: usize = 4;
pub const RANK_TICKS: usize = 1;
pub const HEARTBEAT_TICKS: usize = 1;
/// Joins, replacements, leader placement, compaction and stale reads are looked after this
/// often (ticks).
const HOUSEKEEPING_TICKS: u64 = 5;
/// The leader hands leadership back to the preferred replica at most this often (ticks).
const TRANSFER_EVERY_TICKS: u64 = 25;
/// After a hand-back that did not take (the preferred replica declined: its disk is slow),
/// the next waits twice as long, up to this (ticks; 2 minutes).
const TRANSFER_BACKOFF_MAX_TICKS: u64 = 600;
/// A durable commit this slow marks the replica's disk slow for [`SLOW_FOR_TICKS`] (30 s):
/// it hands leadership away and declines it. A leader blocked on its disk sends no
/// heartbeats; every write to its shard waits for it.
pub const SLOW_SYNC: Duration = Duration::from_millis(400);
const SLOW_FOR_TICKS: u64 = 150;
/// A follower left waiting this long (ticks; 20 s) for a snapshot that was sent is reported
/// failed (see `Replica::unstick_snapshots`). Longer than any snapshot takes to send and
/// install, even on a slow disk.
const SNAPSHOT_STUCK_TICKS: u64 = 100;
/// A learner behind this long (ticks; 30 s) while its node's voter of the shard is alive and
/// caught up is removed as stale (see `Replica::remove_stale_learner`).
const STALE_LEARNER_TICKS: u64 = 150;
/// A learner this close to the leader's last index is caught up and may become a voter.
const CATCH_UP_LAG: u64 = 10;
/// The log is compacted once this many applied entries sit in it, keeping the newest
/// [`LOG_KEEP`] (a follower further behind gets a snapshot).
const COMPACT_AT: u64 = 2_000;
const LOG_KEEP: u64 = 500;
/// Reads waiting this long (ticks) for their read index are dropped: the leader could not
/// confirm it still leads; callers retry.
const READ_WAIT_TICKS: u64 = 15;
/// Bytes of entries in one append message, and append messages in flight per follower.
const MAX_MSG_BYTES: u64 = 1 << 20;
const MAX_INFLIGHT_MSGS: usize = 256;

/// Reads waiting together.
struct ReadBatch {
    reqs: Vec<(Request, Reply)>,
    asked_at_tick: u64,
}

/// What a replica asks of its node after housekeeping.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chores {
    /// The replica is not a member yet: ask the shard's leader to add it (`KvJoin`).
    pub join: bool,
}

/// The first half of a Ready, written; once the disk has it, [`Replica::finish`] completes
/// it.
pub struct Persisted {
    /// The Ready's number (raft-rs's `on_persist_ready`).
    number: u64,
    /// Messages that may leave only once the Ready is durable (a follower's acks, votes).
    messages: Vec<Message>,
    /// Callers to answer once the commit is durable (the disk wait is over).
    answers: Answers,
    /// Canary `ack-before-quorum`: the leader's own entries just written, answered at once.
    own_entries: Vec<Entry>,
    needs_sync: bool,
    /// The batch to commit durably (when `needs_sync`).
    txn: Option<redb::WriteTransaction>,
}

impl Persisted {
    /// Whether the disk must sync before [`Replica::finish`] (new entries, a snapshot, or a
    /// new term or vote were written).
    pub fn needs_sync(&self) -> bool {
        self.needs_sync
    }

    /// The write transaction holding the Ready, for [`Store::commit_durably`].
    pub fn take_txn(&mut self) -> Option<redb::WriteTransaction> {
        self.txn.take()
    }
}

pub struct Replica {
    pub shard: u32,
    id: u64,
    node: RawNode<LogStore>,
    store: Arc<Store>,
    placement: Placement,
    canaries: Canaries,
    /// Proposals waiting for their entry to apply: index -> (term proposed in, callers).
    proposals: BTreeMap<u64, (u64, Vec<Reply>)>,
    /// Reads waiting for their read index, by request context (one round in flight at a
    /// time, so reads that arrive meanwhile share the next round).
    reads: BTreeMap<u64, ReadBatch>,
    /// Reads waiting for the round in flight to finish.
    queued_reads: Vec<(Request, Reply)>,
    queued_since_tick: u64,
    /// Reads whose read index is known, waiting until it is applied.
    confirmed: Vec<(u64, ReadBatch)>,
    /// Canary `ack-before-quorum`: this leader's own entries written but not applied yet.
    speculative: Vec<Entry>,
    next_read_ctx: u64,
    ticks: u64,
    last_transfer_tick: u64,
    /// Ticks between two hand-backs to the preferred replica (doubles while they fail).
    transfer_every: u64,
    /// Followers in raft-rs's snapshot state, and the tick each was first seen there.
    snapshot_since: BTreeMap<u64, u64>,
    /// Learners suspected stale, and the tick each was first suspected.
    stale_learner_since: BTreeMap<u64, u64>,
    /// A hand-back was asked for and not seen to take yet.
    transfer_pending: bool,
    /// The disk was slow recently: until this tick the replica keeps away from leadership.
    slow_until_tick: u64,
    /// A snapshot was installed in the log store by a Ready whose sync is still in flight.
    /// raft-rs then counts the snapshot stable (`advance_append_async`) but its applied index
    /// moves only at `finish`: an election started in between reads the log from the old
    /// applied index, which the snapshot replaced, and raft-rs aborts ("unexpected error
    /// getting unapplied entries ... Compacted": swarm seed 120058 at 800 users lost a second
    /// replica of a shard to it). So the node is not ticked, and a `MsgTimeoutNow` is declined,
    /// until `finish`.
    snapshot_in_flight: bool,
    was_leader: bool,
    applied: u64,
}

impl Replica {
    /// Opens the replica of `shard` on node `slot` over `store`. A blank store (a new or
    /// wiped disk) becomes, with `bootstrap`, a first replica of a new shard; without it, a
    /// new replica with incarnation `incarnation()` that must join the shard.
    pub fn open(
        shard: u32,
        slot: u32,
        store: Arc<Store>,
        placement: Placement,
        canaries: Canaries,
        bootstrap: bool,
        incarnation: impl FnOnce() -> u64,
    ) -> Result<Self, StoreError> {
        let mut log = LogStore::open(store.clone())?;
        let id = match store.meta("self_id")? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.try_into().expect("8 bytes")),
            _ => {
                // Written durably before anything else, so a restart keeps the same id.
                let boot = bootstrap && log.is_blank();
                let id = if boot || !log.is_blank() {
                    raft_id(slot, 0)
                } else {
                    raft_id(slot, incarnation().max(1))
                };
                store.set_meta("self_id", &id.to_be_bytes())?;
                if boot {
                    log.bootstrap(placement.boot_voters(shard))?;
                }
                store.commit_batch(true)?;
                id
            }
        };
        let (applied, _) = store.applied()?;
        let rank = placement.rank(shard, slot).unwrap_or(placement.replicas) as usize;
        let election = ELECTION_TICKS + rank * RANK_TICKS;
        let cfg = raft::Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            min_election_tick: election,
            max_election_tick: election + 1,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: MAX_MSG_BYTES,
            max_inflight_msgs: MAX_INFLIGHT_MSGS,
            read_only_option: ReadOnlyOption::Safe,
            // Followers learn the commit index from the next append or heartbeat instead of a
            // message of its own: they serve no reads, so applying a little later costs
            // nothing, and it halves the messages per write.
            skip_bcast_commit: true,
            ..raft::Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&cfg, log, &logger)
            .map_err(|e| StoreError::Corrupt(format!("raft state: {e}")))?;
        Ok(Self {
            shard,
            id,
            node,
            store,
            placement,
            canaries,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            queued_reads: Vec::new(),
            queued_since_tick: 0,
            confirmed: Vec::new(),
            speculative: Vec::new(),
            next_read_ctx: 1,
            ticks: 0,
            last_transfer_tick: 0,
            transfer_every: TRANSFER_EVERY_TICKS,
            snapshot_since: BTreeMap::new(),
            stale_learner_since: BTreeMap::new(),
            transfer_pending: false,
            slow_until_tick: 0,
            snapshot_in_flight: false,
            was_leader: false,
            applied,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The node (slot) of the leader this replica knows, if any.
    pub fn leader_slot(&self) -> Option<u32> {
        let l = self.node.raft.leader_id;
        (l != raft::INVALID_ID).then(|| slot_of(l))
    }

    fn not_leader(&self) -> Response {
        let leader = self
            .leader_slot()
            .filter(|_| self.node.raft.leader_id != self.id);
        Response::NotLeader { leader }
    }

    fn is_member(&self) -> bool {
        let conf = self.node.raft.prs().conf();
        conf.voters().contains(self.id) || conf.learners().contains(&self.id)
    }

    // ------------------------------------------------------------ inputs

    /// Requests queued together: the leader proposes the writes as one entry and confirms the
    /// reads with one read index; a follower turns them away.
    pub fn submit(&mut self, batch: Vec<(Request, Reply)>) -> Result<(), StoreError> {
        let (reads, writes): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|(r, _)| r.is_kv_read());
        if !self.is_leader() {
            let stale = self.canaries.is_on(Canary::StaleRead) && self.is_member();
            for (req, reply) in reads {
                // Canary `stale-read`: any replica serves reads from what it has applied.
                let _ = reply.send(if stale {
                    self.store.read(req)?
                } else {
                    self.not_leader()
                });
            }
            for (_, reply) in writes {
                let _ = reply.send(self.not_leader());
            }
            return Ok(());
        }
        if !writes.is_empty() {
            self.propose(writes);
        }
        if !reads.is_empty() {
            if self.queued_reads.is_empty() {
                self.queued_since_tick = self.ticks;
            }
            self.queued_reads.extend(reads);
            self.start_read_round();
        }
        Ok(())
    }

    /// Confirms leadership for every queued read with one read index, unless a round is in
    /// flight (its end starts the next).
    fn start_read_round(&mut self) {
        if !self.reads.is_empty() || self.queued_reads.is_empty() {
            return;
        }
        // raft-rs silently drops a read index asked of a leader that has not committed an
        // entry of its own term yet (its empty entry commits within a round trip): asked now,
        // the round would never end, and every read of the shard would wait out
        // READ_WAIT_TICKS. The reads wait for that commit instead (each Ready retries).
        if self.is_leader() && !self.node.raft.commit_to_current_term() {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.reads.insert(
            ctx,
            ReadBatch {
                reqs: std::mem::take(&mut self.queued_reads),
                asked_at_tick: self.queued_since_tick,
            },
        );
        self.node.read_index(ctx.to_be_bytes().to_vec());
    }

    fn propose(&mut self, writes: Vec<(Request, Reply)>) {
        let (reqs, replies): (Vec<Request>, Vec<Reply>) = writes.into_iter().unzip();
        let data = serde_json::to_vec(&reqs).expect("requests serialize");
        match self.node.propose(Vec::new(), data) {
            Ok(()) => {
                let index = self.node.raft.raft_log.last_index();
                self.proposals.insert(index, (self.node.raft.term, replies));
            }
            Err(e) => {
                // Dropped: a leadership transfer is under way, or the uncommitted log is full.
                tracing::debug!(shard = self.shard, error = %e, "proposal dropped");
                for r in replies {
                    let _ = r.send(Response::NotLeader { leader: None });
                }
            }
        }
    }

    /// Raft messages from peers.
    pub fn step(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.to != self.id {
                // For an earlier incarnation of this node's replica: it is gone.
                continue;
            }
            if m.get_msg_type() == MessageType::MsgTimeoutNow && self.snapshot_in_flight {
                tracing::debug!(
                    shard = self.shard,
                    "snapshot in flight: leadership declined"
                );
                continue;
            }
            if m.get_msg_type() == MessageType::MsgTimeoutNow && self.is_slow() {
                // Leadership handed over to a replica whose disk is slow: declined (the
                // leader's transfer times out and it keeps leading).
                tracing::debug!(shard = self.shard, "slow disk: leadership declined");
                continue;
            }
            if let Err(e) = self.node.step(m) {
                tracing::trace!(shard = self.shard, error = %e, "message not stepped");
            }
        }
    }

    /// How a snapshot sent to `to` went (the leader retries a failed one).
    pub fn report_snapshot(&mut self, to: u64, ok: bool) {
        let status = if ok {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(to, status);
    }

    /// A follower the leader sent a snapshot waits in raft-rs's snapshot state, paused (no
    /// appends, and heartbeats do not resume it), until the send is reported or the follower
    /// answers. Either can be lost: the report when the replica's inbox is full, the answer
    /// when a peer queue is. A follower in that state for [`SNAPSHOT_STUCK_TICKS`] is reported
    /// failed, so the leader probes it and sends again if it must.
    fn unstick_snapshots(&mut self) {
        let now = self.ticks;
        let waiting: Vec<u64> = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == raft::ProgressState::Snapshot)
            .map(|(id, _)| *id)
            .collect();
        self.snapshot_since.retain(|id, _| waiting.contains(id));
        for id in sorted(waiting.iter().copied()) {
            let since = *self.snapshot_since.entry(id).or_insert(now);
            if now - since >= SNAPSHOT_STUCK_TICKS {
                tracing::info!(
                    shard = self.shard,
                    to = id,
                    "snapshot unanswered; trying again"
                );
                self.node.report_snapshot(id, SnapshotStatus::Failure);
                self.snapshot_since.remove(&id);
            }
        }
    }

    /// `to` could not be reached: the leader probes it instead of streaming to it.
    pub fn report_unreachable(&mut self, to: u64) {
        self.node.report_unreachable(to);
    }

    /// A replica of this shard with an empty disk asks to be added (`KvJoin`).
    pub fn join(&mut self, id: u64) -> Response {
        if !self.is_leader() {
            return self.not_leader();
        }
        let conf = self.node.raft.prs().conf();
        if conf.voters().contains(id) || conf.learners().contains(&id) {
            return Response::Ok;
        }
        if self.node.raft.has_pending_conf() || in_joint(&self.node) {
            return Response::Error {
                code: ErrorCode::Unavailable,
                detail: "a membership change is under way; ask again".into(),
            };
        }
        // An earlier joiner of the same node that never caught up (its disk went again) goes.
        let stale: Vec<u64> = sorted(conf.learners().iter().copied())
            .into_iter()
            .filter(|l| slot_of(*l) == slot_of(id))
            .collect();
        let mut changes = vec![change(ConfChangeType::AddLearnerNode, id)];
        changes.extend(stale.iter().map(|l| change(ConfChangeType::RemoveNode, *l)));
        tracing::info!(shard = self.shard, id, ?stale, "adding a learner");
        match self.propose_conf(changes) {
            Ok(()) => Response::Ok,
            Err(e) => Response::Error {
                code: ErrorCode::Unavailable,
                detail: format!("membership change refused: {e}"),
            },
        }
    }

    fn propose_conf(&mut self, changes: Vec<ConfChangeSingle>) -> raft::Result<()> {
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.set_changes(changes.into());
        self.node.propose_conf_change(Vec::new(), cc)
    }

    /// One tick of the Raft clock, and housekeeping every [`HOUSEKEEPING_TICKS`]. `syncing`:
    /// a Ready's sync is in flight, so housekeeping writes nothing (redb has one writer at a
    /// time, and the sync is it).
    pub fn tick(&mut self, syncing: bool) -> Result<Chores, StoreError> {
        if !self.snapshot_in_flight {
            self.node.tick();
        }
        self.ticks += 1;
        if !self.ticks.is_multiple_of(HOUSEKEEPING_TICKS) {
            return Ok(Chores::default());
        }
        let cutoff = self.ticks.saturating_sub(READ_WAIT_TICKS);
        // Dropping a batch drops its replies: the callers' RPCs answer `unavailable`.
        self.reads.retain(|_, b| b.asked_at_tick >= cutoff);
        if self.queued_since_tick < cutoff {
            self.queued_reads.clear();
        }
        self.start_read_round();
        if self.is_leader() {
            self.unstick_snapshots();
            self.replace_caught_up_learners();
            self.place_leadership();
        } else {
            self.snapshot_since.clear();
        }
        if !syncing {
            self.compact()?;
            // Reads and compaction leave the batch open; commit it so it never stays open
            // long.
            if self.store.has_batch() {
                self.store.commit_batch(false)?;
            }
        }
        Ok(Chores {
            join: !self.is_member(),
        })
    }

    /// A learner that caught up takes the place of its node's old replica, in one joint
    /// change (both configurations need a majority), or simply becomes a voter.
    fn replace_caught_up_learners(&mut self) {
        let raft = &self.node.raft;
        if raft.has_pending_conf() {
            return;
        }
        if in_joint(&self.node) {
            // raft-rs leaves a joint configuration by itself only on the leader that entered
            // it; a leader elected in between must, or the shard stays joint and needs a
            // majority of the old configuration too (the lost replica in it) forever.
            tracing::info!(shard = self.shard, "leaving a joint configuration");
            if let Err(e) = self.propose_conf(Vec::new()) {
                tracing::debug!(shard = self.shard, error = %e, "leave-joint not proposed");
            }
            return;
        }
        if self.remove_stale_learner() {
            return;
        }
        let raft = &self.node.raft;
        let last = raft.raft_log.last_index();
        let conf = raft.prs().conf();
        let voters = sorted(conf.voters().ids().iter());
        // Caught up, and acknowledged something: in a young log, `matched` 0 is within the lag
        // of the last index, and a learner no node runs would replace a live voter.
        let ready = sorted(conf.learners().iter().copied())
            .into_iter()
            .find(|l| {
                raft.prs()
                    .get(*l)
                    .is_some_and(|p| p.matched > 0 && p.matched + CATCH_UP_LAG >= last)
            });
        let Some(learner) = ready else { return };
        let mut changes = vec![change(ConfChangeType::AddNode, learner)];
        let old: Vec<u64> = voters
            .into_iter()
            .filter(|v| slot_of(*v) == slot_of(learner))
            .collect();
        changes.extend(old.iter().map(|v| change(ConfChangeType::RemoveNode, *v)));
        tracing::info!(
            shard = self.shard,
            learner,
            ?old,
            "promoting a caught-up learner"
        );
        if let Err(e) = self.propose_conf(changes) {
            tracing::debug!(shard = self.shard, error = %e, "promotion not proposed");
        }
    }

    /// A learner that has been behind (or never heard from) for [`STALE_LEARNER_TICKS`] while
    /// its node's voter of this shard is alive and caught up is not running anywhere: a node
    /// runs one replica per shard, and that one is the voter (the learner's join arrived after
    /// the node had come back with its old replica, or came from a rebuild that a crash
    /// undid). Nothing else would remove it. Returns whether its removal was proposed.
    fn remove_stale_learner(&mut self) -> bool {
        let raft = &self.node.raft;
        let last = raft.raft_log.last_index();
        let conf = raft.prs().conf();
        // Heard from lately and caught up (the leader counts as both).
        let me = self.id;
        let current = |id: u64| {
            id == me
                || raft.prs().get(id).is_some_and(|p| {
                    p.matched > 0 && p.recent_active && p.matched + CATCH_UP_LAG >= last
                })
        };
        let live_slots: BTreeSet<u32> = sorted(conf.voters().ids().iter())
            .into_iter()
            .filter(|v| current(*v))
            .map(slot_of)
            .collect();
        // Learners behind or unheard of: timed from when first seen so (a momentary lapse of
        // the voter's `recent_active`, reset every election timeout, does not restart it).
        let behind: Vec<u64> = sorted(conf.learners().iter().copied())
            .into_iter()
            .filter(|l| !current(*l))
            .collect();
        self.stale_learner_since.retain(|l, _| behind.contains(l));
        for l in behind {
            let since = *self.stale_learner_since.entry(l).or_insert(self.ticks);
            if self.ticks - since >= STALE_LEARNER_TICKS && live_slots.contains(&slot_of(l)) {
                self.stale_learner_since.remove(&l);
                tracing::info!(shard = self.shard, learner = l, "removing a stale learner");
                if let Err(e) = self.propose_conf(vec![change(ConfChangeType::RemoveNode, l)]) {
                    tracing::debug!(shard = self.shard, error = %e, "removal not proposed");
                }
                return true;
            }
        }
        false
    }

    /// Hands leadership to the shard's preferred replica when it is a caught-up voter, so
    /// leaders spread over nodes after failovers.
    fn place_leadership(&mut self) {
        if self.is_slow() {
            self.hand_off_leadership();
            return;
        }
        if self.ticks < self.last_transfer_tick + self.transfer_every {
            return;
        }
        if self.transfer_pending {
            // Still leading after the last hand-back: it did not take.
            self.transfer_pending = false;
            self.transfer_every = (self.transfer_every * 2).min(TRANSFER_BACKOFF_MAX_TICKS);
            return;
        }
        let preferred = self.placement.replicas_of(self.shard)[0];
        if slot_of(self.id) == preferred {
            return;
        }
        let raft = &self.node.raft;
        let last = raft.raft_log.last_index();
        let target = sorted(raft.prs().conf().voters().ids().iter())
            .into_iter()
            .find(|v| slot_of(*v) == preferred)
            .filter(|v| {
                raft.prs()
                    .get(*v)
                    .is_some_and(|p| p.matched == last && p.recent_active)
            });
        if let Some(v) = target {
            self.last_transfer_tick = self.ticks;
            self.transfer_pending = true;
            tracing::debug!(shard = self.shard, to = v, "handing leadership back");
            self.node.transfer_leader(v);
        }
    }

    /// A leader whose disk is slow hands leadership to its most caught-up live voter.
    fn hand_off_leadership(&mut self) {
        if self.node.raft.lead_transferee.is_some()
            || self.ticks < self.last_transfer_tick + TRANSFER_EVERY_TICKS
        {
            return;
        }
        self.last_transfer_tick = self.ticks;
        let raft = &self.node.raft;
        let me = self.id;
        let target = sorted(raft.prs().conf().voters().ids().iter())
            .into_iter()
            .filter(|v| *v != me)
            .filter_map(|v| raft.prs().get(v).map(|p| (v, p.matched, p.recent_active)))
            .filter(|(_, _, active)| *active)
            .max_by_key(|(v, matched, _)| (*matched, std::cmp::Reverse(*v)));
        if let Some((v, _, _)) = target {
            tracing::info!(
                shard = self.shard,
                to = v,
                "slow disk: handing leadership away"
            );
            self.node.transfer_leader(v);
        }
    }

    /// The disk was slow within the last [`SLOW_FOR_TICKS`].
    pub fn is_slow(&self) -> bool {
        self.ticks < self.slow_until_tick
    }

    /// How long the last durable commit took, Ready to disk: a slow one marks the disk slow.
    pub fn note_sync_time(&mut self, took: Duration) {
        if took >= SLOW_SYNC {
            if !self.is_slow() {
                tracing::info!(shard = self.shard, ?took, "slow disk");
            }
            self.slow_until_tick = self.ticks + SLOW_FOR_TICKS;
        }
    }

    fn compact(&mut self) -> Result<(), StoreError> {
        let first = self.node.store().first();
        if self.applied < first + COMPACT_AT {
            return Ok(());
        }
        // In the batch: durable with the next commit that must be.
        self.node.mut_store().compact(self.applied - LOG_KEEP)
    }

    // ------------------------------------------------------------ ready

    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// The first half of a Ready: returns the messages that may leave before persistence
    /// (the leader's appends) and writes the snapshot, new entries and hard state, with the
    /// committed entries applied, in the batch transaction. The node moves on at once
    /// (raft-rs's asynchronous Ready): it may step messages and tick while the disk syncs.
    /// When [`Persisted::needs_sync`], the caller commits the batch durably (off the
    /// replica's loop: [`Store::commit_durably`]), then calls [`Replica::finish`]; one Ready
    /// at a time.
    pub fn persist(&mut self) -> Result<Option<(Vec<Message>, Persisted)>, StoreError> {
        if !self.node.has_ready() {
            return Ok(None);
        }
        let mut rd = self.node.ready();
        let early = rd.take_messages();
        self.on_read_states(rd.take_read_states());
        let writes = !rd.snapshot().is_empty()
            || !rd.entries().is_empty()
            || rd.hs().is_some()
            || !rd.committed_entries().is_empty();
        let answers = if writes {
            self.persist_in_batch(&mut rd)?
        } else {
            Vec::new()
        };
        // Entries, a snapshot, or a new term or vote must be on disk before anything that
        // depends on them leaves: the persisted messages and the answers wait for the sync.
        // A Ready that only moves the commit index and applies committed entries needs none
        // (the log already holds them durably, and a crash re-applies them).
        let needs_sync = rd.must_sync() && !self.canaries.is_on(Canary::KvAckBeforeSync);
        // What needs no sync rides along in the batch until one does (one durable commit
        // per synced Ready).
        let txn = if needs_sync {
            self.store.take_batch()
        } else {
            None
        };
        let own_entries = if self.canaries.is_on(Canary::AckBeforeQuorum) {
            rd.entries().clone()
        } else {
            Vec::new()
        };
        let persisted = Persisted {
            number: rd.number(),
            messages: rd.take_persisted_messages(),
            answers,
            own_entries,
            needs_sync,
            txn,
        };
        self.node.advance_append_async(rd);
        Ok(Some((early, persisted)))
    }

    fn persist_in_batch(&mut self, rd: &mut Ready) -> Result<Answers, StoreError> {
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.node.mut_store().apply_snapshot(&snap)?;
            self.applied = snap.get_metadata().index;
            self.snapshot_in_flight = true;
            tracing::info!(
                shard = self.shard,
                index = self.applied,
                "installed a snapshot"
            );
        }
        self.node.mut_store().append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            let mut hs = hs.clone();
            if self.canaries.is_on(Canary::VolatileVote) {
                // Canary `volatile-vote`: the vote is never made durable, so a replica that
                // restarts inside a term can vote a second time in it.
                hs.vote = 0;
            }
            self.node.mut_store().set_hard_state(&hs)?;
        }
        let committed = rd.take_committed_entries();
        self.apply(committed)
    }

    /// The second half of a Ready, once the disk made the first durable: answers callers
    /// and returns the messages that needed persistence.
    pub fn finish(&mut self, p: Persisted) -> Result<Vec<Message>, StoreError> {
        let Persisted {
            number,
            messages,
            answers,
            own_entries,
            ..
        } = p;
        self.node.on_persist_ready(number);
        // Applied in `persist`; told only now, as a snapshot's index counts as applied only
        // once it is persisted.
        self.node.advance_apply_to(self.applied);
        self.snapshot_in_flight = false;
        if !own_entries.is_empty() {
            self.answer_own_entries(&own_entries)?;
        }
        deliver(answers);
        self.serve_confirmed_reads()?;
        self.on_leadership();
        self.start_read_round();
        Ok(messages)
    }

    /// The store, for the caller's sync of a Ready (see [`Replica::persist`]).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Applies committed entries inside the open batch; answers for this replica's callers.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<Answers, StoreError> {
        let mut answers = Vec::new();
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let reqs = entry_requests(&e.data, e.index)?;
                    let leader = self.is_leader();
                    let resps = if reqs.is_empty() {
                        self.store.set_applied(e.index, e.term)?;
                        Vec::new()
                    } else {
                        self.store.apply_entry(e.index, e.term, reqs, leader)?
                    };
                    if let Some((term, replies)) = self.proposals.remove(&e.index) {
                        let resps = if term == e.term {
                            resps
                        } else {
                            // Our proposal lost its place to another leader's entry.
                            vec![Response::NotLeader { leader: None }; replies.len()]
                        };
                        answers.push((replies, resps));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&e)?;
                    self.store.set_applied(e.index, e.term)?;
                }
            }
            self.applied = e.index;
        }
        Ok(answers)
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Result<(), StoreError> {
        let cs = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            self.node.apply_conf_change(&conf_change_v2(e)?)
        } else {
            self.node.apply_conf_change(&conf_change(e)?)
        };
        let cs = cs.map_err(|x| StoreError::Corrupt(format!("conf change at {}: {x}", e.index)))?;
        tracing::info!(shard = self.shard, voters = ?cs.voters, learners = ?cs.learners,
            outgoing = ?cs.voters_outgoing, "membership changed");
        self.node.mut_store().set_conf_state(cs)
    }

    /// Canary `ack-before-quorum`: the leader answers its own entries as soon as its own disk
    /// has them. The answers come from a dry run of every entry it wrote and has not applied
    /// yet, in log order, on its state, rolled back after: right as long as this leader
    /// lives; lost with it when it dies before a follower has them.
    fn answer_own_entries(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        if !self.is_leader() {
            return Ok(());
        }
        self.speculative.extend(entries.iter().cloned());
        self.speculative.retain(|e| e.index > self.applied);
        if !entries
            .iter()
            .any(|e| self.proposals.contains_key(&e.index))
        {
            return Ok(());
        }
        self.store.commit_batch(false)?;
        let mut answers = Vec::new();
        let result = (|| {
            for e in &self.speculative {
                let reqs: Vec<Request> = if e.data.is_empty()
                    || e.get_entry_type() != EntryType::EntryNormal
                {
                    Vec::new()
                } else {
                    serde_json::from_slice(&e.data)
                        .map_err(|err| StoreError::Corrupt(format!("entry {}: {err}", e.index)))?
                };
                let resps = self.store.apply_entry(e.index, e.term, reqs, false)?;
                let new = entries.iter().any(|x| x.index == e.index);
                match self.proposals.get(&e.index) {
                    Some((term, _)) if new && *term == e.term => {
                        let (_, replies) = self.proposals.remove(&e.index).expect("just seen");
                        answers.push((replies, resps));
                    }
                    _ => {}
                }
            }
            Ok::<(), StoreError>(())
        })();
        self.store.abort_batch();
        result?;
        deliver(answers);
        Ok(())
    }

    fn on_read_states(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(batch) = self.reads.remove(&u64::from_be_bytes(ctx)) {
                self.confirmed.push((rs.index, batch));
            }
        }
        // The next round starts in `finish`, after `advance`: between a Ready and its advance
        // the node must not make messages (a follower's forwarded read index would be one,
        // and raft-rs aborts on it).
    }

    fn serve_confirmed_reads(&mut self) -> Result<(), StoreError> {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.confirmed = waiting;
        for (_, batch) in ready {
            for (req, reply) in batch.reqs {
                let _ = reply.send(self.store.read(req)?);
            }
        }
        Ok(())
    }

    /// A leader that lost leadership turns away what it was waiting on: the callers retry
    /// with the new leader (a write may still commit; retries are deduplicated where it
    /// matters).
    fn on_leadership(&mut self) {
        let leader = self.is_leader();
        if self.was_leader && !leader {
            let answer = self.not_leader();
            for (_, (_, replies)) in std::mem::take(&mut self.proposals) {
                for r in replies {
                    let _ = r.send(answer.clone());
                }
            }
            let queued = ReadBatch {
                reqs: std::mem::take(&mut self.queued_reads),
                asked_at_tick: self.ticks,
            };
            let reads = std::mem::take(&mut self.reads)
                .into_values()
                .chain([queued])
                .chain(
                    std::mem::take(&mut self.confirmed)
                        .into_iter()
                        .map(|(_, b)| b),
                );
            for b in reads {
                for (_, r) in b.reqs {
                    let _ = r.send(answer.clone());
                }
            }
        }
        if leader && !self.was_leader {
            self.transfer_every = TRANSFER_EVERY_TICKS;
            self.transfer_pending = false;
        }
        self.was_leader = leader;
    }

    /// Ticks so far.
    pub fn tick_count(&self) -> u64 {
        self.ticks
    }

    /// An empty durable commit: makes every earlier commit durable (the kv-ack-before-sync
    /// canary's background sync).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.store.set_applied(self.applied, self.applied_term()?)?;
        self.store.commit_batch(true)
    }

    fn applied_term(&self) -> Result<u64, StoreError> {
        Ok(self.store.applied()?.1)
    }

    /// Operator's last resort after a quorum of the shard lost its disks: makes this replica
    /// the shard's only voter, durably, and drops log entries it does not know committed
    /// (what only the lost replicas held is gone). The replica must be reopened after this.
    pub fn force_recover(&mut self) -> Result<(), StoreError> {
        let commit = self.node.store().hard_state().commit.max(self.applied);
        tracing::warn!(
            shard = self.shard,
            id = self.id,
            commit,
            "forced recovery: this replica becomes the shard's only voter"
        );
        let log = self.node.mut_store();
        log.truncate_after(commit)?;
        log.set_conf_state(raft::prelude::ConfState {
            voters: vec![self.id],
            ..Default::default()
        })?;
        self.store.commit_batch(true)
    }

    // ------------------------------------------------------------ status

    pub fn status(&self) -> ShardStatus {
        let raft = &self.node.raft;
        let role = if !self.is_member() {
            "joining"
        } else if raft.prs().conf().learners().contains(&self.id) {
            "learner"
        } else {
            match raft.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre_candidate",
            }
        };
        let conf = raft.prs().conf();
        let cs = conf.to_conf_state();
        let last = raft.raft_log.last_index();
        let lag = if self.is_leader() {
            let mut v: Vec<(u64, u64)> = raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, p)| (*id, last.saturating_sub(p.matched)))
                .collect();
            v.sort_unstable();
            v
        } else {
            Vec::new()
        };
        ShardStatus {
            shard: self.shard,
            id: self.id,
            role: role.into(),
            term: raft.term,
            leader: self.leader_slot(),
            commit: raft.raft_log.committed,
            applied: self.applied,
            first_index: self.node.store().first(),
            last_index: last,
            voters: sorted(cs.voters.iter().copied()),
            voters_outgoing: sorted(cs.voters_outgoing.iter().copied()),
            learners: sorted(conf.learners().iter().copied()),
            lag,
        }
    }
}

/// The membership is between two configurations (a joint change not yet left).
fn in_joint(node: &RawNode<LogStore>) -> bool {
    !node
        .raft
        .prs()
        .conf()
        .to_conf_state()
        .voters_outgoing
        .is_empty()
}

fn change(t: ConfChangeType, id: u64) -> ConfChangeSingle {
    let mut c = ConfChangeSingle::default();
    c.set_change_type(t);
    c.node_id = id;
    c
}

/// Ids in order (raft-rs keeps them in hash sets).
fn sorted(ids: impl Iterator<Item = u64>) -> Vec<u64> {
    ids.collect::<BTreeSet<u64>>().into_iter().collect()
}

fn deliver(answers: Answers) {
    for (replies, resps) in answers {
        for (r, resp) in replies.into_iter().zip(resps) {
            let _ = r.send(resp);
        }
    }
}

/// The requests of a normal log entry's payload (none when empty).
pub fn entry_requests(data: &[u8], index: u64) -> Result<Vec<Request>, StoreError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(data).map_err(|err| StoreError::Corrupt(format!("entry {index}: {err}")))
}

fn conf_change(e: &Entry) -> Result<ConfChange, StoreError> {
    ConfChange::parse_from_bytes(&e.data)
        .map_err(|x| StoreError::Corrupt(format!("conf change at {}: {x}", e.index)))
}

fn conf_change_v2(e: &Entry) -> Result<ConfChangeV2, StoreError> {
    ConfChangeV2::parse_from_bytes(&e.data)
        .map_err(|x| StoreError::Corrupt(format!("conf change at {}: {x}", e.index)))
}

/// Decodes a stored (or received) Raft log entry down to what applying it reads: the entry,
/// then its requests or its membership change.
pub fn decode_log_entry(bytes: &[u8]) -> Result<(), StoreError> {
    let e = Entry::parse_from_bytes(bytes)
        .map_err(|x| StoreError::Corrupt(format!("log entry: {x}")))?;
    match e.get_entry_type() {
        EntryType::EntryNormal => entry_requests(&e.data, e.index).map(drop),
        EntryType::EntryConfChange => conf_change(&e).map(drop),
        EntryType::EntryConfChangeV2 => conf_change_v2(&e).map(drop),
    }
}

#[cfg(test)]
mod tests {
    //! A three-replica shard driven by hand: messages are moved between replicas in order,
    //! time is ticks. No runtime, no sockets.

    use std::collections::VecDeque;

    use super::*;
    use crate::kv::disk::SimDisk;
    use crate::proto::internal::{ChannelKind, ChannelRecord};

    struct Net {
        placement: Placement,
        disks: BTreeMap<u32, Arc<SimDisk>>,
        replicas: BTreeMap<u32, Replica>,
        queue: VecDeque<Message>,
        /// Slots whose messages are dropped both ways.
        cut: BTreeSet<u32>,
        /// The first message this matches is lost.
        lose_once: Option<fn(&Message) -> bool>,
    }

    fn open(disk: &Arc<SimDisk>, slot: u32, p: Placement, boot: bool, inc: u64) -> Replica {
        let db = redb::Database::builder()
            .create_with_backend(disk.backend("shard-0"))
            .unwrap();
        let store = Arc::new(Store::open(db).unwrap());
        Replica::open(0, slot, store, p, Canaries::none(), boot, || inc).unwrap()
    }

    impl Net {
        fn new(n: u32) -> Net {
            let placement = Placement::new(n, 1, n).unwrap();
            let mut net = Net {
                placement,
                disks: BTreeMap::new(),
                replicas: BTreeMap::new(),
                queue: VecDeque::new(),
                cut: BTreeSet::new(),
                lose_once: None,
            };
            for slot in 0..n {
                let disk = SimDisk::new();
                net.replicas
                    .insert(slot, open(&disk, slot, placement, true, 0));
                net.disks.insert(slot, disk);
            }
            net
        }

        /// Runs every replica's Ready and delivers messages until nothing moves.
        fn settle(&mut self) {
            for _ in 0..1000 {
                let mut moved = false;
                for r in self.replicas.values_mut() {
                    while let Some((early, mut p)) = r.persist().unwrap() {
                        self.queue.extend(early);
                        if p.needs_sync() {
                            let txn = p.take_txn();
                            r.store().commit_durably(txn).unwrap();
                        }
                        self.queue.extend(r.finish(p).unwrap());
                        moved = true;
                    }
                }
                while let Some(m) = self.queue.pop_front() {
                    moved = true;
                    let (from, to) = (slot_of(m.from), slot_of(m.to));
                    if self.cut.contains(&from) || self.cut.contains(&to) {
                        continue;
                    }
                    if self.lose_once.is_some_and(|lose| lose(&m)) {
                        self.lose_once = None;
                        continue;
                    }
                    if let Some(r) = self.replicas.get_mut(&to) {
                        r.step(vec![m]);
                    }
                }
                if !moved {
                    return;
                }
            }
            panic!("the shard never settled");
        }

        fn ticks(&mut self, n: usize) -> Vec<u32> {
            let mut joiners = Vec::new();
            for _ in 0..n {
                for (slot, r) in self.replicas.iter_mut() {
                    if r.tick(false).unwrap().join {
                        joiners.push(*slot);
                    }
                }
                self.settle();
            }
            joiners
        }

        fn leader(&self) -> Option<u32> {
            self.replicas
                .iter()
                .find(|(s, r)| r.is_leader() && !self.cut.contains(s))
                .map(|(s, _)| *s)
        }

        /// Sends one request to `slot` and runs until it is answered.
        fn call(&mut self, slot: u32, req: Request) -> Response {
            let (tx, mut rx) = oneshot::channel();
            self.replicas
                .get_mut(&slot)
                .unwrap()
                .submit(vec![(req, tx)])
                .unwrap();
            for _ in 0..50 {
                self.settle();
                if let Ok(r) = rx.try_recv() {
                    return r;
                }
                self.ticks(1);
            }
            panic!("no answer from {slot}");
        }
    }

    fn create(channel: u64) -> Request {
        Request::CreateChannel {
            record: ChannelRecord {
                channel,
                kind: ChannelKind::Group,
                name: "g".into(),
                members: vec![1],
                last_seq: 0,
                last_message_id: 0,
            },
        }
    }

    // Proves the preferred replica is elected, writes commit and apply on every replica,
    // followers redirect to the leader, and reads are served by the leader after a read index.
    #[test]
    fn elects_the_preferred_leader_and_replicates() {
        let mut net = Net::new(3);
        net.ticks(20);
        assert_eq!(
            net.leader(),
            Some(0),
            "slot 0 has the shortest election timeout"
        );
        assert_eq!(net.call(0, create(7)), Response::Members(vec![1]));
        assert_eq!(
            net.call(1, create(8)),
            Response::NotLeader { leader: Some(0) }
        );
        assert!(matches!(
            net.call(0, Request::GetChannel { channel: 7 }),
            Response::Channel(Some(_))
        ));
        net.ticks(5);
        for r in net.replicas.values() {
            assert!(matches!(
                r.store.read(Request::GetChannel { channel: 7 }).unwrap(),
                Response::Channel(Some(_))
            ));
        }
    }

    // Proves a cut-off leader answers no write (it cannot reach a quorum) and steps down,
    // the majority elects a new leader that serves, and the old leader catches up on heal.
    #[test]
    fn a_cut_off_leader_acknowledges_nothing() {
        let mut net = Net::new(3);
        net.ticks(20);
        net.cut.insert(0);
        let (tx, mut rx) = oneshot::channel();
        net.replicas
            .get_mut(&0)
            .unwrap()
            .submit(vec![(create(9), tx)])
            .unwrap();
        net.ticks(30);
        match rx.try_recv() {
            Ok(Response::NotLeader { .. }) | Err(_) => {}
            Ok(other) => panic!("a cut-off leader acknowledged a write: {other:?}"),
        }
        assert!(
            !net.replicas[&0].is_leader(),
            "it stepped down (check quorum)"
        );
        let new = net.leader().expect("the majority elected a leader");
        assert_ne!(new, 0);
        assert_eq!(net.call(new, create(10)), Response::Members(vec![1]));
        net.cut.clear();
        net.ticks(80);
        assert!(matches!(
            net.replicas[&0]
                .store
                .read(Request::GetChannel { channel: 10 })
                .unwrap(),
            Response::Channel(Some(_))
        ));
    }

    // Proves a read asked of a new leader before its term's first entry commits is served
    // once it commits (within a tick), not dropped: raft-rs ignores a read index asked that
    // early, and the round used to block every read of the shard for READ_WAIT_TICKS.
    #[test]
    fn a_new_leader_serves_reads_asked_before_its_first_commit() {
        let mut net = Net::new(3);
        net.ticks(20);
        assert_eq!(net.call(0, create(7)), Response::Members(vec![1]));
        net.cut.insert(0);
        // Tick without settling: step messages one at a time until a new leader exists that
        // has not committed in its term.
        let mut asked = None;
        'outer: for _ in 0..40 {
            for r in net.replicas.values_mut() {
                r.tick(false).unwrap();
            }
            for _ in 0..1000 {
                let mut moved = false;
                for (slot, r) in net.replicas.iter_mut() {
                    if *slot != 0 && r.is_leader() && !r.node.raft.commit_to_current_term() {
                        let (tx, rx) = oneshot::channel();
                        r.submit(vec![(Request::GetChannel { channel: 7 }, tx)])
                            .unwrap();
                        asked = Some((*slot, rx));
                        break 'outer;
                    }
                    if let Some((early, mut p)) = r.persist().unwrap() {
                        net.queue.extend(early);
                        if p.needs_sync() {
                            r.store().commit_durably(p.take_txn()).unwrap();
                        }
                        net.queue.extend(r.finish(p).unwrap());
                        moved = true;
                    }
                }
                if let Some(m) = net.queue.pop_front() {
                    moved = true;
                    let (from, to) = (slot_of(m.from), slot_of(m.to));
                    if !net.cut.contains(&from) && !net.cut.contains(&to) {
                        net.replicas.get_mut(&to).unwrap().step(vec![m]);
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let (leader, mut rx) = asked.expect("a new leader was caught before its first commit");
        net.settle();
        net.ticks(1);
        match rx.try_recv() {
            Ok(Response::Channel(Some(_))) => {}
            other => panic!("the read asked of new leader {leader} was not served: {other:?}"),
        }
    }

    // Proves a replica whose disk is wiped rejoins with a new id, catches up from a snapshot
    // after the log was compacted, and replaces its old self in the membership.
    #[test]
    fn a_wiped_replica_rejoins_from_a_snapshot() {
        rejoin_from_a_snapshot(None);
    }

    // Proves a rejoining replica whose answer to the snapshot is lost (and no report of the
    // send comes) still catches up: the leader gives up waiting after SNAPSHOT_STUCK_TICKS
    // and probes it again. Without that, raft-rs keeps it paused for good.
    #[test]
    fn a_lost_answer_to_a_snapshot_does_not_stall_the_rejoin() {
        rejoin_from_a_snapshot(Some(|m: &Message| {
            slot_of(m.from) == 2
                && m.get_msg_type() == MessageType::MsgAppendResponse
                && !m.reject
                && m.index > 1_000
        }));
    }

    // Proves a learner that no node runs (its node's voter is alive and caught up) is never
    // promoted over the live voter, even in a log shorter than CATCH_UP_LAG, and is removed
    // after STALE_LEARNER_TICKS, not before.
    #[test]
    fn a_learner_no_node_runs_is_removed() {
        let mut net = Net::new(3);
        net.ticks(20);
        let phantom = raft_id(2, 99);
        assert_eq!(
            net.replicas.get_mut(&0).unwrap().join(phantom),
            Response::Ok
        );
        net.ticks(10);
        let s = net.replicas[&0].status();
        assert_eq!(s.learners, vec![phantom], "{s:?}");
        net.ticks(STALE_LEARNER_TICKS as usize - 20);
        assert_eq!(net.replicas[&0].status().learners, vec![phantom], "not yet");
        net.ticks(40);
        let s = net.replicas[&0].status();
        assert!(s.learners.is_empty(), "removed: {s:?}");
        assert_eq!(s.voters.len(), 3, "{s:?}");
    }

    // Proves a follower that installs a snapshot survives election ticks (and a leadership
    // handover) while the snapshot's sync is still in flight, then catches up: raft-rs counts
    // the snapshot stable before its applied index moves, and an election started then read
    // the log from below the snapshot and aborted (swarm seed 120058 at 800 users).
    #[test]
    fn election_ticks_while_a_snapshot_syncs_do_not_abort() {
        let mut net = Net::new(3);
        net.ticks(20);
        net.cut.insert(2);
        for c in 0..(COMPACT_AT + 100) {
            let r = net.call(0, create(100_000 + c));
            assert!(matches!(r, Response::Members(_)), "{r:?}");
        }
        net.ticks(20);
        assert!(net.replicas[&0].node.store().first() > net.replicas[&2].applied + 1);
        net.cut.clear();
        // Deliver messages, running the others' Readies to the end, until the follower has a
        // Ready carrying the snapshot; hold its sync.
        let mut held = None;
        'outer: for _ in 0..200 {
            for r in net.replicas.values_mut() {
                r.tick(false).unwrap();
            }
            for _ in 0..1000 {
                let mut moved = false;
                for (slot, r) in net.replicas.iter_mut() {
                    if let Some((early, mut p)) = r.persist().unwrap() {
                        net.queue.extend(early);
                        if *slot == 2 && r.snapshot_in_flight {
                            held = Some(p);
                            break 'outer;
                        }
                        if p.needs_sync() {
                            r.store().commit_durably(p.take_txn()).unwrap();
                        }
                        net.queue.extend(r.finish(p).unwrap());
                        moved = true;
                    }
                }
                if let Some(m) = net.queue.pop_front() {
                    moved = true;
                    net.replicas.get_mut(&slot_of(m.to)).unwrap().step(vec![m]);
                }
                if !moved {
                    break;
                }
            }
        }
        let mut p = held.expect("the follower got a snapshot");
        let follower = net.replicas.get_mut(&2).unwrap();
        // Far past any election timeout, and a leadership handover: no abort.
        for _ in 0..100 {
            follower.tick(true).unwrap();
        }
        let mut timeout_now = Message::default();
        timeout_now.set_msg_type(MessageType::MsgTimeoutNow);
        timeout_now.from = follower.node.raft.leader_id;
        timeout_now.to = follower.id;
        timeout_now.term = follower.node.raft.term;
        follower.step(vec![timeout_now]);
        assert!(!follower.is_leader());
        if p.needs_sync() {
            follower.store().commit_durably(p.take_txn()).unwrap();
        }
        let msgs = follower.finish(p).unwrap();
        net.queue.extend(msgs);
        net.ticks(60);
        let last = 100_000 + COMPACT_AT + 99;
        assert!(
            matches!(
                net.replicas[&2]
                    .store
                    .read(Request::GetChannel { channel: last })
                    .unwrap(),
                Response::Channel(Some(_))
            ),
            "the follower caught up"
        );
    }

    // Proves a follower cut off twice, each time past a compaction, catches up both times:
    // the second snapshot is made anew, not the leader's cached first one, which no longer
    // reaches its compacted log (the follower would be sent it forever).
    #[test]
    fn a_follower_behind_a_second_compaction_catches_up() {
        let mut net = Net::new(3);
        net.ticks(20);
        for round in 1..=2u64 {
            net.cut.insert(2);
            for c in 0..(COMPACT_AT + 100) {
                let r = net.call(0, create(round * 100_000 + c));
                assert!(matches!(r, Response::Members(_)), "{r:?}");
            }
            net.ticks(20);
            let compacted = net.replicas[&0].node.store().first();
            assert!(
                compacted > net.replicas[&2].applied + 1,
                "round {round}: compacted past it"
            );
            net.cut.clear();
            net.ticks(60);
            let last = round * 100_000 + COMPACT_AT + 99;
            assert!(
                matches!(
                    net.replicas[&2]
                        .store
                        .read(Request::GetChannel { channel: last })
                        .unwrap(),
                    Response::Channel(Some(_))
                ),
                "round {round}: the follower caught up"
            );
        }
    }

    fn rejoin_from_a_snapshot(lose_once: Option<fn(&Message) -> bool>) {
        let mut net = Net::new(3);
        net.ticks(20);
        for c in 0..(COMPACT_AT + 100) {
            assert!(matches!(net.call(0, create(100 + c)), Response::Members(_)));
        }
        net.ticks(20);
        assert!(net.replicas[&0].node.store().first() > 1_000, "compacted");
        // Slot 2 loses its disk and comes back empty.
        net.replicas.remove(&2);
        net.disks[&2].wipe();
        let r = open(&net.disks[&2], 2, net.placement, false, 77);
        let new_id = r.id();
        assert_eq!(new_id, raft_id(2, 77));
        net.replicas.insert(2, r);
        net.lose_once = lose_once;
        for _ in 0..30 {
            for slot in net.ticks(10) {
                let id = net.replicas[&slot].id();
                let leader = net.leader().unwrap();
                let _ = net.replicas.get_mut(&leader).unwrap().join(id);
            }
        }
        assert!(
            net.lose_once.is_none(),
            "the answer to the snapshot was lost"
        );
        let s = net.replicas[&0].status();
        assert!(s.voters.contains(&new_id), "promoted: {s:?}");
        assert!(
            !s.voters.contains(&raft_id(2, 0)),
            "the old replica is gone: {s:?}"
        );
        assert!(matches!(
            net.replicas[&2]
                .store
                .read(Request::GetChannel { channel: 150 })
                .unwrap(),
            Response::Channel(Some(_))
        ));
    }
}
