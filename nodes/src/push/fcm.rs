//! Firebase Cloud Messaging, HTTP v1 API, with a service account. Real build only.
//!
//! Access: an RS256 JWT assertion signed with the service account's key is exchanged at its
//! OAuth2 token endpoint (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`) for an
//! access token, cached until [`TOKEN_MARGIN_S`] before it expires; one refresh at a time
//! (concurrent notifications wait for it). Then `POST
//! {endpoint}/v1/projects/{project_id}/messages:send` with `{"message": {"token": ...}}`.
//!
//! Answers: 200 is sent; 404 `UNREGISTERED`, 400 `INVALID_ARGUMENT`, 403
//! `SENDER_ID_MISMATCH` and other 4xx are `Refused` naming FCM's `errorCode`; 429
//! `QUOTA_EXCEEDED` and 5xx are `Unreachable`; 401 drops the cached access token and is
//! `Unreachable` (the retry gets a new one). A token endpoint that refuses the assertion is
//! `Unreachable` too: the notification was never judged, and the fix is in the configuration.
//!
//! Does not: batch, use topics or condition sends, or set per-platform overrides beyond
//! Android's priority and TTL.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::json;

use super::http::{body_excerpt, classify, HttpSender, Versions};
use super::jwt::Signer;
use super::settings::{file_or_inline, FcmSettings};
use super::{Notification, PushError, PushProvider, PushTarget};
use crate::clock::unix_ms;

/// An access token is replaced this long before it expires.
pub const TOKEN_MARGIN_S: u64 = 5 * 60;

/// Lifetime asked for in the assertion (Google's maximum).
const ASSERTION_LIFETIME_S: u64 = 3600;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const JWT_BEARER_GRANT: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";

/// The fields used from a Google service-account key file.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    private_key_id: String,
    private_key: String,
    client_email: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// Sends notifications through FCM.
pub struct FcmProvider {
    inner: Arc<Fcm>,
}

struct Fcm {
    http: HttpSender,
    /// `{endpoint}/v1/projects/{project_id}/messages:send`.
    send_url: String,
    token_uri: String,
    client_email: String,
    key_id: String,
    signer: Signer,
    ttl_s: u64,
    /// (access token, expires at s). An async mutex: held across the token request, so that
    /// one refresh runs at a time and the others reuse its result.
    token: tokio::sync::Mutex<Option<(String, u64)>>,
}

impl FcmProvider {
    pub fn new(s: &FcmSettings) -> anyhow::Result<Self> {
        let json = file_or_inline(
            &s.service_account_file,
            &s.service_account_json,
            ("service_account_file", "service_account_json"),
        )?;
        let account: ServiceAccount =
            serde_json::from_str(&json).context("service account JSON")?;
        let signer =
            Signer::rs256_from_pem(&account.private_key).context("service account private_key")?;
        let project_id = s.project_id.clone().unwrap_or(account.project_id);
        anyhow::ensure!(
            !project_id.is_empty()
                && project_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "project_id {project_id:?}: letters, digits and '-'"
        );
        let limits = s.limits();
        let token_uri = s
            .token_uri
            .clone()
            .or(account.token_uri)
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.into());
        Ok(Self {
            inner: Arc::new(Fcm {
                // The endpoints are the operator's (config): may be a local relay.
                http: HttpSender::new(
                    "fcm",
                    Versions::Any,
                    limits.in_flight_max,
                    limits.timeout,
                    false,
                )?,
                send_url: format!(
                    "{}/v1/projects/{project_id}/messages:send",
                    s.endpoint.trim_end_matches('/')
                ),
                token_uri,
                client_email: account.client_email,
                key_id: account.private_key_id,
                signer,
                ttl_s: limits.ttl_s,
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }
}

impl PushProvider for FcmProvider {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(PushTarget::Fcm { registration_token }) = &n.target else {
                tracing::debug!(
                    user = n.user,
                    device = n.device,
                    "fcm: no fcm target, skipped"
                );
                return Ok(());
            };
            inner.send(&n, registration_token).await
        })
    }
}

impl Fcm {
    async fn send(&self, n: &Notification, registration_token: &str) -> Result<(), PushError> {
        let access_token = self.access_token().await?;
        let body = json!({
            "message": {
                "token": registration_token,
                "notification": { "title": "New message", "body": n.preview },
                // FCM data values are strings (ids also exceed 53-bit JSON integers).
                "data": {
                    "channel": n.channel.to_string(),
                    "message_id": n.message_id.to_string(),
                    "sender": n.sender.to_string(),
                },
                // One notification per message on the device, even if it is sent again:
                // `collapse_key` while FCM holds it, `tag` once shown (a later one with the
                // same tag replaces it); the same for iOS and web targets reached through FCM.
                "android": {
                    "priority": "high",
                    "ttl": format!("{}s", self.ttl_s),
                    "collapse_key": n.collapse_id(),
                    "notification": { "tag": n.collapse_id() },
                },
                "apns": { "headers": { "apns-collapse-id": n.collapse_id() } },
                "webpush": {
                    "headers": { "Topic": n.collapse_id() },
                    "notification": { "tag": n.collapse_id() },
                },
            }
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.send_url)
            .header("authorization", format!("Bearer {access_token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| PushError::Refused(format!("fcm: request: {e}")))?;
        let answer = self.http.send(req).await?;
        if answer.status == StatusCode::OK {
            return Ok(());
        }
        let what = format!(
            "fcm {} {}",
            answer.status.as_u16(),
            error_reason(&answer.body)
        );
        if answer.status == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
            return Err(PushError::Unreachable(format!(
                "{what} (access token dropped)"
            )));
        }
        Err(classify(answer.status, what))
    }

    /// The cached access token, or a new one from the token endpoint.
    async fn access_token(&self) -> Result<String, PushError> {
        let mut cached = self.token.lock().await;
        let now_s = unix_ms() / 1000;
        if let Some((token, expires_s)) = cached.as_ref() {
            if now_s + TOKEN_MARGIN_S < *expires_s {
                return Ok(token.clone());
            }
        }
        let (token, lifetime_s) = self.request_token(now_s).await?;
        *cached = Some((token.clone(), now_s + lifetime_s));
        Ok(token)
    }

    async fn request_token(&self, now_s: u64) -> Result<(String, u64), PushError> {
        let assertion = self.signer.sign(
            json!({ "typ": "JWT", "kid": self.key_id }),
            &json!({
                "iss": self.client_email,
                "scope": SCOPE,
                "aud": self.token_uri,
                "iat": now_s,
                "exp": now_s + ASSERTION_LIFETIME_S,
            }),
        )?;
        let form = format!("grant_type={JWT_BEARER_GRANT}&assertion={assertion}");
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.token_uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| PushError::Unreachable(format!("fcm token: request: {e}")))?;
        let answer = self.http.send(req).await?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            access_token: String,
            expires_in: u64,
        }
        if answer.status != StatusCode::OK {
            return Err(PushError::Unreachable(format!(
                "fcm token endpoint {}: {}",
                answer.status.as_u16(),
                body_excerpt(&answer.body)
            )));
        }
        let t: TokenAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
            PushError::Unreachable(format!("fcm token endpoint: unexpected answer: {e}"))
        })?;
        Ok((t.access_token, t.expires_in))
    }
}

/// FCM's reason: the `errorCode` of the `FcmError` detail (e.g. `UNREGISTERED`), else the
/// Google status (e.g. `INVALID_ARGUMENT`), with the message.
fn error_reason(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return body_excerpt(body);
    };
    let error = &v["error"];
    let code = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["errorCode"].as_str())
        .or_else(|| error["status"].as_str())
        .unwrap_or("?");
    let message = error["message"].as_str().unwrap_or("");
    format!("{code}: {message}")
}
