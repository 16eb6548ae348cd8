"""GPU memory (VRAM) through the real NIXL 1.5.1, on the fake CUDA driver.

Each test runs one case of gpu.py in a fresh process with
NIXL_MOONCAKE_CUDA_LIB pointing at the fake driver that scripts/build-fakes.sh
builds (tests/fakes/cuda): device memory that faults on any CPU access,
asynchronous copies on stream threads, two devices.  What passes here is
proven on the fake only; scripts/gpu-check.sh runs the same paths on a real
GPU.

    .venv/bin/python -m pytest tests/e2e/test_gpu.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND = os.environ.get("E2E_BACKEND", "Mooncake")  # as conftest.py reads it
SCRIPT = Path(__file__).with_name("gpu.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(BACKEND != "Mooncake",
                                reason="GPU cases drive the Mooncake plugin on the fake driver")


@pytest.fixture(scope="session")
def fake_cuda() -> dict:
    """NIXL_MOONCAKE_CUDA_LIB=<fake>, built (if stale) by scripts/build-fakes.sh."""
    out = subprocess.run([str(REPO / "scripts" / "build-fakes.sh")], check=True,
                         capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "NIXL_MOONCAKE_CUDA_LIB" in env, out
    return {"NIXL_MOONCAKE_CUDA_LIB": env["NIXL_MOONCAKE_CUDA_LIB"]}


@pytest.fixture(scope="session")
def fake_cuda_and_nic(fake_cuda) -> dict:
    """The fake CUDA driver and the fake NIC (tests/fakes/ibverbs) together."""
    out = subprocess.run([str(REPO / "scripts" / "build-fakes.sh")], check=True,
                         capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "NIXL_MOONCAKE_IBVERBS_LIB" in env, out
    return {**fake_cuda, "NIXL_MOONCAKE_IBVERBS_LIB": env["NIXL_MOONCAKE_IBVERBS_LIB"]}


def run_case(runner, case: str, *args: str, env: dict, timeout: float = 120) -> str:
    cmd = [sys.executable, str(SCRIPT), case, *args]
    what = f"gpu {case} {' '.join(args)}".strip()
    text = runner.command(cmd, what, runner.env(extra=env), timeout)
    assert f"SCENARIO {case} OK" in text, f"{what}: no success line\n{text}"
    return text


@pytest.mark.parametrize("prog_thread", ["on", "off"])
def test_vram_to_vram_and_dram_in_one_process(runner, fake_cuda, prog_thread):
    run_case(runner, "inproc", "--prog-thread", prog_thread, env=fake_cuda)


def test_prepped_20000_block_vram_read_with_a_notification(runner, fake_cuda):
    run_case(runner, "prepped", env=fake_cuda)


def test_four_threads_posting_vram_transfers(runner, fake_cuda):
    run_case(runner, "threads", env=fake_cuda)


def test_release_and_deregistration_while_device_copies_run(runner, fake_cuda):
    run_case(runner, "release", env=fake_cuda)


@pytest.mark.parametrize("protocol", ["tcp", "auto"])
def test_two_processes_vram(runner, fake_cuda, protocol):
    # protocol=tcp: staged through pinned buffers; auto on one host: CUDA IPC
    # (the initiator maps the target's allocations; the case checks the
    # fake's count of mappings), cross-memory attach for DRAM. Both: a region
    # the target deregistered is refused afterwards, its bytes untouched.
    run_case(runner, "xp", "--protocol", protocol, env=fake_cuda)


def test_two_processes_vram_over_rdma_with_gpudirect(runner, fake_cuda_and_nic):
    # protocol=rdma on the fake NIC: the GPU regions are exported as dmabufs
    # and registered on the NICs (ibv_reg_dmabuf_mr), which move the bytes
    # between the processes; nothing is staged (rdma has no TCP fallback),
    # the notification comes after the data, a deregistered region is
    # refused by the NIC.
    text = run_case(runner, "xp", "--protocol", "rdma", env=fake_cuda_and_nic)
    assert "without GPUDirect RDMA" not in text, text


def test_two_processes_vram_without_ipc_handles_is_staged_over_tcp(runner, fake_cuda):
    text = run_case(runner, "xp", "--protocol", "auto", "--no-ipc", env=fake_cuda)
    assert "staging it through TCP instead" in text, text


@pytest.mark.parametrize("protocol", ["tcp", "auto"])
def test_two_processes_vram_in_vmm_chunks(runner, fake_cuda, protocol):
    # The target's memory is 16 VMM chunks of 2 MiB made with the POSIX file
    # descriptor handle type: under auto the initiator takes the descriptors,
    # imports and maps the chunks (the case checks the fake's count of such
    # mappings); transfers cross chunk boundaries; a deregistered region is
    # refused.
    run_case(runner, "xp", "--protocol", protocol, "--vmm", "shared", env=fake_cuda)


def test_two_processes_vmm_chunks_without_the_descriptor_type_are_staged(runner, fake_cuda):
    text = run_case(runner, "xp", "--protocol", "auto", "--vmm", "private", env=fake_cuda)
    assert "staging it through TCP instead" in text, text


@pytest.mark.parametrize("protocol", ["tcp", "auto"])
def test_sigkill_of_the_target_during_a_vram_read_then_a_new_target(runner, fake_cuda, protocol):
    text = run_case(runner, "xp_kill", "--protocol", protocol, env=fake_cuda)
    assert "after SIGKILL of the target the READ ended as nixl" in text, text


def test_a_device_error_in_a_vram_write_fails_it_and_the_link_stays_in_step(runner, fake_cuda):
    text = run_case(runner, "xp_fault", env=fake_cuda)
    assert "the WRITE ended as nixl" in text, text
    assert "the link stayed in step" in text, text


def test_registration_mismatches_are_refused(runner, fake_cuda):
    text = run_case(runner, "bad", env=fake_cuda)
    # One log line of ours per refusal, naming the mismatch.
    for why in ("not of devId", "crosses the end of the allocation", "is not GPU memory"):
        assert why in text, f"no log line saying {why!r}\n{text}"


def test_without_a_driver_vram_is_refused_and_dram_works(runner):
    text = run_case(runner, "nodriver",
                    env={"NIXL_MOONCAKE_CUDA_LIB": "/nonexistent/libcuda.so.1"})
    assert "GPU memory is unavailable" in text and "cannot be loaded" in text, text


def test_the_plugin_does_not_link_the_cuda_driver(plugin):
    """The driver is loaded at run time (dlopen): no NEEDED entry names it."""
    assert plugin.file is not None
    dynamic = subprocess.run(["readelf", "-d", str(plugin.file)], check=True,
                             capture_output=True, text=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines()
              if "(NEEDED)" in line]
    assert needed, dynamic
    for lib in needed:
        assert not lib.startswith(("libcuda", "libcudart", "libnvidia", "libibverbs")), needed
    print("NEEDED:", ", ".join(needed))
