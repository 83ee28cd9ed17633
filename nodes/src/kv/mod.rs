//! The key-value store role: history, channels, users, cursors, sessions, push marks.
//!
//! `store` is the I/O-free core over redb; `server` the RPC shell; `disk` the simulated disk.
//! Keys are sharded over kv nodes by [`crate::cluster::ClusterMap`]; each shard is one node
//! (replicas are not implemented yet).

pub mod disk;
pub mod server;
pub mod store;

pub use store::Store;
