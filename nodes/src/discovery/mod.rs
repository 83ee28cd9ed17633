//! Discovery: chat servers register with their addresses and load and renew a lease; clients
//! (through the api) ask for a live, lightly loaded one. A server whose lease lapsed is never
//! handed out. The seed names ZooKeeper for this role; here it is one node with leases.
//!
//! [`Registry`] is the I/O-free core (time is passed in); `server` is the shell. It does not
//! survive its own restart with state: after a restart it is empty until servers renew (every
//! `DISCOVERY_RENEW_MS`), which is the lease model working as intended.
//!
//! It serves deployments without etcd (`all-in-one`); clusters that coordinate on etcd
//! (the simulation, `local-cluster`) keep registrations there instead: see [`crate::coord`].

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

    /// A live server for a device: [`crate::coord::pick_among`] the live ones.
    pub fn pick(&self, hint: u64, avoid: Option<u32>, now_ms: u64) -> Option<ChatServerInfo> {
        crate::coord::pick_among(self.live(now_ms), hint, avoid)
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
            tls: false,
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
                .pick(hint, None, DISCOVERY_LEASE_MS + 1)
                .expect("server 2 is live");
            assert_eq!(s.server, 2);
        }
        assert!(r.pick(0, None, 4_000 + DISCOVERY_LEASE_MS).is_none());
    }

    // Proves picks spread over servers and prefer the less loaded of two.
    #[test]
    fn picks_spread_and_prefer_light_servers() {
        let mut r = Registry::default();
        r.on_register(info(1, 100), 0);
        r.on_register(info(2, 0), 0);
        r.on_register(info(3, 0), 0);
        let picks: Vec<u32> = (0..30)
            .map(|h| r.pick(h, None, 1).unwrap().server)
            .collect();
        assert!(picks.contains(&2) && picks.contains(&3));
        assert!(picks.iter().filter(|s| **s == 1).count() < 10);
    }

    // Proves a server the client failed to reach is avoided while another is live, and
    // still picked when it is the only one.
    #[test]
    fn avoided_server_is_skipped_unless_alone() {
        let mut r = Registry::default();
        r.on_register(info(1, 0), 0);
        r.on_register(info(2, 0), 0);
        for h in 0..20 {
            assert_eq!(r.pick(h, Some(1), 1).unwrap().server, 2);
        }
        let mut alone = Registry::default();
        alone.on_register(info(1, 0), 0);
        assert_eq!(alone.pick(0, Some(1), 1).unwrap().server, 1);
    }
}
