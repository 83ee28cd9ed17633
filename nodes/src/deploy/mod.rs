//! The real deployment: the config file ([`config`]), starting roles from it ([`start`]), and
//! the loopback cluster supervisor ([`supervisor`]). Real world only (processes and files).

pub mod certs;
pub mod config;
pub mod supervisor;

use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::auth::TokenKey;
use crate::canary::Canaries;
use crate::clock::SkewedClock;
use crate::cluster::Peers;
use crate::kv::server::{KvConfig, Storage};
use crate::metrics::{self, Metrics};
use crate::push::PushProvider;
pub use config::{Config, Role};

/// What every role of a process shares.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub token_key: TokenKey,
    pub push: Arc<dyn PushProvider>,
}

impl Shared {
    pub fn new(cfg: &Config, push: Arc<dyn PushProvider>) -> anyhow::Result<Shared> {
        Ok(Shared {
            metrics: Metrics::new(),
            token_key: cfg.token_key()?,
            push,
        })
    }
}

type Task = JoinHandle<anyhow::Result<()>>;

/// Starts node `index` of `role` as tasks of this process: the role, and its admin endpoint
/// when `admin` is set and the config names one. `bootstrap` (kv only): this node's shards
/// are new (the cluster is being created); without it a kv node bootstraps only when its
/// directory holds the bootstrap mark.
pub fn start(
    cfg: &Config,
    role: Role,
    index: usize,
    shared: &Shared,
    admin: bool,
    bootstrap: bool,
) -> anyhow::Result<Vec<Task>> {
    let n = cfg.count(role);
    if index >= n {
        anyhow::bail!(
            "{} has {n} node(s) in the config; no index {index}",
            role.name()
        );
    }
    let tls = certs::node_tls(cfg, crate::tls::Principal::Node(role, index as u32))?;
    let mut tasks: Vec<Task> = vec![tokio::spawn(certs::watch_revocations(
        cfg.tls_dir(),
        tls.clone(),
    ))];
    let peers = || Peers::new(cfg.cluster_map(), Canaries::none(), tls.clone());
    let m = shared.metrics.clone();
    // A kv node's /healthz reports its replicas' storage (`KvHealth`); others: alive.
    let mut kv_health: Option<Arc<crate::kv::server::KvHealth>> = None;
    let admin_addr = match role {
        Role::Discovery => {
            let Some(d) = &cfg.discovery else {
                anyhow::bail!("this cluster coordinates on etcd: it has no discovery node");
            };
            tasks.push(tokio::spawn(crate::discovery::server::run(
                d.listen,
                tls.clone(),
            )));
            d.admin
        }
        Role::Kv => {
            let dir = cfg.kv_dir(index);
            let map = cfg.cluster_map();
            let kv = KvConfig {
                slot: index as u32,
                nodes: map.kv.clone(),
                placement: map.placement().map_err(|e| anyhow::anyhow!(e))?,
                listen: cfg.kv[index].listen,
                storage: Storage::Dir(dir.clone()),
                bootstrap: false,
                seed: rand::random(),
                canaries: Canaries::none(),
                metrics: m,
                tls: tls.clone(),
                health: crate::kv::server::KvHealth::new(),
                membership: kv_membership(&map, index, cfg.kv[index].listen, &tls)?,
            };
            kv_health = Some(kv.health.clone());
            let mark = dir.join(config::BOOTSTRAP_MARK);
            if bootstrap || mark.exists() {
                crate::kv::server::bootstrap(&kv)
                    .with_context(|| format!("bootstrap kv node {index}"))?;
                let _ = std::fs::remove_file(&mark);
            }
            tasks.push(tokio::spawn(crate::kv::server::run(kv)));
            cfg.kv[index].admin
        }
        Role::Idgen => {
            let node = &cfg.idgen[index];
            tasks.push(tokio::spawn(crate::idgen::server::run(
                crate::idgen::server::IdgenConfig {
                    listen: node.listen,
                    worker: node.worker,
                    clock: SkewedClock::new(0),
                    peers: peers(),
                    metrics: m,
                },
            )));
            node.admin
        }
        Role::Presence => {
            tasks.push(tokio::spawn(crate::presence::server::run(
                crate::presence::server::PresenceConfig {
                    listen: cfg.presence[index].listen,
                    peers: peers(),
                    metrics: m,
                },
            )));
            cfg.presence[index].admin
        }
        Role::Push => {
            tasks.push(tokio::spawn(crate::push::server::run(
                crate::push::server::PushConfig {
                    listen: cfg.push[index].listen,
                    peers: peers(),
                    provider: shared.push.clone(),
                    metrics: m,
                },
            )));
            cfg.push[index].admin
        }
        Role::Chat => {
            let node = &cfg.chat[index];
            tasks.push(tokio::spawn(crate::chat::run(crate::chat::ChatConfig {
                server: index as u32,
                ws_listen: node.ws_listen,
                rpc_listen: node.rpc_listen,
                ws_advertise: node
                    .ws_advertise
                    .clone()
                    .unwrap_or_else(|| node.ws_listen.to_string()),
                rpc_advertise: node
                    .rpc_advertise
                    .clone()
                    .unwrap_or_else(|| node.rpc_listen.to_string()),
                peers: peers(),
                token_key: shared.token_key.clone(),
                metrics: m,
                tls: certs::client_tls(cfg)?,
                sends_in_flight_max: node
                    .sends_in_flight_max
                    .unwrap_or(crate::limits::SENDS_IN_FLIGHT_MAX),
                admission_target: crate::chat::admission::target(node.admission_target_ms),
            })));
            node.admin
        }
        Role::Api => {
            // The api serves /healthz itself; /metrics only on its admin address.
            tasks.push(tokio::spawn(crate::api::run(crate::api::ApiConfig {
                listen: cfg.api[index].listen,
                peers: peers(),
                token_key: shared.token_key.clone(),
                password_cost: crate::auth::PasswordCost::Standard,
                metrics: m,
                tls: certs::client_tls(cfg)?,
            })));
            cfg.api[index].admin
        }
    };
    if let (true, Some(addr)) = (admin, admin_addr) {
        let health: metrics::HealthCheck = match kv_health {
            Some(h) => Arc::new(move || h.check()),
            None => metrics::alive(),
        };
        tasks.push(tokio::spawn(metrics::serve(
            addr,
            shared.metrics.clone(),
            health,
        )));
    }
    Ok(tasks)
}

/// A kv node's membership in etcd, when the cluster coordinates on etcd: its address there
/// is the one it listens on, which must be one others can dial.
#[cfg(feature = "etcd")]
fn kv_membership(
    map: &crate::cluster::ClusterMap,
    index: usize,
    listen: std::net::SocketAddr,
    tls: &crate::tls::NodeTls,
) -> anyhow::Result<Option<crate::kv::server::Membership>> {
    let Some(etcd) = crate::coord::etcd::Etcd::for_coordination(&map.coordination, tls) else {
        return Ok(None);
    };
    if listen.ip().is_unspecified() {
        anyhow::bail!(
            "kv node {index} listens on {listen}: with etcd it publishes that address for the \
             others to dial, so give it a routable one"
        );
    }
    Ok(Some(crate::coord::members::KvMembership {
        etcd: Arc::new(etcd),
        slot: index as u32,
        advertise: listen,
    }))
}

#[cfg(not(feature = "etcd"))]
fn kv_membership(
    _: &crate::cluster::ClusterMap,
    _: usize,
    _: std::net::SocketAddr,
    _: &crate::tls::NodeTls,
) -> anyhow::Result<Option<crate::kv::server::Membership>> {
    Ok(None)
}

/// Every node of the config in this process (all-in-one), sharing one [`Metrics`], served on
/// the api nodes' admin addresses (the other nodes' admin endpoints are not started).
pub fn start_all(cfg: &Config, shared: &Shared) -> anyhow::Result<Vec<Task>> {
    std::fs::create_dir_all(&cfg.data).with_context(|| format!("create {}", cfg.data.display()))?;
    if cfg.is_new_cluster() {
        cfg.mark_kv_bootstrap()?;
    }
    let mut tasks = Vec::new();
    for role in Role::ALL {
        for i in 0..cfg.count(role) {
            tasks.extend(start(cfg, role, i, shared, role == Role::Api, false)?);
        }
    }
    Ok(tasks)
}

/// Waits until any task ends: every role runs forever, so that is an error (the process
/// exits non-zero and its supervisor restarts it).
pub async fn run_until_one_ends(tasks: Vec<Task>) -> anyhow::Result<()> {
    let (result, _, _) = futures::future::select_all(tasks).await;
    match result {
        Ok(Ok(())) => anyhow::bail!("a role stopped"),
        Ok(Err(e)) => Err(e.context("a role failed")),
        Err(e) => Err(anyhow::anyhow!("a role panicked: {e}")),
    }
}
