//! No duplicates: no device is handed the same message twice as new, and a retried send is one
//! message.
//!
//! From `deliver` and `ack` events only.
//!
//! - (a) per device, a (channel, message_id) is delivered at most once (one check per deliver);
//! - (b) a (sender user, sender device, client_msg_id) maps to one message_id across every ack
//!   (user, device, client_msg_id) and every deliver (sender, sender_device, client_msg_id)
//!   (one check per ack and deliver);
//! - (c) a device is never delivered a (channel, message_id) that it acked itself, at any time
//!   before or after the ack (one check per deliver).
//!
//! It does NOT check: repeated acks of one message to its sender (a retry may be acked again;
//! they must carry the same message_id, which (b) checks), duplicate push notifications (push
//! does), a message sent twice by the user with two different client_msg_ids (that is two
//! messages), or a deliver to the sending device of a message it never got an ack for.

use std::collections::BTreeMap;

use super::index::{seen, Seen};
use super::{CheckReport, Params};
use crate::history::{Id, Record};

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let seen = seen(&history);
    let mut report = CheckReport::new("no_duplicates");
    delivered_once(&seen, &mut report);
    retry_is_one_message(&seen, &mut report);
    own_message_not_delivered(&seen, &mut report);
    report
}

/// (a): each (device, channel, message_id) delivered at most once.
fn delivered_once(seen: &[Seen], report: &mut CheckReport) {
    let mut first: BTreeMap<(Id, Id, Id), u64> = BTreeMap::new();
    for s in seen.iter().filter(|s| !s.own) {
        let prev = first.insert((s.device, s.channel, s.message_id), s.t);
        report.assert(prev.is_none(), || {
            format!(
                "device {} (user {}) delivered message {} (channel {}, seq {}) again at t_us {}, \
                first at t_us {}",
                s.device,
                s.user,
                s.message_id,
                s.channel,
                s.seq,
                s.t,
                prev.unwrap_or_default()
            )
        });
    }
}

/// (b): one message_id per (sender, sender_device, client_msg_id).
fn retry_is_one_message(seen: &[Seen], report: &mut CheckReport) {
    let mut id_of: BTreeMap<(Id, Id, Id), &Seen> = BTreeMap::new();
    for s in seen {
        let first = *id_of
            .entry((s.sender, s.sender_device, s.client_msg_id))
            .or_insert(s);
        report.assert(first.message_id == s.message_id, || {
            format!(
                "send (user {} device {} client_msg_id {}) became two messages: {} ({} on device \
                {} at t_us {}) and {} ({} on device {} at t_us {})",
                s.sender,
                s.sender_device,
                s.client_msg_id,
                first.message_id,
                first.kind(),
                first.device,
                first.t,
                s.message_id,
                s.kind(),
                s.device,
                s.t
            )
        });
    }
}

/// (c): no deliver of a message to the device that acked it.
fn own_message_not_delivered(seen: &[Seen], report: &mut CheckReport) {
    let mut acked: BTreeMap<(Id, Id, Id), u64> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.own) {
        acked
            .entry((s.device, s.channel, s.message_id))
            .or_insert(s.t);
    }
    for s in seen.iter().filter(|s| !s.own) {
        let ack = acked.get(&(s.device, s.channel, s.message_id));
        report.assert(ack.is_none(), || {
            format!(
                "device {} (user {}) delivered its own message {} (channel {}) at t_us {}; it was \
                acked to it at t_us {}",
                s.device,
                s.user,
                s.message_id,
                s.channel,
                s.t,
                ack.copied().unwrap_or_default()
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::check;
    use crate::history::Event;

    #[test]
    fn healthy_passes() {
        // Proves the healthy run (including a retried send acked twice with one message_id)
        // has no duplicates: 6 delivers x 2 rules + 9 acks/delivers for (b) = 21 checks.
        let r = run(check, &healthy());
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.checks, 21);
    }

    #[test]
    fn redelivery_fails() {
        // Proves (a): the same message handed to a device twice (e.g. live, then again by a
        // sync after a reconnect) is caught.
        let h = healthy_builder().deliver(100 * S, 12, 1000).build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("device 12 (user 1) delivered message 1000"));
    }

    #[test]
    fn retry_creating_second_message_fails() {
        // Proves (b): a retried send (same client_msg_id) acked with a new message_id is caught.
        let h = healthy_builder()
            .ev(
                7 * S,
                Event::Ack {
                    user: 1,
                    device: 11,
                    channel: 100,
                    client_msg_id: cmid(1000),
                    message_id: 1005,
                    seq: 3,
                    digest: None,
                },
            )
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("became two messages: 1000"));
    }

    #[test]
    fn own_message_delivered_back_fails() {
        // Proves (c): a device handed its own acked message as new is caught.
        let h = healthy_builder().deliver(8 * S, 11, 1000).build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("delivered its own message 1000"));
    }
}
