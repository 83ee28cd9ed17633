//! Serving an axum `Router` over hyper's HTTP/1.1 connections, in both worlds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use super::routes::{router, ApiState};
use crate::auth::TokenKey;
use crate::cluster::Peers;
use crate::net::{self, SimTimer, Stream};

#[derive(Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub peers: Arc<Peers>,
    pub token_key: TokenKey,
}

/// A client that has not sent its request headers within this time is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(cfg: ApiConfig) -> anyhow::Result<()> {
    let listener = net::bind(cfg.listen).await?;
    let app = router(Arc::new(ApiState {
        peers: cfg.peers.clone(),
        token_key: cfg.token_key.clone(),
    }));
    tracing::info!(listen = %cfg.listen, "api node up");
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "api accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(SimTimer)
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(Stream::new(tcp)), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}
