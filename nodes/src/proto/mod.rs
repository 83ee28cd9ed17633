//! Wire formats. `client` is what devices speak (HTTP/1.1 + JSON to api, JSON text frames over
//! WebSocket to chat); `internal` is what nodes speak to each other (length-delimited JSON
//! frames over TCP, see `rpc`).

pub mod client;
pub mod internal;

/// Integer ids on the wire: users, devices, channels, messages.
pub type Id = u64;
