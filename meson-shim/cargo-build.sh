#!/bin/sh
# Called by meson-shim/meson.build: cargo build, then copy the plugin to meson's output.
#   cargo-build.sh <cargo> <Cargo.toml> <target dir> <debug|release> <output>
set -eu
cargo=$1 manifest=$2 target_dir=$3 profile=$4 output=$5
if [ "$profile" = release ]; then
    CARGO_TARGET_DIR=$target_dir "$cargo" build --lib --release --manifest-path "$manifest"
else
    CARGO_TARGET_DIR=$target_dir "$cargo" build --lib --manifest-path "$manifest"
fi
cp "$target_dir/$profile/libplugin_Mooncake.so" "$output"
