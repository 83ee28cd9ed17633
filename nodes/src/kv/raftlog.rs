//! A shard replica's Raft log, in the replica's own redb database: raft-rs's [`Storage`].
//!
//! What raft-rs asks of storage, and where it lives here:
//! - the log entries after the last compaction (`raft_log` table, index -> protobuf `Entry`),
//!   with a copy of them in memory: raft-rs reads entries often (to send them, to apply
//!   them), the disk copy is for restarts;
//! - the hard state (term, vote, commit), where the log was last truncated, and the
//!   membership (`ConfState`), in the state machine's bookkeeping table beside the applied
//!   index (one small table touched per commit, and membership and applied index change
//!   together);
//! - snapshots, built on demand from the state machine ([`Store::dump`]).
//!
//! Writes go through the replica's batch transaction ([`Store::batch`]): the
//! replica decides what is durable and when. This module does not decide when to compact or
//! when to fsync, and it never talks to peers.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError as RaftStorageError};
use redb::TableDefinition;

use super::store::{Store, StoreError};

/// index -> `Entry` (protobuf). The bookkeeping table (`Store::meta`) holds `hard_state`
/// (protobuf `HardState`) and `truncated` (index and term of the last entry compacted away,
/// 16 bytes).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");

/// Where a new shard's log starts: a bootstrapped replica holds an empty state "applied" at
/// this index and term, and an empty log after it. A replica that starts empty (a new or
/// wiped disk) has nothing at index 1, so the leader must send it a snapshot, which carries
/// the membership; entries alone would not (TiKV starts its logs the same way).
pub const BOOT_INDEX: u64 = 5;
pub const BOOT_TERM: u64 = 5;

/// Creates the log's tables (inside the store's first transaction).
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(LOG)?;
    Ok(())
}

fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&a.to_be_bytes());
    v[8..].copy_from_slice(&b.to_be_bytes());
    v
}

fn unpair(v: &[u8]) -> Option<(u64, u64)> {
    (v.len() == 16).then(|| {
        (
            u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
        )
    })
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// The log of one replica.
pub struct LogStore {
    store: Arc<Store>,
    hard: HardState,
    conf: ConfState,
    /// Index and term of the last entry compacted away (or covered by the last snapshot).
    truncated: (u64, u64),
    /// The entries after `truncated`, in order (the disk holds the same).
    entries: VecDeque<Entry>,
    /// The last snapshot built for a follower, reused while it covers what is asked. A
    /// `RefCell`: raft-rs asks for snapshots through `&self`.
    snap_cache: RefCell<Option<Snapshot>>,
}

impl LogStore {
    /// Loads the log from the store's database.
    pub fn open(store: Arc<Store>) -> Result<Self, StoreError> {
        let hard = match store.meta("hard_state")? {
            Some(v) => HardState::parse_from_bytes(&v).map_err(|e| corrupt("hard state", e))?,
            None => HardState::default(),
        };
        let truncated = match store.meta("truncated")? {
            Some(v) => unpair(&v).ok_or_else(|| corrupt("truncated", "length"))?,
            None => (0, 0),
        };
        let txn = store.read_txn()?;
        let mut entries = VecDeque::new();
        for item in txn.open_table(LOG)?.range(truncated.0 + 1..)? {
            let (k, v) = item?;
            let e = Entry::parse_from_bytes(v.value()).map_err(|e| corrupt("log entry", e))?;
            if e.index != k.value() || e.index != truncated.0 + 1 + entries.len() as u64 {
                return Err(corrupt("log", format!("entry {} out of place", k.value())));
            }
            entries.push_back(e);
        }
        drop(txn);
        let conf = match store.meta("conf_state")? {
            Some(v) => ConfState::parse_from_bytes(&v).map_err(|e| corrupt("conf state", e))?,
            None => ConfState::default(),
        };
        Ok(Self {
            store,
            hard,
            conf,
            truncated,
            entries,
            snap_cache: RefCell::new(None),
        })
    }

    /// A replica that holds nothing yet (a new or wiped disk): no membership, no state.
    pub fn is_blank(&self) -> bool {
        self.truncated.0 == 0 && self.entries.is_empty() && self.conf == ConfState::default()
    }

    /// Makes a blank replica a member of a new shard whose voters are `voters`: the state is
    /// "applied" at [`BOOT_INDEX`], the log starts after it. Inside the open batch.
    pub fn bootstrap(&mut self, voters: Vec<u64>) -> Result<(), StoreError> {
        assert!(self.is_blank(), "only a blank replica is bootstrapped");
        let conf = ConfState {
            voters,
            ..ConfState::default()
        };
        self.set_conf_state(conf)?;
        self.store.set_applied(BOOT_INDEX, BOOT_TERM)?;
        self.set_truncated(BOOT_INDEX, BOOT_TERM)?;
        self.hard.term = BOOT_TERM;
        self.hard.commit = BOOT_INDEX;
        self.save_hard_state()
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    pub fn first(&self) -> u64 {
        self.truncated.0 + 1
    }

    pub fn last(&self) -> u64 {
        self.truncated.0 + self.entries.len() as u64
    }

    /// Appends entries, replacing any conflicting suffix, inside the open batch.
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        assert!(
            first.index > self.truncated.0,
            "raft-rs never appends at or below the truncation point ({} <= {})",
            first.index,
            self.truncated.0
        );
        let txn = self.store.batch()?;
        let mut log = txn.open_table(LOG)?;
        // Entries at and after `first.index` are replaced.
        while self.last() >= first.index {
            log.remove(self.last())?;
            self.entries.pop_back();
        }
        assert_eq!(first.index, self.last() + 1, "raft-rs appends without gaps");
        for e in ents {
            log.insert(
                e.index,
                e.write_to_bytes()
                    .expect("entries always encode")
                    .as_slice(),
            )?;
            self.entries.push_back(e.clone());
        }
        Ok(())
    }

    /// Sets and saves the hard state, inside the open batch.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.hard = hs.clone();
        self.save_hard_state()
    }

    fn save_hard_state(&self) -> Result<(), StoreError> {
        let bytes = self.hard.write_to_bytes().expect("hard state encodes");
        self.store.set_meta("hard_state", &bytes)
    }

    fn set_truncated(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        self.truncated = (index, term);
        self.store.set_meta("truncated", &pair(index, term))
    }

    /// Records a new membership (as of the entry being applied), inside the open batch.
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), StoreError> {
        self.store.set_meta(
            "conf_state",
            &cs.write_to_bytes().expect("conf state encodes"),
        )?;
        self.conf = cs;
        self.snap_cache.replace(None);
        Ok(())
    }

    /// Installs a snapshot from the leader: the state machine is replaced, the log emptied
    /// and restarted after the snapshot's index. Inside the open batch.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        self.store.restore(&snap.data, meta.index, meta.term)?;
        self.set_conf_state(meta.get_conf_state().clone())?;
        {
            let txn = self.store.batch()?;
            let mut log = txn.open_table(LOG)?;
            for e in &self.entries {
                log.remove(e.index)?;
            }
        }
        self.entries.clear();
        self.set_truncated(meta.index, meta.term)?;
        self.hard.term = self.hard.term.max(meta.term);
        self.hard.commit = meta.index;
        self.save_hard_state()
    }

    /// Drops entries after `index` (not known to be committed), inside the open batch.
    pub fn truncate_after(&mut self, index: u64) -> Result<(), StoreError> {
        let txn = self.store.batch()?;
        let mut log = txn.open_table(LOG)?;
        while self.last() > index.max(self.truncated.0) {
            log.remove(self.last())?;
            self.entries.pop_back();
        }
        Ok(())
    }

    /// Drops entries up to `to` (which must be applied), inside the open batch.
    pub fn compact(&mut self, to: u64) -> Result<(), StoreError> {
        if to <= self.truncated.0 || to > self.last() {
            return Ok(());
        }
        let term = self.entry(to).term;
        {
            let txn = self.store.batch()?;
            let mut log = txn.open_table(LOG)?;
            while self.entries.front().is_some_and(|e| e.index <= to) {
                let e = self.entries.pop_front().expect("checked above");
                log.remove(e.index)?;
            }
        }
        self.set_truncated(to, term)
    }

    fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index - self.truncated.0 - 1) as usize]
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard.clone(),
            conf_state: self.conf.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        assert!(
            high <= self.last() + 1,
            "raft-rs asked for entries past the end: {high} > {}",
            self.last() + 1
        );
        let mut out: Vec<Entry> = (low..high).map(|i| self.entry(i).clone()).collect();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(self.entry(idx).term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The cached snapshot serves while it reaches the log: once the log is compacted past
        // it, a follower it brings up to date still misses entries the log no longer has, is
        // sent the same snapshot again, and never catches up (raft-rs asks with
        // `request_index` 0).
        if let Some(s) = self.snap_cache.borrow().as_ref() {
            if s.get_metadata().index >= request_index.max(self.truncated.0) {
                return Ok(s.clone());
            }
        }
        let other = |e: StoreError| raft::Error::Store(RaftStorageError::Other(Box::new(e)));
        let d = self.store.dump().map_err(other)?;
        let conf = ConfState::parse_from_bytes(&d.conf_state)
            .map_err(|e| other(corrupt("conf state", e)))?;
        let (index, term, data) = (d.index, d.term, d.data);
        if index < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot {
            data: data.into(),
            ..Snapshot::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf);
        self.snap_cache.replace(Some(snap.clone()));
        Ok(snap)
    }
}
