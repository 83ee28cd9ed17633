//! The device client library: what a real web or mobile client does, in both worlds.
//!
//! `http` talks to the api node (HTTP/1.1 + JSON), `ws` to a chat server (WebSocket),
//! `device` is the I/O-free device state machine (cursors, reorder buffer, outbox of unacked
//! sends, presence view), and `runtime` the one device loop around it (connect, heartbeats,
//! silence, reconnect). The simulator's devices, the load driver and the CLI are all built on
//! these.

pub mod device;
pub mod http;
pub mod runtime;
pub mod ws;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect failed: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("server refused ({status}): {code:?}: {detail}")]
    Refused {
        status: u16,
        code: crate::proto::client::ErrorCode,
        detail: String,
    },
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("websocket: {0}")]
    Ws(String),
    #[error("timed out")]
    Timeout,
}
