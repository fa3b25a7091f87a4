#!/usr/bin/env bash
# The README's frame strip: 96-frame (12 s) streams of the element at its default settings,
# one row per prompt, frames from the first, middle and last second side by side (3x). Needs
# a release build of the plugin (`cargo build --release -p gst-plugin-motioncache`) and
# Python with Pillow (MOTIONCACHE_PYTHON).
#
#     tools/stream_strip.sh [OUT.png] [PROMPT ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/stream-strip.png}
shift || true
if [ $# -eq 0 ]; then
    set -- "a red circle moving right on a striped blue background" \
        "a yellow square moving left on a checkered green background" \
        "a white triangle moving up on a plain black background" \
        "a static green circle on a striped red background"
fi
python=${MOTIONCACHE_PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
i=0
for prompt in "$@"; do
    mkdir -p "$tmp/$i"
    gst-launch-1.0 -q motioncachesrc num-buffers=96 prompt="$prompt" \
        ! videoconvert ! video/x-raw,format=RGB ! pngenc ! multifilesink location="$tmp/$i/%03d.png"
    i=$((i + 1))
done
"$python" - "$tmp" "$out" "$i" <<'PY'
import sys, pathlib
from PIL import Image
tmp, out, rows = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pick = [0, 4, 44, 48, 52, 88, 92, 95]  # seconds 1, 6-7 and 12 at 8 fps
w, h, s, gap = 64, 64, 3, 4
sheet = Image.new("RGB", (len(pick) * (w * s + gap) - gap, rows * (h * s + gap) - gap), (255, 255, 255))
for r in range(rows):
    frames = sorted((tmp / str(r)).glob("*.png"))
    if len(frames) < 96:
        sys.exit(f"row {r}: only {len(frames)} frames")
    for c, k in enumerate(pick):
        im = Image.open(frames[k]).convert("RGB").resize((w * s, h * s), Image.NEAREST)
        sheet.paste(im, (c * (w * s + gap), r * (h * s + gap)))
sheet.save(out)
print(f"wrote {out}: {rows} streams, frames {pick}")
PY
