#!/usr/bin/env bash
# Installs everything needed on a fresh Debian machine, builds the GStreamer plugin in
# release mode and installs it into the user's GStreamer plugin folder, where
# gst-launch-1.0 and gst-inspect-1.0 find it without any environment variable.
# The default model is compiled into the plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
if ! command -v cargo >/dev/null 2>&1; then
    echo "install.sh: cargo not found; install a Rust toolchain >= 1.92 (https://rustup.rs)" >&2
    exit 1
fi
cargo build --release -p gst-plugin-motioncache
dest="${XDG_DATA_HOME:-$HOME/.local/share}/gstreamer-1.0/plugins"
mkdir -p "$dest"
install -m 0644 target/release/libgstmotioncache.so "$dest/"
# Drop GStreamer's registry cache so the new plugin is picked up at once.
rm -f "${XDG_CACHE_HOME:-$HOME/.cache}"/gstreamer-1.0/registry.*.bin
echo "installed $dest/libgstmotioncache.so"
