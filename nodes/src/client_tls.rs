//! TLS between devices and the cluster: https for the api and `wss://` for chat servers.
//!
//! Apart from the nodes' mutual TLS ([`crate::tls`]): devices hold no certificate, and the
//! servers present one a browser accepts, from the config (`[client_tls]`: a certificate chain
//! and its key, PEM) or a self-signed pair that `chatd all-in-one` and `local-cluster` create
//! when none is given ([`self_signed`]).
//!
//! - [`ServerTls`]: the server's side, TLS 1.2 and 1.3, ALPN `http/1.1` (WebSocket starts as
//!   HTTP/1.1). The handshake runs inside each connection's task, under the caller's deadline,
//!   so a client that never finishes it holds only its own connection.
//! - [`ClientTls`]: what a client trusts: the public web roots (Mozilla's, from webpki-roots),
//!   plus any certificate it is told to trust (a self-signed one, a private CA).
//! - [`MaybeTls`]: one stream type for plain and TLS connections, so the api, the chat server
//!   and the client library run the same code either way.
//!
//! The simulation runs the same code when `--client-tls` is on, with an Ed25519 pair drawn
//! from the seed (fixed-length signatures keep message sizes, and so the run, deterministic).
//! For real the pair is ECDSA P-256: browsers do not accept Ed25519 certificates.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::net::Stream;
use crate::tls::{SecureStream, TlsError};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A connection from or to a device: plain TCP, or TLS over it.
pub enum MaybeTls {
    Plain(Stream),
    Tls(Box<SecureStream>),
}

impl MaybeTls {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The server side: the certificate devices see. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// From a PEM certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<ServerTls, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid(format!("certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Invalid(
                "the certificate file holds no PEM CERTIFICATE".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::Invalid(format!("private key: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            // Checks that the key matches the leaf certificate.
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// From the files of a `[client_tls]` table.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<ServerTls> {
        use anyhow::Context;
        let chain = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("read {}", key.display()))?;
        ServerTls::from_pem(&chain, &key_pem)
            .with_context(|| format!("client TLS from {} and {}", cert.display(), key.display()))
    }

    /// The server handshake over an accepted connection. No deadline of its own: callers
    /// bound it.
    pub async fn accept(&self, tcp: Stream) -> io::Result<MaybeTls> {
        let tls = self.acceptor.accept(tcp).await?;
        Ok(MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Server(
            tls,
        ))))
    }
}

/// What a client trusts. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    fn with_roots(roots: rustls::RootCertStore) -> ClientTls {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// The public web's roots only (a server with a certificate from a public CA).
    pub fn public_roots() -> ClientTls {
        Self::with_roots(public_roots())
    }

    /// The public web's roots and every certificate in `pem` (a self-signed server
    /// certificate, or a private CA).
    pub fn trusting_pem(pem: &[u8]) -> Result<ClientTls, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid(format!("trusted certificates: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::Invalid(
                "the file holds no PEM CERTIFICATE to trust".into(),
            ));
        }
        let mut roots = public_roots();
        for c in certs {
            roots.add(c)?;
        }
        Ok(Self::with_roots(roots))
    }

    /// Only `certs` (the simulation: its devices trust the run's own certificate).
    pub fn trusting_only(certs: &[CertificateDer<'static>]) -> Result<ClientTls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c.clone())?;
        }
        Ok(Self::with_roots(roots))
    }

    /// The client handshake with `host` (a DNS name or an IP address, as in the URL) over a
    /// connected stream. The server's certificate must be valid for `host`.
    pub async fn connect(&self, host: &str, tcp: Stream) -> io::Result<MaybeTls> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{host} is not a DNS name or IP address"),
                )
            })?
            .to_owned();
        let tls = self.connector.connect(name, tcp).await?;
        Ok(MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Client(
            tls,
        ))))
    }
}

fn public_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A self-signed certificate and its key, PEM.
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

/// The key of a self-signed pair.
pub enum KeyKind<'a> {
    /// ECDSA P-256 from the system's randomness (for real: every browser takes it).
    EcdsaP256,
    /// Ed25519 from `rng` (the simulation: same seed, same certificate).
    Ed25519(&'a mut dyn rand::RngCore),
}

/// A self-signed server certificate valid for `names` (DNS names or IP addresses; `localhost`
/// is always added). Not a CA: it can sign nothing else.
pub fn self_signed(names: &[String], key: KeyKind<'_>) -> Result<SelfSigned, TlsError> {
    let mut sans: Vec<String> = vec!["localhost".to_string()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let key = match key {
        KeyKind::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyKind::Ed25519(rng) => crate::tls::ed25519_key(rng)?,
    };
    let mut params = rcgen::CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chatsim (self-signed)");
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
    })
}

/// The host part of `host:port` (`[v6]:port` keeps its brackets off), and whether it is an
/// IP address.
pub fn host_of(hostport: &str) -> (&str, bool) {
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => hostport,
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    (bare, bare.parse::<IpAddr>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves a self-signed pair serves TLS that a client trusting it accepts, for an IP
    // address and for `localhost`, and that a client trusting only the public roots, or
    // dialling a name the certificate does not hold, is refused. Real sockets: real build.
    #[cfg(not(madsim))]
    #[tokio::test]
    async fn self_signed_pair_round_trip() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let pair = self_signed(&["127.0.0.1".to_string()], KeyKind::EcdsaP256).unwrap();
        let server =
            ServerTls::from_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let server = server.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = server.accept(Stream::new(tcp)).await {
                        let mut b = [0u8; 5];
                        if s.read_exact(&mut b).await.is_ok() {
                            let _ = s.write_all(&b).await;
                        }
                    }
                });
            }
        });
        let trusting = ClientTls::trusting_pem(pair.cert_pem.as_bytes()).unwrap();
        for host in ["127.0.0.1", "localhost"] {
            let tcp = Stream::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            let mut s = trusting.connect(host, tcp).await.unwrap();
            assert!(s.is_tls());
            s.write_all(b"hello").await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"hello");
        }
        let tcp = Stream::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let e = ClientTls::public_roots()
            .connect("127.0.0.1", tcp)
            .await
            .err()
            .expect("a self-signed certificate is not trusted by default");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        let tcp = Stream::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let e = trusting
            .connect("127.0.0.2", tcp)
            .await
            .err()
            .expect("the certificate does not name 127.0.0.2");
        assert!(e.to_string().contains("not valid for name"), "{e}");
    }

    #[test]
    fn bad_pem_is_refused_with_a_reason() {
        let e = ServerTls::from_pem(b"", b"").unwrap_err().to_string();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
        let pair = self_signed(&[], KeyKind::EcdsaP256).unwrap();
        let other = self_signed(&[], KeyKind::EcdsaP256).unwrap();
        // A key that is not the certificate's.
        assert!(ServerTls::from_pem(pair.cert_pem.as_bytes(), other.key_pem.as_bytes()).is_err());
        assert!(ClientTls::trusting_pem(b"junk").is_err());
    }

    #[test]
    fn host_of_urls() {
        assert_eq!(host_of("127.0.0.1:8443"), ("127.0.0.1", true));
        assert_eq!(host_of("chat.example.com:443"), ("chat.example.com", false));
        assert_eq!(host_of("[::1]:443"), ("::1", true));
        assert_eq!(host_of("localhost"), ("localhost", false));
    }
}
