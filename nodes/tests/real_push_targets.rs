//! Proves `PUT /v1/devices/{device}/push` on a real `chatd all-in-one`: a logged-in device
//! registers a target of each kind and clears it; another user's device is `unknown_device`
//! (404), a malformed target `bad_request` naming the field, and no bearer token
//! `not_authenticated`. (What is stored is checked by the kv store's unit test.)

#![cfg(not(madsim))]

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use bytes::Bytes;
use nodes::client::http::HttpClient;
use nodes::client::ClientError;
use nodes::proto::client::*;
use serde_json::json;

mod common;

/// `chatd all-in-one` on a free block of ports; killed when dropped.
struct Server {
    child: Child,
    http: SocketAddr,
}

impl Server {
    fn start(data: &std::path::Path) -> Server {
        let base = common::free_base(21);
        let (child, http) = common::spawn_all_in_one(data, base, "warn");
        Server { child, http }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Signs `name` up (retrying while chatd starts) and logs in one device.
async fn user(http: SocketAddr, name: &str) -> (HttpClient, LoginResponse) {
    let anon = HttpClient::new(http);
    let mut signed_up = false;
    for _ in 0..200 {
        let req = SignupRequest {
            name: name.into(),
            password: "pw".into(),
        };
        let r: Result<SignupResponse, _> = anon.post("/v1/signup", &req).await;
        if r.is_ok() {
            signed_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(signed_up, "chatd did not take a signup at {http}");
    let login = LoginRequest {
        name: name.into(),
        password: "pw".into(),
        device: None,
    };
    let r: LoginResponse = anon.post("/v1/login", &login).await.expect("login");
    let mut authed = HttpClient::new(http);
    authed.token = Some(r.token.clone());
    (authed, r)
}

async fn put(
    c: &HttpClient,
    device: u64,
    body: serde_json::Value,
) -> Result<PushTargetResponse, ClientError> {
    let path = format!("/v1/devices/{device}/push");
    c.request("PUT", &path, Bytes::from(body.to_string())).await
}

fn refused_with(
    r: Result<PushTargetResponse, ClientError>,
    want: ErrorCode,
    status: u16,
) -> String {
    match r {
        Err(ClientError::Refused {
            status: s,
            code,
            detail,
        }) if code == want && s == status => detail,
        other => panic!("expected {want:?} ({status}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_register_push_targets() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = Server::start(data.path());
    let (ann, ann_login) = user(server.http, "ann").await;
    let (_bob, bob_login) = user(server.http, "bob").await;
    let mine = ann_login.device;

    let targets = [
        json!({"kind": "apns", "device_token": "ab".repeat(32)}),
        json!({"kind": "fcm", "registration_token": "cX1:APA91b-token"}),
        json!({"kind": "webpush", "endpoint": "https://push.example.net/s/1",
               "p256dh": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
               "auth": "BTBZMqHH6r4Tts7J_aSIgg"}),
    ];
    for (target, kind) in targets.iter().zip(["apns", "fcm", "webpush"]) {
        let r = put(&ann, mine, target.clone()).await.expect("registered");
        assert_eq!(
            r,
            PushTargetResponse {
                device: mine,
                kind: Some(kind.into())
            }
        );
    }
    let cleared: PushTargetResponse = ann
        .delete(&format!("/v1/devices/{mine}/push"))
        .await
        .expect("cleared");
    assert_eq!(cleared.kind, None);

    let r = put(&ann, bob_login.device, targets[1].clone()).await;
    refused_with(r, ErrorCode::UnknownDevice, 404);
    let r = put(
        &ann,
        mine,
        json!({"kind": "apns", "device_token": "not hex"}),
    )
    .await;
    let detail = refused_with(r, ErrorCode::BadRequest, 400);
    assert!(detail.starts_with("device_token"), "{detail}");
    let r = put(&ann, mine, json!({"kind": "carrier-pigeon"})).await;
    refused_with(r, ErrorCode::MalformedJson, 400);
    let anon = HttpClient::new(server.http);
    let r = put(&anon, mine, targets[1].clone()).await;
    refused_with(r, ErrorCode::NotAuthenticated, 401);
}
