//! Discovery: chat servers register with their addresses and load and renew a lease; clients
//! (through the api) ask for a live, lightly loaded one. A server whose lease lapsed is never
//! handed out. The seed names ZooKeeper for this role; here it is one node with leases.
//!
//! [`Registry`] is the I/O-free core (time is passed in); `server` is the shell. It does not
//! survive its own restart with state: after a restart it is empty until servers renew (every
//! `DISCOVERY_RENEW_MS`), which is the lease model working as intended.

pub mod server;

use std::collections::BTreeMap;

use crate::limits::DISCOVERY_LEASE_MS;
use crate::proto::internal::ChatServerInfo;

#[derive(Debug, Clone)]
struct Lease {
    info: ChatServerInfo,
    expires_at_ms: u64,
}

#[derive(Debug, Default)]
pub struct Registry {
    servers: BTreeMap<u32, Lease>,
}

impl Registry {
    pub fn on_register(&mut self, info: ChatServerInfo, now_ms: u64) {
        self.servers.insert(
            info.server,
            Lease {
                info,
                expires_at_ms: now_ms + DISCOVERY_LEASE_MS,
            },
        );
    }

    /// Live servers, by index.
    pub fn live(&self, now_ms: u64) -> Vec<ChatServerInfo> {
        self.servers
            .values()
            .filter(|l| l.expires_at_ms > now_ms)
            .map(|l| l.info.clone())
            .collect()
    }

    /// Power of two choices among live servers, seeded by `hint`: the less loaded of two.
    /// Picking the single least-loaded server would send a whole reconnect storm to it before
    /// its next load report.
    pub fn pick(&self, hint: u64, now_ms: u64) -> Option<ChatServerInfo> {
        let live = self.live(now_ms);
        if live.is_empty() {
            return None;
        }
        let n = live.len() as u64;
        let a = &live[(hint % n) as usize];
        let b = &live[((hint / n).wrapping_add(1).wrapping_add(hint % n) % n) as usize];
        Some(if b.load < a.load {
            b.clone()
        } else {
            a.clone()
        })
    }

    /// Drops lapsed leases (bounded memory).
    pub fn on_tick(&mut self, now_ms: u64) {
        self.servers.retain(|_, l| l.expires_at_ms > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(server: u32, load: u32) -> ChatServerInfo {
        ChatServerInfo {
            server,
            ws_addr: format!("10.0.3.{server}:9000"),
            rpc_addr: format!("10.0.3.{server}:7000"),
            load,
        }
    }

    // Proves a lapsed lease is never handed out and a renewed one is.
    #[test]
    fn lapsed_lease_is_never_picked() {
        let mut r = Registry::default();
        r.on_register(info(1, 0), 0);
        r.on_register(info(2, 0), 4_000);
        for hint in 0..50 {
            let s = r
                .pick(hint, DISCOVERY_LEASE_MS + 1)
                .expect("server 2 is live");
            assert_eq!(s.server, 2);
        }
        assert!(r.pick(0, 4_000 + DISCOVERY_LEASE_MS).is_none());
    }

    // Proves picks spread over servers and prefer the less loaded of two.
    #[test]
    fn picks_spread_and_prefer_light_servers() {
        let mut r = Registry::default();
        r.on_register(info(1, 100), 0);
        r.on_register(info(2, 0), 0);
        r.on_register(info(3, 0), 0);
        let picks: Vec<u32> = (0..30).map(|h| r.pick(h, 1).unwrap().server).collect();
        assert!(picks.contains(&2) && picks.contains(&3));
        assert!(picks.iter().filter(|s| **s == 1).count() < 10);
    }
}
