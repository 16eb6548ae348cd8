#!/usr/bin/env bash
# Builds the test fakes of hardware libraries into target/fakes/, for tests
# on machines without the hardware:
#
#   libfakecuda.so      fake CUDA driver (libcuda.so.1), tests/fakes/cuda/fake_cuda.c
#   libfakeibverbs.so   fake RDMA verbs (libibverbs.so.1), tests/fakes/ibverbs/fake_ibverbs.c
#
#   scripts/build-fakes.sh           build (only what is out of date)
#   scripts/build-fakes.sh --check   build, then build and run each fake's own
#                                    self-test (e.g. check_fake_cuda); fails if
#                                    one fails
#
# Stdout is exactly one line per fake, an environment assignment that points
# the plugin at it, e.g.
#   NIXL_MOONCAKE_CUDA_LIB=/abs/path/target/fakes/libfakecuda.so
# so `export $(scripts/build-fakes.sh)` works; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
out="$root/target/fakes"

check=0
for arg in "$@"; do
    case "$arg" in
        --check) check=1 ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
        *) echo "build-fakes.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

mkdir -p "$out"
CC=${CC:-gcc}
cflags=(-O2 -g -pthread -Wall -Wextra -Werror)

# build_if_stale OUTPUT SOURCE... -- COMMAND...: runs COMMAND when OUTPUT is
# missing or older than one of the sources (or than this script). COMMAND
# writes to the argument {out}, a temporary file renamed to OUTPUT on success,
# so an interrupted build never leaves a fresh-looking broken output.
build_if_stale() {
    local output=$1; shift
    local sources=()
    while [ "$1" != "--" ]; do sources+=("$1"); shift; done
    shift
    local stale=0 s
    [ -e "$output" ] || stale=1
    for s in "${sources[@]}" "${BASH_SOURCE[0]}"; do
        if [ "$s" -nt "$output" ]; then stale=1; fi
    done
    if [ "$stale" = 1 ]; then
        echo "build-fakes: building ${output#"$root"/}" >&2
        local tmp="$output.tmp.$$" cmd=() a
        for a in "$@"; do
            if [ "$a" = "{out}" ]; then cmd+=("$tmp"); else cmd+=("$a"); fi
        done
        if ! "${cmd[@]}" >&2; then
            rm -f "$tmp"
            echo "build-fakes: building ${output#"$root"/} FAILED" >&2
            exit 1
        fi
        mv -f "$tmp" "$output"
    else
        echo "build-fakes: ${output#"$root"/} is up to date" >&2
    fi
}

# run_check NAME BINARY: runs a fake's self-test, output to stderr.
run_check() {
    echo "build-fakes: running $1" >&2
    if ! "$2" >&2; then
        echo "build-fakes: $1 FAILED" >&2
        exit 1
    fi
}

# --- fake CUDA driver -------------------------------------------------------
cuda_src=tests/fakes/cuda/fake_cuda.c
cuda_lib="$out/libfakecuda.so"
build_if_stale "$cuda_lib" "$cuda_src" -- \
    "$CC" "${cflags[@]}" -fPIC -shared -o {out} "$cuda_src" -ldl
if [ "$check" = 1 ]; then
    cuda_check_src=tests/fakes/cuda/check_fake_cuda.c
    cuda_check="$out/check_fake_cuda"
    build_if_stale "$cuda_check" "$cuda_check_src" "$cuda_lib" -- \
        "$CC" "${cflags[@]}" -o {out} "$cuda_check_src" \
        -L"$out" -l:libfakecuda.so -Wl,-rpath,"$out"
    run_check check_fake_cuda "$cuda_check"
fi
echo "NIXL_MOONCAKE_CUDA_LIB=$cuda_lib"

# --- fake RDMA verbs --------------------------------------------------------
ibverbs_src=tests/fakes/ibverbs/fake_ibverbs.c
ibverbs_lib="$out/libfakeibverbs.so"
build_if_stale "$ibverbs_lib" "$ibverbs_src" -- \
    "$CC" "${cflags[@]}" -fPIC -shared -o {out} "$ibverbs_src"
if [ "$check" = 1 ]; then
    ibverbs_check_src=tests/fakes/ibverbs/check_fake_ibverbs.c
    ibverbs_check="$out/check_fake_ibverbs"
    build_if_stale "$ibverbs_check" "$ibverbs_check_src" "$ibverbs_lib" -- \
        "$CC" "${cflags[@]}" -o {out} "$ibverbs_check_src" \
        -L"$out" -l:libfakeibverbs.so -Wl,-rpath,"$out"
    run_check check_fake_ibverbs "$ibverbs_check"
fi
echo "NIXL_MOONCAKE_IBVERBS_LIB=$ibverbs_lib"
