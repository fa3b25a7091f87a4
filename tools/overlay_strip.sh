#!/usr/bin/env bash
# The README's overlay strip: the element's output for one prompt without and with
# `overlay=recompute` (tokens tinted by how often MotionCache recomputed them in their block),
# frames 3, 6, ... side by side, scaled 3x. Needs a release build of the plugin
# (`cargo build --release -p gst-plugin-motioncache`) and Python with Pillow.
#
#     tools/overlay_strip.sh [OUT.png] [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/overlay-strip.png}
prompt=${2:-a red circle moving right on a striped blue background}
python=${MOTIONCACHE_PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
for ov in none recompute; do
    mkdir -p "$tmp/$ov"
    gst-launch-1.0 -q motioncachesrc num-buffers=24 overlay=$ov prompt="$prompt" \
        ! videoconvert ! video/x-raw,format=RGB ! pngenc ! multifilesink location="$tmp/$ov/%03d.png"
done
"$python" - "$tmp" "$out" <<'PY'
import sys, pathlib
from PIL import Image
tmp, out = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = []
for ov in ("none", "recompute"):
    frames = sorted((tmp / ov).glob("*.png"))[2::3]
    rows.append([Image.open(f).convert("RGB") for f in frames])
w, h = rows[0][0].size
s, gap = 3, 4
sheet = Image.new("RGB", (len(rows[0]) * (w * s + gap) - gap, 2 * (h * s) + gap), (255, 255, 255))
for r, imgs in enumerate(rows):
    for c, im in enumerate(imgs):
        sheet.paste(im.resize((w * s, h * s), Image.NEAREST), (c * (w * s + gap), r * (h * s + gap)))
sheet.save(out)
print(f"wrote {out}: {len(rows[0])} frames per row")
PY
