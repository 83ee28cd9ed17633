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

/// Starts `chatd all-in-one --plaintext` on `data` with the port block at `base` (its api at
/// base + 20) and `RUST_LOG=log`; returns the process and the api's address. Callers wait
/// until it answers and kill it when done.
#[allow(dead_code)] // not every test binary that includes `common` starts an all-in-one
pub fn spawn_all_in_one(
    data: &std::path::Path,
    base: u16,
    log: &str,
) -> (std::process::Child, std::net::SocketAddr) {
    spawn_all_in_one_with(data, base, log, &["--plaintext"])
}

/// [`spawn_all_in_one`] with these arguments instead of `--plaintext` (none: https and
/// wss:// with the self-signed certificate it writes to [`self_signed_cert`]).
#[allow(dead_code)]
pub fn spawn_all_in_one_with(
    data: &std::path::Path,
    base: u16,
    log: &str,
    args: &[&str],
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
        .args(args)
        .env("RUST_LOG", log)
        .spawn()
        .expect("start chatd");
    (child, http)
}

/// Where `chatd all-in-one` on `data` writes its self-signed client certificate.
#[allow(dead_code)]
pub fn self_signed_cert(data: &std::path::Path) -> std::path::PathBuf {
    data.join("tls").join("client.crt")
}

/// A client trusting the self-signed certificate of `chatd all-in-one` on `data`, once the
/// process has written it (within 20 s).
#[allow(dead_code)]
pub fn trust_self_signed(data: &std::path::Path) -> nodes::client_tls::ClientTls {
    let path = self_signed_cert(data);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(pem) = std::fs::read(&path) {
            if let Ok(tls) = nodes::client_tls::ClientTls::trusting_pem(&pem) {
                return tls;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no certificate at {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
