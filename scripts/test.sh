#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine: installs the system packages
# the tests need (GStreamer, nginx with the RTMP module, ffmpeg), checks formatting, runs
# `cargo test` and `cargo clippy -D warnings` (CPU), then
# compile-checks the `cuda` feature with the CUDA compiler from PyPI (tools/check-cuda.sh;
# no GPU needed; set MOTIONCACHE_SKIP_CUDA_CHECK=1 to leave it out).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all --check
# `bench` adds the benchmark binary's own tests (calibration fit, frontier, report) in the
# same build.
cargo test --workspace --all-targets --features motioncache/bench 2>&1
cargo clippy --workspace --all-targets --features motioncache/bench -- -D warnings 2>&1
if [ "${MOTIONCACHE_SKIP_CUDA_CHECK:-0}" != "1" ]; then
    ./tools/check-cuda.sh
fi
