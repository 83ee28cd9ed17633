#!/usr/bin/env bash
# Every test in both worlds: the real build (unit tests + the chatd process integration test),
# then the simulation build (`--cfg madsim`, its own target dir): whole seeded runs,
# determinism, and the canary bugs. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== real world: cargo test (workspace)"
cargo test --workspace

echo "== simulation: cargo test with --cfg madsim (target/madsim)"
RUSTFLAGS="${RUSTFLAGS:-} --cfg madsim" cargo test --release -p sim -p nodes \
  --features sim/canaries --target-dir target/madsim
