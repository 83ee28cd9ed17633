//! Admission control for sends: how many one chat server commits at once (idgen, then kv).
//! A send past the limit is refused at once with `overloaded`, nothing written, instead of
//! waiting behind the others: under overload every queue would grow and with it the latency
//! of everything accepted.
//!
//! The limit is either fixed (`sends_in_flight_max`) or adaptive: with a latency target it
//! moves between `ADMISSION_LIMIT_MIN` and `sends_in_flight_max` by AIMD on the latency of
//! successful commits, judged once per window of one target. A window whose mean is over the
//! threshold cuts the limit by a fifth; one under it, in which the limit was binding (sends
//! in flight reached nine tenths of it), raises it by a twentieth (at least one). The limit
//! then sits where commits take about the threshold: as many in flight as the kv's group
//! commit can use without queueing, which no fixed number knows on every machine.
//!
//! The threshold is the target, or twice the baseline if that is higher. The baseline is the
//! lowest mean of the windows in which the limit did not bind (commits without admission
//! queueing: what healthy commits take), allowed to rise by 1 % per such window, so a
//! deployment whose healthy commits are slower than the target (slow disks, replicas far
//! apart) is judged against itself. Windows in which the limit binds do not move it (under
//! sustained overload it would creep up to the overloaded latency), except at the floor:
//! there no admission queueing is left, so commits that stay slower than the target without
//! overload (a leader moved to a slow disk) raise the baseline and free the limit. Failed commits (a kv shard without a leader answers after its
//! timeout) are not samples: they are unavailability, refused `unavailable`, not overload; one
//! dead shard must not cut the limit that sends to the healthy ones share.

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
    /// The lowest mean of windows in which the limit did not bind (or sat at the floor),
    /// slowly forgotten; None before the first such window (the threshold is the target).
    baseline: Option<Duration>,
}

/// A send admitted: held while it commits; dropping it reports the commit's latency.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    started: Instant,
    /// When it finished, if not at the drop (tests).
    finished: Option<Instant>,
    /// The commit failed: its latency is no sample (`failed`).
    failed: bool,
}

impl Admitted {
    /// The commit failed (kv or idgen unavailable, refused): it frees its slot but its
    /// latency does not move the limit.
    pub fn failed(&mut self) {
        self.failed = true;
    }
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
                baseline: None,
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
            failed: false,
        })
    }

    /// The limit now (what an `overloaded` refusal reports).
    pub fn limit(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).limit as usize
    }

    /// A send admitted at `started` finished at `now` (a sample unless it failed).
    fn done(&self, started: Instant, now: Instant, failed: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.in_flight -= 1;
        let Some(target) = self.target else {
            return;
        };
        if !failed {
            g.latency_sum += now.saturating_duration_since(started);
            g.commits += 1;
        }
        if now.duration_since(g.window_start) < target {
            return;
        }
        // A window of failures only (an outage) is closed unjudged.
        if g.commits > 0 {
            let mean = g.latency_sum / g.commits;
            let min = ADMISSION_LIMIT_MIN.min(self.max) as f64;
            let binding = g.peak_in_flight as f64 >= g.limit * 0.9;
            // A binding window's commits queued behind the limit: not what healthy commits
            // take, except at the floor, where no admission queueing is left to remove (so
            // commits that grew slower than the target for good move the baseline up, and
            // the limit off the floor, at 1 % a window).
            if !binding || g.limit <= min {
                g.baseline = Some(g.baseline.map_or(mean, |b| b.mul_f64(1.01).min(mean)));
            }
            let threshold = g.baseline.map_or(target, |b| target.max(b * 2));
            if mean > threshold {
                g.limit = (g.limit * 0.8).max(min);
            } else if binding {
                g.limit = (g.limit + (g.limit * 0.05).max(1.0)).min(self.max as f64);
            }
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
        self.admission.done(self.started, finished, self.failed);
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

    /// `n` rounds of `round(a, k, ..)`, the next starting `every` after the last; `t` ends
    /// after them.
    fn rounds(
        a: &Arc<Admission>,
        n: usize,
        k: usize,
        t: &mut Instant,
        took: Duration,
        every: Duration,
    ) {
        for _ in 0..n {
            round(a, k, *t, took);
            *t += every;
        }
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
        // Healthy: 50 ms commits (the baseline), not binding.
        rounds(&a, 10, 4, &mut t, ms(50), ms(50));
        assert_eq!(a.limit(), start);
        // Six times slower: over the target and over twice the baseline.
        rounds(&a, 40, 4, &mut t, ms(300), ms(300));
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
        rounds(&idle, 50, 1, &mut t, ms(5), ms(200));
        assert_eq!(idle.limit(), before, "an idle limit is not raised");
    }

    // Proves failed commits do not cut the limit however slow they are, and a deployment
    // whose healthy commits are slower than the target is judged against its own baseline:
    // it cuts when they get twice as slow, not at the target.
    #[test]
    fn failures_and_slow_baselines_do_not_cut() {
        let ms = Duration::from_millis;
        let a = Admission::new(1_000, Some(ms(100)));
        let mut t = Instant::now();
        let start = a.limit();
        for _ in 0..40 {
            let held: Vec<_> = (0..4).map(|_| a.try_admit().unwrap()).collect();
            for mut h in held {
                h.started = t;
                h.finished = Some(t + ms(2_000));
                h.failed();
            }
            t += ms(2_000);
        }
        assert_eq!(a.limit(), start, "failed commits are no samples");
        // Healthy commits of 250 ms: seen first at low load (the baseline), then with the limit
        // binding: it climbs.
        rounds(&a, 5, 4, &mut t, ms(250), ms(250));
        rounds(&a, 100, usize::MAX, &mut t, ms(250), ms(250));
        let climbed = a.limit();
        assert!(
            climbed > start,
            "{climbed} > {start}: judged against its baseline"
        );
        // Twice as slow as its baseline and more: it cuts.
        rounds(&a, 10, usize::MAX, &mut t, ms(700), ms(700));
        assert!(a.limit() < climbed, "{} < {climbed}", a.limit());
    }

    // Proves a limit is not held at the floor for good when healthy commits become slower
    // than the target after the baseline was learned fast (a leader moved to a slow disk),
    // with demand above the floor all along: at the floor its windows teach the baseline.
    #[test]
    fn slower_healthy_commits_free_the_floor() {
        let ms = Duration::from_millis;
        let a = Admission::new(1_000, Some(ms(100)));
        let mut t = Instant::now();
        rounds(&a, 10, 4, &mut t, ms(20), ms(100));
        rounds(&a, 20, usize::MAX, &mut t, ms(150), ms(150));
        assert_eq!(
            a.limit(),
            ADMISSION_LIMIT_MIN,
            "150 ms > the 100 ms target: cut"
        );
        rounds(&a, 400, usize::MAX, &mut t, ms(150), ms(150));
        assert!(
            a.limit() > 2 * ADMISSION_LIMIT_MIN,
            "{}: off the floor once the baseline learned 150 ms",
            a.limit()
        );
    }
}
