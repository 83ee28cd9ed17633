//! Bearer tokens: `hex(json(claims)) . hex(hmac_sha256(key, json(claims)))`.
//!
//! The api node signs at login; chat servers and the api verify. Both hold the same key ring
//! (key id -> secret), so keys can be rotated by adding a new id. Passwords are stored as salted
//! SHA-256 (a real deployment would use a slow KDF; noted in docs/ARCHITECTURE.md).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proto::client::ErrorCode;
use crate::proto::Id;

type HmacSha256 = Hmac<Sha256>;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub user: Id,
    pub device: Id,
    pub expires_at_ms: u64,
    pub key_id: u32,
}

/// The signing key shared by api and chat nodes.
#[derive(Clone)]
pub struct TokenKey {
    key_id: u32,
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey(id {})", self.key_id)
    }
}

impl TokenKey {
    pub fn new(key_id: u32, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            key_id,
            secret: secret.into(),
        }
    }

    fn mac(&self, payload: &[u8]) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts keys of any length");
        mac.update(payload);
        mac
    }

    pub fn sign(&self, user: Id, device: Id, expires_at_ms: u64) -> String {
        let claims = Claims {
            user,
            device,
            expires_at_ms,
            key_id: self.key_id,
        };
        let payload = serde_json::to_vec(&claims).expect("claims serialize");
        let sig = self.mac(&payload).finalize().into_bytes();
        format!("{}.{}", hex::encode(&payload), hex::encode(sig))
    }

    /// Checks signature, key id and expiry at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, ErrorCode> {
        let (payload_hex, sig_hex) = token.split_once('.').ok_or(ErrorCode::BadToken)?;
        let payload = hex::decode(payload_hex).map_err(|_| ErrorCode::BadToken)?;
        let sig = hex::decode(sig_hex).map_err(|_| ErrorCode::BadToken)?;
        self.mac(&payload)
            .verify_slice(&sig)
            .map_err(|_| ErrorCode::BadToken)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| ErrorCode::BadToken)?;
        if claims.key_id != self.key_id {
            return Err(ErrorCode::BadToken);
        }
        if claims.expires_at_ms <= now_ms {
            return Err(ErrorCode::TokenExpired);
        }
        Ok(claims)
    }
}

/// Salted password hash, hex.
pub fn hash_password(name: &str, password: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"chatsim-password-v1\0");
    h.update(name.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves a signed token verifies, and that tampering, another key and expiry are refused
    // with the specific code.
    #[test]
    fn sign_verify_tamper_expire() {
        let k = TokenKey::new(1, "s3cret");
        let t = k.sign(7, 9, 1_000);
        let c = k.verify(&t, 500).expect("valid token");
        assert_eq!((c.user, c.device), (7, 9));
        assert_eq!(k.verify(&t, 1_000), Err(ErrorCode::TokenExpired));
        let mut bad = t.clone();
        bad.replace_range(0..2, "00");
        assert_eq!(k.verify(&bad, 500), Err(ErrorCode::BadToken));
        assert_eq!(
            TokenKey::new(1, "other").verify(&t, 500),
            Err(ErrorCode::BadToken)
        );
        assert_eq!(k.verify("garbage", 500), Err(ErrorCode::BadToken));
    }
}
