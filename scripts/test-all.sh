#!/usr/bin/env bash
# Every test in both worlds (first installs Debian's protobuf-compiler and etcd-server if
# missing):
# - the real build: unit tests and the tests that start chatd as a process (all-in-one,
#   restart, CLI, bad input on real sockets, push adapters against stub servers);
# - the web page in headless Chromium (installs Debian's chromium and one npm package if
#   missing; needs Node.js >= 20);
# - the real-world fault test: a multi-process local cluster, 1,000 real clients, kill -9 of
#   a chat server and a kv node, judged by the simulation's checkers (release build);
# - the simulation build (`--cfg madsim`, its own target dir): whole seeded runs,
#   determinism, and the canary bugs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

# protoc (the real build's etcd client) and etcd (the local cluster's members), if missing.
./scripts/install-deps.sh

echo "== real world: cargo test (workspace)"
cargo test --workspace

echo "== real world: the web page in headless Chromium"
./scripts/browser-test.sh

echo "== real world: fault test on a local multi-process cluster"
./scripts/real-fault-test.sh

echo "== simulation: cargo test with --cfg madsim (target/madsim)"
# rustdoc needs the cfg too, or doc tests see the real-world modules without their deps.
RUSTFLAGS="${RUSTFLAGS:-} --cfg madsim" RUSTDOCFLAGS="${RUSTDOCFLAGS:-} --cfg madsim" cargo test --release -p sim -p nodes \
  --features sim/canaries --target-dir target/madsim
