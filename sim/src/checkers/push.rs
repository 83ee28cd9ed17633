//! Push: one notification per (message, device), none to a device that stayed online, and one
//! for every device of a recipient that stayed offline.
//!
//! From `push`, `ack` and `send` (which message, sent and acked when), `membership`
//! (recipients at send time), `device` (registrations), the ground truth `heartbeat_start` /
//! `heartbeat_stop`, `connected` / `disconnected`, disruptive `fault` / `heal` windows and the
//! `end` phase (E). W = presence_timeout + presence_bound.
//!
//! - (a) no device is alerted twice for one message (one check per push). A second push of
//!   (message_id, device) is allowed only when both carry the same `collapse_id` (the
//!   platform replaces the first: one notification on the device) and it comes at least
//!   the claim's lifetime (`push_claim_ttl_us`, 60 s) after the one before: only a lapsed
//!   claim (its holder notified, then died or lost kv before confirming) lets another push
//!   node notify again. Such re-sends are counted in the report's notes;
//! - (b) a push at t for message m to device d is a violation if d heartbeat and stayed
//!   connected over all of [ts - W, t], ts being m's send time (its `send`, else its first ack,
//!   else t), unless a disruptive fault was active in that window (one check per judged push);
//! - (c) for every message acked with ta + P <= E (P = `push_bound_us`, 30 s), sent at ts: for
//!   every member at ts other than the sender whose known devices all did not heartbeat over
//!   [ts - W, ta + P] (a recipient that stays offline), every
//!   device of that member registered at or before ts must have a push for m by E (one check
//!   per (message, device)). When a fault on the push path (`push_path_fault`: a crash of
//!   push, presence or a kv node, or any disruptive kind) that disturbs those devices or the
//!   whole system was active in [ts - W, ta + P], the push may have been impossible in time:
//!   the device must then have the message by E, pushed or delivered.
//!
//! It does NOT check: that a pushed device belongs to a member of the message's channel, the
//! content of a notification, pushes to
//! users that were partly online (some device heartbeating: the rule leaves them free), how soon
//! a push arrives within E, or whether a push was followed by a delivery (no_loss does).

use std::collections::BTreeMap;

use super::index::{
    acked_messages, connections, end_time, heartbeats, off_throughout, on_throughout, AckedMessage,
    Devices, FaultWindows, Membership,
};
use super::{CheckReport, Params};
use crate::history::{Event, Id, Record};

/// A push: time, message, device, user, the platform's idempotency key.
#[derive(Debug, Clone)]
struct Push {
    t: u64,
    message_id: Id,
    device: Id,
    user: Id,
    collapse_id: Option<String>,
}

pub fn check(history: &[Record], params: &Params) -> CheckReport {
    let history = super::index::sorted(history);
    let pushes: Vec<Push> = history
        .iter()
        .filter_map(|r| match &r.ev {
            Event::Push {
                user,
                device,
                message_id,
                collapse_id,
            } => Some(Push {
                t: r.t_us,
                message_id: *message_id,
                device: *device,
                user: *user,
                collapse_id: collapse_id.clone(),
            }),
            _ => None,
        })
        .collect();
    // message_id -> message (first ack per id; ids checks that an id names one message).
    let mut by_id: BTreeMap<Id, AckedMessage> = BTreeMap::new();
    for m in acked_messages(&history).into_values() {
        by_id.entry(m.message_id).or_insert(m);
    }
    let mut report = CheckReport::new("push");
    pushed_once(&pushes, params, &mut report);
    none_to_online(&history, params, &pushes, &by_id, &mut report);
    offline_get_one(&history, params, &pushes, &by_id, &mut report);
    report
}

/// (a): each (message_id, device) alerts at most once: a second push must carry the first's
/// collapse id and come after the claim it raced could have lapsed.
fn pushed_once(pushes: &[Push], params: &Params, report: &mut CheckReport) {
    let mut last: BTreeMap<(Id, Id), &Push> = BTreeMap::new();
    let mut resends = 0u64;
    for p in pushes {
        let Some(prev) = last.insert((p.message_id, p.device), p) else {
            report.assert(true, String::new);
            continue;
        };
        let same_key = p.collapse_id.is_some() && p.collapse_id == prev.collapse_id;
        let lapsed = p.t >= prev.t + params.push_claim_ttl_us;
        if same_key && lapsed {
            report.assert(true, String::new);
            resends += 1;
            continue;
        }
        report.assert(false, || {
            let why = if same_key {
                format!(
                    "{} ms after it, before its claim could lapse",
                    (p.t - prev.t) / 1000
                )
            } else {
                format!(
                    "collapse ids {:?} then {:?}: the device alerts twice",
                    prev.collapse_id, p.collapse_id
                )
            };
            format!(
                "message {} pushed to device {} (user {}) again at t_us {}, first at t_us {} ({why})",
                p.message_id, p.device, p.user, p.t, prev.t
            )
        });
    }
    if resends > 0 {
        report.notes.push(format!(
            "{resends} notifications sent again {} s or more after the first (a lapsed claim), \
             under its collapse id (the platform replaces it: one notification on the device)",
            params.push_claim_ttl_us / 1_000_000
        ));
    }
}

/// (b): no push to a device that heartbeat and stayed connected since ts - W.
fn none_to_online(
    history: &[Record],
    params: &Params,
    pushes: &[Push],
    by_id: &BTreeMap<Id, AckedMessage>,
    report: &mut CheckReport,
) {
    let hb = heartbeats(history);
    let conn = connections(history);
    let faults = FaultWindows::build(history);
    for p in pushes {
        let ts = by_id
            .get(&p.message_id)
            .map_or(p.t, |m| m.sent_at().min(p.t));
        let a = ts.saturating_sub(params.offline_within_us());
        if faults.overlaps_for(a, p.t, &[p.device]) {
            continue;
        }
        let online = on_throughout(&hb, p.device, a, p.t) && on_throughout(&conn, p.device, a, p.t);
        report.assert(!online, || {
            format!(
                "message {} pushed at t_us {} to device {} (user {}), which heartbeat and stayed \
                connected since t_us {a} (sent t_us {ts})",
                p.message_id, p.t, p.device, p.user
            )
        });
    }
}

/// (c): every registered device of a recipient offline around the send gets a push by E.
fn offline_get_one(
    history: &[Record],
    params: &Params,
    pushes: &[Push],
    by_id: &BTreeMap<Id, AckedMessage>,
    report: &mut CheckReport,
) {
    let end = end_time(history);
    let hb = heartbeats(history);
    let members = Membership::build(history);
    let devices = Devices::build(history);
    let faults = FaultWindows::build_with(history, push_path_fault, 0);
    let delivered: std::collections::BTreeSet<(Id, Id)> = history
        .iter()
        .filter(|r| r.t_us <= end)
        .filter_map(|r| match &r.ev {
            Event::Deliver {
                message_id, device, ..
            } => Some((*message_id, *device)),
            _ => None,
        })
        .collect();
    let mut pushed: BTreeMap<(Id, Id), u64> = BTreeMap::new();
    for p in pushes.iter().filter(|p| p.t <= end) {
        pushed.entry((p.message_id, p.device)).or_insert(p.t);
    }
    for m in by_id.values() {
        let ts = m.sent_at();
        let (a, b) = (
            ts.saturating_sub(params.offline_within_us()),
            m.ack_t + params.push_bound_us,
        );
        if b > end {
            continue;
        }
        for user in members.members_at(m.channel, ts) {
            let offline = devices.all_of(user).all(|d| off_throughout(&hb, d, a, b));
            if user == m.sender || !offline {
                continue;
            }
            let all: Vec<Id> = devices.all_of(user).collect();
            let disturbed = faults.overlaps_for(a, b, &all);
            for device in devices.registered_of(user, ts) {
                let key = (m.message_id, device);
                let ok = pushed.contains_key(&key) || (disturbed && delivered.contains(&key));
                report.assert(ok, || {
                    format!(
                        "message {} (channel {}, sent t_us {ts}, acked t_us {}) never pushed to \
                        device {device} of user {user}, offline over [t_us {a}, {b}], by end t_us \
                        {end}",
                        m.message_id, m.channel, m.ack_t
                    )
                });
            }
        }
    }
}

/// Faults that can make a push impossible in time: a crash of the push node, of presence
/// (whose answer decides who is offline) or of a kv node (the recipient's devices and claims
/// live there), any kv storage or replication fault, and every disruptive (non-benign) kind.
/// A chat server crash is not one: its pending fanouts are redone within the bound.
fn push_path_fault(kind: &str, targets: &[String]) -> bool {
    match kind {
        "crash" => targets
            .iter()
            .any(|t| t.starts_with("push-") || t.starts_with("presence-") || t.starts_with("kv-")),
        k if super::KV_FAULT_KINDS.contains(&k) => true,
        k => !super::BENIGN_FAULT_KINDS.contains(&k),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::check;

    #[test]
    fn healthy_passes() {
        // Proves the healthy run's two pushes to offline device 31 pass all rules: 2 pushes x
        // (a, b) + 2 (message, device) pairs for (c) = 6 checks.
        let r = run(check, &healthy());
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.checks, 6);
    }

    #[test]
    fn double_push_fails() {
        // Proves (a): the same message pushed twice to one device is caught.
        let h = healthy_builder().push(7 * S, 31, 1000).build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("message 1000 pushed to device 31 (user 3) again"));
        assert!(r.violations[0].contains("before its claim could lapse"));
    }

    #[test]
    fn resend_after_a_lapsed_claim_under_the_same_key_passes() {
        // Proves (a) allows one re-send of (message, device) 60 s or more after the first
        // when it carries the same collapse id (the device shows one notification), and says
        // so in a note.
        let h = healthy_builder().push(70 * S, 31, 1000).build();
        let r = run(check, &h);
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(r.notes[0].starts_with("1 notifications sent again"));
    }

    #[test]
    fn resend_without_the_same_key_fails() {
        // Proves (a) catches a late re-send whose collapse id differs or is missing: the
        // device would alert twice.
        for key in [None, Some("other".to_string())] {
            let h = healthy_builder()
                .push_keyed(70 * S, 31, 1000, key.clone())
                .build();
            let r = run(check, &h);
            assert_eq!(r.violation_count, 1, "{key:?}: {:?}", r.violations);
            assert!(r.violations[0].contains("the device alerts twice"));
        }
    }

    #[test]
    fn push_to_online_device_fails() {
        // Proves (b): pushing a message to device 21 of user 2, heartbeating and connected
        // for the whole 40 s before the send and until the push, is caught (push to online
        // users).
        let h = H::new()
            .up(0, 1, 11)
            .up(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .send(60 * S, 11, 100, 1000)
            .ack(60 * S, 11, 100, 1000, 1)
            .push(61 * S, 21, 1000)
            .build();
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("pushed at t_us 61000000 to device 21"));
    }

    #[test]
    fn push_to_recently_connected_device_passes() {
        // Proves (b) allows a push to a device that was not online for the whole window before
        // the send (it connected only 2 s before): presence may still call it offline.
        let h = H::new()
            .up(0, 1, 11)
            .device(0, 2, 21)
            .join(0, 100, 1, 1)
            .join(0, 100, 2, 2)
            .connect(58 * S, 21)
            .hb_start(58 * S, 21)
            .send(60 * S, 11, 100, 1000)
            .ack(60 * S, 11, 100, 1000, 1)
            .push(60 * S, 21, 1000)
            .build();
        let r = run(check, &h);
        assert!(r.passed(), "{:?}", r.violations);
        assert!(r.checks >= 2);
    }

    #[test]
    fn missing_push_fails() {
        // Proves (c): an offline recipient device (31) that never gets a push is reported.
        let mut h = healthy();
        h.retain(|r| r.t_us != 6 * S + 50_000);
        let r = run(check, &h);
        assert_eq!(r.violation_count, 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("message 1001"));
        assert!(r.violations[0].contains("never pushed to device 31 of user 3"));
    }

    #[test]
    fn fault_lets_delivery_stand_in_for_a_push() {
        // Proves (c) under a disruptive fault: device 31 got message 1001 by delivery (at 100
        // s) but no push; a partition over the push window excuses the push, not the message.
        let with_partition = |h: H| {
            h.fault(6 * S, "partition", "push-0")
                .heal(20 * S, "partition", "push-0")
                .build()
        };
        let mut h = with_partition(healthy_builder());
        h.retain(|r| r.t_us != 6 * S + 50_000);
        let r = run(check, &h);
        assert!(r.passed(), "{:?}", r.violations);
        // Not delivered either: still a violation.
        h.retain(|r| r.t_us != 100 * S + 500_000);
        let r = run(check, &h);
        assert!(r
            .violations
            .iter()
            .any(|v| v.contains("never pushed to device 31")));
    }
}
