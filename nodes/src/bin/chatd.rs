//! `chatd`: the real deployment. `chatd all-in-one --data DIR` runs every role in one process
//! on loopback (each role still talks to the others over TCP, as across machines), with kv on
//! redb files under DIR.
//!
//! Per-role subcommands, a TOML config and a local multi-process cluster are issue 5.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nodes::auth::TokenKey;
use nodes::canary::Canaries;
use nodes::clock::SkewedClock;
use nodes::cluster::{ClusterMap, Peers};
use nodes::kv::server::{KvConfig, Storage};

#[derive(Debug, Parser)]
#[command(name = "chatd", version, about = "chatsim nodes, for real")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every role in one process on loopback; kv on redb files under --data.
    AllInOne(AllInOne),
}

#[derive(Debug, clap::Args)]
struct AllInOne {
    /// Directory for the redb files and the token secret.
    #[arg(long, default_value = "chatsim-data")]
    data: PathBuf,
    /// The api's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Loopback port plan: discovery BASE, idgen +1, presence +2, push +3, chat WebSocket +4,
    /// chat RPC +5, kv shard i at +9+i.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// kv shards (one redb file each). Must not change for an existing data directory.
    #[arg(long, default_value_t = 2)]
    kv_shards: u16,
}

fn main() -> anyhow::Result<()> {
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
    match cli.cmd {
        Cmd::AllInOne(a) => rt.block_on(all_in_one(a)),
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Reads the token secret from the data dir, creating it on first start.
fn secret(data: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data.join("token.secret");
    if let Ok(s) = std::fs::read(&path) {
        return Ok(s);
    }
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let hexed = hex::encode(key).into_bytes();
    std::fs::write(&path, &hexed).with_context(|| format!("write {}", path.display()))?;
    Ok(hexed)
}

async fn all_in_one(a: AllInOne) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data).with_context(|| format!("create {}", a.data.display()))?;
    let key = TokenKey::new(1, secret(&a.data)?);
    let p = a.base_port;
    let shards = a.kv_shards.max(1);
    let map = ClusterMap {
        discovery: loopback(p),
        kv: (0..shards).map(|i| loopback(p + 9 + i)).collect(),
        idgen: vec![loopback(p + 1)],
        presence: loopback(p + 2),
        push: loopback(p + 3),
    };
    let chat_ws = loopback(p + 4);
    let chat_rpc = loopback(p + 5);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(nodes::discovery::server::run(map.discovery)));
    for (i, addr) in map.kv.iter().enumerate() {
        let cfg = KvConfig {
            listen: *addr,
            storage: Storage::File(a.data.join(format!("kv-{i}.redb"))),
            canaries: Canaries::none(),
        };
        tasks.push(tokio::spawn(nodes::kv::server::run(cfg)));
    }
    let peers = || Peers::new(map.clone(), Canaries::none());
    tasks.push(tokio::spawn(nodes::idgen::server::run(
        nodes::idgen::server::IdgenConfig {
            listen: map.idgen[0],
            worker: 1,
            clock: SkewedClock::new(0),
            peers: peers(),
        },
    )));
    tasks.push(tokio::spawn(nodes::presence::server::run(
        nodes::presence::server::PresenceConfig {
            listen: map.presence,
            peers: peers(),
        },
    )));
    tasks.push(tokio::spawn(nodes::push::server::run(
        nodes::push::server::PushConfig {
            listen: map.push,
            peers: peers(),
            provider: Arc::new(nodes::push::LogProvider),
        },
    )));
    tasks.push(tokio::spawn(nodes::chat::run(nodes::chat::ChatConfig {
        server: 0,
        ws_listen: chat_ws,
        rpc_listen: chat_rpc,
        ws_advertise: chat_ws.to_string(),
        rpc_advertise: chat_rpc.to_string(),
        peers: peers(),
        token_key: key.clone(),
    })));
    tasks.push(tokio::spawn(nodes::api::run(nodes::api::ApiConfig {
        listen: a.http,
        peers: peers(),
        token_key: key,
    })));
    tracing::info!(http = %a.http, data = %a.data.display(), "chatd all-in-one running");
    // Any role ending is fatal: the process exits non-zero and a supervisor restarts it.
    let (result, _, _) = futures::future::select_all(tasks).await;
    match result {
        Ok(Ok(())) => anyhow::bail!("a role stopped"),
        Ok(Err(e)) => Err(e.context("a role failed")),
        Err(e) => Err(anyhow::anyhow!("a role panicked: {e}")),
    }
}
