//! Boots the real entry points of every role as madsim nodes, each on its own IP.
//!
//! IP plan (also in docs/ARCHITECTURE.md):
//!
//! | role | addresses | ports |
//! |---|---|---|
//! | setup client | 10.0.0.1 | - |
//! | counter scraper | 10.0.0.2 | - |
//! | kv prober (`prober.rs`) | 10.0.0.3 | - |
//! | api | 10.0.1.1 .. | 8080 (HTTP) |
//! | etcd (simulated, madsim's) | 10.0.2.1 | 2379 |
//! | chat | 10.0.3.1 .. | 9000 (WebSocket), 7000 (RPC) |
//! | idgen | 10.0.4.1 .. | 7000 |
//! | kv | 10.0.5.1 .. | 7000 |
//! | replacement machines (`disk_loss` or `crash` with `moved`: kv, presence, push, idgen) | 10.0.8.1 .. (in the order of moves) | 7000 |
//! | presence | 10.0.6.1 .. | 7000 (user u on node u % n) |
//! | push | 10.0.7.1 .. | 7000 (any serves any request) |
//! | devices | 10.1.0.1 .. 10.255.255.255 (device i: 10.1.0.0 + i + 1) | - |
//!
//! A node's init closure captures only configuration and, for kv, its `SimDisk`: a restart
//! re-runs the closure, so in-memory state is lost and the disk is kept.
//!
//! Internal RPC is mutual TLS as in a real deployment: a cluster CA made from the seed signs a
//! certificate for every node and one for the harness (the operator: prober, scraper, fault
//! injector), so the same seed makes the same certificates.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use madsim::runtime::{Handle, NodeHandle};
use madsim::task::NodeId;
use nodes::auth::TokenKey;
use nodes::canary::{Canaries, Canary};
use nodes::client_tls::{ClientTls, KeyKind, ServerTls};
use nodes::clock::SkewedClock;
use nodes::cluster::{ClusterMap, Peers};
use nodes::coord::Coordination;
use nodes::kv::disk::SimDisk;
use nodes::push::PushProvider;
use nodes::tls::CertificateDer;
use nodes::tls::{NodeTls, Principal, TestCa};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scenarios::Role;

pub const RPC_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8080;
pub const WS_PORT: u16 = 9000;
pub const ETCD_PORT: u16 = 2379;

/// The token key every api and chat node shares (a config secret in the real build).
pub fn token_key() -> TokenKey {
    TokenKey::new(1, "chatsim-simulation-key")
}

pub fn ip(role: Role, index: u32) -> Ipv4Addr {
    let third = match role {
        Role::Api => 1,
        Role::Etcd => 2,
        Role::Chat => 3,
        Role::Idgen => 4,
        Role::Kv => 5,
        Role::Presence => 6,
        Role::Push => 7,
    };
    Ipv4Addr::new(10, 0, third, (index + 1) as u8)
}

/// Starts a node at the given address.
type Starter = Arc<
    dyn Fn(SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>
        + Send
        + Sync,
>;

/// What the IP plan puts at `ip`: a role's name, `device`, `moved` (a replacement machine),
/// `harness` (setup and scraping) or `other`. The simulated etcd's traffic does not go
/// through `nodes::net::Stream` and is not counted.
pub fn place(ip: std::net::IpAddr) -> &'static str {
    let std::net::IpAddr::V4(v4) = ip else {
        return "other";
    };
    match v4.octets() {
        [10, 0, 0, _] => "harness",
        [10, 0, 1, _] => "api",
        [10, 0, 2, _] => "etcd",
        [10, 0, 3, _] => "chat",
        [10, 0, 4, _] => "idgen",
        [10, 0, 5, _] => "kv",
        [10, 0, 6, _] => "presence",
        [10, 0, 7, _] => "push",
        [10, 0, 8, _] => "moved",
        [10, b, _, _] if b >= 1 => "device",
        _ => "other",
    }
}

/// Wire bytes by path between places (`place`), both directions together, named `a-b` in
/// name order.
pub fn wire_paths(by_pair: &nodes::net::WirePaths) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for ((from, to), n) in by_pair {
        let (a, b) = (place(*from), place(*to));
        let name = if a <= b {
            format!("{a}-{b}")
        } else {
            format!("{b}-{a}")
        };
        *out.entry(name).or_default() += n;
    }
    out
}

/// The address of the `n`-th replacement machine (0-based).
pub fn moved_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 8, (n + 1) as u8)
}

pub fn device_ip(index: u32) -> Ipv4Addr {
    let n = 0x0a01_0000u32 + index + 1;
    Ipv4Addr::from(n)
}

pub const SETUP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The node that reads the chat servers' counters at the end of a run.
pub const SCRAPER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

pub struct Sizes {
    pub api: u32,
    pub chat: u32,
    pub idgen: u32,
    pub presence: u32,
    pub push: u32,
    pub kv: u32,
    /// kv shards (0: one per kv node) and copies of each.
    pub kv_shards: u32,
    pub kv_replicas: u32,
    /// Each chat server's admission limit (`ChatConfig::sends_in_flight_max`).
    pub sends_in_flight: usize,
    /// Their adaptive limit's latency target (`ChatConfig::admission_target`).
    pub admission_target: Option<std::time::Duration>,
}

/// The running cluster: node ids by role, for faults.
pub struct Cluster {
    /// The process of each node: a node replaced at a new address is another simulated host
    /// (`move_node`). A std mutex: never held across await.
    nodes: Mutex<BTreeMap<(Role, u32), NodeId>>,
    pub api_addrs: Vec<SocketAddr>,
    /// The map every node was configured with (a moved node is found through etcd, not here:
    /// see `address` for where it is now).
    pub map: ClusterMap,
    /// Where each moved node answers now (shared with the harness's scraper: `kv_addrs`).
    moved: Arc<Mutex<BTreeMap<(Role, u32), SocketAddr>>>,
    /// How to start each presence, push and idgen node at a given address (a move).
    starters: BTreeMap<(Role, u32), Starter>,
    /// What starting a kv node takes, by slot (its certificate), and the run's seed and
    /// canaries; kv nodes moved so far.
    kv_tls: BTreeMap<u32, NodeTls>,
    seed: u64,
    canaries: Canaries,
    moves: std::sync::atomic::AtomicU32,
    /// Each kv node's disk: it outlives the process, and a crash loses its unsynced writes.
    pub disks: BTreeMap<u32, Arc<SimDisk>>,
    /// Each idgen node's wall clock: the machine's, so it outlives a process restart and can
    /// be stepped by a fault.
    pub clocks: BTreeMap<u32, Arc<SkewedClock>>,
    /// The harness's certificate (the operator's): what the prober, the scraper and the fault
    /// injector dial with.
    pub operator: NodeTls,
    /// The cluster CA's certificate: public, so the rogue knows it too.
    pub ca_cert: CertificateDer<'static>,
    /// What devices trust when the api and chat servers speak https and wss:// (their
    /// self-signed certificate); `None`: plain http and ws://.
    pub client_tls: Option<ClientTls>,
}

/// The certificate of node `index` of `role`.
fn node_tls(ca: &mut TestCa, role: Role, index: u32, canaries: &Canaries) -> NodeTls {
    let role = nodes::cluster::Role::from_name(role.name())
        .expect("every simulated node role is a node role");
    ca.node(
        Principal::Node(role, index),
        canaries.is_on(Canary::UnauthenticatedRpc),
    )
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

impl Cluster {
    pub fn start(
        sizes: &Sizes,
        seed: u64,
        canaries: &Canaries,
        push: Arc<dyn PushProvider>,
        etcd_timeout_rate: f64,
        client_tls: bool,
    ) -> Cluster {
        let handle = Handle::current();
        let map = ClusterMap {
            // madsim's etcd has no TLS: the one link of the simulated cluster in plain text.
            coordination: Coordination::Etcd {
                endpoints: vec![sa(ip(Role::Etcd, 0), ETCD_PORT).to_string()],
                tls: false,
            },
            kv: (0..sizes.kv)
                .map(|i| sa(ip(Role::Kv, i), RPC_PORT))
                .collect(),
            kv_shards: sizes.kv_shards,
            kv_replicas: sizes.kv_replicas,
            idgen: (0..sizes.idgen)
                .map(|i| sa(ip(Role::Idgen, i), RPC_PORT))
                .collect(),
            presence: (0..sizes.presence)
                .map(|i| sa(ip(Role::Presence, i), RPC_PORT))
                .collect(),
            push: (0..sizes.push)
                .map(|i| sa(ip(Role::Push, i), RPC_PORT))
                .collect(),
        };
        let mut ca = TestCa::new(seed ^ 0x0054_4c53_4341);
        let mut c = Cluster {
            nodes: Mutex::new(BTreeMap::new()),
            api_addrs: (0..sizes.api)
                .map(|i| sa(ip(Role::Api, i), HTTP_PORT))
                .collect(),
            moved: Arc::new(Mutex::new(BTreeMap::new())),
            starters: BTreeMap::new(),
            map,
            kv_tls: BTreeMap::new(),
            seed,
            canaries: canaries.clone(),
            moves: std::sync::atomic::AtomicU32::new(0),
            disks: BTreeMap::new(),
            clocks: BTreeMap::new(),
            operator: ca.node(Principal::Operator, false),
            ca_cert: ca.ca().cert_der(),
            client_tls: None,
        };
        // The certificate devices see: self-signed, as `chatd all-in-one` makes one, for
        // every api and chat server address; Ed25519 from the seed (same seed, same bytes).
        let server_tls = client_tls.then(|| {
            let names: Vec<String> = (0..sizes.api)
                .map(|i| ip(Role::Api, i).to_string())
                .chain((0..sizes.chat).map(|i| ip(Role::Chat, i).to_string()))
                .collect();
            let mut rng = StdRng::seed_from_u64(seed ^ 0x0043_4c49_454e_5454);
            let pair = nodes::client_tls::self_signed(&names, KeyKind::Ed25519(&mut rng))
                .expect("a certificate from our own parameters");
            c.client_tls = Some(
                ClientTls::trusting_only(std::slice::from_ref(&pair.cert_der))
                    .expect("our own certificate is a valid root"),
            );
            ServerTls::from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes())
                .expect("our own certificate and key")
        });
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0043_4c55_5354_4552);
        // Chat servers register and idgen workers lease their ids here. Never crashed: its
        // state lives in memory only (see `scenarios::Role::Etcd`).
        c.add(&handle, Role::Etcd, 0, move || async move {
            etcd_client::SimServer::builder()
                .timeout_rate(etcd_timeout_rate as f32)
                .serve(sa(ip(Role::Etcd, 0), ETCD_PORT))
                .await?;
            Ok(())
        });
        for i in 0..sizes.kv {
            c.disks.insert(i, SimDisk::new());
            c.kv_tls.insert(i, node_tls(&mut ca, Role::Kv, i, canaries));
            // The cluster is created at the first start: then, and only then, blank replicas
            // bootstrap their shards. Restarted empty (a lost disk), they join instead.
            let listen = c.map.kv[i as usize];
            c.add_kv(&handle, i, ip(Role::Kv, i), listen, true);
        }
        let peers_for = {
            let map = c.map.clone();
            let canaries = canaries.clone();
            move |tls: &NodeTls| Peers::new(map.clone(), canaries.clone(), tls.clone())
        };
        for i in 0..sizes.idgen {
            // Clock skew between idgen workers: the first is exact, others up to 200 ms off.
            let skew_ms = if i == 0 { 0 } else { rng.gen_range(-200..=200) };
            let clock = SkewedClock::new(skew_ms);
            c.clocks.insert(i, clock.clone());
            let pf = peers_for.clone();
            let tls = node_tls(&mut ca, Role::Idgen, i, canaries);
            // A replacement machine keeps the clock (its skew is not what a move tests).
            let start: Starter = Arc::new(move |listen| {
                Box::pin(nodes::idgen::server::run(
                    nodes::idgen::server::IdgenConfig {
                        listen,
                        worker: i as u16 + 1,
                        clock: clock.clone(),
                        peers: pf(&tls),
                        metrics: nodes::metrics::Metrics::new(),
                    },
                ))
            });
            c.add_movable(&handle, Role::Idgen, i, start);
        }
        for i in 0..sizes.presence {
            let pf = peers_for.clone();
            let tls = node_tls(&mut ca, Role::Presence, i, canaries);
            let start: Starter = Arc::new(move |listen| {
                Box::pin(nodes::presence::server::run(
                    nodes::presence::server::PresenceConfig {
                        listen,
                        peers: pf(&tls),
                        metrics: nodes::metrics::Metrics::new(),
                    },
                ))
            });
            c.add_movable(&handle, Role::Presence, i, start);
        }
        for i in 0..sizes.push {
            let pf = peers_for.clone();
            let tls = node_tls(&mut ca, Role::Push, i, canaries);
            let push = push.clone();
            let start: Starter = Arc::new(move |listen| {
                Box::pin(nodes::push::server::run(nodes::push::server::PushConfig {
                    listen,
                    peers: pf(&tls),
                    provider: push.clone(),
                    metrics: nodes::metrics::Metrics::new(),
                }))
            });
            c.add_movable(&handle, Role::Push, i, start);
        }
        for i in 0..sizes.chat {
            let pf = peers_for.clone();
            let tls = node_tls(&mut ca, Role::Chat, i, canaries);
            let server_tls = server_tls.clone();
            let chat_ip = ip(Role::Chat, i);
            let sends_in_flight = sizes.sends_in_flight;
            let admission_target = sizes.admission_target;
            c.add(&handle, Role::Chat, i, move || {
                nodes::chat::run(nodes::chat::ChatConfig {
                    server: i,
                    ws_listen: sa(chat_ip, WS_PORT),
                    rpc_listen: sa(chat_ip, RPC_PORT),
                    ws_advertise: sa(chat_ip, WS_PORT).to_string(),
                    rpc_advertise: sa(chat_ip, RPC_PORT).to_string(),
                    peers: pf(&tls),
                    token_key: token_key(),
                    metrics: nodes::metrics::Metrics::new(),
                    tls: server_tls.clone(),
                    sends_in_flight_max: sends_in_flight,
                    admission_target,
                })
            });
        }
        for i in 0..sizes.api {
            let pf = peers_for.clone();
            let tls = node_tls(&mut ca, Role::Api, i, canaries);
            let server_tls = server_tls.clone();
            let listen = c.api_addrs[i as usize];
            c.add(&handle, Role::Api, i, move || {
                nodes::api::run(nodes::api::ApiConfig {
                    listen,
                    peers: pf(&tls),
                    token_key: token_key(),
                    // Hundreds of logins per run: the same argon2id code at its minimum cost.
                    password_cost: nodes::auth::PasswordCost::Minimal,
                    metrics: nodes::metrics::Metrics::new(),
                    tls: server_tls.clone(),
                })
            });
        }
        c
    }

    /// Starts kv node `slot` on a host at `host_ip`, answering at `listen`: with the
    /// cluster's config (every kv node at its first address) and its membership in etcd,
    /// where a node at a new address publishes it. `bootstrap`: its first start creates the
    /// cluster's shards; later starts (and any start on a new host) join them.
    fn add_kv(
        &self,
        handle: &Handle,
        slot: u32,
        host_ip: Ipv4Addr,
        listen: SocketAddr,
        bootstrap: bool,
    ) {
        let disk = self.disks[&slot].clone();
        let canaries = self.canaries.clone();
        let nodes = self.map.kv.clone();
        let placement = self
            .map
            .placement()
            .expect("the options were checked before the run");
        let coordination = self.map.coordination.clone();
        let tls = self.kv_tls[&slot].clone();
        let seed = self.seed;
        let first_start = Arc::new(std::sync::atomic::AtomicBool::new(bootstrap));
        self.add_at(handle, Role::Kv, slot, host_ip, move || {
            let bootstrap = first_start.swap(false, std::sync::atomic::Ordering::Relaxed);
            // A new etcd client per start: a connection belongs to the process that opened it.
            let membership =
                nodes::coord::etcd::Etcd::for_coordination(&coordination, &tls).map(|etcd| {
                    nodes::coord::members::KvMembership {
                        etcd: Arc::new(etcd),
                        slot,
                        advertise: listen,
                    }
                });
            nodes::kv::server::run(nodes::kv::server::KvConfig {
                slot,
                nodes: nodes.clone(),
                placement,
                listen,
                storage: nodes::kv::server::Storage::Sim(disk.clone()),
                bootstrap,
                seed: seed ^ 0x6b76_0000 ^ u64::from(slot),
                canaries: canaries.clone(),
                metrics: nodes::metrics::Metrics::new(),
                tls: tls.clone(),
                health: nodes::kv::server::KvHealth::new(),
                membership,
            })
        });
    }

    /// Starts node `index` of a role that can move (presence, push, idgen) at its address
    /// of the map, and keeps `start` for a move.
    fn add_movable(&mut self, handle: &Handle, role: Role, index: u32, start: Starter) {
        let listen = self.address(role, index);
        let s = start.clone();
        self.add(handle, role, index, move || s(listen));
        self.starters.insert((role, index), start);
    }

    /// Node `index` of `role`'s machine is replaced by one at the next free replacement
    /// address (the old one must be down: `kill` first). A kv node starts empty on the
    /// slot's disk (wiped by the caller) and joins its shards. Nobody else is told: they
    /// find it through etcd. Its new address.
    ///
    /// # Panics
    /// For a role that does not move (chat, api, etcd).
    pub fn move_node(&self, role: Role, index: u32) -> SocketAddr {
        let n = self
            .moves
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let host = moved_ip(n);
        let listen = sa(host, RPC_PORT);
        let handle = Handle::current();
        if role == Role::Kv {
            self.add_kv(&handle, index, host, listen, false);
        } else {
            let start = self.starters[&(role, index)].clone();
            self.add_at(&handle, role, index, host, move || start(listen));
        }
        self.moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((role, index), listen);
        listen
    }

    /// Where node `index` of `role` (kv, presence, push, idgen) answers now.
    pub fn address(&self, role: Role, index: u32) -> SocketAddr {
        if let Some(a) = self
            .moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(role, index))
        {
            return *a;
        }
        let list = match role {
            Role::Kv => &self.map.kv,
            Role::Presence => &self.map.presence,
            Role::Push => &self.map.push,
            Role::Idgen => &self.map.idgen,
            other => panic!("{} nodes are not in the cluster map", other.name()),
        };
        list[index as usize]
    }

    /// Where kv node `slot` answers now.
    pub fn kv_addr(&self, slot: u32) -> SocketAddr {
        self.address(Role::Kv, slot)
    }

    /// Where every kv node answers, by slot, as of each call (for tasks that outlive a borrow
    /// of the cluster).
    pub fn kv_addrs(&self) -> impl Fn() -> Vec<SocketAddr> + Send + Sync + Clone + 'static {
        let (first, moved) = (self.map.kv.clone(), self.moved.clone());
        move || {
            let moved = moved.lock().unwrap_or_else(|p| p.into_inner());
            (0..first.len() as u32)
                .map(|i| {
                    moved
                        .get(&(Role::Kv, i))
                        .copied()
                        .unwrap_or(first[i as usize])
                })
                .collect()
        }
    }

    /// The cluster map with every node where it answers now (the operator's view).
    pub fn current_map(&self) -> ClusterMap {
        let now = |role: Role, n: usize| -> Vec<SocketAddr> {
            (0..n as u32).map(|i| self.address(role, i)).collect()
        };
        ClusterMap {
            kv: now(Role::Kv, self.map.kv.len()),
            presence: now(Role::Presence, self.map.presence.len()),
            push: now(Role::Push, self.map.push.len()),
            idgen: now(Role::Idgen, self.map.idgen.len()),
            ..self.map.clone()
        }
    }

    /// The simulated host running node `index` of `role` now.
    pub fn node_id(&self, role: Role, index: u32) -> NodeId {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())[&(role, index)]
    }

    /// Every node, by role and index.
    pub fn node_names(&self) -> Vec<(Role, u32)> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    fn add<F, Fut>(&self, handle: &Handle, role: Role, index: u32, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + 'static,
    {
        self.add_at(handle, role, index, ip(role, index), f)
    }

    /// Starts a node on a host at `host_ip` (the node's name says which one it is).
    fn add_at<F, Fut>(&self, handle: &Handle, role: Role, index: u32, host_ip: Ipv4Addr, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + 'static,
    {
        let name = format!("{}-{}", role.name(), index);
        let label = name.clone();
        let node: NodeHandle = handle
            .create_node()
            .name(name)
            .ip(IpAddr::V4(host_ip))
            .init(move || {
                let fut = f();
                let label = label.clone();
                async move {
                    if let Err(e) = fut.await {
                        tracing::error!(node = %label, error = %e, "node exited with an error");
                    }
                }
            })
            .build();
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((role, index), node.id());
    }

    /// Kills a node: its tasks are dropped, its connections reset; a kv node's disk loses
    /// every write not yet synced. Returns the writes lost.
    pub fn kill(&self, role: Role, index: u32) -> u64 {
        Handle::current().kill(self.node_id(role, index));
        match role {
            Role::Kv => self.disks[&index].crash(),
            _ => 0,
        }
    }

    /// Kills a kv node whose unsynced writes are torn: a seeded subset of them is kept.
    pub fn kill_torn(&self, index: u32, rng: &mut StdRng) -> u64 {
        Handle::current().kill(self.node_id(Role::Kv, index));
        self.disks[&index].crash_torn(rng)
    }

    pub fn restart(&self, role: Role, index: u32) {
        Handle::current().restart(self.node_id(role, index));
    }
}
