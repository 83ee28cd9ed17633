//! chatsim's service nodes, wire protocol and device client library.
//!
//! Every role is an I/O-free core (state machine or store) wrapped by a thin async shell that
//! owns sockets and timers. The same code runs on real tokio and, built with `--cfg madsim`, in
//! the deterministic simulator: only [`net`] knows the difference.
//!
//! | module | role |
//! |---|---|
//! | [`api`] | stateless HTTP/1.1 + JSON: signup, login, friends, groups, history, chat server lookup |
//! | [`chat`] | WebSocket sessions, the commit path, fanout, sync |
//! | [`discovery`] | chat server leases and picks |
//! | [`idgen`] | Snowflake ids |
//! | [`kv`] | redb-backed sharded store |
//! | [`presence`] | heartbeats, timeouts, fanout to friends |
//! | [`push`] | notifications through a `PushProvider` |
//! | [`client`] | what a device runs |
//! | [`tls`] | mutual TLS between nodes: the cluster CA, node certificates, who may ask what |
//! | [`decoders`] | every decoder of outside or stored bytes, for the fuzz command and tests |
//! | `deploy` | the real deployment: config file, roles from it, the local-cluster supervisor |

pub mod api;
pub mod auth;
pub mod canary;
pub mod chat;
pub mod client;
pub mod client_tls;
pub mod clock;
pub mod cluster;
pub mod coord;
pub mod decoders;
#[cfg(not(madsim))]
pub mod deploy;
pub mod discovery;
pub mod health;
pub mod idgen;
pub mod kv;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod presence;
pub mod proto;
pub mod push;
pub mod rpc;
pub mod tls;
