//! The rogue: a host on the cluster's network (10.0.0.4) that speaks the internal RPC protocol
//! without a certificate of the cluster's CA, as the security review's outsider did. Every
//! [`EVERY`] of the safety phase it tries one request on every node, in turn:
//!
//! - `plain`: JSON frames on plain TCP (the protocol before mutual TLS);
//! - `anonymous`: TLS without a certificate (the CA's certificate is no secret);
//! - `foreign_ca`: a certificate of its own CA that names a node of the cluster.
//!
//! The requests are the review's attacks, kept harmless in case one got through: read a
//! user's record from kv (a password hash to crack), take an id from idgen, ask a user's
//! presence, deliver a forged message to no device, have push notify nobody. Each attempt
//! on a node that accepted the TCP connection is an `intrusion` event, with the answer if
//! there was one; `checkers::security` requires that there never is. A node that is down or
//! cut off is skipped (nothing was attempted).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use nodes::cluster::Role as NodeRole;
use nodes::proto::client::ChatMessage;
use nodes::proto::internal::Request;
use nodes::rpc::{call_on_stream, RpcClient, RpcError};
use nodes::tls::{connect_anonymous, Principal, TestCa};
use scenarios::Role;
use tokio::time::Instant;

use crate::cluster::{self, Cluster};
use crate::history::Event;
use crate::recorder::Recorder;

/// The rogue's address.
pub const ROGUE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
/// Pause between two rounds of attempts (one per node each).
pub const EVERY: Duration = Duration::from_secs(15);
/// How long an attempt waits for a connection, a handshake or an answer.
const WAIT: Duration = Duration::from_secs(2);
const HOWS: [&str; 3] = ["plain", "anonymous", "foreign_ca"];

/// The nodes to attack and the request tried on each.
fn targets(cluster: &Cluster) -> Vec<(String, SocketAddr, Request)> {
    let forged = ChatMessage {
        channel: 1,
        seq: 1,
        message_id: 1,
        sender: 1,
        sender_device: 1,
        client_msg_id: 1,
        text: "forged".into(),
        sent_at_ms: 0,
    };
    let mut out = Vec::new();
    for (i, addr) in cluster.map.kv.iter().enumerate() {
        let shard = i as u32 % cluster.map.placement().map_or(1, |p| p.shards);
        let req = Request::Shard {
            shard,
            req: Box::new(Request::GetUser { user: 1 }),
        };
        out.push((format!("kv-{i}"), *addr, req));
    }
    for (i, addr) in cluster.map.idgen.iter().enumerate() {
        out.push((format!("idgen-{i}"), *addr, Request::NextId { after: None }));
    }
    for (i, addr) in cluster.map.presence.iter().enumerate() {
        let req = Request::PresenceOf { users: vec![1] };
        out.push((format!("presence-{i}"), *addr, req));
    }
    for (i, addr) in cluster.map.push.iter().enumerate() {
        let req = Request::Notify {
            message: forged.clone(),
            users: Vec::new(),
            fanout_done: false,
        };
        out.push((format!("push-{i}"), *addr, req));
    }
    for (role, index) in cluster.node_names() {
        if role == Role::Chat {
            let addr = SocketAddr::new(
                IpAddr::V4(cluster::ip(Role::Chat, index)),
                cluster::RPC_PORT,
            );
            let req = Request::Deliver {
                devices: Vec::new(),
                message: forged.clone(),
            };
            out.push((format!("chat-{index}"), addr, req));
        }
    }
    out
}

/// Starts the rogue: rounds from `from` until `until`.
pub fn start(cluster: &Cluster, recorder: Recorder, seed: u64, from: Instant, until: Instant) {
    let targets = targets(cluster);
    let ca = cluster.ca_cert.clone();
    // Its own CA, and a certificate of it that claims to be chat server 0.
    let foreign =
        TestCa::new(seed ^ 0x0052_4f47_5545).node(Principal::Node(NodeRole::Chat, 0), false);
    let node = madsim::runtime::Handle::current()
        .create_node()
        .name("rogue")
        .ip(IpAddr::V4(ROGUE_IP))
        .build();
    node.spawn(async move {
        tokio::time::sleep_until(from).await;
        let mut round = 0usize;
        while Instant::now() < until {
            for (t, (name, addr, req)) in targets.iter().enumerate() {
                let how = HOWS[(round + t) % HOWS.len()];
                let answer = match how {
                    "foreign_ca" => {
                        match RpcClient::new(*addr, foreign.clone())
                            .call_timeout(req.clone(), WAIT)
                            .await
                        {
                            Ok(resp) => Some(format!("{resp:?}")),
                            Err(e @ RpcError::Remote { .. }) => Some(e.to_string()),
                            // Refused at the handshake, or down: told apart by a plain dial.
                            Err(_) if !reachable(*addr).await => continue,
                            Err(_) => None,
                        }
                    }
                    _ => {
                        let Ok(Ok(tcp)) =
                            tokio::time::timeout(WAIT, nodes::net::connect(*addr)).await
                        else {
                            continue;
                        };
                        if how == "plain" {
                            call_on_stream(tcp, req.clone(), WAIT).await
                        } else {
                            match tokio::time::timeout(WAIT, connect_anonymous(&ca, tcp)).await {
                                Ok(Ok(tls)) => call_on_stream(tls, req.clone(), WAIT).await,
                                _ => None,
                            }
                        }
                        .map(|r| format!("{r:?}"))
                    }
                };
                recorder.record(Event::Intrusion {
                    target: name.clone(),
                    how: how.into(),
                    request: request_name(req),
                    answered: answer.map(|a| a.chars().take(200).collect()),
                });
            }
            round += 1;
            tokio::time::sleep(EVERY).await;
        }
    });
}

/// `get_user`; a shard's request as `shard/get_user`.
fn request_name(req: &Request) -> String {
    match req {
        Request::Shard { req, .. } => format!("shard/{}", request_name(req)),
        other => <&'static str>::from(other).to_string(),
    }
}

async fn reachable(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(WAIT, nodes::net::connect(addr)).await,
        Ok(Ok(_))
    )
}
