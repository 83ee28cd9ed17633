//! The presence node shell: relays heartbeats into [`Presence`], ticks it every second, and
//! publishes each change to the subject's friends through the chat servers that hold their
//! devices (every live chat server gets the change with the observer list and delivers to the
//! devices it holds).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;

use super::{Change, Presence, WARMUP_MS};
use crate::clock::unix_ms;
use crate::cluster::Peers;
use crate::limits::DISCOVERY_LEASE_MS;
use crate::metrics::{Metrics, StateLabel};
use crate::proto::client::{ErrorCode, PresenceStatus};
use crate::proto::internal::{ChatServerInfo, Request, Response};
use crate::proto::Id;
use crate::rpc;

pub struct PresenceConfig {
    pub listen: SocketAddr,
    pub peers: Arc<Peers>,
    pub metrics: Arc<Metrics>,
}

/// How often silent devices are expired.
const TICK: Duration = Duration::from_secs(1);

/// Changes waiting to be published. When the queue is full the change is dropped and logged;
/// observers then correct their view at their next presence query (devices re-query
/// periodically).
const PUBLISH_QUEUE_MAX: usize = 65_536;

/// Changes being published at once (each is a kv read and one call per chat server).
const PUBLISH_IN_FLIGHT_MAX: usize = 256;

pub async fn run(cfg: PresenceConfig) -> anyhow::Result<()> {
    cfg.peers.spawn_membership(Some(cfg.listen));
    let boot_ms = unix_ms();
    // A std mutex: the state machine is synchronous.
    let state = Arc::new(Mutex::new(Presence::new(
        cfg.peers.canaries.clone(),
        unix_ms(),
    )));
    let peers = cfg.peers.clone();
    let subs: Subscribers = Arc::new(Mutex::new(BTreeMap::new()));
    let (tx, rx) = tokio::sync::mpsc::channel::<Change>(PUBLISH_QUEUE_MAX);
    tokio::spawn(publisher(rx, peers.clone(), cfg.metrics.clone()));
    tokio::spawn(tick_loop(
        state.clone(),
        peers.clone(),
        subs.clone(),
        tx.clone(),
    ));
    let heard: Heard = Arc::default();
    tokio::spawn(read_expected(
        state.clone(),
        peers.clone(),
        heard.clone(),
        boot_ms,
    ));
    tracing::info!(listen = %cfg.listen, "presence node up");
    let handler: rpc::Handler = Arc::new(move |req| {
        let subs = &subs;
        let now = unix_ms();
        let mut changes = Vec::new();
        let resp = {
            let mut p = state.lock().unwrap_or_else(|e| e.into_inner());
            match req {
                Request::Heartbeat {
                    user,
                    device,
                    at_ms,
                } => {
                    let seen = if at_ms == 0 { now } else { at_ms.min(now) };
                    changes.extend(p.on_heartbeat(user, device, seen, now));
                    Response::Ok
                }
                Request::Logout { user, device } => {
                    changes.extend(p.on_logout(user, device, now));
                    Response::Ok
                }
                Request::PresenceReassert {
                    server,
                    heartbeats,
                    done,
                } => {
                    for (user, device, at_ms) in heartbeats {
                        changes.extend(p.on_heartbeat(user, device, at_ms.min(now), now));
                    }
                    if done {
                        let mut h = heard.lock().unwrap_or_else(|e| e.into_inner());
                        h.heard.insert(server);
                        settle_if_heard(&mut p, &h, boot_ms, now);
                    }
                    Response::Ok
                }
                Request::SubscribePresence { info } => {
                    subscribers_renew(subs, &peers, &info, now);
                    // Once warm, the boot time: a subscriber that sees it change knows this
                    // node restarted and its devices' views may be stale.
                    if p.is_settled(now) {
                        Response::Id(boot_ms)
                    } else {
                        Response::Ok
                    }
                }
                Request::PresenceOf { .. } if !p.is_settled(now) => Response::Error {
                    code: ErrorCode::Unavailable,
                    detail: "presence restarted and is still hearing from devices".into(),
                },
                Request::PresenceOf { users } => {
                    let list = users
                        .into_iter()
                        .map(|u| {
                            let (s, v) = p.status_versioned(u);
                            (u, s, v)
                        })
                        .collect();
                    Response::Presence(list)
                }
                other => Response::Error {
                    code: ErrorCode::BadRequest,
                    detail: format!("presence does not serve {other:?}"),
                },
            }
        };
        for c in changes {
            enqueue(&tx, c);
        }
        async move { resp }.boxed()
    });
    rpc::serve(cfg.listen, handler, cfg.peers.tls.clone()).await?;
    Ok(())
}

fn enqueue(tx: &tokio::sync::mpsc::Sender<Change>, c: Change) {
    if tx.try_send(c).is_err() {
        tracing::warn!(user = c.user, "presence publish queue full; change dropped");
    }
}

/// Which chat servers a settling node waits for, and which re-asserted their devices. A std
/// mutex: short synchronous updates, always taken after the presence state's lock.
type Heard = Arc<Mutex<Settling>>;

#[derive(Debug, Default)]
struct Settling {
    /// The chat servers registered when this node started (`None` until read).
    expected: Option<BTreeSet<u32>>,
    /// Those that re-asserted every device they hold (users of this node).
    heard: BTreeSet<u32>,
}

/// Settles the node if every expected chat server re-asserted its devices.
fn settle_if_heard(p: &mut Presence, s: &Settling, boot_ms: u64, now_ms: u64) {
    if p.is_settled(now_ms) {
        return;
    }
    if s.expected.as_ref().is_some_and(|e| e.is_subset(&s.heard)) {
        p.settle(now_ms);
        tracing::info!(
            servers = s.heard.len(),
            after_ms = now_ms.saturating_sub(boot_ms),
            "presence settled: every chat server re-asserted its devices"
        );
    }
}

/// Reads which chat servers are registered (they hold every connected device), retrying
/// until it is known or the warm-up is over, then settles if they were all heard already.
async fn read_expected(state: Arc<Mutex<Presence>>, peers: Arc<Peers>, heard: Heard, boot_ms: u64) {
    while unix_ms() < boot_ms + WARMUP_MS {
        match peers.discovery.list().await {
            Ok(list) => {
                // The handler's order: the state, then the settling record.
                let mut p = state.lock().unwrap_or_else(|e| e.into_inner());
                let mut h = heard.lock().unwrap_or_else(|e| e.into_inner());
                h.expected = Some(list.iter().map(|s| s.server).collect());
                settle_if_heard(&mut p, &h, boot_ms, unix_ms());
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "presence: chat server list not read yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Chat servers subscribed to changes -> when their subscription lapses (ms). A std mutex:
/// short synchronous updates.
type Subscribers = Arc<Mutex<BTreeMap<u32, u64>>>;

/// Adds or renews a chat server's subscription; changes go to it from now on.
fn subscribers_renew(subs: &Subscribers, peers: &Peers, info: &ChatServerInfo, now_ms: u64) {
    peers.upsert_chat_server(info);
    subs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(info.server, now_ms + DISCOVERY_LEASE_MS);
}

/// Forgets chat servers that stopped renewing (crashed or gone).
fn subscribers_expire(subs: &Subscribers, peers: &Peers, now_ms: u64) {
    let mut s = subs.lock().unwrap_or_else(|e| e.into_inner());
    s.retain(|server, until| {
        let live = *until > now_ms;
        if !live {
            peers.remove_chat_server(*server);
        }
        live
    });
}

async fn tick_loop(
    state: Arc<Mutex<Presence>>,
    peers: Arc<Peers>,
    subs: Subscribers,
    tx: tokio::sync::mpsc::Sender<Change>,
) {
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(TICK).await;
        ticks += 1;
        let changes = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_tick(unix_ms());
        for c in changes {
            enqueue(&tx, c);
        }
        if ticks.is_multiple_of(2) {
            subscribers_expire(&subs, &peers, unix_ms());
        }
    }
}

/// Publishes changes concurrently, at most `PUBLISH_IN_FLIGHT_MAX` at once. Order between
/// publishes does not matter: each change carries a version and devices keep the highest.
async fn publisher(
    mut rx: tokio::sync::mpsc::Receiver<Change>,
    peers: Arc<Peers>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PUBLISH_IN_FLIGHT_MAX));
    let friends: FriendCache = Arc::default();
    while let Some(c) = rx.recv().await {
        let state = match c.status {
            PresenceStatus::Online => "online",
            PresenceStatus::Offline => "offline",
        };
        metrics
            .presence_changes
            .get_or_create(&StateLabel { state })
            .inc();
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // The semaphore is never closed.
        };
        let peers = peers.clone();
        let friends = friends.clone();
        tokio::spawn(async move {
            publish(peers, friends, c).await;
            drop(permit);
        });
    }
}

/// Attempts to read the subject's friend list before a change is given up (kv may be down
/// for a restart); one second apart.
const FRIENDS_READ_ATTEMPTS: u32 = 30;

/// Friend lists of online users, as read when they came online: an offline change is still
/// published when the user's kv shard is down (a friendship made meanwhile is missed; the
/// device's periodic presence query repairs that). Bounded by the online users: an entry
/// goes with its user's offline change. A std mutex: short synchronous updates.
type FriendCache = Arc<Mutex<BTreeMap<Id, Vec<Id>>>>;

/// The subject's friends: from kv, else (kv down) from the cache, else kv again until it
/// answers or `FRIENDS_READ_ATTEMPTS` run out.
async fn friends_of(peers: &Peers, cache: &FriendCache, change: &Change) -> Option<Vec<Id>> {
    let cached = || {
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        match change.status {
            PresenceStatus::Offline => c.remove(&change.user),
            PresenceStatus::Online => c.get(&change.user).cloned(),
        }
    };
    for attempt in 1..=FRIENDS_READ_ATTEMPTS {
        let req = Request::GetUser { user: change.user };
        match peers.kv_for_user(change.user).call(req).await {
            Ok(Response::User(Some(u))) => {
                let friends: Vec<Id> = u.friends.keys().copied().collect();
                let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
                match change.status {
                    PresenceStatus::Online => c.insert(change.user, friends.clone()),
                    PresenceStatus::Offline => c.remove(&change.user),
                };
                return Some(friends);
            }
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(user = change.user, attempt, error = %e, "presence: friend list unavailable");
                if attempt == 1 {
                    if let Some(f) = cached() {
                        return Some(f);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    None
}

/// Sends one change to every live chat server with the subject's friends as observers.
async fn publish(peers: Arc<Peers>, cache: FriendCache, change: Change) {
    if change.status == PresenceStatus::Offline {
        let req = Request::SetLastActive {
            user: change.user,
            at_ms: unix_ms(),
        };
        let kv = peers.kv_for_user(change.user).clone();
        tokio::spawn(async move {
            let _ = kv.call(req).await;
        });
    }
    let Some(friends) = friends_of(&peers, &cache, &change).await else {
        tracing::warn!(
            user = change.user,
            "presence: no friend list; change not published"
        );
        return;
    };
    if friends.is_empty() {
        return;
    }
    let calls = peers.chat_servers().into_iter().map(|(_, chat)| {
        let req = Request::PresenceFanout {
            subject: change.user,
            status: change.status,
            version: change.version,
            observers: friends.clone(),
        };
        async move {
            if let Err(e) = chat.call(req).await {
                tracing::debug!(chat = %chat.addr(), error = %e, "presence fanout failed");
            }
        }
    });
    futures::future::join_all(calls).await;
}
