//! Where the nodes of the fixed-size roles are, and the kv cluster's shape, in etcd: a node
//! replaced on another machine is found at its new address without anyone's config being
//! edited.
//!
//! - `chatsim/addr/{role}/{index}` = `"10.0.5.3:7000"`: the RPC address of each kv, presence,
//!   push and idgen node, put by the node when it starts and put back whenever the node finds
//!   another value there (every [`MEMBERS_REFRESH_MS`]). No lease: a node that is down is still a member (a kv node's replicas hold votes and data,
//!   a presence node owns its users); only its replacement changes the key. Chat servers
//!   register under leases instead (`coord`), and nothing calls api nodes.
//! - `chatsim/kv/layout` = `{"nodes":5,"shards":5,"replicas":3}`: written by the first kv node
//!   to start (create-if-absent), compared by every kv node at start. A node whose config
//!   disagrees (another shard count, another number of nodes) stops with both layouts in its
//!   error: placement follows from the layout, and two layouts would put replicas in two
//!   places. Resharding is not supported.
//!
//! Every holder of clients of those roles (the [`crate::cluster::Peers`] of every node, and
//! each kv node's Raft transport) reads the prefix every [`MEMBERS_REFRESH_MS`] (the
//! simulated etcd has no watch) and moves its client of a node whose address changed
//! ([`RpcClient::repoint`]). The config's addresses are where clients look until then. A
//! client of node `kv-2` checks that the node it reaches holds `kv-2`'s certificate, so an
//! address in etcd can send a caller only to the node it was looking for.
//!
//! The old machine must stay down (revoke its certificate: `chatd revoke-node`): started
//! again, it would put its old address back, and the two would overwrite each other every
//! 2 s (each logs a warning) until one stops; a revoked one is refused by every caller.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::etcd::Etcd;
use crate::cluster::Role;
use crate::kv::placement::Placement;
use crate::rpc::{RpcClient, RpcError};

/// How often clients re-read the nodes' addresses: a moved node is found within this (plus
/// one etcd request).
pub const MEMBERS_REFRESH_MS: u64 = 2_000;
/// A node that could not publish its address or check the layout tries again after this.
const RETRY_MS: u64 = 500;
pub const LAYOUT_KEY: &str = "chatsim/kv/layout";
pub const ADDR_PREFIX: &str = "chatsim/addr/";
/// The roles whose nodes publish their addresses.
pub const PUBLISHED: [Role; 4] = [Role::Kv, Role::Presence, Role::Push, Role::Idgen];

/// What placement follows from: kv nodes, shards, copies of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub nodes: u32,
    pub shards: u32,
    pub replicas: u32,
}

impl From<&Placement> for KvLayout {
    fn from(p: &Placement) -> Self {
        KvLayout {
            nodes: p.nodes,
            shards: p.shards,
            replicas: p.replicas,
        }
    }
}

impl std::fmt::Display for KvLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kv nodes, {} shards x {} replicas",
            self.nodes, self.shards, self.replicas
        )
    }
}

/// Why a kv node must not serve.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("this node's config says {mine}, but the cluster in etcd was created with {etcd}: placement would differ (resharding is not supported)")]
    Mismatch { mine: KvLayout, etcd: KvLayout },
    #[error("etcd's {LAYOUT_KEY} is not a layout: {0}")]
    Unreadable(String),
}

/// A kv node's part: its slot, where it answers, and the layout its config gives.
#[derive(Clone)]
pub struct KvMembership {
    pub etcd: Arc<Etcd>,
    pub slot: u32,
    /// The RPC address other nodes reach this one at (published under its slot).
    pub advertise: SocketAddr,
}

impl std::fmt::Debug for KvMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvMembership(kv-{} at {})", self.slot, self.advertise)
    }
}

/// The key of node `index` of `role`'s address.
pub fn addr_key(role: Role, index: u32) -> String {
    format!("{ADDR_PREFIX}{}/{index}", role.name())
}

/// Compares `mine` with the layout in etcd, writing it there first if none is: `Ok(Ok(()))`
/// when they agree, `Ok(Err(_))` when they do not (the node must stop), `Err` when etcd did
/// not answer.
pub async fn check_layout(
    etcd: &Etcd,
    mine: KvLayout,
) -> Result<Result<(), LayoutError>, RpcError> {
    let bytes = serde_json::to_vec(&mine).expect("a layout serializes");
    let found = etcd.create_or_read(LAYOUT_KEY.into(), bytes).await?;
    Ok(match serde_json::from_slice::<KvLayout>(&found) {
        Ok(etcd) if etcd == mine => Ok(()),
        Ok(etcd) => Err(LayoutError::Mismatch { mine, etcd }),
        Err(e) => Err(LayoutError::Unreadable(e.to_string())),
    })
}

/// A kv node's layout check: retried while etcd does not answer (the node serves meanwhile,
/// at the address its config gives); returns when etcd agrees, or with the layout's error.
pub async fn check_layout_until_answered(etcd: &Etcd, mine: KvLayout) -> Result<(), LayoutError> {
    loop {
        match check_layout(etcd, mine).await {
            Ok(r) => return r,
            Err(e) => tracing::debug!(error = %e, "kv layout not checked yet"),
        }
        tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
    }
}

/// Every published address, by role and index. Keys or values that do not parse are skipped
/// with a warning.
pub async fn addresses(etcd: &Etcd) -> Result<BTreeMap<(Role, u32), SocketAddr>, RpcError> {
    let mut out = BTreeMap::new();
    for (key, value) in etcd.get_prefix(ADDR_PREFIX.into()).await? {
        let node = std::str::from_utf8(&key).ok().and_then(|k| {
            let (role, index) = k.strip_prefix(ADDR_PREFIX)?.split_once('/')?;
            Some((Role::from_name(role)?, index.parse::<u32>().ok()?))
        });
        let addr = std::str::from_utf8(&value)
            .ok()
            .and_then(|v| v.parse::<SocketAddr>().ok());
        match node.zip(addr) {
            Some((node, addr)) => {
                out.insert(node, addr);
            }
            None => tracing::warn!(
                key = %String::from_utf8_lossy(&key),
                value = %String::from_utf8_lossy(&value),
                "not a node address: ignored"
            ),
        }
    }
    Ok(out)
}

/// The kv nodes' published addresses, by slot.
pub async fn kv_addresses(etcd: &Etcd) -> Result<BTreeMap<u32, SocketAddr>, RpcError> {
    Ok(addresses(etcd)
        .await?
        .into_iter()
        .filter(|((role, _), _)| *role == Role::Kv)
        .map(|((_, i), addr)| (i, addr))
        .collect())
}

/// Clients of one role's nodes, by index.
pub type Group = (Role, Vec<RpcClient>);

/// This node, when it publishes its address: (role, index, address).
pub type Me = Option<(Role, u32, SocketAddr)>;

/// Moves each client whose node's address in etcd changed; how many moved. With `me`, puts
/// this node's address back if etcd holds another (or none): an old machine of the same
/// node that started by mistake and overwrote it, or etcd that lost it.
pub async fn refresh(etcd: &Etcd, groups: &[Group], me: Me) -> Result<usize, RpcError> {
    let found = addresses(etcd).await?;
    if let Some((role, index, addr)) = me {
        let there = found.get(&(role, index)).copied();
        if there != Some(addr) {
            if let Some(other) = there {
                tracing::warn!(role = role.name(), index, %other, mine = %addr, "etcd named another address for this node: put back");
            }
            etcd.put(addr_key(role, index), addr.to_string().into_bytes(), 0)
                .await?;
            tracing::info!(role = role.name(), index, %addr, "address published");
        }
    }
    let mut moved = 0;
    for ((role, index), addr) in found {
        let Some((_, clients)) = groups.iter().find(|(r, _)| *r == role) else {
            continue;
        };
        let Some(c) = clients.get(index as usize) else {
            tracing::warn!(role = role.name(), index, %addr, "etcd names a node beyond this node's config");
            continue;
        };
        let from = c.addr();
        if c.repoint(addr).await {
            tracing::info!(role = role.name(), index, %from, to = %addr, "node found at a new address");
            moved += 1;
        }
    }
    Ok(moved)
}

/// [`refresh`] now and every [`MEMBERS_REFRESH_MS`], while `alive` says so (a task per
/// holder of clients; etcd errors wait for the next round).
pub async fn follow(etcd: Arc<Etcd>, groups: Vec<Group>, me: Me, alive: impl Fn() -> bool) {
    while alive() {
        if let Err(e) = refresh(&etcd, &groups, me).await {
            tracing::debug!(error = %e, "node addresses not read");
        }
        tokio::time::sleep(Duration::from_millis(MEMBERS_REFRESH_MS)).await;
    }
}
