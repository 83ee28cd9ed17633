//! The launcher: a plain `cargo run -p sim` lands here. It re-runs cargo with
//! `--cfg madsim` into `target/madsim` (so the real and simulated builds keep their own
//! caches), forwarding release mode, the `canaries` feature and every argument.
//!
//! It does not parse the arguments: the simulated binary does (so `--help` is complete).

use std::path::PathBuf;
use std::process::Command;

/// Set in the child so a misconfigured build cannot relaunch forever.
const GUARD: &str = "CHATSIM_MADSIM_CHILD";

pub fn relaunch() -> i32 {
    if std::env::var_os(GUARD).is_some() {
        eprintln!(
            "error: the simulator was built without --cfg madsim although the launcher asked for it; \
             check RUSTFLAGS / CARGO_ENCODED_RUSTFLAGS"
        );
        return 2;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("sim/ has a parent: the workspace")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("madsim");
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !rustflags.split_whitespace().any(|f| f == "madsim") {
        rustflags.push_str(" --cfg madsim");
    }
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .arg("run")
        .arg("-p")
        .arg("sim")
        .arg("--target-dir")
        .arg(&target);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    if cfg!(feature = "canaries") {
        cmd.arg("--features").arg("canaries");
    }
    cmd.arg("--")
        .args(std::env::args_os().skip(1))
        .env("RUSTFLAGS", rustflags.trim())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(GUARD, "1");
    match cmd.status() {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("error: could not run cargo for the simulation build: {e}");
            2
        }
    }
}
