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

impl Claims {
    /// When the token was issued: every token lives `TOKEN_TTL_MS` from then.
    pub fn issued_at_ms(&self) -> u64 {
        self.expires_at_ms
            .saturating_sub(crate::limits::TOKEN_TTL_MS)
    }
}

/// The signing keys shared by api and chat nodes: a key ring. Tokens are signed with the
/// newest key (the highest id) and verified with the key their id names, so a key is rotated
/// without logging anyone out: add the new key to every node, and remove the old one once
/// the tokens it signed have expired (`TOKEN_TTL_MS`).
#[derive(Clone)]
pub struct TokenKey {
    /// Secrets by key id.
    keys: std::collections::BTreeMap<u32, Vec<u8>>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TokenKey(ids {:?})",
            self.keys.keys().collect::<Vec<_>>()
        )
    }
}

impl TokenKey {
    /// One key.
    pub fn new(key_id: u32, secret: impl Into<Vec<u8>>) -> Self {
        Self::ring([(key_id, secret.into())])
    }

    /// Several keys by id; the highest signs.
    ///
    /// # Panics
    /// On an empty ring (the config refuses one first).
    pub fn ring(keys: impl IntoIterator<Item = (u32, Vec<u8>)>) -> Self {
        let keys: std::collections::BTreeMap<u32, Vec<u8>> = keys.into_iter().collect();
        assert!(!keys.is_empty(), "a token key ring needs a key");
        Self { keys }
    }

    /// The id of the key that signs.
    pub fn signing_key_id(&self) -> u32 {
        *self.keys.keys().next_back().expect("a non-empty ring")
    }

    fn mac(secret: &[u8], payload: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(payload);
        mac
    }

    pub fn sign(&self, user: Id, device: Id, expires_at_ms: u64) -> String {
        let key_id = self.signing_key_id();
        let claims = Claims {
            user,
            device,
            expires_at_ms,
            key_id,
        };
        let payload = serde_json::to_vec(&claims).expect("claims serialize");
        let sig = Self::mac(&self.keys[&key_id], &payload)
            .finalize()
            .into_bytes();
        format!("{}.{}", hex::encode(&payload), hex::encode(sig))
    }

    /// Checks the signature with the key the token names, and the expiry at `now_ms`. (Not
    /// revocation: that is in the user's record, `UserRecord::accepts`.)
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, ErrorCode> {
        let (payload_hex, sig_hex) = token.split_once('.').ok_or(ErrorCode::BadToken)?;
        let payload = hex::decode(payload_hex).map_err(|_| ErrorCode::BadToken)?;
        let sig = hex::decode(sig_hex).map_err(|_| ErrorCode::BadToken)?;
        // The key id is read before the signature is checked, only to choose the key; the
        // claims are trusted once the signature is good.
        #[derive(Deserialize)]
        struct KeyId {
            key_id: u32,
        }
        let named: KeyId = serde_json::from_slice(&payload).map_err(|_| ErrorCode::BadToken)?;
        let secret = self.keys.get(&named.key_id).ok_or(ErrorCode::BadToken)?;
        Self::mac(secret, &payload)
            .verify_slice(&sig)
            .map_err(|_| ErrorCode::BadToken)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| ErrorCode::BadToken)?;
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

    #[test]
    fn a_key_ring_rotates_without_logging_anyone_out() {
        let (k1, k2) = (b"one".repeat(11), b"two".repeat(11));
        let old = TokenKey::new(1, k1.clone());
        let token = old.sign(7, 70, 10_000);
        // Both keys: the old token still verifies, new tokens are signed with key 2.
        let ring = TokenKey::ring([(1, k1.clone()), (2, k2.clone())]);
        assert_eq!(ring.verify(&token, 0).unwrap().user, 7);
        let fresh = ring.sign(7, 71, 10_000);
        assert_eq!(ring.verify(&fresh, 0).unwrap().key_id, 2);
        assert_eq!(old.verify(&fresh, 0), Err(ErrorCode::BadToken));
        // Key 1 retired: its tokens are refused, key 2's still verify.
        let retired = TokenKey::new(2, k2);
        assert_eq!(retired.verify(&token, 0), Err(ErrorCode::BadToken));
        assert!(retired.verify(&fresh, 0).is_ok());
        // A token naming key 2 but signed with key 1 is refused.
        let mut forged = Claims {
            user: 8,
            device: 80,
            expires_at_ms: 10_000,
            key_id: 2,
        };
        let payload = serde_json::to_vec(&forged).unwrap();
        let sig = TokenKey::mac(&k1, &payload).finalize().into_bytes();
        let t = format!("{}.{}", hex::encode(&payload), hex::encode(sig));
        assert_eq!(ring.verify(&t, 0), Err(ErrorCode::BadToken));
        forged.key_id = 9;
        let payload = serde_json::to_vec(&forged).unwrap();
        let sig = TokenKey::mac(&k1, &payload).finalize().into_bytes();
        let t = format!("{}.{}", hex::encode(&payload), hex::encode(sig));
        assert_eq!(
            ring.verify(&t, 0),
            Err(ErrorCode::BadToken),
            "unknown key id"
        );
        assert_eq!(ring.verify(&fresh, 10_000), Err(ErrorCode::TokenExpired));
    }

    #[test]
    fn a_user_record_refuses_revoked_tokens() {
        use crate::proto::internal::UserRecord;
        let key = TokenKey::new(1, b"k".repeat(32));
        let ttl = crate::limits::TOKEN_TTL_MS;
        let claims =
            |device, issued: u64| key.verify(&key.sign(7, device, issued + ttl), 0).unwrap();
        let mut u = UserRecord {
            user: 7,
            name: "u".into(),
            password_hash: String::new(),
            devices: vec![70, 71],
            friends: Default::default(),
            channels: Vec::new(),
            push_targets: Default::default(),
            revoked_before_ms: Default::default(),
            friend_requests: Default::default(),
            group_invites: Default::default(),
            revoked_all_before_ms: 0,
        };
        assert_eq!(u.accepts(&claims(70, 1_000)), Ok(()));
        assert_eq!(
            u.accepts(&claims(72, 1_000)),
            Err(ErrorCode::TokenRevoked),
            "not its device"
        );
        u.revoked_before_ms.insert(70, 1_000);
        assert_eq!(u.accepts(&claims(70, 1_000)), Err(ErrorCode::TokenRevoked));
        assert_eq!(
            u.accepts(&claims(70, 1_001)),
            Ok(()),
            "a login after the logout"
        );
        assert_eq!(u.accepts(&claims(71, 1_000)), Ok(()), "another device");
        u.revoked_all_before_ms = 2_000;
        assert_eq!(u.accepts(&claims(71, 1_500)), Err(ErrorCode::TokenRevoked));
        assert_eq!(u.accepts(&claims(70, 2_500)), Ok(()));
    }

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
