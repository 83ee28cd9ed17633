//! The callers' side of kv: one [`ShardClient`] per shard, which finds the shard's leader
//! among its replicas and keeps calling it.
//!
//! A call goes to the replica last seen leading (at first the preferred one). A `NotLeader`
//! answer names the leader if the replica knows one: the call goes there at once. Without a
//! hint, or when the named node just failed, it tries the next replica after a short,
//! doubling pause (20 ms to 200 ms). A connection error or a silent replica (each attempt has
//! a short deadline of its own) moves on to the next replica instead of waiting out the whole
//! call. Everything happens within the call's deadline; after it the caller gets the last
//! error (`unavailable` to a device, which retries).
//!
//! It does not make requests idempotent: a write whose answer was lost may be applied again
//! by a retry. The requests that matter are idempotent by design (sends deduplicate on
//! `client_msg_id`, sessions on their connection number, push claims on their claim).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::internal::{Request, Response};
use crate::rpc::{RpcClient, RpcError, CALL_TIMEOUT};

/// Deadline of one attempt on one replica: a silent (partitioned, paused) replica costs at
/// most this before the next one is tried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);
/// Pauses between attempts when no replica knows a leader (an election is under way).
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// "Unknown" in `leader`.
const UNKNOWN: usize = usize::MAX;

/// Calls one shard. Cheap to clone; clones share the leader they learn.
#[derive(Clone)]
pub struct ShardClient {
    shard: u32,
    /// (node slot, client) of each replica, the preferred leader first.
    replicas: Arc<Vec<(u32, RpcClient)>>,
    /// Index in `replicas` of the replica last seen leading.
    leader: Arc<AtomicUsize>,
    /// Canary `stale-read`: reads go to any replica in turn, not to the leader.
    stale_reads: bool,
    next_stale: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ShardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardClient(shard {})", self.shard)
    }
}

impl ShardClient {
    pub fn new(shard: u32, replicas: Vec<(u32, RpcClient)>, stale_reads: bool) -> Self {
        assert!(!replicas.is_empty(), "a shard has at least one replica");
        Self {
            shard,
            replicas: Arc::new(replicas),
            leader: Arc::new(AtomicUsize::new(UNKNOWN)),
            stale_reads,
            next_stale: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Calls the shard's leader within the default deadline.
    pub async fn call(&self, req: Request) -> Result<Response, RpcError> {
        self.call_within(req, CALL_TIMEOUT).await
    }

    /// Calls the shard's leader, following hints and moving past failed replicas, within
    /// `budget`. `Response::Error` comes back as `RpcError::Remote`, as from [`RpcClient`].
    pub async fn call_within(&self, req: Request, budget: Duration) -> Result<Response, RpcError> {
        let deadline = tokio::time::Instant::now() + budget;
        let n = self.replicas.len();
        let mut at = match self.leader.load(Ordering::Relaxed) {
            UNKNOWN => 0,
            i => i,
        };
        if self.stale_reads && req.is_kv_read() {
            at = self.next_stale.fetch_add(1, Ordering::Relaxed) % n;
        }
        // A replica that failed this call: its hints are not followed back to it.
        let mut failed: Option<usize> = None;
        let mut backoff = BACKOFF_MIN;
        let mut last_err = RpcError::Timeout(self.replicas[at].1.addr());
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(last_err);
            }
            let wrapped = Request::Shard {
                shard: self.shard,
                req: Box::new(req.clone()),
            };
            let client = &self.replicas[at].1;
            match client
                .call_timeout(wrapped, left.min(ATTEMPT_TIMEOUT))
                .await
            {
                Ok(Response::NotLeader { leader }) => {
                    let hinted = leader
                        .and_then(|slot| self.replicas.iter().position(|(s, _)| *s == slot))
                        .filter(|i| *i != at && Some(*i) != failed);
                    last_err = RpcError::Remote {
                        code: crate::proto::client::ErrorCode::Unavailable,
                        detail: format!("shard {} has no leader yet", self.shard),
                    };
                    match hinted {
                        Some(i) => at = i,
                        None => {
                            at = (at + 1) % n;
                            tokio::time::sleep(backoff.min(left)).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                Ok(resp) => {
                    if !(self.stale_reads && req.is_kv_read()) {
                        self.leader.store(at, Ordering::Relaxed);
                    }
                    return Ok(resp);
                }
                Err(e @ RpcError::Remote { .. }) => return Err(e),
                Err(e) => {
                    // Down, unreachable or silent: the next replica, without waiting.
                    let _ = self.leader.compare_exchange(
                        at,
                        UNKNOWN,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    failed = Some(at);
                    last_err = e;
                    at = (at + 1) % n;
                    if n == 1 {
                        tokio::time::sleep(backoff.min(left)).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }
}
