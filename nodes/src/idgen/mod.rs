//! The id generator: 64-bit Snowflake ids (milliseconds since [`EPOCH_MS`], worker id,
//! sequence), time-sortable and unique.
//!
//! [`Snowflake`] is the I/O-free core: given the clock reading, it hands out ids that never
//! repeat and never go backwards, even when the clock does (it keeps its own high-water mark
//! and runs ahead of a lagging clock). `next(after)` also guarantees an id above `after`, which
//! is how a channel's ids stay increasing in commit order across several workers whose clocks
//! differ (kv refuses a stale id and the chat server asks again with `after`).
//!
//! Across restarts: the shell leases time ahead in kv ([`Snowflake::set_reserved`]); ids are
//! never issued past the lease, and a restarted worker starts above the last lease, so ids
//! never repeat or go backwards even if its clock is behind the last id it issued.
//! It does not lease worker ids yet: the cluster assigns each idgen node a distinct one.

pub mod server;

use crate::proto::Id;

/// 2020-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_577_836_800_000;
pub const WORKER_BITS: u32 = 10;
pub const SEQUENCE_BITS: u32 = 12;
pub const WORKER_MAX: u16 = (1 << WORKER_BITS) - 1;
const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;

/// The parts of an id.
pub fn decode(id: Id) -> (u64, u16, u16) {
    let ts = (id >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS;
    let worker = ((id >> SEQUENCE_BITS) & WORKER_MAX as u64) as u16;
    let seq = (id & SEQUENCE_MASK) as u16;
    (ts, worker, seq)
}

/// The smallest id issued at `ts_ms` or later: ids issued before it are below it.
pub fn first_id_at(ts_ms: u64) -> Id {
    encode(ts_ms.max(EPOCH_MS), 0, 0)
}

fn encode(ts_ms: u64, worker: u16, seq: u64) -> Id {
    ((ts_ms - EPOCH_MS) << (WORKER_BITS + SEQUENCE_BITS)) | ((worker as u64) << SEQUENCE_BITS) | seq
}

/// One worker's generator state.
#[derive(Debug, Clone)]
pub struct Snowflake {
    worker: u16,
    /// Milliseconds of the last id issued (may run ahead of the clock).
    last_ts_ms: u64,
    /// Sequence of the last id issued within `last_ts_ms`.
    last_seq: u64,
    /// No id is issued with milliseconds above this (the time leased in kv).
    reserved_until_ms: u64,
    /// The idgen-ignores-clock canary: take the clock's reading even below the last id.
    follow_clock: bool,
}

impl Snowflake {
    pub fn new(worker: u16) -> Self {
        assert!(
            worker <= WORKER_MAX,
            "worker id {worker} exceeds {WORKER_MAX}"
        );
        Self {
            worker,
            last_ts_ms: EPOCH_MS,
            last_seq: 0,
            reserved_until_ms: u64::MAX,
            follow_clock: false,
        }
    }

    /// The idgen-ignores-clock canary's bug: ids follow the clock even when it steps back.
    pub fn set_follow_clock(&mut self, on: bool) {
        self.follow_clock = on;
    }

    /// Resumes after a restart: never issue at or below `floor_ms`.
    pub fn with_floor(worker: u16, floor_ms: u64) -> Self {
        let mut s = Self::new(worker);
        s.last_ts_ms = floor_ms.max(EPOCH_MS);
        s.last_seq = SEQUENCE_MASK;
        s
    }

    pub fn worker(&self) -> u16 {
        self.worker
    }

    /// Milliseconds of the last id issued.
    pub fn high_water_ms(&self) -> u64 {
        self.last_ts_ms
    }

    /// Limits ids to milliseconds up to `until_ms` (the lease held in kv).
    pub fn set_reserved(&mut self, until_ms: u64) {
        self.reserved_until_ms = until_ms;
    }

    /// Like [`Snowflake::next`], but `None` if the id would pass the reserved time: the caller
    /// must renew the lease first. Nothing changes on `None`.
    pub fn try_next(&mut self, now_ms: u64, after: Option<Id>) -> Option<Id> {
        let saved = (self.last_ts_ms, self.last_seq);
        let id = self.next(now_ms, after);
        if decode(id).0 > self.reserved_until_ms {
            (self.last_ts_ms, self.last_seq) = saved;
            return None;
        }
        Some(id)
    }

    /// The next id, given the clock reading `now_ms`, greater than every id issued before and
    /// greater than `after`.
    pub fn next(&mut self, now_ms: u64, after: Option<Id>) -> Id {
        let now_ms = now_ms.max(EPOCH_MS);
        let mut ts = if self.follow_clock {
            now_ms
        } else {
            now_ms.max(self.last_ts_ms)
        };
        let mut seq = if ts == self.last_ts_ms {
            self.last_seq + 1
        } else {
            0
        };
        if seq > SEQUENCE_MASK {
            // 4096 ids in one millisecond: borrow the next millisecond.
            ts += 1;
            seq = 0;
        }
        if let Some(after) = after {
            let (after_ts, _, _) = decode(after);
            if encode(ts, self.worker, seq) <= after {
                ts = after_ts + 1;
                seq = 0;
            }
        }
        self.last_ts_ms = ts;
        self.last_seq = seq;
        let id = encode(ts, self.worker, seq);
        debug_assert!(
            after.is_none_or(|a| id > a),
            "id {id} must exceed {after:?}"
        );
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves ids strictly increase for one worker even when the clock stands still, goes
    // backwards, or 5000 ids are asked for within one millisecond.
    #[test]
    fn monotone_under_frozen_and_backward_clock() {
        let mut g = Snowflake::new(3);
        let t0 = EPOCH_MS + 1_000_000;
        let mut last = 0;
        for i in 0..5000u64 {
            let now = if i < 2500 { t0 } else { t0 - 500 };
            let id = g.next(now, None);
            assert!(id > last, "id {id} after {last} at step {i}");
            assert_eq!(decode(id).1, 3);
            last = id;
        }
    }

    // Proves `after` forces an id above an id from another worker whose clock runs ahead.
    #[test]
    fn after_beats_a_faster_worker() {
        let mut fast = Snowflake::new(1);
        let mut slow = Snowflake::new(2);
        let t0 = EPOCH_MS + 5_000_000;
        let a = fast.next(t0 + 200, None);
        let b = slow.next(t0, None);
        assert!(b < a, "the lagging worker issues a smaller id");
        let c = slow.next(t0, Some(a));
        assert!(c > a);
        // And stays above it afterwards.
        assert!(slow.next(t0, None) > c);
    }

    // Proves ids stop at the reserved time (and resume once it moves), and that a worker
    // restarted above its last lease issues ids above all earlier ones even with a clock 5 s
    // behind.
    #[test]
    fn reservation_bounds_ids_across_restarts() {
        let t0 = EPOCH_MS + 10_000_000;
        let mut g = Snowflake::new(1);
        g.set_reserved(t0 + 100);
        let last = g.try_next(t0 + 100, None).expect("inside the lease");
        assert_eq!(g.try_next(t0 + 101, None), None, "past the lease");
        g.set_reserved(t0 + 200);
        assert!(g.try_next(t0 + 101, None).expect("renewed") > last);
        let mut restarted = Snowflake::with_floor(1, t0 + 200);
        assert!(restarted.next(t0 - 5_000, None) > last);
    }

    // Proves two workers never collide at the same millisecond and sequence.
    #[test]
    fn workers_do_not_collide() {
        let mut a = Snowflake::new(1);
        let mut b = Snowflake::new(2);
        let t = EPOCH_MS + 42;
        let ids: std::collections::BTreeSet<_> = (0..100)
            .flat_map(|_| [a.next(t, None), b.next(t, None)])
            .collect();
        assert_eq!(ids.len(), 200);
    }
}
