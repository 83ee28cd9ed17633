//! The commit path: the one place a send becomes a committed message.
//!
//! Take an id from idgen, ask the channel's kv shard to append. kv decides the channel order
//! (`seq`) and refuses an id not above the channel's last one (a lagging idgen clock); then
//! we ask idgen for an id above that and try again. Only a committed message is acknowledged.

use std::time::Duration;

use crate::canary::Canary;
use crate::clock::unix_ms;
use crate::cluster::Peers;
use crate::limits::COMMIT_ID_RETRIES_MAX;
use crate::proto::client::{ChatMessage, ErrorCode};
use crate::proto::internal::{AppendOutcome, AppendRequest, Request, Response};
use crate::proto::Id;
use crate::rpc::RpcError;

/// A committed message and who is in its channel.
#[derive(Debug, Clone)]
pub struct Committed {
    pub message: ChatMessage,
    pub members: Vec<Id>,
    /// The send was a retry of a message committed before.
    pub duplicate: bool,
}

/// Why a send was not committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub detail: String,
}

impl From<RpcError> for Refusal {
    fn from(e: RpcError) -> Self {
        tracing::debug!(error = %e, "refused for an internal failure");
        Refusal {
            code: e.code(),
            detail: e.public_detail(),
        }
    }
}

pub struct SendRequest {
    pub user: Id,
    pub device: Id,
    pub channel: Id,
    pub client_msg_id: Id,
    pub text: String,
}

/// Rounds over all idgen nodes before a send is refused `unavailable`, 100 ms apart (covers an
/// idgen that is starting and has not taken its time lease yet).
const IDGEN_ROUNDS: u32 = 3;
/// Deadline of one attempt in the first round. An id is one in-memory step away, so a node
/// that has not answered by then is down, paused or cut off: the next node is tried, and the
/// silent one ejected (`health`). Later rounds wait the whole RPC deadline, for when every
/// node is merely slow (a latency fault).
pub const IDGEN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Asks idgen for an id above `after`: the healthy nodes first, round robin, a few rounds.
/// A node that fails or stays silent is ejected for a while, so the sends after it go
/// straight to a live node instead of each waiting out a deadline on the dead one.
pub async fn next_id(peers: &Peers, after: Option<Id>) -> Result<Id, RpcError> {
    let mut last_err = None;
    for round in 0..IDGEN_ROUNDS {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = if round == 0 {
            IDGEN_ATTEMPT_TIMEOUT
        } else {
            crate::rpc::CALL_TIMEOUT
        };
        let now = tokio::time::Instant::now();
        for i in peers.idgen_health.order(now) {
            let r = peers
                .idgen(i)
                .call_timeout(Request::NextId { after }, deadline)
                .await;
            match r {
                Ok(Response::Id(id)) => {
                    peers.idgen_health.succeeded(i);
                    return Ok(id);
                }
                Ok(other) => last_err = Some(RpcError::Unexpected(format!("{other:?}"))),
                Err(e) => last_err = Some(e),
            }
            peers.idgen_health.failed(i, tokio::time::Instant::now());
        }
    }
    Err(last_err.expect("at least one idgen node was tried"))
}

/// Commits `req` durably, or says why not.
pub async fn commit(peers: &Peers, req: SendRequest) -> Result<Committed, Refusal> {
    let kv = peers.kv_for_channel(req.channel);
    let mut after = None;
    let sent_at_ms = unix_ms();
    for _ in 0..COMMIT_ID_RETRIES_MAX {
        let message_id = next_id(peers, after).await?;
        let append = AppendRequest {
            channel: req.channel,
            sender: req.user,
            sender_device: req.device,
            client_msg_id: req.client_msg_id,
            message_id,
            text: req.text.clone(),
            sent_at_ms,
            skip_dedup: peers.canaries.is_on(Canary::NoDedup),
        };
        let outcome = match kv.call(Request::Append(append)).await? {
            Response::Append(o) => o,
            other => return Err(RpcError::Unexpected(format!("{other:?}")).into()),
        };
        match outcome {
            AppendOutcome::Committed {
                seq,
                message_id,
                members,
                duplicate,
                sent_at_ms,
            } => {
                let message = ChatMessage {
                    channel: req.channel,
                    seq,
                    message_id,
                    sender: req.user,
                    sender_device: req.device,
                    client_msg_id: req.client_msg_id,
                    text: req.text,
                    sent_at_ms,
                };
                return Ok(Committed {
                    message,
                    members,
                    duplicate,
                });
            }
            AppendOutcome::StaleId { last_message_id } => after = Some(last_message_id),
            AppendOutcome::Refused { code } => {
                return Err(Refusal {
                    code,
                    detail: format!("channel {}: {}", req.channel, code.as_str()),
                })
            }
        }
    }
    Err(Refusal {
        code: ErrorCode::Unavailable,
        detail: format!("no id above the channel's last after {COMMIT_ID_RETRIES_MAX} tries"),
    })
}

/// Canary `ack-before-persist`: a write-behind server. It reads the channel's last seq, acks
/// with the next one at once, and appends after `WRITE_BEHIND` without retrying. A crash or a
/// kv outage in between loses acknowledged messages; concurrent senders get clashing seqs.
pub async fn commit_write_behind(peers: &Peers, req: SendRequest) -> Result<Committed, Refusal> {
    const WRITE_BEHIND: Duration = Duration::from_millis(300);
    let kv = peers.kv_for_channel(req.channel).clone();
    let (last_seq, members) = match kv
        .call(Request::GetChannel {
            channel: req.channel,
        })
        .await?
    {
        Response::Channel(Some(c)) => (c.last_seq, c.members),
        _ => {
            return Err(Refusal {
                code: ErrorCode::UnknownChannel,
                detail: format!("channel {}", req.channel),
            })
        }
    };
    if !members.contains(&req.user) {
        return Err(Refusal {
            code: ErrorCode::NotAMember,
            detail: format!("channel {}", req.channel),
        });
    }
    let message_id = next_id(peers, None).await?;
    let message = ChatMessage {
        channel: req.channel,
        seq: last_seq + 1,
        message_id,
        sender: req.user,
        sender_device: req.device,
        client_msg_id: req.client_msg_id,
        text: req.text,
        sent_at_ms: unix_ms(),
    };
    let append = AppendRequest {
        channel: message.channel,
        sender: message.sender,
        sender_device: message.sender_device,
        client_msg_id: message.client_msg_id,
        message_id,
        text: message.text.clone(),
        sent_at_ms: message.sent_at_ms,
        skip_dedup: false,
    };
    tokio::spawn(async move {
        tokio::time::sleep(WRITE_BEHIND).await;
        let _ = kv.call(Request::Append(append)).await;
    });
    Ok(Committed {
        message,
        members,
        duplicate: false,
    })
}
