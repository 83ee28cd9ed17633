//! Who is where: the cluster map (static addresses of the internal roles) and [`Peers`], the
//! RPC clients a node uses to reach the others. Chat servers are dynamic: they are found
//! through discovery.
//!
//! Sharding: user-keyed data (records, cursors, sessions) lives on kv shard `user % n`;
//! channel-keyed data (record, log, dedup) on `channel % n`; names on `fnv1a(name) % n`;
//! counters on shard 0, where `n` is the number of shards (Raft groups), fixed when the
//! cluster is created. Each shard's replicas sit on kv nodes as `kv::placement` says, and a
//! [`ShardClient`] finds its leader. A user's presence lives on presence node `user % p`, where
//! `p` is the number of presence nodes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::canary::{Canaries, Canary};
use crate::coord::{Coordination, Discovery};
use crate::health::PeerHealth;
use crate::kv::client::ShardClient;
use crate::kv::placement::Placement;
use crate::proto::client::PresenceStatus;
use crate::proto::internal::{ChatServerInfo, Request, Response};
use crate::proto::Id;
use crate::rpc::{RpcClient, RpcError};
use crate::tls::{NodeTls, Principal};

/// The internal roles: what a process runs (`chatd <role> --index i`) and what a node's
/// certificate names (`tls::Principal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Discovery,
    Kv,
    Idgen,
    Presence,
    Push,
    Chat,
    Api,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Discovery,
        Role::Kv,
        Role::Idgen,
        Role::Presence,
        Role::Push,
        Role::Chat,
        Role::Api,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Discovery => "discovery",
            Role::Kv => "kv",
            Role::Idgen => "idgen",
            Role::Presence => "presence",
            Role::Push => "push",
            Role::Chat => "chat",
            Role::Api => "api",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Static addresses of the internal roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Where chat servers register and idgen worker ids come from.
    pub coordination: Coordination,
    /// kv nodes, by slot.
    pub kv: Vec<SocketAddr>,
    /// kv shards (Raft groups) and copies of each; 0 means one shard per kv node, each on
    /// `kv_replicas` (0: 1) nodes.
    #[serde(default)]
    pub kv_shards: u32,
    #[serde(default)]
    pub kv_replicas: u32,
    pub idgen: Vec<SocketAddr>,
    /// Presence nodes: user `u`'s presence lives on node `u % n`.
    pub presence: Vec<SocketAddr>,
    /// Push nodes: any of them serves any request (claims in kv keep one notification per
    /// (message, device)).
    pub push: Vec<SocketAddr>,
}

/// `users` grouped by `user % n`.
fn by_modulus(users: &[Id], n: usize) -> BTreeMap<usize, Vec<Id>> {
    let mut out: BTreeMap<usize, Vec<Id>> = BTreeMap::new();
    for u in users {
        out.entry((u % n as u64) as usize).or_default().push(*u);
    }
    out
}

/// Clients of `role`'s nodes at `addrs`, by index. Each must prove it is the node of its
/// index: its address can move (`coord::members`).
fn to_nodes(addrs: &[SocketAddr], tls: &NodeTls, role: Role) -> Vec<RpcClient> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| RpcClient::to_node(*a, tls.clone(), Principal::Node(role, i as u32)))
        .collect()
}

/// FNV-1a: a stable hash (std's is randomized per process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl ClusterMap {
    /// Where the kv shards live.
    pub fn placement(&self) -> Result<Placement, String> {
        let nodes = self.kv.len() as u32;
        let shards = if self.kv_shards == 0 {
            nodes
        } else {
            self.kv_shards
        };
        Placement::new(nodes, shards, self.kv_replicas.max(1))
    }
}

/// RPC clients for every role, shared by a node's tasks.
pub struct Peers {
    pub map: ClusterMap,
    /// One client per kv shard, by shard.
    kv: Vec<ShardClient>,
    /// One client per kv node, by slot (node-level requests: counters, status).
    kv_nodes: Vec<RpcClient>,
    idgen: Vec<RpcClient>,
    /// Which idgen nodes failed lately (calls go to the others first).
    pub idgen_health: PeerHealth,
    /// Presence nodes, by index (user `u` on `u % n`: [`Peers::presence_for`]).
    presence: Vec<RpcClient>,
    push: Vec<RpcClient>,
    /// Which push nodes failed lately (requests go to the others first).
    pub push_health: PeerHealth,
    pub discovery: Discovery,
    /// Chat servers by index, as last listed by discovery. A std mutex: never held across await.
    chat: Mutex<BTreeMap<u32, RpcClient>>,
    pub canaries: Canaries,
    /// This node's certificate: every client above dials with it, and its RPC server accepts
    /// callers with it.
    pub tls: NodeTls,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peers({:?})", self.map)
    }
}

impl Peers {
    pub fn new(map: ClusterMap, canaries: Canaries, tls: NodeTls) -> Arc<Self> {
        assert!(!map.kv.is_empty(), "a cluster needs at least one kv node");
        assert!(
            !map.idgen.is_empty(),
            "a cluster needs at least one idgen node"
        );
        assert!(
            !map.presence.is_empty() && !map.push.is_empty(),
            "a cluster needs at least one presence and one push node"
        );
        let placement = map
            .placement()
            .expect("a valid kv placement (checked by the config)");
        let kv_nodes = to_nodes(&map.kv, &tls, Role::Kv);
        let stale = canaries.is_on(Canary::StaleRead);
        let kv = (0..placement.shards)
            .map(|shard| {
                let replicas = placement
                    .replicas_of(shard)
                    .into_iter()
                    .map(|slot| (slot, kv_nodes[slot as usize].clone()))
                    .collect();
                ShardClient::new(shard, replicas, stale)
            })
            .collect();
        Arc::new(Self {
            kv,
            kv_nodes,
            idgen: to_nodes(&map.idgen, &tls, Role::Idgen),
            idgen_health: PeerHealth::new(map.idgen.len()),
            presence: to_nodes(&map.presence, &tls, Role::Presence),
            push: to_nodes(&map.push, &tls, Role::Push),
            push_health: PeerHealth::new(map.push.len()),
            discovery: Discovery::new(&map.coordination, tls.clone()),
            chat: Mutex::new(BTreeMap::new()),
            canaries,
            map,
            tls,
        })
    }

    /// With etcd: the task that publishes this node's address (`advertise`, for a kv,
    /// presence, push or idgen node: the role and index its certificate names) and keeps the
    /// clients of kv, presence, push and idgen nodes at the addresses etcd gives
    /// (`coord::members`), for as long as these peers are in use. A node's `run` spawns it
    /// (in the simulation a task belongs to the node that spawns it, and so does the etcd
    /// connection it opens).
    #[cfg(feature = "etcd")]
    pub fn membership_task(
        self: &Arc<Self>,
        advertise: Option<SocketAddr>,
    ) -> Option<impl std::future::Future<Output = ()>> {
        use crate::coord::members;
        let etcd = self.etcd()?;
        let weak = Arc::downgrade(self);
        let groups = vec![
            (Role::Kv, self.kv_nodes.clone()),
            (Role::Presence, self.presence.clone()),
            (Role::Push, self.push.clone()),
            (Role::Idgen, self.idgen.clone()),
        ];
        let me = match (self.tls.principal(), advertise) {
            (Principal::Node(role, index), Some(addr)) if members::PUBLISHED.contains(&role) => {
                if addr.ip().is_unspecified() {
                    tracing::warn!(%addr, "an unspecified address is not published: a moved node would not be found");
                    None
                } else {
                    Some((role, index, addr))
                }
            }
            _ => None,
        };
        Some(members::follow(etcd, groups, me, move || {
            weak.strong_count() > 0
        }))
    }

    /// Spawns [`Peers::membership_task`], if there is one.
    pub fn spawn_membership(self: &Arc<Self>, advertise: Option<SocketAddr>) {
        #[cfg(feature = "etcd")]
        if let Some(task) = self.membership_task(advertise) {
            tokio::spawn(task);
        }
        #[cfg(not(feature = "etcd"))]
        let _ = advertise;
    }

    pub fn kv_shards(&self) -> usize {
        self.kv.len()
    }

    pub fn kv_for_user(&self, user: Id) -> &ShardClient {
        &self.kv[self.kv_shard_of_user(user)]
    }

    /// The index of the kv shard holding `user`.
    pub fn kv_shard_of_user(&self, user: Id) -> usize {
        (user % self.kv.len() as u64) as usize
    }

    pub fn kv_for_channel(&self, channel: Id) -> &ShardClient {
        &self.kv[(channel % self.kv.len() as u64) as usize]
    }

    pub fn kv_for_name(&self, name: &str) -> &ShardClient {
        &self.kv[(fnv1a(name.as_bytes()) % self.kv.len() as u64) as usize]
    }

    pub fn kv_counters(&self) -> &ShardClient {
        &self.kv[0]
    }

    /// A kv node (by slot), for node-level requests.
    pub fn kv_node(&self, slot: usize) -> &RpcClient {
        &self.kv_nodes[slot]
    }

    /// Groups `users` by the kv shard that holds them.
    pub fn users_by_shard(&self, users: &[Id]) -> BTreeMap<usize, Vec<Id>> {
        by_modulus(users, self.kv.len())
    }

    pub fn kv_shard(&self, shard: usize) -> &ShardClient {
        &self.kv[shard]
    }

    /// The presence node holding `user`'s presence.
    pub fn presence_for(&self, user: Id) -> &RpcClient {
        &self.presence[(user % self.presence.len() as u64) as usize]
    }

    /// Every presence node, by index.
    pub fn presence_nodes(&self) -> &[RpcClient] {
        &self.presence
    }

    /// Groups `users` by the index of the presence node that holds them.
    pub fn users_by_presence_node(&self, users: &[Id]) -> BTreeMap<usize, Vec<Id>> {
        by_modulus(users, self.presence.len())
    }

    /// The presence of `users`, asking each presence node that holds some of them at once;
    /// an error if any of them did not answer.
    pub async fn presence_of(
        &self,
        users: Vec<Id>,
    ) -> Result<Vec<(Id, PresenceStatus, u64)>, RpcError> {
        let calls = self
            .users_by_presence_node(&users)
            .into_iter()
            .map(|(node, users)| self.presence[node].call(Request::PresenceOf { users }));
        let mut out = Vec::with_capacity(users.len());
        for r in futures::future::join_all(calls).await {
            match r? {
                Response::Presence(list) => out.extend(list),
                other => return Err(RpcError::Unexpected(format!("{other:?}"))),
            }
        }
        Ok(out)
    }

    /// Push node `i` (in the order of `push_health.order`).
    pub fn push(&self, i: usize) -> &RpcClient {
        &self.push[i]
    }

    /// idgen node `i` (in the order of `idgen_health.order`).
    pub fn idgen(&self, i: usize) -> &RpcClient {
        &self.idgen[i]
    }

    /// Replaces the known chat servers with discovery's list.
    pub fn set_chat_servers(&self, list: &[ChatServerInfo]) {
        let mut chat = self.chat.lock().unwrap_or_else(|p| p.into_inner());
        chat.retain(|k, _| list.iter().any(|s| s.server == *k));
        drop(chat);
        for s in list {
            self.upsert_chat_server(s);
        }
    }

    /// Adds or updates one chat server.
    pub fn upsert_chat_server(&self, info: &ChatServerInfo) {
        let Ok(addr) = info.rpc_addr.parse::<SocketAddr>() else {
            tracing::warn!(addr = %info.rpc_addr, "bad chat server address");
            return;
        };
        let mut chat = self.chat.lock().unwrap_or_else(|p| p.into_inner());
        if chat.get(&info.server).is_none_or(|c| c.addr() != addr) {
            // The registration names the server; its certificate must too.
            let who = Principal::Node(Role::Chat, info.server);
            chat.insert(info.server, RpcClient::to_node(addr, self.tls.clone(), who));
        }
    }

    pub fn remove_chat_server(&self, server: u32) {
        self.chat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&server);
    }

    pub fn chat_server(&self, server: u32) -> Option<RpcClient> {
        self.chat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&server)
            .cloned()
    }

    pub fn chat_servers(&self) -> Vec<(u32, RpcClient)> {
        self.chat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Asks discovery for the live chat servers and remembers them.
    pub async fn refresh_chat_servers(&self) -> Result<(), RpcError> {
        let list = self.discovery.list().await?;
        self.set_chat_servers(&list);
        Ok(())
    }

    /// The etcd client, when the cluster coordinates on etcd.
    #[cfg(feature = "etcd")]
    pub fn etcd(&self) -> Option<Arc<crate::coord::etcd::Etcd>> {
        match &self.discovery {
            Discovery::Etcd(e) => Some(e.etcd.clone()),
            Discovery::Node(_) => None,
        }
    }
}
