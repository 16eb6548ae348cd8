"""Soak: scripts/soak.py --seconds 30 through the real NIXL 1.5.1 (see that script's
docstring for what it runs and checks).  It runs in its own process (with its own
target processes) through conftest's runner, with the suite's environment
(NIXL_PLUGIN_DIR with a copy of the plugin, UCX_MODULES=^efa, UCX_NET_DEVICES=lo,
NIXL_MOONCAKE_IP_ADDR=127.0.0.1).

The full-length run is by hand:  .venv/bin/python scripts/soak.py --transfers 1000000
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOAK = REPO / "scripts" / "soak.py"
SECONDS = 30


def test_soak_30s(runner):
    if os.environ.get("E2E_BACKEND", "Mooncake") != "Mooncake":
        pytest.skip("the soak drives the Mooncake backend's protocol options")
    # 30 s of transfers, plus warm-up, restarts and start-up of the target processes;
    # the bound is for a loaded 2-core machine.
    text = runner.command([sys.executable, str(SOAK), "--seconds", str(SECONDS)],
                          f"soak.py --seconds {SECONDS}", runner.env(), timeout=360)
    assert "SOAK OK" in text, f"no success line\n{text}"
    summary = re.search(r"^SOAK SUMMARY .*$", text, re.M)
    assert summary, f"no summary line\n{text}"
    m = re.search(r"restarts=(\d+) \(kills=(\d+)\)", summary.group(0))
    assert m and int(m.group(1)) >= 2 and int(m.group(2)) >= 1, (
        f"expected at least two restarts of the target, one of them a SIGKILL: {summary.group(0)}")
