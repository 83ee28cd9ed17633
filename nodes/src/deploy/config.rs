//! The real deployment's config file (TOML): every node's addresses, the data directory, the
//! token secret and the deployment's knobs. One file describes a whole cluster; each process
//! is told which node it is (`chatd kv --index 1`). Defaults work on one machine.
//!
//! ```toml
//! data = "chatsim-data"              # redb files and the token secret live here
//! # token_secret = "hex..."          # or: token_secret_file = "path"; default <data>/token.secret
//! # tls_dir = "path"                 # cluster CA and node certificates; default <data>/tls
//! [client_tls]                       # https and wss:// for devices (absent: plain http, ws://)
//! cert = "/etc/chatd/fullchain.pem"  # PEM chain, leaf first (relative paths: to data)
//! key = "/etc/chatd/privkey.pem"
//! # self_signed = true               # create a self-signed pair at cert/key if absent
//! # [[token_keys]]                   # a key ring instead (rotation): the highest id signs
//! # id = 2                           # and every listed key verifies; list the old key as
//! # secret_file = "token-2.secret"   # id 1 until its tokens expired (24 h), then drop it
//! kv_shards = 2                      # Raft groups (default: one per [[kv]] node); fixed
//! kv_replicas = 1                    # copies of each shard on distinct kv nodes (default 1)
//!
//! [discovery]                        # the home-made discovery node, or: [[etcd]] below
//! listen = "127.0.0.1:7100"
//! admin = "127.0.0.1:9100"           # /metrics and /healthz (optional on every node)
//!
//! # etcd_tls = true                   # etcd with client certificates (see `etcd_tls`)
//! # [[etcd]]                         # coordinate on etcd instead (one entry per member)
//! # client = "127.0.8.1:2379"        # what the nodes dial
//! # peer = "127.0.8.1:2380"          # with dir: `chatd local-cluster` runs this member
//! # dir = "etcd-0"
//!
//! [[presence]]                      # one or more; user u's presence on node u % n
//! listen = "127.0.0.1:7102"          # (a single [presence] table is read as one node)
//!
//! [[push]]                          # one or more; any serves any request
//! listen = "127.0.0.1:7103"
//!
//! [push_provider]                    # default: provider = "log" (logs each notification)
//! provider = "apns"                  # or "fcm", "webpush": see nodes::push::settings
//! key_file = "/etc/chatd/AuthKey_ABC123DEFG.p8"
//! key_id = "ABC123DEFG"
//! team_id = "DEF123GHIJ"
//! topic = "com.example.chat"
//!
//! [[kv]]
//! listen = "127.0.0.1:7109"
//! dir = "kv-0"                       # this node's replica files, relative to data
//!
//! [[idgen]]
//! listen = "127.0.0.1:7101"
//! worker = 1                         # distinct per idgen node, 1..=1023 (with etcd: the
//!                                    # id tried first; ids are leased from etcd)
//!
//! [[chat]]
//! ws_listen = "127.0.0.1:7104"
//! rpc_listen = "127.0.0.1:7105"
//! # ws_advertise / rpc_advertise: what clients and peers dial (default: the listen address)
//!
//! [[api]]
//! listen = "127.0.0.1:8080"          # the api, the browser page and /healthz
//! admin = "127.0.0.1:8079"           # /metrics (and /healthz), not on the public address
//! ```
//!
//! Product limits (message size, group size, rates, timeouts) are protocol constants in
//! [`crate::limits`], shared with clients and the simulation, not per-deployment settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterMap;
pub use crate::cluster::Role;
use crate::coord::Coordination;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the redb files and the generated token secret.
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// Hex secret that signs bearer tokens; every api and chat node needs the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// File holding the secret (created with a random one if absent). Default
    /// `<data>/token.secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_file: Option<PathBuf>,
    /// A key ring, for rotating the token key without logging anyone out: the highest id
    /// signs, every listed key verifies. When present it replaces `token_secret`/
    /// `token_secret_file` (list the current secret as id 1 to keep its tokens valid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_keys: Vec<TokenKeyEntry>,
    /// The cluster CA and node certificates (internal RPC is mutual TLS; see
    /// `deploy::certs`). Default `<data>/tls`, created on first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// https for the api and `wss://` for chat servers; plain when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTlsFiles>,
    /// The home-made discovery node (absent when the cluster coordinates on etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Node>,
    /// etcd members: chat servers register there and idgen worker ids are leased there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<EtcdMember>,
    /// etcd speaks TLS with client certificates: members this cluster runs get certificates
    /// of the cluster CA (`tls/etcd-<i>.crt`) and accept only clients holding one; nodes
    /// present theirs. An etcd run elsewhere must trust the cluster CA and serve a
    /// certificate it signed. `local-cluster` turns it on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub etcd_tls: bool,
    /// Presence nodes: user `u`'s presence lives on node `u % n`. A single `[presence]` table
    /// (older configs) is one node.
    #[serde(deserialize_with = "one_or_many")]
    pub presence: Vec<Node>,
    /// Push nodes (any of them serves any request). A single `[push]` table is one node.
    #[serde(deserialize_with = "one_or_many")]
    pub push: Vec<Node>,
    /// The push node's provider (APNs, FCM, Web Push; default: log). Not written by
    /// `to_toml` (it may hold secrets); add it by hand.
    #[serde(default, skip_serializing)]
    pub push_provider: crate::push::settings::PushSettings,
    /// kv shards (Raft groups), fixed when the cluster is created; 0: one per kv node.
    #[serde(default)]
    pub kv_shards: u32,
    /// Copies of each shard, on distinct kv nodes (0 or absent: 1). With 3, a kv node lost
    /// for good loses nothing and a crash costs an election.
    #[serde(default)]
    pub kv_replicas: u32,
    /// kv nodes, by slot: the order is the shard placement (`kv::placement`).
    pub kv: Vec<KvNode>,
    pub idgen: Vec<IdgenNode>,
    pub chat: Vec<ChatNode>,
    pub api: Vec<ApiNode>,
}

/// One key of the token key ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKeyEntry {
    pub id: u32,
    /// The secret itself, or:
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// a file holding it (relative paths: to `data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

/// The certificate devices see (`[client_tls]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsFiles {
    /// PEM certificate chain, leaf first; relative to `data` unless absolute.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Create a self-signed pair at `cert` and `key` when they do not exist, valid for
    /// `localhost` and every api and chat server address (`deploy::certs::client_tls`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_signed: bool,
}

impl ClientTlsFiles {
    /// What `all-in-one` and `local-cluster` use when given no certificate: a self-signed
    /// pair in the TLS directory.
    pub fn self_signed_default() -> ClientTlsFiles {
        ClientTlsFiles {
            cert: PathBuf::from("tls/client.crt"),
            key: PathBuf::from("tls/client.key"),
            self_signed: true,
        }
    }
}

/// A node with one RPC address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub listen: SocketAddr,
    /// Where `/metrics` and `/healthz` are served; none if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

/// One etcd member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdMember {
    /// The client address nodes dial (`host:port`).
    pub client: String,
    /// The member's peer address; with `dir`, `chatd local-cluster` runs the member itself
    /// (Debian's `etcd`), else it is run elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// The member's data directory, relative to `data` unless absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvNode {
    pub listen: SocketAddr,
    /// The directory of this node's replica files (`shard-{s}.redb`), relative to `data`
    /// unless absolute. Deleting it (a lost disk) makes the node rejoin empty and catch up.
    pub dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdgenNode {
    pub listen: SocketAddr,
    /// Snowflake worker id, distinct per node (1..=1023).
    pub worker: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatNode {
    /// Device WebSockets.
    pub ws_listen: SocketAddr,
    /// Fanout and control from other nodes.
    pub rpc_listen: SocketAddr,
    /// What devices dial (`host:port`); default `ws_listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws_advertise: Option<String>,
    /// What peers dial; default `rpc_listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_advertise: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// Sends committed at once before new ones are refused `overloaded`; default
    /// `limits::SENDS_IN_FLIGHT_MAX`. With `admission_target_ms` it is the ceiling of an
    /// adaptive limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sends_in_flight_max: Option<usize>,
    /// The commit latency the adaptive admission limit aims at (`chat::admission`); default
    /// `limits::ADMISSION_TARGET_MS`; 0: a fixed limit of `sends_in_flight_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_target_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiNode {
    /// HTTP: the api, the browser page and `/healthz`.
    pub listen: SocketAddr,
    /// Where `/metrics` (and `/healthz`) are served, away from the public address; none if
    /// absent. In all-in-one it serves the whole process's metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

/// One node (a table) or several (an array of tables).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Node>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Node),
        Many(Vec<Node>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(n) => vec![n],
        OneOrMany::Many(v) => v,
    })
}

fn default_data() -> PathBuf {
    PathBuf::from("chatsim-data")
}

impl Config {
    /// Everything on 127.0.0.1: discovery at `base`, idgen +1, presence +2, push +3, chat
    /// WebSocket +4 and RPC +5, kv node i (one shard each, one copy) at +9+i; the api on
    /// `http`.
    pub fn single_host(data: PathBuf, http: SocketAddr, base: u16, kv_shards: u16) -> Config {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Config {
            data,
            token_secret: None,
            token_secret_file: None,
            token_keys: Vec::new(),
            tls_dir: None,
            client_tls: Some(ClientTlsFiles::self_signed_default()),
            discovery: Some(Node {
                listen: at(base),
                admin: None,
            }),
            etcd: Vec::new(),
            etcd_tls: false,
            presence: vec![Node {
                listen: at(base + 2),
                admin: None,
            }],
            push: vec![Node {
                listen: at(base + 3),
                admin: None,
            }],
            push_provider: Default::default(),
            kv_shards: 0,
            kv_replicas: 1,
            kv: (0..kv_shards.max(1))
                .map(|i| KvNode {
                    listen: at(base + 9 + i),
                    dir: PathBuf::from(format!("kv-{i}")),
                    admin: None,
                })
                .collect(),
            idgen: vec![IdgenNode {
                listen: at(base + 1),
                worker: 1,
                admin: None,
            }],
            chat: vec![ChatNode {
                ws_listen: at(base + 4),
                rpc_listen: at(base + 5),
                ws_advertise: None,
                rpc_advertise: None,
                admin: None,
                sends_in_flight_max: None,
                admission_target_ms: None,
            }],
            // The api's admin endpoint (the process's /metrics) just below the api.
            api: vec![ApiNode {
                listen: http,
                admin: Some(SocketAddr::new(http.ip(), http.port().wrapping_sub(1))),
            }],
        }
    }

    /// One loopback address per node (Linux routes all of 127.0.0.0/8 to `lo`): role r's node
    /// i is 127.0.r.(i+1), with RPC on 7000, WebSocket on 7001 and admin on 9000; the first
    /// api node keeps `http` (default 127.0.0.1:8080), others are 127.0.7.(i+1):8080; etcd
    /// member i is 127.0.8.(i+1), clients on 2379 and peers on 2380.
    pub fn loopback_cluster(
        data: PathBuf,
        http: SocketAddr,
        sizes: &ClusterSizes,
    ) -> anyhow::Result<Config> {
        if sizes.kv == 0
            || sizes.presence == 0
            || sizes.push == 0
            || sizes.idgen == 0
            || sizes.chat == 0
            || sizes.api == 0
        {
            bail!("a cluster needs at least one kv, presence, push, idgen, chat and api node");
        }
        if sizes.etcd > 7 {
            bail!("at most 7 etcd members (etcd's own advice: 3 or 5)");
        }
        let most = [
            sizes.kv,
            sizes.presence,
            sizes.push,
            sizes.idgen,
            sizes.chat,
            sizes.api,
        ];
        if most.into_iter().max().unwrap_or(0) > 250 {
            bail!("at most 250 nodes of a role on loopback addresses");
        }
        let ip = |role: u8, i: u16| [127, 0, role, i as u8 + 1];
        let sa = |role: u8, i: u16, port: u16| SocketAddr::from((ip(role, i), port));
        Ok(Config {
            data,
            token_secret: None,
            token_secret_file: None,
            token_keys: Vec::new(),
            tls_dir: None,
            client_tls: Some(ClientTlsFiles::self_signed_default()),
            // With etcd members, no discovery node: chat servers register in etcd.
            discovery: (sizes.etcd == 0).then(|| Node {
                listen: sa(1, 0, 7000),
                admin: Some(sa(1, 0, 9000)),
            }),
            etcd: (0..sizes.etcd)
                .map(|i| EtcdMember {
                    client: sa(8, i, 2379).to_string(),
                    peer: Some(sa(8, i, 2380)),
                    dir: Some(PathBuf::from(format!("etcd-{i}"))),
                })
                .collect(),
            etcd_tls: sizes.etcd > 0,
            presence: (0..sizes.presence)
                .map(|i| Node {
                    listen: sa(2, i, 7000),
                    admin: Some(sa(2, i, 9000)),
                })
                .collect(),
            push: (0..sizes.push)
                .map(|i| Node {
                    listen: sa(3, i, 7000),
                    admin: Some(sa(3, i, 9000)),
                })
                .collect(),
            push_provider: Default::default(),
            kv_shards: u32::from(sizes.kv_shards),
            kv_replicas: u32::from(sizes.kv_replicas),
            kv: (0..sizes.kv)
                .map(|i| KvNode {
                    listen: sa(4, i, 7000),
                    dir: PathBuf::from(format!("kv-{i}")),
                    admin: Some(sa(4, i, 9000)),
                })
                .collect(),
            idgen: (0..sizes.idgen)
                .map(|i| IdgenNode {
                    listen: sa(5, i, 7000),
                    worker: i + 1,
                    admin: Some(sa(5, i, 9000)),
                })
                .collect(),
            chat: (0..sizes.chat)
                .map(|i| ChatNode {
                    ws_listen: sa(6, i, 7001),
                    rpc_listen: sa(6, i, 7000),
                    ws_advertise: None,
                    rpc_advertise: None,
                    admin: Some(sa(6, i, 9000)),
                    sends_in_flight_max: None,
                    admission_target_ms: None,
                })
                .collect(),
            api: (0..sizes.api)
                .map(|i| ApiNode {
                    listen: if i == 0 { http } else { sa(7, i, 8080) },
                    admin: Some(sa(7, i, 9000)),
                })
                .collect(),
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("check {}", path.display()))?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configs serialize")
    }

    /// Refuses configs that cannot run: missing roles, duplicate addresses or worker ids.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.kv.is_empty()
            || self.presence.is_empty()
            || self.push.is_empty()
            || self.idgen.is_empty()
            || self.chat.is_empty()
            || self.api.is_empty()
        {
            bail!("a cluster needs at least one [[kv]], [[presence]], [[push]], [[idgen]], [[chat]] and [[api]]");
        }
        for (i, c) in self.chat.iter().enumerate() {
            if c.sends_in_flight_max == Some(0) {
                bail!("chat-{i}: sends_in_flight_max = 0 would refuse every send (at least 1)");
            }
        }
        let mut seen = std::collections::BTreeMap::new();
        for (name, addr) in self.listen_addrs() {
            if let Some(other) = seen.insert(addr, name.clone()) {
                bail!("{name} and {other} both listen on {addr}");
            }
        }
        match (&self.discovery, self.etcd.is_empty()) {
            (Some(_), false) => bail!("give either [discovery] or [[etcd]] members, not both"),
            (None, true) => bail!("a cluster needs [discovery] or [[etcd]] members"),
            _ => {}
        }
        if !self.etcd.is_empty() && !cfg!(feature = "etcd") {
            bail!("this chatd was built without etcd support (cargo feature `etcd`)");
        }
        for (i, m) in self.etcd.iter().enumerate() {
            if m.peer.is_some() != m.dir.is_some() {
                bail!("etcd member {i}: give both peer and dir (a member this cluster runs) or neither");
            }
        }
        let mut workers = std::collections::BTreeSet::new();
        for n in &self.idgen {
            if n.worker == 0 || n.worker > crate::idgen::WORKER_MAX {
                bail!(
                    "idgen worker {} out of range 1..={}",
                    n.worker,
                    crate::idgen::WORKER_MAX
                );
            }
            if !workers.insert(n.worker) {
                bail!("idgen worker {} is used twice", n.worker);
            }
        }
        self.cluster_map()
            .placement()
            .map_err(|e| anyhow::anyhow!("kv layout: {e}"))?;
        if let Some(s) = &self.token_secret {
            if s.len() < 32 {
                bail!("token_secret must be at least 32 characters");
            }
        }
        Ok(())
    }

    /// Every (node name, address) that is bound, for conflict checks.
    fn listen_addrs(&self) -> Vec<(String, SocketAddr)> {
        let mut v = Vec::new();
        let mut node = |name: String, listen: SocketAddr, admin: Option<SocketAddr>| {
            v.push((name.clone(), listen));
            if let Some(a) = admin {
                v.push((format!("{name} admin"), a));
            }
        };
        if let Some(d) = &self.discovery {
            node("discovery".into(), d.listen, d.admin);
        }
        for (i, m) in self.etcd.iter().enumerate() {
            if let Some(peer) = m.peer {
                node(format!("etcd-{i} peer"), peer, None);
            }
            if let Ok(client) = m.client.parse::<SocketAddr>() {
                node(format!("etcd-{i}"), client, None);
            }
        }
        for (i, n) in self.presence.iter().enumerate() {
            node(format!("presence-{i}"), n.listen, n.admin);
        }
        for (i, n) in self.push.iter().enumerate() {
            node(format!("push-{i}"), n.listen, n.admin);
        }
        for (i, n) in self.kv.iter().enumerate() {
            node(format!("kv-{i}"), n.listen, n.admin);
        }
        for (i, n) in self.idgen.iter().enumerate() {
            node(format!("idgen-{i}"), n.listen, n.admin);
        }
        for (i, n) in self.chat.iter().enumerate() {
            node(format!("chat-{i} ws"), n.ws_listen, n.admin);
            node(format!("chat-{i} rpc"), n.rpc_listen, None);
        }
        for (i, n) in self.api.iter().enumerate() {
            node(format!("api-{i}"), n.listen, n.admin);
        }
        v
    }

    /// How many nodes of `role` the config has.
    pub fn count(&self, role: Role) -> usize {
        match role {
            Role::Discovery => usize::from(self.discovery.is_some()),
            Role::Presence => self.presence.len(),
            Role::Push => self.push.len(),
            Role::Kv => self.kv.len(),
            Role::Idgen => self.idgen.len(),
            Role::Chat => self.chat.len(),
            Role::Api => self.api.len(),
        }
    }

    /// The files of `[client_tls]`, relative paths resolved against `data`.
    pub fn client_tls_paths(&self) -> Option<(PathBuf, PathBuf)> {
        let files = self.client_tls.as_ref()?;
        let at = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                self.data.join(p)
            }
        };
        Some((at(&files.cert), at(&files.key)))
    }

    /// The scheme and address of the first api node, for messages to the user.
    pub fn api_url(&self) -> String {
        let scheme = if self.client_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/", self.api[0].listen)
    }

    /// Where the cluster's certificates live (`deploy::certs`).
    pub fn tls_dir(&self) -> PathBuf {
        self.tls_dir
            .clone()
            .unwrap_or_else(|| self.data.join("tls"))
    }

    /// The static addresses every node needs to reach the others.
    pub fn cluster_map(&self) -> ClusterMap {
        ClusterMap {
            coordination: match &self.discovery {
                Some(d) => Coordination::Discovery(d.listen),
                None => Coordination::Etcd {
                    endpoints: self.etcd.iter().map(|m| m.client.clone()).collect(),
                    tls: self.etcd_tls,
                },
            },
            kv: self.kv.iter().map(|n| n.listen).collect(),
            kv_shards: self.kv_shards,
            kv_replicas: self.kv_replicas,
            idgen: self.idgen.iter().map(|n| n.listen).collect(),
            presence: self.presence.iter().map(|n| n.listen).collect(),
            push: self.push.iter().map(|n| n.listen).collect(),
        }
    }

    /// A kv node's directory: absolute, or under `data`.
    pub fn kv_dir(&self, index: usize) -> PathBuf {
        let d = &self.kv[index].dir;
        if d.is_absolute() {
            d.clone()
        } else {
            self.data.join(d)
        }
    }

    /// Whether this is a new cluster: no kv node has a directory yet.
    pub fn is_new_cluster(&self) -> bool {
        (0..self.kv.len()).all(|i| !self.kv_dir(i).exists())
    }

    /// Marks every kv node of a new cluster to bootstrap its shards on its first start
    /// (`chatd kv` removes the mark once done). A node whose directory goes missing later
    /// has no mark: it joins its shards empty and catches up from its peers.
    pub fn mark_kv_bootstrap(&self) -> anyhow::Result<()> {
        for i in 0..self.kv.len() {
            let dir = self.kv_dir(i);
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let mark = dir.join(BOOTSTRAP_MARK);
            std::fs::write(&mark, b"bootstrap this node's shards on first start\n")
                .with_context(|| format!("write {}", mark.display()))?;
        }
        Ok(())
    }

    /// The token secret: inline, or read from its file (created with 32 random bytes, hex,
    /// on first start: readable by its owner only, and synced with its directory before any
    /// token is signed with it). A secret shorter than [`TOKEN_SECRET_BYTES_MIN`] bytes (an
    /// empty or truncated file) is refused: tokens signed with it could be forged.
    /// The token key ring: `token_keys` if the config lists any, else the one secret of
    /// `token_secret`/`token_secret_file` as key 1 (created if absent). Every secret must
    /// have `TOKEN_SECRET_BYTES_MIN` bytes or more.
    pub fn token_key(&self) -> anyhow::Result<crate::auth::TokenKey> {
        if self.token_keys.is_empty() {
            return Ok(crate::auth::TokenKey::new(1, self.token_secret()?));
        }
        let mut ring = std::collections::BTreeMap::new();
        for k in &self.token_keys {
            let secret = match (&k.secret, &k.secret_file) {
                (Some(s), None) => s.clone().into_bytes(),
                (None, Some(f)) => {
                    let path = if f.is_absolute() {
                        f.clone()
                    } else {
                        self.data.join(f)
                    };
                    std::fs::read(&path)
                        .with_context(|| format!("token key {}: read {}", k.id, path.display()))?
                }
                _ => bail!(
                    "token key {}: give exactly one of secret and secret_file",
                    k.id
                ),
            };
            anyhow::ensure!(
                secret.len() >= TOKEN_SECRET_BYTES_MIN,
                "token key {} has {} bytes, at least {TOKEN_SECRET_BYTES_MIN} needed",
                k.id,
                secret.len()
            );
            anyhow::ensure!(
                ring.insert(k.id, secret).is_none(),
                "token key {} is listed twice",
                k.id
            );
        }
        Ok(crate::auth::TokenKey::ring(ring))
    }

    pub fn token_secret(&self) -> anyhow::Result<Vec<u8>> {
        self.cluster_map()
            .placement()
            .map_err(|e| anyhow::anyhow!("kv layout: {e}"))?;
        let strong = |s: Vec<u8>, from: &str| {
            anyhow::ensure!(
                s.len() >= TOKEN_SECRET_BYTES_MIN,
                "the token secret ({from}) has {} bytes, at least {TOKEN_SECRET_BYTES_MIN} needed",
                s.len()
            );
            Ok(s)
        };
        if let Some(s) = &self.token_secret {
            return strong(s.clone().into_bytes(), "token_secret");
        }
        let path = self
            .token_secret_file
            .clone()
            .unwrap_or_else(|| self.data.join("token.secret"));
        if let Ok(s) = std::fs::read(&path) {
            return strong(s, &path.display().to_string());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let hexed = hex::encode(key).into_bytes();
        // Written to a temporary file and linked into place, so two nodes starting at once
        // agree; owner-only, and durable before it is used.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        write_private(&tmp, &hexed).with_context(|| format!("write {}", tmp.display()))?;
        if std::fs::hard_link(&tmp, &path).is_err() {
            // Someone else created it first: use theirs.
            let _ = std::fs::remove_file(&tmp);
            let s = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
            return strong(s, &path.display().to_string());
        }
        let _ = std::fs::remove_file(&tmp);
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("sync {}", dir.display()))?;
        }
        Ok(hexed)
    }
}

/// Shortest token secret accepted (HMAC-SHA256 wants at least its 32-byte output).
pub const TOKEN_SECRET_BYTES_MIN: usize = 32;

/// Creates `path` readable and writable by its owner only (0600 on Unix), writes `bytes` and
/// syncs them.
pub(super) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// In a kv node's directory: bootstrap this node's shards (see `mark_kv_bootstrap`).
pub const BOOTSTRAP_MARK: &str = "BOOTSTRAP";

/// Node counts of a loopback cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSizes {
    /// etcd members `local-cluster` runs (0: the discovery node instead).
    pub etcd: u16,
    /// Presence nodes (user u on node u % n).
    pub presence: u16,
    /// Push nodes.
    pub push: u16,
    pub kv: u16,
    /// kv shards (0: one per kv node) and copies of each.
    pub kv_shards: u16,
    pub kv_replicas: u16,
    pub idgen: u16,
    pub chat: u16,
    pub api: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_configs_round_trip_and_validate() {
        let sizes = ClusterSizes {
            etcd: 3,
            presence: 2,
            push: 2,
            kv: 3,
            kv_shards: 0,
            kv_replicas: 3,
            idgen: 2,
            chat: 3,
            api: 2,
        };
        let c = Config::loopback_cluster("d".into(), "127.0.0.1:8080".parse().unwrap(), &sizes)
            .unwrap();
        c.validate().unwrap();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.cluster_map().kv.len(), 3);
        assert_eq!(c.chat[2].ws_listen.to_string(), "127.0.6.3:7001");
        assert_eq!(
            c.count(Role::Discovery),
            0,
            "etcd replaces the discovery node"
        );
        assert_eq!(
            c.cluster_map().coordination,
            Coordination::Etcd {
                endpoints: vec![
                    "127.0.8.1:2379".into(),
                    "127.0.8.2:2379".into(),
                    "127.0.8.3:2379".into()
                ],
                tls: true
            }
        );
        let one = Config::single_host("d".into(), "127.0.0.1:8080".parse().unwrap(), 7100, 2);
        one.validate().unwrap();
    }

    // Proves a `[[token_keys]]` ring signs with its highest id and verifies every key, and
    // that short, duplicated or ambiguous entries are refused with the key's id named.
    #[test]
    fn token_key_ring_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k2"), "2".repeat(40)).unwrap();
        let mut cfg = Config::single_host(
            dir.path().into(),
            "127.0.0.1:8080".parse().unwrap(),
            7100,
            2,
        );
        let old = cfg.token_key().unwrap();
        assert_eq!(old.signing_key_id(), 1);
        let token = old.sign(1, 2, u64::MAX);
        let key1 = String::from_utf8(cfg.token_secret().unwrap()).unwrap();
        let entry = |id, secret: Option<&str>, file: Option<&str>| TokenKeyEntry {
            id,
            secret: secret.map(str::to_string),
            secret_file: file.map(PathBuf::from),
        };
        cfg.token_keys = vec![entry(1, Some(&key1), None), entry(2, None, Some("k2"))];
        let ring = cfg.token_key().unwrap();
        assert_eq!(ring.signing_key_id(), 2);
        assert!(
            ring.verify(&token, 0).is_ok(),
            "tokens of key 1 still verify"
        );
        cfg.token_keys = vec![entry(3, Some("short"), None)];
        assert!(cfg
            .token_key()
            .unwrap_err()
            .to_string()
            .contains("token key 3"));
        cfg.token_keys = vec![entry(1, Some(&key1), None), entry(1, Some(&key1), None)];
        assert!(cfg.token_key().unwrap_err().to_string().contains("twice"));
        cfg.token_keys = vec![entry(4, Some(&key1), Some("k2"))];
        assert!(cfg
            .token_key()
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
    }

    // Proves the token secret file is created owner-only with 64 hex characters, read back
    // the same next time, and that an empty or short secret file is refused.
    #[test]
    fn token_secret_file_is_private_and_strong() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::single_host(
            dir.path().into(),
            "127.0.0.1:8080".parse().unwrap(),
            7100,
            2,
        );
        let s = cfg.token_secret().unwrap();
        assert_eq!(s.len(), 64);
        assert_eq!(cfg.token_secret().unwrap(), s, "read back");
        let path = dir.path().join("token.secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "owner-only: {mode:o}");
        }
        for short in [&b""[..], b"0123456789"] {
            std::fs::write(&path, short).unwrap();
            let e = cfg.token_secret().unwrap_err().to_string();
            assert!(e.contains("at least 32"), "{e}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let one = Config::single_host("d".into(), "127.0.0.1:8080".parse().unwrap(), 7100, 2);
        let mut c = Config::single_host("d".into(), "127.0.0.1:8080".parse().unwrap(), 7100, 2);
        c.kv[1].listen = c.kv[0].listen;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("kv-1 and kv-0 both listen on 127.0.0.1:7109"),
            "{e}"
        );
        let mut c = Config::single_host("d".into(), "127.0.0.1:8080".parse().unwrap(), 7100, 1);
        c.idgen.push(c.idgen[0].clone());
        c.idgen[1].listen = "127.0.0.1:7200".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("worker 1 is used twice"), "{e}");
        let mut c = one.clone();
        c.etcd.push(EtcdMember {
            client: "127.0.8.1:2379".into(),
            peer: None,
            dir: None,
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("either [discovery] or [[etcd]]"), "{e}");
        // A single [presence] table (configs written before presence scaled out) is one node.
        let old = one
            .to_toml()
            .replace("[[presence]]", "[presence]")
            .replace("[[push]]", "[push]");
        let back: Config = toml::from_str(&old).unwrap();
        assert_eq!((&back.presence, &back.push), (&one.presence, &one.push));
        let mut text = one.to_toml();
        text.push_str("\n[push_provider]\nprovider = \"webpush\"\nbogus = 1\n");
        let e = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = toml::from_str::<Config>("data = 'x'\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }
}
