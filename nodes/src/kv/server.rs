//! The kv node shell: opens the store and answers RPCs with [`Store::apply`].
//!
//! redb's write transactions are serialized by redb itself; calls run one at a time here
//! (the store is synchronous and fast), so the shell never holds a lock across an await.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;

use super::disk::{SimDisk, SimDiskBackend};
use super::Store;
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
}

/// Opens the database on `storage`.
pub fn open(storage: &Storage) -> anyhow::Result<Store> {
    let db = match storage {
        Storage::Sim(disk) => {
            redb::Database::builder().create_with_backend(SimDiskBackend(disk.clone()))?
        }
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
    let store = Arc::new(open(&cfg.storage)?);
    tracing::info!(listen = %cfg.listen, "kv node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let store = store.clone();
        async move { store.apply(req) }.boxed()
    });
    rpc::serve(cfg.listen, handler).await?;
    Ok(())
}
