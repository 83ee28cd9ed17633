//! Admission control for sends: how many one chat server commits at once (idgen, then kv).
//! A send past the limit is refused at once with `overloaded`, nothing written, instead of
//! waiting behind the others: under overload every queue would grow and with it the latency
//! of everything accepted.
//!
//! The limit is either fixed (`sends_in_flight_max`) or adaptive: with a latency target it
//! moves between `ADMISSION_LIMIT_MIN` and `sends_in_flight_max` by AIMD on the commit
//! latency, judged once per window of one target. A window whose mean commit latency is over
//! the target cuts the limit by a fifth; one under it, in which the limit was binding (sends
//! in flight reached nine tenths of it), raises it by a twentieth (at least one). The limit
//! then sits where commits take about the target: as many in flight as the kv's group commit
//! can use without queueing, which no fixed number knows on every machine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::limits::ADMISSION_LIMIT_MIN;

#[derive(Debug)]
pub struct Admission {
    max: usize,
    /// None: the limit is `max`, fixed.
    target: Option<Duration>,
    /// A std mutex: a few arithmetic steps per send, never held across await.
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    in_flight: usize,
    limit: f64,
    /// The window being judged: when it began, its commits' latency sum and count, and the
    /// most sends in flight during it.
    window_start: Instant,
    latency_sum: Duration,
    commits: u32,
    peak_in_flight: usize,
}

/// A send admitted: held while it commits; dropping it reports the commit's latency.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    started: Instant,
    /// When it finished, if not at the drop (tests).
    finished: Option<Instant>,
}

/// The latency target of a configured `admission_target_ms`: absent, the default
/// (`limits::ADMISSION_TARGET_MS`); 0, none (a fixed limit).
pub fn target(ms: Option<u64>) -> Option<Duration> {
    match ms.unwrap_or(crate::limits::ADMISSION_TARGET_MS) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

impl Admission {
    /// `max` sends in flight at most (>= 1); with `target`, the limit adapts below it.
    pub fn new(max: usize, target: Option<Duration>) -> Arc<Admission> {
        let max = max.max(1);
        // Adaptive limits start low and climb while commits stay fast.
        let limit = match target {
            Some(_) => ADMISSION_LIMIT_MIN.max(64).min(max),
            None => max,
        };
        Arc::new(Admission {
            max,
            target,
            inner: Mutex::new(Inner {
                in_flight: 0,
                limit: limit as f64,
                window_start: Instant::now(),
                latency_sum: Duration::ZERO,
                commits: 0,
                peak_in_flight: 0,
            }),
        })
    }

    /// Admits a send, or None when the limit is reached.
    pub fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.in_flight >= g.limit as usize {
            return None;
        }
        g.in_flight += 1;
        g.peak_in_flight = g.peak_in_flight.max(g.in_flight);
        drop(g);
        Some(Admitted {
            admission: self.clone(),
            started: Instant::now(),
            finished: None,
        })
    }

    /// The limit now (what an `overloaded` refusal reports).
    pub fn limit(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).limit as usize
    }

    /// A send admitted at `started` finished at `now`.
    fn done(&self, started: Instant, now: Instant) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.in_flight -= 1;
        let Some(target) = self.target else {
            return;
        };
        g.latency_sum += now.saturating_duration_since(started);
        g.commits += 1;
        if now.duration_since(g.window_start) < target {
            return;
        }
        let mean = g.latency_sum / g.commits;
        let min = ADMISSION_LIMIT_MIN.min(self.max) as f64;
        if mean > target {
            g.limit = (g.limit * 0.8).max(min);
        } else if g.peak_in_flight as f64 >= g.limit * 0.9 {
            g.limit = (g.limit + (g.limit * 0.05).max(1.0)).min(self.max as f64);
        }
        g.window_start = now;
        g.latency_sum = Duration::ZERO;
        g.commits = 0;
        g.peak_in_flight = g.in_flight;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let finished = self.finished.unwrap_or_else(Instant::now);
        self.admission.done(self.started, finished);
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;

    /// Admits up to `n` sends (as many as the limit allows) at `at`; they finish after
    /// `took`. Returns how many were admitted.
    fn round(a: &Arc<Admission>, n: usize, at: Instant, took: Duration) -> usize {
        let held: Vec<_> = std::iter::from_fn(|| a.try_admit()).take(n).collect();
        let k = held.len();
        for mut h in held {
            h.started = at;
            h.finished = Some(at + took);
            drop(h); // Reports the commit.
        }
        k
    }

    // Proves a fixed limit admits exactly `max` at once and frees a slot when one ends.
    #[test]
    fn fixed_limit_admits_max() {
        let a = Admission::new(2, None);
        let x = a.try_admit().unwrap();
        let _y = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(x);
        assert!(a.try_admit().is_some());
        assert_eq!(a.limit(), 2);
    }

    // Proves the adaptive limit falls while commits are slower than the target, down to the
    // floor; climbs back while they are fast and the limit binds, up to the ceiling; and
    // stays put while they are fast but the limit does not bind.
    #[test]
    fn adaptive_limit_follows_latency() {
        let ms = Duration::from_millis;
        let a = Admission::new(1_000, Some(ms(100)));
        let mut t = Instant::now();
        let start = a.limit();
        for _ in 0..40 {
            round(&a, 4, t, ms(300));
            t += ms(300);
        }
        assert_eq!(
            a.limit(),
            ADMISSION_LIMIT_MIN,
            "cut to the floor from {start}"
        );
        for _ in 0..400 {
            let limit = a.limit();
            assert_eq!(
                round(&a, usize::MAX, t, ms(50)),
                limit,
                "admits up to the limit"
            );
            t += ms(50);
        }
        assert_eq!(a.limit(), 1_000, "climbs to the ceiling");
        let idle = Admission::new(1_000, Some(ms(100)));
        let before = idle.limit();
        for _ in 0..50 {
            round(&idle, 1, t, ms(5));
            t += ms(200);
        }
        assert_eq!(idle.limit(), before, "an idle limit is not raised");
    }
}
