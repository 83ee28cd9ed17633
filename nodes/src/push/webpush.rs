//! Web Push: RFC 8030 delivery to the browser's subscription endpoint, the payload encrypted
//! per RFC 8291 (`aes128gcm`, RFC 8188) with the subscription's `p256dh` and `auth` keys, and
//! the application server identified by RFC 8292 VAPID (`Authorization: vapid t=<ES256 JWT>,
//! k=<public key>`). Real build only.
//!
//! Answers: 201 (any 2xx) is sent; 404 and 410 are `Refused` as "subscription gone" (the
//! browser unsubscribed or the subscription expired); other 4xx `Refused` with the push
//! service's words; 429 and 5xx `Unreachable`. An `http://` endpoint is `Refused` unless
//! `allow_http_endpoints` is set.
//!
//! Does not: pad payloads (their length shows the preview's length), send several records
//! (the payload is one record of at most [`RECORD_BYTES`]).
//!
//! Each notification carries its [`Notification::collapse_id`] as the `Topic` header (the
//! push service keeps one pending message per topic) and as `tag` in the payload, for the
//! service worker to pass to `showNotification`.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Uri};
use http_body_util::Full;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, agreement, hkdf};
use serde_json::json;

use super::http::{body_excerpt, classify, HttpSender, Versions};
use super::jwt::{b64url, b64url_decode, Signer};
use super::settings::WebPushSettings;
use super::{Notification, PushError, PushProvider, PushTarget};
use crate::clock::unix_ms;

/// The record size announced in the aes128gcm header; the whole payload is one record, so
/// the plaintext must fit with its delimiter and the 16-byte tag.
pub const RECORD_BYTES: usize = 4096;

/// VAPID tokens are valid this long (RFC 8292 allows at most 24 hours).
const VAPID_LIFETIME_S: u64 = 12 * 3600;

/// Sends notifications to browsers' push services.
pub struct WebPushProvider {
    inner: Arc<WebPush>,
}

struct WebPush {
    http: HttpSender,
    signer: Signer,
    /// base64url of the VAPID public key (`k=`).
    vapid_public_key: String,
    subject: String,
    allow_http: bool,
    ttl_s: u64,
    rng: SystemRandom,
}

impl WebPushProvider {
    pub fn new(s: &WebPushSettings) -> anyhow::Result<Self> {
        let private = b64url_decode(&s.vapid_private_key)
            .map_err(|e| anyhow::anyhow!("vapid_private_key: not base64url: {e}"))?;
        let public = b64url_decode(&s.vapid_public_key)
            .map_err(|e| anyhow::anyhow!("vapid_public_key: not base64url: {e}"))?;
        let signer = Signer::es256_from_raw(&private, &public)
            .map_err(|e| anyhow::anyhow!("vapid_private_key/vapid_public_key: {e}"))?;
        anyhow::ensure!(
            s.subject.starts_with("mailto:") || s.subject.starts_with("https://"),
            "subject: a mailto: or https:// URI"
        );
        let limits = s.limits();
        Ok(Self {
            inner: Arc::new(WebPush {
                http: HttpSender::new(
                    "webpush",
                    Versions::Any,
                    limits.in_flight_max,
                    limits.timeout,
                    // Users supply the endpoints: only public addresses are connected to.
                    true,
                )?,
                vapid_public_key: b64url(signer.public_key()),
                signer,
                subject: s.subject.clone(),
                allow_http: s.allow_http_endpoints,
                ttl_s: limits.ttl_s,
                rng: SystemRandom::new(),
            }),
        })
    }
}

impl PushProvider for WebPushProvider {
    fn notify(&self, n: Notification) -> BoxFuture<'static, Result<(), PushError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(PushTarget::WebPush {
                endpoint,
                p256dh,
                auth,
            }) = &n.target
            else {
                tracing::debug!(
                    user = n.user,
                    device = n.device,
                    "webpush: no webpush target, skipped"
                );
                return Ok(());
            };
            inner.send(&n, endpoint, p256dh, auth).await
        })
    }
}

impl WebPush {
    async fn send(
        &self,
        n: &Notification,
        endpoint: &str,
        p256dh: &str,
        auth: &str,
    ) -> Result<(), PushError> {
        let refused = |why: String| PushError::Refused(format!("webpush: {why}"));
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| refused(format!("endpoint: {e}")))?;
        let audience = match (uri.scheme_str(), uri.authority()) {
            (Some("https"), Some(a)) => format!("https://{a}"),
            (Some("http"), Some(a)) if self.allow_http => format!("http://{a}"),
            _ => return Err(refused("endpoint is not an https URL".into())),
        };
        let ua_public = b64url_decode(p256dh).map_err(|e| refused(format!("p256dh: {e}")))?;
        let auth_secret = b64url_decode(auth).map_err(|e| refused(format!("auth: {e}")))?;
        let plaintext = json!({
            "title": "New message",
            "body": n.preview,
            "channel": n.channel.to_string(),
            "message_id": n.message_id.to_string(),
            "sender": n.sender.to_string(),
            // For the service worker's `showNotification(title, { tag })`: a notification
            // sent again for the same message replaces the shown one.
            "tag": n.collapse_id(),
        })
        .to_string();
        let body = encrypt(plaintext.as_bytes(), &ua_public, &auth_secret, &self.rng)?;
        let vapid = self.signer.sign(
            json!({ "typ": "JWT" }),
            &json!({
                "aud": audience,
                "exp": unix_ms() / 1000 + VAPID_LIFETIME_S,
                "sub": self.subject,
            }),
        )?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(
                "authorization",
                format!("vapid t={vapid}, k={}", self.vapid_public_key),
            )
            .header("ttl", self.ttl_s.to_string())
            .header("urgency", "high")
            // The push service keeps one pending message per topic: a notification sent
            // again for the same message replaces the first while it waits (RFC 8030 5.4).
            .header("topic", n.collapse_id())
            .header("content-encoding", "aes128gcm")
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| refused(format!("request: {e}")))?;
        let answer = self.http.send(req).await?;
        let status = answer.status;
        if status.is_success() {
            return Ok(());
        }
        let words = if status == http::StatusCode::NOT_FOUND || status == http::StatusCode::GONE {
            "subscription gone".to_string()
        } else {
            body_excerpt(&answer.body)
        };
        Err(classify(
            status,
            format!("webpush {} {words}", status.as_u16()),
        ))
    }
}

/// An output length for ring's HKDF.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) -> Result<(), PushError> {
    let failed = |_| PushError::Refused("webpush: HKDF failed".into());
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(out.len()))
        .map_err(failed)?
        .fill(out)
        .map_err(failed)
}

/// RFC 8291 message encryption: a fresh P-256 key and 16-byte salt from `rng` (in that
/// order), ECDH with the subscription's public key `ua_public`, keys derived with its
/// `auth_secret`; the result is the RFC 8188 `aes128gcm` body (header, then one record).
/// A bad subscription key is `Refused`.
pub(crate) fn encrypt(
    plaintext: &[u8],
    ua_public: &[u8],
    auth_secret: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, PushError> {
    let refused = |what: &str| PushError::Refused(format!("webpush: {what}"));
    if ua_public.len() != 65 || auth_secret.len() != 16 {
        return Err(refused("p256dh must be 65 bytes and auth 16"));
    }
    // The delimiter (0x02) and the tag also go into the one record.
    if plaintext.len() + 1 + 16 > RECORD_BYTES {
        return Err(refused("payload larger than one record"));
    }
    let as_private = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, rng)
        .map_err(|_| refused("key generation failed"))?;
    let as_public = as_private
        .compute_public_key()
        .map_err(|_| refused("key generation failed"))?;
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| refused("no randomness"))?;
    let ua_key = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, ua_public);
    let ecdh_secret = agreement::agree_ephemeral(as_private, &ua_key, |s| s.to_vec())
        .map_err(|_| refused("p256dh is not a P-256 point"))?;
    // IKM = HKDF(auth_secret, ecdh_secret, "WebPush: info" || 0x00 || ua_public || as_public)
    let mut ikm = [0u8; 32];
    let key_info: [&[u8]; 3] = [b"WebPush: info\0", ua_public, as_public.as_ref()];
    hkdf(auth_secret, &ecdh_secret, &key_info, &mut ikm)?;
    let mut cek = [0u8; 16];
    hkdf(&salt, &ikm, &[b"Content-Encoding: aes128gcm\0"], &mut cek)?;
    let mut nonce = [0u8; 12];
    hkdf(&salt, &ikm, &[b"Content-Encoding: nonce\0"], &mut nonce)?;
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_128_GCM, &cek).map_err(|_| refused("AES key"))?,
    );
    let mut record = Vec::with_capacity(plaintext.len() + 17);
    record.extend_from_slice(plaintext);
    record.push(0x02); // the last (and only) record's delimiter, no padding
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::empty(),
        &mut record,
    )
    .map_err(|_| refused("encryption failed"))?;
    // Header: salt (16) || rs (u32 BE) || idlen (1) || keyid (the sender's public key).
    let mut body = Vec::with_capacity(16 + 4 + 1 + 65 + record.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&(RECORD_BYTES as u32).to_be_bytes());
    body.push(as_public.as_ref().len() as u8);
    body.extend_from_slice(as_public.as_ref());
    body.extend_from_slice(&record);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the encryption is RFC 8291's: with the example's sender key and salt fed in as
    // the "random" bytes, the body equals the RFC 8291 section 5 example byte for byte.
    #[test]
    #[allow(deprecated)] // ring's fixed-output test RNG
    fn rfc8291_example() {
        let d = |s: &str| b64url_decode(s).expect("base64url");
        let as_private = d("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw");
        let salt = d("DGv6ra1nlYgDCS1FRnbzlw");
        let rng = ring::test::rand::FixedSliceSequenceRandom {
            bytes: &[&as_private, &salt],
            current: core::cell::UnsafeCell::new(0),
        };
        let body = encrypt(
            b"When I grow up, I want to be a watermelon",
            &d("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"),
            &d("BTBZMqHH6r4Tts7J_aSIgg"),
            &rng,
        )
        .expect("encrypts");
        assert_eq!(
            b64url(&body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml\
             mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT\
             pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
    }
}
