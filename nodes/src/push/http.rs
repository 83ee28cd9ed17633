//! The HTTP side the platform adapters share: one pooled client per provider (TLS by rustls
//! with the webpki root certificates; HTTP/2 by ALPN on https, or by prior knowledge on plain
//! http when the provider insists on HTTP/2), a bound on requests in flight, and a timeout on
//! every request. Plain http exists for test stubs on loopback; the default endpoints are all
//! https.
//!
//! Does not retry and does not read statuses beyond [`classify`]: each adapter maps its
//! platform's answers.
//!
//! Names are resolved by [`PublicResolver`]: for a provider whose endpoints users supply (Web
//! Push) it keeps only public addresses, so a subscription whose public-looking name
//! resolves to a private address (which registration cannot see) is never connected to.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use super::PushError;

/// Largest response body read from a platform (their error bodies are a few hundred bytes;
/// a larger one is cut off with an error).
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// Which HTTP versions a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Versions {
    /// APNs: HTTP/2 only (ALPN h2 on https, prior knowledge on plain http).
    Http2Only,
    /// HTTP/1.1 or HTTP/2, whichever the server offers by ALPN (HTTP/1.1 on plain http).
    Any,
}

/// Resolves names with the system's resolver (on a blocking thread, as hyper's own does);
/// with `public_only`, drops every internal address (`proto::client::internal_ip`) and
/// fails a name that has none left. An IP literal never reaches a resolver: Web Push
/// registration refuses internal ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublicResolver {
    public_only: bool,
}

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for PublicResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let public_only = self.public_only;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            public_addrs(&host, addrs, public_only).map(Vec::into_iter)
        })
    }
}

/// `addrs` without internal ones when `public_only`; an error if none is left.
fn public_addrs(
    host: &str,
    addrs: Vec<std::net::SocketAddr>,
    public_only: bool,
) -> std::io::Result<Vec<std::net::SocketAddr>> {
    if !public_only {
        return Ok(addrs);
    }
    let kept: Vec<_> = addrs
        .into_iter()
        .filter(|a| !crate::proto::client::internal_ip(a.ip()))
        .collect();
    if kept.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves only to internal addresses: not a public push service"),
        ));
    }
    Ok(kept)
}

/// A platform's answer: status and (bounded) body.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// One provider's HTTP client.
pub(crate) struct HttpSender {
    /// For messages: `apns`, `fcm`, `webpush`.
    name: &'static str,
    client: Client<HttpsConnector<HttpConnector<PublicResolver>>, Full<Bytes>>,
    /// Requests in flight. When all permits are out, further callers wait in line (tokio's
    /// semaphore is fair) and their request timeout starts only once they hold a permit; the
    /// push server's own caller times out and retries meanwhile, which the push claims in kv
    /// make safe.
    in_flight: Semaphore,
    /// Whole request: connect, TLS, send, and read the answer.
    timeout: Duration,
}

impl HttpSender {
    /// `public_only`: connect only to public addresses (see [`PublicResolver`]).
    pub(crate) fn new(
        name: &'static str,
        versions: Versions,
        in_flight_max: usize,
        timeout: Duration,
        public_only: bool,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            in_flight_max > 0,
            "{name}: in_flight_max must be at least 1"
        );
        anyhow::ensure!(!timeout.is_zero(), "{name}: timeout_ms must be at least 1");
        let mut tcp = HttpConnector::new_with_resolver(PublicResolver { public_only });
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http();
        let connector = match versions {
            Versions::Http2Only => tls.enable_http2().wrap_connector(tcp),
            Versions::Any => tls.enable_all_versions().wrap_connector(tcp),
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(versions == Versions::Http2Only)
            .build(connector);
        Ok(Self {
            name,
            client,
            in_flight: Semaphore::new(in_flight_max),
            timeout,
        })
    }

    /// Sends one request and reads the answer, within the timeout. Transport failures and
    /// the timeout are `Unreachable`; any status is an `Answer`.
    pub(crate) async fn send(&self, req: Request<Full<Bytes>>) -> Result<Answer, PushError> {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                PushError::Unreachable(format!("{}: {}", self.name, error_chain(&e)))
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| {
                    PushError::Unreachable(format!(
                        "{}: reading the answer: {}",
                        self.name,
                        error_chain(e.as_ref())
                    ))
                })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(PushError::Unreachable(format!(
                "{}: no answer within {} ms",
                self.name,
                self.timeout.as_millis()
            ))),
        }
    }
}

/// An error and its sources, `: `-separated (hyper's own message is only "client error").
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A non-success status as an error: 429 and 5xx are `Unreachable` (try again later), every
/// other status `Refused` (this request will not succeed as it is). `what` names the platform
/// and its reason, e.g. `apns 410 Unregistered`.
pub(crate) fn classify(status: StatusCode, what: String) -> PushError {
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        PushError::Unreachable(what)
    } else {
        PushError::Refused(what)
    }
}

/// The first bytes of a body as text, for error messages.
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    const EXCERPT_CHARS_MAX: usize = 200;
    String::from_utf8_lossy(body)
        .chars()
        .take(EXCERPT_CHARS_MAX)
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the resolver keeps public addresses, drops internal ones, and fails a name with
    // only internal addresses; and that `localhost` (really resolved) is refused to a
    // public-only sender and allowed to another.
    #[tokio::test]
    async fn public_only_resolution() {
        let a = |s: &str| -> std::net::SocketAddr { s.parse().unwrap() };
        let mixed = vec![a("10.0.0.7:0"), a("93.184.216.34:0"), a("[fd00::1]:0")];
        assert_eq!(
            public_addrs("push.example", mixed.clone(), true).unwrap(),
            vec![a("93.184.216.34:0")]
        );
        assert_eq!(public_addrs("push.example", mixed, false).unwrap().len(), 3);
        let err = public_addrs("evil.example", vec![a("127.0.0.1:0")], true).unwrap_err();
        assert!(
            err.to_string().contains("only to internal addresses"),
            "{err}"
        );

        use tower::Service;
        let name: hyper_util::client::legacy::connect::dns::Name = "localhost".parse().unwrap();
        let refused = PublicResolver { public_only: true }
            .call(name.clone())
            .await;
        assert!(refused.is_err(), "localhost is internal");
        let allowed = PublicResolver { public_only: false }
            .call(name)
            .await
            .unwrap();
        assert!(allowed.count() > 0);
    }
}
