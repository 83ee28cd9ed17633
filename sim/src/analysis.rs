//! Figures a run reports besides its invariants, computed from the history alone: how long
//! the system took to converge after the faults healed, and what each chat server crash's
//! reconnect storm looked like.

use std::collections::{BTreeMap, BTreeSet};

use crate::checkers::SECOND_US;
use crate::history::{Event, Id, Record};

/// Time to converge after the heal (the start of the liveness phase, L), in simulated µs
/// after L. `None` when it never happened by the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Convergence {
    /// When the liveness phase started.
    pub liveness_at_us: u64,
    /// The last delivery of a message acknowledged before L (the backlog drained).
    pub backlog_delivered_after_us: Option<u64>,
    /// Deliveries of messages acked before L that happened after L.
    pub backlog_deliveries: u64,
    /// The last presence change shown after L (views settled).
    pub presence_settled_after_us: Option<u64>,
    /// The last `connected` after L of a device that then stayed connected to the end.
    pub all_connected_after_us: Option<u64>,
    /// Devices not connected at the end.
    pub devices_not_connected: usize,
}

pub fn convergence(history: &[Record]) -> Convergence {
    let mut c = Convergence::default();
    let Some(l) = history.iter().find_map(|r| match &r.ev {
        Event::Phase { name } if name == "liveness" => Some(r.t_us),
        _ => None,
    }) else {
        return c;
    };
    c.liveness_at_us = l;
    let acked_before: BTreeSet<Id> = history
        .iter()
        .filter(|r| r.t_us <= l)
        .filter_map(|r| match &r.ev {
            Event::Ack { message_id, .. } => Some(*message_id),
            _ => None,
        })
        .collect();
    let mut connected: BTreeMap<Id, Option<u64>> = BTreeMap::new();
    for r in history {
        match &r.ev {
            Event::Deliver { message_id, .. }
                if r.t_us > l && acked_before.contains(message_id) =>
            {
                c.backlog_deliveries += 1;
                c.backlog_delivered_after_us = Some(r.t_us - l);
            }
            Event::Presence { .. } if r.t_us > l => {
                c.presence_settled_after_us = Some(r.t_us - l);
            }
            Event::Device { device, .. } => {
                connected.entry(*device).or_insert(None);
            }
            Event::Connected { device, .. } => {
                connected.insert(*device, Some(r.t_us));
            }
            Event::Disconnected { device, .. } => {
                connected.insert(*device, None);
            }
            _ => {}
        }
    }
    c.devices_not_connected = connected.values().filter(|v| v.is_none()).count();
    if c.devices_not_connected == 0 {
        c.all_connected_after_us = Some(
            connected
                .values()
                .flatten()
                .map(|t| t.saturating_sub(l))
                .max()
                .unwrap_or(0),
        );
    }
    c
}

/// One chat server crash and the reconnects it caused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storm {
    pub server: String,
    pub crashed_at_us: u64,
    /// Devices connected to the server when it died whose app stayed open until they were back
    /// (a device whose user closed the app meanwhile is not waiting to reconnect).
    pub dropped: usize,
    /// The most `connected` events (any device) in one simulated second, over the minute after
    /// the crash.
    pub peak_connects_per_s: usize,
    /// Reconnect time of the dropped devices that came back (µs after the crash): p50, p99, max.
    pub reconnect_p50_us: Option<u64>,
    pub reconnect_p99_us: Option<u64>,
    /// When the last dropped device was back (None if one never came back).
    pub all_back_after_us: Option<u64>,
}

/// The reconnect storm of every chat server crash in the history.
pub fn storms(history: &[Record]) -> Vec<Storm> {
    let mut out = Vec::new();
    // Device -> server it is connected to now, as the history goes.
    let mut on: BTreeMap<Id, String> = BTreeMap::new();
    for (i, r) in history.iter().enumerate() {
        match &r.ev {
            Event::Connected { device, server, .. } => {
                on.insert(*device, server.clone());
            }
            Event::Disconnected { device, .. } => {
                on.remove(device);
            }
            Event::Fault { kind, targets, .. } if kind == "crash" => {
                for server in targets.iter().filter(|t| t.starts_with("chat-")) {
                    let dropped: BTreeSet<Id> = on
                        .iter()
                        .filter(|(_, s)| *s == server)
                        .map(|(d, _)| *d)
                        .collect();
                    out.push(storm(history, i, server, &dropped));
                }
            }
            _ => {}
        }
    }
    out
}

fn storm(history: &[Record], at: usize, server: &str, dropped: &BTreeSet<Id>) -> Storm {
    let t0 = history[at].t_us;
    let mut dropped = dropped.clone();
    let mut back: BTreeMap<Id, u64> = BTreeMap::new();
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &history[at..] {
        match &r.ev {
            Event::Connected { device, .. } => {
                if r.t_us < t0 + 60 * SECOND_US {
                    *buckets.entry((r.t_us - t0) / SECOND_US).or_default() += 1;
                }
                if dropped.contains(device) {
                    back.entry(*device).or_insert(r.t_us - t0);
                }
            }
            Event::HeartbeatStop { device, .. } if !back.contains_key(device) => {
                dropped.remove(device);
            }
            _ => {}
        }
    }
    let mut times: Vec<u64> = back.values().copied().collect();
    times.sort_unstable();
    let pct = |p: f64| -> Option<u64> {
        (!times.is_empty()).then(|| times[((times.len() - 1) as f64 * p).round() as usize])
    };
    Storm {
        server: server.to_string(),
        crashed_at_us: t0,
        dropped: dropped.len(),
        peak_connects_per_s: buckets.values().copied().max().unwrap_or(0),
        reconnect_p50_us: pct(0.5),
        reconnect_p99_us: pct(0.99),
        all_back_after_us: (back.len() >= dropped.len())
            .then(|| times.last().copied().unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t_us: u64, ev: Event) -> Record {
        Record { t_us, ev }
    }

    fn connected(t: u64, device: Id, server: &str) -> Record {
        rec(
            t,
            Event::Connected {
                user: 1,
                device,
                server: server.into(),
            },
        )
    }

    // Proves a storm counts the devices on the crashed server, their reconnect times, and the
    // busiest second.
    #[test]
    fn storm_figures() {
        let h = vec![
            connected(0, 1, "chat-0"),
            connected(0, 2, "chat-0"),
            connected(0, 3, "chat-1"),
            rec(
                10 * SECOND_US,
                Event::Fault {
                    kind: "crash".into(),
                    targets: vec!["chat-0".into()],
                    detail: None,
                },
            ),
            connected(10 * SECOND_US + 300_000, 1, "chat-1"),
            connected(10 * SECOND_US + 600_000, 4, "chat-2"),
            connected(12 * SECOND_US, 2, "chat-1"),
        ];
        let s = storms(&h);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].dropped, 2);
        assert_eq!(s[0].peak_connects_per_s, 2);
        assert_eq!(s[0].all_back_after_us, Some(2 * SECOND_US));
        assert_eq!(s[0].reconnect_p50_us, Some(2 * SECOND_US));
    }

    // Proves convergence measures from the liveness phase and notices a device left offline.
    #[test]
    fn convergence_figures() {
        let l = 100 * SECOND_US;
        let mut h = vec![
            rec(
                0,
                Event::Device {
                    user: 1,
                    device: 1,
                    index: Some(0),
                },
            ),
            rec(
                0,
                Event::Device {
                    user: 2,
                    device: 2,
                    index: Some(1),
                },
            ),
            connected(1, 1, "chat-0"),
            rec(
                5,
                Event::Ack {
                    user: 1,
                    device: 1,
                    channel: 9,
                    client_msg_id: 1,
                    message_id: 77,
                    seq: 1,
                    digest: None,
                },
            ),
            rec(
                l,
                Event::Phase {
                    name: "liveness".into(),
                },
            ),
            connected(l + 2 * SECOND_US, 2, "chat-1"),
            rec(
                l + 3 * SECOND_US,
                Event::Deliver {
                    user: 2,
                    device: 2,
                    channel: 9,
                    message_id: 77,
                    seq: 1,
                    sender: 1,
                    sender_device: 1,
                    client_msg_id: 1,
                    digest: None,
                },
            ),
        ];
        let c = convergence(&h);
        assert_eq!(c.backlog_delivered_after_us, Some(3 * SECOND_US));
        assert_eq!(c.backlog_deliveries, 1);
        assert_eq!(c.all_connected_after_us, Some(2 * SECOND_US));
        h.push(rec(
            l + 4 * SECOND_US,
            Event::Disconnected {
                user: 2,
                device: 2,
                reason: "x".into(),
            },
        ));
        let c = convergence(&h);
        assert_eq!(c.devices_not_connected, 1);
        assert_eq!(c.all_connected_after_us, None);
    }
}
