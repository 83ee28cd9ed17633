//! Read cursors, written in batches: a session hands its devices' cursors here at each
//! heartbeat, and the chat server writes each kv shard's gathered cursors every
//! [`CURSOR_FLUSH_MS`] in one `SetCursorsBatch`: one kv write per (server, shard) and period,
//! however many devices read (it was one per device and heartbeat: 4.3 kv writes per message
//! in `peak-hour`).
//!
//! A session that closes writes its own cursors at once (with whatever of its device was
//! waiting here): the device may reconnect to another server and sync from them. A cursor lost
//! in a crash only makes the device be offered messages it already has.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::cluster::Peers;
use crate::limits::{CURSOR_BATCH_DEVICES_MAX, CURSOR_BATCH_PAIRS_MAX};
use crate::proto::internal::Request;
use crate::proto::Id;

/// How long cursors wait to be written: the devices' heartbeat interval.
pub const CURSOR_FLUSH_MS: u64 = 5_000;

/// Channel -> seq.
type Cursors = BTreeMap<Id, u64>;

/// One shard's pending cursors by device, and how many (channel, seq) pairs they hold.
type ShardPending = (BTreeMap<Id, Cursors>, usize);

/// Cursors waiting to be written, by kv shard. A std mutex: never held across an await.
#[derive(Default)]
pub struct CursorBatcher {
    pending: Mutex<BTreeMap<usize, ShardPending>>,
}

/// One shard's batch, ready for `SetCursorsBatch`.
type Batch = (usize, Vec<(Id, Vec<(Id, u64)>)>);

impl CursorBatcher {
    /// Merges `cursors` (the larger seq wins) into the device's pending ones; a device names
    /// at most [`CURSOR_BATCH_PAIRS_MAX`] channels (new ones past it are dropped: the device
    /// reports again). A shard's batch that reaches [`CURSOR_BATCH_DEVICES_MAX`] devices or
    /// [`CURSOR_BATCH_PAIRS_MAX`] pairs is returned, to be written now.
    pub fn add(&self, shard: usize, device: Id, cursors: Cursors) -> Option<Batch> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (devices, pairs) = pending.entry(shard).or_default();
        let mine = devices.entry(device).or_default();
        let before = mine.len();
        for (channel, seq) in cursors {
            if mine.len() >= CURSOR_BATCH_PAIRS_MAX && !mine.contains_key(&channel) {
                continue;
            }
            let e = mine.entry(channel).or_default();
            *e = (*e).max(seq);
        }
        *pairs += mine.len() - before;
        if devices.len() < CURSOR_BATCH_DEVICES_MAX && *pairs < CURSOR_BATCH_PAIRS_MAX {
            return None;
        }
        let (full, _) = std::mem::take(&mut *pending.get_mut(&shard)?);
        Some((shard, flatten(full)))
    }

    /// Takes the device's pending cursors out (its session is closing and writes them).
    pub fn take_device(&self, shard: usize, device: Id) -> Cursors {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some((devices, pairs)) = pending.get_mut(&shard) else {
            return Cursors::new();
        };
        let mine = devices.remove(&device).unwrap_or_default();
        *pairs -= mine.len();
        mine
    }

    /// Every shard's batch, emptying the batcher.
    fn take_all(&self) -> Vec<Batch> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        pending
            .into_iter()
            .filter(|(_, (devices, _))| !devices.is_empty())
            .map(|(shard, (devices, _))| (shard, flatten(devices)))
            .collect()
    }
}

/// Merges cursors: each channel keeps the larger seq.
pub fn merge(into: &mut Cursors, from: Cursors) {
    for (channel, seq) in from {
        let e = into.entry(channel).or_default();
        *e = (*e).max(seq);
    }
}

fn flatten(devices: BTreeMap<Id, Cursors>) -> Vec<(Id, Vec<(Id, u64)>)> {
    devices
        .into_iter()
        .map(|(device, cursors)| (device, cursors.into_iter().collect()))
        .collect()
}

/// Writes one shard's batch (one attempt: a failed write loses only cursors).
pub async fn write(peers: &Peers, (shard, devices): Batch) {
    let n = devices.len();
    if let Err(e) = peers
        .kv_shard(shard)
        .call(Request::SetCursorsBatch { devices })
        .await
    {
        tracing::debug!(shard, devices = n, error = %e, "cursor batch not written");
    }
}

/// Writes every shard's batch every [`CURSOR_FLUSH_MS`], the shards at once, for as long as
/// the server runs.
pub async fn flush_loop(peers: std::sync::Arc<Peers>, batcher: std::sync::Arc<CursorBatcher>) {
    loop {
        tokio::time::sleep(Duration::from_millis(CURSOR_FLUSH_MS)).await;
        let writes = batcher.take_all().into_iter().map(|b| write(&peers, b));
        futures::future::join_all(writes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_merge_and_fill() {
        let b = CursorBatcher::default();
        assert!(b.add(0, 7, [(1, 5), (2, 3)].into()).is_none());
        assert!(b.add(0, 7, [(1, 4), (2, 9)].into()).is_none());
        assert!(b.add(1, 8, [(3, 1)].into()).is_none());
        assert_eq!(b.take_device(0, 7), Cursors::from([(1, 5), (2, 9)]));
        assert!(b.take_device(0, 7).is_empty());
        let all = b.take_all();
        assert_eq!(all, vec![(1, vec![(8, vec![(3, 1)])])]);
        assert!(b.take_all().is_empty());
        // A full shard batch comes back at once, and the shard starts empty again.
        for d in 0..CURSOR_BATCH_DEVICES_MAX as u64 - 1 {
            assert!(b.add(2, d, [(1, 1)].into()).is_none());
        }
        let (shard, full) = b.add(2, u64::MAX, [(1, 1)].into()).expect("full");
        assert_eq!((shard, full.len()), (2, CURSOR_BATCH_DEVICES_MAX));
        assert!(b.take_all().is_empty());
        // A device names at most CURSOR_BATCH_PAIRS_MAX channels, and a shard's batch that
        // reaches that many pairs comes back at once.
        let many: Cursors = (0..CURSOR_BATCH_PAIRS_MAX as u64 + 5)
            .map(|c| (c, 1))
            .collect();
        let (shard, full) = b.add(3, 1, many).expect("full by pairs");
        assert_eq!((shard, full.len()), (3, 1));
        assert_eq!(full[0].1.len(), CURSOR_BATCH_PAIRS_MAX);
        assert!(
            b.add(3, 2, [(1, 1)].into()).is_none(),
            "the shard starts empty again"
        );
        assert_eq!(b.take_device(3, 2).len(), 1);
    }
}
