//! Wall clocks, injected. Production code never reads the time itself: it is handed a
//! [`Clock`]. Under madsim `SystemTime` is the simulated clock (one clock for every node), so
//! per-node skew is modelled here by an offset.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as this node believes it.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock shifted by an adjustable offset (skew, or a step fault).
#[derive(Debug, Default)]
pub struct SkewedClock {
    offset_ms: AtomicI64,
}

impl SkewedClock {
    pub fn new(offset_ms: i64) -> Arc<Self> {
        Arc::new(Self {
            offset_ms: AtomicI64::new(offset_ms),
        })
    }

    /// Steps the clock by `delta_ms` (negative: backwards).
    pub fn step(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::Relaxed);
    }
}

impl Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (real + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }
}

/// Unix milliseconds of the shared clock (simulated under madsim). For timestamps that are
/// informational only (`sent_at_ms`), never for ordering.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
