#!/usr/bin/env bash
# Runs every test of the project: the README's test command, and what CI runs.
#
#   0. libibverbs-dev (the verbs.h our ABI declarations are checked against; installed
#      with apt-get when missing), then scripts/build-fakes.sh --check: the fake CUDA
#      driver and the fake verbs library the GPU and RDMA tests run on
#   1. cargo test         unit tests, the mooncake_backend_test port (C++ through
#                         the exported entry point) and the manifest check
#   2. cargo build --release, then the end-to-end suite through the real NIXL 1.5.1
#      (PyPI wheel nixl-cu12, in a venv made by scripts/setup-venv.sh), including
#      the wheel's own nixl_example C++ program against backend "Mooncake", the
#      bad-input, fault-proxy and 30-second soak runs
#   3. scripts/sanitizers.sh asan-unit asan-cxx (AddressSanitizer, leaks included)
#   4. scripts/fuzz.sh: every fuzz target for a minute (cargo-fuzz is installed
#      if missing)
#
# Needs: Rust, gcc/g++, Python 3 with venv. Everything else is installed here.
set -euo pipefail
# The plugin's TCP listener: loopback only, in every test (cargo test and e2e).
export NIXL_MOONCAKE_IP_ADDR=127.0.0.1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Wherever NIXL runs: keep UCX away from a system EFA provider (it crashes the
# wheel's UCX at exit once Debian's ibverbs providers are installed) and on loopback.
export UCX_MODULES='^efa'
export UCX_NET_DEVICES=lo

echo "== system headers the ABI checks compile against (libibverbs-dev)"
if [ ! -e /usr/include/infiniband/verbs.h ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs-dev >/dev/null ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs-dev >/dev/null; }
    else
        echo "test-all: /usr/include/infiniband/verbs.h is missing: install libibverbs-dev" >&2
        exit 1
    fi
fi
# The verbs ABI check (src/transport/rdma/verbs/tests.rs) must run, not skip.
export NIXL_MOONCAKE_REQUIRE_VERBS_HEADER=1

echo "== test fakes of hardware libraries (built, and their own self-tests)"
scripts/build-fakes.sh --check >/dev/null

echo "== cargo test"
cargo test --all-targets

echo "== cargo build --release"
cargo build --release

echo "== Python venv with nixl-cu12==1.5.1"
venv=$(scripts/setup-venv.sh)

echo "== end-to-end tests through the real NIXL"
MOONCAKE_PLUGIN="$PWD/target/release/libplugin_Mooncake.so" \
    "$venv/bin/python" -m pytest tests/e2e -v "$@"

echo "== sanitizers: AddressSanitizer on the unit tests and the C++ backend test"
scripts/sanitizers.sh asan-unit asan-cxx

echo "== fuzzing: every target of fuzz/ for FUZZ_SECONDS (default 60) seconds"
scripts/fuzz.sh
