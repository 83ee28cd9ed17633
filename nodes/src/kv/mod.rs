//! The key-value store role: history, channels, users, cursors, sessions, push marks,
//! replicated.
//!
//! Keys map to a fixed number of shards (`cluster`); each shard is a Raft group (raft-rs) of
//! `replicas` copies on distinct kv nodes (`placement`). Per replica: `store` is the state
//! machine over redb, `raftlog` its Raft log in the same database, `replica` the I/O-free
//! core around raft-rs's `RawNode`. `server` is the node shell (RPC, replica tasks, Raft
//! transport); `client` the callers' side (finds each shard's leader, follows hints,
//! retries); `disk` the simulated disk with its faults.

pub mod client;
pub mod disk;
pub mod placement;
pub mod raftlog;
pub mod replica;
pub mod server;
pub mod store;

pub use store::Store;
