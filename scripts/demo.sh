#!/usr/bin/env bash
# Runs `aliyun-spot demo`: a sample CI job through config -> prepare -> run -> cleanup, exactly
# as gitlab-runner calls the stage binaries, against the local ECS emulator (no Aliyun account,
# no network). Installs openssh-server when missing: every emulated instance is a real sshd.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  echo "==> installing openssh-server (the emulator runs a real sshd per instance)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq openssh-server >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
  exit 1
fi
echo "==> building"
cargo build --locked --bins --quiet
# The emulated instances listen on port 22 of their own loopback addresses, which needs root.
as_root target/debug/aliyun-spot demo "$@"
