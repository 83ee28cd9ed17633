//! The real `chatd` (see main.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nodes::deploy::config::ClusterSizes;
use nodes::deploy::{self, Config, Role, Shared};

#[derive(Debug, Parser)]
#[command(name = "chatd", version, about = "chatsim nodes, for real")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every role in one process; kv on redb files under the data directory.
    AllInOne(AllInOne),
    /// One process per node on loopback addresses (127.0.r.i), supervised.
    LocalCluster(LocalCluster),
    /// Prints a config file: the all-in-one layout, or a loopback cluster's with --cluster.
    PrintConfig(PrintConfig),
    /// The discovery node of a config.
    Discovery(RoleArgs),
    /// A kv node of a config: its replicas of the shards placed on it.
    Kv(KvArgs),
    /// The kv cluster's state: per shard, its replicas, leader, term, indexes and lag.
    Status(StatusArgs),
    /// After a quorum of a shard lost its disks: make one surviving replica the shard's only
    /// voter, so the shard serves again (what only the lost replicas held is gone).
    KvRecover(KvRecoverArgs),
    /// A node's key was stolen: revoke its certificate (every node refuses it within 5 s,
    /// on open connections too) and issue it a new one; then restart that node.
    RevokeNode(RevokeNodeArgs),
    /// An id generator of a config.
    Idgen(RoleArgs),
    /// A presence node of a config.
    Presence(RoleArgs),
    /// A push node of a config.
    Push(RoleArgs),
    /// A WebSocket chat server of a config.
    Chat(RoleArgs),
    /// An api node (HTTP, browser page, /metrics) of a config.
    Api(RoleArgs),
}

#[derive(Debug, Args)]
struct AllInOne {
    /// A config file; without one, the single-host layout below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for the redb files and the token secret (overrides the config's).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The api's HTTP address (without --config).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Loopback port plan (without --config): discovery BASE, idgen +1, presence +2, push +3,
    /// chat WebSocket +4, chat RPC +5, kv shard i at +9+i.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// kv shards (without --config; one redb file each). Must not change for existing data.
    #[arg(long, default_value_t = 2)]
    kv_shards: u16,
    #[command(flatten)]
    client_tls: ClientTlsArgs,
}

#[derive(Debug, Args)]
struct LocalCluster {
    /// Directory for the config, redb files, logs and pid files.
    #[arg(long, default_value = "chatsim-cluster")]
    data: PathBuf,
    /// The first api node's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    #[arg(long, default_value_t = 3)]
    chat: u16,
    /// etcd members to run (Debian's `etcd`; chat servers register there and idgen worker
    /// ids are leased there); 0: the home-made discovery node instead.
    #[arg(long, default_value_t = 3)]
    etcd: u16,
    /// Presence nodes (user u's presence on node u % n).
    #[arg(long, default_value_t = 2)]
    presence: u16,
    /// Push nodes (any serves any request; claims in kv keep one push per device).
    #[arg(long, default_value_t = 2)]
    push: u16,
    /// kv nodes. Must not change for existing data.
    #[arg(long, default_value_t = 3)]
    kv: u16,
    /// kv shards (Raft groups; 0: one per kv node). Must not change for existing data.
    #[arg(long, default_value_t = 0)]
    kv_shards: u16,
    /// Copies of each shard, on distinct kv nodes (at most --kv).
    #[arg(long, default_value_t = 3)]
    kv_replicas: u16,
    #[arg(long, default_value_t = 2)]
    idgen: u16,
    #[arg(long, default_value_t = 1)]
    api: u16,
    /// Sends each chat server commits at once before refusing new ones `overloaded`
    /// (default 100,000: off in practice; see `limits::SENDS_IN_FLIGHT_MAX`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    sends_in_flight: Option<u64>,
    /// The commit latency each chat server's adaptive admission limit aims at, in ms (default
    /// `limits::ADMISSION_TARGET_MS`; 0: the limit is fixed at --sends-in-flight).
    #[arg(long)]
    admission_target_ms: Option<u64>,
    /// Use this config instead of generating one (its addresses should be on this machine).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    client_tls: ClientTlsArgs,
}

/// How devices reach the api and chat servers. Default: https and wss:// with a self-signed
/// certificate created in `<data>/tls/client.crt` (give it to clients: `chat --ca-cert`).
#[derive(Debug, Args)]
struct ClientTlsArgs {
    /// Plain http and ws:// (a TLS-terminating proxy in front, or a quick local try).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    plaintext: bool,
    /// The certificate chain devices see (PEM, leaf first), instead of a self-signed one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// Applies the flags over the config's `[client_tls]` (or the generated config's
    /// self-signed default).
    fn apply(&self, cfg: &mut Config) {
        if self.plaintext {
            cfg.client_tls = None;
        } else if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            cfg.client_tls = Some(nodes::deploy::config::ClientTlsFiles {
                cert: abs(cert),
                key: abs(key),
                self_signed: false,
            });
        }
    }
}

#[derive(Debug, Args)]
struct PrintConfig {
    /// A loopback cluster's layout (like local-cluster) instead of the all-in-one one.
    #[arg(long)]
    cluster: bool,
    #[arg(long, default_value = "chatsim-data")]
    data: PathBuf,
}

#[derive(Debug, Args)]
struct KvArgs {
    #[command(flatten)]
    role: RoleArgs,
    /// Create this node's replicas of new shards (the first start of a new cluster; the
    /// local cluster marks its kv directories instead).
    #[arg(long)]
    bootstrap: bool,
    /// A replacement disk: delete this node's directory first (refused while the node
    /// answers), then start empty; its replicas join their shards and catch up from peers.
    #[arg(long, conflicts_with = "bootstrap")]
    replace: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The cluster's config file.
    #[arg(long)]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct RevokeNodeArgs {
    /// The cluster's config file (its TLS directory must hold the CA key).
    #[arg(long)]
    config: PathBuf,
    /// The node, as `<role>-<index>` (`kv-2`, `chat-0`) or `operator`.
    node: String,
}

#[derive(Debug, Args)]
struct KvRecoverArgs {
    /// The cluster's config file.
    #[arg(long)]
    config: PathBuf,
    /// The shard that lost its quorum.
    #[arg(long)]
    shard: u32,
    /// The kv node (index) whose replica survives.
    #[arg(long)]
    index: usize,
}

#[derive(Debug, Args)]
struct RoleArgs {
    /// The cluster's config file.
    #[arg(long)]
    config: PathBuf,
    /// Which node of the role (its position in the config's list).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// kv, presence, push, idgen: listen here instead of at the config's address (a
    /// replacement machine). The node publishes it in etcd, where every other node finds it
    /// within seconds. Needs a cluster on etcd; without etcd, edit every node's config.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

impl RoleArgs {
    /// Puts `--listen` in the loaded config, if given and allowed.
    fn apply_listen(&self, cfg: &mut Config, role: Role) -> anyhow::Result<()> {
        let Some(addr) = self.listen else {
            return Ok(());
        };
        if cfg.etcd.is_empty() {
            anyhow::bail!(
                "--listen {addr}: this cluster has no etcd, so no other node would find {}-{} \
                 there; edit its address in every node's config instead",
                role.name(),
                self.index
            );
        }
        let i = self.index;
        let slot = match role {
            Role::Kv => cfg.kv.get_mut(i).map(|n| &mut n.listen),
            Role::Presence => cfg.presence.get_mut(i).map(|n| &mut n.listen),
            Role::Push => cfg.push.get_mut(i).map(|n| &mut n.listen),
            Role::Idgen => cfg.idgen.get_mut(i).map(|n| &mut n.listen),
            _ => anyhow::bail!(
                "--listen: {} nodes do not move this way (chat servers register the addresses \
                 they are given in their config; api nodes are found by clients)",
                role.name()
            ),
        };
        match slot {
            Some(listen) => {
                *listen = addr;
                Ok(())
            }
            None => anyhow::bail!("{} has no node {i} in the config", role.name()),
        }
    }
}

pub fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let role = |r: Role, a: RoleArgs| rt.block_on(one_role(r, a));
    match cli.cmd {
        Cmd::AllInOne(a) => rt.block_on(all_in_one(a)),
        Cmd::LocalCluster(a) => rt.block_on(local_cluster(a)),
        Cmd::PrintConfig(a) => {
            let cfg = if a.cluster {
                Config::loopback_cluster(a.data, "127.0.0.1:8080".parse()?, &default_sizes())?
            } else {
                Config::single_host(a.data, "127.0.0.1:8080".parse()?, 7100, 2)
            };
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Cmd::Discovery(a) => role(Role::Discovery, a),
        Cmd::Kv(a) => rt.block_on(kv_node(a)),
        Cmd::Status(a) => rt.block_on(status(a)),
        Cmd::KvRecover(a) => rt.block_on(kv_recover(a)),
        Cmd::RevokeNode(a) => revoke_node(a),
        Cmd::Idgen(a) => role(Role::Idgen, a),
        Cmd::Presence(a) => role(Role::Presence, a),
        Cmd::Push(a) => role(Role::Push, a),
        Cmd::Chat(a) => role(Role::Chat, a),
        Cmd::Api(a) => role(Role::Api, a),
    }
}

fn default_sizes() -> ClusterSizes {
    ClusterSizes {
        etcd: 3,
        presence: 2,
        push: 2,
        kv: 3,
        kv_shards: 0,
        kv_replicas: 3,
        idgen: 2,
        chat: 3,
        api: 1,
    }
}

fn push_provider(cfg: &Config) -> anyhow::Result<Arc<dyn nodes::push::PushProvider>> {
    nodes::push::settings::build(&cfg.push_provider).context("build the push provider")
}

async fn all_in_one(a: AllInOne) -> anyhow::Result<()> {
    let mut cfg = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::single_host(
            PathBuf::from("chatsim-data"),
            a.http,
            a.base_port,
            a.kv_shards,
        ),
    };
    if let Some(d) = a.data {
        cfg.data = d;
    }
    a.client_tls.apply(&mut cfg);
    cfg.validate()?;
    let shared = Shared::new(&cfg, push_provider(&cfg)?)?;
    let tasks = deploy::start_all(&cfg, &shared)?;
    tracing::info!(
        http = %cfg.api[0].listen,
        data = %cfg.data.display(),
        "chatd all-in-one running: open {}",
        cfg.api_url()
    );
    log_self_signed(&cfg);
    deploy::run_until_one_ends(tasks).await
}

/// Where the self-signed certificate is, for clients to trust.
fn log_self_signed(cfg: &Config) {
    if let (Some(files), Some((cert, _))) = (&cfg.client_tls, cfg.client_tls_paths()) {
        if files.self_signed {
            tracing::info!(
                "clients: trust the self-signed {} (chat --ca-cert {0}; a browser asks once)",
                cert.display()
            );
        }
    }
}

async fn one_role(role: Role, a: RoleArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(&a.config)?;
    a.apply_listen(&mut cfg, role)?;
    std::fs::create_dir_all(&cfg.data).with_context(|| format!("create {}", cfg.data.display()))?;
    // Only the push node talks to a push platform (and needs its keys).
    let push: Arc<dyn nodes::push::PushProvider> = if role == Role::Push {
        push_provider(&cfg)?
    } else {
        Arc::new(nodes::push::LogProvider)
    };
    let shared = Shared::new(&cfg, push)?;
    let tasks = deploy::start(&cfg, role, a.index, &shared, true, false)?;
    tracing::info!(role = role.name(), index = a.index, "chatd node running");
    deploy::run_until_one_ends(tasks).await
}

/// Where each kv node answers: the config's addresses, with those etcd names instead (a
/// node replaced at another address, `coord::members`).
async fn kv_addresses(cfg: &Config, operator: &nodes::tls::NodeTls) -> Vec<std::net::SocketAddr> {
    let mut addrs: Vec<std::net::SocketAddr> = cfg.kv.iter().map(|n| n.listen).collect();
    let map = cfg.cluster_map();
    if let Some(etcd) = nodes::coord::etcd::Etcd::for_coordination(&map.coordination, operator) {
        match nodes::coord::members::kv_addresses(&etcd).await {
            Ok(found) => {
                for (slot, addr) in found {
                    if let Some(a) = addrs.get_mut(slot as usize) {
                        *a = addr;
                    }
                }
            }
            Err(e) => eprintln!("etcd did not answer ({e}): the config's kv addresses"),
        }
    }
    addrs
}

/// A client of kv node `index` at `addr`: it answers only if it is that node.
fn kv_client(
    addr: std::net::SocketAddr,
    operator: &nodes::tls::NodeTls,
    index: usize,
) -> nodes::rpc::RpcClient {
    let who = nodes::tls::Principal::Node(Role::Kv, index as u32);
    nodes::rpc::RpcClient::to_node(addr, operator.clone(), who)
}

async fn kv_node(a: KvArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(&a.role.config)?;
    let index = a.role.index;
    anyhow::ensure!(
        index < cfg.kv.len(),
        "the config has {} kv node(s); no index {index}",
        cfg.kv.len()
    );
    // Where the node answers now (before `--listen` moves it): `--replace` checks it is down.
    let operator = deploy::certs::node_tls(&cfg, nodes::tls::Principal::Operator)?;
    let old = kv_addresses(&cfg, &operator).await[index];
    a.role.apply_listen(&mut cfg, Role::Kv)?;
    if a.replace {
        let probe = kv_client(old, &operator, index);
        if probe
            .call(nodes::proto::internal::Request::KvStatus)
            .await
            .is_ok()
        {
            anyhow::bail!("kv node {index} answers on {old}: stop it before replacing its disk");
        }
        let dir = cfg.kv_dir(index);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            tracing::warn!(dir = %dir.display(), "replacement: the old disk's data is gone");
        }
    }
    let listen = cfg.kv[index].listen;
    std::fs::create_dir_all(&cfg.data).with_context(|| format!("create {}", cfg.data.display()))?;
    let shared = Shared::new(&cfg, Arc::new(nodes::push::LogProvider))?;
    let tasks = deploy::start(&cfg, Role::Kv, index, &shared, true, a.bootstrap)?;
    tracing::info!(index, %listen, "chatd kv node running");
    deploy::run_until_one_ends(tasks).await
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    use nodes::proto::internal::{Request, Response};
    let cfg = Config::load(&a.config)?;
    println!(
        "{:<6} {:<6} {:<20} {:<10} {:>6} {:>8} {:>8} {:>8}  lag (peer node: entries)",
        "shard", "node", "id", "role", "term", "commit", "applied", "last"
    );
    let operator = deploy::certs::node_tls(&cfg, nodes::tls::Principal::Operator)?;
    let addrs = kv_addresses(&cfg, &operator).await;
    for (i, listen) in addrs.iter().enumerate() {
        let client = kv_client(*listen, &operator, i);
        match client.call(Request::KvStatus).await {
            Ok(Response::KvStatus(list)) => {
                for s in list {
                    let lag: Vec<String> = s
                        .lag
                        .iter()
                        .map(|(p, l)| format!("{}:{l}", nodes::kv::placement::slot_of(*p)))
                        .collect();
                    println!(
                        "{:<6} {:<6} {:<20} {:<10} {:>6} {:>8} {:>8} {:>8}  {}",
                        s.shard,
                        format!("kv-{i}"),
                        s.id,
                        s.role,
                        s.term,
                        s.commit,
                        s.applied,
                        s.last_index,
                        lag.join(" ")
                    );
                }
            }
            Ok(other) => println!("kv-{i} {listen}: unexpected answer {other:?}"),
            Err(e) => println!("kv-{i} {listen}: down ({e})"),
        }
    }
    Ok(())
}

fn revoke_node(a: RevokeNodeArgs) -> anyhow::Result<()> {
    use nodes::tls::Principal;
    let cfg = Config::load(&a.config)?;
    let who = if a.node == "operator" {
        Principal::Operator
    } else {
        let (role, index) = a
            .node
            .rsplit_once('-')
            .and_then(|(r, i)| Some((Role::from_name(r)?, i.parse::<u32>().ok()?)))
            .ok_or_else(|| {
                anyhow::anyhow!("{:?}: name a node as <role>-<index>, e.g. kv-2", a.node)
            })?;
        anyhow::ensure!(
            (index as usize) < cfg.count(role),
            "the config has no {}",
            a.node
        );
        Principal::Node(role, index)
    };
    let serial = deploy::certs::revoke(&cfg, who)?;
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "revoked {who}'s certificate (serial {hex}); every node refuses it within {} s. \
         A new certificate is in place: restart {who} to use it.",
        deploy::certs::REVOCATION_POLL.as_secs()
    );
    Ok(())
}

async fn kv_recover(a: KvRecoverArgs) -> anyhow::Result<()> {
    use nodes::proto::internal::{Request, Response};
    let cfg = Config::load(&a.config)?;
    anyhow::ensure!(a.index < cfg.kv.len(), "no kv node {}", a.index);
    let operator = deploy::certs::node_tls(&cfg, nodes::tls::Principal::Operator)?;
    let addr = kv_addresses(&cfg, &operator).await[a.index];
    let client = kv_client(addr, &operator, a.index);
    match client
        .call(Request::KvForceRecover { shard: a.shard })
        .await?
    {
        Response::Ok => {
            println!(
                "shard {}: kv-{} is now its only voter; the other replicas rejoin from it. \
                 Writes only the lost replicas held are gone.",
                a.shard, a.index
            );
            Ok(())
        }
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

async fn local_cluster(a: LocalCluster) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data).with_context(|| format!("create {}", a.data.display()))?;
    let data = std::fs::canonicalize(&a.data)?;
    let (cfg, path) = match a.config {
        Some(path) => {
            anyhow::ensure!(
                !a.client_tls.plaintext && a.client_tls.tls_cert.is_none(),
                "with --config, say how clients connect in its [client_tls] table"
            );
            (Config::load(&path)?, std::fs::canonicalize(path)?)
        }
        None => {
            let sizes = ClusterSizes {
                etcd: a.etcd,
                presence: a.presence,
                push: a.push,
                kv: a.kv,
                kv_shards: a.kv_shards,
                kv_replicas: a.kv_replicas.min(a.kv),
                idgen: a.idgen,
                chat: a.chat,
                api: a.api,
            };
            let mut cfg = Config::loopback_cluster(data.clone(), a.http, &sizes)?;
            a.client_tls.apply(&mut cfg);
            for c in &mut cfg.chat {
                c.sends_in_flight_max = a.sends_in_flight.map(|n| n as usize);
                c.admission_target_ms = a.admission_target_ms;
            }
            let path = data.join("cluster.toml");
            std::fs::write(&path, cfg.to_toml())
                .with_context(|| format!("write {}", path.display()))?;
            (cfg, path)
        }
    };
    // Created once here, so that nodes starting at the same moment share them.
    cfg.token_key()?;
    deploy::certs::ensure(&cfg)?;
    deploy::certs::client_tls(&cfg)?;
    if cfg.is_new_cluster() {
        cfg.mark_kv_bootstrap()?;
    }
    let exe = std::env::current_exe().context("find the chatd binary")?;
    tracing::info!(
        config = %path.display(),
        logs = %cfg.data.join("logs").display(),
        "local cluster: open {}",
        cfg.api_url()
    );
    log_self_signed(&cfg);
    nodes::deploy::supervisor::Supervisor::new(exe, path, &cfg)
        .run()
        .await
}
