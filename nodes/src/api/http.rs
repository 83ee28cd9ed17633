//! Serving an axum `Router` over hyper's HTTP/1.1 connections, in both worlds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use super::routes::{router, ApiState};
use crate::auth::{PasswordCost, Passwords, TokenKey};
use crate::client_tls::{MaybeTls, ServerTls};
use crate::cluster::Peers;
use crate::metrics::{self, Metrics};
use crate::net::{self, SimTimer, Stream};

#[derive(Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub peers: Arc<Peers>,
    pub token_key: TokenKey,
    /// The work one password hash costs (`Minimal` only in the simulation).
    pub password_cost: PasswordCost,
    /// The node's counters (all-in-one passes the process's shared one); `/metrics` is on the
    /// admin address (`metrics::serve`), not here.
    pub metrics: Arc<Metrics>,
    /// https instead of http (`[client_tls]`); `None` serves plain HTTP.
    pub tls: Option<ServerTls>,
}

/// The source address of a request's connection (set by [`serve_router`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

/// A client that has not sent its request headers within this time is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(cfg: ApiConfig) -> anyhow::Result<()> {
    cfg.peers.spawn_membership(None);
    let listener = net::bind(cfg.listen).await?;
    let app = router(Arc::new(ApiState {
        peers: cfg.peers.clone(),
        token_key: cfg.token_key.clone(),
        passwords: Arc::new(Passwords::new(cfg.password_cost, crate::net::node_rng())),
        login_throttle: Default::default(),
        metrics: cfg.metrics.clone(),
    }))
    .merge(metrics::health_routes(metrics::alive()));
    tracing::info!(listen = %cfg.listen, "api node up");
    serve_router(listener, app, HEADER_READ_TIMEOUT, cfg.tls).await
}

/// Serves `app` on every connection `listener` accepts (HTTP/1.1, over TLS with `tls`), until
/// the process ends. The TLS handshake and the request headers each have
/// `header_read_timeout`.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    tls: Option<ServerTls>,
) -> anyhow::Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "api accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Every request of the connection carries its source address (login throttling).
        let svc = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ClientAddr(peer.ip()));
                req
            },
        ));
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream = match tls {
                None => MaybeTls::Plain(Stream::new(tcp)),
                Some(tls) => {
                    match tokio::time::timeout(header_read_timeout, tls.accept(Stream::new(tcp)))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "tls handshake timed out");
                            return;
                        }
                    }
                }
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(SimTimer)
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}
