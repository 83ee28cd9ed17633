//! Setup before traffic: every user signs up, every device logs in, friendships and groups
//! are made, all over the api's HTTP from a setup client node, as real users would. Records
//! each device and membership in the history, and probes full groups with a 101st member.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use nodes::client::http::HttpClient;
use nodes::client::ClientError;
use nodes::proto::client::*;
use nodes::proto::Id;
use workloads::Workload;

use crate::cluster::{self, Cluster};
use crate::history::{Event, MemberOp};
use crate::recorder::Recorder;

/// What setup learned: server ids for the workload's users, devices and channels.
pub struct Setup {
    /// Per workload device: its login.
    pub logins: Vec<LoginResponse>,
    /// Per user index: friend index -> (friend id, channel).
    pub friends: Vec<BTreeMap<u32, (Id, Id)>>,
    /// Group index -> channel.
    pub groups: BTreeMap<u32, Id>,
    pub group_full_refusals: u64,
}

/// Attempts of one setup call (2 s apart once the backoff is up: about 200 simulated s).
const SETUP_ATTEMPTS_MAX: u32 = 100;

/// Retries an api call until it succeeds (the api may be starting or a kv node down). A call
/// that keeps failing means the system cannot be set up at all (a broken build, a canary that
/// breaks everything): the run stops with that, rather than retry forever.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut last = None;
    for attempt in 0..SETUP_ATTEMPTS_MAX {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                if attempt % 10 == 9 {
                    tracing::warn!(what, error = %e, attempt, "setup call failing");
                }
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    panic!(
        "setup could not complete: {what} failed {SETUP_ATTEMPTS_MAX} times; last error: {}",
        last.map_or_else(|| "none".to_string(), |e| e.to_string())
    )
}

/// Signs up every user, logs in every device, makes friends and groups — over HTTP, from a
/// setup client node — and records devices and memberships.
pub async fn run_setup(cluster: &Cluster, w: &Workload, recorder: &Recorder) -> Setup {
    let node = madsim::runtime::Handle::current()
        .create_node()
        .name("setup")
        .ip(IpAddr::V4(cluster::SETUP_IP))
        .build();
    let api: Vec<SocketAddr> = cluster.api_addrs.clone();
    let tls = cluster.client_tls.clone();
    let w = w.clone();
    let recorder = recorder.clone();
    node.spawn(async move {
        let cluster_api = api;
        let c = |i: usize, t: Option<&str>| {
            let mut h =
                HttpClient::new(cluster_api[i % cluster_api.len()]).with_tls(tls.clone(), None);
            h.token = t.map(str::to_string);
            h
        };
        setup_inner(&w, &recorder, &c).await
    })
    .await
    .expect("the setup task does not panic")
}

async fn setup_inner(
    w: &Workload,
    recorder: &Recorder,
    c: &(dyn Fn(usize, Option<&str>) -> HttpClient + Sync),
) -> Setup {
    let user_ids: Vec<Id> = concurrently(&w.users, |u| {
        async move {
            let body = SignupRequest {
                name: u.name.clone(),
                password: u.password.clone(),
            };
            let h = c(u.index as usize, None);
            let r: SignupResponse = retry("signup", || h.post("/v1/signup", &body)).await;
            r.user
        }
        .boxed()
    })
    .await;
    let logins: Vec<LoginResponse> = concurrently(&w.devices, |d| {
        async move {
            let u = &w.users[d.user as usize];
            let body = LoginRequest {
                name: u.name.clone(),
                password: u.password.clone(),
                device: None,
            };
            let h = c(d.user as usize, None);
            retry("login", || h.post("/v1/login", &body)).await
        }
        .boxed()
    })
    .await;
    let mut tokens: BTreeMap<u32, String> = BTreeMap::new();
    for (i, (d, r)) in w.devices.iter().zip(&logins).enumerate() {
        recorder.record(Event::Device {
            user: r.user,
            device: r.device,
            index: Some(i as u32),
        });
        tokens.entry(d.user).or_insert_with(|| r.token.clone());
    }
    let (user_ids_ref, tokens_ref) = (&user_ids, &tokens);
    let channels: Vec<Id> = concurrently(&w.friendships, |&(a, b)| {
        async move {
            // a asks, b accepts (adds a back): then they are friends.
            let ask = AddFriendRequest {
                user: user_ids_ref[b as usize],
            };
            let ha = c(a as usize, Some(&tokens_ref[&a]));
            let _: AddFriendResponse =
                retry("friend request", || ha.post("/v1/friends", &ask)).await;
            let accept = AddFriendRequest {
                user: user_ids_ref[a as usize],
            };
            let hb = c(b as usize, Some(&tokens_ref[&b]));
            loop {
                let r: AddFriendResponse =
                    retry("friend accept", || hb.post("/v1/friends", &accept)).await;
                if let Some(channel) = r.channel {
                    break channel;
                }
                // The request's write may have been lost with a kv leader; ask again.
                let _: AddFriendResponse =
                    retry("friend request", || ha.post("/v1/friends", &ask)).await;
            }
        }
        .boxed()
    })
    .await;
    let mut friends: Vec<BTreeMap<u32, (Id, Id)>> = vec![BTreeMap::new(); w.users.len()];
    for (&(a, b), &channel) in w.friendships.iter().zip(&channels) {
        friends[a as usize].insert(b, (user_ids[b as usize], channel));
        friends[b as usize].insert(a, (user_ids[a as usize], channel));
        for (n, u) in [(1, a), (2, b)] {
            recorder.record(Event::Membership {
                channel,
                user: user_ids[u as usize],
                op: MemberOp::Join,
                members: n,
            });
        }
    }
    let mut groups = BTreeMap::new();
    let mut group_full_refusals = 0;
    // The owner creates the group (its only member) and invites the others; each joins.
    let created: Vec<(GroupResponse, Vec<(Id, u32)>)> = concurrently(&w.groups, |g| {
        async move {
            let owner = g.members[0];
            let body = CreateGroupRequest {
                name: format!("group{}", g.index),
                members: g.members[1..]
                    .iter()
                    .map(|m| user_ids_ref[*m as usize])
                    .collect(),
            };
            let h = c(owner as usize, Some(&tokens_ref[&owner]));
            let r: GroupResponse = retry("group", || h.post("/v1/groups", &body)).await;
            // One after another (the groups are set up concurrently).
            let path = format!("/v1/groups/{}/join", r.channel);
            let mut joined: Vec<(Id, u32)> = Vec::with_capacity(g.members.len());
            for m in &g.members[1..] {
                let h = c(*m as usize, Some(&tokens_ref[m]));
                let j: GroupResponse = retry("join", || h.post(&path, &())).await;
                joined.push((user_ids_ref[*m as usize], j.members.len() as u32));
            }
            (r, joined)
        }
        .boxed()
    })
    .await;
    for (g, (r, joined)) in w.groups.iter().zip(created) {
        recorder.record(Event::Membership {
            channel: r.channel,
            user: r.members[0],
            op: MemberOp::Join,
            members: 1,
        });
        let mut size = 1;
        for (u, n) in &joined {
            size = size.max(*n);
            recorder.record(Event::Membership {
                channel: r.channel,
                user: *u,
                op: MemberOp::Join,
                members: *n,
            });
        }
        groups.insert(g.index, r.channel);
        if size as usize >= nodes::limits::GROUP_MEMBERS_MAX {
            let probe = GroupProbe {
                owner: g.members[0],
                members: &g.members,
                channel: r.channel,
            };
            group_full_refusals +=
                probe_group_full(w, &user_ids, &tokens, probe, recorder, c).await;
        }
    }
    Setup {
        logins,
        friends,
        groups,
        group_full_refusals,
    }
}

/// Api calls setup keeps in flight at once (users sign up in parallel, as they would).
const SETUP_CONCURRENCY: usize = 256;

/// Runs `f` over `items` with at most `SETUP_CONCURRENCY` in flight; results in item order.
///
/// The futures are boxed: with plain `async` closures over borrowed items the spawned setup
/// task fails rustc's higher-ranked `Send` check ("FnOnce is not general enough").
async fn concurrently<'a, T: Sync, R, F>(items: &'a [T], f: F) -> Vec<R>
where
    F: Fn(&'a T) -> BoxFuture<'a, R>,
{
    use futures::StreamExt;
    let futures: Vec<BoxFuture<'a, R>> = items.iter().map(f).collect();
    futures::stream::iter(futures)
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await
}

/// A full group to probe.
struct GroupProbe<'a> {
    owner: u32,
    members: &'a [u32],
    channel: Id,
}

/// Tries to add a 101st member: refused with `group_full` counts 1. Any other answer is what
/// the setup client observed: an accepted add is recorded as the join it is (the limits checker
/// then reports the 101-member group); another error is logged.
async fn probe_group_full(
    w: &Workload,
    user_ids: &[Id],
    tokens: &BTreeMap<u32, String>,
    g: GroupProbe<'_>,
    recorder: &Recorder,
    c: &(dyn Fn(usize, Option<&str>) -> HttpClient + Sync),
) -> u64 {
    let Some(outsider) = w.users.iter().find(|u| !g.members.contains(&u.index)) else {
        return 0;
    };
    let user = user_ids[outsider.index as usize];
    let path = format!("/v1/groups/{}/members", g.channel);
    let invited: Result<GroupResponse, _> = c(g.owner as usize, Some(&tokens[&g.owner]))
        .post(&path, &AddMemberRequest { user })
        .await;
    // Invited into a full group (it should have been refused): the outsider tries to join.
    let r = match (invited, tokens.get(&outsider.index)) {
        (Ok(_), Some(token)) => {
            let join = format!("/v1/groups/{}/join", g.channel);
            c(outsider.index as usize, Some(token))
                .post::<_, GroupResponse>(&join, &())
                .await
        }
        (other, _) => other,
    };
    match r {
        Err(ClientError::Refused {
            code: ErrorCode::GroupFull,
            ..
        }) => 1,
        Ok(grown) => {
            recorder.record(Event::Membership {
                channel: g.channel,
                user,
                op: MemberOp::Join,
                members: grown.members.len() as u32,
            });
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "the 101st-member probe got no answer");
            0
        }
    }
}
