//! Prometheus metrics of a node process, and the admin HTTP endpoint (`/metrics`, `/healthz`).
//!
//! One [`Metrics`] per process (all-in-one shares it between roles; the simulation gives every
//! node its own). Handles are cheap atomics, updated where the event happens; nothing here
//! affects behaviour, so the simulation stays deterministic. Families not used by a role stay
//! at zero in its output.
//!
//! Latencies are server-side: `send_to_ack` from a send frame read to its ack queued;
//! `send_to_deliver` from the message id's timestamp (taken when the chat server asked for the
//! id, right after reading the send) to the deliver frame queued for a device. The latencies
//! clients see (with network and client queues) are measured by the load driver and the
//! simulation's metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proto::client::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardPeerLabel {
    pub shard: String,
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    /// Open device WebSocket sessions (chat).
    pub ws_connections: Gauge,
    /// WebSocket connections accepted (chat).
    pub ws_accepted: Counter,
    /// Sends committed and acknowledged (chat).
    pub messages_in: Counter,
    /// Deliver frames queued to devices, live and sync (chat).
    pub messages_out: Counter,
    /// Send frame read -> ack queued, seconds (chat).
    pub send_to_ack: Histogram,
    /// Message id timestamp -> deliver frame queued, seconds (chat, live fanout only).
    pub send_to_deliver: Histogram,
    /// Errors sent to clients, by code (chat WebSocket and api HTTP).
    pub errors: Family<CodeLabel, Counter>,
    /// kv requests by operation.
    pub kv_requests: Family<OpLabel, Counter>,
    /// kv durable commits (fsyncs), each making one batch durable.
    pub kv_fsyncs: Counter,
    /// Requests per kv group commit.
    pub kv_batch_requests: Histogram,
    /// Per shard replica on this node: 1 while it leads the shard.
    pub kv_shard_leader: Family<ShardLabel, Gauge>,
    /// Per shard replica: its Raft term, and the last log index it applied.
    pub kv_shard_term: Family<ShardLabel, Gauge>,
    pub kv_shard_applied: Family<ShardLabel, Gauge>,
    /// On a shard's leader: entries each peer replica is behind.
    pub kv_shard_lag: Family<ShardPeerLabel, Gauge>,
    /// Times a replica on this node became its shard's leader.
    pub kv_leader_elected: Counter,
    /// Replicas on this node rebuilt from peers after their storage failed.
    pub kv_replica_rebuilds: Counter,
    /// Presence transitions the presence node published, by new state.
    pub presence_changes: Family<StateLabel, Counter>,
    /// Connections a chat server closed at accept, by reason (`per_address`).
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Notifications handed to the push provider, by outcome.
    pub pushes: Family<OutcomeLabel, Counter>,
    /// Snowflake ids issued (idgen).
    pub ids_issued: Counter,
    /// Times the idgen node lost its etcd worker lease and stopped issuing (idgen).
    pub idgen_worker_losses: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// 0.5 ms to 33 s in powers of two.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 17)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("chatsim");
        let ws_connections = Gauge::default();
        r.register(
            "ws_connections",
            "Open device WebSocket sessions",
            ws_connections.clone(),
        );
        let ws_accepted = Counter::default();
        r.register(
            "ws_accepted",
            "WebSocket connections accepted",
            ws_accepted.clone(),
        );
        let messages_in = Counter::default();
        r.register(
            "messages_in",
            "Sends committed and acknowledged",
            messages_in.clone(),
        );
        let messages_out = Counter::default();
        r.register(
            "messages_out",
            "Deliver frames queued to devices (live and sync)",
            messages_out.clone(),
        );
        let send_to_ack = Histogram::new(latency_buckets());
        r.register(
            "send_to_ack_seconds",
            "Server side: send frame read to ack queued",
            send_to_ack.clone(),
        );
        let send_to_deliver = Histogram::new(latency_buckets());
        r.register(
            "send_to_deliver_seconds",
            "Server side: message id timestamp to live deliver frame queued",
            send_to_deliver.clone(),
        );
        let errors = Family::<CodeLabel, Counter>::default();
        r.register("errors", "Errors sent to clients, by code", errors.clone());
        let kv_requests = Family::<OpLabel, Counter>::default();
        r.register(
            "kv_requests",
            "kv requests by operation",
            kv_requests.clone(),
        );
        let kv_fsyncs = Counter::default();
        r.register(
            "kv_fsyncs",
            "kv durable commits (fsyncs), one per group commit",
            kv_fsyncs.clone(),
        );
        let kv_batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        r.register(
            "kv_batch_requests",
            "Requests per kv group commit",
            kv_batch_requests.clone(),
        );
        let kv_shard_leader = Family::<ShardLabel, Gauge>::default();
        r.register(
            "kv_shard_leader",
            "1 while this node's replica leads the shard",
            kv_shard_leader.clone(),
        );
        let kv_shard_term = Family::<ShardLabel, Gauge>::default();
        r.register(
            "kv_shard_term",
            "Raft term of this node's replica of the shard",
            kv_shard_term.clone(),
        );
        let kv_shard_applied = Family::<ShardLabel, Gauge>::default();
        r.register(
            "kv_shard_applied",
            "Last log index applied by this node's replica of the shard",
            kv_shard_applied.clone(),
        );
        let kv_shard_lag = Family::<ShardPeerLabel, Gauge>::default();
        r.register(
            "kv_shard_lag",
            "On the shard's leader: log entries each peer replica is behind",
            kv_shard_lag.clone(),
        );
        let kv_leader_elected = Counter::default();
        r.register(
            "kv_leader_elected",
            "Times a replica on this node became its shard's leader",
            kv_leader_elected.clone(),
        );
        let kv_replica_rebuilds = Counter::default();
        r.register(
            "kv_replica_rebuilds",
            "Replicas rebuilt from peers after their storage failed",
            kv_replica_rebuilds.clone(),
        );
        let connections_refused = Family::<ReasonLabel, Counter>::default();
        r.register(
            "connections_refused",
            "Connections a chat server closed at accept, by reason",
            connections_refused.clone(),
        );
        let presence_changes = Family::<StateLabel, Counter>::default();
        r.register(
            "presence_changes",
            "Presence transitions published, by new state",
            presence_changes.clone(),
        );
        let pushes = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "pushes",
            "Notifications handed to the push provider, by outcome",
            pushes.clone(),
        );
        let ids_issued = Counter::default();
        r.register("ids_issued", "Snowflake ids issued", ids_issued.clone());
        let idgen_worker_losses = Counter::default();
        r.register(
            "idgen_worker_losses",
            "Times the etcd worker lease was lost and issuing stopped",
            idgen_worker_losses.clone(),
        );
        Arc::new(Self {
            registry: r,
            ws_connections,
            ws_accepted,
            messages_in,
            messages_out,
            send_to_ack,
            send_to_deliver,
            errors,
            kv_requests,
            kv_fsyncs,
            kv_batch_requests,
            kv_shard_leader,
            kv_shard_term,
            kv_shard_applied,
            kv_shard_lag,
            kv_leader_elected,
            kv_replica_rebuilds,
            presence_changes,
            connections_refused,
            pushes,
            ids_issued,
            idgen_worker_losses,
        })
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn count_error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition (OpenMetrics text, which Prometheus scrapes).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A node's own health check: `Err(reason)` answers 503 with the reason.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Always healthy while the process answers.
pub fn alive() -> HealthCheck {
    Arc::new(|| Ok(()))
}

/// `/metrics` and `/healthz` as routes (an admin endpoint's).
pub fn routes(metrics: Arc<Metrics>, health: HealthCheck) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.render()) }
            }),
        )
        .merge(health_routes(health))
}

/// `/healthz` alone (merged into the api's public router: load balancers ask it).
pub fn health_routes(health: HealthCheck) -> Router {
    Router::new().route(
        "/healthz",
        get(move || {
            let h = health.clone();
            async move {
                match h() {
                    Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: {why}\n"),
                    )
                        .into_response(),
                }
            }
        }),
    )
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: HealthCheck,
) -> anyhow::Result<()> {
    let listener = crate::net::bind(addr).await?;
    tracing::info!(listen = %addr, "admin endpoint up (/metrics, /healthz)");
    crate::api::http::serve_router(
        listener,
        routes(metrics, health),
        ADMIN_HEADER_TIMEOUT,
        None,
    )
    .await
}

const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_its_values() {
        let m = Metrics::new();
        m.messages_in.inc();
        m.count_error(ErrorCode::RateLimited);
        m.kv_requests
            .get_or_create(&OpLabel { op: "Append" })
            .inc_by(3);
        m.send_to_ack.observe(0.003);
        let text = m.render();
        assert!(text.contains("chatsim_messages_in_total 1"), "{text}");
        assert!(
            text.contains("chatsim_errors_total{code=\"rate_limited\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chatsim_kv_requests_total{op=\"Append\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("chatsim_send_to_ack_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE chatsim_ws_connections gauge"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
