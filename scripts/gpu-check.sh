#!/usr/bin/env bash
# GPU memory on a real NVIDIA GPU: the paths the fake CUDA driver proves in
# the test suite, run on the real driver (libcuda.so.1), every transfer
# verified, with GB/s beside NIXL's UCX where UCX runs there.
#
#   scripts/gpu-check.sh                 # build the plugin (release), run, print the table
#   PLUGIN=/path/libplugin_Mooncake.so scripts/gpu-check.sh   # use a built plugin
#   scripts/gpu-check.sh --fake          # on the fake driver of the tests: checks
#                                        # this script only, its figures mean nothing
#
# Needs: an NVIDIA GPU with its driver, Python 3 with venv (the venv with
# nixl-cu12 1.5.1 is made by scripts/setup-venv.sh), Rust unless PLUGIN is
# given. Builds nothing heavy; runs in about a minute (5 at most).
#
# What it runs (tests/e2e/gpu.py, each case in its own process):
#   inproc     VRAM->VRAM, VRAM<->DRAM in one process (device copies)
#   xp tcp     two processes, VRAM over TCP loopback (pinned staging)
#   xp auto    the same with protocol=auto (same host: CUDA IPC for VRAM, CMA for DRAM)
#   xp vmm     the same with the target's memory in 2 MiB VMM chunks shared by file descriptor
#   prepped    a prepped 20,000-block VRAM READ with a notification (vLLM's shape)
#   release    release and deregistration while device copies run
#   bad        registration mismatches refused
# and inproc/xp once more with backend UCX (NIXL's, cuda_copy/cuda_ipc) for the
# same sizes. Prints a table with the date; exit status non-zero when one of
# our cases failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

fake=0
[ "${1:-}" = --fake ] && fake=1
if [ $fake = 1 ]; then
    export "$(scripts/build-fakes.sh | grep NIXL_MOONCAKE_CUDA_LIB)"
elif ! command -v nvidia-smi >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libcuda.so.1; then
    echo "gpu-check: no NVIDIA driver here (no nvidia-smi, no libcuda.so.1)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    sed 's/^/gpu-check: GPU: /' >&2

plugin=${PLUGIN:-}
if [ -z "$plugin" ]; then
    cargo build --release >&2 || exit 1
    plugin="$root/target/release/libplugin_Mooncake.so"
fi
venv=$(scripts/setup-venv.sh) || exit 1
pdir=$(mktemp -d)
trap 'rm -rf "$pdir"' EXIT
cp "$plugin" "$pdir/libplugin_Mooncake.so"
[ $fake = 1 ] || unset NIXL_MOONCAKE_CUDA_LIB # the real driver
export NIXL_MOONCAKE_IP_ADDR=127.0.0.1 UCX_MODULES='^efa' UCX_NET_DEVICES=lo PYTHONUNBUFFERED=1

rows=()
failed=0
# run BACKEND LABEL CASE ARGS...: runs one case, keeps its rate lines.
run() {
    local backend=$1 label=$2
    shift 2
    local out rc
    if [ "$backend" = Mooncake ]; then
        out=$(E2E_BACKEND=Mooncake NIXL_PLUGIN_DIR="$pdir" timeout 120 \
            "$venv/bin/python" tests/e2e/gpu.py "$@" 2>&1)
    else
        out=$(E2E_BACKEND="$backend" timeout 120 "$venv/bin/python" tests/e2e/gpu.py "$@" 2>&1)
    fi
    rc=$?
    if [ $rc -ne 0 ] || ! grep -q "SCENARIO $1 OK" <<<"$out"; then
        rows+=("$(printf '%-8s | %-34s | FAILED (rc %s): %s' "$backend" "$label" "$rc" \
            "$(grep -E 'Error|assert|failed' <<<"$out" | tail -1 | cut -c1-100)")")
        [ "$backend" = Mooncake ] && failed=1
        return
    fi
    while IFS= read -r line; do
        rows+=("$(printf '%-8s | %-34s | %s' "$backend" "$label" "$line")")
    done < <(grep -E 'GB/s' <<<"$out" | sed -E 's/^\[[^]]*\] *//')
    grep -q 'GB/s' <<<"$out" || rows+=("$(printf '%-8s | %-34s | ok' "$backend" "$label")")
}

for mib in 1 8 64; do
    run Mooncake "one process, ${mib} MiB" inproc --size-mib "$mib"
    run UCX "one process, ${mib} MiB" inproc --size-mib "$mib"
    run Mooncake "two processes tcp, ${mib} MiB" xp --protocol tcp --size-mib "$mib" --blocks 256
    run Mooncake "two processes CUDA IPC, ${mib} MiB" xp --protocol auto --size-mib "$mib" --blocks 256
    run Mooncake "two processes VMM by fd, ${mib} MiB" xp --protocol auto --vmm shared \
        --size-mib "$mib" --blocks 256
    run UCX "two processes, ${mib} MiB" xp --size-mib "$mib" --blocks 256
done
run Mooncake "prepped 20000-block READ" prepped
run UCX "prepped 20000-block READ" prepped
run Mooncake "release/deregister in flight" release
run Mooncake "registration mismatches" bad

echo
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
[ $fake = 1 ] && gpu="FAKE driver (figures mean nothing)"
echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), ${gpu:-unknown GPU}"
printf '%-8s | %-34s | %s\n' backend case result
printf -- '---------+------------------------------------+------------------------------\n'
printf '%s\n' "${rows[@]}"
exit $failed
