#!/usr/bin/env bash
# Builds the plugin, prepares the venv with the real NIXL 1.5.1, and runs one
# demo transfer through it (scripts/demo.py), printing what happened.
#   scripts/demo.sh [--size-mib N] [--backend UCX] ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
venv=$(scripts/setup-venv.sh)
exec "$venv/bin/python" scripts/demo.py --plugin target/release/libplugin_Mooncake.so "$@"
