//! `chatd local-cluster`: one process per node of a config, on loopback addresses, supervised.
//!
//! Each node runs as `chatd <role> --config <file> --index <i>`, logging to
//! `<data>/logs/<node>.log`, its pid in `<data>/run/<node>.pid`. A node that exits (crash,
//! `kill -9`) is restarted after a backoff (1 s, doubling to 30 s, back to 1 s once it has
//! stayed up a minute). Ctrl-C or SIGTERM stops every node (SIGTERM, then SIGKILL after 5 s).
//! Children get SIGKILL if the supervisor itself dies (Linux `PR_SET_PDEATHSIG`).
//!
//! etcd members of the config that name a peer address and a directory are run here too,
//! first, from Debian's `etcd` binary (`etcd-<i>`, same logs, pid files and restarts; a
//! restarted member rejoins from its data directory).

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::config::{Config, Role};

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A node up this long gets its backoff reset.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What a managed process runs.
#[derive(Debug, Clone)]
enum Proc {
    /// `chatd <role> --index i`.
    Node(Role),
    /// An etcd member: its full command line.
    Etcd(Vec<String>),
}

struct Managed {
    name: String,
    proc: Proc,
    index: usize,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
    restarts: u64,
}

impl Managed {
    fn new(name: String, proc: Proc, index: usize) -> Self {
        Managed {
            name,
            proc,
            index,
            child: None,
            started: Instant::now(),
            backoff: BACKOFF_MIN,
            restart_at: None,
            restarts: 0,
        }
    }
}

pub struct Supervisor {
    exe: PathBuf,
    config_path: PathBuf,
    data: PathBuf,
    nodes: Vec<Managed>,
}

impl Supervisor {
    /// Plans one process per node of `cfg` (already written to `config_path`).
    pub fn new(exe: PathBuf, config_path: PathBuf, cfg: &Config) -> Supervisor {
        // Start order: storage first, then what needs it; every node retries anyway.
        let order = [
            Role::Kv,
            Role::Idgen,
            Role::Discovery,
            Role::Presence,
            Role::Push,
            Role::Chat,
            Role::Api,
        ];
        let mut nodes: Vec<Managed> = etcd_members(cfg)
            .into_iter()
            .map(|(index, args)| Managed::new(format!("etcd-{index}"), Proc::Etcd(args), index))
            .collect();
        for role in order {
            for index in 0..cfg.count(role) {
                let name = format!("{}-{index}", role.name());
                nodes.push(Managed::new(name, Proc::Node(role), index));
            }
        }
        Supervisor {
            exe,
            config_path,
            data: cfg.data.clone(),
            nodes,
        }
    }

    fn logs(&self) -> PathBuf {
        self.data.join("logs")
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.data.join("run").join(format!("{name}.pid"))
    }

    fn spawn(&self, m: &Managed) -> anyhow::Result<Child> {
        let log_path = self.logs().join(format!("{}.log", m.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = match &m.proc {
            Proc::Node(role) => {
                let mut cmd = Command::new(&self.exe);
                cmd.arg(role.name())
                    .arg("--config")
                    .arg(&self.config_path)
                    .arg("--index")
                    .arg(m.index.to_string());
                cmd
            }
            Proc::Etcd(args) => {
                let mut cmd = Command::new(ETCD_BINARY);
                cmd.args(args);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| match &m.proc {
            Proc::Node(_) => format!("start {} ({})", m.name, self.exe.display()),
            Proc::Etcd(_) => format!(
                "start {} (`{ETCD_BINARY}` not found? install Debian's etcd-server, or run \
                 local-cluster with --etcd 0 for the discovery node)",
                m.name
            ),
        })?;
        std::fs::write(self.pid_file(&m.name), format!("{}\n", child.id()))?;
        Ok(child)
    }

    /// Starts every node, then supervises until Ctrl-C or SIGTERM.
    pub async fn run(mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.logs())?;
        std::fs::create_dir_all(self.data.join("run"))?;
        for i in 0..self.nodes.len() {
            let child = self.spawn(&self.nodes[i])?;
            let m = &mut self.nodes[i];
            tracing::info!(node = %m.name, pid = child.id(), "started");
            m.child = Some(child);
            m.started = Instant::now();
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listen for SIGTERM")?;
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                biased;
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => self.check(),
            }
        }
        tracing::info!("stopping every node");
        self.stop_all();
        Ok(())
    }

    /// Notices exits and restarts nodes whose backoff has passed.
    fn check(&mut self) {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            let exited = match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(format!("wait failed: {e}")),
                Some(Ok(None)) | None => None,
            };
            let m = &mut self.nodes[i];
            if let Some(status) = exited {
                m.child = None;
                if m.started.elapsed() >= STABLE_AFTER {
                    m.backoff = BACKOFF_MIN;
                }
                tracing::warn!(node = %m.name, %status, backoff = ?m.backoff, "exited; restarting");
                m.restart_at = Some(now + m.backoff);
                m.backoff = (m.backoff * 2).min(BACKOFF_MAX);
            }
            if m.child.is_none() && m.restart_at.is_some_and(|t| t <= now) {
                let m = &self.nodes[i];
                match self.spawn(m) {
                    Ok(child) => {
                        let m = &mut self.nodes[i];
                        m.restarts += 1;
                        tracing::info!(node = %m.name, pid = child.id(), restarts = m.restarts, "restarted");
                        m.child = Some(child);
                        m.started = Instant::now();
                        m.restart_at = None;
                    }
                    Err(e) => {
                        let m = &mut self.nodes[i];
                        tracing::error!(node = %m.name, error = %e, "restart failed");
                        m.restart_at = Some(now + m.backoff);
                    }
                }
            }
        }
    }

    fn stop_all(&mut self) {
        for m in &self.nodes {
            if let Some(c) = &m.child {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for m in &mut self.nodes {
            if let Some(mut c) = m.child.take() {
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_file(self.data.join("run").join(format!("{}.pid", m.name)));
        }
    }
}

/// The etcd binary (Debian's `etcd-server` package installs it on the PATH).
const ETCD_BINARY: &str = "etcd";

/// The command line of each etcd member this cluster runs (those with a peer address and a
/// directory), by member index.
pub fn etcd_members(cfg: &Config) -> Vec<(usize, Vec<String>)> {
    let run: Vec<(usize, SocketAddr, PathBuf)> = cfg
        .etcd
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let dir = m.dir.as_ref()?;
            let dir = if dir.is_absolute() {
                dir.clone()
            } else {
                cfg.data.join(dir)
            };
            Some((i, m.peer?, dir))
        })
        .collect();
    // With `etcd_tls`: https for clients and peers, each side checking the other's
    // certificate against the cluster CA (nodes present their node certificates).
    let scheme = if cfg.etcd_tls { "https" } else { "http" };
    let tls_dir = cfg.tls_dir();
    let initial = run
        .iter()
        .map(|(i, peer, _)| format!("etcd-{i}={scheme}://{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    run.iter()
        .map(|(i, peer, dir)| {
            let client = &cfg.etcd[*i].client;
            let mut args = vec![
                "--name".to_string(),
                format!("etcd-{i}"),
                "--data-dir".into(),
                dir.display().to_string(),
                "--listen-client-urls".into(),
                format!("{scheme}://{client}"),
                "--advertise-client-urls".into(),
                format!("{scheme}://{client}"),
                "--listen-peer-urls".into(),
                format!("{scheme}://{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("{scheme}://{peer}"),
                "--initial-cluster".into(),
                initial.clone(),
                "--initial-cluster-token".into(),
                "chatsim".into(),
                "--initial-cluster-state".into(),
                "new".into(),
                // A loopback cluster: no metrics listener of its own, quiet logs.
                "--log-level".into(),
                "warn".into(),
                "--logger".into(),
                "zap".into(),
            ];
            if cfg.etcd_tls {
                let (crt, key) = super::certs::etcd_cert_paths(&tls_dir, *i);
                let ca = tls_dir.join("ca.crt").display().to_string();
                let (crt, key) = (crt.display().to_string(), key.display().to_string());
                args.extend([
                    "--cert-file".to_string(),
                    crt.clone(),
                    "--key-file".into(),
                    key.clone(),
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    ca.clone(),
                    "--peer-cert-file".into(),
                    crt,
                    "--peer-key-file".into(),
                    key,
                    "--peer-client-cert-auth".into(),
                    "--peer-trusted-ca-file".into(),
                    ca,
                ]);
            }
            (*i, args)
        })
        .collect()
}

/// Reads a node's pid file (for tests and operators: `kill -9 $(cat data/run/chat-0.pid)`).
pub fn read_pid(data: &Path, node: &str) -> Option<u32> {
    std::fs::read_to_string(data.join("run").join(format!("{node}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}
