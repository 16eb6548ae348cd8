#!/usr/bin/env bash
# Create (or update) the Python virtual environment used by the end-to-end tests
# (tests/e2e) and scripts/demo.py.
#
#   scripts/setup-venv.sh            # -> <repo>/.venv
#   VENV=/some/where scripts/setup-venv.sh
#   PYTHON=python3.11 scripts/setup-venv.sh
#
# Idempotent: re-running it on an existing venv only installs what is missing.
# It prints the venv's path on stdout (and nothing else), so callers can do
#   VENV=$(scripts/setup-venv.sh) && "$VENV/bin/python" -m pytest tests/e2e
#
# nixl-cu12 is installed with --no-deps on purpose: its declared dependency on
# torch would pull CUDA and gigabytes of wheels, and nothing we run needs it
# (the wheel's own UCX backend works on a CPU-only host).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo_root/.venv}"
python="${PYTHON:-python3}"

# Versions: NIXL is pinned exactly (the plugin ABI is checked against 1.5.1);
# numpy and pytest are bounded to the majors the suite was validated with
# (numpy 2.4, pytest 9) while staying installable on every Python the wheel
# supports; meson and ninja build the plugin through meson-shim/ in
# tests/e2e/test_meson_shim.py.
nixl_req="nixl-cu12==1.5.1"
other_reqs=("numpy>=1.26,<3" "pytest>=8,<10" "meson>=1.3,<2" "ninja>=1.11,<2")

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
# numpy/pytest first: installing them after nixl-cu12 makes pip's resolver
# complain (on stderr) about nixl-cu12's unmet torch requirement.
"${pip[@]}" install "${other_reqs[@]}"
"${pip[@]}" install --no-deps "$nixl_req"

# Fail loudly here rather than in the first test if the wheel is unusable
# (e.g. no wheel for this Python version was found above).
"$venv/bin/python" -c 'import nixl_cu12._api, numpy, pytest, mesonbuild' >/dev/null

echo "$venv"
