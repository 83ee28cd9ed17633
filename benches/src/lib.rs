//! Benchmarks and load drivers for the real build.
//!
//! - `cargo bench -p benches`: criterion benches of the hot paths (`benches/hot_paths.rs`).
//! - `node-capacity`: per-node capacity figures for the capacity plan.
//! - `chat-load`: the load driver ([`load`]): real WebSocket clients against a deployment,
//!   judged by the simulation's checkers.

pub mod load;
