#!/usr/bin/env bash
# Real-deployment measurements (release build, loopback, this machine), written to
# benches/results/real/: idle WebSocket memory on one chat server, reconnects after kill -9
# of a chat server, and end-to-end throughput and latency for 1:1 and groups of 100.
#
# `tls` compares client TLS on and off: 1:1 throughput and latency at RATES_TLS sends/s, and
# idle WebSocket memory for TLS_IDLE_CONNS connections.
#
# `overload` offers 1:1 sends past saturation (RATES_OVERLOAD, default 8000/s: about twice
# what this machine acks) with each chat server's admission in SENDS_IN_FLIGHT_LIMITS
# (default "32 128 target=50 target=100 default": a number is a fixed limit of sends in
# flight, target=T an adaptive limit aiming at T ms commits, default the cluster's default):
# acked/s, refusals, sends held by devices' backoff, the send->ack of the sends neither
# refused nor held, and attempt->ack (from the transmission the server accepted).
#
# Usage: scripts/bench-real.sh [idle|reconnect|throughput|tls|overload]...   (default: all but tls and overload)
# Env: IDLE_CONNS (default "10000 19000"), RECONNECT_USERS (10000, 5,000 per chat server),
#      RATES_1TO1 ("500 1000 2000"), RATES_GROUP100 ("10 20 40"), RATES_TLS ("4000 8000"),
#      TLS_IDLE_CONNS (5000), TLS (1: clients speak https and wss:// as the cluster's default;
#      0: --plaintext).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
cargo build --release -p nodes --bin chatd -p benches --bin chat-load
out=benches/results/real
mkdir -p "$out"
chatd=./target/release/chatd
load=./target/release/chat-load
work=$(mktemp -d -t chatsim-bench.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sup=""

start_cluster() { # name, extra local-cluster args...
  local name=$1; shift
  rm -rf "$work/$name"
  local plain=()
  [ "${TLS:-1}" = 1 ] || plain=(--plaintext)
  $chatd local-cluster --data "$work/$name" --http "127.0.0.1:$port" "${plain[@]}" "$@" >"$work/$name.log" 2>&1 &
  sup=$!
  for _ in $(seq 1 100); do
    if [ "${TLS:-1}" = 1 ]; then
      [ -f "$work/$name/tls/client.crt" ] &&
        curl -sf --cacert "$work/$name/tls/client.crt" "https://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    else
      curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    fi
    sleep 0.2
  done
  sleep 11 # the presence node's warm-up
}
# chat-load's TLS argument for the cluster `name` (none with TLS=0).
ca() { [ "${TLS:-1}" = 1 ] && echo "--ca-cert $work/$1/tls/client.crt" || true; }
stop_cluster() {
  if [ -n "$sup" ]; then kill "$sup"; wait "$sup" 2>/dev/null || true; sup=""; fi
}
trap stop_cluster EXIT

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

idle() {
  for n in ${IDLE_CONNS:-10000 19000}; do
    start_cluster idle --chat 1 --kv 1 --idgen 1
    local pid; pid=$(cat "$work/idle/run/chat-0.pid")
    local before; before=$(rss_kb "$pid")
    local procs=$(( (n + 9999) / 10000 ))
    local ramp=$(( n / 1000 + 3 ))
    $load run --api "127.0.0.1:$port" $(ca idle) --users "$n" --group-size 1 --rate 0 --duration 30 \
      --settle 5 --procs "$procs" --out "$work/idle-$n" >"$work/idle-$n.txt" 2>&1 &
    local lp=$!
    # Setup, then the ramp, then 15 s of idle connections.
    local peak=0
    while kill -0 "$lp" 2>/dev/null; do
      local r; r=$(rss_kb "$pid"); [ "$r" -gt "$peak" ] && peak=$r
      sleep 1
    done
    wait "$lp" || true
    local conns; conns=$(grep -o 'connected at end [0-9]*' "$work/idle-$n.txt" | grep -o '[0-9]*$')
    local per=$(( (peak - before) * 1024 / n ))
    echo "idle: $n connections ($conns connected at end): chat-0 RSS ${before} kB before, ${peak} kB peak; $per bytes per connection" | tee -a "${IDLE_OUT:-$out/idle.txt}"
    stop_cluster
  done
}

reconnect() {
  local n=${RECONNECT_USERS:-10000}
  start_cluster reconnect --chat 2 --kv 3 --idgen 2
  $load run --api "127.0.0.1:$port" $(ca reconnect) --users "$n" --group-size 10 --rate 100 --duration 40 \
    --settle 15 --procs 2 --out "$work/reconnect" --cluster "$work/reconnect" --kill chat-0@20 \
    | tee "$work/reconnect.txt" | grep -E "crash of|result|devices" | tee -a "$out/reconnect.txt"
  stop_cluster
}

# One traffic run against the running cluster `name`: 2,000 users for 30 s (SETTLE s to
# settle, default 10),
# groups of `size` taking `share` of the sends, `rate` sends/s; its work files in $work/`dir`;
# the report lines matching `keep` are appended to $out/`file`.
traffic() {
  local name=$1 size=$2 share=$3 rate=$4 dir=$5 keep=$6 file=$7
  $load run --api "127.0.0.1:$port" $(ca "$name") --users 2000 --group-size "$size" \
    --group-share "$share" --rate "$rate" --duration 30 --settle "${SETTLE:-10}" --procs 2 --out "$work/$dir" \
    | grep -E "$keep" | tee -a "$out/$file" || true
}

throughput() {
  for rate in ${RATES_1TO1:-500 1000 2000}; do
    start_cluster tp
    echo "1:1 at $rate sends/s:" | tee -a "$out/throughput.txt"
    traffic tp 1 0 "$rate" "tp-1to1-$rate" "throughput|send->|result" throughput.txt
    stop_cluster
  done
  for rate in ${RATES_GROUP100:-10 20 40}; do
    start_cluster tp
    echo "groups of 100 at $rate sends/s:" | tee -a "$out/throughput.txt"
    traffic tp 100 1 "$rate" "tp-g100-$rate" "throughput|send->|result" throughput.txt
    stop_cluster
  done
}

tls() {
  local n=${TLS_IDLE_CONNS:-5000}
  for t in 0 1; do
    TLS=$t
    for rate in ${RATES_TLS:-4000 8000}; do
      start_cluster tp
      echo "client TLS=$t, 1:1 at $rate sends/s:" | tee -a "$out/tls.txt"
      traffic tp 1 0 "$rate" "tls-$t-$rate" "throughput|send->|connect|result" tls.txt
      stop_cluster
    done
    echo "client TLS=$t:" | tee -a "$out/tls.txt"
    IDLE_CONNS=$n IDLE_OUT="$out/tls.txt" idle
  done
  TLS=1
}

overload() {
  for rate in ${RATES_OVERLOAD:-8000}; do
    for limit in ${SENDS_IN_FLIGHT_LIMITS:-32 128 target=50 target=100 default}; do
      local extra=()
      case $limit in
        default) ;;
        target=*) extra=(--admission-target-ms "${limit#target=}") ;;
        *) extra=(--sends-in-flight "$limit" --admission-target-ms 0) ;;
      esac
      start_cluster ov "${extra[@]}"
      echo "1:1 at $rate sends/s, sends in flight per chat server: $limit:" | tee -a "$out/overload.txt"
      # Twice what the cluster acks leaves a backlog on the devices when the traffic stops:
      # 90 s to drain it before the checkers judge loss and order.
      SETTLE=${SETTLE_OVERLOAD:-90} traffic ov 1 0 "$rate" "ov-$limit-$rate" "throughput|send->|admission|result|^(order|no_loss|no_duplicates|ids|integrity) " overload.txt
      stop_cluster
    done
  done
}

what=${*:-idle reconnect throughput}
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $what" | tee -a "$out/runs.txt"
for w in $what; do "$w"; done
echo "work files in $work"
