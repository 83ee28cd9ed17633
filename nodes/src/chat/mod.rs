//! Chat servers: hold device WebSocket sessions, accept sends, commit them through idgen and
//! kv, acknowledge, fan out to the servers holding recipients' devices, ask for push
//! notifications for offline recipients, and serve sync from a device's cursors.
//!
//! `session` is one device connection; `send` the commit path (the one place that turns a
//! send into a committed message); `fanout` live delivery and push; `server` the listeners,
//! registration with discovery and the server-to-server RPC; `cursors` the batched cursor
//! writes. `validate` holds the pure checks.

pub mod admission;
pub mod cursors;
pub mod fanout;
pub mod send;
pub mod server;
pub mod session;
pub mod validate;

pub use server::{run, ChatConfig};
