//! The idgen node shell: one [`Snowflake`] behind a std mutex, answering `NextId`, and a lease
//! loop that keeps time reserved ahead in kv (shard 0) so that a restart never reissues ids.
//!
//! Until the first lease is stored the node answers `unavailable`; the chat server then tries
//! the other idgen node. A kv outage shorter than `LEASE_AHEAD` does not stop it.

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

pub async fn run(cfg: IdgenConfig) -> anyhow::Result<()> {
    let follow_clock = cfg.peers.canaries.is_on(Canary::IdgenIgnoresClock);
    let mut gen = Snowflake::new(cfg.worker);
    gen.set_follow_clock(follow_clock);
    gen.set_reserved(0); // Nothing may be issued before the first lease.
                         // A std mutex: `next` is synchronous and never held across an await.
    let gen = Arc::new(Mutex::new(gen));
    tokio::spawn(lease_loop(
        cfg.worker,
        cfg.clock.clone(),
        cfg.peers.clone(),
        gen.clone(),
    ));
    let clock = cfg.clock.clone();
    let metrics = cfg.metrics.clone();
    tracing::info!(listen = %cfg.listen, worker = cfg.worker, "idgen node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let resp = match req {
            Request::NextId { after } => {
                let now = clock.now_ms();
                let mut g = gen.lock().unwrap_or_else(|p| p.into_inner());
                match g.try_next(now, after) {
                    Some(id) => {
                        metrics.ids_issued.inc();
                        Response::Id(id)
                    }
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
    rpc::serve(cfg.listen, handler).await?;
    Ok(())
}

/// Takes the first lease (restarting above the previous one), then renews it.
async fn lease_loop(
    worker: u16,
    clock: Arc<dyn Clock>,
    peers: Arc<Peers>,
    gen: Arc<Mutex<Snowflake>>,
) {
    let mut started = false;
    loop {
        let base = {
            let g = gen.lock().unwrap_or_else(|p| p.into_inner());
            clock.now_ms().max(g.high_water_ms())
        };
        let until_ms = base + LEASE_AHEAD_MS;
        let req = Request::LeaseIdTime { worker, until_ms };
        match peers.kv_counters().call(req).await {
            Ok(Response::Id(previous)) => {
                let mut g = gen.lock().unwrap_or_else(|p| p.into_inner());
                if !started {
                    // Every id issued before the restart is at or below `previous`.
                    let mut fresh = Snowflake::with_floor(worker, previous.max(clock.now_ms()));
                    fresh.set_reserved(previous.max(until_ms));
                    fresh.set_follow_clock(peers.canaries.is_on(Canary::IdgenIgnoresClock));
                    *g = fresh;
                    started = true;
                } else {
                    g.set_reserved(until_ms.max(previous));
                }
            }
            Ok(other) => tracing::warn!(?other, "unexpected lease answer"),
            Err(e) => tracing::debug!(error = %e, "idgen lease renewal failed"),
        }
        let wait = if started {
            RENEW_EVERY
        } else {
            Duration::from_millis(200)
        };
        tokio::time::sleep(wait).await;
    }
}
