//! The kv store proper: typed operations over redb tables, each one transaction.
//!
//! I/O-free apart from the storage backend: [`Store::apply`] takes a [`Request`] and returns the
//! [`Response`]; the server shell only moves frames. Writes are group-committed:
//! [`Store::apply_batch`] runs a batch of requests in order in one write transaction and
//! commits it durably (one fsync) before any answer leaves, so an answered write survives a
//! crash and throughput is not bound by one fsync per write. [`Store::apply`] is a batch of one.
//!
//! One transaction per batch rather than a non-durable commit per request and an empty durable
//! commit after them: fewer commits, and a smaller file (the capacity run, `peak-hour` at 2,000
//! users, grew the database by 6,521 bytes per message that way, 5,349 with one transaction
//! per batch, and 1,815 with one durable commit per request before group commit, all on file
//! length: redb doubles a small file when it grows and seldom shrinks it, so over a short
//! window file growth is a step function; [`Store::space`] measures the tables' pages
//! instead, and the capacity report prints both). Every operation checks
//! and refuses before it writes, so a refusal leaves nothing behind in the shared transaction;
//! a storage error aborts the batch.
//!
//! Atomic server-side operations (like Redis commands) keep invariants in one place:
//! `Append` checks membership, size and dedup, refuses an id not above the channel's last one,
//! and assigns the channel's next `seq`, all in one transaction.
//!
//! Replicated, the store is a shard replica's state machine: [`Store::apply_entry`] runs one
//! committed Raft log entry (a batch of write requests) inside the replica's open batch
//! transaction and records the entry as applied in the same transaction, so a restart resumes
//! exactly after the last applied entry. Every replica applies the same entries in the same
//! order with the same transaction boundaries, so every replica computes the same state (no
//! operation reads a clock or an RNG: times come in the requests). Reads are served by
//! [`Store::read`] from committed state. [`Store::dump`] and [`Store::restore`] move the whole
//! state as a snapshot. The database also holds the replica's Raft log (`raftlog`), in tables
//! of its own, so a log append and an apply can share one commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::limits::{
    CHANNELS_PER_USER_MAX, CURSOR_BATCH_DEVICES_MAX, CURSOR_BATCH_PAIRS_MAX, DEVICES_PER_USER_MAX,
    FRIENDS_PER_USER_MAX, GROUP_MEMBERS_MAX, MESSAGE_CHARS_MAX, PUSH_CLAIM_DEVICES_MAX,
};
use crate::proto::client::{ChatMessage, ErrorCode, PushTarget};
use crate::proto::internal::{
    AppendOutcome, AppendRequest, ChannelKind, ChannelRecord, Request, Response, SessionEntry,
    UserRecord,
};
use crate::proto::Id;

const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NAMES: TableDefinition<&str, u64> = TableDefinition::new("names");
const USERS: TableDefinition<u64, &[u8]> = TableDefinition::new("users");
const CHANNELS: TableDefinition<u64, &[u8]> = TableDefinition::new("channels");
/// (channel, seq) -> message.
const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("log");
/// (channel, sender_device, client_msg_id) -> seq: a retried send is one message.
const DEDUP: TableDefinition<(u64, u64, u64), u64> = TableDefinition::new("dedup");
/// (device, channel) -> seq the device has processed.
const CURSORS: TableDefinition<(u64, u64), u64> = TableDefinition::new("cursors");
/// (user, device) -> session entry.
const SESSIONS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sessions");
const LAST_ACTIVE: TableDefinition<u64, u64> = TableDefinition::new("last_active");
/// (channel, seq) -> commit time (ms) of messages whose fanout is not finished: written in the
/// commit's transaction, removed by `FanoutDone`, swept by chat servers after a crash.
const PENDING: TableDefinition<(u64, u64), u64> = TableDefinition::new("pending_fanout");
/// (message, device) -> (claim, claimed at ms); claimed at `u64::MAX` means notified. Rows
/// live on the message's channel shard and are deleted [`PUSH_CLAIMS_KEPT_MS`] after the
/// message (`ExpirePushClaims`).
const PUSHED: TableDefinition<(u64, u64), (u64, u64)> = TableDefinition::new("push_claims");
/// The replica's own bookkeeping: `applied` (index, term of the last applied log entry),
/// `conf_state` (the Raft membership as of it), `self_id` (this replica's Raft id).
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("replica_meta");
/// How long a push claim keeps others out (its holder may have died before notifying).
pub const PUSH_CLAIM_TTL_MS: u64 = 60_000;
/// How long push claims are kept after their message was sent. Push nodes notify nobody of a
/// message older than `push::server::PUSH_STALE_MS` (1 h), so a claim deleted after 6 h can
/// never be needed again, whatever clocks skew by (the simulation steps clocks by at most
/// 30 s).
pub const PUSH_CLAIMS_KEPT_MS: u64 = 6 * 3_600_000;
/// Rows one `ExpirePushClaims` deletes at most (one Raft entry stays small).
pub const PUSH_CLAIMS_EXPIRED_PER_CALL: usize = 10_000;

type R<T> = Result<T, redb::Error>;

/// A storage failure under a replica: the replica cannot go on with this database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A read failed its checksum or redb found its structures corrupt: the data cannot be
    /// trusted, and the replica must be rebuilt from its peers.
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    /// Any other I/O or database failure.
    #[error("storage failed: {0}")]
    Io(String),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        let corrupt = match &e {
            redb::Error::Corrupted(_) => true,
            redb::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
            _ => false,
        };
        if corrupt {
            StoreError::Corrupt(e.to_string())
        } else {
            StoreError::Io(e.to_string())
        }
    }
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
            }
        }
    )*};
}
store_error_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// Decodes a stored record. A record that does not decode is corrupt storage (bit rot that
/// got past the disk's checks, or a bug): an error that fails the replica, never a panic.
fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> R<T> {
    decode_record(b)
}

/// The first byte of a log row in [`LogRow`]'s encoding. Rows written before it are JSON
/// (`{...}`), which never starts with this byte, so both decode.
const LOG_ROW_POSTCARD: u8 = 0;

/// A message as its log row stores it: everything but the key's (channel, seq), postcard
/// (varints, no field names) behind [`LOG_ROW_POSTCARD`]. About 35 B besides the text, where
/// the JSON record was about 190 (measured in `log_rows_are_compact`).
#[derive(serde::Serialize, serde::Deserialize)]
struct LogRow<'a> {
    message_id: Id,
    sender: Id,
    sender_device: Id,
    client_msg_id: Id,
    sent_at_ms: u64,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

/// Encodes a message for its log row.
pub fn encode_message(m: &ChatMessage) -> Vec<u8> {
    let row = LogRow {
        message_id: m.message_id,
        sender: m.sender,
        sender_device: m.sender_device,
        client_msg_id: m.client_msg_id,
        sent_at_ms: m.sent_at_ms,
        text: std::borrow::Cow::Borrowed(&m.text),
    };
    let out = vec![LOG_ROW_POSTCARD];
    postcard::to_extend(&row, out).expect("log rows serialize")
}

/// Decodes the log row at `(channel, seq)`, in either encoding.
pub fn decode_message((channel, seq): (Id, u64), b: &[u8]) -> Result<ChatMessage, redb::Error> {
    match b.split_first() {
        Some((&LOG_ROW_POSTCARD, rest)) => {
            let row: LogRow<'_> = postcard::from_bytes(rest).map_err(|e| {
                redb::Error::Corrupted(format!("a stored log row does not decode: {e}"))
            })?;
            Ok(ChatMessage {
                channel,
                seq,
                message_id: row.message_id,
                sender: row.sender,
                sender_device: row.sender_device,
                client_msg_id: row.client_msg_id,
                text: row.text.into_owned(),
                sent_at_ms: row.sent_at_ms,
            })
        }
        _ => {
            let m: ChatMessage = decode_record(b)?;
            if (m.channel, m.seq) != (channel, seq) {
                return Err(redb::Error::Corrupted(format!(
                    "log row ({channel}, {seq}) holds message ({}, {})",
                    m.channel, m.seq
                )));
            }
            Ok(m)
        }
    }
}

/// Decodes a stored record (a user, channel, message or session row).
pub fn decode_record<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, redb::Error> {
    serde_json::from_slice(b)
        .map_err(|e| redb::Error::Corrupted(format!("a stored record does not decode: {e}")))
}

fn channels_full() -> (ErrorCode, String) {
    (
        ErrorCode::LimitReached,
        format!("at most {CHANNELS_PER_USER_MAX} channels (1:1 and groups) per user"),
    )
}

fn refuse(code: ErrorCode, detail: impl Into<String>) -> Response {
    Response::Error {
        code,
        detail: detail.into(),
    }
}

/// One shard replica's database.
pub struct Store {
    db: Database,
    /// Requests and write operations are counted (the shard's leader counts; followers
    /// applying the same entries do not, so the counters are the shard's logical load).
    counting: std::sync::atomic::AtomicBool,
    /// Each batch fsyncs before it is answered (always, except under the kv-ack-before-sync
    /// canary).
    durable: bool,
    /// Requests served (`KvStats` itself not counted).
    requests: AtomicU64,
    /// Write operations by requests (each a part of its batch's one transaction).
    writes: AtomicU64,
    /// Durable commits (fsyncs) that made batches of writes durable.
    syncs: AtomicU64,
    /// Per operation: (requests, write operations). A std mutex: short, synchronous updates.
    by_op: std::sync::Mutex<BTreeMap<&'static str, (u64, u64)>>,
    /// The write transaction of the batch being applied, opened by its first write. A std
    /// mutex: held by one request at a time within `apply_batch`, never across an await.
    batch: std::sync::Mutex<Option<redb::WriteTransaction>>,
}

/// A request's view of the batch's write transaction. `commit` does nothing: the batch
/// commits as a whole in `apply_batch`.
pub(crate) struct Txn<'a>(std::sync::MutexGuard<'a, Option<redb::WriteTransaction>>);

impl std::ops::Deref for Txn<'_> {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &redb::WriteTransaction {
        self.0
            .as_ref()
            .expect("begin_write opened the batch's transaction")
    }
}

impl Txn<'_> {
    fn commit(self) -> R<()> {
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) the store and its tables.
    pub fn open(db: Database) -> R<Self> {
        let txn = db.begin_write()?;
        txn.open_table(COUNTERS)?;
        txn.open_table(NAMES)?;
        txn.open_table(USERS)?;
        txn.open_table(CHANNELS)?;
        txn.open_table(LOG)?;
        txn.open_table(DEDUP)?;
        txn.open_table(CURSORS)?;
        txn.open_table(SESSIONS)?;
        txn.open_table(LAST_ACTIVE)?;
        txn.open_table(PUSHED)?;
        txn.open_table(PENDING)?;
        txn.open_table(META)?;
        crate::kv::raftlog::create_tables(&txn)?;
        txn.commit()?;
        Ok(Self {
            db,
            counting: std::sync::atomic::AtomicBool::new(true),
            durable: true,
            requests: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            by_op: std::sync::Mutex::new(BTreeMap::new()),
            batch: std::sync::Mutex::new(None),
        })
    }

    /// Whether commits fsync before they are acknowledged. Only the kv-ack-before-sync canary
    /// turns this off.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Takes the open batch transaction out, for [`Store::commit_durably`].
    pub(crate) fn take_batch(&self) -> Option<redb::WriteTransaction> {
        self.batch.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Commits a batch taken with [`Store::take_batch`] durably (redb's fsync). Blocks for
    /// the disk, so the replica's loop runs it on a blocking thread and goes on stepping
    /// meanwhile (redb has one writer at a time: nothing else writes until it is done).
    pub fn commit_durably(&self, txn: Option<redb::WriteTransaction>) -> R<()> {
        let Some(mut txn) = txn else {
            return Ok(());
        };
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A durable (fsync'd) empty commit: makes every earlier commit durable.
    pub fn sync(&self) -> R<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The node's counters (`KvStats`), without touching the batch transaction.
    pub fn stats(&self) -> Response {
        self.apply_one(Request::KvStats).0
    }

    /// Durable commits (fsyncs) so far: each made one batch of writes durable.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Executes one request and makes its writes durable before returning.
    pub fn apply(&self, req: Request) -> Response {
        self.apply_batch(vec![req])
            .pop()
            .expect("one answer per request")
    }

    /// Executes requests in order in one write transaction, then commits it with one fsync
    /// (group commit). Answers come back in request order and must not be sent before this
    /// returns. Each request sees the writes of those before it. If any request hits a storage
    /// error, or the commit fails, the batch is aborted and every answer is `unavailable`
    /// (nothing is acknowledged that may not be on disk; the callers retry).
    pub fn apply_batch(&self, reqs: Vec<Request>) -> Vec<Response> {
        let writes_before = self.writes.load(Ordering::Relaxed);
        let mut failed = None;
        let mut out: Vec<Response> = reqs
            .into_iter()
            .map(|r| {
                let (resp, err) = self.apply_one(r);
                if failed.is_none() {
                    failed = err;
                }
                resp
            })
            .collect();
        let result = match failed {
            // Only reads: nothing to commit.
            None if self.writes.load(Ordering::Relaxed) == writes_before => {
                self.abort_batch();
                Ok(())
            }
            None => self
                .commit_batch(self.durable)
                .map_err(|e| format!("commit failed: {e}")),
            Some(e) => {
                // Dropping an uncommitted transaction aborts it.
                self.abort_batch();
                Err(e.to_string())
            }
        };
        if let Err(e) = result {
            let detail = format!("storage: {e}; nothing of this batch was stored");
            for r in &mut out {
                *r = refuse(ErrorCode::Unavailable, detail.clone());
            }
        }
        out
    }

    // ------------------------------------------------------------ as a replica's state machine

    /// Commits the batch transaction, if one is open. `durable`: the commit fsyncs (and
    /// makes every earlier commit durable too); a replica commits durably when its Raft log
    /// or hard state must be on disk, and otherwise lets applies ride along (the log holds
    /// them durably, and a restart re-applies them).
    pub(crate) fn commit_batch(&self, durable: bool) -> Result<(), StoreError> {
        let txn = self.batch.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut txn) = txn {
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(|e| StoreError::Io(e.to_string()))?;
            txn.commit()?;
            if durable {
                self.syncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Whether a batch transaction is open (uncommitted writes or reads through it).
    pub(crate) fn has_batch(&self) -> bool {
        self.batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Drops the open batch transaction uncommitted.
    pub(crate) fn abort_batch(&self) {
        self.batch.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The batch transaction, opened if none is: reads and writes of a replica go through it,
    /// so a read sees every entry applied so far, committed or not.
    pub(crate) fn batch(&self) -> Result<Txn<'_>, StoreError> {
        Ok(self.txn()?)
    }

    fn txn(&self) -> R<Txn<'_>> {
        let mut batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.is_none() {
            *batch = Some(self.db.begin_write()?);
        }
        Ok(Txn(batch))
    }

    /// A read transaction on committed state.
    pub(crate) fn read_txn(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }

    /// Every table's size as of the last commit (a read transaction: it waits for nobody).
    /// It walks every page of every table: a cost in proportion to the database, for a
    /// measurement's start and end (`KvStats`), not for frequent scraping.
    pub fn space(&self) -> Result<Vec<crate::proto::internal::TableSpace>, StoreError> {
        use redb::{ReadableTableMetadata, TableHandle};
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for handle in txn.list_tables()? {
            let name = handle.name().to_string();
            let stats = txn.open_untyped_table(handle)?.stats()?;
            // Every byte of every page of the tree, large-value pages (several 4 KiB pages
            // each) included: what redb's walk splits into data, overhead and free space.
            let page_bytes =
                stats.stored_bytes() + stats.metadata_bytes() + stats.fragmented_bytes();
            out.push(crate::proto::internal::TableSpace {
                table: name,
                stored_bytes: stats.stored_bytes(),
                page_bytes,
            });
        }
        Ok(out)
    }

    /// Runs one committed log entry's write requests, in order, inside the open batch, and
    /// records `(index, term)` as applied in it. `count`: this replica leads the shard (its
    /// counters are the shard's). A request refused by its own rules answers with its error
    /// and writes nothing; a storage error fails the entry (and the replica).
    pub fn apply_entry(
        &self,
        index: u64,
        term: u64,
        reqs: Vec<Request>,
        count: bool,
    ) -> Result<Vec<Response>, StoreError> {
        self.counting.store(count, Ordering::Relaxed);
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            let (resp, err) = self.apply_one(r);
            if let Some(e) = err {
                self.counting.store(true, Ordering::Relaxed);
                return Err(e);
            }
            out.push(resp);
        }
        self.counting.store(true, Ordering::Relaxed);
        self.set_applied(index, term)?;
        Ok(out)
    }

    /// Records `(index, term)` as applied, inside the open batch (an entry with no requests:
    /// a new leader's empty entry, a membership change).
    pub fn set_applied(&self, index: u64, term: u64) -> Result<(), StoreError> {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&index.to_be_bytes());
        v[8..].copy_from_slice(&term.to_be_bytes());
        self.set_meta("applied", &v)
    }

    /// The last applied entry's (index, term); (0, 0) for a new, empty replica.
    pub fn applied(&self) -> Result<(u64, u64), StoreError> {
        Ok(match self.meta("applied")? {
            Some(v) if v.len() == 16 => (
                u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
            ),
            _ => (0, 0),
        })
    }

    /// Writes a bookkeeping value inside the open batch.
    pub(crate) fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.batch()?;
        txn.open_table(META)?.insert(key, value)?;
        Ok(())
    }

    /// A bookkeeping value (as written so far, committed or not).
    pub(crate) fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.txn()?;
        let t = txn.open_table(META)?;
        let v = t.get(key)?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Serves read-only requests from committed state (after the replica confirmed, by read
    /// index, that it holds every write acknowledged before they were asked).
    pub fn read(&self, req: Request) -> Result<Response, StoreError> {
        // A read opens the batch if none is open, and closes it again: a write transaction
        // held open would keep a Ready's sync (redb's one writer) waiting.
        let had_batch = self.has_batch();
        let out = self.apply_one(req);
        if !had_batch {
            self.abort_batch();
        }
        match out {
            (_, Some(e)) => Err(e),
            (r, None) => Ok(r),
        }
    }

    /// The whole state (every table but the Raft log and bookkeeping), as a snapshot's data:
    /// consistent, taken in one read transaction, with what it reflects (the applied entry's
    /// index and term and the membership as of it, as committed).
    pub fn dump(&self) -> Result<Dump, StoreError> {
        // What was applied but not committed is committed first: a snapshot is taken from
        // committed state (a consistent read transaction).
        self.commit_batch(false)?;
        let txn = self.db.begin_read()?;
        let (index, term, conf_state) = {
            let t = txn.open_table(META)?;
            let (index, term) = match t.get("applied")?.map(|v| v.value().to_vec()) {
                Some(v) if v.len() == 16 => (
                    u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                    u64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
                ),
                _ => (0, 0),
            };
            let conf = t.get("conf_state")?.map(|v| v.value().to_vec());
            (index, term, conf.unwrap_or_default())
        };
        let d = StateDump {
            counters: rows(&txn.open_table(COUNTERS)?, |k, v| (k.to_string(), v))?,
            names: rows(&txn.open_table(NAMES)?, |k, v| (k.to_string(), v))?,
            users: rows(&txn.open_table(USERS)?, |k, v| (k, v.to_vec()))?,
            channels: rows(&txn.open_table(CHANNELS)?, |k, v| (k, v.to_vec()))?,
            log: rows(&txn.open_table(LOG)?, |k, v| (k, v.to_vec()))?,
            dedup: rows(&txn.open_table(DEDUP)?, |k, v| (k, v))?,
            cursors: rows(&txn.open_table(CURSORS)?, |k, v| (k, v))?,
            sessions: rows(&txn.open_table(SESSIONS)?, |k, v| (k, v.to_vec()))?,
            last_active: rows(&txn.open_table(LAST_ACTIVE)?, |k, v| (k, v))?,
            pending: rows(&txn.open_table(PENDING)?, |k, v| (k, v))?,
            pushed: rows(&txn.open_table(PUSHED)?, |k, v| (k, v))?,
        };
        let data = postcard::to_stdvec(&d).expect("a state dump serializes");
        Ok(Dump {
            index,
            term,
            conf_state,
            data,
        })
    }

    /// Replaces the whole state with a snapshot's data, inside the open batch, and records
    /// `(index, term)` as applied.
    pub fn restore(&self, data: &[u8], index: u64, term: u64) -> Result<(), StoreError> {
        let d: StateDump = postcard::from_bytes(data)
            .map_err(|e| StoreError::Corrupt(format!("snapshot data: {e}")))?;
        {
            let txn = self.batch()?;
            refill(
                &txn,
                COUNTERS,
                d.counters.iter().map(|(k, v)| (k.as_str(), *v)),
            )?;
            refill(&txn, NAMES, d.names.iter().map(|(k, v)| (k.as_str(), *v)))?;
            refill(&txn, USERS, d.users.iter().map(|(k, v)| (*k, v.as_slice())))?;
            refill(
                &txn,
                CHANNELS,
                d.channels.iter().map(|(k, v)| (*k, v.as_slice())),
            )?;
            refill(&txn, LOG, d.log.iter().map(|(k, v)| (*k, v.as_slice())))?;
            refill(&txn, DEDUP, d.dedup.iter().copied())?;
            refill(&txn, CURSORS, d.cursors.iter().copied())?;
            refill(
                &txn,
                SESSIONS,
                d.sessions.iter().map(|(k, v)| (*k, v.as_slice())),
            )?;
            refill(&txn, LAST_ACTIVE, d.last_active.iter().copied())?;
            refill(&txn, PENDING, d.pending.iter().copied())?;
            refill(&txn, PUSHED, d.pushed.iter().copied())?;
        }
        self.set_applied(index, term)
    }

    /// Executes one request inside the batch; a storage error is returned beside the answer.
    fn apply_one(&self, req: Request) -> (Response, Option<StoreError>) {
        let by_op = || self.by_op.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(req, Request::KvStats) {
            let stats = Response::KvStats {
                requests: self.requests.load(Ordering::Relaxed),
                writes: self.writes.load(Ordering::Relaxed),
                by_op: by_op()
                    .iter()
                    .map(|(op, (n, w))| (op.to_string(), *n, *w))
                    .collect(),
                // Unreadable (a failing disk): reported as nothing stored, not as an error.
                space: self.space().unwrap_or_default(),
            };
            return (stats, None);
        }
        let counting = self.counting.load(Ordering::Relaxed);
        if counting {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        let op: &'static str = (&req).into();
        let writes_before = self.writes.load(Ordering::Relaxed);
        let (out, err) = match self.apply_inner(req) {
            Ok(r) => (r, None),
            Err(e) => (
                refuse(ErrorCode::Unavailable, format!("storage: {e}")),
                Some(StoreError::from(e)),
            ),
        };
        // Requests run one at a time per node in the simulation, so the difference is this
        // request's write operations there (approximate under real tokio's parallel calls).
        let wrote = self.writes.load(Ordering::Relaxed) - writes_before;
        if !counting {
            return (out, err);
        }
        let mut m = by_op();
        let e = m.entry(op).or_default();
        e.0 += 1;
        e.1 += wrote;
        drop(m);
        (out, err)
    }

    fn apply_inner(&self, req: Request) -> R<Response> {
        match req {
            Request::AllocId { kind } => self.alloc_id(&kind),
            Request::LeaseIdTime { worker, until_ms } => self.lease_id_time(worker, until_ms),
            Request::ReserveName { name, user } => self.reserve_name(&name, user),
            Request::LookupName { name } => {
                let txn = self.txn()?;
                let t = txn.open_table(NAMES)?;
                let user = t.get(name.as_str())?.map(|v| v.value());
                Ok(Response::MaybeId(user))
            }
            Request::PutUser { record } => self.write_user(record.user, |u| *u = record.clone()),
            Request::GetUser { user } => Ok(Response::User(self.read_user(user)?)),
            Request::GetUsers { users } => {
                let mut out = Vec::new();
                for u in users {
                    out.extend(self.read_user(u)?);
                }
                Ok(Response::Users(out))
            }
            Request::AddDevice { user, device } => self.write_user_checked(user, |u| {
                if !u.devices.contains(&device) {
                    if u.devices.len() >= DEVICES_PER_USER_MAX {
                        return Err((
                            ErrorCode::LimitReached,
                            format!(
                                "at most {DEVICES_PER_USER_MAX} devices per account: log in with \
                                 one of yours, or remove one (DELETE /v1/devices/{{device}})"
                            ),
                        ));
                    }
                    u.devices.push(device);
                }
                Ok(())
            }),
            Request::RequestFriend { user, from, at_ms } => self.write_user_checked(user, |u| {
                if u.friends.contains_key(&from) || u.friend_requests.contains_key(&from) {
                    return Ok(());
                }
                if u.friend_requests.len() >= crate::limits::FRIEND_REQUESTS_MAX {
                    return Err((
                        ErrorCode::LimitReached,
                        format!(
                            "they have {} friend requests waiting, the most there may be",
                            crate::limits::FRIEND_REQUESTS_MAX
                        ),
                    ));
                }
                u.friend_requests.insert(from, at_ms);
                Ok(())
            }),
            Request::InviteToGroup { user, channel, by } => self.write_user_checked(user, |u| {
                if u.channels.contains(&channel) || u.group_invites.contains_key(&channel) {
                    return Ok(());
                }
                if u.group_invites.len() >= crate::limits::GROUP_INVITES_MAX {
                    return Err((
                        ErrorCode::LimitReached,
                        format!(
                            "they have {} group invitations waiting, the most there may be",
                            crate::limits::GROUP_INVITES_MAX
                        ),
                    ));
                }
                u.group_invites.insert(channel, by);
                Ok(())
            }),
            Request::DropGroupInvite { user, channel } => self.write_user(user, |u| {
                u.group_invites.remove(&channel);
            }),
            Request::DropFriendRequest { user, from } => self.write_user(user, |u| {
                u.friend_requests.remove(&from);
            }),
            Request::RevokeTokens {
                user,
                device,
                at_ms,
            } => self.write_user(user, |u| match device {
                // Only the user's own devices: the map stays bounded by the device cap.
                Some(d) if u.devices.contains(&d) => {
                    let before = u.revoked_before_ms.entry(d).or_insert(0);
                    *before = (*before).max(at_ms);
                }
                Some(_) => {}
                None => u.revoked_all_before_ms = u.revoked_all_before_ms.max(at_ms),
            }),
            Request::RemoveDevice { user, device } => self.write_user(user, |u| {
                u.revoked_before_ms.remove(&device);
                u.devices.retain(|d| *d != device);
                u.push_targets.remove(&device);
            }),
            Request::SetPushTarget {
                user,
                device,
                target,
            } => self.set_push_target(user, device, target),
            Request::LinkFriend {
                user,
                friend,
                channel,
            } => self.write_user_checked(user, |u| {
                if !u.friends.contains_key(&friend) && u.friends.len() >= FRIENDS_PER_USER_MAX {
                    return Err((
                        ErrorCode::LimitReached,
                        format!("at most {FRIENDS_PER_USER_MAX} friends per user"),
                    ));
                }
                if !u.channels.contains(&channel) && u.channels.len() >= CHANNELS_PER_USER_MAX {
                    return Err(channels_full());
                }
                u.friends.insert(friend, channel);
                u.friend_requests.remove(&friend);
                if !u.channels.contains(&channel) {
                    u.channels.push(channel);
                }
                Ok(())
            }),
            Request::SetUserChannel {
                user,
                channel,
                member,
            } => self.write_user_checked(user, |u| {
                let had = u.channels.contains(&channel);
                if member && !had && u.channels.len() >= CHANNELS_PER_USER_MAX {
                    return Err(channels_full());
                }
                u.channels.retain(|c| *c != channel);
                if member {
                    u.channels.push(channel);
                    u.group_invites.remove(&channel);
                }
                Ok(())
            }),
            Request::CreateChannel { record } => self.create_channel(record),
            Request::GetChannel { channel } => Ok(Response::Channel(self.read_channel(channel)?)),
            Request::AddMember { channel, user } => self.change_member(channel, user, true),
            Request::RemoveMember { channel, user } => self.change_member(channel, user, false),
            Request::Append(a) => Ok(Response::Append(self.append(a)?)),
            Request::ReadLog {
                channel,
                after_seq,
                limit,
                reader,
            } => self.read_log(channel, after_seq, limit, reader),
            Request::ReadLogByMessageId {
                channel,
                after_message_id,
                limit,
            } => self.read_log_by_id(channel, after_message_id, limit),
            Request::SetCursors { device, cursors } => self.set_cursors(device, &cursors),
            Request::GetCursors { device } => self.get_cursors(device),
            Request::FanoutDone { channel, seq } => {
                let txn = self.begin_write()?;
                txn.open_table(PENDING)?.remove((channel, seq))?;
                txn.commit()?;
                Ok(Response::Ok)
            }
            Request::PendingFanouts {
                committed_before_ms,
                limit,
            } => self.pending_fanouts(committed_before_ms, limit),
            Request::SetSession { entry } => {
                tracing::trace!(?entry, "set session");
                self.set_session(entry)
            }
            Request::ClearSession { entry } => {
                tracing::trace!(?entry, "clear session");
                self.clear_session(entry)
            }
            Request::GetSessions { users } => self.get_sessions(users),
            Request::SetLastActive { user, at_ms } => {
                let txn = self.begin_write()?;
                txn.open_table(LAST_ACTIVE)?.insert(user, at_ms)?;
                txn.commit()?;
                Ok(Response::Ok)
            }
            Request::ClaimPush {
                message_id,
                device,
                claim,
                now_ms,
            } => self.claim_push(message_id, device, claim, now_ms),
            Request::ConfirmPush { message_id, device } => {
                self.confirm_pushes(message_id, &[device], None)
            }
            Request::ClaimPushes {
                message_id,
                devices,
                claim,
                now_ms,
            } => self.claim_pushes(message_id, &devices, claim, now_ms),
            Request::ConfirmPushes {
                message_id,
                devices,
                fanout_done,
            } => self.confirm_pushes(message_id, &devices, fanout_done),
            Request::ExpirePushClaims { before_ms } => self.expire_push_claims(before_ms),
            Request::SetCursorsBatch { devices } => self.set_cursors_batch(&devices),
            other => Ok(refuse(
                ErrorCode::BadRequest,
                format!("kv does not serve {other:?}"),
            )),
        }
    }

    /// Write access for one request: the batch's transaction, opened by its first write.
    fn begin_write(&self) -> R<Txn<'_>> {
        if self.counting.load(Ordering::Relaxed) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        self.txn()
    }

    fn alloc_id(&self, kind: &str) -> R<Response> {
        let txn = self.begin_write()?;
        let next = {
            let mut t = txn.open_table(COUNTERS)?;
            let next = t.get(kind)?.map(|v| v.value()).unwrap_or(0) + 1;
            t.insert(kind, next)?;
            next
        };
        txn.commit()?;
        Ok(Response::Id(next))
    }

    fn lease_id_time(&self, worker: u16, until_ms: u64) -> R<Response> {
        let key = format!("idgen-lease-{worker}");
        let txn = self.begin_write()?;
        let previous = {
            let mut t = txn.open_table(COUNTERS)?;
            let previous = t.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
            t.insert(key.as_str(), previous.max(until_ms))?;
            previous
        };
        txn.commit()?;
        Ok(Response::Id(previous))
    }

    fn reserve_name(&self, name: &str, user: Id) -> R<Response> {
        let txn = self.begin_write()?;
        let existing = {
            let mut t = txn.open_table(NAMES)?;
            let existing = t.get(name)?.map(|v| v.value());
            if existing.is_none() {
                t.insert(name, user)?;
            }
            existing
        };
        txn.commit()?;
        Ok(Response::Reserved {
            fresh: existing.is_none(),
            user: existing.unwrap_or(user),
        })
    }

    fn read_user(&self, user: Id) -> R<Option<UserRecord>> {
        let txn = self.txn()?;
        let t = txn.open_table(USERS)?;
        let rec = t.get(user)?.map(|v| dec(v.value())).transpose()?;
        Ok(rec)
    }

    /// Read-modify-write of a user record; `unknown_user` if absent (except `PutUser`).
    fn write_user(&self, user: Id, f: impl FnOnce(&mut UserRecord)) -> R<Response> {
        self.write_user_checked(user, |u| {
            f(u);
            Ok(())
        })
    }

    /// [`Self::write_user`] where `f` may refuse (its answer is returned, nothing written).
    fn write_user_checked(
        &self,
        user: Id,
        f: impl FnOnce(&mut UserRecord) -> Result<(), (ErrorCode, String)>,
    ) -> R<Response> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(USERS)?;
            let current: Option<UserRecord> = t.get(user)?.map(|v| dec(v.value())).transpose()?;
            let mut rec = current.unwrap_or_default();
            let existed = rec.user == user;
            if let Err((code, detail)) = f(&mut rec) {
                return Ok(refuse(code, detail));
            }
            if !existed && rec.user != user {
                return Ok(refuse(ErrorCode::UnknownUser, format!("user {user}")));
            }
            t.insert(user, enc(&rec).as_slice())?;
        }
        txn.commit()?;
        Ok(Response::Ok)
    }

    /// Sets or clears one device's push target, in one transaction with the check that the
    /// device is the user's (a device is never removed from a user, so the check holds after).
    fn set_push_target(&self, user: Id, device: Id, target: Option<PushTarget>) -> R<Response> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(USERS)?;
            let Some(mut rec) = t
                .get(user)?
                .map(|v| dec::<UserRecord>(v.value()))
                .transpose()?
            else {
                return Ok(refuse(ErrorCode::UnknownUser, format!("user {user}")));
            };
            if !rec.devices.contains(&device) {
                return Ok(refuse(
                    ErrorCode::UnknownDevice,
                    format!("device {device} is not a device of user {user}"),
                ));
            }
            match target {
                Some(target) => rec.push_targets.insert(device, target),
                None => rec.push_targets.remove(&device),
            };
            t.insert(user, enc(&rec).as_slice())?;
        }
        txn.commit()?;
        Ok(Response::Ok)
    }

    fn read_channel(&self, channel: Id) -> R<Option<ChannelRecord>> {
        let txn = self.txn()?;
        let t = txn.open_table(CHANNELS)?;
        let rec = t.get(channel)?.map(|v| dec(v.value())).transpose()?;
        Ok(rec)
    }

    fn create_channel(&self, record: ChannelRecord) -> R<Response> {
        if record.members.len() > GROUP_MEMBERS_MAX {
            return Ok(refuse(
                ErrorCode::GroupFull,
                format!(
                    "{} members, at most {GROUP_MEMBERS_MAX}",
                    record.members.len()
                ),
            ));
        }
        let txn = self.begin_write()?;
        let members = {
            let mut t = txn.open_table(CHANNELS)?;
            let existing: Option<ChannelRecord> =
                t.get(record.channel)?.map(|v| dec(v.value())).transpose()?;
            match existing {
                Some(e) => e.members,
                None => {
                    t.insert(record.channel, enc(&record).as_slice())?;
                    record.members
                }
            }
        };
        txn.commit()?;
        Ok(Response::Members(members))
    }

    fn change_member(&self, channel: Id, user: Id, join: bool) -> R<Response> {
        let txn = self.begin_write()?;
        let members = {
            let mut t = txn.open_table(CHANNELS)?;
            let Some(mut rec) = t
                .get(channel)?
                .map(|v| dec::<ChannelRecord>(v.value()))
                .transpose()?
            else {
                return Ok(refuse(
                    ErrorCode::UnknownChannel,
                    format!("channel {channel}"),
                ));
            };
            if rec.kind == ChannelKind::Direct {
                return Ok(refuse(
                    ErrorCode::BadRequest,
                    "members of a 1:1 channel cannot change",
                ));
            }
            let present = rec.members.contains(&user);
            if join && !present {
                if rec.members.len() >= GROUP_MEMBERS_MAX {
                    return Ok(refuse(
                        ErrorCode::GroupFull,
                        format!("channel {channel} already has {GROUP_MEMBERS_MAX} members"),
                    ));
                }
                rec.members.push(user);
            } else if !join && present {
                rec.members.retain(|m| *m != user);
            }
            t.insert(channel, enc(&rec).as_slice())?;
            rec.members
        };
        txn.commit()?;
        Ok(Response::Members(members))
    }

    /// Commits a message: the single place where a channel's order is decided.
    fn append(&self, a: AppendRequest) -> R<AppendOutcome> {
        if a.text.chars().count() > MESSAGE_CHARS_MAX {
            return Ok(AppendOutcome::Refused {
                code: ErrorCode::MessageTooLong,
            });
        }
        let txn = self.begin_write()?;
        let outcome = {
            let mut channels = txn.open_table(CHANNELS)?;
            let mut log = txn.open_table(LOG)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let Some(mut rec) = channels
                .get(a.channel)?
                .map(|v| dec::<ChannelRecord>(v.value()))
                .transpose()?
            else {
                return Ok(AppendOutcome::Refused {
                    code: ErrorCode::UnknownChannel,
                });
            };
            if !rec.members.contains(&a.sender) {
                return Ok(AppendOutcome::Refused {
                    code: ErrorCode::NotAMember,
                });
            }
            let key = (a.channel, a.sender_device, a.client_msg_id);
            if let (false, Some(seq)) = (a.skip_dedup, dedup.get(key)?.map(|v| v.value())) {
                let Some(stored) = log.get((a.channel, seq))? else {
                    return Err(redb::Error::Corrupted(format!(
                        "dedup points at ({}, {seq}), which is not in the log",
                        a.channel
                    )));
                };
                let m = decode_message((a.channel, seq), stored.value())?;
                return Ok(AppendOutcome::Committed {
                    seq,
                    message_id: m.message_id,
                    members: rec.members,
                    duplicate: true,
                    sent_at_ms: m.sent_at_ms,
                });
            }
            if a.message_id <= rec.last_message_id {
                return Ok(AppendOutcome::StaleId {
                    last_message_id: rec.last_message_id,
                });
            }
            let seq = rec.last_seq + 1;
            let msg = ChatMessage {
                channel: a.channel,
                seq,
                message_id: a.message_id,
                sender: a.sender,
                sender_device: a.sender_device,
                client_msg_id: a.client_msg_id,
                text: a.text,
                sent_at_ms: a.sent_at_ms,
            };
            log.insert((a.channel, seq), encode_message(&msg).as_slice())?;
            dedup.insert(key, seq)?;
            txn.open_table(PENDING)?
                .insert((a.channel, seq), msg.sent_at_ms)?;
            rec.last_seq = seq;
            rec.last_message_id = a.message_id;
            channels.insert(a.channel, enc(&rec).as_slice())?;
            AppendOutcome::Committed {
                seq,
                message_id: a.message_id,
                members: rec.members,
                duplicate: false,
                sent_at_ms: msg.sent_at_ms,
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    fn read_log(&self, channel: Id, after_seq: u64, limit: u32, reader: Option<Id>) -> R<Response> {
        let txn = self.txn()?;
        let last_seq = match txn.open_table(CHANNELS)?.get(channel)? {
            Some(v) => {
                let rec = dec::<ChannelRecord>(v.value())?;
                if reader.is_some_and(|r| !rec.members.contains(&r)) {
                    return Ok(refuse(ErrorCode::NotAMember, format!("channel {channel}")));
                }
                rec.last_seq
            }
            None => {
                return Ok(refuse(
                    ErrorCode::UnknownChannel,
                    format!("channel {channel}"),
                ))
            }
        };
        let log = txn.open_table(LOG)?;
        let mut messages = Vec::new();
        for item in log.range((channel, after_seq.saturating_add(1))..=(channel, u64::MAX))? {
            if messages.len() >= limit as usize {
                break;
            }
            let (k, v) = item?;
            messages.push(decode_message(k.value(), v.value())?);
        }
        Ok(Response::Log { messages, last_seq })
    }

    fn read_log_by_id(&self, channel: Id, after_id: Id, limit: u32) -> R<Response> {
        let txn = self.txn()?;
        let log = txn.open_table(LOG)?;
        let mut messages = Vec::new();
        let mut last_seq = 0;
        for item in log.range((channel, 1)..=(channel, u64::MAX))? {
            let (k, v) = item?;
            last_seq = k.value().1;
            let m = decode_message(k.value(), v.value())?;
            if m.message_id > after_id && messages.len() < limit as usize {
                messages.push(m);
            }
        }
        Ok(Response::Log { messages, last_seq })
    }

    fn pending_fanouts(&self, committed_before_ms: u64, limit: u32) -> R<Response> {
        let txn = self.txn()?;
        let pending = txn.open_table(PENDING)?;
        let log = txn.open_table(LOG)?;
        let channels = txn.open_table(CHANNELS)?;
        let mut out = Vec::new();
        for item in pending.iter()? {
            if out.len() >= limit as usize {
                break;
            }
            let (k, at) = item?;
            if at.value() >= committed_before_ms {
                continue;
            }
            let (channel, seq) = k.value();
            let (Some(m), Some(c)) = (log.get((channel, seq))?, channels.get(channel)?) else {
                continue;
            };
            let record: ChannelRecord = dec(c.value())?;
            out.push((decode_message((channel, seq), m.value())?, record.members));
        }
        Ok(Response::Pending(out))
    }

    fn set_cursors(&self, device: Id, cursors: &[(Id, u64)]) -> R<Response> {
        self.set_cursors_batch(&[(device, cursors.to_vec())])
    }

    /// Several devices' cursors in one transaction (a chat server's batch for this shard).
    fn set_cursors_batch(&self, devices: &[(Id, Vec<(Id, u64)>)]) -> R<Response> {
        if let Some(refused) = too_many(devices.len(), CURSOR_BATCH_DEVICES_MAX, "cursor batch") {
            return Ok(refused);
        }
        let pairs: usize = devices.iter().map(|(_, c)| c.len()).sum();
        if pairs > CURSOR_BATCH_PAIRS_MAX {
            return Ok(refuse(
                ErrorCode::BadRequest,
                format!("{pairs} cursors in one batch, at most {CURSOR_BATCH_PAIRS_MAX}"),
            ));
        }
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(CURSORS)?;
            for (device, cursors) in devices {
                for &(channel, seq) in cursors {
                    let current = t.get((*device, channel))?.map(|v| v.value()).unwrap_or(0);
                    // Cursors only move forward: a late, reordered `read` must not rewind them.
                    if seq > current {
                        t.insert((*device, channel), seq)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(Response::Ok)
    }

    fn get_cursors(&self, device: Id) -> R<Response> {
        let txn = self.txn()?;
        let t = txn.open_table(CURSORS)?;
        let mut out = BTreeMap::new();
        for item in t.range((device, 0)..=(device, u64::MAX))? {
            let (k, v) = item?;
            out.insert(k.value().1, v.value());
        }
        Ok(Response::Cursors(out))
    }

    /// Registers a session unless a newer connection of the device is registered: a slow
    /// registration of an abandoned connection must not hide the live one.
    fn set_session(&self, entry: SessionEntry) -> R<Response> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(SESSIONS)?;
            let key = (entry.user, entry.device);
            let current: Option<SessionEntry> = t.get(key)?.map(|v| dec(v.value())).transpose()?;
            if current.is_some_and(|c| c.connection > entry.connection) {
                return Ok(Response::Bool(false));
            }
            t.insert(key, enc(&entry).as_slice())?;
        }
        txn.commit()?;
        Ok(Response::Bool(true))
    }

    /// Removes the entry only if it is still this session (a newer one may have replaced it).
    fn clear_session(&self, entry: SessionEntry) -> R<Response> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(SESSIONS)?;
            let current: Option<SessionEntry> = t
                .get((entry.user, entry.device))?
                .map(|v| dec(v.value()))
                .transpose()?;
            if current.as_ref() == Some(&entry) {
                t.remove((entry.user, entry.device))?;
            }
        }
        txn.commit()?;
        Ok(Response::Ok)
    }

    fn get_sessions(&self, users: Vec<Id>) -> R<Response> {
        let txn = self.txn()?;
        let t = txn.open_table(SESSIONS)?;
        let mut out = Vec::new();
        for u in users {
            for item in t.range((u, 0)..=(u, u64::MAX))? {
                let (_, v) = item?;
                out.push(dec(v.value())?);
            }
        }
        Ok(Response::Sessions(out))
    }

    fn claim_push(&self, message_id: Id, device: Id, claim: u64, now_ms: u64) -> R<Response> {
        Ok(
            match self.claim_pushes(message_id, &[device], claim, now_ms)? {
                Response::PushClaims { granted, .. } if !granted.is_empty() => Response::Bool(true),
                Response::PushClaims { held, .. } if held.is_empty() => Response::Bool(false),
                Response::PushClaims { .. } => refuse(
                    ErrorCode::Unavailable,
                    "another push holds the claim; retry after it lapses",
                ),
                other => other,
            },
        )
    }

    /// Grants each device whose row is absent, held by this `claim`, or lapsed; leaves the
    /// notified ones out; names those another live claim holds. One transaction.
    fn claim_pushes(&self, message_id: Id, devices: &[Id], claim: u64, now_ms: u64) -> R<Response> {
        if let Some(refused) = too_many(devices.len(), PUSH_CLAIM_DEVICES_MAX, "push claim") {
            return Ok(refused);
        }
        let devices: BTreeSet<Id> = devices.iter().copied().collect();
        let (mut granted, mut held) = (Vec::new(), Vec::new());
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(PUSHED)?;
            for device in devices {
                let key = (message_id, device);
                let current = t.get(key)?.map(|v| v.value());
                match current {
                    Some((_, u64::MAX)) => {}
                    Some((holder, at))
                        if holder != claim && now_ms < at.saturating_add(PUSH_CLAIM_TTL_MS) =>
                    {
                        held.push(device)
                    }
                    _ => {
                        t.insert(key, (claim, now_ms))?;
                        granted.push(device);
                    }
                }
            }
        }
        txn.commit()?;
        Ok(Response::PushClaims { granted, held })
    }

    /// Marks the devices notified: no claim on them is granted again (until the rows expire).
    /// With `fanout_done`, removes that pending fanout in the same transaction.
    fn confirm_pushes(
        &self,
        message_id: Id,
        devices: &[Id],
        fanout_done: Option<(Id, u64)>,
    ) -> R<Response> {
        if let Some(refused) = too_many(devices.len(), PUSH_CLAIM_DEVICES_MAX, "push confirmation")
        {
            return Ok(refused);
        }
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(PUSHED)?;
            for &device in devices {
                t.insert((message_id, device), (0, u64::MAX))?;
            }
        }
        if let Some(pending) = fanout_done {
            txn.open_table(PENDING)?.remove(pending)?;
        }
        txn.commit()?;
        Ok(Response::Ok)
    }

    /// Deletes the claims of messages issued before `before_ms` (ids are Snowflakes: their
    /// high bits are the issue time, so those rows are one key range).
    fn expire_push_claims(&self, before_ms: u64) -> R<Response> {
        let first_kept = crate::idgen::first_id_at(before_ms);
        let txn = self.begin_write()?;
        let removed = {
            let mut t = txn.open_table(PUSHED)?;
            let keys: Vec<(u64, u64)> = t
                .range(..(first_kept, 0))?
                .take(PUSH_CLAIMS_EXPIRED_PER_CALL)
                .map(|item| item.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for &k in &keys {
                t.remove(k)?;
            }
            keys.len()
        };
        txn.commit()?;
        Ok(Response::Count(removed as u64))
    }
}

/// A `bad_request` refusal when a request names more than `max` devices.
fn too_many(n: usize, max: usize, what: &str) -> Option<Response> {
    (n > max).then(|| {
        refuse(
            ErrorCode::BadRequest,
            format!("{n} devices in one {what}, at most {max}"),
        )
    })
}

/// A snapshot of the state machine: what [`Store::dump`] returns.
pub struct Dump {
    pub index: u64,
    pub term: u64,
    /// The membership as of `index` (protobuf `ConfState`).
    pub conf_state: Vec<u8>,
    pub data: Vec<u8>,
}

/// Every table's rows, for a snapshot (postcard-encoded: compact, and every type here is
/// plain data).
#[derive(serde::Serialize, serde::Deserialize)]
struct StateDump {
    counters: Vec<(String, u64)>,
    names: Vec<(String, u64)>,
    users: Vec<(u64, Vec<u8>)>,
    channels: Vec<(u64, Vec<u8>)>,
    log: Vec<((u64, u64), Vec<u8>)>,
    dedup: Vec<((u64, u64, u64), u64)>,
    cursors: Vec<((u64, u64), u64)>,
    sessions: Vec<((u64, u64), Vec<u8>)>,
    last_active: Vec<(u64, u64)>,
    pending: Vec<((u64, u64), u64)>,
    pushed: Vec<((u64, u64), (u64, u64))>,
}

/// Every row of a table, mapped to owned values.
fn rows<K, V, T>(
    table: &impl ReadableTable<K, V>,
    f: impl Fn(K::SelfType<'_>, V::SelfType<'_>) -> T,
) -> Result<Vec<T>, StoreError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let mut out = Vec::new();
    for item in table.iter()? {
        let (k, v) = item?;
        out.push(f(k.value(), v.value()));
    }
    Ok(out)
}

/// Empties a table and fills it with `rows`.
fn refill<'a, K, V>(
    txn: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
    rows: impl Iterator<Item = (K::SelfType<'a>, V::SelfType<'a>)>,
) -> Result<(), StoreError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    txn.delete_table(def)?;
    let mut t = txn.open_table(def)?;
    for (k, v) in rows {
        t.insert(k, v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("in-memory database");
        Store::open(db).expect("tables")
    }

    // Proves an account holds at most DEVICES_PER_USER_MAX devices: one more is refused
    // `limit_reached` and not added, a device already there is still accepted, and removing
    // one (with its push target) frees a place.
    #[test]
    fn devices_per_user_are_capped() {
        let s = store();
        let record = UserRecord {
            user: 5,
            name: "eve".into(),
            ..UserRecord::default()
        };
        assert_eq!(s.apply(Request::PutUser { record }), Response::Ok);
        for d in 0..DEVICES_PER_USER_MAX as u64 {
            let add = Request::AddDevice {
                user: 5,
                device: 100 + d,
            };
            assert_eq!(s.apply(add), Response::Ok);
        }
        let more = Request::AddDevice {
            user: 5,
            device: 999,
        };
        match s.apply(more.clone()) {
            Response::Error { code, detail } => {
                assert_eq!(code, ErrorCode::LimitReached);
                assert!(detail.contains("DELETE /v1/devices"), "{detail}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(
            s.apply(Request::AddDevice {
                user: 5,
                device: 100
            }),
            Response::Ok
        );
        let devices = |s: &Store| match s.apply(Request::GetUser { user: 5 }) {
            Response::User(Some(u)) => u.devices,
            other => panic!("{other:?}"),
        };
        assert_eq!(devices(&s).len(), DEVICES_PER_USER_MAX);
        assert_eq!(
            s.apply(Request::RemoveDevice {
                user: 5,
                device: 100
            }),
            Response::Ok
        );
        assert_eq!(s.apply(more), Response::Ok);
        let now = devices(&s);
        assert!(now.contains(&999) && !now.contains(&100), "{now:?}");
    }

    // Proves friend requests: kept on the asked user's record until answered, capped at
    // FRIEND_REQUESTS_MAX (the next refused `limit_reached`), a repeat changes nothing, a
    // decline removes one, and becoming friends (LinkFriend) clears it.
    #[test]
    fn friend_requests_are_kept_capped_and_cleared() {
        use crate::limits::FRIEND_REQUESTS_MAX;
        let s = store();
        let record = UserRecord {
            user: 5,
            name: "eve".into(),
            ..UserRecord::default()
        };
        assert_eq!(s.apply(Request::PutUser { record }), Response::Ok);
        let ask = |from| Request::RequestFriend {
            user: 5,
            from,
            at_ms: 1,
        };
        for from in 0..FRIEND_REQUESTS_MAX as u64 {
            assert_eq!(s.apply(ask(1_000 + from)), Response::Ok);
        }
        assert_eq!(
            s.apply(ask(1_000)),
            Response::Ok,
            "a repeat is not a new one"
        );
        assert!(matches!(
            s.apply(ask(9)),
            Response::Error {
                code: ErrorCode::LimitReached,
                ..
            }
        ));
        let requests = |s: &Store| match s.apply(Request::GetUser { user: 5 }) {
            Response::User(Some(u)) => u.friend_requests,
            other => panic!("{other:?}"),
        };
        assert_eq!(requests(&s).len(), FRIEND_REQUESTS_MAX);
        let decline = Request::DropFriendRequest {
            user: 5,
            from: 1_000,
        };
        assert_eq!(s.apply(decline), Response::Ok);
        let link = Request::LinkFriend {
            user: 5,
            friend: 1_001,
            channel: 77,
        };
        assert_eq!(s.apply(link), Response::Ok);
        let left = requests(&s);
        assert_eq!(left.len(), FRIEND_REQUESTS_MAX - 2);
        assert!(!left.contains_key(&1_000) && !left.contains_key(&1_001));
        // A friend asking again changes nothing.
        assert_eq!(s.apply(ask(1_001)), Response::Ok);
        assert!(!requests(&s).contains_key(&1_001));
    }

    // Proves group invitations: kept on the invited user's record, capped at
    // GROUP_INVITES_MAX, not made for a group the user is in, declined by DropGroupInvite, and
    // cleared by joining (SetUserChannel).
    #[test]
    fn group_invites_are_kept_capped_and_cleared() {
        use crate::limits::GROUP_INVITES_MAX;
        let s = store();
        let record = UserRecord {
            user: 5,
            name: "eve".into(),
            channels: vec![7],
            ..UserRecord::default()
        };
        assert_eq!(s.apply(Request::PutUser { record }), Response::Ok);
        let invite = |channel| Request::InviteToGroup {
            user: 5,
            channel,
            by: 1,
        };
        assert_eq!(s.apply(invite(7)), Response::Ok, "already in it: nothing");
        for ch in 0..GROUP_INVITES_MAX as u64 {
            assert_eq!(s.apply(invite(1_000 + ch)), Response::Ok);
        }
        assert!(matches!(
            s.apply(invite(9)),
            Response::Error {
                code: ErrorCode::LimitReached,
                ..
            }
        ));
        let invites = |s: &Store| match s.apply(Request::GetUser { user: 5 }) {
            Response::User(Some(u)) => u.group_invites,
            other => panic!("{other:?}"),
        };
        assert!(!invites(&s).contains_key(&7));
        let decline = Request::DropGroupInvite {
            user: 5,
            channel: 1_000,
        };
        assert_eq!(s.apply(decline), Response::Ok);
        let join = Request::SetUserChannel {
            user: 5,
            channel: 1_001,
            member: true,
        };
        assert_eq!(s.apply(join), Response::Ok);
        let left = invites(&s);
        assert_eq!(left.len(), GROUP_INVITES_MAX - 2);
        assert!(!left.contains_key(&1_000) && !left.contains_key(&1_001));
    }

    fn group(s: &Store, channel: Id, members: Vec<Id>) {
        let record = ChannelRecord {
            channel,
            kind: ChannelKind::Group,
            name: "g".into(),
            members,
            last_seq: 0,
            last_message_id: 0,
        };
        assert!(matches!(
            s.apply(Request::CreateChannel { record }),
            Response::Members(_)
        ));
    }

    fn append(s: &Store, sender: Id, cmid: Id, message_id: Id, text: &str) -> AppendOutcome {
        match s.apply(Request::Append(AppendRequest {
            channel: 7,
            sender,
            sender_device: sender * 10,
            client_msg_id: cmid,
            message_id,
            text: text.into(),
            sent_at_ms: 1_000,
            skip_dedup: false,
        })) {
            Response::Append(o) => o,
            other => panic!("expected an append outcome, got {other:?}"),
        }
    }

    fn seq_of(o: &AppendOutcome) -> (u64, bool) {
        match o {
            AppendOutcome::Committed { seq, duplicate, .. } => (*seq, *duplicate),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    // Proves commits get consecutive seqs, a retry is the same message, an id not above the
    // channel's last is refused with that last id, and non-members, unknown channels and
    // oversize texts are refused with their codes.
    #[test]
    fn append_orders_dedups_and_refuses() {
        let s = store();
        group(&s, 7, vec![1, 2]);
        assert_eq!(seq_of(&append(&s, 1, 1, 100, "a")), (1, false));
        assert_eq!(seq_of(&append(&s, 2, 1, 200, "b")), (2, false));
        assert_eq!(
            seq_of(&append(&s, 1, 1, 300, "a")),
            (1, true),
            "retry deduplicated"
        );
        assert_eq!(
            append(&s, 1, 2, 150, "c"),
            AppendOutcome::StaleId {
                last_message_id: 200
            }
        );
        assert_eq!(
            append(&s, 3, 1, 400, "d"),
            AppendOutcome::Refused {
                code: ErrorCode::NotAMember
            }
        );
        let long = "x".repeat(MESSAGE_CHARS_MAX + 1);
        assert_eq!(
            append(&s, 1, 3, 500, &long),
            AppendOutcome::Refused {
                code: ErrorCode::MessageTooLong
            }
        );
        let r = s.apply(Request::ReadLog {
            reader: None,
            channel: 7,
            after_seq: 0,
            limit: 10,
        });
        let Response::Log { messages, last_seq } = r else {
            panic!("{r:?}")
        };
        assert_eq!((messages.len(), last_seq), (2, 2));
        let r = s.apply(Request::ReadLog {
            reader: None,
            channel: 9,
            after_seq: 0,
            limit: 10,
        });
        assert!(matches!(
            r,
            Response::Error {
                code: ErrorCode::UnknownChannel,
                ..
            }
        ));
    }

    // Proves group commit: a batch is one durable commit; refusals in it leave the other
    // writes standing; each request sees the writes before it in the batch.
    #[test]
    fn a_batch_is_one_commit_and_refusals_do_not_spoil_it() {
        let s = store();
        let syncs = s.syncs();
        let group = |channel| ChannelRecord {
            channel,
            kind: ChannelKind::Group,
            name: "g".into(),
            members: vec![1, 2],
            last_seq: 0,
            last_message_id: 0,
        };
        let out = s.apply_batch(vec![
            Request::CreateChannel { record: group(7) },
            // Refused before it writes: channel 99 does not exist.
            Request::AddMember {
                channel: 99,
                user: 3,
            },
            Request::AddMember {
                channel: 7,
                user: 3,
            },
            // After the writes above: sees them.
            Request::GetChannel { channel: 7 },
        ]);
        assert_eq!(out[0], Response::Members(vec![1, 2]));
        assert!(matches!(
            out[1],
            Response::Error {
                code: ErrorCode::UnknownChannel,
                ..
            }
        ));
        assert_eq!(out[2], Response::Members(vec![1, 2, 3]));
        match &out[3] {
            Response::Channel(Some(c)) => assert_eq!(c.members, vec![1, 2, 3]),
            other => panic!("the read sees the batch's writes: {other:?}"),
        }
        assert_eq!(s.syncs(), syncs + 1, "one durable commit for the batch");
        match s.apply(Request::GetChannel { channel: 7 }) {
            Response::Channel(Some(c)) => assert_eq!(c.members, vec![1, 2, 3]),
            other => panic!("the batch's writes are committed: {other:?}"),
        }
        // A batch of reads commits nothing.
        s.apply_batch(vec![Request::GetChannel { channel: 7 }]);
        assert_eq!(s.syncs(), syncs + 1);
    }

    // Proves log rows are written compactly (postcard behind a marker byte, without the key's
    // channel and seq), decode back to the same message, and that rows written as JSON by an
    // older version still read back; a JSON row under another key is corruption.
    #[test]
    fn log_rows_are_compact() {
        let m = ChatMessage {
            channel: 7,
            seq: 2,
            message_id: 290_336_586_162_245_642,
            sender: 15,
            sender_device: 73,
            client_msg_id: 8_123_456_789,
            text: "x".repeat(174),
            sent_at_ms: 1_700_000_000_000,
        };
        let row = encode_message(&m);
        let json = enc(&m);
        // 174 B of text: 1 marker + ~35 B of ids and lengths, against ~150 B of JSON.
        assert_eq!(row[0], LOG_ROW_POSTCARD);
        assert!(row.len() <= 174 + 40, "{} B", row.len());
        assert!(json.len() >= 174 + 140, "{} B", json.len());
        assert_eq!(decode_message((7, 2), &row).expect("decodes"), m);
        assert_eq!(decode_message((7, 2), &json).expect("JSON decodes"), m);
        assert!(decode_message((7, 3), &json).is_err());
        assert!(decode_message((7, 2), &row[..row.len() - 1]).is_err());

        let s = store();
        group(&s, 7, vec![1, 2]);
        append(&s, 1, 1, 100, "new");
        {
            let txn = s.begin_write().expect("txn");
            txn.open_table(LOG)
                .expect("log")
                .insert((7, 2), enc(&m).as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        match s.apply(Request::ReadLog {
            channel: 7,
            after_seq: 0,
            limit: 10,
            reader: None,
        }) {
            Response::Log { messages, .. } => {
                assert_eq!(messages.len(), 2);
                assert_eq!((messages[0].seq, messages[0].text.as_str()), (1, "new"));
                assert_eq!(messages[1], m);
            }
            other => panic!("{other:?}"),
        }
    }

    // Proves a commit leaves a pending fanout until `FanoutDone`, visible only once old enough.
    #[test]
    fn pending_fanout_lifecycle() {
        let s = store();
        group(&s, 7, vec![1, 2]);
        append(&s, 1, 1, 100, "a");
        let pending = |before| match s.apply(Request::PendingFanouts {
            committed_before_ms: before,
            limit: 10,
        }) {
            Response::Pending(p) => p,
            other => panic!("{other:?}"),
        };
        assert!(pending(1_000).is_empty(), "not old enough");
        let p = pending(1_001);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].0.seq, p[0].1.clone()), (1, vec![1, 2]));
        s.apply(Request::FanoutDone { channel: 7, seq: 1 });
        assert!(pending(u64::MAX).is_empty());
        // A push confirmation may carry the fanout's end: the same removal.
        append(&s, 1, 2, 200, "b");
        assert_eq!(pending(u64::MAX).len(), 1);
        let confirm = |fanout_done| Request::ConfirmPushes {
            message_id: 200,
            devices: vec![],
            fanout_done,
        };
        s.apply(confirm(None));
        assert_eq!(pending(u64::MAX).len(), 1);
        s.apply(confirm(Some((7, 2))));
        assert!(pending(u64::MAX).is_empty());
    }

    // Proves a late registration of an older connection neither replaces the entry of the
    // device's newer connection nor lets its close remove that entry.
    #[test]
    fn stale_session_registration_is_ignored() {
        let s = store();
        let entry = |epoch, connection| SessionEntry {
            user: 1,
            device: 10,
            server: 0,
            epoch,
            connection,
        };
        assert_eq!(
            s.apply(Request::SetSession { entry: entry(2, 6) }),
            Response::Bool(true)
        );
        assert_eq!(
            s.apply(Request::SetSession { entry: entry(1, 5) }),
            Response::Bool(false)
        );
        s.apply(Request::ClearSession { entry: entry(1, 5) });
        assert_eq!(
            s.apply(Request::GetSessions { users: vec![1] }),
            Response::Sessions(vec![entry(2, 6)])
        );
    }

    // Proves the 101st member is refused and cursors never move backwards.
    #[test]
    fn group_cap_and_monotone_cursors() {
        let s = store();
        group(&s, 7, (1..=100).collect());
        let r = s.apply(Request::AddMember {
            channel: 7,
            user: 101,
        });
        assert!(matches!(
            r,
            Response::Error {
                code: ErrorCode::GroupFull,
                ..
            }
        ));
        s.apply(Request::SetCursors {
            device: 5,
            cursors: vec![(7, 9)],
        });
        s.apply(Request::SetCursors {
            device: 5,
            cursors: vec![(7, 4), (8, 2)],
        });
        assert_eq!(
            s.apply(Request::GetCursors { device: 5 }),
            Response::Cursors(BTreeMap::from([(7, 9), (8, 2)]))
        );
    }

    // Proves push claims: the first claimer wins, its retry is recognised, others are refused
    // while the claim is live and take it over once it lapses, and a confirmed push is never
    // claimed again.
    #[test]
    fn push_claims() {
        let s = store();
        let claim = |c: u64, now: u64| {
            s.apply(Request::ClaimPush {
                message_id: 7,
                device: 3,
                claim: c,
                now_ms: now,
            })
        };
        assert_eq!(claim(1, 1_000), Response::Bool(true));
        assert_eq!(
            claim(1, 1_500),
            Response::Bool(true),
            "the same claimer retries"
        );
        assert!(matches!(
            claim(2, 2_000),
            Response::Error {
                code: ErrorCode::Unavailable,
                ..
            }
        ));
        assert_eq!(
            claim(2, 1_500 + PUSH_CLAIM_TTL_MS),
            Response::Bool(true),
            "lapsed"
        );
        let confirm = Request::ConfirmPush {
            message_id: 7,
            device: 3,
        };
        assert_eq!(s.apply(confirm), Response::Ok);
        assert_eq!(claim(2, 1_000_000), Response::Bool(false));
        assert_eq!(claim(9, 1_000_000), Response::Bool(false));
    }

    // Proves one `ClaimPushes` grants every free device once (a repeated device counts once),
    // names the devices another live claim holds, leaves notified ones out, takes lapsed
    // claims over; that `ConfirmPushes` closes them; that too many devices are refused; and
    // that `ExpirePushClaims` deletes exactly the rows of messages issued before its time,
    // at most `PUSH_CLAIMS_EXPIRED_PER_CALL` per call.
    #[test]
    fn push_claims_in_batches_and_their_expiry() {
        let s = store();
        let t0 = crate::idgen::EPOCH_MS + 10_000_000;
        let old = crate::idgen::first_id_at(t0) + 5;
        let new = crate::idgen::first_id_at(t0 + 1);
        let claim = |m: Id, devices: Vec<Id>, c: u64, now: u64| {
            s.apply(Request::ClaimPushes {
                message_id: m,
                devices,
                claim: c,
                now_ms: now,
            })
        };
        let answer = |granted: Vec<Id>, held: Vec<Id>| Response::PushClaims { granted, held };
        assert_eq!(
            claim(old, vec![3, 1, 3], 1, 1_000),
            answer(vec![1, 3], vec![])
        );
        assert_eq!(
            claim(old, vec![1, 2, 3], 2, 2_000),
            answer(vec![2], vec![1, 3])
        );
        assert_eq!(
            claim(old, vec![1, 3], 1, 2_500),
            answer(vec![1, 3], vec![]),
            "the same claimer retries"
        );
        let confirm = Request::ConfirmPushes {
            message_id: old,
            devices: vec![1, 2],
            fanout_done: None,
        };
        assert_eq!(s.apply(confirm), Response::Ok);
        assert_eq!(
            claim(old, vec![1, 2, 3], 9, 2_500 + PUSH_CLAIM_TTL_MS),
            answer(vec![3], vec![]),
            "notified devices are left out; the lapsed claim on 3 is taken over"
        );
        assert_eq!(claim(new, vec![1], 9, 3_000), answer(vec![1], vec![]));
        let too_many = vec![1; PUSH_CLAIM_DEVICES_MAX + 1];
        assert!(matches!(
            claim(new, too_many, 9, 3_000),
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
        // Expiry: the old message's three rows go, the new one's stays.
        let expire = |before_ms| s.apply(Request::ExpirePushClaims { before_ms });
        assert_eq!(expire(t0), Response::Count(0));
        assert_eq!(expire(t0 + 1), Response::Count(3));
        assert_eq!(expire(t0 + 1), Response::Count(0));
        assert_eq!(claim(new, vec![1, 4], 10, 3_000), answer(vec![4], vec![1]));
        // Bounded per call.
        let many: Vec<Id> = (0..PUSH_CLAIM_DEVICES_MAX as u64).collect();
        for m in 0..6 {
            claim(old + m, many.clone(), 1, 1_000);
        }
        let total = 6 * PUSH_CLAIM_DEVICES_MAX as u64;
        assert_eq!(
            expire(t0 + 1),
            Response::Count(PUSH_CLAIMS_EXPIRED_PER_CALL as u64)
        );
        assert_eq!(
            expire(t0 + 1),
            Response::Count(total - PUSH_CLAIMS_EXPIRED_PER_CALL as u64)
        );
    }

    // Proves a cursor batch moves every device's cursors forward only, like `SetCursors`,
    // and refuses more than `CURSOR_BATCH_DEVICES_MAX` devices.
    #[test]
    fn cursor_batches() {
        let s = store();
        let batch = |devices| s.apply(Request::SetCursorsBatch { devices });
        assert_eq!(
            batch(vec![(1, vec![(10, 5)]), (2, vec![(10, 7), (11, 1)])]),
            Response::Ok
        );
        assert_eq!(
            batch(vec![(1, vec![(10, 3)]), (2, vec![(11, 4)])]),
            Response::Ok
        );
        let cursors = |device| s.apply(Request::GetCursors { device });
        assert_eq!(cursors(1), Response::Cursors([(10, 5)].into()));
        assert_eq!(cursors(2), Response::Cursors([(10, 7), (11, 4)].into()));
        let too_many = (0..=CURSOR_BATCH_DEVICES_MAX as u64)
            .map(|d| (d, vec![]))
            .collect();
        assert!(matches!(
            batch(too_many),
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
    }

    // Proves a push target is stored on the user record for one of the user's devices (and
    // cleared with `None`), a device of someone else or an unknown user is refused with its
    // code, and a record without targets encodes exactly as before targets existed (no
    // `push_targets` key), so stored records and simulation histories do not change.
    #[test]
    fn push_targets_on_the_user_record() {
        let s = store();
        let record = UserRecord {
            user: 1,
            name: "ann".into(),
            devices: vec![10],
            ..UserRecord::default()
        };
        assert_eq!(s.apply(Request::PutUser { record }), Response::Ok);
        let stored = s.read_user(1).expect("read").expect("user 1");
        assert!(!String::from_utf8(enc(&stored))
            .expect("json")
            .contains("push_targets"));
        let target = PushTarget::Fcm {
            registration_token: "tok:1".into(),
        };
        let set = |device, target| {
            s.apply(Request::SetPushTarget {
                user: 1,
                device,
                target,
            })
        };
        assert_eq!(set(10, Some(target.clone())), Response::Ok);
        let u = s.read_user(1).expect("read").expect("user 1");
        assert_eq!(u.push_targets, BTreeMap::from([(10, target.clone())]));
        assert!(matches!(
            set(11, Some(target.clone())),
            Response::Error {
                code: ErrorCode::UnknownDevice,
                ..
            }
        ));
        let unknown_user = s.apply(Request::SetPushTarget {
            user: 2,
            device: 10,
            target: Some(target),
        });
        assert!(matches!(
            unknown_user,
            Response::Error {
                code: ErrorCode::UnknownUser,
                ..
            }
        ));
        assert_eq!(set(10, None), Response::Ok);
        let u = s.read_user(1).expect("read").expect("user 1");
        assert!(u.push_targets.is_empty());
    }
}
