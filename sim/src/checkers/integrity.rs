//! Integrity: every text a device is handed is the text that was sent.
//!
//! From `send`, `ack` and `deliver` events and their `digest` (CRC-32 of the text, see
//! `nodes::client::device::text_digest`):
//!
//! - (a) an ack carries the digest of its send (the sending device's own copy, or the stored
//!   text when its sync found the message), one check per ack;
//! - (b) a deliver carries the digest of the send it comes from (sender device, channel,
//!   client_msg_id), one check per deliver;
//! - (c) every device sees one digest per (channel, message_id), one check per ack and
//!   deliver.
//!
//! It does NOT check events without a digest (histories written before it existed, or by
//! tools that leave it out), nor delivers whose send is not in the history (a send outside
//! the recorded window): (c) still holds for those. A CRC-32 misses a corruption with
//! probability 2^-32 per text.

use std::collections::BTreeMap;

use super::index::{seen, Seen};
use super::{CheckReport, Params};
use crate::history::{Event, Id, Record};

pub fn check(history: &[Record], _params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let mut report = CheckReport::new("integrity");
    // (sender device, channel, client_msg_id) -> the digest it was sent with.
    let mut sent: BTreeMap<(Id, Id, Id), &str> = BTreeMap::new();
    for r in history.iter() {
        if let Event::Send {
            device,
            channel,
            client_msg_id,
            digest: Some(d),
            ..
        } = &r.ev
        {
            sent.insert((*device, *channel, *client_msg_id), d);
        }
    }
    let mut first: BTreeMap<(Id, Id), Seen> = BTreeMap::new();
    for s in seen(&history) {
        let Some(d) = s.digest.as_deref() else {
            continue;
        };
        if let Some(want) = sent.get(&(s.sender_device, s.channel, s.client_msg_id)) {
            report.assert(d == *want, || {
                format!(
                    "device {} (user {}) was handed message {} (channel {}, seq {}) at t_us {} \
                     with text digest {d}, but device {} sent it with {want} ({})",
                    s.device,
                    s.user,
                    s.message_id,
                    s.channel,
                    s.seq,
                    s.t,
                    s.sender_device,
                    s.kind()
                )
            });
        }
        let earlier = first.entry((s.channel, s.message_id)).or_insert(s.clone());
        let same = earlier.digest.as_deref() == Some(d);
        report.assert(same, || {
            format!(
                "message {} (channel {}) reached device {} at t_us {} with text digest {d}, \
                 and device {} at t_us {} with {}",
                s.message_id,
                s.channel,
                s.device,
                s.t,
                earlier.device,
                earlier.t,
                earlier.digest.as_deref().unwrap_or("-")
            )
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::check;

    // Proves a healthy history checks every ack and deliver and passes.
    #[test]
    fn healthy_passes() {
        let r = check(&healthy(), &Default::default());
        assert!(r.passed(), "{:?}", r.violations);
        assert!(r.checks > 0);
    }

    // Proves a delivered text that differs from the sent one fails (b) and (c), naming both
    // digests.
    #[test]
    fn an_altered_text_fails() {
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .join(0, 5, 1, 1)
            .join(0, 5, 2, 2)
            .send(S, 11, 5, 100)
            .ack(2 * S, 11, 5, 100, 1)
            .deliver_digest(3 * S, 21, 100, "deadbeef")
            .build();
        let r = check(&h, &Default::default());
        assert!(!r.passed());
        assert!(r.violations[0].contains("deadbeef"), "{:?}", r.violations);
        assert!(
            r.violations[0].contains(&digest_of(100)),
            "{:?}",
            r.violations
        );
    }
}
