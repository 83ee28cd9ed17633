//! Users, friends and groups, created over the api as real clients would.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use nodes::client::http::HttpClient;
use nodes::client::ClientError;
use nodes::client_tls::ClientTls;
use nodes::proto::client::*;
use nodes::proto::Id;
use sim::history::{Event, MemberOp};

use super::{PlannedDevice, Recorder};

/// Api calls in flight at once during setup.
const CONCURRENCY: usize = 64;
/// Attempts per call (a busy api answers `unavailable` or times out; 200 ms apart).
const ATTEMPTS: u32 = 20;

#[derive(Debug, Clone)]
pub struct Shape {
    pub users: u32,
    /// Members per group (users are chunked into groups of this size; 0 or 1: no groups).
    pub group_size: u32,
}

async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match f().await {
            Ok(v) => return Ok(v),
            Err(ClientError::Refused { code, .. }) if !code.retryable() => {
                return Err(anyhow::anyhow!("{what}: refused: {code:?}"));
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(anyhow::anyhow!("{what}: gave up: {last:?}"))
}

/// Signs up and logs in `shape.users` users (one device each), pairs users 2k and 2k+1 as
/// friends, and chunks users into groups. Records `device` and `membership` events at t=0.
pub async fn setup(
    api: SocketAddr,
    tls: Option<ClientTls>,
    shape: &Shape,
    rec: &Recorder,
) -> anyhow::Result<Vec<PlannedDevice>> {
    let run_id: u32 = rand::random();
    let password = "load-driver-password";
    let n = shape.users as usize;
    let logins: Vec<LoginResponse> = futures::stream::iter(0..n)
        .map(|i| {
            let h = HttpClient::new(api).with_tls(tls.clone(), None);
            async move {
                let name = format!("load{run_id:08x}u{i}");
                let signup = SignupRequest {
                    name: name.clone(),
                    password: password.into(),
                };
                let _: SignupResponse = retry("signup", || h.post("/v1/signup", &signup)).await?;
                let login = LoginRequest {
                    name: name.clone(),
                    password: password.into(),
                    device: None,
                };
                retry("login", || h.post("/v1/login", &login)).await
            }
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await
        .context("sign up users")?;
    let mut devices: Vec<PlannedDevice> = logins
        .iter()
        .map(|l| PlannedDevice {
            user: l.user,
            device: l.device,
            token: l.token.clone(),
            friends: Vec::new(),
            direct: None,
            group: None,
        })
        .collect();
    for (i, l) in logins.iter().enumerate() {
        rec.record_at(
            0,
            Event::Device {
                user: l.user,
                device: l.device,
                index: Some(i as u32),
            },
        );
    }
    let authed = |i: usize| {
        let mut h = HttpClient::new(api).with_tls(tls.clone(), None);
        h.token = Some(logins[i].token.clone());
        h
    };
    let pairs: Vec<(usize, usize)> = (0..n / 2).map(|k| (2 * k, 2 * k + 1)).collect();
    let channels: Vec<Id> = futures::stream::iter(pairs.iter().copied())
        .map(|(a, b)| {
            let (ha, hb) = (authed(a), authed(b));
            let (ua, ub) = (logins[a].user, logins[b].user);
            async move {
                // a asks, b accepts (adds a back): then they are friends.
                let ask = AddFriendRequest { user: ub };
                let _: AddFriendResponse =
                    retry("friend request", || ha.post("/v1/friends", &ask)).await?;
                let accept = AddFriendRequest { user: ua };
                let r: AddFriendResponse =
                    retry("friend accept", || hb.post("/v1/friends", &accept)).await?;
                r.channel
                    .context("accepting a friend request gives the 1:1 channel")
            }
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await
        .context("make friends")?;
    for (&(a, b), &channel) in pairs.iter().zip(&channels) {
        for (k, &u) in [a, b].iter().enumerate() {
            rec.record_at(
                0,
                Event::Membership {
                    channel,
                    user: logins[u].user,
                    op: MemberOp::Join,
                    members: k as u32 + 1,
                },
            );
        }
        devices[a].friends.push(logins[b].user);
        devices[b].friends.push(logins[a].user);
        devices[a].direct = Some(channel);
        devices[b].direct = Some(channel);
    }
    if shape.group_size >= 2 {
        let chunks: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(shape.group_size as usize)
            .filter(|c| c.len() >= 2)
            .map(|c| c.to_vec())
            .collect();
        // The first member creates the group and invites the others; each joins.
        let groups: Vec<GroupResponse> = futures::stream::iter(chunks.iter().enumerate())
            .map(|(g, members)| {
                let h = authed(members[0]);
                let body = CreateGroupRequest {
                    name: format!("load{run_id:08x}g{g}"),
                    members: members[1..].iter().map(|&m| logins[m].user).collect(),
                };
                async move { retry("group", || h.post("/v1/groups", &body)).await }
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await
            .context("create groups")?;
        let joins: Vec<(usize, usize)> = chunks
            .iter()
            .enumerate()
            .flat_map(|(g, members)| members[1..].iter().map(move |&m| (g, m)))
            .collect();
        futures::stream::iter(joins)
            .map(|(g, m)| {
                let h = authed(m);
                let path = format!("/v1/groups/{}/join", groups[g].channel);
                async move {
                    let _: GroupResponse = retry("join", || h.post(&path, &())).await?;
                    anyhow::Ok(())
                }
            })
            .buffered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .context("join groups")?;
        for (members, g) in chunks.iter().zip(&groups) {
            for (k, &m) in members.iter().enumerate() {
                rec.record_at(
                    0,
                    Event::Membership {
                        channel: g.channel,
                        user: logins[m].user,
                        op: MemberOp::Join,
                        members: k as u32 + 1,
                    },
                );
            }
            for &m in members {
                devices[m].group = Some(g.channel);
            }
        }
    }
    Ok(devices)
}
