"""RDMA through the real NIXL 1.5.1, on the fake NIC of tests/fakes/ibverbs.

Each test runs one case in a fresh process with NIXL_MOONCAKE_IBVERBS_LIB
pointing at the fake verbs library that scripts/build-fakes.sh builds: two
RoCE devices per process, the plugin's real verbs calls (dlopen, the ops
table, queue pair state machine, keys), bytes moved between the processes by
the fake's soft-NIC threads.  The cross-process scenarios of scenarios.py
run with protocol=rdma; rdma.py has the RDMA-specific cases.  What passes
here is proven on the fake only; scripts/rdma-check.sh runs the same cases
on a host with a real NIC.

    .venv/bin/python -m pytest tests/e2e/test_rdma.py -v
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND = os.environ.get("E2E_BACKEND", "Mooncake")  # as conftest.py reads it
SCRIPT = Path(__file__).with_name("rdma.py")
REPO = Path(__file__).resolve().parents[2]
DEBUG_LOG = {"NIXL_LOG_LEVEL": "DEBUG"}

pytestmark = pytest.mark.skipif(BACKEND != "Mooncake",
                                reason="RDMA cases drive the Mooncake plugin on the fake NIC")


@pytest.fixture(scope="session")
def fake_nic() -> dict:
    """NIXL_MOONCAKE_IBVERBS_LIB=<fake>, built (if stale) by scripts/build-fakes.sh."""
    out = subprocess.run([str(REPO / "scripts" / "build-fakes.sh")], check=True,
                         capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "NIXL_MOONCAKE_IBVERBS_LIB" in env, out
    return {"NIXL_MOONCAKE_IBVERBS_LIB": env["NIXL_MOONCAKE_IBVERBS_LIB"]}


def run_case(runner, case: str, *args: str, env: dict, timeout: float = 120) -> str:
    cmd = [sys.executable, str(SCRIPT), case, *args]
    what = f"rdma {case} {' '.join(args)}".strip()
    text = runner.command(cmd, what, runner.env(extra=env), timeout)
    assert f"SCENARIO {case} OK" in text, f"{what}: no success line\n{text}"
    return text


# The cross-process scenarios of the other transports, over RDMA --------------------------

def test_rdma_384mib_in_4kib_to_64mib_blocks(run_scenario, fake_nic):
    run_scenario("xp_bulk", "--protocol", "rdma", env=fake_nic)


def test_rdma_regions_beyond_max_mr_size_are_registered_in_pieces(run_scenario, fake_nic):
    # NICs that register at most 1 MiB per memory region (both processes):
    # every region is registered in pieces, and no work request crosses one
    # (the fake NIC refuses a range outside its memory region).
    small = "fake_mlx5_0:maxmr=1048576,fake_mlx5_1:maxmr=1048576"
    run_scenario("xp_bulk", "--protocol", "rdma", env={**fake_nic, "FAKE_IBV_DEVICES": small})


def test_rdma_prepped_read_20000_blocks_with_a_notification(run_scenario, fake_nic):
    run_scenario("xp_prepped", "--protocol", "rdma", "--blocks", "20000", env=fake_nic)


def test_rdma_four_threads_one_target(run_scenario, fake_nic):
    run_scenario("xp_threads", "--protocol", "rdma", env=fake_nic)


def test_rdma_sigkill_target_then_new_target(run_scenario, fake_nic):
    out = run_scenario("xp_kill_target", "--protocol", "rdma", "--size-mib", "128",
                       env=fake_nic)
    figures = re.findall(r"^KILL-TO-FAILURE (\w+) ([\d.]+) ms$", out, re.M)
    assert [op for op, _ in figures] == ["WRITE", "READ"], out
    for op, ms in figures:
        print(f"SIGKILL during {op}: first failed check {ms} ms after the kill")
        assert float(ms) < 1000.0


def test_rdma_empty_and_binary_notifications(run_scenario, fake_nic):
    run_scenario("xp_notif_bytes", "--protocol", "rdma", env=fake_nic)


def test_rdma_a_deregistered_region_is_refused_by_the_nic(run_scenario, fake_nic):
    run_scenario("xp_revoke", "--protocol", "rdma", env={**fake_nic, **DEBUG_LOG})


# RDMA-specific -------------------------------------------------------------------------------

def test_rdma_both_nics_of_each_side_carry_bytes(runner, fake_nic):
    run_case(runner, "nics", env={**fake_nic, **DEBUG_LOG})


def test_rdma_a_wrong_rkey_is_refused_then_the_next_transfer_works(runner, fake_nic):
    run_case(runner, "rkey", env=fake_nic)


def test_rdma_release_in_flight_returns_in_bounded_time_and_nothing_lands_after(runner, fake_nic):
    out = run_case(runner, "release", env=fake_nic)
    ms = float(re.search(r"^RELEASE-BOUND ([\d.]+) ms$", out, re.M).group(1))
    print(f"releaseReqH of a WRITE in flight returned in {ms} ms")


def test_rdma_a_failed_link_moves_the_transfer_to_the_other_nic_pair(runner, fake_nic):
    text = run_case(runner, "failover", env=fake_nic)
    assert "move from queue pair" in text, text


def test_rdma_small_transfers_take_the_numa_local_nic(runner, fake_nic):
    layout = "fake_mlx5_0:numa=1,fake_mlx5_1:numa=0"
    run_case(runner, "numa", env={**fake_nic, "FAKE_IBV_DEVICES": layout})


def test_rdma_sigkill_during_a_read_fails_within_a_second(runner, fake_nic):
    out = run_case(runner, "kill", env=fake_nic)
    ms = float(re.search(r"^KILL-TO-FAILURE READ ([\d.]+) ms$", out, re.M).group(1))
    print(f"SIGKILL during an RDMA READ: failed {ms} ms after the kill")
    assert ms < 1000.0


def test_rdma_1000_peer_restarts_without_queue_pair_growth(runner, fake_nic):
    out = run_case(runner, "restarts", "--rounds", "1000", env=fake_nic, timeout=900)
    print(re.search(r"^RESTARTS .*$", out, re.M).group(0))


def test_rdma_four_threads_with_their_own_handles(runner, fake_nic):
    run_case(runner, "threads", env=fake_nic)


def test_without_a_verbs_library_rdma_is_refused_and_tcp_works(runner):
    text = run_case(runner, "noverbs",
                    env={"NIXL_MOONCAKE_IBVERBS_LIB": "/nonexistent/libibverbs.so.1"})
    assert "RDMA is unavailable" in text and "cannot be loaded" in text, text
