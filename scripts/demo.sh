#!/usr/bin/env bash
# Builds the plugin, prepares the venv with the real NIXL 1.5.1, and runs the
# two-process demo (scripts/demo.py): Mooncake on its default path and over
# TCP beside NIXL's UCX, bytes verified, GB/s printed.
#   scripts/demo.sh [--only mooncake|mooncake-tcp|ucx|ucx-tcp] [--iters N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
venv=$(scripts/setup-venv.sh)
exec "$venv/bin/python" scripts/demo.py --plugin target/release/libplugin_Mooncake.so "$@"
