//! The idgen node shell: one [`Snowflake`] behind a std mutex, answering `NextId`, and a lease
//! loop that keeps time reserved ahead in kv (shard 0) so that a restart never reissues ids.
//!
//! Until the first lease is stored the node answers `unavailable`; the chat server then tries
//! the other idgen node. A kv outage shorter than `LEASE_AHEAD` does not stop it.
//!
//! Its worker id is the config's, or, when the cluster coordinates on etcd, one leased there
//! (`coord::worker`): the node answers `unavailable` from when it could not renew that lease
//! for `WORKER_VALID_MS` until it holds an id again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;

use super::Snowflake;
use crate::canary::Canary;
use crate::clock::Clock;
use crate::cluster::Peers;
use crate::metrics::Metrics;
use crate::proto::client::ErrorCode;
use crate::proto::internal::{Request, Response};
use crate::rpc;

pub struct IdgenConfig {
    pub listen: SocketAddr,
    pub worker: u16,
    pub clock: Arc<dyn Clock>,
    /// For the time lease in kv.
    pub peers: Arc<Peers>,
    pub metrics: Arc<Metrics>,
}

/// How far ahead of the last issued id (or the clock) time is leased.
const LEASE_AHEAD_MS: u64 = 10_000;
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// The generator and when it must stop issuing.
struct Issuer {
    gen: Snowflake,
    /// The worker id is held until this instant (etcd lease); None: for good (static id).
    valid_until: Option<tokio::time::Instant>,
}

pub async fn run(cfg: IdgenConfig) -> anyhow::Result<()> {
    cfg.peers.spawn_membership(Some(cfg.listen));
    let follow_clock = cfg.peers.canaries.is_on(Canary::IdgenIgnoresClock);
    let mut gen = Snowflake::new(cfg.worker);
    gen.set_follow_clock(follow_clock);
    gen.set_reserved(0); // Nothing may be issued before the first lease.
                         // A std mutex: `next` is synchronous and never held across an await.
    let issuer = Arc::new(Mutex::new(Issuer {
        gen,
        valid_until: None,
    }));
    tokio::spawn(lease_loop(
        cfg.worker,
        cfg.listen,
        cfg.clock.clone(),
        cfg.peers.clone(),
        issuer.clone(),
        cfg.metrics.clone(),
    ));
    let clock = cfg.clock.clone();
    let metrics = cfg.metrics.clone();
    tracing::info!(listen = %cfg.listen, worker = cfg.worker, "idgen node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let resp = match req {
            Request::NextId { after } => {
                let now = clock.now_ms();
                let mut i = issuer.lock().unwrap_or_else(|p| p.into_inner());
                let held = i
                    .valid_until
                    .is_none_or(|t| tokio::time::Instant::now() < t);
                match held.then(|| i.gen.try_next(now, after)).flatten() {
                    Some(id) => {
                        metrics.ids_issued.inc();
                        Response::Id(id)
                    }
                    None if !held => Response::Error {
                        code: ErrorCode::Unavailable,
                        detail: "idgen worker lease not renewed".into(),
                    },
                    None => Response::Error {
                        code: ErrorCode::Unavailable,
                        detail: "idgen time lease not held yet".into(),
                    },
                }
            }
            other => Response::Error {
                code: ErrorCode::BadRequest,
                detail: format!("idgen does not serve {other:?}"),
            },
        };
        async move { resp }.boxed()
    });
    rpc::serve(cfg.listen, handler, cfg.peers.tls.clone()).await?;
    Ok(())
}

/// Holds a worker id (from the config, or leased from etcd), keeps time reserved ahead in kv
/// for it, and starts over with a fresh claim if the etcd lease is lost.
async fn lease_loop(
    preferred: u16,
    listen: SocketAddr,
    clock: Arc<dyn Clock>,
    peers: Arc<Peers>,
    issuer: Arc<Mutex<Issuer>>,
    metrics: Arc<Metrics>,
) {
    #[cfg(feature = "etcd")]
    if let Some(etcd) = peers.etcd() {
        use crate::coord::worker::{self, Renewal};
        use rand::Rng;
        let owner = format!("{listen} {:016x}", crate::net::node_rng().gen::<u64>());
        let shared = peers.canaries.is_on(Canary::IdgenSharedWorker);
        let mut previous = None;
        loop {
            let mut held = match worker::claim(&etcd, previous, preferred, &owner, shared).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "no idgen worker id yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            tracing::info!(worker = held.worker, "idgen worker id leased from etcd");
            previous = Some(held.worker);
            issuer.lock().unwrap_or_else(|p| p.into_inner()).valid_until = Some(held.valid_until);
            let mut time = TimeLease::new(held.worker);
            loop {
                time.renew_if_due(&clock, &peers, &issuer).await;
                tokio::time::sleep(worker::WORKER_RENEW).await;
                match worker::renew(&etcd, &mut held).await {
                    Renewal::Renewed => {
                        issuer.lock().unwrap_or_else(|p| p.into_inner()).valid_until =
                            Some(held.valid_until);
                    }
                    Renewal::Lost => break,
                    Renewal::Unknown if tokio::time::Instant::now() >= held.valid_until => break,
                    Renewal::Unknown => {}
                }
            }
            // Stop now: the id may be someone else's from here on.
            issuer.lock().unwrap_or_else(|p| p.into_inner()).valid_until =
                Some(tokio::time::Instant::now());
            metrics.idgen_worker_losses.inc();
            tracing::warn!(
                worker = held.worker,
                "idgen worker lease lost; claiming again"
            );
        }
    }
    let _ = (listen, &metrics);
    let mut time = TimeLease::new(preferred);
    loop {
        time.renew_if_due(&clock, &peers, &issuer).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The time reserved ahead in kv for one worker id.
struct TimeLease {
    worker: u16,
    started: bool,
    next_at: tokio::time::Instant,
}

impl TimeLease {
    fn new(worker: u16) -> Self {
        Self {
            worker,
            started: false,
            next_at: tokio::time::Instant::now(),
        }
    }

    /// Takes the first lease (restarting the generator above the previous owner's last
    /// one), then renews it every `RENEW_EVERY`; before the first, every call tries.
    async fn renew_if_due(
        &mut self,
        clock: &Arc<dyn Clock>,
        peers: &Arc<Peers>,
        issuer: &Arc<Mutex<Issuer>>,
    ) {
        if self.started && tokio::time::Instant::now() < self.next_at {
            return;
        }
        let worker = self.worker;
        let base = {
            let i = issuer.lock().unwrap_or_else(|p| p.into_inner());
            let high = if i.gen.worker() == worker {
                i.gen.high_water_ms()
            } else {
                0
            };
            clock.now_ms().max(high)
        };
        let until_ms = base + LEASE_AHEAD_MS;
        let req = Request::LeaseIdTime { worker, until_ms };
        match peers.kv_counters().call(req).await {
            Ok(Response::Id(previous)) => {
                let mut i = issuer.lock().unwrap_or_else(|p| p.into_inner());
                if !self.started {
                    // Every id issued under this worker id before is at or below `previous`.
                    let mut fresh = Snowflake::with_floor(worker, previous.max(clock.now_ms()));
                    fresh.set_reserved(previous.max(until_ms));
                    fresh.set_follow_clock(peers.canaries.is_on(Canary::IdgenIgnoresClock));
                    i.gen = fresh;
                    self.started = true;
                } else {
                    i.gen.set_reserved(until_ms.max(previous));
                }
                self.next_at = tokio::time::Instant::now() + RENEW_EVERY;
            }
            Ok(other) => tracing::warn!(?other, "unexpected lease answer"),
            Err(e) => tracing::debug!(error = %e, "idgen lease renewal failed"),
        }
    }
}
