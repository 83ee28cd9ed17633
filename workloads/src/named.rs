//! The named workloads (`--workload NAME`): the model of `model.rs` at one hour of the day,
//! scaled to a number of users, turned into users, friends, groups and a timed script per
//! device. Seeded: the same (spec, seed) gives the same workload.
//!
//! Each device alternates online and offline periods with exponential lengths whose means give
//! the model's sessions per day and online share at the hour (a stationary start: at time 0 a
//! device is online with the hour's online share). While online it sends at the model's rate
//! per online second, drops its connection now and then, and (on mobile) drives into tunnels.
//! Devices online at time 0 open their app within the first [`WARM_UP_MS`]: a real system is
//! already connected at the start of the hour; the simulation must connect them first.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal};

use crate::model::{DeviceKind, Model, SizeBand};
use crate::{Action, BadInput, DeviceScript, Group, Step, Target, Tunnel, User, Workload};

/// The named workloads and what each stands for.
pub const WORKLOADS: &[(&str, &str)] = &[
    (
        "stress",
        "the checker workload (default): 2.5 messages per user per minute online, short sessions; far busier than the model",
    ),
    (
        "steady",
        "the 50M-DAU model at an average hour (diurnal factor 1.0)",
    ),
    (
        "peak-hour",
        "the model at its busiest hour (20:00, ~2x the mean): connections, sends, heartbeats",
    ),
    (
        "group-heavy",
        "peak hour where 80% of sends go to groups, 8 groups per user, larger groups",
    ),
    (
        "reconnect-storm",
        "peak hour; halfway through every connected device loses its connection within 1 s and reconnects",
    ),
    (
        "mobile-commute",
        "morning commute: phones online longer (20 min sessions), 20 tunnels and 4 drops per online hour",
    ),
];

/// Devices online at the start open their app within this window.
pub const WARM_UP_MS: u64 = 30_000;

/// Shortest and longest tunnel (log-uniform), as the `tunnel` fault of the scenarios.
pub const TUNNEL_MS: (u64, u64) = (1_000, 180_000);

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub name: String,
    pub users: u32,
    /// Simulated milliseconds of scripted traffic (the safety phase).
    pub duration_ms: u64,
    /// `stress` only: messages per user per minute while a device is online.
    pub stress_rate: f64,
    pub model: Model,
}

/// The model parameters a named workload runs with, and the hour's diurnal factor.
pub fn params(name: &str, base: &Model) -> Result<(Model, f64), String> {
    let mut m = base.clone();
    let (_, peak) = base.peak_hour();
    let f = match name {
        "steady" => 1.0,
        "peak-hour" | "reconnect-storm" => peak,
        "group-heavy" => {
            m.group_share = 0.8;
            m.groups_per_user = 8.0;
            m.group_sizes = vec![
                SizeBand {
                    lo: 3,
                    hi: 8,
                    share: 0.3,
                },
                SizeBand {
                    lo: 9,
                    hi: 30,
                    share: 0.4,
                },
                SizeBand {
                    lo: 31,
                    hi: 99,
                    share: 0.2,
                },
                SizeBand {
                    lo: 100,
                    hi: 100,
                    share: 0.1,
                },
            ];
            peak
        }
        "mobile-commute" => {
            m.phone.online_min_per_day = 120.0;
            m.phone.sessions_per_day = 6.0;
            m.tunnels_per_mobile_hour = 20.0;
            m.drops_per_hour = 4.0;
            base.diurnal_factor(8)
        }
        other => {
            let names: Vec<&str> = WORKLOADS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown workload `{other}`; known: {}",
                names.join(", ")
            ));
        }
    };
    Ok((m, f))
}

/// Builds the named workload.
pub fn build(spec: &Spec, seed: u64) -> Result<Workload, String> {
    if spec.users < 2 {
        return Err("a chat needs at least two users".into());
    }
    if spec.name == "stress" {
        let cfg = crate::Config {
            users: spec.users,
            duration_ms: spec.duration_ms,
            messages_per_user_per_min: spec.stress_rate,
        };
        return Ok(crate::generate(&cfg, seed));
    }
    let (m, f) = params(&spec.name, &spec.model)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4d4f_4445_4c57_4b4c);
    let n = spec.users;
    let users = make_users(&m, n, &mut rng);
    let friendships = make_friendships(&m, n, &mut rng);
    let groups = make_groups(&m, n, &mut rng);
    let mut friends_of: Vec<Vec<u32>> = vec![Vec::new(); n as usize];
    for &(a, b) in &friendships {
        friends_of[a as usize].push(b);
        friends_of[b as usize].push(a);
    }
    let mut groups_of: Vec<Vec<u32>> = vec![Vec::new(); n as usize];
    for g in &groups {
        for &u in &g.members {
            groups_of[u as usize].push(g.index);
        }
    }
    let text = Text::new(&m)?;
    let storm_at = (spec.name == "reconnect-storm").then_some(spec.duration_ms / 2);
    let mut devices = Vec::new();
    let mut tunnels = Vec::new();
    for u in &users {
        let me = Me {
            friends: &friends_of[u.index as usize],
            groups: &groups_of[u.index as usize],
            group_count: groups.len() as u32,
        };
        for slot in 0..u.devices {
            let index = devices.len() as u32;
            let (steps, mut t) = script(
                &m,
                f,
                spec.duration_ms,
                (slot, u.devices),
                &me,
                &text,
                storm_at,
                &mut rng,
            );
            for x in &mut t {
                x.device = index;
            }
            tunnels.extend(t);
            devices.push(DeviceScript {
                user: u.index,
                slot,
                steps,
            });
        }
    }
    tunnels.sort_by_key(|t| (t.at_ms, t.device));
    Ok(Workload {
        users,
        friendships,
        groups,
        devices,
        tunnels,
    })
}

fn make_users(m: &Model, n: u32, rng: &mut StdRng) -> Vec<User> {
    (0..n)
        .map(|i| {
            let r: f64 = rng.gen();
            let [one, two, _] = m.devices_per_user;
            let devices = if r < one {
                1
            } else if r < one + two {
                2
            } else {
                3
            };
            User {
                index: i,
                name: format!("user{i}"),
                password: format!("pw-{i}-{}", rng.gen::<u32>()),
                devices,
            }
        })
        .collect()
}

/// A ring (everyone has a friend), then each user adds friends toward a degree drawn from an
/// exponential distribution with the model's mean, capped; partners are uniform.
fn make_friendships(m: &Model, n: u32, rng: &mut StdRng) -> Vec<(u32, u32)> {
    let mut pairs: Vec<(u32, u32)> = (0..n)
        .map(|i| {
            let j = (i + 1) % n;
            (i.min(j), i.max(j))
        })
        .collect();
    // Each edge has two ends: a user adds half its degree; the ring gave it 2 already.
    let extra = ((m.friends_mean - 2.0) / 2.0).max(0.0);
    let cap = m.friends_max.min(n - 1) as f64 / 2.0;
    let exp = Exp::new(1.0 / extra.max(1e-9)).expect("a positive rate");
    for a in 0..n {
        let k = if extra > 0.0 {
            exp.sample(rng).min(cap).round() as u32
        } else {
            0
        };
        for _ in 0..k {
            let b = rng.gen_range(0..n);
            if a != b {
                pairs.push((a.min(b), a.max(b)));
            }
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

fn make_groups(m: &Model, n: u32, rng: &mut StdRng) -> Vec<Group> {
    let count = m.groups_for(n);
    let total: f64 = m.group_sizes.iter().map(|b| b.share).sum();
    (0..count)
        .map(|index| {
            let mut r = rng.gen::<f64>() * total;
            let band = m
                .group_sizes
                .iter()
                .find(|b| {
                    r -= b.share;
                    r < 0.0
                })
                .unwrap_or_else(|| m.group_sizes.last().expect("at least one size band"));
            let size = rng.gen_range(band.lo..=band.hi).min(n) as usize;
            let members = rand::seq::index::sample(rng, n as usize, size)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            Group { index, members }
        })
        .collect()
}

/// Message lengths: log-normal around the median, with a log-uniform long tail up to the
/// limit.
struct Text {
    short: LogNormal<f64>,
    long_share: f64,
}

impl Text {
    fn new(m: &Model) -> Result<Self, String> {
        let short = LogNormal::new(m.text_median_chars.ln(), m.text_sigma)
            .map_err(|e| format!("text length model: {e}"))?;
        Ok(Self {
            short,
            long_share: m.long_text_share,
        })
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        if rng.gen_bool(self.long_share) {
            log_uniform(rng, 2_000, crate::MAX_CHARS as u64) as u32
        } else {
            (self.short.sample(rng).round() as u32).clamp(1, 1_999)
        }
    }
}

fn log_uniform(rng: &mut StdRng, lo: u64, hi: u64) -> u64 {
    let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
    (rng.gen_range(l..=h).exp().round() as u64).clamp(lo, hi)
}

/// One user's view, shared by their devices.
struct Me<'a> {
    friends: &'a [u32],
    groups: &'a [u32],
    group_count: u32,
}

/// An exponential draw with mean `mean_ms`, at least 1 ms.
fn exp_ms(rng: &mut StdRng, mean_ms: f64) -> u64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    ((-u.ln() * mean_ms) as u64).max(1)
}

/// One device's timeline (steps in time order) and the tunnels it drives into (device index
/// filled in by the caller).
#[allow(clippy::too_many_arguments)]
fn script(
    m: &Model,
    f: f64,
    duration_ms: u64,
    (slot, devices): (u32, u32),
    me: &Me<'_>,
    text: &Text,
    storm_at: Option<u64>,
    rng: &mut StdRng,
) -> (Vec<Step>, Vec<Tunnel>) {
    let kind = DeviceKind::of_slot(slot);
    let usage = m.usage(kind);
    let p = m.online_share(kind, f);
    let on_mean = usage.mean_session_ms();
    let off_mean = on_mean * (1.0 - p) / p;
    let send_mean = 1.0 / m.send_rate_while_online_per_ms(slot, devices);
    let drop_mean = 3_600_000.0 / m.drops_per_hour.max(1e-9);
    let tunnel_mean = 3_600_000.0 / m.tunnels_per_mobile_hour.max(1e-9);
    let mut steps = Vec::new();
    let mut tunnels = Vec::new();
    // Stationary start: online with the hour's share; exponential lengths are memoryless, so
    // the remaining time of the period at time 0 has the same distribution as a whole one.
    let mut t: u64 = if rng.gen_bool(p) {
        rng.gen_range(0..WARM_UP_MS)
    } else {
        exp_ms(rng, off_mean)
    };
    while t < duration_ms {
        steps.push(Step {
            at_ms: t,
            action: Action::Online,
        });
        let end = t.saturating_add(exp_ms(rng, on_mean));
        let stop = end.min(duration_ms);
        let mut closed_by_send = false;
        let mut last_send: Option<usize> = None;
        // Sends, drops and tunnels are independent Poisson processes over the session.
        let mut next_send = t + exp_ms(rng, send_mean);
        let mut next_drop = t + exp_ms(rng, drop_mean);
        let mut next_tunnel = if kind.is_mobile() {
            t + exp_ms(rng, tunnel_mean)
        } else {
            u64::MAX
        };
        let mut tunnel_free_at = 0;
        loop {
            let next = next_send.min(next_drop).min(next_tunnel);
            if next >= stop {
                break;
            }
            if next == next_send {
                let to = pick_target(m, me, rng);
                let chars = text.sample(rng);
                last_send = Some(steps.len());
                steps.push(Step {
                    at_ms: next,
                    action: Action::Send { to, chars },
                });
                if rng.gen_bool(m.bad_input_share) {
                    steps.push(Step {
                        at_ms: next + 1,
                        action: Action::Bad(bad_input(me, rng)),
                    });
                }
                next_send = next + exp_ms(rng, send_mean);
            } else if next == next_drop {
                steps.push(Step {
                    at_ms: next,
                    action: Action::DropConnection,
                });
                next_drop = next + exp_ms(rng, drop_mean);
            } else {
                let len = log_uniform(rng, TUNNEL_MS.0, TUNNEL_MS.1);
                // A tunnel heals inside the safety phase and does not overlap the last one.
                if next >= tunnel_free_at && next + len < duration_ms {
                    tunnels.push(Tunnel {
                        device: 0,
                        at_ms: next,
                        duration_ms: len,
                    });
                    tunnel_free_at = next + len;
                }
                next_tunnel = next + exp_ms(rng, tunnel_mean);
            }
        }
        // Some sessions end right after their last send, before its ack can arrive: the
        // send becomes a send-and-close and whatever followed it in the session is dropped.
        if end < duration_ms && rng.gen_bool(m.send_then_close_share) {
            if let Some(i) = last_send {
                steps.truncate(i + 1);
                if let Action::Send { to, chars } = steps[i].action {
                    steps[i].action = Action::SendAndClose { to, chars };
                }
                closed_by_send = true;
            }
        }
        if let Some(at) = storm_at {
            if t <= at && at < stop && !closed_by_send {
                steps.push(Step {
                    at_ms: at + rng.gen_range(0..1_000),
                    action: Action::DropConnection,
                });
            }
        }
        if !closed_by_send && end < duration_ms {
            steps.push(Step {
                at_ms: end,
                action: Action::Offline {
                    logout: rng.gen_bool(m.logout_share),
                },
            });
        }
        let last = steps.last().map_or(end, |s| s.at_ms.max(end));
        t = last + exp_ms(rng, off_mean);
    }
    steps.sort_by_key(|s| s.at_ms);
    (steps, tunnels)
}

fn pick_target(m: &Model, me: &Me<'_>, rng: &mut StdRng) -> Target {
    let group = !me.groups.is_empty() && (me.friends.is_empty() || rng.gen_bool(m.group_share));
    if group {
        Target::Group(*me.groups.choose(rng).expect("groups is not empty"))
    } else {
        Target::Direct(
            *me.friends
                .choose(rng)
                .expect("every user has a friend (ring)"),
        )
    }
}

fn bad_input(me: &Me<'_>, rng: &mut StdRng) -> BadInput {
    match rng.gen_range(0..5) {
        0 => BadInput::TooLong,
        1 => {
            let g = rng.gen_range(0..me.group_count.max(1));
            if me.groups.contains(&g) || me.group_count == 0 {
                BadInput::UnknownChannel
            } else {
                BadInput::NotMember(g)
            }
        }
        2 => BadInput::UnknownChannel,
        3 => BadInput::MalformedJson,
        _ => BadInput::BinaryFrame,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_CHARS;

    fn spec(name: &str, users: u32, duration_ms: u64) -> Spec {
        Spec {
            name: name.into(),
            users,
            duration_ms,
            stress_rate: 2.5,
            model: Model::default(),
        }
    }

    /// Sends per user per hour, and connected devices per user at mid-run.
    fn rates(w: &Workload, duration_ms: u64) -> (f64, f64) {
        let sends = w.planned_sends() as f64 / w.users.len() as f64 / (duration_ms as f64 / 3.6e6);
        let mid = duration_ms / 2;
        let online = w
            .devices
            .iter()
            .filter(|d| {
                let last = d.steps.iter().rev().find(|s| {
                    s.at_ms <= mid
                        && matches!(
                            s.action,
                            Action::Online | Action::Offline { .. } | Action::SendAndClose { .. }
                        )
                });
                matches!(last.map(|s| &s.action), Some(Action::Online))
            })
            .count();
        (sends, online as f64 / w.users.len() as f64)
    }

    // Proves scaling keeps per-user rates: 2,000 and 20,000 users of the peak hour send the
    // same per user per hour and keep the same share connected, both near the model's figures.
    #[test]
    fn rates_are_preserved_under_scaling() {
        let m = Model::default();
        let (_, f) = m.peak_hour();
        let want_sends = m.messages_per_user_per_s(f) * 3600.0;
        let want_conn = m.connections_per_user(f);
        let hour = 3_600_000;
        let small = build(&spec("peak-hour", 2_000, hour), 1).unwrap();
        let large = build(&spec("peak-hour", 20_000, hour), 1).unwrap();
        let (s1, c1) = rates(&small, hour);
        let (s2, c2) = rates(&large, hour);
        assert!((s1 / s2 - 1.0).abs() < 0.12, "sends/user/h {s1} vs {s2}");
        assert!((c1 / c2 - 1.0).abs() < 0.12, "connected/user {c1} vs {c2}");
        assert!(
            (s2 / want_sends - 1.0).abs() < 0.10,
            "sends {s2} vs model {want_sends}"
        );
        assert!(
            (c2 / want_conn - 1.0).abs() < 0.10,
            "connected {c2} vs model {want_conn}"
        );
    }

    // Proves every distribution stays in its bounds: 1-3 devices (mean ~2), groups of 3-100
    // with some of exactly 100, texts of 1-100,000 characters mostly short, friends capped,
    // tunnels inside the run and in 1 s..3 min, scripts in time order.
    #[test]
    fn distributions_are_within_bounds() {
        let duration = 600_000;
        let w = build(&spec("group-heavy", 5_000, duration), 3).unwrap();
        let devices = w.device_count() as f64 / w.users.len() as f64;
        assert!((1.9..2.1).contains(&devices), "{devices} devices per user");
        assert!(w.users.iter().all(|u| (1..=3).contains(&u.devices)));
        assert!(w
            .groups
            .iter()
            .all(|g| (3..=100).contains(&g.members.len())));
        assert!(w.groups.iter().any(|g| g.members.len() == 100));
        let mut degree = vec![0u32; w.users.len()];
        for &(a, b) in &w.friendships {
            assert!(a < b);
            degree[a as usize] += 1;
            degree[b as usize] += 1;
        }
        let mean = degree.iter().sum::<u32>() as f64 / degree.len() as f64;
        assert!((15.0..25.0).contains(&mean), "mean friends {mean}");
        assert!(degree.iter().all(|&d| (1..=202).contains(&d)));
        let chars: Vec<u32> = w
            .devices
            .iter()
            .flat_map(|d| &d.steps)
            .filter_map(|s| match s.action {
                Action::Send { chars, .. } | Action::SendAndClose { chars, .. } => Some(chars),
                _ => None,
            })
            .collect();
        assert!(chars.len() > 1_000, "{} sends", chars.len());
        assert!(chars.iter().all(|&c| (1..=MAX_CHARS).contains(&c)));
        let short = chars.iter().filter(|&&c| c < 300).count() as f64 / chars.len() as f64;
        assert!(short > 0.95, "{short} short");
        for d in &w.devices {
            assert!(d.steps.windows(2).all(|p| p[0].at_ms <= p[1].at_ms));
            assert!(d.steps.iter().all(|s| s.at_ms < duration + 1_000));
        }
        let c = build(&spec("mobile-commute", 2_000, duration), 3).unwrap();
        assert!(!c.tunnels.is_empty());
        for t in &c.tunnels {
            assert!((TUNNEL_MS.0..=TUNNEL_MS.1).contains(&t.duration_ms));
            assert!(t.at_ms + t.duration_ms < duration);
            assert!(
                c.devices[t.device as usize].slot != 1,
                "no tunnel on a desktop"
            );
        }
    }

    // Proves the group-heavy workload sends mostly to groups, and peak-hour does not.
    #[test]
    fn group_share_follows_the_workload() {
        let share = |name: &str| {
            let w = build(&spec(name, 2_000, 600_000), 5).unwrap();
            let (mut g, mut all) = (0, 0);
            for s in w.devices.iter().flat_map(|d| &d.steps) {
                if let Action::Send { to, .. } | Action::SendAndClose { to, .. } = s.action {
                    all += 1;
                    g += matches!(to, Target::Group(_)) as u32;
                }
            }
            g as f64 / all as f64
        };
        assert!((0.25..0.36).contains(&share("peak-hour")));
        assert!(share("group-heavy") > 0.7);
    }

    // Proves reconnect-storm drops every device connected at half-time within a second.
    #[test]
    fn reconnect_storm_drops_everyone_at_half_time() {
        let d = 600_000;
        let w = build(&spec("reconnect-storm", 2_000, d), 9).unwrap();
        let drops = w
            .devices
            .iter()
            .flat_map(|x| &x.steps)
            .filter(|s| matches!(s.action, Action::DropConnection))
            .filter(|s| (d / 2..d / 2 + 1_000).contains(&s.at_ms))
            .count();
        let (_, conn) = rates(&w, d);
        let connected = conn * w.users.len() as f64;
        assert!(
            drops as f64 > 0.8 * connected,
            "{drops} drops, {connected} connected"
        );
    }

    // Proves named workloads are seeded and unknown names are refused with the list.
    #[test]
    fn seeded_and_named() {
        let a = build(&spec("steady", 500, 300_000), 7).unwrap();
        assert_eq!(a, build(&spec("steady", 500, 300_000), 7).unwrap());
        assert_ne!(a, build(&spec("steady", 500, 300_000), 8).unwrap());
        let e = build(&spec("rush", 500, 300_000), 7).unwrap_err();
        assert!(
            e.contains("unknown workload `rush`") && e.contains("peak-hour"),
            "{e}"
        );
        let s = build(&spec("stress", 200, 300_000), 1).unwrap();
        assert_eq!(s, crate::generate(&crate::Config::default(), 1));
    }
}
