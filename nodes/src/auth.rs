//! Bearer tokens: `hex(json(claims)) . hex(hmac_sha256(key, json(claims)))`.
//!
//! The api node signs at login; chat servers and the api verify. Both hold the same key ring
//! (key id -> secret), so keys can be rotated by adding a new id.
//!
//! Passwords ([`Passwords`]) are stored as argon2id PHC strings (`$argon2id$v=19$m=...`) with
//! a random 16-byte salt, and verified in constant time. Records written before that hold the
//! old salted SHA-256 hex; they still verify (compared in constant time).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proto::client::ErrorCode;
use crate::proto::Id;

type HmacSha256 = Hmac<Sha256>;

/// How much work one password hash costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCost {
    /// OWASP's argon2id recommendation: 19 MiB of memory, 2 passes, 1 lane (about 20-40 ms
    /// of one core here).
    Standard,
    /// The algorithm's minimum (8 KiB, 1 pass): the simulation, where a default run logs in
    /// hundreds of devices and CPU time is the bottleneck. The same code and the same format;
    /// never for real passwords.
    Minimal,
}

impl PasswordCost {
    fn params(self) -> argon2::Params {
        let (m_kib, t) = match self {
            PasswordCost::Standard => (19 * 1024, 2),
            PasswordCost::Minimal => (argon2::Params::MIN_M_COST, 1),
        };
        argon2::Params::new(m_kib, t, 1, None).expect("valid argon2 parameters")
    }
}

/// Hashes and verifies passwords (see the module doc).
pub struct Passwords {
    argon: argon2::Argon2<'static>,
    /// Salts. A std mutex: held for 16 bytes of output.
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords")
    }
}

impl Passwords {
    pub fn new(cost: PasswordCost, rng: rand::rngs::StdRng) -> Self {
        Self {
            argon: argon2::Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                cost.params(),
            ),
            rng: std::sync::Mutex::new(rng),
        }
    }

    /// A new PHC string for `password`, with a fresh salt. CPU-heavy: call it off the async
    /// workers (`net::run_blocking`).
    pub fn hash(&self, password: &str) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        use rand::RngCore;
        let mut salt = [0u8; 16];
        self.rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).expect("16 bytes encode");
        self.argon
            .hash_password(password.as_bytes(), &salt)
            .expect("argon2 hashes any password")
            .to_string()
    }

    /// Whether `password` matches `stored` (a PHC string, or a legacy hash of `name`'s).
    /// Constant time in the password either way; a stored value of neither form never
    /// matches. CPU-heavy like [`Passwords::hash`].
    pub fn verify(&self, name: &str, password: &str, stored: &str) -> bool {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        if stored.starts_with('$') {
            // The stored string's own parameters (a later cost change keeps old hashes good).
            return PasswordHash::new(stored).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            });
        }
        use subtle::ConstantTimeEq;
        let legacy = legacy_password_hash(name, password);
        legacy.len() == stored.len() && bool::from(legacy.as_bytes().ct_eq(stored.as_bytes()))
    }

    /// Spends what a verification costs, for a name that does not exist (so that a login's
    /// time does not tell which names do).
    pub fn waste(&self, password: &str) {
        let _ = self.hash(password);
    }
}

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
/// The legacy password hash (salted SHA-256 hex): verified for records written before argon2.
pub fn legacy_password_hash(name: &str, password: &str) -> String {
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

    // Proves a password verifies against its own hash only, hashes of one password differ
    // (fresh salts), the PHC string names argon2id and its cost, legacy SHA-256 records still
    // verify (for their own name only), and garbage never matches.
    #[test]
    fn passwords_hash_and_verify() {
        use rand::SeedableRng;
        let p = Passwords::new(PasswordCost::Minimal, rand::rngs::StdRng::seed_from_u64(1));
        let h = p.hash("correct horse");
        assert!(h.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{h}");
        assert!(p.verify("alice", "correct horse", &h));
        assert!(!p.verify("alice", "correct hors", &h));
        assert_ne!(h, p.hash("correct horse"), "fresh salt per hash");
        let standard = Passwords::new(PasswordCost::Standard, rand::rngs::StdRng::seed_from_u64(2));
        let hs = standard.hash("pw");
        assert!(hs.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hs}");
        assert!(p.verify("bob", "pw", &hs), "verified with the stored cost");
        let legacy = legacy_password_hash("carol", "pw");
        assert!(p.verify("carol", "pw", &legacy));
        assert!(!p.verify("carol", "pw2", &legacy));
        assert!(!p.verify("dave", "pw", &legacy), "salted with the name");
        for garbage in ["", "$", "$argon2id$", "zz", &legacy[1..]] {
            assert!(!p.verify("carol", "pw", garbage), "{garbage:?}");
        }
    }

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
