//! The few etcd operations the cluster needs, over `etcd-client` (madsim's simulated etcd
//! under `--cfg madsim`, the real client otherwise: the same code in both worlds).
//!
//! Every request has its own deadline ([`ETCD_CALL_TIMEOUT`]): the client has none by default,
//! and a slow etcd (the simulator's `timeout_rate` holds a request 5-15 s) must not stall a
//! lease loop past the lease. Only operations the simulated etcd implements are used: puts and
//! gets (one key or a prefix), transactions comparing values, and leases.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::rpc::RpcError;

/// Deadline of one etcd request.
pub const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A lazily connected etcd client that counts its requests.
pub struct Etcd {
    endpoints: Vec<String>,
    /// TLS with this node's certificate, checking members against the cluster CA.
    tls: Option<crate::tls::PemIdentity>,
    /// Connected on first use and after a failed connect. A tokio mutex: held across connect.
    client: tokio::sync::Mutex<Option<Client>>,
    requests: AtomicU64,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Etcd({:?})", self.endpoints)
    }
}

fn err(op: &str, e: impl std::fmt::Display) -> RpcError {
    RpcError::Coordination(format!("etcd {op}: {e}"))
}

impl Etcd {
    /// `endpoints` are `host:port` client addresses of the etcd members; `tls`: speak TLS,
    /// presenting this identity (real deployments only).
    pub fn new(endpoints: Vec<String>, tls: Option<crate::tls::PemIdentity>) -> Self {
        assert!(!endpoints.is_empty(), "etcd needs at least one endpoint");
        Self {
            endpoints,
            tls,
            client: tokio::sync::Mutex::new(None),
            requests: AtomicU64::new(0),
        }
    }

    /// The etcd of `c`, if it names one, dialed with this node's certificate if it speaks TLS.
    pub fn for_coordination(c: &super::Coordination, tls: &crate::tls::NodeTls) -> Option<Etcd> {
        match c {
            super::Coordination::Etcd {
                endpoints,
                tls: tls_on,
            } => Some(Etcd::new(
                endpoints.clone(),
                tls_on.then(|| tls.pem_identity().clone()),
            )),
            super::Coordination::Discovery(_) => None,
        }
    }

    /// etcd requests made so far (connects not counted).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn client(&self) -> Result<Client, RpcError> {
        let mut c = self.client.lock().await;
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let connect = Client::connect(&self.endpoints, self.options()?);
        let client = tokio::time::timeout(ETCD_CALL_TIMEOUT, connect)
            .await
            .map_err(|_| err("connect", "timed out"))?
            .map_err(|e| err("connect", e))?;
        *c = Some(client.clone());
        Ok(client)
    }

    /// TLS options: the node's certificate, and the cluster CA as the only root.
    #[cfg(not(madsim))]
    fn options(&self) -> Result<Option<etcd_client::ConnectOptions>, RpcError> {
        let Some(id) = &self.tls else {
            return Ok(None);
        };
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&id.ca))
            .identity(etcd_client::Identity::from_pem(&id.cert, &id.key));
        Ok(Some(etcd_client::ConnectOptions::new().with_tls(tls)))
    }

    /// madsim's etcd has no TLS.
    #[cfg(madsim)]
    fn options(&self) -> Result<Option<etcd_client::ConnectOptions>, RpcError> {
        match self.tls {
            None => Ok(None),
            Some(_) => Err(err("connect", "the simulated etcd has no TLS")),
        }
    }

    /// Runs one request under the deadline.
    async fn call<T, F>(&self, op: &str, f: F) -> Result<T, RpcError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(ETCD_CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(err(op, e)),
            Err(_) => Err(err(op, "timed out")),
        }
    }

    /// Grants a lease of `ttl_s` seconds; its id.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64, RpcError> {
        let c = self.client().await?;
        let r = self
            .call("lease grant", async move {
                c.lease_client().grant(ttl_s, None).await
            })
            .await?;
        Ok(r.id())
    }

    /// Renews `lease` once: true if renewed, false if etcd says it is gone (expired or
    /// revoked). An error means nothing is known: etcd was not reached in time.
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, RpcError> {
        let c = self.client().await?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        // One round trip: the call sends a keep-alive and waits for its answer; the stream is
        // dropped after.
        let call = async move { c.lease_client().keep_alive(lease).await.map(|_| ()) };
        match tokio::time::timeout(ETCD_CALL_TIMEOUT, call).await {
            Ok(Ok(())) => Ok(true),
            // Both etcds word it so: "lease not found" (the real client, on a TTL of 0) and
            // "etcdserver: requested lease not found" (a NotFound status).
            Ok(Err(e)) if e.to_string().contains("lease not found") => Ok(false),
            Ok(Err(e)) => Err(err("lease keep-alive", e)),
            Err(_) => Err(err("lease keep-alive", "timed out")),
        }
    }

    /// Ends `lease` now (its keys go with it).
    pub async fn revoke(&self, lease: i64) -> Result<(), RpcError> {
        let c = self.client().await?;
        self.call("lease revoke", async move {
            c.lease_client().revoke(lease).await.map(|_| ())
        })
        .await
    }

    /// Puts `key` = `value`, attached to `lease` (0: none).
    pub async fn put(&self, key: String, value: Vec<u8>, lease: i64) -> Result<(), RpcError> {
        let c = self.client().await?;
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        self.call("put", async move {
            c.kv_client().put(key, value, opts).await.map(|_| ())
        })
        .await
    }

    /// Every (key, value) under `prefix`.
    pub async fn get_prefix(&self, prefix: String) -> Result<Vec<(Vec<u8>, Vec<u8>)>, RpcError> {
        let c = self.client().await?;
        let r = self
            .call("get", async move {
                c.kv_client()
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect())
    }

    /// Puts `key` = `value` under `lease` if `key` is absent or already holds `value` (the
    /// caller's own claim, re-attached to a new lease); true if it did. `value` must not be
    /// empty.
    ///
    /// Written with the only comparison both etcds agree on: real etcd fails every value
    /// comparison on a missing key, and the simulated one fails `Greater` on one, so
    /// "value > '' " is true exactly when the key exists with a (non-empty) value.
    pub async fn claim(&self, key: String, value: Vec<u8>, lease: i64) -> Result<bool, RpcError> {
        assert!(!value.is_empty(), "a claim's value names its owner");
        let c = self.client().await?;
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Greater, "")])
            .and_then([TxnOp::txn(
                Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, value.clone())])
                    .and_then([TxnOp::put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]),
            )])
            .or_else([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = self
            .call("txn", async move { c.kv_client().txn(txn).await })
            .await?;
        if !r.succeeded() {
            return Ok(true); // Absent: claimed.
        }
        // Present: claimed only if the nested comparison (it is ours) held.
        Ok(r.op_responses().into_iter().any(|op| match op {
            etcd_client::TxnOpResponse::Txn(t) => t.succeeded(),
            _ => false,
        }))
    }

    /// Puts `key` = `value` unless `key` holds a value already; what `key` holds after (the
    /// value given, or the one found). `value` must not be empty. The same comparison as
    /// [`Etcd::claim`].
    pub async fn create_or_read(&self, key: String, value: Vec<u8>) -> Result<Vec<u8>, RpcError> {
        assert!(!value.is_empty(), "an empty value reads as absent");
        let c = self.client().await?;
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Greater, "")])
            .and_then([TxnOp::get(key.clone(), None)])
            .or_else([TxnOp::put(key, value.clone(), None)]);
        let r = self
            .call("txn", async move { c.kv_client().txn(txn).await })
            .await?;
        if !r.succeeded() {
            return Ok(value);
        }
        r.op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .ok_or_else(|| err("txn", "the key vanished between the comparison and the get"))
    }
}
