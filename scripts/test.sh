#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine: installs the system packages
# the tests need (GStreamer, nginx with the RTMP module, ffmpeg), checks formatting, runs
# `cargo test`, `cargo clippy -D warnings` and `cargo doc` without warnings (CPU), then
# compile-checks the `cuda` feature with the CUDA compiler from PyPI (tools/check-cuda.sh;
# no GPU needed; set MOTIONCACHE_SKIP_CUDA_CHECK=1 to leave it out).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all --check
# `bench` adds the benchmark binary's own tests (calibration fit, frontier, report) in the
# same build.
features="--workspace --all-targets --features motioncache/bench"
cargo test $features --no-run 2>&1
# The soak test (10 minutes of live video, little CPU) runs beside the others, from its
# built binary (cargo holds the build directory while it runs a test).
soak_bin="$(cargo test --workspace --features motioncache/bench --test soak --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"name":"soak".*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
soak_log="$(mktemp)"
(cd plugin && "$soak_bin" --ignored --nocapture >"$soak_log" 2>&1) &
soak_pid=$!
cargo test $features 2>&1
if ! wait "$soak_pid"; then
    cat "$soak_log"
    echo "the soak test failed" >&2
    exit 1
fi
grep -E "^soak:|test result" "$soak_log"
cargo clippy --workspace --all-targets --features motioncache/bench -- -D warnings 2>&1
# The API documentation builds without warnings (broken or private intra-doc links).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --features motioncache/bench 2>&1
# The GPU validation script on the CPU with tiny shapes, so that it cannot rot.
report="$(./tools/gpu-validate.sh --device cpu)"
if ! grep -q '"all_ok": true' <<<"$report"; then
    echo "$report"
    echo "tools/gpu-validate.sh --device cpu failed" >&2
    exit 1
fi
echo "tools/gpu-validate.sh --device cpu: all steps ok"
if [ "${MOTIONCACHE_SKIP_CUDA_CHECK:-0}" != "1" ]; then
    ./tools/check-cuda.sh
fi
