#!/usr/bin/env bash
# Two-process comparison of our "Mooncake" plugin against NIXL's bundled UCX,
# through the real NIXL 1.5.1 Python API (see benches/compare/README.md).
#
#   scripts/bench-compare.sh                          # all configs, 3 interleaved reps
#   scripts/bench-compare.sh --quick                  # CI smoke: 2 sizes, 1 rep (~1 min)
#   scripts/bench-compare.sh --configs ucx,ucx-tcp --json out.json --markdown out.md
#
# Builds the plugin (cargo build --release), creates/updates the venv
# (scripts/setup-venv.sh), then runs benches/compare/harness.py with the
# arguments given. BENCH_NO_BUILD=1 skips the build (uses whatever
# target/release/libplugin_Mooncake.so is there).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    cargo build --release --quiet
fi
venv="$(scripts/setup-venv.sh)"

# The harness sets these for every NIXL process it starts; set here too for
# anything NIXL does in the harness process itself.
export UCX_MODULES='^efa' UCX_NET_DEVICES=lo
unset NIXL_PLUGIN_DIR

exec "$venv/bin/python" benches/compare/harness.py "$@"
