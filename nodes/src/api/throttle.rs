//! Login throttling: each name may fail [`LOGIN_FAILURES_MAX`] times per
//! [`LOGIN_WINDOW_MS`]; after that every login of the name, right password or not, is refused
//! `rate_limited` (HTTP 429, with `Retry-After`) until the window ends. Password guessing
//! against one account is then held to a few guesses a minute per api node. The same table
//! keyed by source address (`addr:` keys, [`ADDR_FAILURES_MAX`] failures per window, across
//! names) holds one address guessing many accounts (credential stuffing) to a few dozen
//! guesses a minute; a successful login does not clear an address's failures.
//!
//! The table is this api node's own memory (nodes behind a load balancer each allow as
//! much), bounded by [`LOGIN_THROTTLE_NAMES_MAX`] names: when full, windows that ended are
//! dropped, and if none has, the oldest window goes (its name may start guessing afresh).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Failed logins of one name per window before the name is locked for the rest of it.
pub const LOGIN_FAILURES_MAX: u32 = 5;
/// Failed logins from one source address per window (any names) before it is locked.
pub const ADDR_FAILURES_MAX: u32 = 30;

/// The throttle key of a source address.
pub fn addr_key(ip: std::net::IpAddr) -> String {
    format!("addr:{ip}")
}
/// The throttle's window.
pub const LOGIN_WINDOW_MS: u64 = 60_000;
/// Names the throttle remembers at once.
pub const LOGIN_THROTTLE_NAMES_MAX: usize = 100_000;

#[derive(Debug, Default)]
struct Table {
    /// name -> (window start ms, failures in it).
    names: BTreeMap<String, (u64, u32)>,
    /// (window start ms, name): the oldest first, for eviction.
    by_start: BTreeSet<(u64, String)>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    /// A std mutex: a few map operations, never held across an await.
    table: Mutex<Table>,
}

impl LoginThrottle {
    /// `Err(ms)`: `name` (or an `addr:` key) is locked for `ms` more.
    pub fn check(&self, name: &str, now_ms: u64) -> Result<(), u64> {
        let max = if name.starts_with("addr:") {
            ADDR_FAILURES_MAX
        } else {
            LOGIN_FAILURES_MAX
        };
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match t.names.get(name) {
            Some(&(start, n)) if n >= max && now_ms < start + LOGIN_WINDOW_MS => {
                Err(start + LOGIN_WINDOW_MS - now_ms)
            }
            _ => Ok(()),
        }
    }

    /// A login of `name` failed on its password (or the name is unknown).
    pub fn failed(&self, name: &str, now_ms: u64) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Table { names, by_start } = &mut *t;
        match names.get_mut(name) {
            Some((start, n)) if now_ms < *start + LOGIN_WINDOW_MS => *n += 1,
            Some((start, n)) => {
                by_start.remove(&(*start, name.to_string()));
                (*start, *n) = (now_ms, 1);
                by_start.insert((now_ms, name.to_string()));
            }
            None => {
                if names.len() >= LOGIN_THROTTLE_NAMES_MAX {
                    evict(names, by_start, now_ms);
                }
                names.insert(name.to_string(), (now_ms, 1));
                by_start.insert((now_ms, name.to_string()));
            }
        }
    }

    /// A login of `name` succeeded: its failures are forgotten.
    pub fn succeeded(&self, name: &str) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((start, _)) = t.names.remove(name) {
            t.by_start.remove(&(start, name.to_string()));
        }
    }

    /// Names remembered now.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops every window that has ended; if none has, the oldest.
fn evict(
    names: &mut BTreeMap<String, (u64, u32)>,
    by_start: &mut BTreeSet<(u64, String)>,
    now_ms: u64,
) {
    let ended: Vec<(u64, String)> = by_start
        .iter()
        .take_while(|(start, _)| start + LOGIN_WINDOW_MS <= now_ms)
        .cloned()
        .collect();
    let drop = if ended.is_empty() {
        by_start.iter().next().cloned().into_iter().collect()
    } else {
        ended
    };
    for (start, name) in drop {
        by_start.remove(&(start, name.clone()));
        names.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves a name is locked after LOGIN_FAILURES_MAX failures for the rest of its window
    // (with the time left), other names are not, the lock ends with the window, and a success
    // forgets earlier failures.
    #[test]
    fn locks_a_name_after_its_failures_for_the_window() {
        let t = LoginThrottle::default();
        for k in 0..LOGIN_FAILURES_MAX {
            assert_eq!(t.check("alice", 1_000 + u64::from(k)), Ok(()));
            t.failed("alice", 1_000 + u64::from(k));
        }
        assert_eq!(t.check("alice", 11_000), Err(LOGIN_WINDOW_MS - 10_000));
        assert_eq!(t.check("bob", 11_000), Ok(()));
        assert_eq!(
            t.check("alice", 1_000 + LOGIN_WINDOW_MS),
            Ok(()),
            "window over"
        );
        t.failed("alice", 1_000 + LOGIN_WINDOW_MS);
        assert_eq!(
            t.check("alice", 2_000 + LOGIN_WINDOW_MS),
            Ok(()),
            "a new window"
        );
        for _ in 0..LOGIN_FAILURES_MAX - 2 {
            t.failed("carol", 5);
        }
        t.succeeded("carol");
        t.failed("carol", 6);
        assert_eq!(t.check("carol", 7), Ok(()));
        assert_eq!(t.len(), 2);
    }

    // Proves the table stays within LOGIN_THROTTLE_NAMES_MAX: ended windows go first, else
    // the oldest.
    #[test]
    fn stays_bounded() {
        let t = LoginThrottle::default();
        for i in 0..LOGIN_THROTTLE_NAMES_MAX {
            t.failed(&format!("n{i}"), i as u64 / 1_000);
        }
        assert_eq!(t.len(), LOGIN_THROTTLE_NAMES_MAX);
        t.failed("late", 50);
        assert_eq!(t.len(), LOGIN_THROTTLE_NAMES_MAX, "the oldest made room");
        // Every window began by 99 ms: all have ended a window later.
        t.failed("later", LOGIN_WINDOW_MS + 100);
        assert_eq!(t.len(), 1, "ended windows dropped");
    }
}
