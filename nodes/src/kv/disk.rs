//! `SimDisk`: one kv node's disk in the simulation, a set of files held in memory that outlives
//! the node's process, with the faults real disks have.
//!
//! The simulation creates one per kv node and captures it in the node's init closure, so a
//! madsim kill + restart reopens the same bytes, as a process restart reopens its files. Each
//! file is a redb storage backend ([`SimDiskBackend`]). What it models:
//! - **Lost writes.** redb's `sync_data` is the fsync; it completes only when the kv shell,
//!   having waited the fsync's time, calls [`SimDisk::complete_syncs`] (redb calls it inside
//!   a commit, and a simulated crash can only happen between polls, so a sync that completed
//!   at once could never be interrupted). [`SimDisk::crash`] undoes every write since a
//!   file's last completed sync, as a power cut loses the page cache and an fsync in flight,
//!   and fences off the dead process's backends (their late writes must not land).
//! - **Torn writes.** [`SimDisk::crash_torn`] keeps a seeded subset of the sectors written
//!   since the last sync instead of none: each sector is whole (old or new), as a drive
//!   writes a sector atomically, but a multi-sector write may land in part.
//! - **Sector checksums.** Every sector carries a CRC-32 of what was last written to it, as a
//!   drive's ECC or a checksumming filesystem keeps one; a read of a sector whose bytes no
//!   longer match fails with `InvalidData`. [`SimDisk::corrupt`] flips bits without
//!   updating the checksum (bit rot). With the `skip-checksum` canary reads do not verify,
//!   and corrupt bytes are served.
//! - **Slow fsync.** [`SimDisk::set_fsync_delay`]: a sync cannot sleep (redb calls the backend
//!   synchronously), so the disk counts syncs and the kv shell waits out each of them in turn
//!   ([`SimDisk::next_sync_wait`]) after a durable commit before acting on it. Each sync takes
//!   the delay in force when its turn comes: a disk that heals while a long run of syncs is
//!   queued (a snapshot's install) finishes the rest at a healthy disk's speed.
//! - **Loss.** [`SimDisk::wipe`]: every file gone; the node comes back empty.
//!
//! It does not model a full disk, latency of reads, or reordering across files. In the real
//! build kv uses files on the host's filesystem instead.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use redb::StorageBackend;

/// What one fsync takes on a healthy simulated disk (a datacenter SSD's flush; this machine's
/// measured 2.7 ms per durable redb commit is a consumer disk). Writes queued meanwhile ride
/// along with the next one, as on a real disk.
pub const FSYNC_TIME: Duration = Duration::from_micros(1_000);

/// The unit a drive writes atomically and checksums.
pub const SECTOR_BYTES: usize = 4096;

/// One kv node's files. Clone the `Arc` to hand it to a restarted node.
#[derive(Default)]
pub struct SimDisk {
    /// A std mutex: redb calls the backend synchronously, never across an await.
    state: Mutex<Disk>,
}

#[derive(Default)]
struct Disk {
    files: BTreeMap<String, File>,
    /// Bumped by every crash and wipe: a backend opened before it belongs to a dead process,
    /// and its writes (redb's clean shutdown as the old instance is dropped) must not land.
    epoch: u64,
    /// Writes undone by crashes, for tests and the run's statistics.
    lost_writes: u64,
    /// Reads check sector checksums (off only under the `skip-checksum` canary).
    skip_verify: bool,
    fsync_delay: Duration,
    /// Syncs not yet waited for by the shell (see `take_sync_wait`).
    syncs_unwaited: u64,
}

#[derive(Default)]
struct File {
    /// What a read sees: every write so far.
    bytes: Vec<u8>,
    /// CRC-32 of each sector as last written through the backend.
    sums: Vec<u32>,
    /// Sectors written since the last sync, with their bytes and checksum at that sync (to
    /// undo them on a crash). Bounded by what redb writes between two syncs.
    dirty: BTreeMap<usize, (Vec<u8>, u32)>,
    synced_len: usize,
    /// A sync was asked for and has not completed yet.
    sync_asked: bool,
    /// Sectors written after the first sync still in flight, with their bytes and checksum
    /// when it was asked, and the file's length then. A real fsync blocks redb's writer, so
    /// these writes could only have been issued once it completed: a crash before that
    /// undoes them all, then tears what the sync covered.
    after_sync: BTreeMap<usize, (Vec<u8>, u32)>,
    len_at_sync: usize,
}

/// Offsets of bytes inside runs of at least 16 of the simulated texts' ASCII letters
/// (`a`, `b`, `c`, space).
fn text_bytes(bytes: &[u8]) -> Vec<usize> {
    const RUN_MIN: usize = 16;
    let mut out = Vec::new();
    let mut run_start = None;
    for (i, b) in bytes.iter().chain(std::iter::once(&0)).enumerate() {
        let letter = matches!(b, b'a' | b'b' | b'c' | b' ');
        match (letter, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                if i - start >= RUN_MIN {
                    out.extend(start..i);
                }
                run_start = None;
            }
            _ => {}
        }
    }
    out
}

fn sector_sum(bytes: &[u8], sector: usize) -> u32 {
    let start = sector * SECTOR_BYTES;
    let end = (start + SECTOR_BYTES).min(bytes.len());
    crc32fast::hash(&bytes[start.min(end)..end])
}

fn sectors(offset: usize, len: usize) -> std::ops::Range<usize> {
    if len == 0 {
        return 0..0;
    }
    offset / SECTOR_BYTES..(offset + len).div_ceil(SECTOR_BYTES)
}

impl File {
    /// Remembers a sector's synced content before its first write since the last sync (and
    /// its content when the sync in flight was asked, before its first write after that).
    fn touch(&mut self, sector: usize) {
        if self.sync_asked && !self.after_sync.contains_key(&sector) {
            let start = (sector * SECTOR_BYTES).min(self.bytes.len());
            let end = (start + SECTOR_BYTES).min(self.bytes.len());
            let sum = self.sums.get(sector).copied().unwrap_or(0);
            self.after_sync
                .insert(sector, (self.bytes[start..end].to_vec(), sum));
        }
        if self.dirty.contains_key(&sector) {
            return;
        }
        if sector * SECTOR_BYTES >= self.synced_len {
            // Beyond the synced length: a crash cuts it off anyway, nothing to restore.
            self.dirty.insert(sector, (Vec::new(), 0));
            return;
        }
        let start = (sector * SECTOR_BYTES).min(self.bytes.len());
        let end = (start + SECTOR_BYTES).min(self.bytes.len());
        let sum = self.sums.get(sector).copied().unwrap_or(0);
        self.dirty
            .insert(sector, (self.bytes[start..end].to_vec(), sum));
    }

    fn resize(&mut self, len: usize) {
        let old = self.bytes.len();
        // The sectors whose bytes change: from the one holding the shorter end to the longer.
        let changed = sectors(old.min(len), old.abs_diff(len));
        for s in changed.clone() {
            self.touch(s);
        }
        self.bytes.resize(len, 0);
        self.sums.resize(len.div_ceil(SECTOR_BYTES), 0);
        let n = self.sums.len();
        for s in changed.filter(|s| *s < n) {
            self.sums[s] = sector_sum(&self.bytes, s);
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        for s in sectors(offset, data.len()) {
            self.touch(s);
        }
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
        for s in sectors(offset, data.len()) {
            self.sums[s] = sector_sum(&self.bytes, s);
        }
    }

    /// Undoes the writes since the last completed sync, except the sectors `keep` says to
    /// keep (`torn`: a subset survives; otherwise none does). Returns how many sectors were
    /// undone.
    ///
    /// Without a tear the file goes back to its synced length. With one, its length is the
    /// last one set (a filesystem journals size changes), and each sector past the synced
    /// length holds its new bytes or zeros (never written).
    fn crash(&mut self, torn: bool, mut keep: impl FnMut() -> bool) -> u64 {
        let mut undone = self.undo_after_sync();
        let dirty = std::mem::take(&mut self.dirty);
        let len = if torn {
            self.bytes.len().max(self.synced_len)
        } else {
            self.synced_len
        };
        let grown = self.bytes.len().max(self.synced_len);
        undone += self.restore(dirty, grown, len, |_| !(torn && keep()));
        undone
    }

    /// Puts back every sector written after the sync in flight was asked, and the length
    /// then: those writes never happened. Returns how many sectors were undone.
    fn undo_after_sync(&mut self) -> u64 {
        let after = std::mem::take(&mut self.after_sync);
        if !self.sync_asked {
            return 0;
        }
        let len = self.len_at_sync;
        let grown = self.bytes.len().max(len);
        self.restore(after, grown, len, |_| true)
    }

    /// Grows the file to `grown`, puts back each saved sector `undo` picks (its saved bytes,
    /// zeros where it was shorter), then cuts the file to `len`. A sector saved whole keeps
    /// its saved checksum (bit rot stays rot); a shorter one, and the last sector, get the
    /// checksum of what they hold now. Returns how many sectors were put back.
    fn restore(
        &mut self,
        saved: BTreeMap<usize, (Vec<u8>, u32)>,
        grown: usize,
        len: usize,
        mut undo: impl FnMut(usize) -> bool,
    ) -> u64 {
        self.bytes.resize(grown, 0);
        self.sums.resize(grown.div_ceil(SECTOR_BYTES), 0);
        let mut undone = 0;
        for (sector, (old, sum)) in saved {
            if !undo(sector) {
                continue;
            }
            let start = sector * SECTOR_BYTES;
            let end = (start + SECTOR_BYTES).min(self.bytes.len());
            if start >= end {
                continue;
            }
            let mut restored = vec![0u8; end - start];
            let n = old.len().min(restored.len());
            restored[..n].copy_from_slice(&old[..n]);
            self.bytes[start..end].copy_from_slice(&restored);
            self.sums[sector] = if old.len() == end - start {
                sum
            } else {
                crc32fast::hash(&restored)
            };
            undone += 1;
        }
        self.bytes.resize(len, 0);
        self.sums.resize(len.div_ceil(SECTOR_BYTES), 0);
        if let Some(last) = len.checked_sub(1).map(|l| l / SECTOR_BYTES) {
            // The last sector's checksum covers only the bytes that remain.
            self.sums[last] = sector_sum(&self.bytes, last);
        }
        undone
    }

    fn verify(&self, offset: usize, len: usize, name: &str) -> io::Result<()> {
        for s in sectors(offset, len) {
            if sector_sum(&self.bytes, s) != self.sums[s] {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{name}: sector {s} fails its checksum"),
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.lock();
        write!(f, "SimDisk({} files)", d.files.len())
    }
}

impl SimDisk {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes currently stored in all files.
    pub fn len_bytes(&self) -> usize {
        self.lock().files.values().map(|f| f.bytes.len()).sum()
    }

    /// Whether the file exists (was ever opened since the last wipe).
    pub fn has_file(&self, name: &str) -> bool {
        self.lock().files.contains_key(name)
    }

    /// Removes one file (a replica dropping its corrupt data).
    pub fn remove_file(&self, name: &str) {
        self.lock().files.remove(name);
    }

    /// A backend for file `name` for a process that opens it now (until the next crash). The
    /// file is created empty if missing.
    pub fn backend(self: &Arc<Self>, name: &str) -> SimDiskBackend {
        let mut d = self.lock();
        d.files.entry(name.to_string()).or_default();
        SimDiskBackend {
            disk: self.clone(),
            name: name.to_string(),
            epoch: d.epoch,
        }
    }

    /// The node died: every write since the last sync is lost (undone newest first), file
    /// lengths go back to what they were then, and the dead process's backends are fenced
    /// off. Returns how many sector writes were lost.
    pub fn crash(&self) -> u64 {
        self.crash_with(false, || false)
    }

    /// A crash that tears writes: each sector written since the last sync is kept or undone
    /// as `rng` draws (half and half). Returns how many sector writes were lost.
    pub fn crash_torn(&self, rng: &mut StdRng) -> u64 {
        self.crash_with(true, || rng.gen_bool(0.5))
    }

    fn crash_with(&self, torn: bool, mut keep: impl FnMut() -> bool) -> u64 {
        let mut d = self.lock();
        d.epoch += 1;
        let mut lost = 0;
        for f in d.files.values_mut() {
            lost += f.crash(torn, &mut keep);
            f.sync_asked = false;
        }
        d.lost_writes += lost;
        lost
    }

    /// The disk is gone: the node comes back with no files (or on a replacement disk).
    pub fn wipe(&self) {
        let mut d = self.lock();
        d.epoch += 1;
        d.files.clear();
    }

    /// Bit rot: flips one bit in each of `count` places drawn by `rng` in every non-empty
    /// file of the node (each shard replica's), without updating the sectors' checksums.
    /// Returns each file and the sectors hit in it.
    ///
    /// Three flips in four land in message text (a run of the simulated texts' ASCII letters),
    /// and turn a letter into another (bit 2: `a` into `e`, a space into `$`): that is most of
    /// what a chat store holds, and text that still decodes is what a missing check would
    /// serve. The rest land anywhere (page headers, B-tree structure, free space). Under the
    /// `skip-checksum` canary every flip lands in text: served, a flip in redb's own
    /// structures makes redb panic, which proves nothing about the checkers.
    pub fn corrupt(&self, rng: &mut StdRng, count: usize) -> Vec<(String, Vec<usize>)> {
        let mut d = self.lock();
        let text_share = if d.skip_verify { 1.0 } else { 0.75 };
        let mut out = Vec::new();
        for (name, f) in d.files.iter_mut().filter(|(_, f)| !f.bytes.is_empty()) {
            let text = text_bytes(&f.bytes);
            let mut hit = Vec::new();
            for _ in 0..count {
                let byte = if !text.is_empty() && rng.gen_bool(text_share) {
                    let b = text[rng.gen_range(0..text.len())];
                    f.bytes[b] ^= 0x04;
                    b
                } else {
                    let b = rng.gen_range(0..f.bytes.len());
                    f.bytes[b] ^= 1 << rng.gen_range(0..8);
                    b
                };
                hit.push(byte / SECTOR_BYTES);
            }
            hit.sort_unstable();
            hit.dedup();
            out.push((name.clone(), hit));
        }
        out
    }

    /// Sectors of the node's files whose bytes fail their checksum now: corruption nobody
    /// has read (and so detected) yet, or overwritten.
    pub fn damaged_sectors(&self) -> usize {
        let d = self.lock();
        d.files
            .values()
            .map(|f| {
                (0..f.sums.len())
                    .filter(|&s| sector_sum(&f.bytes, s) != f.sums[s])
                    .count()
            })
            .sum()
    }

    /// Reads serve whatever bytes are there, checksum or not (the `skip-checksum` canary).
    pub fn set_skip_verify(&self, skip: bool) {
        self.lock().skip_verify = skip;
    }

    /// Every fsync from now on takes `delay` (zero: a healthy disk).
    pub fn set_fsync_delay(&self, delay: Duration) {
        let mut d = self.lock();
        d.fsync_delay = delay;
        d.syncs_unwaited = 0;
    }

    /// The time of the next sync not yet waited for, at the disk's speed now (`None`: none
    /// is left): the shell waits each out after a durable commit before it answers or sends
    /// what the commit made durable. On a healthy disk the rest are taken at once.
    pub fn next_sync_wait(&self) -> Option<Duration> {
        let mut d = self.lock();
        if d.syncs_unwaited == 0 {
            return None;
        }
        if d.fsync_delay.is_zero() {
            let n = std::mem::take(&mut d.syncs_unwaited);
            return Some(FSYNC_TIME * n as u32);
        }
        d.syncs_unwaited -= 1;
        Some(FSYNC_TIME + d.fsync_delay)
    }

    /// Whether an fsync is in flight (asked for, not completed): a crash now tears it.
    pub fn sync_in_flight(&self) -> bool {
        self.lock().files.values().any(|f| f.sync_asked)
    }

    /// The syncs asked for so far are done: what they covered survives a crash.
    pub fn complete_syncs(&self) {
        for f in self.lock().files.values_mut() {
            if std::mem::take(&mut f.sync_asked) {
                f.dirty.clear();
                f.after_sync.clear();
                f.synced_len = f.bytes.len();
            }
        }
    }

    /// Sector writes undone by crashes so far.
    pub fn lost_writes(&self) -> u64 {
        self.lock().lost_writes
    }
}

/// The backend handed to redb: a handle on one file of a shared [`SimDisk`] for one process
/// lifetime.
#[derive(Debug, Clone)]
pub struct SimDiskBackend {
    disk: Arc<SimDisk>,
    name: String,
    epoch: u64,
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "read or write past the end of the file",
    )
}

impl SimDiskBackend {
    /// Runs `f` on the file (and the disk's settings), unless the process this backend
    /// belongs to has crashed.
    fn with<T>(&self, f: impl FnOnce(&mut File, &mut DiskIo) -> io::Result<T>) -> io::Result<T> {
        let mut guard = self.disk.lock();
        let d = &mut *guard;
        if d.epoch != self.epoch {
            return Err(io::Error::other("the process owning this disk has crashed"));
        }
        let mut io = DiskIo {
            skip_verify: d.skip_verify,
            syncs: 0,
        };
        if !d.files.contains_key(&self.name) {
            d.files.insert(self.name.clone(), File::default());
        }
        let file = d.files.get_mut(&self.name).expect("inserted above");
        let r = f(file, &mut io);
        d.syncs_unwaited += io.syncs;
        r
    }
}

/// What a backend call needs of the disk besides its file.
struct DiskIo {
    skip_verify: bool,
    /// Syncs done by the call.
    syncs: u64,
}

impl StorageBackend for SimDiskBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.with(|f, _| Ok(f.bytes.len() as u64))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let name = &self.name;
        self.with(|f, d| {
            let start = usize::try_from(offset).map_err(|_| out_of_range())?;
            let src = f
                .bytes
                .get(start..start + out.len())
                .ok_or_else(out_of_range)?;
            if !d.skip_verify {
                f.verify(start, out.len(), name)?;
            }
            out.copy_from_slice(src);
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        self.with(|f, _| {
            f.resize(len);
            Ok(())
        })
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.with(|f, d| {
            if !f.sync_asked {
                f.len_at_sync = f.bytes.len();
            }
            f.sync_asked = true;
            d.syncs += 1;
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.with(|f, _| {
            let start = usize::try_from(offset).map_err(|_| out_of_range())?;
            if start + data.len() > f.bytes.len() {
                return Err(out_of_range());
            }
            f.write(start, data);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    // Proves a crash keeps exactly what was synced: later writes, growth and shrinking undone.
    #[test]
    fn crash_loses_only_unsynced_writes() {
        let disk = SimDisk::new();
        let b = disk.backend("f");
        b.set_len(8).unwrap();
        b.write(0, b"abcdefgh").unwrap();
        b.sync_data().unwrap();
        disk.complete_syncs();
        b.write(2, b"XY").unwrap();
        b.set_len(12).unwrap();
        b.write(8, b"1234").unwrap();
        b.write(3, b"Z").unwrap();
        b.set_len(4).unwrap();
        assert_eq!(disk.crash(), 1, "the one sector written since the sync");
        assert!(
            b.write(0, b"late").is_err(),
            "the dead process is fenced off"
        );
        let b = disk.backend("f");
        let mut out = [0u8; 8];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        assert_eq!(b.len().unwrap(), 8);
        assert_eq!(disk.crash(), 0, "nothing left to lose");
        assert_eq!(disk.lost_writes(), 1);
    }

    // Proves a torn crash keeps whole sectors, some new and some old, and that every sector
    // still passes its checksum (torn is not corrupt).
    #[test]
    fn torn_crash_keeps_whole_sectors() {
        let disk = SimDisk::new();
        let b = disk.backend("f");
        let n = 16 * SECTOR_BYTES;
        b.set_len(n as u64).unwrap();
        b.write(0, &vec![1u8; n]).unwrap();
        b.sync_data().unwrap();
        disk.complete_syncs();
        b.write(0, &vec![2u8; n]).unwrap();
        // Its sync was asked for but never completed: the crash tears it.
        b.sync_data().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let lost = disk.crash_torn(&mut rng);
        assert!(
            lost > 0 && lost < 16,
            "some sectors kept, some undone: {lost}"
        );
        let b = disk.backend("f");
        let mut out = vec![0u8; n];
        b.read(0, &mut out).unwrap();
        for s in out.chunks(SECTOR_BYTES) {
            assert!(s.iter().all(|x| *x == s[0]), "a sector is whole");
        }
        let new = out.chunks(SECTOR_BYTES).filter(|s| s[0] == 2).count();
        assert_eq!(new as u64, 16 - lost);
    }

    // Proves a flipped bit is caught by the sector checksum on read, and served when checks
    // are skipped (the skip-checksum canary).
    #[test]
    fn corruption_fails_the_checksum() {
        let disk = SimDisk::new();
        let b = disk.backend("f");
        b.set_len(SECTOR_BYTES as u64 * 2).unwrap();
        b.write(0, &vec![5u8; SECTOR_BYTES * 2]).unwrap();
        b.sync_data().unwrap();
        disk.complete_syncs();
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(disk.damaged_sectors(), 0);
        let (name, sectors) = disk.corrupt(&mut rng, 1).pop().unwrap();
        assert_eq!(name, "f");
        assert_eq!(disk.damaged_sectors(), 1);
        let mut out = vec![0u8; SECTOR_BYTES];
        let bad = sectors[0] as u64 * SECTOR_BYTES as u64;
        let e = b.read(bad, &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        disk.set_skip_verify(true);
        b.read(bad, &mut out).unwrap();
        assert!(out.iter().any(|x| *x != 5), "the corrupt bytes are served");
    }

    // Proves a wipe removes every file and fences the old process, and slow fsyncs add up.
    #[test]
    fn wipe_and_slow_fsync() {
        let disk = SimDisk::new();
        let b = disk.backend("f");
        b.set_len(4).unwrap();
        b.sync_data().unwrap();
        disk.set_fsync_delay(Duration::from_secs(2));
        b.sync_data().unwrap();
        b.sync_data().unwrap();
        b.sync_data().unwrap();
        let slow = Duration::from_secs(2) + FSYNC_TIME;
        assert_eq!(disk.next_sync_wait(), Some(slow));
        assert_eq!(disk.next_sync_wait(), Some(slow));
        assert_eq!(disk.next_sync_wait(), Some(slow));
        assert_eq!(disk.next_sync_wait(), None);
        // A disk that heals with syncs queued finishes them at a healthy disk's speed.
        b.sync_data().unwrap();
        b.sync_data().unwrap();
        assert_eq!(disk.next_sync_wait(), Some(slow));
        disk.set_fsync_delay(Duration::ZERO);
        assert_eq!(disk.next_sync_wait(), None);
        b.sync_data().unwrap();
        b.sync_data().unwrap();
        assert_eq!(disk.next_sync_wait(), Some(FSYNC_TIME * 2));
        disk.wipe();
        assert!(!disk.has_file("f"));
        assert!(b.len().is_err());
        assert_eq!(disk.backend("f").len().unwrap(), 0);
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
                .create_with_backend(disk.backend("db"))
                .unwrap()
        };
        let db = open();
        {
            let tx = db.begin_write().unwrap();
            tx.open_table(T).unwrap().insert(1, 10).unwrap();
            tx.commit().unwrap();
            disk.complete_syncs();
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

    // Proves redb survives a torn crash while a durable commit's sync is still in flight and
    // non-durable commits (a replica's applies) were written after it. Really they could not
    // have been: redb's fsync blocks its writer. The disk must treat them as never issued,
    // or redb finds every root corrupt (kv-1's replicas in swarm seed 90057).
    #[test]
    fn redb_survives_a_tear_during_a_sync_with_writes_after_it() {
        use redb::{Durability, ReadableDatabase, TableDefinition};
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        for seed in 0..40 {
            let disk = SimDisk::new();
            let open = || {
                redb::Database::builder()
                    .create_with_backend(disk.backend("db"))
                    .unwrap()
            };
            let db = open();
            let commit = |round: u64, durability: Durability| {
                let mut tx = db.begin_write().unwrap();
                tx.set_durability(durability).unwrap();
                {
                    let mut t = tx.open_table(T).unwrap();
                    for k in 0..40 {
                        t.insert(round * 100 + k, vec![round as u8; 700].as_slice())
                            .unwrap();
                    }
                    // Churn: rewrite earlier rounds so pages are freed and reused.
                    for k in 0..20 {
                        t.insert(k, vec![round as u8; 700].as_slice()).unwrap();
                    }
                }
                tx.commit().unwrap();
            };
            for round in 1..4 {
                commit(round, Durability::Immediate);
                disk.complete_syncs();
            }
            // A durable commit whose fsync has not completed, then applies riding along.
            commit(4, Durability::Immediate);
            for round in 5..9 {
                commit(round, Durability::None);
            }
            let mut rng = StdRng::seed_from_u64(seed);
            disk.crash_torn(&mut rng);
            drop(db);
            let db = redb::Database::builder()
                .create_with_backend(disk.backend("db"))
                .unwrap_or_else(|e| panic!("seed {seed}: redb does not reopen: {e}"));
            let r = db.begin_read().unwrap();
            let t = r.open_table(T).unwrap();
            for round in 1..4u64 {
                for k in 20..40 {
                    let v = t.get(round * 100 + k).unwrap().expect("a durable row");
                    assert_eq!(v.value(), vec![round as u8; 700].as_slice());
                }
            }
        }
    }

    // Random runs of durable and non-durable commits, completed and pending syncs, torn
    // crashes and reopens (redb repairs on open): redb always reopens with every row whose
    // commit's sync completed.
    #[test]
    fn redb_survives_random_torn_crash_cycles() {
        use redb::{Durability, ReadableDatabase, TableDefinition};
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        for seed in 0..60 {
            let mut rng = StdRng::seed_from_u64(seed);
            let disk = SimDisk::new();
            let open = |disk: &Arc<SimDisk>| {
                redb::Database::builder().create_with_backend(disk.backend("db"))
            };
            let mut db = open(&disk).unwrap();
            // Created and synced (a tear of the creation itself is not redb's to survive).
            disk.complete_syncs();
            // Rows whose durable commit's sync completed: (key, value byte).
            let mut durable: BTreeMap<u64, u8> = BTreeMap::new();
            let mut pending: BTreeMap<u64, u8> = BTreeMap::new();
            for step in 0..60u64 {
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let d = rng.gen_bool(0.5);
                        let mut tx = db.begin_write().unwrap();
                        tx.set_durability(if d {
                            Durability::Immediate
                        } else {
                            Durability::None
                        })
                        .unwrap();
                        {
                            let mut t = tx.open_table(T).unwrap();
                            for _ in 0..rng.gen_range(1..30) {
                                let k = rng.gen_range(0..200u64);
                                let v = (step % 250) as u8;
                                t.insert(k, vec![v; rng.gen_range(10..900)].as_slice())
                                    .unwrap();
                                pending.insert(k, v);
                            }
                        }
                        tx.commit().unwrap();
                        if d && rng.gen_bool(0.6) {
                            disk.complete_syncs();
                            durable.append(&mut pending);
                        }
                    }
                    6..=8 => {
                        disk.complete_syncs();
                    }
                    _ => {
                        disk.crash_torn(&mut rng);
                        drop(db);
                        pending.clear();
                        db = open(&disk).unwrap_or_else(|e| {
                            panic!("seed {seed} step {step}: redb does not reopen: {e}")
                        });
                        // What reopened is the new truth for later checks.
                        let r = db.begin_read().unwrap();
                        if let Ok(t) = r.open_table(T) {
                            for (k, v) in &durable {
                                let got = t.get(k).unwrap().map(|g| g.value()[0]);
                                assert!(
                                    got.is_some(),
                                    "seed {seed} step {step}: row {k} ({v}) lost"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    // Proves redb recovers from torn crashes: over many seeded tears of a commit in flight,
    // the database reopens at a durable commit (the last or the one before), never garbage.
    #[test]
    fn redb_survives_torn_commits() {
        use redb::{ReadableDatabase, TableDefinition};
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        for seed in 0..20 {
            let disk = SimDisk::new();
            let open = || {
                redb::Database::builder()
                    .create_with_backend(disk.backend("db"))
                    .unwrap()
            };
            let db = open();
            for round in 0..3u64 {
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(T).unwrap();
                    for k in 0..50 {
                        t.insert(round * 100 + k, vec![round as u8; 500].as_slice())
                            .unwrap();
                    }
                }
                tx.commit().unwrap();
                disk.complete_syncs();
            }
            // A commit whose sectors are torn by the crash: its pages are written, its sync
            // never completes.
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(T).unwrap();
                for k in 0..50 {
                    t.insert(300 + k, vec![9u8; 500].as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            assert!(disk.crash_torn(&mut rng) > 0, "the tear undid some sectors");
            drop(db);
            let db = open();
            let r = db.begin_read().unwrap();
            let t = r.open_table(T).unwrap();
            for round in 0..3u64 {
                for k in 0..50 {
                    let v = t.get(round * 100 + k).unwrap().expect("a durable row");
                    assert_eq!(v.value(), vec![round as u8; 500].as_slice());
                }
            }
        }
    }
}
