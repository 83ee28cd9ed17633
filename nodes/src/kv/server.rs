//! The kv node shell: opens the store and answers RPCs with [`Store::apply`].
//!
//! redb's write transactions are serialized by redb itself; calls run one at a time here
//! (the store is synchronous and fast), so the shell never holds a lock across an await.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;

use super::disk::SimDisk;
use super::Store;
use crate::canary::{Canaries, Canary};
use crate::rpc;

/// Where a kv node keeps its bytes.
#[derive(Debug, Clone)]
pub enum Storage {
    /// The simulation's in-memory disk that outlives node restarts.
    Sim(Arc<SimDisk>),
    /// A redb file (real deployment).
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct KvConfig {
    pub listen: SocketAddr,
    pub storage: Storage,
    pub canaries: Canaries,
}

/// How often the kv-ack-before-sync canary fsyncs what it acknowledged.
const CANARY_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the database on `storage`.
pub fn open(storage: &Storage) -> anyhow::Result<Store> {
    let db = match storage {
        Storage::Sim(disk) => redb::Database::builder().create_with_backend(disk.backend())?,
        Storage::File(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            redb::Database::create(path)?
        }
    };
    Ok(Store::open(db)?)
}

/// Runs a kv node until the process (or simulated node) dies.
pub async fn run(cfg: KvConfig) -> anyhow::Result<()> {
    let mut store = open(&cfg.storage)?;
    if cfg.canaries.is_on(Canary::KvAckBeforeSync) {
        store.set_durable(false);
    }
    let store = Arc::new(store);
    if cfg.canaries.is_on(Canary::KvAckBeforeSync) {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CANARY_SYNC_EVERY).await;
                if let Err(e) = store.sync() {
                    tracing::warn!(error = %e, "background sync failed");
                }
            }
        });
    }
    tracing::info!(listen = %cfg.listen, "kv node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let store = store.clone();
        async move { store.apply(req) }.boxed()
    });
    rpc::serve(cfg.listen, handler).await?;
    Ok(())
}
