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
#   ops      motioncache-bench ops: a 10,200 x 51,000 attention (bf16 on CUDA: the fused
#            kernel, with TFLOP/s), a four-group block-causal attention compared whole, and
#            one 540P block's VAE decode, on random weights (finite, against the CPU)
#   forward  motioncache-bench forward: a 1.3B-configuration bf16 forward of one 540P block
#            (10,200 tokens against a 40,800-token K/V prefix) in candle and in PyTorch
#            (diffusers' transformer, SDPA, the same prefix) with TFLOP/s
#   element  gst-launch-1.0 motioncachesrc device=... num-buffers=24 ! fakesink on the
#            embedded model
#   model    motioncache-bench make-model: a random-weight SkyReels-V2-DF-1.3B directory
#            (540P settings)
#   stream   that model through the element at 540P with the default cache, 97 frames
#            (five blocks): frames per second from its motioncache-stats messages
# On the CPU (CI) the same steps run at tiny sizes (the tiny configuration, 16 frames).
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
    for t in parity; do
        cp "$(cargo test --workspace --features motioncache/bench --test "$t" --no-run \
            --message-format=json 2>/dev/null \
            | sed -n "s/.*\"name\":\"$t\".*\"executable\":\"\([^\"]*\)\".*/\1/p" | tail -n 1)" \
            "$bins/$t"
    done
    plugin_dir="$repo/target/debug"
fi
export MOTIONCACHE_REPO="$repo" MOTIONCACHE_TEST_DEVICE="$device"

# step NAME COMMAND...: runs it, keeps its output and outcome. Every step ends by the
# deadline (8 minutes from the start, unpacking included, or $GPU_VALIDATE_SECONDS): a step
# cut short fails with rc 124, one with no time left is not started (rc 125, "skipped").
deadline=$((started + ${GPU_VALIDATE_SECONDS:-480} - 15))
step() {
    local name="$1"
    shift
    local t0 left
    t0=$(date +%s%N)
    left=$((deadline - $(date +%s)))
    if [ "$left" -le 0 ]; then
        echo "skipped: no time left before the deadline" >"$results/$name.out"
        echo 125 >"$results/$name.rc"
    else
        timeout "$left" "$@" >"$results/$name.out" 2>&1
        echo $? >"$results/$name.rc"
    fi
    awk "BEGIN { print ($(date +%s%N) - $t0) / 1e9 }" >"$results/$name.secs"
}

for name in transformer::forward_matches_diffusers transformer::df_runs_match_diffusers_exact_and_vanilla \
    vae::decode_matches_diffusers vae::encode_matches_diffusers vae::half_precision_decodes_close_to_f32 \
    t5::encoder_matches_transformers_f32 t5::half_precision_runs_close_to_f32 \
    pipeline::rgb_frames_match_diffusers pipeline::embedded_model_matches_diffusers; do
    step "parity.${name#*::}" "$bins/parity" --exact "$name" --test-threads=1
done

if [ "$device" = cpu ]; then size=tiny; frames=2; height=8; width=12; prefix=4; config=tiny; py=none
    stream_frames=16
else size=540p; frames=5; height=68; width=120; prefix=20; config=1.3b; py=python3
    stream_frames=97; fi
step ops "$bins/motioncache-bench" ops --device "$device" --size "$size"
step forward "$bins/motioncache-bench" forward --device "$device" --config "$config" \
    --frames "$frames" --height "$height" --width "$width" --prefix-frames "$prefix" --dtypes bf16 --reps 3 \
    --python "$py" --out "$results/forward"
step element env GST_PLUGIN_PATH="$plugin_dir" timeout 300 gst-launch-1.0 -q \
    motioncachesrc device="$device" num-buffers=24 ! fakesink
# The whole pipeline at the configuration's real size through the element, default cache:
# 97 frames at 540P are five blocks, the last against a full window of 25 latent frames.
step model "$bins/motioncache-bench" make-model --config "$config" --out "$results/model"
# Interrupted (SIGINT) rather than killed when time runs out, so that gst-launch stops the
# pipeline and the stats of the blocks made so far reach the report.
left=$((deadline - $(date +%s) - 5))
left=$((left < 1 ? 1 : left < 240 ? left : 240))
step stream env GST_PLUGIN_PATH="$plugin_dir" timeout -s INT "$left" gst-launch-1.0 -m \
    motioncachesrc model="$results/model" device="$device" num-buffers="$stream_frames" ! fakesink

RESULTS="$results" DEVICE="$device" STARTED="$started" python3 - <<'EOF'
import glob, json, os, re, subprocess, time
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
    if s == "ops" and "result" in entry:
        # Finite, and within a tolerance of the CPU: f32 at the parity tests' 1e-4, bf16
        # (CUDA) at 5e-2 of the largest reference value.
        res = entry["result"]
        tol = 1e-4 if res.get("dtype") == "f32" else 5e-2
        checks = [(res["attention"], "slice_rel_max_error"), (res["attention_groups"], "rel_max_error"),
                  (res["vae_decode"], "first_frame_rel_max_error")]
        entry["tolerance"] = tol
        entry["ok"] = entry["ok"] and all(c["finite"] and c[k] <= tol for c, k in checks)
    if s == "forward":
        try:
            entry["result"] = json.load(open(f"{r}/forward/forward.json"))
        except (OSError, ValueError):
            pass
    if s == "stream":
        # The element's motioncache-stats messages, one per block (gst-launch -m).
        blocks = [dict(re.findall(r"([a-z-]+)=\([a-z0-9]+\)([-+0-9.e]+)", l))
                  for l in out.splitlines() if "motioncache-stats" in l]
        if blocks:
            frames = sum(int(b.get("frames", 0)) for b in blocks)
            compute = sum(float(b.get("compute-time", 0)) for b in blocks)
            last = blocks[-1]
            entry["result"] = {
                "blocks": len(blocks), "frames": frames, "compute_seconds": compute,
                "fps": frames / compute if compute else None,
                "last_block_fps": int(last.get("frames", 0)) / float(last.get("compute-time", 1)),
                "last_block_flops_ratio": float(last.get("flops-ratio", 0)),
                "last_block_partial_forwards": int(last.get("partial-forwards", 0)),
            }
    if not entry["ok"] or s.startswith("parity"):
        entry["tail"] = out.splitlines()[-6:]
    report["steps"][s] = entry
report["all_ok"] = all(e["ok"] for e in report["steps"].values())
report["seconds"] = time.time() - float(os.environ["STARTED"])
print(json.dumps(report, indent=1))
EOF
echo "gpu-validate: $(($(date +%s) - started)) s" >&2
