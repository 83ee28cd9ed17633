//! Proves etcd as `chatd local-cluster` runs it (`etcd_tls`: Debian's `etcd` with a
//! certificate of the cluster CA, client certificate authentication) answers a node holding a
//! cluster certificate, and nobody else: not a plain-text client, not a TLS client without a
//! certificate, not one whose certificate a foreign CA signed. Without this, anyone who
//! reaches etcd could register a rogue chat server or take idgen worker ids.

#![cfg(not(madsim))]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodes::cluster::Role;
use nodes::coord::etcd::Etcd;
use nodes::deploy::config::{ClusterSizes, Config};
use nodes::deploy::{certs, supervisor};
use nodes::tls::{PemIdentity, Principal, TestCa};

mod common;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_answers_only_cluster_certificates() {
    assert!(
        Command::new("etcd").arg("--version").output().is_ok(),
        "etcd is not installed: run scripts/install-deps.sh (Debian's etcd-server)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let base = common::free_base(4);
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let sizes = ClusterSizes {
        etcd: 1,
        presence: 1,
        push: 1,
        kv: 1,
        kv_shards: 0,
        kv_replicas: 1,
        idgen: 1,
        chat: 1,
        api: 1,
    };
    let mut cfg = Config::loopback_cluster(dir.path().into(), at(base + 3), &sizes).unwrap();
    assert!(cfg.etcd_tls, "a local cluster's etcd speaks TLS");
    cfg.etcd[0].client = at(base).to_string();
    cfg.etcd[0].peer = Some(at(base + 1));
    certs::ensure(&cfg).expect("the cluster CA and etcd's certificate");
    let (_, args) = supervisor::etcd_members(&cfg).remove(0);
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let _etcd = Killed(
        Command::new("etcd")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd"),
    );
    let endpoints = vec![cfg.etcd[0].client.clone()];

    // A node with its cluster certificate: answered (once etcd is up).
    let node = certs::load(&cfg, Principal::Node(Role::Api, 0)).unwrap();
    let good = Etcd::new(endpoints.clone(), Some(node.pem_identity().clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match good.put("chatsim/test/a".into(), b"1".to_vec(), 0).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "etcd never answered a node: {e}; log: {}",
                    std::fs::read_to_string(dir.path().join("etcd.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(
        good.get_prefix("chatsim/test/".into()).await.unwrap().len(),
        1
    );

    // Plain text: refused.
    let plain = Etcd::new(endpoints.clone(), None);
    let e = plain
        .put("chatsim/test/b".into(), b"x".to_vec(), 0)
        .await
        .expect_err("plain text is not answered");
    eprintln!("plain: {e}");

    // TLS trusting the right CA, with a certificate of another CA: refused by etcd.
    let foreign = TestCa::new(99).node(Principal::Node(Role::Chat, 0), false);
    let impostor = Etcd::new(
        endpoints.clone(),
        Some(PemIdentity {
            ca: node.pem_identity().ca.clone(),
            ..foreign.pem_identity().clone()
        }),
    );
    let e = impostor
        .put("chatsim/test/c".into(), b"x".to_vec(), 0)
        .await
        .expect_err("a foreign CA's certificate is not answered");
    eprintln!("foreign certificate: {e}");

    // TLS without a client certificate: refused.
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(&node.pem_identity().ca));
    let anonymous = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = etcd_client::Client::connect(
            &endpoints,
            Some(etcd_client::ConnectOptions::new().with_tls(tls)),
        )
        .await?;
        c.put("chatsim/test/d", "x", None).await
    })
    .await;
    assert!(
        !matches!(anonymous, Ok(Ok(_))),
        "a client without a certificate was answered"
    );

    // Nothing the refused clients tried was written.
    let keys: Vec<String> = good
        .get_prefix("chatsim/test/".into())
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(keys, vec!["chatsim/test/a".to_string()]);
}
