#!/usr/bin/env bash
# Compile-checks the `cuda` feature of the whole workspace on a machine without a GPU.
#
# The CUDA compiler, runtime headers and CCCL headers come from PyPI (nvidia-cuda-nvcc,
# nvidia-cuda-runtime, nvidia-cuda-cccl, pinned to CUDA 13.0) into a virtualenv outside the
# repository (CUDA_VENV, default ~/.cache/motioncache/cuda13.0-venv). 13.0 because
# candle-kernels ships PTX only and a CUDA 13.0 driver (the validation H200's, driver 580)
# cannot load PTX from a newer nvcc. There is no GPU or driver to
# ask, so the CUDA version and compute capability are given: CUDARC_CUDA_VERSION=13000,
# CUDA_COMPUTE_CAP=90 (H100/H200). candle-kernels' build script really compiles its kernels
# with nvcc; nothing is linked or run.
#
# Usage: tools/check-cuda.sh [extra cargo args]
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CUDA_VENV:-$HOME/.cache/motioncache/cuda13.0-venv}"
python="${PYTHON:-python3}"

# Every CUDA component at 13.0: nvcc's front end (nvidia-nvvm) and headers (nvidia-cuda-crt)
# are separate packages, and left unpinned they come at the newest 13.x, whose PTX the 13.0
# ptxas (and driver) reject ("Unsupported .version 9.5").
pin_list=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*")
pins="${pin_list[*]}"
if [ "$(cat "$venv/.motioncache-pins" 2>/dev/null)" != "$pins" ] \
    || ! "$venv/bin/python" -c "import nvidia" 2>/dev/null \
    || [ ! -x "$("$venv/bin/python" -c 'import os,nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvcc"))')" ]; then
    if ! "$python" -c "import venv, ensurepip" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get install -y -q python3-venv >/dev/null
        else
            echo "check-cuda: $python has no venv module (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pin_list[@]}"
    echo "$pins" >"$venv/.motioncache-pins"
fi

cuda_root="$("$venv/bin/python" -c 'import os,nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
if [ ! -x "$cuda_root/bin/nvcc" ]; then
    echo "check-cuda: no nvcc at $cuda_root/bin/nvcc (unexpected layout of the PyPI packages)" >&2
    exit 1
fi

export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
# The CCCL package puts cub/, thrust/, cuda/ and nv/ under include/cccl.
export NVCC_PREPEND_FLAGS="-I$cuda_root/include -I$cuda_root/include/cccl ${NVCC_PREPEND_FLAGS:-}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

echo "check-cuda: $("$cuda_root/bin/nvcc" --version | tail -n 1), CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
# A separate target directory: the feature changes candle's build, and the CPU build in
# target/ should not be invalidated by it.
cargo clippy --workspace --all-targets --features cuda \
    --target-dir "${CUDA_TARGET_DIR:-target/cuda13.0-check}" "$@" -- -D warnings
echo "check-cuda: the cuda feature compiles (workspace, all targets, clippy clean)"
