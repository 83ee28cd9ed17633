//! The cluster's certificates on disk: `chatd` creates the cluster CA and a certificate for
//! every node of the config (and one for the operator's tools) on first start, in the TLS
//! directory (`tls_dir`, default `<data>/tls`):
//!
//! | file | what |
//! |---|---|
//! | `ca.crt` | the cluster CA's certificate: every node trusts it |
//! | `ca.key` | the CA's key (0600). Only needed to issue certificates: on a multi-host cluster, keep it off the nodes |
//! | `<role>-<i>.crt`, `<role>-<i>.key` | node `i` of a role (key 0600) |
//! | `operator.crt`, `operator.key` | `chatd status`, `chatd kv-recover` |
//! | `revoked.crl` | node certificates revoked (`chatd revoke-node`), signed by the CA; every node re-reads it within [`REVOCATION_POLL`] |
//! | `etcd-<i>.crt`, `etcd-<i>.key` | etcd member `i` that the cluster runs, with `etcd_tls` (for its client and peer addresses) |
//!
//! A node whose certificate is missing gets one at start when `ca.key` is there (the config
//! grew), and refuses to start when it is not.
//!
//! Apart from these, the certificate devices see (`[client_tls]`, [`client_tls`]): from the
//! config, or with `self_signed` a pair this module creates, `client.crt` and `client.key`
//! in the TLS directory by default (what `all-in-one` and `local-cluster` do). Clients that
//! should trust it are given `client.crt` (`chat --ca-cert`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::config::{write_private, Config, Role};
use crate::client_tls::{KeyKind, ServerTls};
use crate::tls::{ClusterCa, NodeCert, NodeTls, Principal, RevocationList};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// The cluster's revocation list, in the TLS directory.
pub const REVOKED_CRL: &str = "revoked.crl";
/// How often a node looks for a new revocation list.
pub const REVOCATION_POLL: std::time::Duration = std::time::Duration::from_secs(5);

fn file_stem(who: Principal) -> String {
    who.to_string()
}

/// Every principal the config names: each node of each role, and the operator.
fn principals(cfg: &Config) -> Vec<Principal> {
    let mut out: Vec<Principal> = Role::ALL
        .into_iter()
        .flat_map(|role| (0..cfg.count(role) as u32).map(move |i| Principal::Node(role, i)))
        .collect();
    out.push(Principal::Operator);
    out
}

fn write_cert(dir: &Path, cert: &NodeCert) -> anyhow::Result<()> {
    let stem = file_stem(cert.principal);
    let key = dir.join(format!("{stem}.key"));
    write_private(&key, cert.key_pem().as_bytes())
        .with_context(|| format!("write {}", key.display()))?;
    let crt = dir.join(format!("{stem}.crt"));
    write_private(&crt, cert.cert_pem().as_bytes())
        .with_context(|| format!("write {}", crt.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync {}", dir.display()))
}

/// Creates the TLS directory with a new CA and every certificate of the config, unless it
/// exists; then issues what the config added since, if the CA key is there. Safe when several
/// processes start at once: the directory is built aside and renamed into place, and the
/// loser of the race uses the winner's.
pub fn ensure(cfg: &Config) -> anyhow::Result<PathBuf> {
    let dir = cfg.tls_dir();
    if !dir.join(CA_CERT).exists() {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut rng = crate::net::node_rng();
        let ca = ClusterCa::generate(&mut rng)?;
        write_private(&tmp.join(CA_KEY), ca.key_pem().as_bytes())?;
        write_private(&tmp.join(CA_CERT), ca.cert_pem().as_bytes())?;
        for who in principals(cfg) {
            write_cert(&tmp, &ca.issue(who, &mut rng)?)?;
        }
        sync_dir(&tmp)?;
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process created it first: use theirs.
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join(CA_CERT).exists() {
                bail!("could not create {}", dir.display());
            }
        } else {
            sync_dir(parent)?;
            tracing::info!(dir = %dir.display(), "created the cluster CA and node certificates");
        }
    }
    let missing: Vec<Principal> = principals(cfg)
        .into_iter()
        .filter(|w| !dir.join(format!("{}.crt", file_stem(*w))).exists())
        .collect();
    if !missing.is_empty() {
        let key = dir.join(CA_KEY);
        let Ok(pem) = std::fs::read_to_string(&key) else {
            bail!(
                "no certificate for {} in {} and no CA key to issue one ({} is absent)",
                missing
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                dir.display(),
                key.display()
            );
        };
        let ca = ClusterCa::from_key_pem(&pem).context("read the cluster CA key")?;
        let mut rng = crate::net::node_rng();
        for who in missing {
            // Built aside, then renamed: a half-written certificate is never read.
            let tmp = dir.join(format!("new-{who}.tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir(&tmp)?;
            write_cert(&tmp, &ca.issue(who, &mut rng)?)?;
            for ext in ["key", "crt"] {
                let name = format!("{}.{ext}", file_stem(who));
                // `crt` last: its presence is what says the pair is complete.
                let _ = std::fs::rename(tmp.join(&name), dir.join(&name));
            }
            let _ = std::fs::remove_dir_all(&tmp);
        }
        sync_dir(&dir)?;
    }
    ensure_etcd(cfg, &dir)?;
    Ok(dir)
}

/// With `etcd_tls`, a certificate for each etcd member the cluster runs (`etcd-<i>.crt`,
/// `.key`), valid for its client and peer addresses and `localhost`.
fn ensure_etcd(cfg: &Config, dir: &Path) -> anyhow::Result<()> {
    if !cfg.etcd_tls {
        return Ok(());
    }
    let missing: Vec<usize> = (0..cfg.etcd.len())
        .filter(|&i| cfg.etcd[i].dir.is_some() && !etcd_cert_paths(dir, i).0.exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let key = dir.join(CA_KEY);
    let pem = std::fs::read_to_string(&key).with_context(|| {
        format!(
            "no certificate for etcd member(s) {missing:?} and no CA key to issue one ({} is absent)",
            key.display()
        )
    })?;
    let ca = ClusterCa::from_key_pem(&pem).context("read the cluster CA key")?;
    let mut rng = crate::net::node_rng();
    for i in missing {
        let m = &cfg.etcd[i];
        let mut names = vec!["localhost".to_string()];
        for hostport in [Some(m.client.clone()), m.peer.map(|p| p.to_string())]
            .into_iter()
            .flatten()
        {
            let host = crate::client_tls::host_of(&hostport).0.to_string();
            if !names.contains(&host) {
                names.push(host);
            }
        }
        let (cert_pem, key_pem) = ca.issue_service(&format!("etcd-{i}"), names, &mut rng)?;
        let (crt, key) = etcd_cert_paths(dir, i);
        let _ = std::fs::remove_file(&key);
        write_private(&key, key_pem.as_bytes())
            .with_context(|| format!("write {}", key.display()))?;
        let tmp = crt.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, cert_pem.as_bytes())
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .with_context(|| format!("write {}", tmp.display()))?;
        // The certificate last: its presence says the pair is complete.
        std::fs::rename(&tmp, &crt).with_context(|| format!("write {}", crt.display()))?;
    }
    sync_dir(dir)
}

/// Where etcd member `i`'s certificate and key are, in the TLS directory `dir`.
pub fn etcd_cert_paths(dir: &Path, i: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("etcd-{i}.crt")),
        dir.join(format!("etcd-{i}.key")),
    )
}

/// `who`'s mutual TLS from the TLS directory (after [`ensure`]).
pub fn load(cfg: &Config, who: Principal) -> anyhow::Result<NodeTls> {
    let dir = cfg.tls_dir();
    let read = |name: String| {
        let path = dir.join(&name);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let stem = file_stem(who);
    let cert = NodeCert::from_pem(
        &read(CA_CERT.to_string())?,
        &read(format!("{stem}.crt"))?,
        &read(format!("{stem}.key"))?,
    )
    .with_context(|| format!("{stem}'s certificate in {}", dir.display()))?;
    if cert.principal != who {
        bail!(
            "{}/{stem}.crt names {}, not {who}",
            dir.display(),
            cert.principal
        );
    }
    Ok(NodeTls::with_revoked(cert, false, read_revocations(&dir)?)?)
}

/// The revocation list in the TLS directory `dir` (empty if there is none).
pub fn read_revocations(dir: &Path) -> anyhow::Result<RevocationList> {
    let path = dir.join(REVOKED_CRL);
    match std::fs::read_to_string(&path) {
        Ok(text) => RevocationList::from_pem(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationList::default()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Revokes `who`'s certificate (its key is thought stolen) and issues it a new one: adds the
/// old certificate's serial to `revoked.crl` (signed by the CA; needs `ca.key`), then puts a
/// new certificate and key in place. Every node refuses the old certificate once it has read
/// the list (within [`REVOCATION_POLL`]), in new handshakes and on connections already open;
/// `who` itself must be restarted to use its new certificate. Answers the revoked serial.
pub fn revoke(cfg: &Config, who: Principal) -> anyhow::Result<Vec<u8>> {
    let dir = ensure(cfg)?;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let ca = ClusterCa::from_key_pem(&read(CA_KEY)?).context("read the cluster CA key")?;
    let stem = file_stem(who);
    let old = NodeCert::from_pem(
        &read(CA_CERT)?,
        &read(&format!("{stem}.crt"))?,
        &read(&format!("{stem}.key"))?,
    )?;
    let serial = crate::tls::serial_of(&old.cert)?;
    let mut serials: Vec<Vec<u8>> = read_revocations(&dir)?.serials().cloned().collect();
    if !serials.contains(&serial) {
        serials.push(serial.clone());
    }
    let now = time::OffsetDateTime::now_utc();
    let crl = ca.revocation_list(&serials, now.unix_timestamp().max(0) as u64, now)?;
    let tmp = dir.join(format!("{REVOKED_CRL}.tmp{}", std::process::id()));
    std::fs::write(&tmp, crl.as_bytes())
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(REVOKED_CRL))
        .with_context(|| format!("write {}", dir.join(REVOKED_CRL).display()))?;
    // The new certificate, built aside and renamed into place (`crt` last).
    let mut rng = crate::net::node_rng();
    let fresh = dir.join(format!("new-{who}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir(&fresh)?;
    write_cert(&fresh, &ca.issue(who, &mut rng)?)?;
    for ext in ["key", "crt"] {
        let name = format!("{stem}.{ext}");
        std::fs::rename(fresh.join(&name), dir.join(&name))
            .with_context(|| format!("replace {}", dir.join(&name).display()))?;
    }
    let _ = std::fs::remove_dir_all(&fresh);
    sync_dir(&dir)?;
    Ok(serial)
}

/// Re-reads the revocation list whenever it changes (polled every [`REVOCATION_POLL`]) and
/// puts it in force in `tls`. Runs until the process ends.
pub async fn watch_revocations(dir: PathBuf, tls: NodeTls) -> anyhow::Result<()> {
    let path = dir.join(REVOKED_CRL);
    // Unknown at first: the list is read again at the first poll, so a change between the
    // node's start (which read it) and this task's first look is not missed.
    let mut seen: Option<Option<std::time::SystemTime>> = None;
    loop {
        tokio::time::sleep(REVOCATION_POLL).await;
        let now = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if seen == Some(now) {
            continue;
        }
        match read_revocations(&dir).map(|list| (list.len(), tls.set_revoked(list))) {
            Ok((n, Ok(()))) => {
                if seen.is_some() {
                    tracing::warn!(revoked = n, "a new certificate revocation list is in force");
                } else if n > 0 {
                    tracing::info!(revoked = n, "certificate revocation list in force");
                }
                seen = Some(now);
            }
            // A list being replaced is renamed into place whole; a bad one is an operator's
            // mistake: keep the old list and say so until it is fixed.
            Ok((_, Err(e))) => tracing::error!(error = %e, "revocation list refused"),
            Err(e) => tracing::error!(error = %e, "revocation list unreadable"),
        }
    }
}

/// The names a self-signed client certificate holds: every api and chat server address
/// (listened on and advertised), and `localhost` (added by `self_signed`).
fn client_names(cfg: &Config) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: String| {
        if !names.contains(&n) {
            names.push(n);
        }
    };
    for a in &cfg.api {
        add(a.listen.ip().to_string());
    }
    for c in &cfg.chat {
        add(c.ws_listen.ip().to_string());
        if let Some(adv) = &c.ws_advertise {
            add(crate::client_tls::host_of(adv).0.to_string());
        }
    }
    // An unspecified listen address (0.0.0.0) is no name a client dials.
    names.retain(|n| {
        n.parse::<std::net::IpAddr>()
            .map_or(true, |ip| !ip.is_unspecified())
    });
    names
}

/// The server side of `[client_tls]`, or `None` (plain http and ws://). With `self_signed`
/// and no files yet, creates the pair first: ECDSA P-256, written aside and renamed into
/// place with the certificate last, so a half-written pair is never read and processes
/// starting at once end up with one pair.
pub fn client_tls(cfg: &Config) -> anyhow::Result<Option<ServerTls>> {
    let (Some(files), Some((cert, key))) = (&cfg.client_tls, cfg.client_tls_paths()) else {
        return Ok(None);
    };
    if files.self_signed && !cert.exists() {
        let dir = cert.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        // One creator: the process that makes the lock file; the others wait for the
        // certificate (written last). A lock left by a crash is taken over after a minute.
        let lock = dir.join("client-tls.lock");
        let stale = |l: &Path| {
            std::fs::metadata(l)
                .and_then(|m| m.modified())
                .is_ok_and(|t| {
                    t.elapsed()
                        .is_ok_and(|e| e > std::time::Duration::from_secs(60))
                })
        };
        if stale(&lock) {
            let _ = std::fs::remove_file(&lock);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => {
                let made = write_self_signed(cfg, dir, &cert, &key);
                let _ = std::fs::remove_file(&lock);
                made?;
            }
            Err(_) => {
                for _ in 0..100 {
                    if cert.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
    Ok(Some(ServerTls::load(&cert, &key)?))
}

fn write_self_signed(cfg: &Config, dir: &Path, cert: &Path, key: &Path) -> anyhow::Result<()> {
    if cert.exists() {
        return Ok(());
    }
    let pair = crate::client_tls::self_signed(&client_names(cfg), KeyKind::EcdsaP256)?;
    let _ = std::fs::remove_file(key);
    write_private(key, pair.key_pem.as_bytes())
        .with_context(|| format!("write {}", key.display()))?;
    let tmp = dir.join(format!("client-crt.tmp{}", std::process::id()));
    std::fs::write(&tmp, pair.cert_pem.as_bytes())
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    // The certificate last: its presence says the pair is complete.
    std::fs::rename(&tmp, cert).with_context(|| format!("write {}", cert.display()))?;
    sync_dir(dir)?;
    tracing::info!(cert = %cert.display(), "created a self-signed certificate for clients");
    Ok(())
}

/// [`ensure`], then [`load`]: what a process starting as `who` does.
pub fn node_tls(cfg: &Config, who: Principal) -> anyhow::Result<NodeTls> {
    ensure(cfg)?;
    load(cfg, who)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_and_grown_with_the_config() {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = Config::single_host(
            data.path().to_path_buf(),
            "127.0.0.1:8080".parse().unwrap(),
            7100,
            1,
        );
        let kv0 = node_tls(&cfg, Principal::Node(Role::Kv, 0)).unwrap();
        assert_eq!(kv0.principal(), Principal::Node(Role::Kv, 0));
        let ca_before = std::fs::read(cfg.tls_dir().join(CA_CERT)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CA_KEY, "kv-0.key", "operator.key"] {
                let mode = std::fs::metadata(cfg.tls_dir().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}: {mode:o}");
            }
        }
        // A second kv node in the config: its certificate is issued by the same CA.
        let mut extra = cfg.kv[0].clone();
        extra.listen = "127.0.0.1:7999".parse().unwrap();
        cfg.kv.push(extra);
        node_tls(&cfg, Principal::Node(Role::Kv, 1)).unwrap();
        assert_eq!(
            std::fs::read(cfg.tls_dir().join(CA_CERT)).unwrap(),
            ca_before
        );
        // Without the CA key a missing certificate is an error that says so.
        std::fs::remove_file(cfg.tls_dir().join(CA_KEY)).unwrap();
        std::fs::remove_file(cfg.tls_dir().join("kv-1.crt")).unwrap();
        let err = node_tls(&cfg, Principal::Node(Role::Kv, 1)).unwrap_err();
        assert!(format!("{err:#}").contains("no CA key"), "{err:#}");
        // A certificate under another principal's file name is refused.
        std::fs::copy(
            cfg.tls_dir().join("kv-0.crt"),
            cfg.tls_dir().join("api-0.crt"),
        )
        .unwrap();
        std::fs::copy(
            cfg.tls_dir().join("kv-0.key"),
            cfg.tls_dir().join("api-0.key"),
        )
        .ok();
        let err = load(&cfg, Principal::Node(Role::Api, 0)).unwrap_err();
        assert!(format!("{err:#}").contains("names kv-0"), "{err:#}");
    }

    // Proves `chatd revoke-node`'s work: the old certificate's serial goes into the signed
    // list every node loads, the node gets a new certificate that is not revoked, and a
    // second revocation keeps the first.
    #[test]
    fn revoking_lists_the_old_certificate_and_issues_a_new_one() {
        let data = tempfile::tempdir().unwrap();
        let cfg = Config::single_host(
            data.path().to_path_buf(),
            "127.0.0.1:8080".parse().unwrap(),
            7100,
            2,
        );
        let who = Principal::Node(Role::Kv, 1);
        let old = node_tls(&cfg, who).unwrap().serial();
        assert_eq!(read_revocations(&cfg.tls_dir()).unwrap().len(), 0);
        assert_eq!(revoke(&cfg, who).unwrap(), old);
        let other = load(&cfg, Principal::Node(Role::Chat, 0)).unwrap();
        assert_eq!(other.revoked_count(), 1);
        assert!(other.is_revoked(&old));
        let renewed = load(&cfg, who).unwrap();
        assert_ne!(renewed.serial(), old, "a new certificate");
        assert!(!renewed.is_revoked(&renewed.serial()));
        revoke(&cfg, Principal::Operator).unwrap();
        let list = read_revocations(&cfg.tls_dir()).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.serials().any(|s| *s == old));
    }

    // Proves a running node puts a new revocation list in force by itself (what `chatd
    // revoke-node` relies on): within two polls, without a restart.
    #[tokio::test]
    async fn a_running_node_picks_up_a_new_list() {
        let data = tempfile::tempdir().unwrap();
        let cfg = Config::single_host(
            data.path().to_path_buf(),
            "127.0.0.1:8080".parse().unwrap(),
            7100,
            1,
        );
        let running = node_tls(&cfg, Principal::Node(Role::Api, 0)).unwrap();
        let watcher = tokio::spawn(watch_revocations(cfg.tls_dir(), running.clone()));
        let stolen = revoke(&cfg, Principal::Node(Role::Chat, 0)).unwrap();
        let deadline = tokio::time::Instant::now() + REVOCATION_POLL * 2 + REVOCATION_POLL / 2;
        while !running.is_revoked(&stolen) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new list was not put in force"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        watcher.abort();
    }
}
