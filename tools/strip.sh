#!/usr/bin/env bash
# The README's frame strips, cut from what the element streams (a release build of the
# plugin, `cargo build --release -p gst-plugin-motioncache`, and Python with Pillow:
# MOTIONCACHE_PYTHON, default python3). Frames side by side, scaled 3x, a row per stream.
#
#     tools/strip.sh stream [OUT.png] [PROMPT ...]
#         96-frame (12 s) streams at the default settings, one per prompt: frames of the
#         first, middle and last second (default OUT docs/stream-strip.png).
#     tools/strip.sh overlay [OUT.png] [PROMPT]
#         24 frames of one prompt without and with `overlay=recompute` (tokens tinted by how
#         often MotionCache recomputed them in their block), every third frame (default OUT
#         docs/overlay-strip.png).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-}
shift || true
case "$kind" in
    stream)
        out=${1:-docs/stream-strip.png}
        shift || true
        if [ $# -eq 0 ]; then
            set -- "a red circle moving right on a striped blue background" \
                "a yellow square moving left on a checkered green background" \
                "a white triangle moving up on a plain black background" \
                "a static green circle on a striped red background"
        fi
        frames=96
        picks=0,4,44,48,52,88,92,95 # seconds 1, 6-7 and 12 at 8 fps
        prompts=("$@")
        overlays=()
        for _ in "$@"; do overlays+=(none); done
        ;;
    overlay)
        out=${1:-docs/overlay-strip.png}
        prompt=${2:-a red circle moving right on a striped blue background}
        frames=24
        picks=2,5,8,11,14,17,20,23
        prompts=("$prompt" "$prompt")
        overlays=(none recompute)
        ;;
    *)
        echo "usage: tools/strip.sh stream|overlay [OUT.png] [PROMPT ...]" >&2
        exit 2
        ;;
esac
python=${MOTIONCACHE_PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
for i in "${!prompts[@]}"; do
    mkdir -p "$tmp/$i"
    gst-launch-1.0 -q motioncachesrc num-buffers=$frames overlay="${overlays[$i]}" \
        prompt="${prompts[$i]}" ! videoconvert ! video/x-raw,format=RGB ! pngenc \
        ! multifilesink location="$tmp/$i/%03d.png"
done
"$python" - "$tmp" "$out" "${#prompts[@]}" "$picks" <<'PY'
import sys, pathlib
from PIL import Image
tmp, out, rows = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pick = [int(k) for k in sys.argv[4].split(",")]
grid = []
for r in range(rows):
    frames = sorted((tmp / str(r)).glob("*.png"))
    if len(frames) <= max(pick):
        sys.exit(f"stream {r}: only {len(frames)} frames")
    grid.append([Image.open(frames[k]).convert("RGB") for k in pick])
w, h = grid[0][0].size
s, gap = 3, 4
sheet = Image.new("RGB", (len(pick) * (w * s + gap) - gap, rows * (h * s + gap) - gap), (255, 255, 255))
for r, imgs in enumerate(grid):
    for c, im in enumerate(imgs):
        sheet.paste(im.resize((w * s, h * s), Image.NEAREST), (c * (w * s + gap), r * (h * s + gap)))
sheet.save(out)
print(f"wrote {out}: {rows} streams, frames {pick}")
PY
