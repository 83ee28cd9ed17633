//! Shared by the tests that start `chatd` as a process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port of a block of `len` free ports on 127.0.0.1, below the kernel's ephemeral
/// range (32768 and up), so that no client connection of a test takes one between this check
/// and chatd binding it. Blocks differ per process and per call (tests in one binary run in
/// parallel).
pub fn free_base(len: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let salt = std::process::id() % 200;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 1000, "no free block of {len} ports");
        let base = 20_000 + ((salt + n) % 200) as u16 * 60;
        let free = (base..base + len).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
}

/// Starts `chatd all-in-one` on `data` with the port block at `base` (its api at base + 20)
/// and `RUST_LOG=log`; returns the process and the api's address. Callers wait until it
/// answers and kill it when done.
#[allow(dead_code)] // not every test binary that includes `common` starts an all-in-one
pub fn spawn_all_in_one(
    data: &std::path::Path,
    base: u16,
    log: &str,
) -> (std::process::Child, std::net::SocketAddr) {
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], base + 20));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["all-in-one", "--data"])
        .arg(data)
        .args([
            "--http",
            &http.to_string(),
            "--base-port",
            &base.to_string(),
        ])
        .env("RUST_LOG", log)
        .spawn()
        .expect("start chatd");
    (child, http)
}
