#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine: installs the system packages
# the tests need (GStreamer, nginx with the RTMP module, ffmpeg), then `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo test --workspace --all-targets 2>&1
