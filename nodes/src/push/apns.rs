//! Apple Push Notification service, token-based: an ES256 provider token (JWT with the key id
//! and team id) on HTTP/2 `POST /3/device/{device_token}`. Real build only.
//!
//! One provider token is signed and reused for [`TOKEN_REUSE_S`] (Apple refuses tokens older
//! than an hour and throttles ones refreshed more often than every 20 minutes). Answers: 200
//! is sent; 410 `Unregistered`, 400 `BadDeviceToken` and the other 4xx are `Refused` with
//! Apple's reason; 429 and 5xx `Unreachable`; 403 `ExpiredProviderToken` drops the cached
//! token and is `Unreachable` (the retry signs a new one).
//!
//! Does not: keep several connections (one HTTP/2 connection multiplexes every request),
//! send background or VoIP pushes, or localise the alert.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::http::{body_excerpt, classify, HttpSender, Versions};
use super::jwt::Signer;
use super::settings::{file_or_inline, ApnsSettings};
use super::{Notification, PushError, PushProvider, PushTarget};
use crate::clock::unix_ms;

/// Seconds one provider token is used before a new one is signed.
pub const TOKEN_REUSE_S: u64 = 50 * 60;

/// Sends alerts through APNs.
pub struct ApnsProvider {
    inner: Arc<Apns>,
}

struct Apns {
    http: HttpSender,
    /// `{endpoint}/3/device/`.
    url_prefix: String,
    topic: String,
    key_id: String,
    team_id: String,
    signer: Signer,
    ttl_s: u64,
    /// (token, issued at s). A std mutex: held only to read or replace, never across await.
    token: Mutex<Option<(String, u64)>>,
}

impl ApnsProvider {
    pub fn new(s: &ApnsSettings) -> anyhow::Result<Self> {
        let pem = file_or_inline(&s.key_file, &s.key_pem, ("key_file", "key_pem"))?;
        let signer = Signer::es256_from_pem(&pem)?;
        anyhow::ensure!(!s.key_id.is_empty(), "key_id is empty");
        anyhow::ensure!(!s.team_id.is_empty(), "team_id is empty");
        anyhow::ensure!(!s.topic.is_empty(), "topic is empty");
        let limits = s.limits();
        Ok(Self {
            inner: Arc::new(Apns {
                http: HttpSender::new(
                    "apns",
                    Versions::Http2Only,
                    limits.in_flight_max,
                    limits.timeout,
                    // The endpoint is the operator's (config): may be a local relay.
                    false,
                )?,
                url_prefix: format!("{}/3/device/", s.endpoint.trim_end_matches('/')),
                topic: s.topic.clone(),
                key_id: s.key_id.clone(),
                team_id: s.team_id.clone(),
                signer,
                ttl_s: limits.ttl_s,
                token: Mutex::new(None),
            }),
        })
    }
}

impl PushProvider for ApnsProvider {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(PushTarget::Apns { device_token }) = &n.target else {
                tracing::debug!(
                    user = n.user,
                    device = n.device,
                    "apns: no apns target, skipped"
                );
                return Ok(());
            };
            inner.send(&n, device_token).await
        })
    }
}

impl Apns {
    async fn send(&self, n: &Notification, device_token: &str) -> Result<(), PushError> {
        if device_token.is_empty() || !device_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PushError::Refused(
                "apns: device token is not hex (BadDeviceToken)".into(),
            ));
        }
        let now_s = unix_ms() / 1000;
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{device_token}", self.url_prefix))
            .header("authorization", format!("bearer {}", self.token(now_s)?))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", (now_s + self.ttl_s).to_string())
            // A second notification for the same message replaces the first on the device.
            .header("apns-collapse-id", n.collapse_id())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload(n).to_string())))
            .map_err(|e| PushError::Refused(format!("apns: request: {e}")))?;
        let answer = self.http.send(req).await?;
        if answer.status == StatusCode::OK {
            return Ok(());
        }
        let reason = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_string))
            .unwrap_or_else(|| body_excerpt(&answer.body));
        let what = format!("apns {} {reason}", answer.status.as_u16());
        if answer.status == StatusCode::FORBIDDEN && reason == "ExpiredProviderToken" {
            *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(PushError::Unreachable(format!("{what} (token dropped)")));
        }
        Err(classify(answer.status, what))
    }

    /// The cached provider token, or a new one once it is [`TOKEN_REUSE_S`] old.
    fn token(&self, now_s: u64) -> Result<String, PushError> {
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, issued_s)) = cached.as_ref() {
            if now_s < issued_s + TOKEN_REUSE_S {
                return Ok(token.clone());
            }
        }
        let token = self.signer.sign(
            json!({ "kid": self.key_id }),
            &json!({ "iss": self.team_id, "iat": now_s }),
        )?;
        *cached = Some((token.clone(), now_s));
        Ok(token)
    }
}

/// The JSON payload: an alert, the channel as thread, and the ids as strings (they exceed
/// JavaScript's and some JSON decoders' 53-bit integers).
fn payload(n: &Notification) -> serde_json::Value {
    json!({
        "aps": {
            "alert": { "title": "New message", "body": n.preview },
            "sound": "default",
            "thread-id": n.channel.to_string(),
        },
        "channel": n.channel.to_string(),
        "message_id": n.message_id.to_string(),
        "sender": n.sender.to_string(),
    })
}
