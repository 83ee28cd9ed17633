//! Which push provider a push node uses, as configuration (serde; TOML in chatd's config), and
//! [`build`], which turns it into a provider. Real build only.
//!
//! ```toml
//! [push_provider]
//! provider = "apns"                 # "log" (the default) | "apns" | "fcm" | "webpush"
//! key_file = "/etc/chatd/AuthKey_ABC123DEFG.p8"
//! key_id = "ABC123DEFG"
//! team_id = "DEF123GHIJ"
//! topic = "com.example.chat"        # the app's bundle id
//! # endpoint = "https://api.sandbox.push.apple.com"   # development builds of the app
//!
//! [push_provider]
//! provider = "fcm"
//! service_account_file = "/etc/chatd/firebase-service-account.json"
//!
//! [push_provider]
//! provider = "webpush"
//! vapid_private_key = "<base64url, 32 bytes>"   # `npx web-push generate-vapid-keys`
//! vapid_public_key = "<base64url, 65 bytes>"    # also the browser's applicationServerKey
//! subject = "mailto:ops@example.com"
//! ```
//!
//! Every provider also takes `timeout_ms` (whole request, default 10 s), `in_flight_max`
//! (requests at once, default 100; callers wait beyond it) and `ttl_s` (how long the platform
//! keeps an undelivered notification, default one day). Unknown keys are refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::apns::ApnsProvider;
use super::fcm::FcmProvider;
use super::webpush::WebPushProvider;
use super::{LogProvider, PushProvider};

/// The push provider of a push node, tagged by `provider`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum PushSettings {
    /// Logs each notification; sends nothing.
    #[default]
    Log,
    Apns(ApnsSettings),
    Fcm(FcmSettings),
    #[serde(rename = "webpush")]
    WebPush(WebPushSettings),
}

/// Knobs every platform provider has (repeated in each settings struct rather than
/// `#[serde(flatten)]`ed: serde cannot refuse unknown keys next to a flattened struct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimits {
    /// Each request (connect, TLS, send, answer) fails as `Unreachable` after this long.
    pub timeout: Duration,
    /// Requests at once; further notifications wait for a free slot.
    pub in_flight_max: usize,
    /// How long the platform keeps a notification for an unreachable device, in seconds.
    pub ttl_s: u64,
}

/// Adds the [`SendLimits`] keys (`timeout_ms`, `in_flight_max`, `ttl_s`) to a settings struct.
macro_rules! send_limit_fields {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($body)*
            /// Each request (connect, TLS, send, answer) fails as `Unreachable` after this long.
            #[serde(default = "default_timeout_ms")]
            pub timeout_ms: u64,
            /// Requests at once; further notifications wait for a free slot.
            #[serde(default = "default_in_flight_max")]
            pub in_flight_max: usize,
            /// How long the platform keeps a notification for an unreachable device.
            #[serde(default = "default_ttl_s")]
            pub ttl_s: u64,
        }

        impl $name {
            pub fn limits(&self) -> SendLimits {
                SendLimits {
                    timeout: Duration::from_millis(self.timeout_ms),
                    in_flight_max: self.in_flight_max,
                    ttl_s: self.ttl_s,
                }
            }
        }
    };
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_in_flight_max() -> usize {
    100
}
fn default_ttl_s() -> u64 {
    24 * 3600
}

send_limit_fields! {
/// APNs with token-based authentication (a `.p8` signing key from the Apple developer account).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
    /// Base URL; `https://api.sandbox.push.apple.com` for development builds of the app.
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
    /// The `.p8` key file (PKCS#8 PEM) ...
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// ... or its contents inline (exactly one of the two).
    #[serde(default)]
    pub key_pem: Option<String>,
    /// The key's 10-character id (the JWT's `kid`).
    pub key_id: String,
    /// The developer team id (the JWT's `iss`).
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
}
}

pub const APNS_ENDPOINT: &str = "https://api.push.apple.com";

fn default_apns_endpoint() -> String {
    APNS_ENDPOINT.into()
}

send_limit_fields! {
/// FCM HTTP v1 with a service account (the JSON key file from the Firebase console).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
    /// Base URL of the FCM API.
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    /// The service-account JSON file ...
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    /// ... or its contents inline (exactly one of the two).
    #[serde(default)]
    pub service_account_json: Option<String>,
    /// Overrides the service account's `project_id`.
    #[serde(default)]
    pub project_id: Option<String>,
    /// Overrides the service account's `token_uri` (the OAuth2 token endpoint).
    #[serde(default)]
    pub token_uri: Option<String>,
}
}

pub const FCM_ENDPOINT: &str = "https://fcm.googleapis.com";

fn default_fcm_endpoint() -> String {
    FCM_ENDPOINT.into()
}

send_limit_fields! {
/// Web Push with VAPID. The endpoint of each notification is the device's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushSettings {
    /// The VAPID private key: the raw P-256 scalar, base64url (32 bytes).
    pub vapid_private_key: String,
    /// The VAPID public key: the uncompressed point, base64url (65 bytes).
    pub vapid_public_key: String,
    /// A contact for the push service: `mailto:...` or an `https://` URL (the JWT's `sub`).
    pub subject: String,
    /// Also send to plain `http://` subscription endpoints. Off in production (RFC 8030
    /// requires https); for tests against a local push service.
    #[serde(default)]
    pub allow_http_endpoints: bool,
}
}

/// The provider `settings` describe. Reads key files, checks keys and fields; fails with the
/// reason if anything is missing or malformed. The providers send on the (real) tokio runtime
/// they are called on.
pub fn build(settings: &PushSettings) -> anyhow::Result<Arc<dyn PushProvider>> {
    Ok(match settings {
        PushSettings::Log => Arc::new(LogProvider),
        PushSettings::Apns(s) => Arc::new(ApnsProvider::new(s).context("push provider apns")?),
        PushSettings::Fcm(s) => Arc::new(FcmProvider::new(s).context("push provider fcm")?),
        PushSettings::WebPush(s) => {
            Arc::new(WebPushProvider::new(s).context("push provider webpush")?)
        }
    })
}

/// A secret given as a file or inline: exactly one of the two.
pub(crate) fn file_or_inline(
    file: &Option<PathBuf>,
    inline: &Option<String>,
    names: (&str, &str),
) -> anyhow::Result<String> {
    match (file, inline) {
        (Some(path), None) => {
            std::fs::read_to_string(path).with_context(|| format!("{} {}", names.0, path.display()))
        }
        (None, Some(text)) => Ok(text.clone()),
        _ => bail!("give exactly one of {} and {}", names.0, names.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the documented TOML shapes parse (tag, defaults, flattened limits), `log` is the
    // default, and unknown keys are refused rather than ignored.
    #[test]
    fn settings_parse_from_json_shapes() {
        let apns: PushSettings = serde_json::from_value(serde_json::json!({
            "provider": "apns", "key_pem": "x", "key_id": "K", "team_id": "T",
            "topic": "com.example", "timeout_ms": 5000
        }))
        .expect("apns settings");
        let PushSettings::Apns(a) = apns else {
            panic!("apns expected")
        };
        assert_eq!(a.endpoint, APNS_ENDPOINT);
        assert_eq!(a.limits().timeout, Duration::from_millis(5000));
        assert_eq!(a.limits().in_flight_max, 100);
        let web: PushSettings = serde_json::from_value(serde_json::json!({
            "provider": "webpush", "vapid_private_key": "a", "vapid_public_key": "b",
            "subject": "mailto:x@example.com"
        }))
        .expect("webpush settings");
        assert!(matches!(web, PushSettings::WebPush(_)));
        let log: PushSettings =
            serde_json::from_value(serde_json::json!({"provider": "log"})).expect("log");
        assert_eq!(log, PushSettings::default());
        let typo = serde_json::from_value::<PushSettings>(serde_json::json!({
            "provider": "fcm", "service_acount_file": "/x"
        }));
        assert!(typo.is_err(), "unknown key refused");
    }
}
