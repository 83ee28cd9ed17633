//! JSON Web Tokens as the push platforms ask for them (RFC 7519, compact form): ES256 for
//! APNs provider tokens and VAPID (RFC 8292), RS256 for the FCM OAuth2 assertion. Also the
//! base64url helpers the adapters share. Signs only; never verifies (the platforms do).

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use super::PushError;

/// base64url without padding (JWT segments, VAPID `k=`, RFC 8291 keys).
pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url with or without `=` padding (browsers and tools differ).
pub(crate) fn b64url_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(text.trim().trim_end_matches('='))
}

/// A private key that signs JWTs with one algorithm.
pub(crate) enum Signer {
    /// ECDSA P-256 with SHA-256, signatures as r || s (64 bytes), as JWS wants.
    Es256(EcdsaKeyPair),
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256(RsaKeyPair),
}

impl Signer {
    /// A P-256 key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, like an APNs `.p8` file).
    /// The PKCS#8 must carry the public key, as Apple's and OpenSSL's do.
    pub(crate) fn es256_from_pem(pem: &str) -> anyhow::Result<Self> {
        let der = pkcs8_der(pem)?;
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
                .map_err(|e| anyhow::anyhow!("not a P-256 PKCS#8 key with its public key: {e}"))?;
        Ok(Signer::Es256(key))
    }

    /// A P-256 key from its raw private scalar (32 bytes) and uncompressed public point (65
    /// bytes): the form `web-push generate-vapid-keys` prints, base64url-decoded.
    pub(crate) fn es256_from_raw(private: &[u8], public: &[u8]) -> anyhow::Result<Self> {
        let key = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            private,
            public,
            &SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("not a matching P-256 key pair: {e}"))?;
        Ok(Signer::Es256(key))
    }

    /// An RSA key (2048 to 8192 bits) from PKCS#8 PEM, as in a Google service-account file.
    pub(crate) fn rs256_from_pem(pem: &str) -> anyhow::Result<Self> {
        let der = pkcs8_der(pem)?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| anyhow::anyhow!("not an RSA PKCS#8 key: {e}"))?;
        Ok(Signer::Rs256(key))
    }

    /// The public key: for ES256 the uncompressed point (VAPID's `k=`).
    pub(crate) fn public_key(&self) -> &[u8] {
        match self {
            Signer::Es256(k) => k.public_key().as_ref(),
            Signer::Rs256(k) => k.public_key().as_ref(),
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Signer::Es256(_) => "ES256",
            Signer::Rs256(_) => "RS256",
        }
    }

    /// `header.claims.signature`; `alg` is added to `header` (an object).
    pub(crate) fn sign(
        &self,
        mut header: serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, PushError> {
        header["alg"] = self.alg().into();
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let failed = |_| PushError::Unreachable(format!("{} signing failed", self.alg()));
        let signature = match self {
            Signer::Es256(k) => k
                .sign(&rng, signing_input.as_bytes())
                .map_err(failed)?
                .as_ref()
                .to_vec(),
            Signer::Rs256(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
                    .map_err(failed)?;
                sig
            }
        };
        Ok(format!("{signing_input}.{}", b64url(&signature)))
    }
}

/// The DER of the one PKCS#8 private key in `pem`.
fn pkcs8_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).context("no PEM private key")?;
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(_) => {
            bail!("an EC PRIVATE KEY (SEC1) PEM; convert it with `openssl pkcs8 -topk8 -nocrypt`")
        }
        PrivateKeyDer::Pkcs1(_) => bail!(
            "an RSA PRIVATE KEY (PKCS#1) PEM; convert it with `openssl pkcs8 -topk8 -nocrypt`"
        ),
        _ => bail!("an unsupported private key format; PKCS#8 PEM expected"),
    }
}
