//! Limits and access: groups stay within the size limit, oversized messages are never stored,
//! and nobody reads or posts in a channel they are not a member of.
//!
//! From `membership` (counts and who is a member when), `send` (characters and send time,
//! matched on (user, device, client_msg_id)), `ack` and `deliver`.
//!
//! - (a) no `membership` event reports more than max_group_members members (one check each);
//! - (b) no `ack` for a send of more than max_message_chars characters (one check per ack whose
//!   send was recorded);
//! - (c) no `deliver` to a user that is not a member of the channel at the deliver time, unless
//!   it was a member when the message was sent (a member removed after the send is still owed
//!   the message by no_loss); one check per deliver;
//! - (d) no `ack` for a send by a user who was not a member of the channel at send time (the
//!   `send` event's time, else the ack's); one check per ack.
//!
//! It does NOT check: 1:1 channels having exactly two members, that the `members` count agrees
//! with the joins and leaves, that the server refused oversized or non-member sends with the
//! right reason (`send_failed` is not judged), bytes (only characters count), acks whose send
//! was not recorded (for (b)), or who may read presence or receive pushes.

use std::collections::BTreeMap;

use super::index::{acked_messages, send_times, Membership};
use super::{CheckReport, Params};
use crate::history::{Event, Id, Record};

pub fn check(history: &[Record], params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let members = Membership::build(&history);
    let mut report = CheckReport::new("limits");
    group_size(&history, params, &mut report);
    message_size(&history, params, &mut report);
    read_access(&history, &members, &mut report);
    post_access(&history, &members, &mut report);
    report
}

/// (a): membership counts within the limit.
fn group_size(history: &[Record], params: &Params, report: &mut CheckReport) {
    for r in history {
        if let Event::Membership {
            channel,
            user,
            members,
            ..
        } = &r.ev
        {
            report.assert(*members <= params.max_group_members, || {
                format!(
                    "channel {channel} has {members} members (limit {}) after user {user} changed \
                    at t_us {}",
                    params.max_group_members, r.t_us
                )
            });
        }
    }
}

/// (b): no ack of a send over the character limit.
fn message_size(history: &[Record], params: &Params, report: &mut CheckReport) {
    let mut chars_of: BTreeMap<(Id, Id, Id), u64> = BTreeMap::new();
    for r in history {
        match &r.ev {
            Event::Send {
                user,
                device,
                client_msg_id,
                chars,
                ..
            } => {
                chars_of
                    .entry((*user, *device, *client_msg_id))
                    .or_insert(*chars);
            }
            Event::Ack {
                user,
                device,
                client_msg_id,
                message_id,
                channel,
                ..
            } => {
                let Some(&chars) = chars_of.get(&(*user, *device, *client_msg_id)) else {
                    continue;
                };
                report.assert(chars <= params.max_message_chars, || {
                    format!(
                        "message {message_id} (channel {channel}, user {user} device {device} \
                        client_msg_id {client_msg_id}) of {chars} chars (limit {}) acked at t_us \
                        {}",
                        params.max_message_chars, r.t_us
                    )
                });
            }
            _ => {}
        }
    }
}

/// (c): deliveries only to members (at deliver time, or at the message's send time).
fn read_access(history: &[Record], members: &Membership, report: &mut CheckReport) {
    let sent_at: BTreeMap<(Id, Id), u64> = acked_messages(history)
        .into_iter()
        .map(|(k, m)| (k, m.sent_at()))
        .collect();
    let sends = send_times(history);
    for r in history {
        let Event::Deliver {
            user,
            device,
            channel,
            message_id,
            sender,
            sender_device,
            client_msg_id,
            ..
        } = &r.ev
        else {
            continue;
        };
        let ts = sent_at
            .get(&(*channel, *message_id))
            .or_else(|| sends.get(&(*sender, *sender_device, *client_msg_id, *channel)));
        let ok = members.is_member(*channel, *user, r.t_us)
            || ts.is_some_and(|&ts| members.is_member(*channel, *user, ts));
        report.assert(ok, || {
            format!(
                "message {message_id} (channel {channel}) delivered at t_us {} to device {device} \
                of user {user}, not a member then nor at send time",
                r.t_us
            )
        });
    }
}

/// (d): acks only for sends by members at send time.
fn post_access(history: &[Record], members: &Membership, report: &mut CheckReport) {
    let sends = send_times(history);
    for r in history {
        let Event::Ack {
            user,
            device,
            channel,
            client_msg_id,
            message_id,
            ..
        } = &r.ev
        else {
            continue;
        };
        let key = (*user, *device, *client_msg_id, *channel);
        let ts = sends.get(&key).copied().unwrap_or(r.t_us);
        report.assert(members.is_member(*channel, *user, ts), || {
            format!(
                "message {message_id} acked at t_us {} for user {user} device {device} in channel \
                {channel}, sent at t_us {ts} by a non-member",
                r.t_us
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::check;

    #[test]
    fn healthy_passes() {
        // Proves the healthy run respects limits and access: 3 memberships + 3 acks with sends
        // for (b) + 6 delivers + 3 acks = 15 checks.
        let r = run(check, &healthy());
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.checks, 15);
    }

    #[test]
    fn group_of_101_fails() {
        // Proves (a): a join that makes a group of 101 is caught; 100 is fine.
        let h = H::new()
            .join(S, 100, 1, 100)
            .join(2 * S, 100, 2, 101)
            .build();
        let r = run(check, &h);
        assert_eq!((r.checks, r.violation_count), (2, 1), "{:?}", r.violations);
        assert!(r.violations[0].contains("channel 100 has 101 members"));
    }

    #[test]
    fn oversized_message_acked_fails() {
        // Proves (b): a 100,001-character message that was acked (stored) is caught, and a
        // 100,000-character one is not.
        let h = H::new()
            .up(0, 1, 11)
            .join(0, 100, 1, 1)
            .send_chars(S, 11, 100, 1000, 100_000)
            .ack(S, 11, 100, 1000, 1)
            .send_chars(2 * S, 11, 100, 1001, 100_001)
            .ack(2 * S, 11, 100, 1001, 2)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("message 1001"));
        assert!(r.violations[0].contains("100001 chars"));
    }

    #[test]
    fn deliver_to_non_member_fails() {
        // Proves (c): a message sent after user 2 left, delivered to its device, is caught;
        // the one sent before it left (delivered after) is allowed.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .send(S, 11, 100, 1000)
            .ack(S, 11, 100, 1000, 1)
            .leave(2 * S, 100, 2, 1)
            .send(3 * S, 11, 100, 1001)
            .ack(3 * S, 11, 100, 1001, 2)
            .deliver(4 * S, 21, 1000)
            .deliver(4 * S, 21, 1001)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("message 1001 (channel 100) delivered"));
    }

    #[test]
    fn post_by_non_member_fails() {
        // Proves (d): an ack for a send by a user who never joined the channel is caught.
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 9, 91)
            .join(0, 100, 1, 1)
            .send(S, 91, 100, 1000)
            .ack(S, 91, 100, 1000, 1)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("for user 9 device 91 in channel 100"));
    }
}
