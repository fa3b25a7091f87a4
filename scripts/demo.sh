#!/usr/bin/env bash
# The main job in one command: install, then generate a video with the embedded default
# model and MotionCache, encode it with x264 and write demo.mp4.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
out="${1:-demo.mp4}"
# candle's CPU thread settings that suit few cores (see src/cpu.rs).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}" CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"
gst-launch-1.0 -m motioncachesrc num-buffers=48 \
    prompt="a red circle moving right on a striped blue background" \
    ! videoconvert ! x264enc ! mp4mux ! filesink location="$out" \
    | grep -E "motioncache-stats|ERROR|WARNING" || true
test -s "$out"
echo "wrote $out"
