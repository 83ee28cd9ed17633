//! idgen worker ids from etcd leases.
//!
//! A process takes a free worker id by a transaction that writes
//! `chatsim/idgen/worker/{id}` = its owner token under its own lease (only if the key is
//! absent, or already its own), and renews the lease every [`WORKER_RENEW`]. Two live
//! processes therefore never hold one id, and a dead one's id frees itself when its lease
//! lapses.
//!
//! **The margin.** etcd deletes the key [`WORKER_LEASE_TTL_S`] after the last renewal it
//! processed, which is after the renewal was sent. The process stops issuing ids
//! [`WORKER_VALID_MS`] after sending its last successful renewal (or grant): 3 s before the
//! earliest expiry. 1 s of it covers the simulated etcd, which expires leases on a one-second
//! tick (up to a second early); 2 s cover clock rate differences and scheduling delay between
//! the check and the id leaving. A process that cannot reach etcd for `WORKER_VALID_MS`
//! stops issuing; when it can again, it re-takes its id if still its own, or another.
//!
//! Across owners of one id the kv time lease (`idgen::server`) keeps ids increasing: a new
//! owner starts above the time the previous owner reserved.

use std::time::Duration;

use super::etcd::Etcd;
use crate::idgen::WORKER_MAX;
use crate::rpc::RpcError;

/// The worker lease's time to live, seconds. Long, so that ids keep flowing through an etcd
/// outage of most of a minute (the id stays held meanwhile, so nobody else can take it); the
/// cost is that a crashed process's id stays taken that long (of 1,023). Also longer than the
/// simulated etcd's slowest answer (15 s), so a claim delayed that long finds its lease alive.
pub const WORKER_LEASE_TTL_S: i64 = 60;
/// How often the lease is renewed.
pub const WORKER_RENEW: Duration = Duration::from_secs(1);
/// Ids are issued for this long after the last successful renewal was sent.
pub const WORKER_VALID_MS: u64 = WORKER_LEASE_TTL_S as u64 * 1000 - 3_000;
// The stop margin: ids stop at least 3 s before etcd can expire the lease.
const _: () = assert!(WORKER_VALID_MS + 3_000 <= WORKER_LEASE_TTL_S as u64 * 1000);
/// Key prefix of worker claims.
pub const WORKER_PREFIX: &str = "chatsim/idgen/worker/";

/// A worker id held under a lease.
#[derive(Debug, Clone)]
pub struct WorkerLease {
    pub worker: u16,
    lease: i64,
    /// No id may be issued at or after this instant.
    pub valid_until: tokio::time::Instant,
}

/// The outcome of one renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed: `valid_until` moved on.
    Renewed,
    /// etcd says the lease is gone: stop issuing now and claim again.
    Lost,
    /// etcd not reached: issuing goes on until `valid_until`.
    Unknown,
}

/// The ids to try, `first` (then `preferred`) first, then upwards, wrapping.
fn candidates(first: Option<u16>, preferred: u16) -> impl Iterator<Item = u16> {
    let preferred = preferred.clamp(1, WORKER_MAX);
    let ring = (0..WORKER_MAX).map(move |i| (preferred - 1 + i) % WORKER_MAX + 1);
    first
        .into_iter()
        .chain(ring.filter(move |w| Some(*w) != first))
}

/// Takes a worker id under a new lease: `previous` (if still this owner's) first, then
/// `preferred` and upwards. `owner` names this process incarnation uniquely.
///
/// `shared` is the idgen-shared-worker canary's bug: worker 1 is taken by a blind put,
/// whoever holds it.
pub async fn claim(
    etcd: &Etcd,
    previous: Option<u16>,
    preferred: u16,
    owner: &str,
    shared: bool,
) -> Result<WorkerLease, RpcError> {
    let sent = tokio::time::Instant::now();
    let lease = etcd.grant(WORKER_LEASE_TTL_S).await?;
    let valid_until = sent + Duration::from_millis(WORKER_VALID_MS);
    if shared {
        let key = format!("{WORKER_PREFIX}1");
        etcd.put(key, owner.as_bytes().to_vec(), lease).await?;
        return Ok(WorkerLease {
            worker: 1,
            lease,
            valid_until,
        });
    }
    for w in candidates(previous, preferred) {
        // An error here abandons the lease (never renewed, it lapses with any key a late
        // transaction attached to it).
        if etcd
            .claim(
                format!("{WORKER_PREFIX}{w}"),
                owner.as_bytes().to_vec(),
                lease,
            )
            .await?
        {
            return Ok(WorkerLease {
                worker: w,
                lease,
                valid_until,
            });
        }
    }
    let _ = etcd.revoke(lease).await;
    Err(RpcError::Coordination(format!(
        "no free idgen worker id (all {WORKER_MAX} are held)"
    )))
}

/// Renews the lease once.
pub async fn renew(etcd: &Etcd, held: &mut WorkerLease) -> Renewal {
    let sent = tokio::time::Instant::now();
    match etcd.keep_alive(held.lease).await {
        Ok(true) => {
            held.valid_until = sent + Duration::from_millis(WORKER_VALID_MS);
            Renewal::Renewed
        }
        Ok(false) => Renewal::Lost,
        Err(e) => {
            tracing::debug!(error = %e, worker = held.worker, "worker lease not renewed");
            Renewal::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the candidate order: the previous id, then the preferred one and upwards,
    // wrapping, each id once.
    #[test]
    fn candidates_cover_every_id_once() {
        let c: Vec<u16> = candidates(Some(7), 1023).collect();
        assert_eq!(&c[..4], &[7, 1023, 1, 2]);
        assert_eq!(c.len(), WORKER_MAX as usize);
        let mut sorted = c.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), WORKER_MAX as usize);
        assert_eq!(candidates(None, 5).next(), Some(5));
    }
}
