//! No loss: every acknowledged message reaches every device of every member, by the end.
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
//! It does NOT check: how fast delivery happened (only "by E"; the harness is expected to stop
//! sending and heal faults early enough in the liveness phase), delivery to devices that were
//! only ever seen in other events without a `device` registration, messages that were sent but
//! never acked (they may legitimately be lost), the order or uniqueness of deliveries (order,
//! no_duplicates), or that the deliver carried the right seq or sender (order, ids).

use std::collections::BTreeSet;

use super::index::{acked_messages, end_time, Devices, Membership};
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
    for m in acked_messages(&history).values().filter(|m| m.ack_t <= end) {
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
