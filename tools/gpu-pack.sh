#!/usr/bin/env bash
# Packs what tools/gpu-validate.sh needs on a GPU machine that has no network, no Rust
# toolchain and no GStreamer (see ../shared/docs/GPU.md): run here, carry the result.
#
#   tools/gpu-pack.sh [OUT]        (default OUT: target/gpu-pack.tar.xz)
#
# Contents (under gpu-pack/ in the archive):
#   bin/   the parity test binary and motioncache-bench, built with `cuda` (stripped);
#          test binaries from tools/check-cuda.sh's build, the benchmark in release mode
#   lib/   libgstmotioncache.so built with `cuda`, release mode (stripped)
#   gst/   the Debian GStreamer runtime (core, tools, plugins-base, their libraries),
#          unpacked with `dpkg -x`
#   wheels/ the diffusers wheel (pure Python) for the PyTorch side of the forward timing
# The tracked tree (fixtures, tools/) travels with it; together they must stay within the
# device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-pack.tar.xz}"
target="${CUDA_TARGET_DIR:-target/cuda13.0-check}"
work="$(mktemp -d)"
pack="$work/gpu-pack"
mkdir -p "$pack/bin" "$pack/lib" "$pack/gst" "$pack/wheels" "$work/debs"

# The cuda builds: test binaries (check-cuda.sh links them against stubs), then the
# benchmark and the plugin in release mode with the same environment.
./tools/check-cuda.sh
./tools/check-cuda.sh exec cargo build --release -p gst-plugin-motioncache --features cuda \
    --target-dir "$target"
./tools/check-cuda.sh exec cargo build --release --bin motioncache-bench --features bench,cuda \
    --target-dir "$target"

for t in parity; do
    bin="$(./tools/check-cuda.sh exec cargo test --workspace --features cuda --test "$t" --no-run --message-format=json \
        --target-dir "$target" 2>/dev/null \
        | sed -n "s/.*\"name\":\"$t\".*\"executable\":\"\([^\"]*\)\".*/\1/p" | tail -n 1)"
    strip -o "$pack/bin/$t" "$bin"
done
strip -o "$pack/bin/motioncache-bench" "$target/release/motioncache-bench"
strip -o "$pack/lib/libgstmotioncache.so" "$target/release/libgstmotioncache.so"

# GStreamer's runtime, as files (the GPU machine has no package manager access).
debs="libgstreamer1.0-0 gstreamer1.0-tools gstreamer1.0-plugins-base
libgstreamer-plugins-base1.0-0 liborc-0.4-0 libdw1 libelf1 libunwind8"
(cd "$work/debs" && apt-get download $debs >/dev/null)
for d in "$work"/debs/*.deb; do
    dpkg -x "$d" "$pack/gst"
done
rm -rf "$pack/gst/usr/share/doc" "$pack/gst/usr/share/man" "$pack/gst/usr/share/locale"

python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$pack/wheels" \
    "diffusers==0.42.*" || echo "gpu-pack: no diffusers wheel (the PyTorch side will be skipped)"

mkdir -p "$(dirname "$out")"
# One xz stream with a 256 MiB dictionary, single-threaded: the three binaries share
# candle's kernels (PTX and the MoE fatbin, about 50 MB each), so the second and third
# compress against the first (53 MiB with tar's default -J, 26 MiB this way).
tar -C "$work" -cf - gpu-pack/bin gpu-pack/lib gpu-pack/gst gpu-pack/wheels \
    | xz -T1 --lzma2=preset=6,dict=256MiB >"$out"
rm -rf "$work"
tree_bytes="$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)"
pack_bytes="$(stat -c %s "$out")"
echo "gpu-pack: $out $((pack_bytes >> 20)) MiB, tracked tree $((tree_bytes >> 20)) MiB," \
    "together $(((pack_bytes + tree_bytes) >> 20)) MiB (the device tool carries 64)"
