#!/usr/bin/env bash
# The web page in a real browser: headless Debian Chromium, driven by playwright-core
# (nodes/tests/browser/chat.test.mjs), against a real `chatd all-in-one` on free ports.
# Installs what is missing on a fresh Debian machine: Chromium (apt) and the test's one npm
# package (npm ci, from package-lock.json; Playwright's own browser download is not used).
# Needs Node.js >= 20 and npm, and the Rust toolchain. Takes about 45 s once built: most of
# it is waiting for the presence timeout (30 s) after one browser closes.
#
# chatd is built in debug: the test drives two users, so speed does not matter, and CI's
# `cargo test --workspace` has already built the debug dependencies (a release build of the
# whole node crate from scratch takes minutes on two cores).
#
# Env: CHROMIUM (default /usr/bin/chromium), CARGO_TARGET_DIR, CHATD_BIN (skips the build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian's chromium"
  $SUDO apt-get update
  $SUDO apt-get install -y chromium chromium-driver
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "== installing Debian's nodejs and npm"
  $SUDO apt-get update
  $SUDO apt-get install -y nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "error: Node.js >= 20 is needed (playwright-core), found $(node --version)" >&2
  exit 1
fi

echo "== npm ci (nodes/tests/browser)"
(cd nodes/tests/browser && npm ci --no-audit --no-fund)

if [ -z "${CHATD_BIN:-}" ]; then
  echo "== cargo build -p nodes --bin chatd"
  cargo build -p nodes --bin chatd
  CHATD_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/chatd"
fi

echo "== browser test with $CHATD_BIN"
CHATD_BIN="$CHATD_BIN" node nodes/tests/browser/chat.test.mjs
