//! A WebSocket connection to a chat server, speaking JSON text frames.

use std::net::IpAddr;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::ClientError;
use crate::client_tls::{self, ClientTls, MaybeTls};
use crate::net::{self, Stream};
use crate::proto::client::{ClientFrame, ServerFrame};

pub struct WsConn {
    ws: WebSocketStream<MaybeTls>,
    /// Frames that arrived before `welcome` (the protocol allows presence and messages
    /// there), handed out by [`WsConn::recv`] before anything newer; at most
    /// [`EARLY_FRAMES_MAX`].
    early: std::collections::VecDeque<ServerFrame>,
}

/// Frames a client keeps from before `welcome`; a server that sends more fails the connect.
pub const EARLY_FRAMES_MAX: usize = 1024;

/// What arrived on the connection.
#[derive(Debug)]
pub enum Incoming {
    Frame(ServerFrame),
    /// A frame the client could not parse (a server bug or a newer server).
    Unparsed(String),
    Closed,
}

impl WsConn {
    /// Connects to `ws://host:port/path` (plain) or `wss://host:port/path`.
    pub async fn connect(url: &str, tls: Option<&ClientTls>) -> Result<Self, ClientError> {
        Self::connect_from(url, None, tls).await
    }

    /// Connects to `ws://` or `wss://host:port/path` from `source` (see
    /// [`net::connect_from`]). A `wss://` URL is checked against `tls`, or the public web's
    /// roots when `None`. The host is an IP address (what the api hands out), or for real a
    /// DNS name.
    pub async fn connect_from(
        url: &str,
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        let (secure, rest) = if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else {
            return Err(ClientError::Ws(format!("not a ws:// or wss:// url: {url}")));
        };
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = resolve(hostport)
            .await
            .ok_or_else(|| ClientError::Ws(format!("bad address in {url}")))?;
        let tcp = net::connect_from(addr, source).await?;
        let stream = if secure {
            let (host, _) = client_tls::host_of(hostport);
            let public;
            let tls = match tls {
                Some(t) => t,
                None => {
                    public = ClientTls::public_roots();
                    &public
                }
            };
            tls.connect(host, tcp).await?
        } else {
            MaybeTls::Plain(tcp)
        };
        Self::handshake_on(url, stream).await
    }

    /// The WebSocket handshake over a plain stream the caller connected (tests and the
    /// simulation's hostile device).
    pub async fn handshake(url: &str, stream: Stream) -> Result<Self, ClientError> {
        Self::handshake_on(url, MaybeTls::Plain(stream)).await
    }

    async fn handshake_on(url: &str, stream: MaybeTls) -> Result<Self, ClientError> {
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            stream,
            Some(crate::chat::session::ws_config()),
        )
        .await
        .map_err(|e| ClientError::Ws(e.to_string()))?;
        Ok(Self {
            ws,
            early: std::collections::VecDeque::new(),
        })
    }

    /// Keeps a frame that came before `welcome` for [`WsConn::recv`] (after the greeting: a
    /// frame kept during it would be handed back at once); `false` (not kept) past
    /// [`EARLY_FRAMES_MAX`].
    pub fn keep_early(&mut self, frame: ServerFrame) -> bool {
        if self.early.len() >= EARLY_FRAMES_MAX {
            return false;
        }
        self.early.push_back(frame);
        true
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let text = serde_json::to_string(frame).expect("client frames serialize");
        self.send_raw(Message::text(text)).await
    }

    /// Sends any WebSocket message (tests send malformed and binary frames with it).
    pub async fn send_raw(&mut self, msg: Message) -> Result<(), ClientError> {
        self.ws
            .send(msg)
            .await
            .map_err(|e| ClientError::Ws(e.to_string()))
    }

    pub async fn recv(&mut self) -> Incoming {
        if let Some(f) = self.early.pop_front() {
            return Incoming::Frame(f);
        }
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return match serde_json::from_str(&t) {
                        Ok(f) => Incoming::Frame(f),
                        Err(_) => Incoming::Unparsed(t.to_string()),
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Incoming::Closed,
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// `host:port` as an address: an IP literal, or for real a DNS name looked up.
async fn resolve(hostport: &str) -> Option<std::net::SocketAddr> {
    if let Ok(a) = hostport.parse() {
        return Some(a);
    }
    #[cfg(not(madsim))]
    return tokio::net::lookup_host(hostport).await.ok()?.next();
    #[cfg(madsim)]
    None
}
