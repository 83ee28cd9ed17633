//! The api node: stateless HTTP/1.1 + JSON for everything that is not a live session —
//! signup, login (signed token), profile, friends, groups (at most 100 members), history
//! pages, and "which chat server should I use" (asked of discovery). It also serves the
//! browser client (`web`), a page that is one more device.
//!
//! `routes` holds the handlers (an axum `Router`); `http` serves it with hyper in our own
//! accept loop (axum::serve calls real tokio and panics under madsim). State lives in kv;
//! any number of api nodes can run behind a load balancer.

pub mod http;
pub mod routes;
pub mod throttle;
pub mod web;

pub use http::{run, ApiConfig};
