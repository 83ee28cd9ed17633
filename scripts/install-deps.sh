#!/usr/bin/env bash
# Debian packages the real build and its tests need, installed only when missing:
# - protobuf-compiler: `protoc`, which etcd-client's build script runs (the real build of
#   nodes with its default `etcd` feature);
# - etcd-server: `etcd`, the members `chatd local-cluster` runs (real-world tests).
# The simulation alone (`cargo run -p sim`) needs neither.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]} (apt-get)"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
# Debian's package may start a system etcd on 127.0.0.1:2379; the local cluster uses
# 127.0.8.x, so it does not clash, but stop it anyway where systemd runs.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  $SUDO systemctl stop etcd || true
fi
