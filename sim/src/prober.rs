//! A blackbox probe of every kv shard around kv faults: how long did each shard refuse or
//! stall writes, and linearizable reads? The answer the devices' view cannot give precisely
//! (they retry, and most sends touch several shards).
//!
//! From its own node (10.0.0.3), through the same shard client every node uses, the prober
//! writes one tiny counter to each shard and reads one absent user from it ([`Probe::request`]),
//! one write and one read in flight per shard, every [`PROBE_EVERY`], from shortly before each
//! kv fault until well after its heal. Outside those windows it stays quiet, so runs without
//! kv faults are not changed by it. It records each probe's start, end and outcome;
//! `availability` turns them into stall times.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodes::canary::Canaries;
use nodes::cluster::{ClusterMap, Peers};
use tokio::time::Instant;

use crate::availability::Probe;

/// The prober's address.
pub const PROBER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// Pause between two probes of one kind of one shard.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Probing starts this long before a kv fault and ends this long after its heal.
pub const BEFORE: Duration = Duration::from_secs(5);
pub const AFTER: Duration = Duration::from_secs(20);

/// Starts the prober: it probes every shard during each window ((from, to) since `run_start`)
/// and appends its probes to the returned list as they finish.
pub fn start(
    map: ClusterMap,
    operator: nodes::tls::NodeTls,
    windows: Vec<(Duration, Duration)>,
    run_start: Instant,
) -> Arc<Mutex<Vec<Probe>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    if windows.is_empty() {
        return out;
    }
    let node = madsim::runtime::Handle::current()
        .create_node()
        .name("prober")
        .ip(IpAddr::V4(PROBER_IP))
        .build();
    let peers = Peers::new(map, Canaries::none(), operator);
    // The prober finds a moved node through etcd, as every node does.
    if let Some(task) = peers.membership_task(None) {
        node.spawn(task);
    }
    let shards = peers.kv_shards() as u32;
    for (shard, read) in (0..shards).flat_map(|s| [(s, false), (s, true)]) {
        let (peers, windows, out) = (peers.clone(), windows.clone(), out.clone());
        node.spawn(async move {
            for (from, to) in windows {
                tokio::time::sleep_until(run_start + from).await;
                while Instant::now() < run_start + to {
                    let start = Instant::now();
                    let r = peers
                        .kv_shard(shard as usize)
                        .call(Probe::request(read))
                        .await;
                    let us = |t: Instant| t.duration_since(run_start).as_micros() as u64;
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(Probe {
                        shard,
                        read,
                        start_us: us(start),
                        end_us: us(Instant::now()),
                        ok: Probe::answered(read, &r),
                    });
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            }
        });
    }
    out
}

/// The windows to probe: around every fault that touches a kv node, merged where they
/// overlap. `faults`: (start, heal) since the run started, of kv faults.
pub fn windows(faults: &[(Duration, Duration)]) -> Vec<(Duration, Duration)> {
    let mut spans: Vec<(Duration, Duration)> = faults
        .iter()
        .map(|(a, b)| (a.saturating_sub(BEFORE), *b + AFTER))
        .collect();
    spans.sort();
    let mut merged: Vec<(Duration, Duration)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}
