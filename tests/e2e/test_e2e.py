"""End-to-end tests of libplugin_Mooncake.so loaded by the real NIXL 1.5.1 wheel.

Each test runs one scenario of scenarios.py (or the wheel's C++ nixl_example) in a
fresh process, bounded by a timeout, and fails with the process's output if it
exits non-zero, crashes, or hangs.  See conftest.py for the environment knobs.

    scripts/setup-venv.sh                      # once
    .venv/bin/python -m pytest tests/e2e       # plugin from target/release/
    E2E_BACKEND=UCX .venv/bin/python -m pytest tests/e2e   # validate the suite itself
"""

from __future__ import annotations

import os
import re

import pytest


# a. discovery ----------------------------------------------------------------------


def test_listed_and_creatable_from_plugin_dir(run_scenario):
    run_scenario("listing", "--mode", "dir")


def test_listed_and_creatable_beside_the_wheel(run_scenario, plugin_beside_wheel):
    # NIXL_PLUGIN_DIR unset: the wheel's plugins/ directory, where UCX must stay listed.
    run_scenario("listing", "--mode", "wheel", location="wheel")


# b. options and memory types --------------------------------------------------------


def test_plugin_params_and_invalid_options(run_scenario):
    # With E2E_BACKEND=UCX this checks UCX's own options (scenarios.PARAM_PROFILES).
    run_scenario("params")


# c./j. two agents, 64 MiB each way, progress thread on and off ----------------------


@pytest.mark.parametrize("prog_thread", ["on", "off"])
def test_two_agents_64mib_write_then_read(run_scenario, prog_thread):
    run_scenario("two_agents", "--prog-thread", prog_thread, "--size-mib", "64")


# d. vLLM-style prepped READ -----------------------------------------------------------


def test_prepped_read_20000_noncontiguous_blocks(run_scenario):
    run_scenario("prepped", "--blocks", "20000")


# e. reposting ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_30_reposts_give_exactly_30_notifications(run_scenario, op):
    run_scenario("repost", "--op", op, "--count", "30")


# f. notification payloads ---------------------------------------------------------------


def test_empty_and_binary_notifications(run_scenario):
    run_scenario("notif_bytes")


# g. loopback ------------------------------------------------------------------------------


def test_loopback_to_itself(run_scenario):
    run_scenario("loopback")


# h. threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["default", "rw"])
def test_four_threads_posting_at_once(run_scenario, sync):
    run_scenario("threads", "--sync", sync)


# i. release while in flight ----------------------------------------------------------------


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_release_while_in_flight(run_scenario, op):
    # UCX_TLS only matters when validating with UCX: over TCP its transfers are
    # really in flight when released (with shared memory they finish inline).
    run_scenario("release_inflight", "--op", op, "--size-mib", "256",
                 env={"UCX_TLS": "tcp,self"})


# extra: metadata in pieces ------------------------------------------------------------------


def test_partial_metadata_and_readding_a_remote(run_scenario):
    run_scenario("metadata")


# idle CPU --------------------------------------------------------------------------------------


def test_idle_agents_do_not_burn_cpu(run_scenario, backend):
    if backend != "Mooncake":
        pytest.skip("NIXL's UCX backend busy-polls by design (about a core per agent)")
    run_scenario("idle_cpu", "--seconds", "3", "--max-percent", "1.0")


# extra: two processes ------------------------------------------------------------------------


@pytest.mark.parametrize("initiator", ["parent", "child"])
def test_two_processes(run_scenario, initiator):
    run_scenario("two_process", "--initiator", initiator, "--size-mib", "64")


# cross-process: initiator here, target in a peer process the scenario spawns and reaps ---

PROTOCOLS = ["tcp", "auto"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cross_process_384mib_in_4kib_to_64mib_blocks(run_scenario, protocol):
    run_scenario("xp_bulk", "--protocol", protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cross_process_prepped_read_20000_blocks(run_scenario, protocol):
    run_scenario("xp_prepped", "--protocol", protocol, "--blocks", "20000")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cross_process_four_threads_one_target(run_scenario, protocol):
    run_scenario("xp_threads", "--protocol", protocol)


@pytest.mark.parametrize("target_prog_thread", ["on", "off"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cross_process_target_makes_no_nixl_call(run_scenario, backend, protocol,
                                                 target_prog_thread):
    # With the progress thread off too: nothing on the target may wait for a NIXL call.
    if backend != "Mooncake" and target_prog_thread == "off":
        pytest.skip("NIXL's UCX backend progresses a target without a progress thread "
                    "only inside its NIXL calls")
    run_scenario("xp_idle_target", "--protocol", protocol, "--seconds", "3",
                 "--target-prog-thread", target_prog_thread)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cross_process_sigkill_target_then_new_target(run_scenario, protocol):
    # UCX_TLS: as for test_release_while_in_flight (only matters when validating with UCX).
    out = run_scenario("xp_kill_target", "--protocol", protocol, "--size-mib", "128",
                       env={"UCX_TLS": "tcp,self"})
    figures = re.findall(r"^KILL-TO-FAILURE (\w+) ([\d.]+) ms$", out, re.M)
    assert [op for op, _ in figures] == ["WRITE", "READ"], out
    for op, ms in figures:
        print(f"SIGKILL during {op}: first failed check {ms} ms after the kill")
        assert float(ms) < 1000.0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cross_process_empty_and_binary_notifications(run_scenario, protocol):
    run_scenario("xp_notif_bytes", "--protocol", protocol)


# cross-process, same host: cross-memory attach, forced (cma) or picked by auto ---------
# The plugin says at DEBUG which transport it picked for a peer; the scenarios check
# that line in the initiator's own output.

CMA_PROTOCOLS = ["cma", "auto"]
DEBUG_LOG = {"NIXL_LOG_LEVEL": "DEBUG"}


def _cma_only(backend: str) -> None:
    if backend != "Mooncake":
        pytest.skip("cross-memory attach and its options and log lines are the plugin's own")


@pytest.mark.parametrize("protocol", CMA_PROTOCOLS)
def test_cma_1_byte_to_64mib_at_unaligned_addresses(run_scenario, backend, protocol):
    _cma_only(backend)
    run_scenario("xp_unaligned", "--protocol", protocol, env=DEBUG_LOG)


@pytest.mark.parametrize("protocol", CMA_PROTOCOLS)
def test_cma_100000_descriptors_in_one_transfer(run_scenario, backend, protocol):
    _cma_only(backend)
    run_scenario("xp_many_descs", "--protocol", protocol, "--descs", "100000", env=DEBUG_LOG)


@pytest.mark.parametrize("protocol", CMA_PROTOCOLS)
def test_cma_probe_failure_auto_falls_back_cma_refuses(run_scenario, backend, protocol):
    # The scenario sets NIXL_MOONCAKE_CMA_PROBE=fail in the initiator's process only.
    _cma_only(backend)
    run_scenario("xp_probe_fail", "--protocol", protocol, env=DEBUG_LOG)


@pytest.mark.parametrize("protocol", ["cma", "auto", "tcp"])
def test_no_peer_touches_a_region_after_its_deregistration(run_scenario, backend, protocol):
    # Over cross-memory attach too (where NIXL's UCX lets such transfers through).
    _cma_only(backend)
    run_scenario("xp_revoke", "--protocol", protocol, env=DEBUG_LOG)


@pytest.mark.parametrize("protocol", CMA_PROTOCOLS)
def test_cma_sigkill_target_during_stream_then_new_target(run_scenario, backend, protocol):
    _cma_only(backend)
    out = run_scenario("xp_kill_stream", "--protocol", protocol, "--size-mib", "64",
                       env=DEBUG_LOG)
    figures = re.findall(r"^KILL-TO-FAILURE (\w+) ([\d.]+) ms$", out, re.M)
    assert [op for op, _ in figures] == ["WRITE", "READ"], out
    for op, ms in figures:
        print(f"SIGKILL during a stream of {op}s over CMA: NIXL_ERR_REMOTE_DISCONNECT "
              f"{ms} ms after the kill")
        assert float(ms) < 1000.0


# k. the wheel's C++ example ------------------------------------------------------------------


def test_wheel_nixl_example(runner, wheel, backend):
    assert wheel.example.is_file(), f"nixl_example not found at {wheel.example}"
    loader = "/lib64/ld-linux-x86-64.so.2"  # the file is shipped without +x
    env = runner.env("dir")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(wheel.libs_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    out = runner.command([loader, str(wheel.example), backend], f"nixl_example {backend}", env)
    assert f"Using backend: {backend}" in out
    assert "Transfer verified" in out, "nixl_example did not verify its transfer"
    assert "Test done" in out
