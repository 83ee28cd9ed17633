//! Who may call a node: mutual TLS on every internal RPC connection, and what each caller may
//! ask.
//!
//! The cluster has its own certificate authority ([`ClusterCa`]). Every node, and the
//! operator's tools, hold a certificate it signed that names them by a SPIFFE id in the
//! certificate's URI name, `spiffe://chatsim/<role>/<index>` or `spiffe://chatsim/operator`
//! ([`Principal`]). A connection is TLS 1.3 both ways:
//! - the caller checks that the node it dialled holds a certificate of the cluster CA (every
//!   node certificate carries the DNS name [`CLUSTER_SERVER_NAME`]), and a caller that knows
//!   which node it wants (a client of a kv, presence, push, idgen or chat node, whose address
//!   comes from etcd: [`NodeTls::connect_to`]) also that the certificate names that node;
//! - the node requires the caller's certificate, checks it against the same CA, and reads the
//!   caller's principal from it. A caller without one never completes the handshake.
//!
//! [`authorize`] then decides per request: Raft traffic only from kv nodes, a chat server's
//! registration, presence subscription and re-assertion only from that chat server,
//! heartbeats and logouts only from chat servers, forced recovery only from the operator,
//! and everything else from any node of the cluster.
//!
//! Keys are Ed25519, drawn from the caller's random number generator: seeded in the
//! simulation (same seed, same certificates), from the operating system for real. The
//! handshake's own ephemeral keys come from the system in both worlds; they change bytes, not
//! lengths or timing, so a simulated run stays deterministic.
//!
//! Why mutual TLS rather than a handshake of our own: it is the standard, rustls is audited,
//! and it also encrypts what a node says (password hashes, message texts), which an
//! authentication-only handshake would not. The cost is measured by `node-capacity`.

use std::io;
use std::sync::Arc;

use rand::RngCore;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::cluster::Role;
use crate::net::Stream;
use crate::proto::internal::Request;

/// The trust domain of the cluster's SPIFFE ids.
pub const TRUST_DOMAIN: &str = "chatsim";
/// The DNS name every node certificate carries and every caller verifies.
pub const CLUSTER_SERVER_NAME: &str = "node.chatsim.internal";

/// A TLS stream over a node connection, either side.
pub type SecureStream = tokio_rustls::TlsStream<Stream>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Invalid(String),
}

/// Who is on the other end of a connection, from its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Principal {
    /// Node `index` of a role.
    Node(Role, u32),
    /// The operator's tools (`chatd status`, `chatd kv-recover`; the simulation's harness).
    Operator,
}

impl Principal {
    /// `spiffe://chatsim/kv/2`, `spiffe://chatsim/operator`.
    pub fn spiffe_id(&self) -> String {
        match self {
            Principal::Node(role, i) => format!("spiffe://{TRUST_DOMAIN}/{}/{i}", role.name()),
            Principal::Operator => format!("spiffe://{TRUST_DOMAIN}/operator"),
        }
    }

    pub fn from_spiffe_id(id: &str) -> Option<Principal> {
        let path = id.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?;
        let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        match parts.as_slice() {
            ["operator"] => Some(Principal::Operator),
            [role, index] => Some(Principal::Node(Role::from_name(role)?, index.parse().ok()?)),
            _ => None,
        }
    }

    /// The principal named by the URI name of a certificate (already verified by rustls).
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Option<Principal> {
        let cert = webpki::EndEntityCert::try_from(cert).ok()?;
        let mut ids = cert.valid_uri_names().filter_map(Principal::from_spiffe_id);
        let first = ids.next()?;
        // One identity per certificate: two would make the answer depend on their order.
        ids.next().is_none().then_some(first)
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node(role, i) => write!(f, "{}-{i}", role.name()),
            Principal::Operator => write!(f, "operator"),
        }
    }
}

/// Whether `who` may make request `req`; the reason if not.
pub fn authorize(who: &Principal, req: &Request) -> Result<(), String> {
    let chat_server = |server: u32| match who {
        Principal::Node(Role::Chat, i) if *i == server => Ok(()),
        _ => Err(format!(
            "only chat server {server} speaks for chat server {server}"
        )),
    };
    let role = |allowed: &[Role]| match who {
        Principal::Node(r, _) if allowed.contains(r) => Ok(()),
        _ => Err(format!(
            "{} is for {} nodes",
            request_name(req),
            allowed
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(" and ")
        )),
    };
    match req {
        Request::Shard { req, .. } => authorize(who, req),
        Request::RaftMessages { .. } | Request::KvJoin { .. } => role(&[Role::Kv]),
        Request::KvForceRecover { .. } => match who {
            Principal::Operator => Ok(()),
            _ => Err("forced recovery is the operator's".to_string()),
        },
        Request::RegisterChat { info } | Request::SubscribePresence { info } => {
            chat_server(info.server)
        }
        Request::PresenceReassert { server, .. } => chat_server(*server),
        Request::Heartbeat { .. } | Request::Logout { .. } | Request::Deliver { .. } => {
            role(&[Role::Chat])
        }
        Request::PresenceFanout { .. } => role(&[Role::Presence]),
        Request::EndSessions { .. } => match who {
            Principal::Node(Role::Api, _) | Principal::Operator => Ok(()),
            _ => Err("ending sessions is the api's (logout) or the operator's".to_string()),
        },
        _ => Ok(()),
    }
}

fn request_name(req: &Request) -> &'static str {
    match req {
        Request::RaftMessages { .. } => "raft traffic",
        Request::KvJoin { .. } => "joining a shard",
        Request::Heartbeat { .. } => "a heartbeat",
        Request::Logout { .. } => "a logout",
        Request::Deliver { .. } => "a delivery",
        Request::PresenceFanout { .. } => "a presence fanout",
        _ => "this request",
    }
}

/// An Ed25519 key from 32 bytes of `rng`, as a PKCS#8 v1 document (RFC 8410: a fixed
/// 16-byte header, then the seed).
pub(crate) fn ed25519_key(rng: &mut dyn RngCore) -> Result<rcgen::KeyPair, TlsError> {
    const HEADER: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = HEADER.to_vec();
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    der.extend_from_slice(&seed);
    Ok(rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der),
        &rcgen::PKCS_ED25519,
    )?)
}

fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chatsim cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A certificate the cluster CA signs for a node or a service: valid for `names`, for serving
/// and for dialling (mutual TLS both ways).
fn leaf_params(
    names: Vec<String>,
    common_name: &str,
) -> Result<rcgen::CertificateParams, TlsError> {
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The cluster's certificate authority: signs the certificate of every node and of the
/// operator. Its key stays where it was created (`<data>/tls/ca.key` for real).
pub struct ClusterCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl ClusterCa {
    /// A new CA with a key from `rng`.
    pub fn generate(rng: &mut dyn RngCore) -> Result<ClusterCa, TlsError> {
        Self::from_key(ed25519_key(rng)?)
    }

    /// The CA of `key_pem` (a key written by [`ClusterCa::key_pem`]). Its certificate is made
    /// again from the same fixed parameters and key: same subject, same key, so it verifies
    /// every certificate the CA signed before.
    pub fn from_key_pem(key_pem: &str) -> Result<ClusterCa, TlsError> {
        Self::from_key(rcgen::KeyPair::from_pem(key_pem)?)
    }

    fn from_key(key: rcgen::KeyPair) -> Result<ClusterCa, TlsError> {
        let params = ca_params();
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The revocation list of `serials` (certificates this CA issued, [`serial_of`]), signed,
    /// PEM. `number` orders successive lists; `now` is the issue time. Verifiers here
    /// ignore its next-update date (a list stays in force until replaced).
    pub fn revocation_list(
        &self,
        serials: &[Vec<u8>],
        number: u64,
        now: time::OffsetDateTime,
    ) -> Result<String, TlsError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(3650),
            crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// A server certificate for a service the cluster runs but is not a node of it (an etcd
    /// member): valid for `names` (IP addresses or DNS names), for serving and for dialling
    /// its peers; PEM certificate and key.
    pub fn issue_service(
        &self,
        common_name: &str,
        names: Vec<String>,
        rng: &mut dyn RngCore,
    ) -> Result<(String, String), TlsError> {
        let key = ed25519_key(rng)?;
        let params = leaf_params(names, common_name)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A certificate for `who`, with a fresh key from `rng`.
    pub fn issue(&self, who: Principal, rng: &mut dyn RngCore) -> Result<NodeCert, TlsError> {
        let key = ed25519_key(rng)?;
        let mut params = leaf_params(vec![CLUSTER_SERVER_NAME.to_string()], &who.to_string())?;
        let uri = rcgen::string::Ia5String::try_from(who.spiffe_id())?;
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert {
            principal: who,
            ca: self.cert_der(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// One principal's certificate and key, and the CA certificate it trusts.
pub struct NodeCert {
    pub principal: Principal,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl NodeCert {
    pub fn cert_pem(&self) -> String {
        pem_of("CERTIFICATE", &self.cert)
    }

    pub fn key_pem(&self) -> String {
        pem_of("PRIVATE KEY", self.key.secret_pkcs8_der())
    }

    /// Reads what [`NodeCert::cert_pem`] and [`NodeCert::key_pem`] wrote, with the CA
    /// certificate `ca_pem`.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeCert, TlsError> {
        let ca = der_of("CERTIFICATE", ca_pem)?;
        let cert = CertificateDer::from(der_of("CERTIFICATE", cert_pem)?);
        let key = PrivatePkcs8KeyDer::from(der_of("PRIVATE KEY", key_pem)?);
        let principal = Principal::of_certificate(&cert).ok_or_else(|| {
            TlsError::Invalid("the certificate names no chatsim principal".into())
        })?;
        Ok(NodeCert {
            principal,
            ca: CertificateDer::from(ca),
            cert,
            key,
        })
    }
}

fn pem_of(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

fn der_of(tag: &str, text: &str) -> Result<Vec<u8>, TlsError> {
    let p = pem::parse(text).map_err(|e| TlsError::Invalid(format!("{tag}: {e}")))?;
    if p.tag() != tag {
        return Err(TlsError::Invalid(format!(
            "expected a PEM {tag}, found {}",
            p.tag()
        )));
    }
    Ok(p.into_contents())
}

/// A node's side of mutual TLS: dials with its certificate, accepts only callers holding one of
/// the cluster's. Cheap to clone.
#[derive(Clone)]
pub struct NodeTls {
    inner: Arc<Inner>,
}

struct Inner {
    principal: Principal,
    /// The CA certificate, this node's certificate and its key, PEM: what other TLS clients
    /// of this node present (the etcd client, which brings its own TLS stack).
    pem: PemIdentity,
    cert: NodeCert,
    /// Replaced whole when the revocation list changes ([`NodeTls::set_revoked`]).
    current: std::sync::RwLock<Current>,
    /// The `unauthenticated-rpc` canary: callers without a certificate are accepted too.
    accept_anonymous: bool,
}

/// The TLS configurations in force, and the serials they refuse.
struct Current {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    revoked: RevocationList,
}

/// Revoked node certificates: the CA's signed list (checked in every handshake, both ways)
/// and its serial numbers (checked on every request of a connection made before the
/// revocation).
#[derive(Clone, Default)]
pub struct RevocationList {
    crl: Option<rustls::pki_types::CertificateRevocationListDer<'static>>,
    serials: std::collections::BTreeSet<Vec<u8>>,
}

impl RevocationList {
    /// From a PEM `X509 CRL` the cluster CA signed ([`ClusterCa::revocation_list`]).
    pub fn from_pem(text: &str) -> Result<RevocationList, TlsError> {
        let der = der_of("X509 CRL", text)?;
        let (_, crl) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| TlsError::Invalid(format!("revocation list: {e}")))?;
        let serials = crl
            .iter_revoked_certificates()
            .map(|r| normal_serial(r.raw_serial()))
            .collect();
        Ok(RevocationList {
            crl: Some(der.into()),
            serials,
        })
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// The revoked serials ([`serial_of`]).
    pub fn serials(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.serials.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// A serial number's bytes without leading zeros (DER may add one to keep it positive).
fn normal_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

/// The serial number of a certificate (DER), normalized as in a [`RevocationList`].
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    let (_, c) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Invalid(format!("certificate: {e}")))?;
    Ok(normal_serial(c.raw_serial()))
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeTls({})", self.inner.principal)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's identity as PEM text.
#[derive(Clone)]
pub struct PemIdentity {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Current {
    fn build(
        cert: &NodeCert,
        accept_anonymous: bool,
        revoked: RevocationList,
    ) -> Result<Current, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.ca.clone())?;
        let roots = Arc::new(roots);
        let crls: Vec<_> = revoked.crl.iter().cloned().collect();
        let key = PrivateKeyDer::Pkcs8(cert.key.clone_key());
        // The node dialled must not hold a revoked certificate either.
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .with_crls(crls.clone())
                .build()
                .map_err(|e| TlsError::Invalid(format!("server verifier: {e}")))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(vec![cert.cert.clone()], key.clone_key())?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .with_crls(crls);
        let verifier = if accept_anonymous {
            verifier.allow_unauthenticated().build()?
        } else {
            verifier.build()?
        };
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.cert.clone()], key)?;
        Ok(Current {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            revoked,
        })
    }
}

impl NodeTls {
    pub fn new(cert: NodeCert, accept_anonymous: bool) -> Result<NodeTls, TlsError> {
        Self::with_revoked(cert, accept_anonymous, RevocationList::default())
    }

    /// A node's TLS refusing the certificates `revoked` lists.
    pub fn with_revoked(
        cert: NodeCert,
        accept_anonymous: bool,
        revoked: RevocationList,
    ) -> Result<NodeTls, TlsError> {
        let pem = PemIdentity {
            ca: pem_of("CERTIFICATE", &cert.ca),
            cert: cert.cert_pem(),
            key: cert.key_pem(),
        };
        let current = Current::build(&cert, accept_anonymous, revoked)?;
        Ok(NodeTls {
            inner: Arc::new(Inner {
                principal: cert.principal,
                pem,
                cert,
                current: std::sync::RwLock::new(current),
                accept_anonymous,
            }),
        })
    }

    /// Puts a new revocation list in force: handshakes from now on check it, and so does
    /// every request of a connection accepted before ([`NodeTls::is_revoked`]).
    pub fn set_revoked(&self, revoked: RevocationList) -> Result<(), TlsError> {
        let next = Current::build(&self.inner.cert, self.inner.accept_anonymous, revoked)?;
        *self.inner.current.write().expect("not poisoned") = next;
        Ok(())
    }

    /// Whether the certificate with this serial ([`serial_of`]) is revoked now.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        let current = self.inner.current.read().expect("not poisoned");
        current.revoked.serials.contains(serial)
    }

    /// How many certificates the list in force revokes.
    pub fn revoked_count(&self) -> usize {
        self.inner
            .current
            .read()
            .expect("not poisoned")
            .revoked
            .len()
    }

    fn connector(&self) -> TlsConnector {
        self.inner
            .current
            .read()
            .expect("not poisoned")
            .connector
            .clone()
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.inner
            .current
            .read()
            .expect("not poisoned")
            .acceptor
            .clone()
    }

    /// This node's certificate, key and CA as PEM.
    pub fn pem_identity(&self) -> &PemIdentity {
        &self.inner.pem
    }

    /// The serial number of this node's own certificate ([`serial_of`]).
    pub fn serial(&self) -> Vec<u8> {
        serial_of(&self.inner.cert.cert).expect("our own certificate parses")
    }

    /// Who this node is.
    pub fn principal(&self) -> Principal {
        self.inner.principal
    }

    /// The client handshake over a connected stream.
    pub async fn connect(&self, tcp: Stream) -> io::Result<SecureStream> {
        self.connect_to(tcp, None).await
    }

    /// The client handshake, and, when `expect` names a node, the proof that the node on the
    /// other end is that one: its certificate must name `expect`. A caller that found the
    /// address somewhere it does not fully trust (a kv node's address in etcd) dials so: an
    /// address pointing at another cluster node gets nothing from this caller.
    pub async fn connect_to(
        &self,
        tcp: Stream,
        expect: Option<Principal>,
    ) -> io::Result<SecureStream> {
        let name = ServerName::try_from(CLUSTER_SERVER_NAME).expect("a valid DNS name");
        let tls = self.connector().connect(name, tcp).await?;
        if let Some(want) = expect {
            let found = match tls.get_ref().1.peer_certificates() {
                Some([leaf, ..]) => Principal::of_certificate(leaf),
                _ => None,
            };
            if found != Some(want) {
                let found =
                    found.map_or_else(|| "no chatsim principal".to_string(), |p| p.to_string());
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("expected {want} there, found {found}"),
                ));
            }
        }
        Ok(tokio_rustls::TlsStream::Client(tls))
    }

    /// The server handshake over an accepted stream, and the caller: its principal and its
    /// certificate's serial. `None` only under the `unauthenticated-rpc` canary (a caller
    /// without a certificate).
    pub async fn accept(&self, tcp: Stream) -> io::Result<(SecureStream, Option<Caller>)> {
        let tls = self.acceptor().accept(tcp).await?;
        let who = match tls.get_ref().1.peer_certificates() {
            Some([leaf, ..]) => {
                let denied = |what: &str| io::Error::new(io::ErrorKind::PermissionDenied, what);
                let principal = Principal::of_certificate(leaf)
                    .ok_or_else(|| denied("the caller's certificate names no chatsim principal"))?;
                let serial = serial_of(leaf)
                    .map_err(|_| denied("the caller's certificate has no readable serial"))?;
                Some(Caller { principal, serial })
            }
            _ if self.inner.accept_anonymous => None,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the caller presented no certificate",
                ))
            }
        };
        Ok((tokio_rustls::TlsStream::Server(tls), who))
    }

    /// Whether the `unauthenticated-rpc` canary is on: anonymous callers pass [`authorize`].
    pub fn accepts_anonymous(&self) -> bool {
        self.inner.accept_anonymous
    }
}

/// Who called, from the certificate it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// The certificate's serial ([`serial_of`]): revocation is checked by it per request.
    pub serial: Vec<u8>,
}

/// What an outsider without a certificate does: a TLS client that trusts the cluster CA (its
/// certificate is no secret) and presents none. For tests and the simulation's rogue node.
pub async fn connect_anonymous(
    ca: &CertificateDer<'static>,
    tcp: Stream,
) -> io::Result<SecureStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(CLUSTER_SERVER_NAME).expect("a valid DNS name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(tokio_rustls::TlsStream::Client(tls))
}

/// A cluster's worth of certificates made in memory: the simulation's, and tests'.
pub struct TestCa {
    ca: ClusterCa,
    rng: rand::rngs::StdRng,
}

impl TestCa {
    pub fn new(seed: u64) -> TestCa {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ca = ClusterCa::generate(&mut rng).expect("an Ed25519 CA from a seed");
        TestCa { ca, rng }
    }

    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// `who`'s mutual TLS; `accept_anonymous` for the `unauthenticated-rpc` canary.
    pub fn node(&mut self, who: Principal, accept_anonymous: bool) -> NodeTls {
        let cert = self.ca.issue(who, &mut self.rng).expect("a certificate");
        NodeTls::new(cert, accept_anonymous).expect("a TLS config from our own certificate")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip() {
        for p in [
            Principal::Node(Role::Kv, 2),
            Principal::Node(Role::Chat, 0),
            Principal::Operator,
        ] {
            assert_eq!(Principal::from_spiffe_id(&p.spiffe_id()), Some(p));
        }
        assert_eq!(Principal::from_spiffe_id("spiffe://other/kv/1"), None);
        assert_eq!(Principal::from_spiffe_id("spiffe://chatsim/kv"), None);
        assert_eq!(Principal::from_spiffe_id("spiffe://chatsim/wizard/1"), None);
    }

    #[test]
    fn issued_certificates_name_their_principal_and_reload() {
        let mut ca = TestCa::new(7);
        let who = Principal::Node(Role::Presence, 3);
        let cert = ca.ca.issue(who, &mut ca.rng).unwrap();
        assert_eq!(Principal::of_certificate(&cert.cert), Some(who));
        let again =
            NodeCert::from_pem(&ca.ca.cert_pem(), &cert.cert_pem(), &cert.key_pem()).unwrap();
        assert_eq!(again.principal, who);
        assert_eq!(again.cert, cert.cert);
        // The CA made again from its key signs certificates the old CA certificate verifies.
        let reloaded = ClusterCa::from_key_pem(&ca.ca.key_pem()).unwrap();
        assert_eq!(reloaded.cert_der(), ca.ca.cert_der());
    }

    #[test]
    fn same_seed_same_certificates() {
        let a = TestCa::new(1).ca.cert_der();
        let b = TestCa::new(1).ca.cert_der();
        let c = TestCa::new(2).ca.cert_der();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn authorization_by_role() {
        use crate::proto::internal::ChatServerInfo;
        let info = |server| ChatServerInfo {
            server,
            ws_addr: String::new(),
            tls: false,
            rpc_addr: String::new(),
            load: 0,
        };
        let chat1 = Principal::Node(Role::Chat, 1);
        let api = Principal::Node(Role::Api, 0);
        let kv = Principal::Node(Role::Kv, 0);
        assert!(authorize(&chat1, &Request::RegisterChat { info: info(1) }).is_ok());
        assert!(authorize(&chat1, &Request::RegisterChat { info: info(2) }).is_err());
        assert!(authorize(&api, &Request::RegisterChat { info: info(1) }).is_err());
        let raft = Request::RaftMessages {
            shard: 0,
            msgs: vec![],
        };
        assert!(authorize(&kv, &raft).is_ok());
        assert!(authorize(&api, &raft).is_err());
        let wrapped = Request::Shard {
            shard: 0,
            req: Box::new(Request::KvForceRecover { shard: 0 }),
        };
        assert!(authorize(&kv, &wrapped).is_err());
        assert!(authorize(&Principal::Operator, &wrapped).is_ok());
        assert!(authorize(
            &api,
            &Request::Heartbeat {
                user: 1,
                device: 1,
                at_ms: 0
            }
        )
        .is_err());
        assert!(authorize(&api, &Request::ListChat).is_ok());
    }
}
