//! The push node shell: answers `Notify` by marking and sending one notification per device.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;

use super::{Notification, PushProvider, PREVIEW_CHARS_MAX};
use crate::cluster::Peers;
use crate::proto::client::{ChatMessage, ErrorCode};
use crate::proto::internal::{Request, Response};
use crate::proto::Id;
use crate::rpc::RpcError;

pub struct PushConfig {
    pub listen: SocketAddr,
    pub peers: Arc<Peers>,
    pub provider: Arc<dyn PushProvider>,
}

pub async fn run(cfg: PushConfig) -> anyhow::Result<()> {
    tracing::info!(listen = %cfg.listen, "push node up");
    let peers = cfg.peers.clone();
    let provider = cfg.provider.clone();
    let handler: crate::rpc::Handler = Arc::new(move |req| {
        let peers = peers.clone();
        let provider = provider.clone();
        async move {
            match req {
                Request::Notify { message, users } => {
                    match notify(&peers, provider.as_ref(), &message, &users).await {
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
    crate::rpc::serve(cfg.listen, handler).await?;
    Ok(())
}

/// Notifies every device of every user once. Users are independent: one user's kv shard being
/// down does not hold back the others; the error is returned so the caller retries (the
/// (message, device) marks make a retry safe).
async fn notify(
    peers: &Peers,
    provider: &dyn PushProvider,
    message: &ChatMessage,
    users: &[Id],
) -> Result<(), RpcError> {
    let mut first_err = None;
    for &user in users {
        if let Err(e) = notify_user(peers, provider, message, user).await {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

async fn notify_user(
    peers: &Peers,
    provider: &dyn PushProvider,
    message: &ChatMessage,
    user: Id,
) -> Result<(), RpcError> {
    let kv = peers.kv_for_user(user);
    let devices = match kv.call(Request::GetUser { user }).await? {
        Response::User(Some(u)) => u.devices,
        _ => return Ok(()),
    };
    for device in devices {
        let mark = Request::MarkPushed {
            message_id: message.message_id,
            device,
        };
        // Mark first: a crash between mark and send loses one notification rather than
        // sending it twice (push is best-effort; the message itself is in the channel log).
        if kv.call(mark).await? != Response::Bool(true) {
            continue;
        }
        let n = Notification {
            user,
            device,
            channel: message.channel,
            message_id: message.message_id,
            sender: message.sender,
            preview: message.text.chars().take(PREVIEW_CHARS_MAX).collect(),
        };
        if let Err(e) = provider.notify(n).await {
            tracing::warn!(user, device, error = %e, "push provider failed");
        }
    }
    Ok(())
}
