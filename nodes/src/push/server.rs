//! The push node shell: answers `Notify` by marking and sending one notification per device.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;

use super::{Notification, PushError, PushProvider, PREVIEW_CHARS_MAX};
use crate::canary::Canary;
use crate::clock::unix_ms;
use crate::cluster::Peers;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::proto::client::{ChatMessage, ErrorCode};
use crate::proto::internal::{Request, Response};
use crate::proto::Id;
use crate::rpc::RpcError;

pub struct PushConfig {
    pub listen: SocketAddr,
    pub peers: Arc<Peers>,
    pub provider: Arc<dyn PushProvider>,
    pub metrics: Arc<Metrics>,
}

/// Counts each notification's outcome, then passes it on.
struct Counted {
    inner: Arc<dyn PushProvider>,
    metrics: Arc<Metrics>,
}

impl PushProvider for Counted {
    fn notify(
        &self,
        n: super::Notification,
    ) -> futures::future::BoxFuture<'static, Result<(), super::PushError>> {
        let sent = self.inner.notify(n);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = sent.await;
            let outcome = match &r {
                Ok(()) => "sent",
                Err(super::PushError::Refused(_)) => "refused",
                Err(super::PushError::Unreachable(_)) => "unreachable",
            };
            metrics
                .pushes
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            r
        })
    }
}

pub async fn run(cfg: PushConfig) -> anyhow::Result<()> {
    cfg.peers.spawn_membership(Some(cfg.listen));
    tracing::info!(listen = %cfg.listen, "push node up");
    let claims = Arc::new(ClaimIds::new());
    let peers = cfg.peers.clone();
    let provider: Arc<dyn PushProvider> = Arc::new(Counted {
        inner: cfg.provider.clone(),
        metrics: cfg.metrics.clone(),
    });
    let handler: crate::rpc::Handler = Arc::new(move |req| {
        let peers = peers.clone();
        let provider = provider.clone();
        let claims = claims.clone();
        async move {
            match req {
                Request::Notify { message, users } => {
                    let claim = claims.next();
                    match notify(&peers, provider.as_ref(), &message, &users, claim).await {
                        Ok(()) => Response::Ok,
                        Err(e) => Response::Error {
                            code: e.code(),
                            detail: e.to_string(),
                        },
                    }
                }
                other => Response::Error {
                    code: ErrorCode::BadRequest,
                    detail: format!("push does not serve {other:?}"),
                },
            }
        }
        .boxed()
    });
    crate::rpc::serve(cfg.listen, handler, cfg.peers.tls.clone()).await?;
    Ok(())
}

/// Users of one request notified at once. A group message can name ~100 offline users, each
/// several kv round trips (user, claim, confirm per device): one at a time that outlasts the
/// chat server's call timeout, so the fanout would stay pending and be redone again and again
/// (found by the `peak-hour` workload: deliveries delayed ~90 s behind such fanouts).
const USERS_IN_FLIGHT: usize = 32;

/// Notifies every device of every user once. Users are independent: one user's kv shard being
/// down does not hold back the others; the error is returned so the caller retries (the
/// (message, device) marks make a retry safe).
async fn notify(
    peers: &Peers,
    provider: &dyn PushProvider,
    message: &ChatMessage,
    users: &[Id],
    claim: u64,
) -> Result<(), RpcError> {
    use futures::{FutureExt, StreamExt};
    // Boxed: a stream of plain async calls over borrowed arguments fails rustc's
    // higher-ranked `Send` check in the spawned handler.
    let calls: Vec<futures::future::BoxFuture<'_, Result<(), RpcError>>> = users
        .iter()
        .map(|&user| notify_user(peers, provider, message, user, claim).boxed())
        .collect();
    let results: Vec<Result<(), RpcError>> = futures::stream::iter(calls)
        .buffered(USERS_IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

async fn notify_user(
    peers: &Peers,
    provider: &dyn PushProvider,
    message: &ChatMessage,
    user: Id,
    claim: u64,
) -> Result<(), RpcError> {
    let kv = peers.kv_for_user(user);
    let (devices, mut targets) = match kv.call(Request::GetUser { user }).await? {
        Response::User(Some(u)) => (u.devices, u.push_targets),
        _ => return Ok(()),
    };
    let mut first_err = None;
    for device in devices {
        let req = Request::ClaimPush {
            message_id: message.message_id,
            device,
            claim,
            now_ms: unix_ms(),
        };
        // Claim first: two pushes of one message never run at once, and a device notified
        // once is never notified again. A claimer that dies before notifying holds the claim
        // only `PUSH_CLAIM_TTL_MS`; the caller's retry (or a sweep) then takes it over.
        match call_with_retries(peers, user, req).await {
            Ok(Response::Bool(true)) => {}
            Ok(Response::Bool(false)) if peers.canaries.is_on(Canary::PushIgnoresClaim) => {}
            Ok(Response::Bool(false)) => continue,
            Ok(other) => {
                tracing::warn!(?other, "unexpected claim answer");
                continue;
            }
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        }
        let n = Notification {
            user,
            device,
            channel: message.channel,
            message_id: message.message_id,
            sender: message.sender,
            preview: message.text.chars().take(PREVIEW_CHARS_MAX).collect(),
            target: targets.remove(&device),
        };
        match provider.notify(n).await {
            Ok(()) => {}
            // The platform answered no (token gone, malformed request): a retry gets the same
            // answer, so the device counts as done (confirmed below) instead of failing the
            // whole request again and again.
            Err(e @ PushError::Refused(_)) => {
                tracing::warn!(user, device, error = %e, "push refused, not retried");
            }
            Err(e @ PushError::Unreachable(_)) => {
                // Not confirmed: the claim lapses and a retry notifies again.
                tracing::warn!(user, device, error = %e, "push provider failed");
                first_err.get_or_insert(RpcError::Remote {
                    code: ErrorCode::Unavailable,
                    detail: format!("push provider: {e}"),
                });
                continue;
            }
        }
        let confirm = Request::ConfirmPush {
            message_id: message.message_id,
            device,
        };
        // Sent either way. An unconfirmed claim lapses and a retry of the whole request (when
        // another device failed) would notify again, so the confirm keeps being retried in the
        // background for as long as the claim holds.
        if let Err(e) = call_with_retries(peers, user, confirm.clone()).await {
            tracing::warn!(user, device, error = %e, "push sent but not confirmed yet");
            let kv = peers.kv_for_user(user).clone();
            tokio::spawn(async move {
                let tries = crate::kv::store::PUSH_CLAIM_TTL_MS / 1000;
                for _ in 0..tries {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    if kv.call(confirm.clone()).await.is_ok() {
                        return;
                    }
                }
                tracing::warn!(user, device, "push confirm never landed");
            });
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Claim ids of one push node process: a random base (its low 20 bits clear) above a counter,
/// so they are unique across requests, restarts and push nodes. One claim per `Notify`
/// request: a retried claim call within the request is recognised as the same claimer. (The
/// base was the start time in ms: two push nodes started in the same millisecond shared
/// their claim ids, each took the other's claims as its own, and both notified the same
/// devices: swarm seed 80014.)
struct ClaimIds {
    base: u64,
    next: std::sync::atomic::AtomicU64,
}

impl ClaimIds {
    fn new() -> Self {
        use rand::Rng;
        Self {
            base: crate::net::node_rng().gen::<u64>() & !0xf_ffff,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.base | (n & 0xf_ffff)
    }
}

/// Claim and confirm calls are retried a few times (the same request: both are idempotent
/// for their claimer) before the error goes back to the caller.
async fn call_with_retries(peers: &Peers, user: Id, req: Request) -> Result<Response, RpcError> {
    let mut last = None;
    for attempt in 0..KV_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        match peers.kv_for_user(user).call(req.clone()).await {
            Ok(r) => return Ok(r),
            // kv answered: retrying the same request gets the same answer.
            Err(e @ RpcError::Remote { .. }) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Attempts per claim or confirm call.
const KV_ATTEMPTS: u32 = 3;
