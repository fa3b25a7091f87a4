#!/usr/bin/env bash
# Validates the CUDA path in one run and prints one JSON report (issue 14, item 4).
#
#   On the GPU machine, from the repository root, after carrying tools/gpu-pack.sh's archive:
#     tools/gpu-validate.sh --device cuda --pack target/gpu-pack.tar.xz
#   Here (CI), the same steps on the CPU with tiny shapes and the CPU build:
#     tools/gpu-validate.sh --device cpu
#
# Steps, each recorded with its outcome and seconds:
#   parity   the diffusers parity tests (transformer forward, whole DF runs, VAE encode /
#            decode, umT5, prompt -> pixels) on the device (MOTIONCACHE_TEST_DEVICE), f32
#            at the CPU tolerances, bf16 / f16 where the tests check them
#   ops      motioncache-bench ops: a 10,200 x 51,000 attention and one 540P block's VAE
#            decode on random weights (finite, against the CPU on a slice)
#   forward  motioncache-bench forward: a 1.3B-configuration bf16 forward of one 540P block's
#            10,200 tokens in candle and in PyTorch (diffusers, SDPA) with TFLOP/s
#   element  gst-launch-1.0 motioncachesrc device=... num-buffers=24 ! fakesink on the
#            embedded model
# Not yet: the full random-weight 1.3B pipeline at 540P through the element (needs a
# 1.3B-sized model directory made on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
device=cuda
pack=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --pack) pack="$2"; shift 2 ;;
        *) echo "gpu-validate: unknown argument $1" >&2; exit 2 ;;
    esac
done
results="$(mktemp -d)"
started=$(date +%s)

if [ -n "$pack" ]; then
    tar -C "$results" -xJf "$pack"
    bins="$results/gpu-pack/bin"
    plugin_dir="$results/gpu-pack/lib"
    gst="$results/gpu-pack/gst"
    export PATH="$gst/usr/bin:$PATH"
    export LD_LIBRARY_PATH="$gst/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    export GST_PLUGIN_SYSTEM_PATH="$gst/usr/lib/x86_64-linux-gnu/gstreamer-1.0"
    export GST_PLUGIN_SCANNER="$gst/usr/lib/x86_64-linux-gnu/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"
    # CUDA 13 libraries from the PyTorch wheels (cuBLAS, cuRAND, NVRTC, the runtime).
    cuda_libs="$(python3 -c 'import glob,os,nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)})))' 2>/dev/null)"
    export LD_LIBRARY_PATH="$cuda_libs:$LD_LIBRARY_PATH"
    if ls "$results"/gpu-pack/wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install --quiet --no-deps --no-index --target "$results/py" \
            "$results"/gpu-pack/wheels/*.whl && export PYTHONPATH="$results/py:${PYTHONPATH:-}"
    fi
else
    # The CPU build of this checkout, in the test profile (what scripts/test.sh has just
    # built: nothing to compile again).
    bins="$results/bin"
    mkdir -p "$bins"
    cargo build --workspace --features motioncache/bench -q
    cp target/debug/motioncache-bench "$bins/"
    for t in core_parity vae_parity t5_parity pipeline_parity; do
        cp "$(cargo test --workspace --features motioncache/bench --test "$t" --no-run \
            --message-format=json 2>/dev/null \
            | sed -n "s/.*\"name\":\"$t\".*\"executable\":\"\([^\"]*\)\".*/\1/p" | tail -n 1)" \
            "$bins/$t"
    done
    plugin_dir="$repo/target/debug"
fi
export MOTIONCACHE_REPO="$repo" MOTIONCACHE_TEST_DEVICE="$device"

# step NAME COMMAND...: runs it, keeps its output and outcome.
step() {
    local name="$1"
    shift
    local t0
    t0=$(date +%s%N)
    "$@" >"$results/$name.out" 2>&1
    echo $? >"$results/$name.rc"
    awk "BEGIN { print ($(date +%s%N) - $t0) / 1e9 }" >"$results/$name.secs"
}

for t in "core_parity forward_matches_diffusers df_runs_match_diffusers_exact_and_vanilla" \
    "vae_parity decode_matches_diffusers encode_matches_diffusers half_precision_decodes_close_to_f32" \
    "t5_parity encoder_matches_transformers_f32 half_precision_runs_close_to_f32" \
    "pipeline_parity rgb_frames_match_diffusers embedded_model_matches_diffusers"; do
    read -r bin tests <<<"$t"
    for name in $tests; do
        step "parity.$name" "$bins/$bin" --exact "$name" --test-threads=1
    done
done

if [ "$device" = cpu ]; then size=tiny; frames=2; height=8; width=12; config=tiny; py=none
else size=540p; frames=5; height=68; width=120; config=1.3b; py=python3; fi
step ops "$bins/motioncache-bench" ops --device "$device" --size "$size"
step forward "$bins/motioncache-bench" forward --device "$device" --config "$config" \
    --frames "$frames" --height "$height" --width "$width" --dtypes bf16 --reps 3 \
    --python "$py" --out "$results/forward"
step element env GST_PLUGIN_PATH="$plugin_dir" timeout 300 gst-launch-1.0 -q \
    motioncachesrc device="$device" num-buffers=24 ! fakesink

RESULTS="$results" DEVICE="$device" STARTED="$started" python3 - <<'EOF'
import glob, json, os, subprocess
r = os.environ["RESULTS"]
def read(name, ext):
    try:
        return open(f"{r}/{name}.{ext}").read().strip()
    except OSError:
        return None
steps = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{r}/*.rc"))
report = {"device": os.environ["DEVICE"], "steps": {}}
try:
    report["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    report["gpu"] = None
for s in steps:
    out = read(s, "out") or ""
    entry = {"ok": read(s, "rc") == "0", "seconds": float(read(s, "secs") or 0)}
    if s == "ops":
        try:
            entry["result"] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    if s == "forward":
        try:
            entry["result"] = json.load(open(f"{r}/forward/forward.json"))
        except (OSError, ValueError):
            pass
    if not entry["ok"] or s.startswith("parity"):
        entry["tail"] = out.splitlines()[-6:]
    report["steps"][s] = entry
report["all_ok"] = all(e["ok"] for e in report["steps"].values())
print(json.dumps(report, indent=1))
EOF
echo "gpu-validate: $(($(date +%s) - started)) s" >&2
