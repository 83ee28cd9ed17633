//! The push node shell: answers `Notify` by marking and sending one notification per device.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;

use super::{Notification, PushError, PushProvider, PREVIEW_CHARS_MAX};
use crate::canary::Canary;
use crate::clock::unix_ms;
use crate::cluster::Peers;
use crate::kv::client::ShardClient;
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
    tokio::spawn(expire_claims(cfg.peers.clone()));
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
                Request::Notify {
                    message,
                    users,
                    fanout_done,
                } => {
                    let claim = claims.next();
                    let job = Job {
                        message: &message,
                        users: &users,
                        claim,
                        fanout_done,
                    };
                    match notify(&peers, provider.as_ref(), job).await {
                        Ok(true) => Response::Bool(true),
                        Ok(false) => Response::Ok,
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

/// Notifications of one request in flight at once. A group message can name ~100 offline
/// users of several devices each; one at a time that outlasts the chat server's call timeout,
/// so the fanout would stay pending and be redone again and again (found by the `peak-hour`
/// workload: deliveries delayed ~90 s behind such fanouts).
const NOTIFY_IN_FLIGHT: usize = 64;

/// No push for a message older than this (by its id's time): its fanout was redone long after
/// it was sent (a crash, a shard down for long); the devices get it when they next connect.
/// It also bounds how long claims must be kept (`PUSH_CLAIMS_KEPT_MS`, 6 h).
pub const PUSH_STALE_MS: u64 = 3_600_000;

/// How often a push node deletes the claims older than `PUSH_CLAIMS_KEPT_MS` on every shard.
/// Any push node may: the deletes are idempotent.
pub const PUSH_CLAIMS_EXPIRY_EVERY_MS: u64 = 600_000;

/// One `Notify`.
struct Job<'a> {
    message: &'a ChatMessage,
    users: &'a [Id],
    /// This request's claim id.
    claim: u64,
    /// Record the message's fanout done with the confirmation, if every device is handled.
    fanout_done: bool,
}

/// Notifies every device of every user once. Per request: one `GetUsers` per kv shard of the
/// users (at once), then per 64 devices one `ClaimPushes` on the message's channel shard, the
/// notifications and one `ConfirmPushes`; the last also records the fanout done when the
/// caller asked (3 kv requests, 2 writes, for a 1:1 message; they were 1 + 2 per device, and
/// the chat server's `FanoutDone`). One shard being down holds back only its users; the error is
/// returned so the caller retries (the claims make a retry safe). True if the fanout was
/// recorded done.
async fn notify(
    peers: &Peers,
    provider: &dyn PushProvider,
    job: Job<'_>,
) -> Result<bool, RpcError> {
    use futures::StreamExt;
    let Job {
        message,
        users,
        claim,
        fanout_done,
    } = job;
    let (sent_ms, _, _) = crate::idgen::decode(message.message_id);
    if unix_ms().saturating_sub(sent_ms) > PUSH_STALE_MS {
        tracing::debug!(message = message.message_id, "stale message: not pushed");
        return Ok(false);
    }
    let mut first_err = None;
    let lookups = peers
        .users_by_shard(users)
        .into_iter()
        .map(|(shard, users)| peers.kv_shard(shard).call(Request::GetUsers { users }));
    let mut targets: BTreeMap<Id, (Id, Option<crate::proto::client::PushTarget>)> = BTreeMap::new();
    for answer in futures::future::join_all(lookups).await {
        match answer {
            Ok(Response::Users(records)) => {
                for mut u in records {
                    for device in u.devices {
                        targets.insert(device, (u.user, u.push_targets.remove(&device)));
                    }
                }
            }
            Ok(other) => tracing::warn!(?other, "unexpected user lookup answer"),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if targets.is_empty() {
        return first_err.map_or(Ok(false), Err);
    }
    // In chunks of NOTIFY_IN_FLIGHT devices, each claimed, notified at once and confirmed
    // before the next is claimed: a claim is exposed for one round of provider calls, well
    // inside `PUSH_CLAIM_TTL_MS` (claiming all 1,980 devices of a group message up front and
    // confirming after the last would leave the first claims open for ~31 rounds of up to a
    // provider timeout each, and a retry could take them over and notify again).
    let devices: Vec<Id> = targets.keys().copied().collect();
    let chunks: Vec<&[Id]> = devices.chunks(NOTIFY_IN_FLIGHT).collect();
    let kv = peers.kv_for_channel(message.channel);
    let preview: String = message.text.chars().take(PREVIEW_CHARS_MAX).collect();
    let mut recorded = false;
    for (i, chunk) in chunks.iter().enumerate() {
        let granted = claim_chunk(peers, kv, message, chunk, claim, &mut first_err).await?;
        let sends = granted.into_iter().map(|device| {
            let (user, target) = targets.remove(&device).unwrap_or((0, None));
            let n = Notification {
                user,
                device,
                channel: message.channel,
                message_id: message.message_id,
                sender: message.sender,
                preview: preview.clone(),
                target,
            };
            provider.notify(n).map(move |r| (user, device, r))
        });
        let outcomes: Vec<_> = futures::stream::iter(sends)
            .buffer_unordered(NOTIFY_IN_FLIGHT)
            .collect()
            .await;
        let mut done = Vec::new();
        for (user, device, outcome) in outcomes {
            match outcome {
                Ok(()) => done.push(device),
                // The platform answered no (token gone, malformed request): a retry gets the
                // same answer, so the device counts as done (confirmed below) instead of
                // failing the whole request again and again.
                Err(e @ PushError::Refused(_)) => {
                    tracing::warn!(user, device, error = %e, "push refused, not retried");
                    done.push(device);
                }
                Err(e @ PushError::Unreachable(_)) => {
                    // Not confirmed: the claim lapses and a retry notifies again.
                    tracing::warn!(user, device, error = %e, "push provider failed");
                    first_err.get_or_insert(RpcError::Remote {
                        code: ErrorCode::Unavailable,
                        detail: format!("push provider: {e}"),
                    });
                }
            }
        }
        // The fanout ends with the last chunk's confirmation, if nothing failed.
        let last = i + 1 == chunks.len();
        let pending =
            (last && fanout_done && first_err.is_none()).then_some((message.channel, message.seq));
        if !done.is_empty() || pending.is_some() {
            done.sort_unstable();
            let confirm = Request::ConfirmPushes {
                message_id: message.message_id,
                devices: done,
                fanout_done: pending,
            };
            recorded = confirm_pushes(kv, confirm).await && pending.is_some();
        }
    }
    first_err.map_or(Ok(recorded), Err)
}

/// Claims `chunk` for this request: the devices granted. Devices another live claim holds
/// are left out and noted in `first_err` (the caller retries after the claim lapses).
async fn claim_chunk(
    peers: &Peers,
    kv: &ShardClient,
    message: &ChatMessage,
    chunk: &[Id],
    claim: u64,
    first_err: &mut Option<RpcError>,
) -> Result<Vec<Id>, RpcError> {
    let req = Request::ClaimPushes {
        message_id: message.message_id,
        devices: chunk.to_vec(),
        claim,
        now_ms: unix_ms(),
    };
    match call_with_retries(kv, req).await? {
        Response::PushClaims { .. } if peers.canaries.is_on(Canary::PushIgnoresClaim) => {
            Ok(chunk.to_vec())
        }
        Response::PushClaims { granted, held } => {
            if !held.is_empty() {
                first_err.get_or_insert(RpcError::Remote {
                    code: ErrorCode::Unavailable,
                    detail: format!(
                        "another push holds the claims of {} devices; retry after they lapse",
                        held.len()
                    ),
                });
            }
            Ok(granted)
        }
        other => Err(RpcError::Remote {
            code: ErrorCode::Unavailable,
            detail: format!("unexpected claim answer {other:?}"),
        }),
    }
}

/// Sends a confirmation; true if kv took it. An unconfirmed claim lapses and a retry of the
/// whole request (when another device failed) would notify again, so a confirmation that
/// fails keeps being retried in the background for as long as the claims hold. (If it
/// carried the fanout's end, the caller records that itself: a second removal is harmless.)
async fn confirm_pushes(kv: &ShardClient, confirm: Request) -> bool {
    match call_with_retries(kv, confirm.clone()).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "pushes sent but not confirmed yet");
            let kv = kv.clone();
            tokio::spawn(async move {
                let tries = crate::kv::store::PUSH_CLAIM_TTL_MS / 1000;
                for _ in 0..tries {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    if kv.call(confirm.clone()).await.is_ok() {
                        return;
                    }
                }
                tracing::warn!("push confirm never landed");
            });
            false
        }
    }
}

/// Deletes expired claims on every shard, every [`PUSH_CLAIMS_EXPIRY_EVERY_MS`], for as long
/// as the node runs. A shard that does not answer is tried again next time.
async fn expire_claims(peers: Arc<Peers>) {
    use crate::kv::store::{PUSH_CLAIMS_EXPIRED_PER_CALL, PUSH_CLAIMS_KEPT_MS};
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(
            PUSH_CLAIMS_EXPIRY_EVERY_MS,
        ))
        .await;
        let before_ms = unix_ms().saturating_sub(PUSH_CLAIMS_KEPT_MS);
        for shard in 0..peers.kv_shards() {
            loop {
                match peers
                    .kv_shard(shard)
                    .call(Request::ExpirePushClaims { before_ms })
                    .await
                {
                    Ok(Response::Count(n)) if n as usize >= PUSH_CLAIMS_EXPIRED_PER_CALL => {}
                    Ok(Response::Count(n)) => {
                        tracing::debug!(shard, removed = n, "push claims expired");
                        break;
                    }
                    other => {
                        tracing::debug!(shard, answer = ?other, "push claim expiry failed");
                        break;
                    }
                }
            }
        }
    }
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
async fn call_with_retries(kv: &ShardClient, req: Request) -> Result<Response, RpcError> {
    let mut last = None;
    for attempt in 0..KV_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        match kv.call(req.clone()).await {
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
