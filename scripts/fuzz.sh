#!/usr/bin/env bash
# Fuzzes every decoder of peer-supplied bytes (fuzz/fuzz_targets/): the
# metadata blobs of src/wire/ and the TCP server's frame handling, with
# cargo-fuzz (libFuzzer, AddressSanitizer) on the stable toolchain.
#
#   scripts/fuzz.sh                      every target for FUZZ_SECONDS (60) each
#   FUZZ_RUNS=10000000 scripts/fuzz.sh   every target for that many inputs
#   scripts/fuzz.sh tcp_server           one target
#
# New inputs that reach new code are added to fuzz/corpus/<target>/ (kept in
# the repository; shrink it with `cargo fuzz cmin <target>`). A crash, a
# failed check, a leak or an input running over 10 s stops the run, leaves
# the input under fuzz/artifacts/<target>/ and fails the script. Each
# target's line "TARGET: N executions in S s, corpus C" is the record.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags (-Zsanitizer): allow them on stable.
export RUSTC_BOOTSTRAP=1

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
limit=(-max_total_time="${FUZZ_SECONDS:-60}")
[ -z "${FUZZ_RUNS:-}" ] || limit=(-runs="$FUZZ_RUNS")

cargo fuzz build -O
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    start=$(date +%s)
    if ! cargo fuzz run -O "$t" "fuzz/corpus/$t" -- "${limit[@]}" -timeout=10 \
        -max_len=16384 -print_final_stats=1 >"$log" 2>&1; then
        tail -60 "$log"
        echo "FUZZ FAILED: $t (input under fuzz/artifacts/$t/)"
        rm -f "$log"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "$t: ${runs:-?} executions in $(( $(date +%s) - start )) s, corpus $(ls "fuzz/corpus/$t" | wc -l)"
    rm -f "$log"
done
