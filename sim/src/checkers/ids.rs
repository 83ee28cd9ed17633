//! IDs: message ids are unique across the run and increase per channel in commit order.
//!
//! From `ack` and `deliver` events only.
//!
//! - (a) uniqueness: one message_id never names two different (channel, sender, sender_device,
//!   client_msg_id), comparing every ack and deliver against the first one seen for that id
//!   (one check per ack and deliver);
//! - (b) monotonic: per channel, take the known (seq, message_id) pairs (the first message_id
//!   seen for each seq), sorted by seq; the ids must strictly increase (one check per adjacent
//!   pair).
//!
//! - (c) per idgen worker, ids follow real time: message ids are Snowflake ids (ms since the
//!   epoch << 22 | worker << 12 | sequence); for two messages A and B whose ids carry the same
//!   worker, if A was acked before B was first sent (B's id was issued after A's), A's id must
//!   be smaller. A worker whose ids follow a clock that stepped back breaks this. One check
//!   per acked message that has a send.
//!
//! It does NOT check: ids of messages nobody observed (sent but never acked or delivered),
//! gaps in the seqs, a seq carrying two ids (order does), that an id's time is near the real
//! time, or ordering across workers or channels (workers' clocks differ).

use std::collections::BTreeMap;

use super::index::{seen, Seen};
use super::{CheckReport, Params};
use crate::history::{Id, Record};

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let seen = seen(&history);
    let mut report = CheckReport::new("ids");
    unique(&seen, &mut report);
    increasing_per_channel(&seen, &mut report);
    per_worker_in_real_time(&history, &mut report);
    report
}

/// The idgen worker an id was issued by (bits 12..22 of a Snowflake id).
fn worker(id: Id) -> u64 {
    (id >> 12) & 0x3ff
}

/// (c): per worker, an id issued after another was acknowledged is larger.
fn per_worker_in_real_time(history: &[Record], report: &mut CheckReport) {
    // Per worker: (acks, sends), each as (time, id), sorted by time below.
    type Timed = Vec<(u64, Id)>;
    let mut by_worker: BTreeMap<u64, (Timed, Timed)> = BTreeMap::new();
    for m in super::index::acked_messages(history).into_values() {
        let w = by_worker.entry(worker(m.message_id)).or_default();
        w.0.push((m.ack_t, m.message_id));
        if let Some(t) = m.send_t {
            w.1.push((t, m.message_id));
        }
    }
    for (w, (mut acks, mut sends)) in by_worker {
        acks.sort_unstable();
        sends.sort_unstable();
        let mut i = 0;
        let mut max_acked: Option<(Id, u64)> = None;
        for (send_t, id) in sends {
            while i < acks.len() && acks[i].0 < send_t {
                if max_acked.is_none_or(|(m, _)| acks[i].1 > m) {
                    max_acked = Some((acks[i].1, acks[i].0));
                }
                i += 1;
            }
            report.assert(max_acked.is_none_or(|(m, _)| id > m), || {
                let (m, t) = max_acked.unwrap_or_default();
                format!(
                    "idgen worker {w}: message id {id} was issued after a send at t_us {send_t}, \
                    yet id {m} of the same worker was acked earlier (t_us {t}) and is larger: \
                    ids went backwards in time"
                )
            });
        }
    }
}

/// (a): message_id -> one (channel, sender, sender_device, client_msg_id).
fn unique(seen: &[Seen], report: &mut CheckReport) {
    let identity = |s: &Seen| (s.channel, s.sender, s.sender_device, s.client_msg_id);
    let mut first: BTreeMap<Id, &Seen> = BTreeMap::new();
    for s in seen {
        let f = *first.entry(s.message_id).or_insert(s);
        report.assert(identity(f) == identity(s), || {
            format!(
                "message id {} names two messages: channel {} from user {} device {} client_msg_id \
                {} ({} on device {} at t_us {}) and channel {} from user {} device {} \
                client_msg_id {} ({} on device {} at t_us {})",
                s.message_id, f.channel, f.sender, f.sender_device, f.client_msg_id, f.kind(),
                f.device, f.t, s.channel, s.sender, s.sender_device, s.client_msg_id, s.kind(),
                s.device, s.t
            )
        });
    }
}

/// (b): within a channel, ids strictly increase with seq.
fn increasing_per_channel(seen: &[Seen], report: &mut CheckReport) {
    let mut by_seq: BTreeMap<Id, BTreeMap<u64, &Seen>> = BTreeMap::new();
    for s in seen {
        by_seq
            .entry(s.channel)
            .or_default()
            .entry(s.seq)
            .or_insert(s);
    }
    for (channel, seqs) in &by_seq {
        let pairs: Vec<&Seen> = seqs.values().copied().collect();
        for w in pairs.windows(2) {
            let (a, b) = (w[0], w[1]);
            report.assert(a.message_id < b.message_id, || {
                format!(
                    "channel {channel}: seq {} has message id {} (t_us {}) but later seq {} has \
                    message id {} (t_us {}), ids not increasing in commit order",
                    a.seq, a.message_id, a.t, b.seq, b.message_id, b.t
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::check;
    use crate::history::Event;

    #[test]
    fn healthy_passes() {
        // Proves consistent ids pass: 9 acks/delivers for (a) + 1 adjacent pair for (b) + 2
        // sent messages for (c).
        let r = run(check, &healthy());
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.checks, 12);
    }

    #[test]
    fn worker_going_back_in_time_fails() {
        // Proves (c): worker 1 issues id (5 << 22 | 1 << 12) after acking (9 << 22 | 1 << 12)
        // in another channel: caught. The same ids from two workers are not compared.
        let id = |ms: u64, worker: u64| (ms << 22) | (worker << 12);
        let h = H::new()
            .up(0, 1, 11)
            .send(S, 11, 100, id(9, 1))
            .ack(S + 1, 11, 100, id(9, 1), 1)
            .send(2 * S, 11, 200, id(5, 2))
            .ack(2 * S + 1, 11, 200, id(5, 2), 1)
            .build();
        assert!(run(check, &h).passed());
        let h = H::new()
            .up(0, 1, 11)
            .send(S, 11, 100, id(9, 1))
            .ack(S + 1, 11, 100, id(9, 1), 1)
            .send(2 * S, 11, 200, id(5, 1))
            .ack(2 * S + 1, 11, 200, id(5, 1), 1)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("ids went backwards in time"));
    }

    #[test]
    fn reused_id_fails() {
        // Proves (a): one message id reused for a different message (another channel and
        // sender, as two idgen workers sharing a worker id would do) is caught.
        let h = healthy_builder()
            .up(7 * S, 4, 41)
            .ack(8 * S, 41, 200, 1000, 1)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("message id 1000 names two messages"));
    }

    #[test]
    fn deliver_with_wrong_sender_fails() {
        // Proves (a) also compares delivers: a deliver of id 1001 claiming another sender
        // device than its ack is caught.
        let ev = Event::Deliver {
            user: 3,
            device: 31,
            channel: 100,
            message_id: 1001,
            sender: 2,
            sender_device: 22,
            client_msg_id: cmid(1001),
            seq: 2,
            digest: None,
        };
        let r = run(check, &healthy_builder().ev(7 * S, ev).build());
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
    }

    #[test]
    fn id_going_backwards_fails() {
        // Proves (b): a later seq with a smaller id (a clock step on idgen) is caught.
        let h = H::new()
            .up(0, 1, 11)
            .ack(S, 11, 100, 500, 1)
            .ack(2 * S, 11, 100, 400, 2)
            .ack(3 * S, 11, 100, 600, 3)
            .build();
        let r = run(check, &h);
        assert_eq!((r.checks, r.violation_count), (5, 1), "{:?}", r.violations);
        assert!(r.violations[0].contains("seq 1 has message id 500"));
    }
}
