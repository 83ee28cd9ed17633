#!/usr/bin/env bash
# The real-world fault test: `chatd local-cluster` (one process per node on 127.0.r.i: 3 chat,
# 3 kv with 3 shards of 3 replicas, 2 idgen, api, 2 presence, push, and a 3-member etcd cluster
# from Debian's etcd-server), 1,000 real WebSocket clients from two `chat-load` worker
# processes, and in the middle of traffic: `kill -9` of a chat server, `kill -9` of the kv
# node leading the most shards, `kill -9` of a presence node and of an etcd member, and a kv node
# losing its disk (its directory deleted; restarted empty, it rejoins from its peers). The
# supervisor restarts them. The history is judged by the simulation's checkers: no acked
# message lost, reordered, duplicated or altered, ids in order, every client reconnected;
# each kv fault's write stall (a prober) and send->ack are printed. Clients speak https and
# wss:// (the cluster's default: a self-signed certificate the driver is told to trust).
# Release build (the driver and nodes are measured, not just run).
#
# Usage: scripts/real-fault-test.sh [extra chat-load run options]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
./scripts/install-deps.sh
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

cert="$dir/cluster/tls/client.crt"
for _ in $(seq 1 100); do
  if [ -f "$cert" ] && python3 -c "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:$port/healthz', timeout=1, context=ssl.create_default_context(cafile='$cert'))" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

status=0
./target/release/chat-load run --api "127.0.0.1:$port" --ca-cert "$cert" --users 1000 --group-size 10 \
  --rate 200 --duration 40 --settle 20 --procs 2 --out "$dir/load" \
  --cluster "$dir/cluster" --kill chat-0@8 --kill presence-1@13 --kill kv-leader@18 --kill etcd-0@23 --wipe kv-2@28 "$@" \
  || status=$?
if [ "$status" -ne 0 ]; then
  echo "real-world fault test FAILED (exit $status); files kept in $dir" >&2
  echo "--- supervisor log (tail)" >&2
  tail -n 30 "$dir/supervisor.log" >&2
  exit "$status"
fi
# Passed: the nodes' databases and logs (about 200 MB) are not worth keeping; the history is.
rm -rf "$dir/cluster"
echo "real-world fault test passed; history in $dir/load/history.jsonl"
