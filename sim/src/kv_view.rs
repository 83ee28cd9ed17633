//! The operator's view of the kv groups once a run is over (`chatd status` as data): every kv
//! node's `KvStatus`, taken until it is healthy (see `checkers::kv_health`) or a deadline
//! passes, recorded as the history's `kv_status` event. The simulation and the real load
//! driver take it the same way.

use std::time::Duration;

use nodes::cluster::ClusterMap;
use nodes::proto::internal::{Request, Response};
use nodes::rpc::RpcClient;
use nodes::tls::NodeTls;

use crate::checkers::kv_health;
use crate::history::{Event, KvNodeStatus};

/// How long the groups get to heal after the run before the view is taken as it is.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(20);
/// Pause between two views while waiting.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// One node's answer is awaited this long.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Every kv node's replicas, from the nodes that answered, in node order.
/// `operator`: the certificate the harness dials with.
pub async fn view(map: &ClusterMap, operator: &NodeTls) -> Vec<KvNodeStatus> {
    let mut out = Vec::new();
    for (slot, addr) in map.kv.iter().enumerate() {
        let client = RpcClient::new(*addr, operator.clone());
        if let Ok(Response::KvStatus(shards)) =
            client.call_timeout(Request::KvStatus, ASK_TIMEOUT).await
        {
            out.push(KvNodeStatus {
                node: slot as u32,
                shards,
            });
        }
    }
    out
}

/// The `kv_status` event: the first healthy view within [`SETTLE_WITHIN`], else the last
/// one taken. `quorum_lost`: shards the faults left without a quorum of disks.
pub async fn settled(map: &ClusterMap, operator: &NodeTls, quorum_lost: Vec<u32>) -> Event {
    let placement = match map.placement() {
        Ok(p) => (0..p.shards).map(|s| p.replicas_of(s)).collect(),
        Err(_) => Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
    loop {
        let nodes = view(map, operator).await;
        let healthy = kv_health::problems(&placement, &quorum_lost, &nodes).is_empty();
        if healthy || tokio::time::Instant::now() >= deadline {
            return Event::KvStatus {
                placement,
                quorum_lost,
                nodes,
            };
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
