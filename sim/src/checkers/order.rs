//! Order: every device sees each channel's messages in one total order, with no gaps once
//! synced.
//!
//! From `ack` (a device's own message) and `deliver` events, plus `membership` and `send`
//! (to know whether a missing message was meant for the device at all) and the `end` phase.
//!
//! - (a) one total order per channel: a (channel, message_id) always carries the same seq and a
//!   (channel, seq) always the same message_id, across all acks and delivers on all devices;
//! - (b) per device and channel, delivers come with strictly increasing seq and message_id;
//! - (c) no gaps at E: for every device and channel, every seq known to exist in the channel
//!   that lies between the smallest and the largest seq the device saw (delivers plus own acks)
//!   must have been seen by it, unless the device's user was not a member when that message
//!   was sent.
//!
//! It does NOT check: that the device saw anything at all (no_loss does), that message ids grow
//! with seq (ids does), that seqs start at 1 or that seqs nobody saw exist, the order of a
//! device's own acks relative to its delivers (an ack may legitimately overtake the deliver of
//! an earlier message), or duplicates (no_duplicates does; a re-delivery shows here only as a
//! non-increasing seq).

use std::collections::{BTreeMap, BTreeSet};

use super::index::{acked_messages, end_time, seen, Membership, Seen};
use super::{CheckReport, Params};
use crate::history::{Id, Record};

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let seen = seen(&history);
    let mut report = CheckReport::new("order");
    one_total_order(&seen, &mut report);
    increasing_per_device(&seen, &mut report);
    no_gaps(&history, &seen, &mut report);
    report
}

/// (a): the first observation of each (channel, message_id) and (channel, seq) fixes the pair.
fn one_total_order(seen: &[Seen], report: &mut CheckReport) {
    let mut seq_of: BTreeMap<(Id, Id), &Seen> = BTreeMap::new();
    let mut id_of: BTreeMap<(Id, u64), &Seen> = BTreeMap::new();
    for s in seen {
        let first = *seq_of.entry((s.channel, s.message_id)).or_insert(s);
        report.assert(first.seq == s.seq, || {
            format!(
                "channel {} message {}: seq {} on device {} ({} t_us {}) but seq {} on device {} \
                ({} t_us {})",
                s.channel,
                s.message_id,
                first.seq,
                first.device,
                first.kind(),
                first.t,
                s.seq,
                s.device,
                s.kind(),
                s.t
            )
        });
        let first = *id_of.entry((s.channel, s.seq)).or_insert(s);
        report.assert(first.message_id == s.message_id, || {
            format!(
                "channel {} seq {}: message {} on device {} ({} t_us {}) but message {} on device \
                {} ({} t_us {})",
                s.channel,
                s.seq,
                first.message_id,
                first.device,
                first.kind(),
                first.t,
                s.message_id,
                s.device,
                s.kind(),
                s.t
            )
        });
    }
}

/// (b): delivers per (device, channel) strictly increase in seq and message_id.
fn increasing_per_device(seen: &[Seen], report: &mut CheckReport) {
    let mut last: BTreeMap<(Id, Id), &Seen> = BTreeMap::new();
    for s in seen.iter().filter(|s| !s.own) {
        if let Some(prev) = last.insert((s.device, s.channel), s) {
            report.assert(s.seq > prev.seq, || {
                format!(
                    "device {} channel {}: deliver of seq {} (message {}) at t_us {} after seq {} \
                    (message {}) at t_us {}",
                    s.device,
                    s.channel,
                    s.seq,
                    s.message_id,
                    s.t,
                    prev.seq,
                    prev.message_id,
                    prev.t
                )
            });
            report.assert(s.message_id > prev.message_id, || {
                format!(
                    "device {} channel {}: deliver of message {} (seq {}) at t_us {} after message \
                    {} (seq {}) at t_us {}",
                    s.device, s.channel, s.message_id, s.seq, s.t, prev.message_id, prev.seq, prev.t
                )
            });
        }
    }
}

/// (c): at E, no known seq missing between a device's smallest and largest seen seq.
fn no_gaps(history: &[Record], seen: &[Seen], report: &mut CheckReport) {
    let end = end_time(history);
    let members = Membership::build(history);
    // (channel, seq) -> send time, for seqs whose message was acked.
    let sent_at: BTreeMap<(Id, u64), u64> = acked_messages(history)
        .values()
        .map(|m| ((m.channel, m.seq), m.sent_at()))
        .collect();
    let mut known: BTreeMap<Id, BTreeSet<u64>> = BTreeMap::new();
    // (device, channel) -> (user, seqs seen)
    let mut saw: BTreeMap<(Id, Id), (Id, BTreeSet<u64>)> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.t <= end) {
        known.entry(s.channel).or_default().insert(s.seq);
        let entry = saw.entry((s.device, s.channel));
        entry
            .or_insert_with(|| (s.user, BTreeSet::new()))
            .1
            .insert(s.seq);
    }
    for (&(device, channel), (user, seqs)) in &saw {
        let (Some(&lo), Some(&hi)) = (seqs.first(), seqs.last()) else {
            continue;
        };
        for &k in known
            .get(&channel)
            .into_iter()
            .flat_map(|k| k.range(lo..=hi))
        {
            let meant = sent_at
                .get(&(channel, k))
                .is_none_or(|&ts| members.is_member(channel, *user, ts));
            if meant {
                report.assert(seqs.contains(&k), || {
                    format!(
                        "device {device} (user {user}) channel {channel}: seq {k} missing at end \
                        t_us {end} (saw seqs {lo}..={hi})"
                    )
                });
            }
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
        // Proves a consistent history (two messages seen in seq order everywhere, a retried ack
        // with the same seq, a late sync) passes all three order rules with checks counted.
        let r = run(check, &healthy());
        assert!(r.passed(), "{:?}", r.violations);
        assert!(r.checks >= 20, "checks {}", r.checks);
    }

    #[test]
    fn same_message_two_seqs_fails() {
        // Proves (a): one message carrying seq 1 on one device and seq 2 on another is caught.
        let h = healthy_builder()
            .ev(
                7 * S,
                Event::Deliver {
                    user: 3,
                    device: 31,
                    channel: 100,
                    message_id: 1000,
                    sender: 1,
                    sender_device: 11,
                    client_msg_id: cmid(1000),
                    seq: 2,
                    digest: None,
                },
            )
            .build();
        let r = run(check, &h);
        assert!(!r.passed());
        assert!(
            r.violations[0].contains("message 1000: seq 1"),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn two_messages_one_seq_fails() {
        // Proves (a): two different messages acked with the same seq in one channel is caught.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .ack(S, 11, 100, 1000, 1)
            .ack(2 * S, 21, 100, 1001, 1)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("channel 100 seq 1: message 1000"));
    }

    #[test]
    fn out_of_order_deliver_fails() {
        // Proves (b): a device handed seq 2 before seq 1 is caught (seq and id both go back).
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .ack(S, 11, 100, 1000, 1)
            .ack(S, 11, 100, 1001, 2)
            .deliver(2 * S, 21, 1001)
            .deliver(3 * S, 21, 1000)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 2, "{:?}", r.violations);
        assert!(r.violations[0].contains("device 21 channel 100: deliver of seq 1"));
    }

    #[test]
    fn gap_fails() {
        // Proves (c): a member device that saw seqs 1 and 3 but never 2 is reported at E.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .ack(S, 11, 100, 1000, 1)
            .ack(S, 11, 100, 1001, 2)
            .ack(S, 11, 100, 1002, 3)
            .deliver(2 * S, 21, 1000)
            .deliver(2 * S, 21, 1002)
            .phase(10 * S, "end")
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("device 21 (user 2) channel 100: seq 2 missing"));
    }

    #[test]
    fn gap_while_not_a_member_passes() {
        // Proves (c) does not demand a message sent while the device's user had left the
        // channel: seq 2 sent between leave and re-join is not a gap for device 21.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .ack(S, 11, 100, 1000, 1)
            .deliver(S, 21, 1000)
            .leave(2 * S, 100, 2, 1)
            .send(3 * S, 11, 100, 1001)
            .ack(3 * S, 11, 100, 1001, 2)
            .join(4 * S, 100, 2, 2)
            .ack(5 * S, 11, 100, 1002, 3)
            .deliver(5 * S, 21, 1002)
            .build();
        let r = run(check, &h);
        assert!(r.passed(), "{:?}", r.violations);
        assert!(r.checks > 0);
    }
}
