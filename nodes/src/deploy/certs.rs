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
//!
//! A node whose certificate is missing gets one at start when `ca.key` is there (the config
//! grew), and refuses to start when it is not.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::config::{write_private, Config, Role};
use crate::tls::{ClusterCa, NodeCert, NodeTls, Principal};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

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
    Ok(dir)
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
    Ok(NodeTls::new(cert, false)?)
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
}
