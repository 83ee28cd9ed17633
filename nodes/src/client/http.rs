//! A small HTTP/1.1 JSON client over hyper, one connection per request (api nodes are
//! stateless and sit behind a load balancer; a keep-alive pool is an optimisation left out).
//! https when given a [`ClientTls`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ClientError;
use crate::client_tls::{ClientTls, MaybeTls};
use crate::net;
use crate::proto::client::ErrorBody;

/// Deadline of one request, connect included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct HttpClient {
    pub addr: SocketAddr,
    pub token: Option<String>,
    /// https, trusting these roots; `None`: plain http.
    pub tls: Option<ClientTls>,
    /// The name the server's certificate must hold and the `Host` header (a DNS name from
    /// the URL); default: the address.
    pub host: Option<String>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            token: None,
            tls: None,
            host: None,
        }
    }

    /// https to `addr`, checking the certificate against `tls` for `host` (default: the IP).
    pub fn with_tls(mut self, tls: Option<ClientTls>, host: Option<String>) -> Self {
        self.tls = tls;
        self.host = host;
        self
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialize");
        self.request("POST", path, Bytes::from(bytes)).await
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.request("GET", path, Bytes::new()).await
    }

    pub async fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.request("DELETE", path, Bytes::new()).await
    }

    /// Sends raw bytes (tests use it for malformed bodies).
    pub async fn request<R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<R, ClientError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    async fn request_inner<R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<R, ClientError> {
        let tcp = net::connect(self.addr).await?;
        let host_header = match &self.host {
            Some(h) => format!("{h}:{}", self.addr.port()),
            None => self.addr.to_string(),
        };
        let stream = match &self.tls {
            None => MaybeTls::Plain(tcp),
            Some(tls) => {
                let name = self
                    .host
                    .clone()
                    .unwrap_or_else(|| self.addr.ip().to_string());
                tls.connect(&name, tcp).await?
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host_header)
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if status >= 400 {
            let err: ErrorBody = serde_json::from_slice(&bytes).map_err(|_| {
                ClientError::BadResponse(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            })?;
            return Err(ClientError::Refused {
                status,
                code: err.error,
                detail: err.detail,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()))
    }
}
