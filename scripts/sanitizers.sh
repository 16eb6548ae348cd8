#!/usr/bin/env bash
# Runs the project's tests under sanitizers; any report fails the script.
#
#   scripts/sanitizers.sh            all of the below
#   scripts/sanitizers.sh asan-unit asan-cxx asan-e2e tsan-engine   a selection
#
#   asan-unit    the library's unit tests (engine, transports, wire) under
#                AddressSanitizer, leaks included (LeakSanitizer)
#   asan-cxx     the plugin built with ASan (Rust and its C++ shim), loaded by
#                the C++ mooncake_backend_test built with ASan, leaks included
#   asan-e2e     the e2e suite through the real NIXL with the ASan plugin
#                (libasan preloaded into Python; leak checking off, because
#                CPython and the wheel's libraries are not leak-clean)
#   tsan-engine  the engine's and transports' unit tests under ThreadSanitizer,
#                with the standard library rebuilt instrumented (-Zbuild-std,
#                needs the rust-src component)
#
# Stable Rust with RUSTC_BOOTSTRAP=1 (the sanitizers are -Z flags). Builds go
# to target/san-*, apart from the normal build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export RUSTC_BOOTSTRAP=1 NIXL_MOONCAKE_IP_ADDR=127.0.0.1 UCX_MODULES='^efa' UCX_NET_DEVICES=lo
host=$(rustc -vV | sed -n 's/^host: //p')
libasan=$(g++ -print-file-name=libasan.so)
# Preloaded with the ASan runtime: its C++ exception interceptors must find
# libstdc++ at start-up (Python itself does not link it).
libstdcxx=$(g++ -print-file-name=libstdc++.so)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(asan-unit asan-cxx asan-e2e tsan-engine)
# A wrapper so that the tests' C++ programs are built with ASan too.
wrap=$(mktemp -d)
trap 'rm -rf "$wrap"' EXIT
printf '#!/bin/sh\nexec g++ -fsanitize=address -fno-omit-frame-pointer "$@"\n' >"$wrap/asan-g++"
chmod +x "$wrap/asan-g++"

asan_env() {
    # --target keeps build scripts and proc macros uninstrumented; the C++
    # shim (cc crate) gets ASan through CXXFLAGS.
    export RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes"
    export CXXFLAGS="-fsanitize=address -fno-omit-frame-pointer"
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1"
}

for step in "${steps[@]}"; do
    echo "== $step"
    case $step in
    asan-unit)
        (asan_env; cargo test --target "$host" --target-dir target/san-asan --lib)
        ;;
    asan-cxx)
        (asan_env
         cargo build --target "$host" --target-dir target/san-asan --lib
         MOONCAKE_TEST_CXX="$wrap/asan-g++" \
         MOONCAKE_PLUGIN_PATH="$PWD/target/san-asan/$host/debug/libplugin_Mooncake.so" \
             cargo test --target "$host" --target-dir target/san-asan --test mooncake_backend_test)
        ;;
    asan-e2e)
        (asan_env
         cargo build --target "$host" --target-dir target/san-asan --lib
         venv=$(scripts/setup-venv.sh)
         MOONCAKE_PLUGIN="$PWD/target/san-asan/$host/debug/libplugin_Mooncake.so" \
         E2E_PRELOAD="$libasan $libstdcxx" E2E_TIMEOUT=600 \
         ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1" \
             "$venv/bin/python" -m pytest tests/e2e -q -x -k "${E2E_FILTER:-not meson}")
        ;;
    tsan-engine)
        (export RUSTFLAGS="-Zsanitizer=thread -Cforce-frame-pointers=yes"
         export CXXFLAGS="-fsanitize=thread"
         export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/tests/tsan.supp"
         cargo test -Zbuild-std --target "$host" --target-dir target/san-tsan --lib -- \
             backend:: transport:: common::)
        ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
echo "SANITIZERS OK: ${steps[*]}"
