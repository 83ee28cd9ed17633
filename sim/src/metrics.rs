//! Figures measured from a history, in simulated time: latency percentiles (hdrhistogram),
//! per-bucket rates and latencies, connected devices and presence accuracy over time, and
//! the fault windows. Pure over the history, so a real run's history gives the same figures.
//!
//! Definitions (each from history events only):
//! - **send -> ack**: a device's first `send` of a `client_msg_id` to its first `ack`
//!   (retries included: what the user waited).
//! - **send -> deliver**: that first `send` to each recipient device's first `deliver` of the
//!   message. *Live* deliveries are those where the recipient and the sender were both
//!   connected from the send to the delivery; the rest measure how long a device was away: a
//!   recipient that synced after a reconnect, or a sender that closed the app or lost its
//!   connection before its message got through (it is resent when the app returns).
//! - **heartbeats stop -> offline shown**: when a user's last heartbeating device stopped
//!   (`heartbeat_stop`) to each observing device's first `presence ... offline` for that user
//!   while the user stays silent. Includes the 30 s timeout, unless the user logged out.
//! - **presence accuracy**: at a bucket's end, of the views (latest `presence` per observing
//!   device and subject) held by connected devices, the share that match the truth: online
//!   while any of the subject's devices heartbeats, offline once all stopped more than the
//!   timeout plus [`PRESENCE_SETTLE_US`] ago. Subjects in between are not judged.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use hdrhistogram::Histogram;
use reports::run::{FaultSpan, Latency, Series};

use crate::history::{Event, Id, Record, Status};

/// Presence's offline timeout (DESIGN.md: 30 s after the last heartbeat).
pub const PRESENCE_TIMEOUT_US: u64 = 30_000_000;
/// Time a presence change may take to reach observers before a view counts as wrong.
pub const PRESENCE_SETTLE_US: u64 = 5_000_000;

/// Everything measured from one history.
pub struct Measured {
    pub latency: Vec<Latency>,
    pub series: Series,
    pub faults: Vec<FaultSpan>,
    pub peak_connected: u64,
    /// Mean connected devices over `from_s..safety_end_s` (bucket ends).
    pub mean_connected: f64,
}

fn hist() -> Histogram<u64> {
    // 1 µs to 1 simulated day, 3 significant digits.
    Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("valid histogram bounds")
}

fn latency(name: &str, what: &str, h: &Histogram<u64>) -> Latency {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    Latency {
        name: name.into(),
        what: what.into(),
        count: h.len(),
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// A bucket width near `span_s / 300`, rounded up to a readable step.
pub fn bucket_for(span_s: f64) -> f64 {
    let want = span_s / 300.0;
    [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0]
        .into_iter()
        .find(|&b| b >= want)
        .unwrap_or(600.0)
}

struct Bucket {
    sends: u64,
    delivers: u64,
    pushes: u64,
    deliver: Histogram<u64>,
    ack: Histogram<u64>,
}

/// Measures `history`. Times (series, fault spans) count from the `traffic` phase (or the
/// start). Mean connected devices are averaged over bucket ends from `warm_up_s` to the
/// `liveness` phase.
pub fn measure(history: &[Record], warm_up_s: f64) -> Measured {
    let traffic_us = history
        .iter()
        .find(|r| matches!(&r.ev, Event::Phase { name } if name == "traffic"))
        .map_or(0, |r| r.t_us);
    let end_us = history
        .last()
        .map_or(0, |r| r.t_us.saturating_sub(traffic_us));
    let safety_end_us = history
        .iter()
        .find(|r| matches!(&r.ev, Event::Phase { name } if name == "liveness"))
        .map_or(end_us, |r| r.t_us.saturating_sub(traffic_us));
    let bucket_s = bucket_for(end_us as f64 / 1e6);
    let bucket_us = (bucket_s * 1e6) as u64;
    let n = (end_us / bucket_us + 1) as usize;
    let mut buckets: Vec<Bucket> = (0..n)
        .map(|_| Bucket {
            sends: 0,
            delivers: 0,
            pushes: 0,
            deliver: hist(),
            ack: hist(),
        })
        .collect();
    let (mut ack_all, mut ack_late, mut live, mut synced, mut offline) =
        (hist(), hist(), hist(), hist(), hist());

    let mut sent_at: HashMap<(Id, Id), u64> = HashMap::new();
    let mut acked: HashSet<(Id, Id)> = HashSet::new();
    let mut delivered: HashSet<(Id, Id)> = HashSet::new();
    let mut connected_since: BTreeMap<Id, u64> = BTreeMap::new();
    let mut beating: BTreeMap<Id, BTreeSet<Id>> = BTreeMap::new();
    let mut device_user: BTreeMap<Id, Id> = BTreeMap::new();
    // user -> (all devices stopped at, observers that showed it offline since)
    let mut silent: BTreeMap<Id, (u64, BTreeSet<Id>)> = BTreeMap::new();
    // Users whose last device stopped, and when; removed when one starts again.
    let mut stopped_at: BTreeMap<Id, u64> = BTreeMap::new();
    // user -> started heartbeating at (for the settle window after coming online).
    let mut started_at: BTreeMap<Id, u64> = BTreeMap::new();
    let mut views: BTreeMap<Id, BTreeMap<Id, Status>> = BTreeMap::new();
    let mut open_faults: BTreeMap<(String, Vec<String>), Vec<u64>> = BTreeMap::new();
    let mut faults = Vec::new();

    let mut series = Series {
        bucket_s,
        liveness_s: (safety_end_us < end_us).then_some(safety_end_us as f64 / 1e6),
        ..Series::default()
    };
    let mut peak_connected = 0u64;
    let (mut conn_sum, mut conn_n) = (0.0, 0u64);
    let mut next_edge = bucket_us;
    let mut close_bucket = |edge: u64,
                            connected: &BTreeMap<Id, u64>,
                            views: &BTreeMap<Id, BTreeMap<Id, Status>>,
                            beating: &BTreeMap<Id, BTreeSet<Id>>,
                            stopped_at: &BTreeMap<Id, u64>,
                            started_at: &BTreeMap<Id, u64>,
                            series: &mut Series| {
        let c = connected.len() as f64;
        series.connected.push(c);
        if edge as f64 / 1e6 >= warm_up_s && edge <= safety_end_us {
            conn_sum += c;
            conn_n += 1;
        }
        let (mut judged, mut right) = (0u64, 0u64);
        for dev in connected.keys() {
            let Some(v) = views.get(dev) else { continue };
            for (subject, status) in v {
                let online = beating.get(subject).is_some_and(|s| !s.is_empty());
                let truth = if online {
                    match started_at.get(subject) {
                        Some(&t) if edge < t + PRESENCE_SETTLE_US => continue,
                        _ => Status::Online,
                    }
                } else {
                    match stopped_at.get(subject) {
                        Some(&t) if edge >= t + PRESENCE_TIMEOUT_US + PRESENCE_SETTLE_US => {
                            Status::Offline
                        }
                        Some(_) => continue,
                        // Never heartbeated in this run: offline from the start.
                        None => Status::Offline,
                    }
                };
                judged += 1;
                right += (truth == *status) as u64;
            }
        }
        series
            .presence_accuracy
            .push((judged > 0).then(|| right as f64 / judged as f64));
    };

    for r in history {
        // Times from the start of traffic (setup happens before it).
        let t_us = r.t_us.saturating_sub(traffic_us);
        while t_us >= next_edge {
            close_bucket(
                next_edge,
                &connected_since,
                &views,
                &beating,
                &stopped_at,
                &started_at,
                &mut series,
            );
            next_edge += bucket_us;
        }
        let b = &mut buckets[(t_us / bucket_us) as usize];
        match &r.ev {
            Event::Send {
                device,
                client_msg_id,
                ..
            } => {
                if let std::collections::hash_map::Entry::Vacant(e) =
                    sent_at.entry((*device, *client_msg_id))
                {
                    e.insert(t_us);
                    b.sends += 1;
                }
            }
            // Only a message's first ack and a device's first delivery of a message count.
            Event::Ack {
                device,
                client_msg_id,
                ..
            } if acked.insert((*device, *client_msg_id)) => {
                if let Some(&t) = sent_at.get(&(*device, *client_msg_id)) {
                    let d = t_us.saturating_sub(t).max(1);
                    if connected_since.get(device).is_some_and(|&c| c <= t) {
                        ack_all.record(d).ok();
                        b.ack.record(d).ok();
                    } else {
                        ack_late.record(d).ok();
                    }
                }
            }
            Event::Deliver {
                device,
                message_id,
                sender_device,
                client_msg_id,
                ..
            } if delivered.insert((*device, *message_id)) => {
                b.delivers += 1;
                if let Some(&t) = sent_at.get(&(*sender_device, *client_msg_id)) {
                    let d = (t_us.saturating_sub(t)).max(1);
                    let since_send = |d: &Id| connected_since.get(d).is_some_and(|&c| c <= t);
                    if since_send(device) && since_send(sender_device) {
                        live.record(d).ok();
                        b.deliver.record(d).ok();
                    } else {
                        synced.record(d).ok();
                    }
                }
            }
            Event::Push { .. } => b.pushes += 1,
            Event::Connected { device, user, .. } => {
                device_user.insert(*device, *user);
                connected_since.entry(*device).or_insert(t_us);
                peak_connected = peak_connected.max(connected_since.len() as u64);
            }
            Event::Disconnected { device, .. } => {
                connected_since.remove(device);
            }
            Event::HeartbeatStart { user, device } => {
                let set = beating.entry(*user).or_default();
                if set.is_empty() {
                    started_at.insert(*user, t_us);
                    stopped_at.remove(user);
                    silent.remove(user);
                }
                set.insert(*device);
            }
            Event::HeartbeatStop { user, device } => {
                let set = beating.entry(*user).or_default();
                if set.remove(device) && set.is_empty() {
                    stopped_at.insert(*user, t_us);
                    silent.insert(*user, (t_us, BTreeSet::new()));
                }
            }
            Event::Presence {
                observer_device,
                subject,
                status,
                ..
            } => {
                views
                    .entry(*observer_device)
                    .or_default()
                    .insert(*subject, *status);
                // Observers connected before the user went silent: the others learn it
                // from the snapshot at their next connect, which measures their absence.
                let watching = |t: u64| {
                    connected_since
                        .get(observer_device)
                        .is_some_and(|&c| c <= t)
                };
                if *status == Status::Offline {
                    if let Some((t, seen)) = silent.get_mut(subject) {
                        if watching(*t) && seen.insert(*observer_device) {
                            offline.record((t_us - *t).max(1)).ok();
                        }
                    }
                }
            }
            Event::Fault { kind, targets, .. } => {
                open_faults
                    .entry((kind.clone(), targets.clone()))
                    .or_default()
                    .push(t_us);
            }
            Event::Heal { kind, targets, .. } => {
                let key = (kind.clone(), targets.clone());
                if let Some(starts) = open_faults.get_mut(&key) {
                    if !starts.is_empty() {
                        let t0 = starts.remove(0);
                        faults.push(span(kind, targets, t0, t_us));
                    }
                }
            }
            _ => {}
        }
    }
    while series.connected.len() < n {
        close_bucket(
            next_edge,
            &connected_since,
            &views,
            &beating,
            &stopped_at,
            &started_at,
            &mut series,
        );
        next_edge += bucket_us;
    }
    for ((kind, targets), starts) in open_faults {
        for t0 in starts {
            faults.push(span(&kind, &targets, t0, end_us));
        }
    }
    faults.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));

    let per_s = |v: u64| v as f64 / bucket_s;
    let ms = |h: &Histogram<u64>, q: f64| {
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    };
    for (i, b) in buckets.iter().enumerate() {
        series.t_s.push(i as f64 * bucket_s);
        series.sends_per_s.push(per_s(b.sends));
        series.delivers_per_s.push(per_s(b.delivers));
        series.pushes_per_s.push(per_s(b.pushes));
        series.deliver_p50_ms.push(ms(&b.deliver, 0.5));
        series.deliver_p99_ms.push(ms(&b.deliver, 0.99));
        series
            .deliver_max_ms
            .push((!b.deliver.is_empty()).then(|| b.deliver.max() as f64 / 1000.0));
        series.ack_p99_ms.push(ms(&b.ack, 0.99));
    }
    Measured {
        latency: vec![
            latency(
                "send_to_ack",
                "first send -> first ack, per message whose device stayed connected",
                &ack_all,
            ),
            latency(
                "send_to_ack_after_reconnect",
                "first send -> first ack, per message whose device lost its connection or closed the app first",
                &ack_late,
            ),
            latency(
                "send_to_deliver_live",
                "first send -> first deliver, per recipient device, sender and recipient connected throughout",
                &live,
            ),
            latency(
                "send_to_deliver_away",
                "first send -> first deliver, per recipient device, when the recipient or the sender was away meanwhile",
                &synced,
            ),
            latency(
                "heartbeats_stop_to_offline_shown",
                "user's last device stops heartbeating -> each observer device connected since then shows offline",
                &offline,
            ),
        ],
        series,
        faults,
        peak_connected,
        mean_connected: if conn_n > 0 {
            conn_sum / conn_n as f64
        } else {
            0.0
        },
    }
}

fn span(kind: &str, targets: &[String], t0: u64, t1: u64) -> FaultSpan {
    let mut t = targets.join(" ");
    if t.is_empty() {
        t = "network".into();
    }
    FaultSpan {
        kind: kind.into(),
        targets: t,
        start_s: t0 as f64 / 1e6,
        end_s: t1 as f64 / 1e6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Event as E;

    fn rec(t_s: f64, ev: E) -> Record {
        Record {
            t_us: (t_s * 1e6) as u64,
            ev,
        }
    }

    // Proves the latency definitions on a hand-made history: an ack after 20 ms, a live
    // delivery after 30 ms, a synced one after 10 s, a duplicate delivery ignored, offline
    // shown 31 s after the last heartbeat, and a crash window from fault to heal.
    #[test]
    fn latencies_and_windows() {
        let h = vec![
            rec(
                0.0,
                E::Phase {
                    name: "safety".into(),
                },
            ),
            rec(
                1.0,
                E::Connected {
                    user: 1,
                    device: 11,
                    server: "chat-0".into(),
                },
            ),
            rec(
                1.0,
                E::Connected {
                    user: 2,
                    device: 21,
                    server: "chat-0".into(),
                },
            ),
            rec(
                1.0,
                E::HeartbeatStart {
                    user: 1,
                    device: 11,
                },
            ),
            rec(
                1.0,
                E::HeartbeatStart {
                    user: 2,
                    device: 21,
                },
            ),
            rec(
                2.0,
                E::Send {
                    user: 1,
                    device: 11,
                    channel: 5,
                    client_msg_id: 1,
                    bytes: 10,
                    chars: 10,
                    digest: None,
                },
            ),
            rec(
                2.02,
                E::Ack {
                    user: 1,
                    device: 11,
                    channel: 5,
                    client_msg_id: 1,
                    message_id: 100,
                    seq: 1,
                    digest: None,
                },
            ),
            rec(
                2.03,
                E::Deliver {
                    user: 2,
                    device: 21,
                    channel: 5,
                    message_id: 100,
                    sender: 1,
                    sender_device: 11,
                    client_msg_id: 1,
                    seq: 1,
                    digest: None,
                },
            ),
            rec(
                2.5,
                E::Deliver {
                    user: 2,
                    device: 21,
                    channel: 5,
                    message_id: 100,
                    sender: 1,
                    sender_device: 11,
                    client_msg_id: 1,
                    seq: 1,
                    digest: None,
                },
            ),
            rec(
                5.0,
                E::Fault {
                    kind: "crash".into(),
                    targets: vec!["chat-1".into()],
                    detail: None,
                },
            ),
            rec(
                11.0,
                E::Connected {
                    user: 2,
                    device: 22,
                    server: "chat-0".into(),
                },
            ),
            rec(
                12.0,
                E::Deliver {
                    user: 2,
                    device: 22,
                    channel: 5,
                    message_id: 100,
                    sender: 1,
                    sender_device: 11,
                    client_msg_id: 1,
                    seq: 1,
                    digest: None,
                },
            ),
            rec(
                15.0,
                E::Heal {
                    kind: "crash".into(),
                    targets: vec!["chat-1".into()],
                    detail: None,
                },
            ),
            rec(
                20.0,
                E::HeartbeatStop {
                    user: 1,
                    device: 11,
                },
            ),
            rec(
                20.0,
                E::Disconnected {
                    user: 1,
                    device: 11,
                    reason: "closed".into(),
                },
            ),
            rec(
                51.0,
                E::Presence {
                    observer: 2,
                    observer_device: 21,
                    subject: 1,
                    status: Status::Offline,
                },
            ),
            rec(60.0, E::Phase { name: "end".into() }),
        ];
        let m = measure(&h, 0.0);
        let get = |n: &str| m.latency.iter().find(|l| l.name == n).unwrap().clone();
        let ack = get("send_to_ack");
        assert_eq!(ack.count, 1);
        assert!((ack.p50_ms - 20.0).abs() < 0.1, "{ack:?}");
        let live = get("send_to_deliver_live");
        assert_eq!(live.count, 1, "the duplicate delivery is not counted");
        assert!((live.p50_ms - 30.0).abs() < 0.1, "{live:?}");
        let synced = get("send_to_deliver_away");
        assert_eq!(synced.count, 1);
        assert!((synced.p50_ms - 10_000.0).abs() < 10.0, "{synced:?}");
        let off = get("heartbeats_stop_to_offline_shown");
        assert_eq!(off.count, 1);
        assert!((off.p50_ms - 31_000.0).abs() < 31.0, "{off:?}");
        assert_eq!(m.faults.len(), 1);
        assert_eq!((m.faults[0].start_s, m.faults[0].end_s), (5.0, 15.0));
        assert_eq!(m.peak_connected, 3);
        let s = &m.series;
        assert_eq!(s.t_s.len(), s.connected.len());
        assert_eq!(s.t_s.len(), s.presence_accuracy.len());
        let sends: f64 = s.sends_per_s.iter().sum::<f64>() * s.bucket_s;
        let delivers: f64 = s.delivers_per_s.iter().sum::<f64>() * s.bucket_s;
        assert_eq!((sends, delivers), (1.0, 2.0));
        // Device 21 sees user 1 offline from 51 s, and user 1 is offline by then: accurate.
        assert_eq!(*s.presence_accuracy.last().unwrap(), Some(1.0));
    }

    // Proves a view that disagrees with the truth lowers accuracy.
    #[test]
    fn wrong_views_lower_accuracy() {
        let h = vec![
            rec(
                1.0,
                E::Connected {
                    user: 2,
                    device: 21,
                    server: "chat-0".into(),
                },
            ),
            rec(
                1.0,
                E::HeartbeatStart {
                    user: 1,
                    device: 11,
                },
            ),
            rec(
                1.0,
                E::HeartbeatStart {
                    user: 3,
                    device: 31,
                },
            ),
            rec(
                10.0,
                E::Presence {
                    observer: 2,
                    observer_device: 21,
                    subject: 1,
                    status: Status::Offline,
                },
            ),
            rec(
                10.0,
                E::Presence {
                    observer: 2,
                    observer_device: 21,
                    subject: 3,
                    status: Status::Online,
                },
            ),
            rec(20.0, E::Phase { name: "end".into() }),
        ];
        let m = measure(&h, 0.0);
        assert_eq!(*m.series.presence_accuracy.last().unwrap(), Some(0.5));
    }

    #[test]
    fn buckets_are_readable() {
        assert_eq!(bucket_for(100.0), 1.0);
        assert_eq!(bucket_for(360.0), 2.0);
        assert_eq!(bucket_for(3660.0), 15.0);
    }
}
