//! After a commit: deliver to every online device of every member (through the chat server
//! that holds it, found in the kv session registry), and ask the push node to notify members
//! with no online device.
//!
//! Best effort by design: a device that misses a live delivery finds the message by its
//! cursor (gap detection, reconnect sync). It does not retry a failed delivery, and a crash
//! of this server between commit and fanout skips the push (noted in docs/ARCHITECTURE.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::server::ChatState;
use crate::canary::Canary;
use crate::proto::client::{PresenceStatus, ServerFrame};
use crate::proto::internal::{Request, Response, SessionEntry};
use crate::proto::Id;

use super::send::Committed;

/// Delivers a committed message to members' online devices, then pushes to offline members.
pub async fn fanout(state: Arc<ChatState>, c: Committed) {
    let peers = state.peers().clone();
    let sessions = sessions_of(&state, &c.members).await;
    let mut by_server: BTreeMap<u32, Vec<Id>> = BTreeMap::new();
    for s in sessions {
        if s.device != c.message.sender_device {
            by_server.entry(s.server).or_default().push(s.device);
        }
    }
    let me = state.cfg.server;
    let calls = by_server.into_iter().map(|(server, devices)| {
        let state = state.clone();
        let peers = peers.clone();
        let message = c.message.clone();
        async move {
            if server == me {
                state.deliver_local(&devices, &ServerFrame::Message(message));
                return;
            }
            if peers.chat_server(server).is_none() {
                let _ = peers.refresh_chat_servers().await;
            }
            let Some(peer) = peers.chat_server(server) else {
                tracing::debug!(server, "no such chat server; devices will sync");
                return;
            };
            if let Err(e) = peer.call(Request::Deliver { devices, message }).await {
                tracing::debug!(server, error = %e, "deliver failed; devices will sync");
            }
        }
    });
    futures::future::join_all(calls).await;
    push_offline(&state, &c).await;
}

/// Session entries of `users`, one kv call per shard.
async fn sessions_of(state: &ChatState, users: &[Id]) -> Vec<SessionEntry> {
    let peers = state.peers();
    let mut out = Vec::new();
    for (shard, users) in peers.users_by_shard(users) {
        match peers
            .kv_shard(shard)
            .call(Request::GetSessions { users })
            .await
        {
            Ok(Response::Sessions(s)) => out.extend(s),
            Ok(_) => {}
            Err(e) => tracing::debug!(shard, error = %e, "session lookup failed"),
        }
    }
    out
}

async fn push_offline(state: &ChatState, c: &Committed) {
    let peers = state.peers();
    let recipients: Vec<Id> = c
        .members
        .iter()
        .copied()
        .filter(|u| *u != c.message.sender)
        .collect();
    if recipients.is_empty() {
        return;
    }
    let offline: Vec<Id> = if peers.canaries.is_on(Canary::PushToOnline) {
        recipients
    } else {
        match peers
            .presence
            .call(Request::PresenceOf { users: recipients })
            .await
        {
            Ok(Response::Presence(list)) => list
                .into_iter()
                .filter(|(_, s, _)| *s == PresenceStatus::Offline)
                .map(|(u, _, _)| u)
                .collect(),
            // Presence unknown: do not push (a missed push is better than pushing online users).
            _ => return,
        }
    };
    if offline.is_empty() {
        return;
    }
    for attempt in 1..=PUSH_ATTEMPTS {
        let req = Request::Notify {
            message: c.message.clone(),
            users: offline.clone(),
        };
        match peers.push.call(req).await {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(attempt, error = %e, "push request failed; retrying");
                tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
            }
        }
    }
    tracing::warn!(message = c.message.message_id, "push given up");
}

/// Attempts to hand a notification request to the push node (1 s, 2 s, ... apart). Retries
/// are safe: the push node marks each (message, device) before notifying.
const PUSH_ATTEMPTS: u32 = 6;
