//! The kv node shell: opens the store and answers RPCs through one committer task.
//!
//! Group commit: RPC handlers queue their requests; the committer takes everything queued (up
//! to [`GROUP_COMMIT_MAX`]), runs it with [`Store::apply_batch`] (one fsync for the batch) off
//! the async workers, and only then answers. While one batch syncs the next one gathers, so
//! the batch grows with load and throughput is not bound by one fsync per write.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::disk::SimDisk;
use super::Store;
use crate::canary::{Canaries, Canary};
use crate::metrics::{Metrics, OpLabel};
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response};
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
    pub metrics: Arc<Metrics>,
}

/// Requests waiting for the committer. When full, RPC handlers wait for room (backpressure:
/// the rpc connection stops reading, and callers' 2 s call deadlines apply).
pub const KV_QUEUE_MAX: usize = 4096;

/// Most requests in one group commit (one fsync).
pub const GROUP_COMMIT_MAX: usize = 256;

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
    let (queue, rx) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(KV_QUEUE_MAX);
    tokio::spawn(committer(store, rx, cfg.metrics.clone()));
    tracing::info!(listen = %cfg.listen, "kv node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let queue = queue.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if queue.send((req, tx)).await.is_err() {
                return stopped();
            }
            rx.await.unwrap_or_else(|_| stopped())
        }
        .boxed()
    });
    rpc::serve(cfg.listen, handler).await?;
    Ok(())
}

fn stopped() -> Response {
    Response::Error {
        code: ErrorCode::Unavailable,
        detail: "kv committer stopped".into(),
    }
}

/// Takes batches off the queue, applies each with one fsync, then answers it.
async fn committer(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<(Request, oneshot::Sender<Response>)>,
    metrics: Arc<Metrics>,
) {
    while let Some(first) = rx.recv().await {
        let mut reqs = vec![first.0];
        let mut replies = vec![first.1];
        while reqs.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok((req, reply)) => {
                    reqs.push(req);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        for r in &reqs {
            let op: &'static str = r.into();
            metrics.kv_requests.get_or_create(&OpLabel { op }).inc();
        }
        metrics.kv_batch_requests.observe(reqs.len() as f64);
        let syncs_before = store.syncs();
        let batch_store = store.clone();
        let answers = blocking(move || batch_store.apply_batch(reqs)).await;
        metrics
            .kv_fsyncs
            .inc_by(store.syncs().saturating_sub(syncs_before));
        for (answer, reply) in answers.into_iter().zip(replies) {
            // A caller that gave up is gone; its write stays (it retries idempotently).
            let _ = reply.send(answer);
        }
    }
}

/// Runs storage work (fsync blocks) off the async workers; inline in the simulation, where
/// the disk is memory and there are no threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    #[cfg(not(madsim))]
    {
        tokio::task::spawn_blocking(f)
            .await
            .expect("kv storage work panicked")
    }
    #[cfg(madsim)]
    {
        f()
    }
}
