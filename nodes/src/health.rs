//! Outlier ejection for the nodes of a multi-node role: a caller that saw a node fail (an
//! error, a refusal, or no answer within a short attempt deadline) sends to the others for a
//! while instead of waiting out a deadline on every call.
//!
//! A failure ejects the node for [`EJECT_MIN`], doubling with each failure in a row up to
//! [`EJECT_MAX`]; once that time is up, the next call tries it again (one caller pays one
//! attempt deadline to find out), and a success clears its record. Ejected nodes are still
//! tried, after the healthy ones and soonest-back first: with every node ejected, a call
//! still goes out. Callers take the order from [`PeerHealth::order`], which also rotates the
//! starting node so that load spreads.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a first failure ejects a node.
pub const EJECT_MIN: Duration = Duration::from_secs(1);
/// The longest ejection (after several failures in a row).
pub const EJECT_MAX: Duration = Duration::from_secs(8);

#[derive(Debug, Clone, Copy, Default)]
struct Peer {
    /// Failures in a row.
    failures: u32,
    ejected_until: Option<Instant>,
}

/// The health of `n` nodes of one role, as one caller sees them.
#[derive(Debug)]
pub struct PeerHealth {
    /// A std mutex: held for a few instructions, never across an await.
    inner: Mutex<(usize, Vec<Peer>)>,
}

impl PeerHealth {
    pub fn new(n: usize) -> Self {
        assert!(n > 0, "a role has at least one node");
        Self {
            inner: Mutex::new((0, vec![Peer::default(); n])),
        }
    }

    /// The nodes to try, in order: the healthy ones round robin, then the ejected ones,
    /// soonest back first.
    pub fn order(&self, now: Instant) -> Vec<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.1.len();
        let start = g.0 % n;
        g.0 = g.0.wrapping_add(1);
        let (mut healthy, mut ejected): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (start + k) % n)
            .partition(|&i| g.1[i].ejected_until.is_none_or(|t| t <= now));
        ejected.sort_by_key(|&i| g.1[i].ejected_until);
        healthy.extend(ejected);
        healthy
    }

    /// Node `i` failed a call at `now`: ejected for a while.
    pub fn failed(&self, i: usize, now: Instant) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let p = &mut g.1[i];
        p.failures = p.failures.saturating_add(1);
        let factor = 1u32 << (p.failures - 1).min(8);
        p.ejected_until = Some(now + (EJECT_MIN * factor).min(EJECT_MAX));
    }

    /// Node `i` answered: healthy again.
    pub fn succeeded(&self, i: usize) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1[i] = Peer::default();
    }

    /// Whether node `i` is ejected at `now`.
    pub fn is_ejected(&self, i: usize, now: Instant) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1[i].ejected_until.is_some_and(|t| t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves healthy nodes come first round robin, a failed node goes last for EJECT_MIN and
    // comes back after it, failures in a row double the ejection up to EJECT_MAX, a success
    // clears it, and with every node ejected all are still offered, soonest back first.
    #[test]
    fn ejects_failed_nodes_for_a_growing_while() {
        let h = PeerHealth::new(3);
        let t0 = Instant::now();
        assert_eq!(h.order(t0), vec![0, 1, 2]);
        assert_eq!(h.order(t0), vec![1, 2, 0]);
        h.failed(1, t0);
        assert_eq!(h.order(t0), vec![2, 0, 1]);
        assert_eq!(h.order(t0), vec![0, 2, 1]);
        assert!(h.is_ejected(1, t0 + EJECT_MIN - Duration::from_millis(1)));
        assert!(!h.is_ejected(1, t0 + EJECT_MIN));
        assert_eq!(h.order(t0 + EJECT_MIN), vec![1, 2, 0]);
        // In a row: 1 s, 2 s, 4 s, 8 s, 8 s.
        for (k, secs) in [(2, 2), (3, 4), (4, 8), (5, 8)] {
            h.failed(1, t0);
            let back = t0 + Duration::from_secs(secs);
            assert!(
                h.is_ejected(1, back - Duration::from_millis(1)),
                "failure {k}"
            );
            assert!(!h.is_ejected(1, back), "failure {k}");
        }
        h.succeeded(1);
        assert!(!h.is_ejected(1, t0));
        h.failed(0, t0 + Duration::from_secs(1));
        h.failed(1, t0);
        h.failed(2, t0 + Duration::from_millis(500));
        let o = h.order(t0);
        assert_eq!(o, vec![1, 2, 0], "all ejected: soonest back first");
    }
}
