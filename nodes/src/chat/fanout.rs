//! After a commit: deliver to every online device of every member (through the chat server
//! that holds it, found in the kv session registry), and ask the push node to notify members
//! with no online device.
//!
//! Live delivery is best effort: a device that misses it finds the message by its cursor
//! (gap detection, reconnect sync). The fanout as a whole is durable: kv keeps a pending
//! record from the commit until `FanoutDone`, and [`sweep`] redoes fanouts that a crashed
//! server left unfinished. Redoing is safe: devices drop seqs they have, and the push node
//! marks each (message, device) before notifying.

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
/// The pending record is removed only when every step succeeded: a session lookup or a
/// delivery that failed (a kv shard down, a chat server cut off) leaves it for a sweep, since
/// a device that missed the last message of a channel has no gap to notice it by.
pub async fn fanout(state: Arc<ChatState>, c: Committed) {
    let peers = state.peers().clone();
    let (sessions, looked_up) = sessions_of(&state, &c.members).await;
    let mut by_server: BTreeMap<u32, Vec<Id>> = BTreeMap::new();
    for s in sessions {
        if s.device != c.message.sender_device {
            by_server.entry(s.server).or_default().push(s.device);
        }
    }
    tracing::debug!(
        channel = c.message.channel,
        seq = c.message.seq,
        targets = ?by_server,
        "fanout"
    );
    let me = state.cfg.server;
    let calls = by_server.into_iter().map(|(server, devices)| {
        let state = state.clone();
        let peers = peers.clone();
        let message = c.message.clone();
        async move {
            if server == me {
                state.deliver_local(&devices, &ServerFrame::Message(message));
                return true;
            }
            if peers.chat_server(server).is_none() {
                let _ = peers.refresh_chat_servers().await;
            }
            let Some(peer) = peers.chat_server(server) else {
                // Not in discovery's list: dead (its devices reconnect and sync, and their
                // registry entries move), or alive but briefly unlisted (discovery restarting,
                // a short partition). Only a later redo can tell: leave it pending.
                tracing::debug!(server, "no such chat server now; a sweep will redo it");
                return false;
            };
            match peer.call(Request::Deliver { devices, message }).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(server, error = %e, "deliver failed; a sweep will redo it");
                    false
                }
            }
        }
    });
    let delivered = futures::future::join_all(calls)
        .await
        .into_iter()
        .all(|ok| ok);
    let pushed = push_offline(&state, &c, delivered && looked_up).await;
    // Recorded by the push node, or to record here.
    if pushed == Pushed::Done && delivered && looked_up {
        let done = Request::FanoutDone {
            channel: c.message.channel,
            seq: c.message.seq,
        };
        if let Err(e) = peers.kv_for_channel(c.message.channel).call(done).await {
            tracing::debug!(error = %e, "fanout done not recorded; a sweep will redo it");
        }
    }
}

/// A pending fanout older than this is presumed abandoned by a crashed server and redone.
pub const ABANDONED_AFTER_MS: u64 = 10_000;
/// A pending fanout still undelivered this long after its send is given up (see `sweep`).
pub const FANOUT_GIVE_UP_MS: u64 = 10 * 60_000;
/// Pending fanouts taken per kv shard per sweep.
const SWEEP_BATCH_MAX: u32 = 100;

/// Redoes abandoned fanouts of the kv shards this server is responsible for: shard `s` is
/// swept by the live chat server at position `s % live` in discovery's list, so each shard has
/// one sweeper while the list is stable (two at worst while it changes: harmless).
pub async fn sweep(state: Arc<ChatState>) {
    let peers = state.peers().clone();
    let live: Vec<u32> = peers.chat_servers().into_iter().map(|(s, _)| s).collect();
    let Some(me) = live.iter().position(|s| *s == state.cfg.server) else {
        return;
    };
    let cutoff = crate::clock::unix_ms().saturating_sub(ABANDONED_AFTER_MS);
    for shard in (0..peers.kv_shards()).filter(|s| s % live.len() == me) {
        let req = Request::PendingFanouts {
            committed_before_ms: cutoff,
            limit: SWEEP_BATCH_MAX,
        };
        let Ok(Response::Pending(list)) = peers.kv_shard(shard).call(req).await else {
            continue;
        };
        for (message, members) in list {
            tracing::info!(
                channel = message.channel,
                seq = message.seq,
                "redoing an abandoned fanout"
            );
            let (channel, seq, sent_at_ms) = (message.channel, message.seq, message.sent_at_ms);
            let c = Committed {
                message,
                members,
                duplicate: true,
            };
            fanout(state.clone(), c).await;
            // A registry entry of a server that never came back would keep a fanout pending
            // forever: past this age the devices concerned have reconnected (and synced) or
            // are offline (and sync when they return).
            if crate::clock::unix_ms().saturating_sub(sent_at_ms) > FANOUT_GIVE_UP_MS {
                tracing::warn!(channel, seq, "giving up an undeliverable fanout");
                let done = Request::FanoutDone { channel, seq };
                let _ = peers.kv_for_channel(channel).call(done).await;
            }
        }
    }
}

/// Session entries of `users`, one kv call per shard; false if some shard did not answer.
async fn sessions_of(state: &ChatState, users: &[Id]) -> (Vec<SessionEntry>, bool) {
    let peers = state.peers();
    let mut out = Vec::new();
    let mut complete = true;
    for (shard, users) in peers.users_by_shard(users) {
        match peers
            .kv_shard(shard)
            .call(Request::GetSessions { users })
            .await
        {
            Ok(Response::Sessions(s)) => out.extend(s),
            Ok(_) => {}
            Err(e) => {
                complete = false;
                tracing::debug!(shard, error = %e, "session lookup failed");
            }
        }
    }
    (out, complete)
}

/// What `push_offline` got done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushed {
    /// Every offline member's devices were handled (or there were none).
    Done,
    /// Done, and the push node recorded the fanout done with its claims (one kv write fewer).
    DoneAndRecorded,
    /// Presence or the push node could not do it now: the fanout stays pending.
    NotDone,
}

/// Asks the push node to notify offline members. With `record_done` (every online device was
/// reached), the push node also records the fanout done in the same kv write as its claims'
/// confirmation.
async fn push_offline(state: &ChatState, c: &Committed, record_done: bool) -> Pushed {
    let peers = state.peers();
    let recipients: Vec<Id> = c
        .members
        .iter()
        .copied()
        .filter(|u| *u != c.message.sender)
        .collect();
    if recipients.is_empty() {
        return Pushed::Done;
    }
    let offline: Vec<Id> = if peers.canaries.is_on(Canary::PushToOnline) {
        recipients
    } else {
        match peers.presence_of(recipients).await {
            Ok(list) => list
                .into_iter()
                .filter(|(_, s, _)| *s == PresenceStatus::Offline)
                .map(|(u, _, _)| u)
                .collect(),
            // Presence unknown: do not push now (a push to an online user is worse than a
            // late one); the pending fanout is redone by a sweep.
            other => {
                tracing::debug!(
                    message = c.message.message_id,
                    ?other,
                    "presence unknown; push later"
                );
                return Pushed::NotDone;
            }
        }
    };
    tracing::debug!(
        message = c.message.message_id,
        ?offline,
        "push to offline members"
    );
    if offline.is_empty() {
        return Pushed::Done;
    }
    for attempt in 1..=PUSH_ATTEMPTS {
        let req = Request::Notify {
            message: c.message.clone(),
            users: offline.clone(),
            fanout_done: record_done,
        };
        // Any push node serves any request: the healthy ones first, round robin.
        let node = peers.push_health.order(tokio::time::Instant::now())[0];
        match peers.push(node).call(req).await {
            Ok(Response::Ok) => {
                peers.push_health.succeeded(node);
                return Pushed::Done;
            }
            Ok(Response::Bool(true)) => {
                peers.push_health.succeeded(node);
                return Pushed::DoneAndRecorded;
            }
            Ok(other) => {
                // The push node answered but not every device was handled (its kv shard
                // down, a claim held elsewhere): not done; retry, then leave it to a sweep.
                tracing::debug!(attempt, answer = ?other, "push incomplete; retrying");
                tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
            }
            Err(e) => {
                // Unreachable or silent: the next attempt goes to another node.
                peers.push_health.failed(node, tokio::time::Instant::now());
                tracing::debug!(attempt, error = %e, "push request failed; retrying");
                tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
            }
        }
    }
    tracing::warn!(
        message = c.message.message_id,
        "push not reached; a sweep will retry"
    );
    Pushed::NotDone
}

/// Attempts to hand a notification request to the push node (1 s, 2 s apart: done within
/// `ABANDONED_AFTER_MS`, after which a sweep takes over). Retries are safe: the push node
/// marks each (message, device) before notifying.
const PUSH_ATTEMPTS: u32 = 3;
