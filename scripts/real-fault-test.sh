#!/usr/bin/env bash
# The real-world fault test: `chatd local-cluster` (one process per node on 127.0.r.i: 3 chat,
# 3 kv, 2 idgen, api, discovery, presence, push), 1,000 real WebSocket clients from two
# `chat-load` worker processes, `kill -9` of a chat server and of a kv node in the middle of
# traffic (the supervisor restarts them), then the history is judged by the simulation's
# checkers: no acked message lost, reordered or duplicated, ids in order, every client
# reconnected. Release build (the driver and nodes are measured, not just run).
#
# Usage: scripts/real-fault-test.sh [extra chat-load run options]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
cargo build --release -p nodes --bin chatd -p benches --bin chat-load

dir=$(mktemp -d -t chatsim-faults.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
./target/release/chatd local-cluster --data "$dir/cluster" --http "127.0.0.1:$port" \
  >"$dir/supervisor.log" 2>&1 &
sup=$!
cleanup() {
  kill "$sup" 2>/dev/null || true
  wait "$sup" 2>/dev/null || true
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

status=0
./target/release/chat-load run --api "127.0.0.1:$port" --users 1000 --group-size 10 \
  --rate 200 --duration 40 --settle 20 --procs 2 --out "$dir/load" \
  --cluster "$dir/cluster" --kill chat-0@10 --kill kv-1@25 "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "real-world fault test FAILED (exit $status); files kept in $dir" >&2
  echo "--- supervisor log (tail)" >&2
  tail -n 30 "$dir/supervisor.log" >&2
  exit "$status"
fi
echo "real-world fault test passed; history in $dir/load/history.jsonl"
