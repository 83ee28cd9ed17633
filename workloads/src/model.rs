//! The 50M-DAU user-behaviour model: every constant a capacity plan and a scaled-down
//! simulation need, each with its source or a stated assumption.
//!
//! Sources are named in each field's comment: `[seed]` is the product's requirements (the
//! chapter "Design a chat system" beside DESIGN.md), `[design]` is DESIGN.md, `[public]` a
//! public figure named in place, `[assumption]` a number chosen here and open to argument
//! (change it and the capacity plan follows). docs/ARCHITECTURE.md §14 repeats the table.
//!
//! Scaling keeps every per-user rate: a simulation of `users = dau * scale` users for one
//! simulated hour stands for the full system's hour at `1 / scale` times its load. Only the
//! absolute counts shrink; what one user does per hour does not.

use serde::{Deserialize, Serialize};

/// Hours of a day, local time of a single-region population.
pub const HOURS: usize = 24;

/// A user's device kinds, in slot order: every user has a phone; a second device is a desktop
/// or web client; a third a tablet (which behaves like a phone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    Phone,
    Desktop,
    Tablet,
}

impl DeviceKind {
    pub fn of_slot(slot: u32) -> Self {
        match slot {
            0 => DeviceKind::Phone,
            1 => DeviceKind::Desktop,
            _ => DeviceKind::Tablet,
        }
    }

    pub fn is_mobile(self) -> bool {
        !matches!(self, DeviceKind::Desktop)
    }
}

/// How one kind of device is used in a day.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Minutes per day the device holds a connection (app in the foreground, or a desktop
    /// client open).
    pub online_min_per_day: f64,
    /// Separate sessions per day (app opens).
    pub sessions_per_day: f64,
    /// Share of the user's sends made from this device kind (renormalised over the kinds a
    /// user has).
    pub send_weight: f64,
}

impl Usage {
    /// Mean session length in milliseconds.
    pub fn mean_session_ms(&self) -> f64 {
        self.online_min_per_day * 60_000.0 / self.sessions_per_day
    }
}

/// A group-size band: sizes `lo..=hi` drawn uniformly, with this share of groups.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SizeBand {
    pub lo: u32,
    pub hi: u32,
    pub share: f64,
}

/// The model. `Model::default()` is the product's 50M-DAU population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Daily active users. [seed] "50 million DAU".
    pub dau: u64,
    /// Share of users with 1, 2 and 3 devices. [assumption] Everyone has a phone; 70 % also
    /// use a desktop or web client, 30 % a tablet too: mean 2.0 devices ("several devices per
    /// account" [seed]; the 1/1000 run of issue 4 asks for ~100,000 devices per 50,000 users).
    pub devices_per_user: [f64; 3],
    /// Phones. [assumption] 30 min in the foreground per day over 15 opens (2 min each):
    /// messaging sessions are short and frequent.
    pub phone: Usage,
    /// Desktop and web clients. [assumption] Open 3 h a day in 2 sessions (a browser tab or
    /// desktop app left open at work and in the evening).
    pub desktop: Usage,
    /// Tablets. [assumption] 20 min a day over 4 opens.
    pub tablet: Usage,
    /// Mean chat contacts whose presence a user sees (friends). [assumption] 20. Not a social
    /// network's friend list (hundreds) but the people one actually chats with; presence
    /// fan-out is bounded by it.
    pub friends_mean: f64,
    /// Most friends one user has. [assumption] keeps the tail of presence fan-out bounded.
    pub friends_max: u32,
    /// Group memberships per user, mean. [assumption] 3.
    pub groups_per_user: f64,
    /// Group sizes. [seed] at most 100 members; [assumption] the shares: most groups are
    /// families and friends, a few are large.
    pub group_sizes: Vec<SizeBand>,
    /// Messages each user sends per day. [public] WhatsApp reported 100 billion messages a day
    /// (October 2020) over about 2 billion users: ~50 per user; [assumption] 40 for a smaller,
    /// younger product.
    pub messages_per_user_per_day: f64,
    /// Share of sends that go to a group. [assumption] 30 %.
    pub group_share: f64,
    /// Median message length in characters. [assumption] one short sentence.
    pub text_median_chars: f64,
    /// Log-normal shape of ordinary messages. [assumption] 99 % under ~300 characters.
    pub text_sigma: f64,
    /// Share of long messages (pasted text, code, articles), log-uniform from 2,000 up to the
    /// limit. [seed] limit 100,000 characters; [assumption] 0.5 %.
    pub long_text_share: f64,
    /// Relative activity per local hour (mean 1 after normalisation). [assumption] a single
    /// time zone's consumer curve: a night trough at 1/8 of the mean (03:00-05:00), an evening
    /// peak near 2x the mean (1.98) at 20:00.
    pub diurnal: [f64; HOURS],
    /// Tunnels (a loss of all connectivity for 1 s to 3 min) per hour a mobile device is
    /// online. [assumption] one an hour: lifts, underground, handovers.
    pub tunnels_per_mobile_hour: f64,
    /// Connection drops without loss of connectivity (NAT rebinding, a proxy restart) per hour
    /// a device is online. [assumption] 0.5.
    pub drops_per_hour: f64,
    /// Share of session ends that are an explicit logout rather than backgrounding the app or
    /// closing the tab (heartbeats just stop). [assumption] 2 %.
    pub logout_share: f64,
    /// Share of session ends that come right after a send, before its ack can arrive.
    /// [assumption] 5 %.
    pub send_then_close_share: f64,
    /// Share of sends that are malformed or not allowed (old clients, bugs). [assumption] 0.1 %.
    pub bad_input_share: f64,
    /// Heartbeat interval in seconds. [design] "heartbeats from devices every 5 s".
    pub heartbeat_interval_s: f64,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            dau: 50_000_000,
            devices_per_user: [0.30, 0.40, 0.30],
            phone: Usage {
                online_min_per_day: 30.0,
                sessions_per_day: 15.0,
                send_weight: 0.70,
            },
            desktop: Usage {
                online_min_per_day: 180.0,
                sessions_per_day: 2.0,
                send_weight: 0.25,
            },
            tablet: Usage {
                online_min_per_day: 20.0,
                sessions_per_day: 4.0,
                send_weight: 0.05,
            },
            friends_mean: 20.0,
            friends_max: 200,
            groups_per_user: 3.0,
            group_sizes: vec![
                SizeBand {
                    lo: 3,
                    hi: 8,
                    share: 0.60,
                },
                SizeBand {
                    lo: 9,
                    hi: 30,
                    share: 0.30,
                },
                SizeBand {
                    lo: 31,
                    hi: 99,
                    share: 0.08,
                },
                SizeBand {
                    lo: 100,
                    hi: 100,
                    share: 0.02,
                },
            ],
            messages_per_user_per_day: 40.0,
            group_share: 0.30,
            text_median_chars: 30.0,
            text_sigma: 1.0,
            long_text_share: 0.005,
            diurnal: [
                0.35, 0.22, 0.15, 0.12, 0.12, 0.2, 0.4, 0.7, 0.95, 1.05, 1.1, 1.15, 1.25, 1.2,
                1.15, 1.15, 1.2, 1.35, 1.55, 1.75, 1.9, 1.85, 1.4, 0.8,
            ],
            tunnels_per_mobile_hour: 1.0,
            drops_per_hour: 0.5,
            logout_share: 0.02,
            send_then_close_share: 0.05,
            bad_input_share: 0.001,
            heartbeat_interval_s: 5.0,
        }
    }
}

impl Model {
    /// The diurnal factor of `hour` (the curve normalised to mean 1).
    pub fn diurnal_factor(&self, hour: usize) -> f64 {
        let mean = self.diurnal.iter().sum::<f64>() / HOURS as f64;
        self.diurnal[hour % HOURS] / mean
    }

    /// The busiest hour of the day and its factor.
    pub fn peak_hour(&self) -> (usize, f64) {
        (0..HOURS)
            .map(|h| (h, self.diurnal_factor(h)))
            .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a })
    }

    pub fn usage(&self, kind: DeviceKind) -> Usage {
        match kind {
            DeviceKind::Phone => self.phone,
            DeviceKind::Desktop => self.desktop,
            DeviceKind::Tablet => self.tablet,
        }
    }

    /// Mean devices per user.
    pub fn mean_devices(&self) -> f64 {
        self.devices_per_user
            .iter()
            .enumerate()
            .map(|(i, p)| (i + 1) as f64 * p)
            .sum()
    }

    /// Share of users that have the device in `slot` (0 phone, 1 desktop, 2 tablet).
    pub fn has_slot(&self, slot: u32) -> f64 {
        self.devices_per_user[slot as usize..].iter().sum()
    }

    /// Probability that a device of `kind` is connected at an hour with diurnal factor `f`.
    pub fn online_share(&self, kind: DeviceKind, f: f64) -> f64 {
        (self.usage(kind).online_min_per_day / 1440.0 * f).min(0.95)
    }

    /// Expected connected devices per user at diurnal factor `f`.
    pub fn connections_per_user(&self, f: f64) -> f64 {
        [DeviceKind::Phone, DeviceKind::Desktop, DeviceKind::Tablet]
            .iter()
            .enumerate()
            .map(|(slot, &k)| self.has_slot(slot as u32) * self.online_share(k, f))
            .sum()
    }

    /// Messages one user sends per second at diurnal factor `f`.
    pub fn messages_per_user_per_s(&self, f: f64) -> f64 {
        self.messages_per_user_per_day / 86_400.0 * f
    }

    /// Connects (app opens) per user per second at diurnal factor `f`.
    pub fn connects_per_user_per_s(&self, f: f64) -> f64 {
        (0..3u32)
            .map(|slot| {
                self.has_slot(slot) * self.usage(DeviceKind::of_slot(slot)).sessions_per_day
            })
            .sum::<f64>()
            / 86_400.0
            * f
    }

    /// Mean message length in characters: the log-normal's mean (its clamp at 1,999 is
    /// negligible) on the short share, the log-uniform's mean on the long share.
    pub fn mean_text_chars(&self) -> f64 {
        let short = self.text_median_chars * (self.text_sigma * self.text_sigma / 2.0).exp();
        let (lo, hi) = (2_000.0_f64, crate::MAX_CHARS as f64);
        let long = (hi - lo) / (hi / lo).ln();
        (1.0 - self.long_text_share) * short + self.long_text_share * long
    }

    /// Mean group size under `group_sizes`.
    pub fn mean_group_size(&self) -> f64 {
        let total: f64 = self.group_sizes.iter().map(|b| b.share).sum();
        self.group_sizes
            .iter()
            .map(|b| b.share / total * (b.lo + b.hi) as f64 / 2.0)
            .sum()
    }

    /// Groups in a population of `users`.
    pub fn groups_for(&self, users: u32) -> u32 {
        ((users as f64 * self.groups_per_user / self.mean_group_size()).round() as u32).max(1)
    }

    /// A device's send rate while it is online, in sends per millisecond, for a user with
    /// `devices` devices. A device that is online longer does not send more: the user's
    /// messages are split by `send_weight`, then spread over the device's online time.
    pub fn send_rate_while_online_per_ms(&self, slot: u32, devices: u32) -> f64 {
        let weights: f64 = (0..devices)
            .map(|s| self.usage(DeviceKind::of_slot(s)).send_weight)
            .sum();
        let u = self.usage(DeviceKind::of_slot(slot));
        let share = u.send_weight / weights;
        self.messages_per_user_per_day * share / (u.online_min_per_day * 60_000.0)
    }
}

/// A scale: the simulated population is `dau * scale` users.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scale(pub f64);

impl Scale {
    /// Parses `1/1000`, `0.001` or `1e-3`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("scale `{s}`: expected a fraction such as 1/1000 or 0.001");
        let v = match s.split_once('/') {
            Some((a, b)) => {
                let a: f64 = a.trim().parse().map_err(|_| bad())?;
                let b: f64 = b.trim().parse().map_err(|_| bad())?;
                a / b
            }
            None => s.trim().parse().map_err(|_| bad())?,
        };
        if !(v.is_finite() && v > 0.0 && v <= 1.0) {
            return Err(format!("scale `{s}`: must be in (0, 1]"));
        }
        Ok(Scale(v))
    }

    /// Users the simulation runs at this scale of `dau`.
    pub fn users(self, dau: u64) -> u32 {
        ((dau as f64 * self.0).round() as u64).clamp(2, u32::MAX as u64) as u32
    }

    /// The scale of a run of `users` out of `dau`.
    pub fn of(users: u32, dau: u64) -> Self {
        Scale(users as f64 / dau as f64)
    }
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inv = 1.0 / self.0;
        if (inv - inv.round()).abs() < 1e-6 * inv {
            write!(f, "1/{}", inv.round() as u64)
        } else {
            write!(f, "1/{inv:.1}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the diurnal curve is normalised to mean 1 and peaks in the evening.
    #[test]
    fn diurnal_is_normalised() {
        let m = Model::default();
        let mean: f64 = (0..HOURS).map(|h| m.diurnal_factor(h)).sum::<f64>() / HOURS as f64;
        assert!((mean - 1.0).abs() < 1e-9);
        let (h, f) = m.peak_hour();
        assert_eq!(h, 20);
        assert!((1.5..2.2).contains(&f), "peak factor {f}");
    }

    // Proves the model's derived figures are what its constants say.
    #[test]
    fn derived_figures() {
        let m = Model::default();
        assert!((m.mean_devices() - 2.0).abs() < 1e-9);
        assert!((m.phone.mean_session_ms() - 120_000.0).abs() < 1e-6);
        // Mean hour: phone 30/1440, desktop 180/1440 on 70 %, tablet 20/1440 on 30 %.
        let c = m.connections_per_user(1.0);
        let want = 30.0 / 1440.0 + 0.7 * 180.0 / 1440.0 + 0.3 * 20.0 / 1440.0;
        assert!((c - want).abs() < 1e-9);
        // A user's sends over a day add up to messages_per_user_per_day, whatever the devices.
        for devices in 1..=3 {
            let per_day: f64 = (0..devices)
                .map(|s| {
                    let u = m.usage(DeviceKind::of_slot(s));
                    m.send_rate_while_online_per_ms(s, devices) * u.online_min_per_day * 60_000.0
                })
                .sum();
            assert!((per_day - m.messages_per_user_per_day).abs() < 1e-9);
        }
        // 99.5 % short (mean 30 e^0.5 = 49.5) and 0.5 % long (mean 98,000 / ln 50 = 25,051).
        let chars = m.mean_text_chars();
        assert!((chars - 174.5).abs() < 1.0, "mean text {chars}");
        let g = m.mean_group_size();
        assert!((10.0..25.0).contains(&g), "mean group size {g}");
    }

    // Proves scales parse in both spellings and refuse nonsense.
    #[test]
    fn scales() {
        assert_eq!(Scale::parse("1/1000").unwrap().users(50_000_000), 50_000);
        assert_eq!(Scale::parse("0.0001").unwrap().users(50_000_000), 5_000);
        assert!(Scale::parse("2").is_err());
        assert!(Scale::parse("0").is_err());
        assert!(Scale::parse("a/b").is_err());
        assert_eq!(Scale::of(50_000, 50_000_000).to_string(), "1/1000");
    }
}
