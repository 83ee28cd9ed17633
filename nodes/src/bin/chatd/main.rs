//! `chatd`: the real deployment.
//!
//! - `chatd all-in-one [--data DIR]`: every role in one process on 127.0.0.1 (each role still
//!   talks to the others over TCP, as across machines); kv on redb files under DIR; the api,
//!   the browser page, `/metrics` and `/healthz` on 127.0.0.1:8080.
//! - `chatd local-cluster [--chat 3 --kv 3 --idgen 2]`: one process per node on loopback
//!   addresses 127.0.r.i, supervised (restarted when they die).
//! - `chatd <role> --config FILE --index I`: one node of a cluster described by a TOML file
//!   (`chatd print-config` writes one to start from).
//!
//! Logs: `RUST_LOG` (default `info`), to stderr.
//!
//! The real build only: under `--cfg madsim` the binary just says so.

#[cfg(not(madsim))]
mod real;

#[cfg(not(madsim))]
fn main() -> anyhow::Result<()> {
    real::main()
}

#[cfg(madsim)]
fn main() {
    eprintln!("chatd is the real deployment; build it without --cfg madsim");
    std::process::exit(2);
}
