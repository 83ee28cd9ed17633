//! A WebSocket connection to a chat server, speaking JSON text frames.

use std::net::IpAddr;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::ClientError;
use crate::net::{self, Stream};
use crate::proto::client::{ClientFrame, ServerFrame};

pub struct WsConn {
    ws: WebSocketStream<Stream>,
}

/// What arrived on the connection.
#[derive(Debug)]
pub enum Incoming {
    Frame(ServerFrame),
    /// A frame the client could not parse (a server bug or a newer server).
    Unparsed(String),
    Closed,
}

impl WsConn {
    /// Connects to `ws://host:port/path`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_from(url, None).await
    }

    /// Connects to `ws://host:port/path` from `source` (see [`net::connect_from`]).
    pub async fn connect_from(url: &str, source: Option<IpAddr>) -> Result<Self, ClientError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| ClientError::Ws(format!("not a ws:// url: {url}")))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = hostport
            .parse()
            .map_err(|_| ClientError::Ws(format!("bad address in {url}")))?;
        let stream = net::connect_from(addr, source).await?;
        Self::handshake(url, stream).await
    }

    /// The WebSocket handshake over a stream the caller connected (load drivers bind their
    /// own source addresses).
    pub async fn handshake(url: &str, stream: Stream) -> Result<Self, ClientError> {
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            stream,
            Some(crate::chat::session::ws_config()),
        )
        .await
        .map_err(|e| ClientError::Ws(e.to_string()))?;
        Ok(Self { ws })
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
