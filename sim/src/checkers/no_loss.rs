//! No loss: every acknowledged message reaches every device of every member, by the end, and
//! a sync misses nothing acknowledged before it was asked.
//!
//! From `ack` (what was acknowledged, by whom, when), `send` (the send time, matched on
//! (user, device, client_msg_id, channel); the first ack's time if the send is missing),
//! `membership` (members at send time), `device` (which devices count) and `deliver`, judged at
//! E (the `end` phase event, else the last record).
//!
//! For every message acked at or before E, for every user that was a member of the channel at
//! send time (the sender included), for every device of that user registered by a `device`
//! event at or before E, except the sending device itself (its ack is its delivery): there must
//! be a `deliver` of (channel, message_id) to that device at or before E. One check per
//! (message, device).
//!
//! (b) Fresh syncs. A `synced` answers the oldest unanswered `sync` of its device on the same
//! connection (answers come in order; `connected` and `disconnected` start over). For every
//! channel the device's user is a member of when it asked: the device must hold, by the
//! `synced`, every message of the channel acknowledged to its sender before the `sync` was
//! asked and sent while the user was a member (that message was committed before the request,
//! so a linearizable read after it returns it). Checked on the highest seq the device holds
//! (delivers and its own acks; order checks that nothing below it is missing). One check per
//! (synced, channel). A sync answered with an error is no `synced`; matching an answer to an
//! older request than its own only weakens the check.
//!
//! It does NOT check: how fast delivery happened (only "by E"; the harness is expected to stop
//! sending and heal faults early enough in the liveness phase), delivery to devices that were
//! only ever seen in other events without a `device` registration, messages that were sent but
//! never acked (they may legitimately be lost), the order or uniqueness of deliveries (order,
//! no_duplicates), or that the deliver carried the right seq or sender (order, ids).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::index::{acked_messages, end_time, AckedMessage, Devices, Membership};
use super::{CheckReport, Params};
use crate::history::{Event, Id, Record};

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let end = end_time(&history);
    let members = Membership::build(&history);
    let devices = Devices::build(&history);
    let delivered: BTreeSet<(Id, Id, Id)> = history
        .iter()
        .filter(|r| r.t_us <= end)
        .filter_map(|r| match &r.ev {
            Event::Deliver {
                device,
                channel,
                message_id,
                ..
            } => Some((*device, *channel, *message_id)),
            _ => None,
        })
        .collect();
    let mut report = CheckReport::new("no_loss");
    let acked = acked_messages(&history);
    syncs_are_fresh(&history, &members, &acked, &mut report);
    for m in acked.values().filter(|m| m.ack_t <= end) {
        let ts = m.sent_at();
        for user in members.members_at(m.channel, ts) {
            for device in devices.registered_of(user, end) {
                if device == m.sender_device {
                    continue;
                }
                let ok = delivered.contains(&(device, m.channel, m.message_id));
                report.assert(ok, || {
                    format!(
                        "message {} (channel {}, seq {}, from user {} device {}, sent t_us {}, \
                        acked t_us {}) never delivered to device {} of member {} by end t_us {}",
                        m.message_id,
                        m.channel,
                        m.seq,
                        m.sender,
                        m.sender_device,
                        ts,
                        m.ack_t,
                        device,
                        user,
                        end
                    )
                });
            }
        }
    }
    report
}

/// (b): every `synced` holds what was acknowledged before its `sync`.
fn syncs_are_fresh(
    history: &[Record],
    members: &Membership,
    acked: &BTreeMap<(Id, Id), AckedMessage>,
    report: &mut CheckReport,
) {
    // Per channel: its acknowledged messages by ack time.
    let mut by_channel: BTreeMap<Id, Vec<&AckedMessage>> = BTreeMap::new();
    for m in acked.values() {
        by_channel.entry(m.channel).or_default().push(m);
    }
    for v in by_channel.values_mut() {
        v.sort_by_key(|m| (m.ack_t, m.seq));
    }
    // Per (device, channel): the highest seq held so far.
    let mut held: BTreeMap<(Id, Id), u64> = BTreeMap::new();
    let mut asked: BTreeMap<Id, VecDeque<u64>> = BTreeMap::new();
    let mut channels: BTreeMap<Id, Vec<Id>> = BTreeMap::new();
    for r in history {
        match &r.ev {
            Event::Deliver {
                device,
                channel,
                seq,
                ..
            }
            | Event::Ack {
                device,
                channel,
                seq,
                ..
            } => {
                let h = held.entry((*device, *channel)).or_insert(0);
                *h = (*h).max(*seq);
            }
            Event::Sync { device, .. } => asked.entry(*device).or_default().push_back(r.t_us),
            Event::Connected { device, .. } | Event::Disconnected { device, .. } => {
                asked.remove(device);
            }
            Event::Synced { user, device } => {
                let Some(t_asked) = asked.get_mut(device).and_then(|q| q.pop_front()) else {
                    continue;
                };
                let of_user = channels
                    .entry(*user)
                    .or_insert_with(|| members.channels_of(*user));
                for &channel in of_user.iter() {
                    if !members.is_member(channel, *user, t_asked) {
                        continue;
                    }
                    let msgs = by_channel.get(&channel).map_or(&[][..], |v| v.as_slice());
                    let before = msgs.partition_point(|m| m.ack_t < t_asked);
                    let need = msgs[..before]
                        .iter()
                        .filter(|m| members.is_member(channel, *user, m.sent_at()))
                        .max_by_key(|m| m.seq);
                    let Some(need) = need else { continue };
                    let have = held.get(&(*device, channel)).copied().unwrap_or(0);
                    report.assert(have >= need.seq, || {
                        format!(
                            "device {device} (user {user}) was answered `synced` at t_us {} for \
                             a sync asked at t_us {t_asked}, holding only seq {have} of channel \
                             {channel}: seq {} (message {}) was acked at t_us {}, before the \
                             sync was asked (a stale read)",
                            r.t_us, need.seq, need.message_id, need.ack_t
                        )
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::check;

    #[test]
    fn healthy_passes() {
        // Proves every (message, device) pair of the healthy run is found delivered: two
        // messages x three non-sending member devices = 6 checks, late sync included.
        let r = run(check, &healthy());
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.checks, 6);
    }

    #[test]
    fn missing_delivery_fails() {
        // Proves a member device that never receives an acked message is reported, and that the
        // sender's other device counts as a recipient.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 1, 12)
            .up(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .send(S, 11, 100, 1000)
            .ack(S, 11, 100, 1000, 1)
            .deliver(2 * S, 21, 1000)
            .phase(10 * S, "end")
            .build();
        let r = run(check, &h);
        assert_eq!((r.checks, r.violation_count), (2, 1), "{:?}", r.violations);
        assert!(r.violations[0].contains("never delivered to device 12 of member 1"));
    }

    #[test]
    fn a_stale_sync_fails() {
        // Proves (b): a sync asked after message 1000 was acked, answered `synced` before the
        // device held it, is a stale read, even though the message arrives later (by the end);
        // a sync asked before the ack owes nothing.
        let h = |answered_before: bool| {
            let b = H::new()
                .up(0, 1, 11)
                .up(0, 2, 21)
                .join(0, 100, 1, 1)
                .join(0, 100, 2, 2)
                .sync(S / 2, 21)
                .synced(S / 2 + 1, 21)
                .send(S, 11, 100, 1000)
                .ack(S, 11, 100, 1000, 1)
                .sync(2 * S, 21);
            let b = if answered_before {
                b.synced(3 * S, 21).deliver(4 * S, 21, 1000)
            } else {
                b.deliver(3 * S, 21, 1000).synced(4 * S, 21)
            };
            b.phase(10 * S, "end").build()
        };
        let r = run(check, &h(true));
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("stale read"), "{:?}", r.violations);
        let r = run(check, &h(false));
        assert!(r.passed(), "{:?}", r.violations);
    }

    #[test]
    fn delivery_after_end_fails() {
        // Proves delivery must happen by E: a deliver recorded after the end phase event does
        // not count.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .ack(S, 11, 100, 1000, 1)
            .phase(10 * S, "end")
            .deliver(11 * S, 21, 1000)
            .build();
        let r = run(check, &h);
        assert_eq!((r.checks, r.violation_count), (1, 1), "{:?}", r.violations);
    }

    #[test]
    fn only_members_at_send_time_count() {
        // Proves a user who joined after the send, or left before it, is not owed the message,
        // and a member who left after the send still is (device 31 owes nothing, 21 does).
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .up(0, 3, 31)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .join(0, 100, 3, 3)
            .leave(S, 100, 3, 2)
            .send(2 * S, 11, 100, 1000)
            .ack(3 * S, 11, 100, 1000, 1)
            .leave(4 * S, 100, 2, 1)
            .up(0, 4, 41)
            .join(5 * S, 100, 4, 2)
            .phase(10 * S, "end")
            .build();
        let r = run(check, &h);
        assert_eq!((r.checks, r.violation_count), (1, 1), "{:?}", r.violations);
        assert!(r.violations[0].contains("device 21 of member 2"));
    }
}
