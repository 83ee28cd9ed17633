//! Faults the driver injects into a `chatd local-cluster` (its data directory holds the
//! supervisor's pid files and `cluster.toml`), and the kv prober that times what they
//! cost.
//!
//! - `--kill NODE@S`: `kill -9` of a node; the supervisor restarts it. `NODE` may be
//!   `kv-leader`: the kv node leading the most shards at that moment (ties: the lowest).
//! - `--wipe kv-N@S`: the node's disk is lost: the process is stopped (SIGSTOP, so it writes
//!   nothing more), its data directory deleted, then killed; the supervisor restarts it on an
//!   empty directory and its replicas rejoin their groups from the others. The heal is
//!   recorded once every replica on it is a voter again.
//!
//! Each fault is a `fault`/`heal` pair in the driver's history, kinds `crash` and
//! `disk_loss` as in the simulation, so the same checkers and availability figures apply.

use nodes::tls::{NodeTls, Principal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use nodes::canary::Canaries;
use nodes::cluster::Peers;
use nodes::deploy::supervisor::read_pid;
use nodes::deploy::Config;
use nodes::proto::internal::{Request, Response, ShardStatus};
use nodes::rpc::RpcClient;
use sim::availability::Probe;
use sim::history::Event;

use super::{unix_us, Recorder};

/// A node comes back (and a wiped one rejoins) within this, or the run fails.
const BACK_WITHIN: Duration = Duration::from_secs(90);
/// Pause between two probe writes to one shard (as the simulation's prober).
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// What to do to a node, and when (seconds into the traffic).
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub node: String,
    pub after_s: f64,
    pub wipe: bool,
}

impl Fault {
    /// Parses `NODE@SECONDS`.
    pub fn parse(s: &str, wipe: bool) -> anyhow::Result<Fault> {
        let flag = if wipe { "--wipe" } else { "--kill" };
        let (node, at) = s
            .split_once('@')
            .with_context(|| format!("{flag} NODE@SECONDS, not {s:?}"))?;
        let after_s: f64 = at
            .parse()
            .with_context(|| format!("{flag} {s:?}: {at:?} is not a number of seconds"))?;
        if !(after_s >= 0.0 && after_s.is_finite()) {
            bail!("{flag} {s:?}: the time must be >= 0");
        }
        if wipe && !node.starts_with("kv-") {
            bail!("{flag} {s:?}: only kv nodes have a disk to lose");
        }
        Ok(Fault {
            node: node.to_string(),
            after_s,
            wipe,
        })
    }
}

/// A local cluster the driver can hurt.
pub struct Cluster {
    dir: PathBuf,
    cfg: Config,
    /// The cluster's operator certificate (internal RPC is mutual TLS).
    operator: NodeTls,
}

impl Cluster {
    pub fn open(dir: &Path) -> anyhow::Result<Cluster> {
        let cfg = Config::load(&dir.join("cluster.toml"))
            .with_context(|| format!("{} is not a local-cluster directory", dir.display()))?;
        let operator = nodes::deploy::certs::node_tls(&cfg, Principal::Operator)?;
        Ok(Cluster {
            dir: dir.to_path_buf(),
            cfg,
            operator,
        })
    }

    /// Injects one fault and waits until it has healed, recording both in `rec`.
    pub async fn inject(&self, f: &Fault, rec: &Recorder) -> anyhow::Result<()> {
        let (node, detail) = if f.node == "kv-leader" {
            let (slot, shards) = self.busiest_leader().await?;
            (
                format!("kv-{slot}"),
                Some(format!("leader of shards {shards:?}")),
            )
        } else {
            (f.node.clone(), None)
        };
        let addr = self
            .listen_addr(&node)
            .with_context(|| format!("no node {node} in the config"))?;
        let pid = read_pid(&self.dir, &node)
            .with_context(|| format!("no pid file for {node} in {}", self.dir.display()))?;
        let kind = if f.wipe { "disk_loss" } else { "crash" };
        if f.wipe {
            let index: usize = node["kv-".len()..].parse().context("kv node index")?;
            let data = self.cfg.kv_dir(index);
            signal("STOP", pid, &node)?;
            std::fs::remove_dir_all(&data).with_context(|| format!("remove {}", data.display()))?;
        }
        signal("KILL", pid, &node)?;
        let targets = vec![node.clone()];
        rec.record(Event::Fault {
            kind: kind.into(),
            targets: targets.clone(),
            detail: detail.clone(),
        });
        eprintln!(
            "{} {node} (pid {pid}){}",
            if f.wipe { "wiped" } else { "killed" },
            detail.map(|d| format!(", {d}")).unwrap_or_default()
        );
        let deadline = std::time::Instant::now() + BACK_WITHIN;
        let started = std::time::Instant::now();
        loop {
            if std::time::Instant::now() > deadline {
                bail!("{node} did not come back within {BACK_WITHIN:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let restarted = read_pid(&self.dir, &node).is_some_and(|p| p != pid);
            if !restarted {
                continue;
            }
            let back = if f.wipe {
                kv_status(addr, &self.operator)
                    .await
                    .is_some_and(|list| !list.is_empty() && list.iter().all(is_voter))
            } else {
                tokio::net::TcpStream::connect(addr).await.is_ok()
            };
            if back {
                break;
            }
        }
        rec.record(Event::Heal {
            kind: kind.into(),
            targets,
            detail: None,
        });
        eprintln!(
            "{node} is back{} after {:.1} s",
            if f.wipe {
                " (every replica a voter)"
            } else {
                ""
            },
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The kv node leading the most shards, and those shards.
    async fn busiest_leader(&self) -> anyhow::Result<(u32, Vec<u32>)> {
        let mut best: Option<(u32, Vec<u32>)> = None;
        for (slot, n) in self.cfg.kv.iter().enumerate() {
            let Some(list) = kv_status(n.listen, &self.operator).await else {
                continue;
            };
            let led: Vec<u32> = list
                .iter()
                .filter(|s| s.role == "leader")
                .map(|s| s.shard)
                .collect();
            if best.as_ref().is_none_or(|(_, b)| led.len() > b.len()) {
                best = Some((slot as u32, led));
            }
        }
        match best {
            Some(b) if !b.1.is_empty() => Ok(b),
            _ => bail!("kv-leader: no kv node reports leading a shard"),
        }
    }

    fn listen_addr(&self, node: &str) -> Option<SocketAddr> {
        let cfg = &self.cfg;
        let (role, i) = node.rsplit_once('-')?;
        let i: usize = i.parse().ok()?;
        Some(match role {
            "kv" => cfg.kv.get(i)?.listen,
            "chat" => cfg.chat.get(i)?.ws_listen,
            "idgen" => cfg.idgen.get(i)?.listen,
            "api" => cfg.api.get(i)?.listen,
            "presence" => cfg.presence.get(i)?.listen,
            "push" => cfg.push.get(i)?.listen,
            "discovery" => cfg.discovery.as_ref()?.listen,
            "etcd" => cfg.etcd.get(i)?.client.parse().ok()?,
            _ => return None,
        })
    }

    /// The end-of-run `kv_status` event (see `sim::kv_view`). Shards are not marked as having
    /// lost their quorum: wiping a majority of a shard's nodes is the operator's to recover.
    pub async fn kv_status(&self) -> Event {
        sim::kv_view::settled(&self.cfg.cluster_map(), &self.operator, Vec::new()).await
    }

    /// Starts the kv prober: one tiny write and one linearizable read ([`Probe::request`]) per
    /// shard every [`PROBE_EVERY`], one of each in flight per shard, through the shard client
    /// every node uses, until `until_unix_us`. Times are on the history's clock
    /// (`t0_unix_us`).
    pub fn start_prober(&self, t0_unix_us: u64, until_unix_us: u64) -> Arc<Mutex<Vec<Probe>>> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let peers = Peers::new(
            self.cfg.cluster_map(),
            Canaries::none(),
            self.operator.clone(),
        );
        let shards = peers.kv_shards() as u32;
        for (shard, read) in (0..shards).flat_map(|s| [(s, false), (s, true)]) {
            let (peers, out) = (peers.clone(), out.clone());
            tokio::spawn(async move {
                while unix_us() < until_unix_us {
                    let start = unix_us();
                    let r = peers
                        .kv_shard(shard as usize)
                        .call(Probe::request(read))
                        .await;
                    let p = Probe {
                        shard,
                        read,
                        start_us: start.saturating_sub(t0_unix_us),
                        end_us: unix_us().saturating_sub(t0_unix_us),
                        ok: Probe::answered(read, &r),
                    };
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(p);
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            });
        }
        out
    }
}

fn is_voter(s: &ShardStatus) -> bool {
    matches!(s.role.as_str(), "leader" | "follower")
}

async fn kv_status(addr: SocketAddr, operator: &NodeTls) -> Option<Vec<ShardStatus>> {
    match tokio::time::timeout(
        Duration::from_secs(2),
        RpcClient::new(addr, operator.clone()).call(Request::KvStatus),
    )
    .await
    {
        Ok(Ok(Response::KvStatus(list))) => Some(list),
        _ => None,
    }
}

fn signal(sig: &str, pid: u32, node: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} ({node}) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_faults_and_rejects_bad_ones() {
        assert_eq!(
            Fault::parse("kv-leader@12.5", false).unwrap(),
            Fault {
                node: "kv-leader".into(),
                after_s: 12.5,
                wipe: false
            }
        );
        assert!(Fault::parse("kv-1@3", true).unwrap().wipe);
        for bad in ["kv-1", "kv-1@x", "kv-1@-2", "kv-1@inf"] {
            assert!(Fault::parse(bad, false).is_err(), "{bad}");
        }
        let e = Fault::parse("chat-0@3", true).unwrap_err().to_string();
        assert!(e.contains("only kv nodes"), "{e}");
    }
}
