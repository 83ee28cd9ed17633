//! Coordination: where chat servers register (and api nodes find them), and where idgen
//! processes take their worker ids.
//!
//! Two implementations behind one interface ([`Discovery`], [`worker`]):
//! - **etcd** (the simulation and `local-cluster`): a chat server keeps a key
//!   `chatsim/chat/{server}` (its addresses and load) under a lease of
//!   [`DISCOVERY_LEASE_MS`] it renews every [`DISCOVERY_RENEW_MS`]; api nodes pick among the
//!   keys, from a list they refresh at most every [`LIST_CACHE_MS`] (the simulated etcd has no
//!   watch); an idgen process takes a free worker id by a transaction under its own lease.
//! - **the discovery node** (`all-in-one`, configs without etcd): the home-made
//!   single-process registry of [`crate::discovery`], over RPC; worker ids come from the config.

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "etcd")]
pub mod members;
#[cfg(feature = "etcd")]
pub mod worker;

#[cfg(feature = "etcd")]
use std::collections::BTreeMap;
use std::net::SocketAddr;
#[cfg(feature = "etcd")]
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::{DISCOVERY_LEASE_MS, DISCOVERY_RENEW_MS};
use crate::proto::internal::{ChatServerInfo, Request, Response};
use crate::rpc::{RpcClient, RpcError};

/// How long an api node uses its list of chat servers before asking etcd again.
pub const LIST_CACHE_MS: u64 = 1_000;
/// An api node that cannot refresh its list keeps handing out the last one for this long
/// (etcd unreachable: new connections still land on servers that were live), then refuses.
pub const LIST_STALE_MAX_MS: u64 = 30_000;
/// Key prefix of chat server registrations in etcd (under each server's lease).
pub const CHAT_PREFIX: &str = "chatsim/chat/";
/// Key prefix of chat server loads in etcd (no lease; read only for registered servers).
pub const LOAD_PREFIX: &str = "chatsim/load/";

/// Where chat servers register and idgen worker ids come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coordination {
    /// The home-made discovery node at this address; worker ids from the config.
    Discovery(SocketAddr),
    /// An etcd cluster: its members' client addresses (`host:port`), and whether they speak
    /// TLS with client certificates (each node presents its cluster certificate and checks
    /// the members' against the cluster CA; real deployments only: madsim's etcd has no TLS).
    Etcd { endpoints: Vec<String>, tls: bool },
}

/// Power of two choices among `live` servers, seeded by `hint`: the less loaded of two.
/// Picking the single least-loaded server would send a whole reconnect storm to it before its
/// next load report. `avoid` (a server the client just failed to reach, perhaps dead with its
/// lease not yet lapsed) is left out unless it is the only one.
pub fn pick_among(
    mut live: Vec<ChatServerInfo>,
    hint: u64,
    avoid: Option<u32>,
) -> Option<ChatServerInfo> {
    if live.len() > 1 {
        live.retain(|s| Some(s.server) != avoid);
    }
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

/// A node's handle on coordination (chat servers register through it, api nodes pick).
pub enum Discovery {
    Node(RpcClient),
    #[cfg(feature = "etcd")]
    Etcd(EtcdDiscovery),
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Discovery::Node(c) => write!(f, "Discovery::Node({})", c.addr()),
            #[cfg(feature = "etcd")]
            Discovery::Etcd(e) => write!(f, "Discovery::Etcd({:?})", e.etcd),
        }
    }
}

impl Discovery {
    /// # Panics
    /// On etcd coordination in a build without the `etcd` feature (configs are checked
    /// first: see `deploy::config`).
    pub fn new(c: &Coordination, tls: crate::tls::NodeTls) -> Self {
        match c {
            Coordination::Discovery(addr) => Discovery::Node(RpcClient::new(*addr, tls)),
            #[cfg(feature = "etcd")]
            Coordination::Etcd { .. } => Discovery::Etcd(EtcdDiscovery::new(std::sync::Arc::new(
                etcd::Etcd::for_coordination(c, &tls).expect("etcd coordination"),
            ))),
            #[cfg(not(feature = "etcd"))]
            Coordination::Etcd { .. } => panic!("this build has no etcd support"),
        }
    }

    /// Registers (or renews) a chat server: live for `DISCOVERY_LEASE_MS` from when this
    /// call started, if it succeeds.
    pub async fn register(&self, info: ChatServerInfo) -> Result<(), RpcError> {
        match self {
            Discovery::Node(c) => c.call(Request::RegisterChat { info }).await.map(|_| ()),
            #[cfg(feature = "etcd")]
            Discovery::Etcd(e) => e.register(info).await,
        }
    }

    /// The live chat servers, by index.
    pub async fn list(&self) -> Result<Vec<ChatServerInfo>, RpcError> {
        match self {
            Discovery::Node(c) => match c.call(Request::ListChat).await? {
                Response::ChatList(list) => Ok(list),
                other => Err(RpcError::Unexpected(format!("{other:?}"))),
            },
            #[cfg(feature = "etcd")]
            Discovery::Etcd(e) => e.list().await,
        }
    }

    /// A live chat server for a device (see [`pick_among`]).
    pub async fn pick(
        &self,
        hint: u64,
        avoid: Option<u32>,
    ) -> Result<Option<ChatServerInfo>, RpcError> {
        match self {
            Discovery::Node(c) => match c.call(Request::PickChat { hint, avoid }).await? {
                Response::Chat(info) => Ok(info),
                other => Err(RpcError::Unexpected(format!("{other:?}"))),
            },
            #[cfg(feature = "etcd")]
            Discovery::Etcd(e) => e.pick(hint, avoid).await,
        }
    }

    /// etcd requests made through this handle (0 for the discovery node).
    pub fn etcd_requests(&self) -> u64 {
        match self {
            Discovery::Node(_) => 0,
            #[cfg(feature = "etcd")]
            Discovery::Etcd(e) => e.etcd.requests(),
        }
    }
}

/// Chat server registrations in etcd.
#[cfg(feature = "etcd")]
pub struct EtcdDiscovery {
    pub etcd: std::sync::Arc<etcd::Etcd>,
    /// This chat server's lease, once granted. A tokio mutex: held across the renewal.
    lease: tokio::sync::Mutex<Option<i64>>,
    /// The last list and when it was read (api side). A tokio mutex: one refresh at a time,
    /// the other callers wait for it instead of asking etcd too.
    cache: tokio::sync::Mutex<Option<ListCache>>,
}

#[cfg(feature = "etcd")]
impl EtcdDiscovery {
    pub fn new(etcd: std::sync::Arc<etcd::Etcd>) -> Self {
        Self {
            etcd,
            lease: tokio::sync::Mutex::new(None),
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// Renews the lease, or (never granted, lapsed, or etcd not reached last time) takes a
    /// new one and writes the registration under it; then publishes the load.
    ///
    /// The registration is written once per lease: madsim's simulated etcd (0.7.0) detaches a
    /// key from its lease when it is put again under the same lease, after which the key
    /// outlives the lease and the next put of it panics the server. The load, which changes,
    /// is a separate key without a lease (`chatsim/load/{server}`), read with the list.
    async fn register(&self, info: ChatServerInfo) -> Result<(), RpcError> {
        let mut lease = self.lease.lock().await;
        let renewed = match *lease {
            // Not answered (etcd slow, or this server cut off): the lease is kept and renewed
            // again soon. Only etcd saying it no longer knows the lease takes a new one: a
            // slow etcd must not cost a registration (swarm runs with `etcd-slow` fenced
            // chat servers 16 times in 5 minutes when a timeout dropped the lease).
            Some(id) => self.etcd.keep_alive(id).await?,
            None => false,
        };
        if !renewed {
            *lease = None;
            let id = self.etcd.grant((DISCOVERY_LEASE_MS / 1000) as i64).await?;
            let value = serde_json::to_vec(&info).expect("ChatServerInfo serializes");
            let key = format!("{CHAT_PREFIX}{}", info.server);
            self.etcd.put(key, value, id).await?;
            *lease = Some(id);
        }
        let key = format!("{LOAD_PREFIX}{}", info.server);
        if let Err(e) = self
            .etcd
            .put(key, info.load.to_string().into_bytes(), 0)
            .await
        {
            // The lease holds; picks use the last load published.
            tracing::debug!(error = %e, "load not published");
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ChatServerInfo>, RpcError> {
        let kvs = self.etcd.get_prefix(CHAT_PREFIX.to_string()).await?;
        let loads: BTreeMap<u32, u32> = self
            .etcd
            .get_prefix(LOAD_PREFIX.to_string())
            .await?
            .into_iter()
            .filter_map(|(k, v)| {
                let server = std::str::from_utf8(&k).ok()?.strip_prefix(LOAD_PREFIX)?;
                Some((
                    server.parse().ok()?,
                    std::str::from_utf8(&v).ok()?.parse().ok()?,
                ))
            })
            .collect();
        let mut out = Vec::with_capacity(kvs.len());
        for (key, value) in kvs {
            match serde_json::from_slice::<ChatServerInfo>(&value) {
                Ok(mut info) => {
                    if let Some(load) = loads.get(&info.server) {
                        info.load = *load;
                    }
                    out.push(info)
                }
                Err(e) => tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    error = %e,
                    "unreadable chat server registration skipped"
                ),
            }
        }
        out.sort_by_key(|s| s.server);
        Ok(out)
    }

    async fn pick(
        &self,
        hint: u64,
        avoid: Option<u32>,
    ) -> Result<Option<ChatServerInfo>, RpcError> {
        let mut cache = self.cache.lock().await;
        let now = tokio::time::Instant::now();
        if cache.as_ref().is_none_or(|c| now >= c.next_refresh) {
            match self.list().await {
                Ok(list) => {
                    *cache = Some(ListCache {
                        list,
                        read_at: now,
                        next_refresh: now + Duration::from_millis(LIST_CACHE_MS),
                    })
                }
                Err(e) => {
                    let Some(c) = cache.as_mut() else {
                        return Err(e);
                    };
                    if now.duration_since(c.read_at) >= Duration::from_millis(LIST_STALE_MAX_MS) {
                        return Err(e);
                    }
                    // Not again before the next period: callers must not queue behind a
                    // deadline each while etcd is away.
                    c.next_refresh = now + Duration::from_millis(LIST_CACHE_MS);
                    tracing::debug!(error = %e, "chat server list not refreshed; using the last");
                }
            }
        }
        let live = cache.as_ref().map(|c| c.list.clone()).unwrap_or_default();
        Ok(pick_among(live, hint, avoid))
    }
}

/// An api node's last list of chat servers.
#[cfg(feature = "etcd")]
struct ListCache {
    list: Vec<ChatServerInfo>,
    read_at: tokio::time::Instant,
    next_refresh: tokio::time::Instant,
}

/// Sanity: the renewal period leaves two renewals inside a lease.
const _: () = assert!(DISCOVERY_RENEW_MS * 2 < DISCOVERY_LEASE_MS);
