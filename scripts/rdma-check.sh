#!/usr/bin/env bash
# RDMA on a real NIC: the cases the fake NIC proves in the test suite, run on
# the host's libibverbs, two processes on this host (RoCE or InfiniBand
# loopback through one NIC; set NIXL_MOONCAKE_DEVICE_NAME to pick it), every
# transfer verified, with GB/s beside NIXL's UCX where it runs.
#
#   scripts/rdma-check.sh                 # build the plugin (release), run, print the table
#   PLUGIN=/path/libplugin_Mooncake.so scripts/rdma-check.sh   # use a built plugin
#   scripts/rdma-check.sh --fake          # on the fake NIC of the tests: checks
#                                         # this script only, its figures mean nothing
#
# Across two hosts, run the target side of any case by hand the same way:
# the cases only need the two processes' NIXL metadata to meet.
#
# Needs: an RDMA device with an active port (ibv_devices lists it), rdma-core
# (libibverbs.so.1 and the device's provider), Python 3 with venv (the venv
# with nixl-cu12 1.5.1 is made by scripts/setup-venv.sh), Rust unless PLUGIN
# is given; a locked-memory limit large enough for the buffers (ulimit -l
# unlimited). Runs in a few minutes.
#
# What it runs (protocol=rdma; tests/e2e/scenarios.py and tests/e2e/rdma.py):
#   xp_bulk         384 MiB in 4 KiB to 64 MiB blocks, WRITE then one READ
#   xp_prepped      a prepped 20,000-block READ with a notification (vLLM's shape)
#   xp_threads      four threads, WRITE + READ back
#   xp_notif_bytes  empty and binary notifications
#   xp_revoke       a region the target deregistered is refused by its NIC
#   xp_kill_target  SIGKILL of the target mid-transfer, then a new target
#   threads         four threads with their own handles
#   release, kill   release in flight; SIGKILL during a 2 GiB READ
#   gpu.py xp       with a GPU (libcuda.so.1 loads; --fake: the fake CUDA
#                   driver): GPUDirect RDMA, VRAM registered on the NIC as a
#                   dmabuf, WRITE/READ VRAM<->VRAM and VRAM<->DRAM between
#                   the two processes, checksummed (needs a kernel, NIC and
#                   driver with dmabuf support, or nvidia-peermem)
# and xp_bulk/xp_prepped (and the GPU case) once more with backend UCX
# (NIXL's). Prints a table
# with the date; exit status non-zero when one of our cases failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

fake=0
[ "${1:-}" = --fake ] && fake=1
gpu=0
if [ $fake = 1 ]; then
    export "$(scripts/build-fakes.sh | grep NIXL_MOONCAKE_IBVERBS_LIB)"
    export "$(scripts/build-fakes.sh | grep NIXL_MOONCAKE_CUDA_LIB)"
    gpu=1
    size_mib=64
else
    unset NIXL_MOONCAKE_IBVERBS_LIB # the host's libibverbs.so.1
    if ! ls /sys/class/infiniband/ >/dev/null 2>&1 || [ -z "$(ls /sys/class/infiniband/ 2>/dev/null)" ]; then
        echo "rdma-check: no RDMA device here (/sys/class/infiniband is empty)" >&2
        exit 2
    fi
    command -v ibv_devinfo >/dev/null && ibv_devinfo -l 2>/dev/null | sed 's/^/rdma-check: /' >&2
    size_mib=2048
    python3 -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null && gpu=1
fi

plugin=${PLUGIN:-}
if [ -z "$plugin" ]; then
    cargo build --release >&2 || exit 1
    plugin="$root/target/release/libplugin_Mooncake.so"
fi
venv=$(scripts/setup-venv.sh) || exit 1
pdir=$(mktemp -d)
trap 'rm -rf "$pdir"' EXIT
cp "$plugin" "$pdir/libplugin_Mooncake.so"
export NIXL_MOONCAKE_IP_ADDR=${NIXL_MOONCAKE_IP_ADDR:-127.0.0.1} UCX_MODULES='^efa' PYTHONUNBUFFERED=1
export NIXL_LOG_LEVEL=${NIXL_LOG_LEVEL:-INFO}

rows=()
failed=0
# run BACKEND LABEL SCRIPT CASE ARGS...: runs one case, keeps its figures.
run() {
    local backend=$1 label=$2 script=$3
    shift 3
    local out rc
    if [ "$backend" = Mooncake ]; then
        out=$(E2E_BACKEND=Mooncake NIXL_PLUGIN_DIR="$pdir" timeout 600 \
            "$venv/bin/python" "tests/e2e/$script" "$@" 2>&1)
    else
        out=$(E2E_BACKEND="$backend" timeout 600 "$venv/bin/python" "tests/e2e/$script" "$@" 2>&1)
    fi
    rc=$?
    if [ $rc -ne 0 ] || ! grep -q "SCENARIO $1 OK" <<<"$out"; then
        rows+=("$(printf '%-8s | %-30s | FAILED (rc %s): %s' "$backend" "$label" "$rc" \
            "$(grep -E 'Error|assert|failed' <<<"$out" | tail -1 | cut -c1-100)")")
        [ "$backend" = Mooncake ] && failed=1
        return
    fi
    while IFS= read -r line; do
        rows+=("$(printf '%-8s | %-30s | %s' "$backend" "$label" "$line")")
    done < <(grep -E 'GB/s|KILL-TO-FAILURE|RELEASE-BOUND' <<<"$out" | sed -E 's/^\[[^]]*\] *//')
    grep -qE 'GB/s|KILL-TO-FAILURE|RELEASE-BOUND' <<<"$out" ||
        rows+=("$(printf '%-8s | %-30s | ok' "$backend" "$label")")
}

run Mooncake "384 MiB, 4 KiB..64 MiB blocks" scenarios.py xp_bulk --protocol rdma
run UCX "384 MiB, 4 KiB..64 MiB blocks" scenarios.py xp_bulk --protocol tcp
run Mooncake "prepped 20000-block READ" scenarios.py xp_prepped --protocol rdma --blocks 20000
run UCX "prepped 20000-block READ" scenarios.py xp_prepped --protocol tcp --blocks 20000
run Mooncake "four threads, one target" scenarios.py xp_threads --protocol rdma
run Mooncake "binary notifications" scenarios.py xp_notif_bytes --protocol rdma
run Mooncake "deregistered region refused" scenarios.py xp_revoke --protocol rdma
run Mooncake "SIGKILL of the target" scenarios.py xp_kill_target --protocol rdma --size-mib 128
run Mooncake "four threads, own handles" rdma.py threads
run Mooncake "release in flight" rdma.py release --size-mib "$size_mib"
run Mooncake "SIGKILL during a READ" rdma.py kill --size-mib "$size_mib"
if [ $gpu = 1 ]; then
    run Mooncake "GPUDirect RDMA, VRAM" gpu.py xp --protocol rdma --size-mib 256
    [ $fake = 0 ] && run UCX "GPU memory, VRAM" gpu.py xp --protocol tcp --size-mib 256
fi

echo
nic=$(ls /sys/class/infiniband/ 2>/dev/null | tr '\n' ' ')
[ $fake = 1 ] && nic="FAKE NIC (figures mean nothing)"
echo "RDMA check, $(date -u '+%Y-%m-%d %H:%M UTC'), ${nic:-unknown NIC}"
printf '%-8s | %-30s | %s\n' backend case result
printf -- '---------+--------------------------------+------------------------------\n'
printf '%s\n' "${rows[@]}"
exit $failed
