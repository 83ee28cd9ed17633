//! Internal RPC over real sockets: a node answers only callers with a certificate of its
//! cluster's CA, and each of them only what its role may ask (`nodes::tls`). The outsider's
//! attempts of the security review: plain JSON frames, TLS without a certificate, a
//! certificate of another CA, and a node asking what is not its role's.

use std::net::SocketAddr;
use std::time::Duration;

use nodes::canary::Canaries;
use nodes::cluster::{ClusterMap, Peers, Role};
use nodes::coord::Coordination;
use nodes::proto::client::ErrorCode;
use nodes::proto::internal::{Request, Response};
use nodes::rpc::{call_on_stream, RpcClient, RpcError};
use nodes::tls::{connect_anonymous, NodeTls, Principal, TestCa};

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A presence node on loopback with `tls`; its address.
async fn presence_node(tls: NodeTls) -> SocketAddr {
    let (listen, nowhere) = (free(), free());
    let map = ClusterMap {
        coordination: Coordination::Discovery(nowhere),
        kv: vec![nowhere],
        kv_shards: 0,
        kv_replicas: 0,
        idgen: vec![nowhere],
        presence: vec![listen],
        push: vec![nowhere],
    };
    tokio::spawn(nodes::presence::server::run(
        nodes::presence::server::PresenceConfig {
            listen,
            peers: Peers::new(map, Canaries::none(), tls),
            metrics: nodes::metrics::Metrics::new(),
        },
    ));
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listen
}

fn heartbeat() -> Request {
    Request::Heartbeat {
        user: 7,
        device: 70,
        at_ms: 0,
    }
}

const WAIT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn only_the_cluster_is_answered_and_only_within_its_role() {
    let mut ca = TestCa::new(11);
    let addr = presence_node(ca.node(Principal::Node(Role::Presence, 0), false)).await;
    let chat = RpcClient::new(addr, ca.node(Principal::Node(Role::Chat, 0), false));
    assert_eq!(chat.call(heartbeat()).await.unwrap(), Response::Ok);

    // A node of the cluster asking what its role may not: refused, and said why.
    let api = RpcClient::new(addr, ca.node(Principal::Node(Role::Api, 0), false));
    match api.call(heartbeat()).await {
        Err(RpcError::Remote {
            code: ErrorCode::Forbidden,
            detail,
        }) => assert!(detail.contains("chat"), "{detail}"),
        other => panic!("an api node's heartbeat was not refused: {other:?}"),
    }
    // A query any node may make reaches the node (answered as settling: it just started).
    assert!(!matches!(
        api.call(Request::PresenceOf { users: vec![7] }).await,
        Err(RpcError::Remote {
            code: ErrorCode::Forbidden,
            ..
        }) | Err(RpcError::Connect { .. })
            | Err(RpcError::Closed(_))
            | Err(RpcError::Timeout(_))
    ));

    // Another CA's certificate naming a chat server: no connection.
    let forged = TestCa::new(12).node(Principal::Node(Role::Chat, 0), false);
    match RpcClient::new(addr, forged).call(heartbeat()).await {
        Err(RpcError::Connect { .. } | RpcError::Closed(_)) => {}
        other => panic!("a foreign certificate was answered: {other:?}"),
    }

    // TLS without a certificate: the handshake ends in an alert; nothing is answered.
    let tcp = nodes::net::connect(addr).await.unwrap();
    if let Ok(tls) = connect_anonymous(&ca.ca().cert_der(), tcp).await {
        assert_eq!(call_on_stream(tls, heartbeat(), WAIT).await, None);
    }

    // The old protocol, JSON frames on plain TCP: not TLS, closed.
    let tcp = nodes::net::connect(addr).await.unwrap();
    assert_eq!(call_on_stream(tcp, heartbeat(), WAIT).await, None);

    // The node is still there for its own.
    assert_eq!(chat.call(heartbeat()).await.unwrap(), Response::Ok);
}

#[tokio::test]
async fn the_unauthenticated_rpc_canary_answers_an_anonymous_caller() {
    // What the simulation's rogue detects: with the canary's verifier, TLS without a
    // certificate gets answers.
    let mut ca = TestCa::new(13);
    let addr = presence_node(ca.node(Principal::Node(Role::Presence, 0), true)).await;
    let tcp = nodes::net::connect(addr).await.unwrap();
    let tls = connect_anonymous(&ca.ca().cert_der(), tcp)
        .await
        .expect("the canary's node completes an anonymous handshake");
    assert_eq!(
        call_on_stream(tls, heartbeat(), WAIT).await,
        Some(Response::Ok)
    );
    // A foreign certificate is still refused: the verifier checks what is presented.
    let forged = TestCa::new(14).node(Principal::Node(Role::Chat, 0), false);
    assert!(RpcClient::new(addr, forged)
        .call(heartbeat())
        .await
        .is_err());
}

// Proves a revoked certificate is refused at once, on a connection opened before the
// revocation and in new handshakes, while other certificates of the cluster still work
// (`chatd revoke-node` writes the list; every node puts it in force when it changes).
#[tokio::test]
async fn a_revoked_certificate_is_cut_off_on_open_connections_too() {
    let mut ca = TestCa::new(15);
    let presence = ca.node(Principal::Node(Role::Presence, 0), false);
    let addr = presence_node(presence.clone()).await;
    let stolen = ca.node(Principal::Node(Role::Chat, 0), false);
    let thief = RpcClient::new(addr, stolen.clone());
    let honest = RpcClient::new(addr, ca.node(Principal::Node(Role::Chat, 1), false));
    assert_eq!(thief.call(heartbeat()).await.unwrap(), Response::Ok);
    assert_eq!(honest.call(heartbeat()).await.unwrap(), Response::Ok);

    let list = ca
        .ca()
        .revocation_list(&[stolen.serial()], 1, time::OffsetDateTime::now_utc())
        .unwrap();
    let list = nodes::tls::RevocationList::from_pem(&list).unwrap();
    assert_eq!(list.len(), 1);
    presence.set_revoked(list).unwrap();
    assert!(presence.is_revoked(&stolen.serial()));

    // The open connection: its next request closes it; redialling fails the handshake.
    assert!(
        thief.call(heartbeat()).await.is_err(),
        "a revoked certificate was answered"
    );
    assert!(thief.call(heartbeat()).await.is_err());
    assert_eq!(honest.call(heartbeat()).await.unwrap(), Response::Ok);
}

/// A client that must reach a given node (a kv node, whose address can move through etcd)
/// gets nothing from another node of the cluster at that address, and follows a move.
#[tokio::test]
async fn a_client_of_a_named_node_refuses_another_node_and_follows_a_move() {
    let mut ca = TestCa::new(14);
    let presence_0 = presence_node(ca.node(Principal::Node(Role::Presence, 0), false)).await;
    let presence_1 = presence_node(ca.node(Principal::Node(Role::Presence, 1), false)).await;
    let chat = ca.node(Principal::Node(Role::Chat, 0), false);
    // Looking for presence-1 at presence-0's address: refused before any request is sent.
    let client = RpcClient::to_node(presence_0, chat, Principal::Node(Role::Presence, 1));
    match client.call(heartbeat()).await {
        Err(RpcError::Connect { source, .. }) => {
            let why = source.to_string();
            assert!(
                why.contains("expected presence-1") && why.contains("found presence-0"),
                "{why}"
            );
        }
        other => panic!("another node was taken for presence-1: {other:?}"),
    }
    // Moved to where presence-1 is: answered, by every clone.
    let clone = client.clone();
    assert!(client.repoint(presence_1).await);
    assert!(!client.repoint(presence_1).await, "already there");
    assert_eq!(clone.addr(), presence_1);
    assert_eq!(clone.call(heartbeat()).await.unwrap(), Response::Ok);
}
