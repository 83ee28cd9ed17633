//! `SimDisk`: a redb storage backend held in memory that outlives its node.
//!
//! The simulation creates one per kv node and captures it in the node's init closure, so a
//! madsim kill + restart reopens the same bytes, as a process restart reopens its file.
//! Dropping writes that were not yet synced when the
//! node is killed is modelled by [`SimDisk::crash`]: redb's `sync_data` is the fsync, and
//! every write since the last one is undone, as a power cut loses the page cache. In the real
//! build kv uses a file instead.

use std::io;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;

/// The bytes of one simulated disk. Clone the `Arc` to hand it to a restarted node.
#[derive(Default)]
pub struct SimDisk {
    /// A std mutex: redb calls the backend synchronously, never across an await.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What a read sees: every write so far.
    bytes: Vec<u8>,
    /// How to get back to the last sync: the length then, and the old contents of every range
    /// written since, in write order (undone in reverse). Its size is bounded by what redb
    /// writes between two syncs; a durable commit syncs.
    undo: Vec<(u64, Vec<u8>)>,
    synced_len: usize,
    /// Bumped by every crash: a backend opened before it belongs to a dead process, and its
    /// writes (redb's clean shutdown as the old instance is dropped) must not land.
    epoch: u64,
    /// Writes undone by crashes, for tests and the run's statistics.
    lost_writes: u64,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimDisk({} bytes)", self.lock().bytes.len())
    }
}

impl SimDisk {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes currently stored.
    pub fn len_bytes(&self) -> usize {
        self.lock().bytes.len()
    }

    /// A backend for a process that opens this disk now (until the next crash).
    pub fn backend(self: &Arc<Self>) -> SimDiskBackend {
        SimDiskBackend {
            disk: self.clone(),
            epoch: self.lock().epoch,
        }
    }

    /// The node died: every write since the last sync is lost (undone newest first), the
    /// length goes back to what it was then, and the dead process's backend is fenced off.
    /// Returns how many writes were lost.
    pub fn crash(&self) -> u64 {
        let mut s = self.lock();
        s.epoch += 1;
        let undo = std::mem::take(&mut s.undo);
        let lost = undo.len() as u64;
        let synced_len = s.synced_len;
        for (offset, old) in undo.into_iter().rev() {
            let start = offset as usize;
            if s.bytes.len() < start + old.len() {
                s.bytes.resize(start + old.len(), 0);
            }
            s.bytes[start..start + old.len()].copy_from_slice(&old);
        }
        s.bytes.truncate(synced_len);
        s.lost_writes += lost;
        lost
    }

    /// Writes undone by crashes so far.
    pub fn lost_writes(&self) -> u64 {
        self.lock().lost_writes
    }
}

/// The backend handed to redb: a handle on a shared [`SimDisk`] for one process lifetime.
#[derive(Debug, Clone)]
pub struct SimDiskBackend {
    disk: Arc<SimDisk>,
    epoch: u64,
}

impl SimDiskBackend {
    /// The disk, unless the process this backend belongs to has crashed.
    fn live(&self) -> Result<std::sync::MutexGuard<'_, State>, io::Error> {
        let s = self.disk.lock();
        if s.epoch != self.epoch {
            return Err(io::Error::other("the process owning this disk has crashed"));
        }
        Ok(s)
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "read or write past the end of the disk",
    )
}

impl StorageBackend for SimDiskBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.live()?.bytes.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.live()?;
        let bytes = &s.bytes;
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = bytes
            .get(start..start + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let mut s = self.live()?;
        if len < s.bytes.len() {
            // Shrinking drops bytes: keep them for a crash to put back.
            let old = s.bytes[len..].to_vec();
            s.undo.push((len as u64, old));
        }
        s.bytes.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.live()?;
        s.undo.clear();
        s.synced_len = s.bytes.len();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.live()?;
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let old = s
            .bytes
            .get(start..start + data.len())
            .ok_or_else(out_of_range)?
            .to_vec();
        s.undo.push((offset, old));
        s.bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves a crash keeps exactly what was synced: later writes, growth and shrinking undone.
    #[test]
    fn crash_loses_only_unsynced_writes() {
        let disk = SimDisk::new();
        let b = disk.backend();
        b.set_len(8).unwrap();
        b.write(0, b"abcdefgh").unwrap();
        b.sync_data().unwrap();
        b.write(2, b"XY").unwrap();
        b.set_len(12).unwrap();
        b.write(8, b"1234").unwrap();
        b.write(3, b"Z").unwrap();
        b.set_len(4).unwrap();
        assert_eq!(disk.crash(), 4, "three writes and a shrink");
        assert!(
            b.write(0, b"late").is_err(),
            "the dead process is fenced off"
        );
        let b = disk.backend();
        let mut out = [0u8; 8];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        assert_eq!(b.len().unwrap(), 8);
        assert_eq!(disk.crash(), 0, "nothing left to lose");
        assert_eq!(disk.lost_writes(), 4);
    }

    // Proves redb reopens after a crash at the last durable commit, with a non-durable commit
    // after it lost (the kv-ack-before-sync canary's failure), and one before it kept.
    #[test]
    fn redb_recovers_the_last_durable_commit() {
        use redb::{Durability, ReadableDatabase, TableDefinition};
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let disk = SimDisk::new();
        let open = || {
            redb::Database::builder()
                .create_with_backend(disk.backend())
                .unwrap()
        };
        let db = open();
        {
            let tx = db.begin_write().unwrap();
            tx.open_table(T).unwrap().insert(1, 10).unwrap();
            tx.commit().unwrap();
            let mut tx = db.begin_write().unwrap();
            tx.set_durability(Durability::None).unwrap();
            tx.open_table(T).unwrap().insert(2, 20).unwrap();
            tx.commit().unwrap();
            let r = db.begin_read().unwrap();
            assert_eq!(
                r.open_table(T).unwrap().get(2).unwrap().unwrap().value(),
                20
            );
        }
        // redb may hold a non-durable commit in its cache or have written it: either way a
        // crash loses it.
        disk.crash();
        drop(db);
        let db = open();
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        assert_eq!(t.get(1).unwrap().unwrap().value(), 10);
        assert!(t.get(2).unwrap().is_none(), "the unsynced commit is gone");
    }
}
