#!/usr/bin/env python3
"""End-to-end scenarios driven through the real NIXL Python API (nixl-cu12 1.5.1).

Every scenario runs in its own process (NIXL's plugin manager is a process-wide
singleton, and a crash in a plugin must not take the test runner down); the
pytest side lives in ``test_e2e.py`` / ``conftest.py``.  Run one by hand with

    UCX_MODULES=^efa UCX_NET_DEVICES=lo NIXL_MOONCAKE_IP_ADDR=127.0.0.1 \\
        NIXL_PLUGIN_DIR=<dir with libplugin_Mooncake.so> \\
        python tests/e2e/scenarios.py <scenario> [options]

Environment:
    E2E_BACKEND     backend (plugin) name to exercise, default "Mooncake".  The
                    suite's logic can be validated against NIXL's bundled "UCX".
    E2E_OP_TIMEOUT  seconds any single wait (transfer, notification) may take
                    before the scenario fails, default 60.

A scenario prints what it does and ends with the line ``SCENARIO <name> OK``;
any failure raises, which exits non-zero with a traceback.  All waits are
polling loops bounded by deadlines; nothing relies on sleeping for a while.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from typing import Callable, Optional

BACKEND = os.environ.get("E2E_BACKEND", "Mooncake")
OP_TIMEOUT = float(os.environ.get("E2E_OP_TIMEOUT", "60"))
KiB = 1 << 10
MiB = 1 << 20

# The peer processes of the two-process scenarios use their stdout as a message
# channel. Move the real stdout away before NIXL (or anything else) can write to
# it, and send all stray output to stderr instead.
PEER_COMMANDS = ("_twoproc_peer", "_xp_target")
_CHANNEL_OUT = None
_LOG_PREFIX = ""
if len(sys.argv) > 1 and sys.argv[1] in PEER_COMMANDS:
    _LOG_PREFIX = f"[peer {os.getpid()}]"
    sys.stdout.flush()
    _CHANNEL_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

import numpy as np  # noqa: E402
from nixl_cu12._api import (  # noqa: E402
    nixl_agent,
    nixl_agent_config,
    nixl_thread_sync_t,
)


def log(*parts: object) -> None:
    """Progress output (stderr: the pytest runner merges it with stdout)."""
    print(*((_LOG_PREFIX,) if _LOG_PREFIX else ()), *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def new_agent(
    name: str,
    *,
    prog_thread: bool = True,
    sync: Optional[nixl_thread_sync_t] = None,
    create: bool = True,
) -> nixl_agent:
    """An agent with only the backend under test (or none if create=False).

    nixl_agent() merely logs a warning when a configured backend cannot be found,
    so check that it really exists.
    """
    cfg = nixl_agent_config(
        enable_prog_thread=prog_thread,
        backends=[BACKEND] if create else [],
        sync_mode=sync,
    )
    agent = nixl_agent(name, cfg)
    if create:
        assert BACKEND in agent.backends, (
            f"agent {name!r}: backend {BACKEND!r} was not created; plugins seen: "
            f"{agent.get_plugin_list()}; {plugin_diagnosis()}"
        )
    return agent


def plugin_diagnosis() -> str:
    """Why a listed plugin may fail to load: NIXL logs dlopen errors at INFO only."""
    import ctypes
    import nixl_cu12

    d = os.environ.get("NIXL_PLUGIN_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(nixl_cu12.__file__)), ".nixl_cu12.mesonpy.libs", "plugins")
    path = os.path.join(d, f"libplugin_{BACKEND}.so")
    if not os.path.exists(path):
        return f"{path} does not exist"
    try:
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as e:
        return f"dlopen of the plugin fails: {e}"
    return f"dlopen({path}) works; rerun with NIXL_LOG_LEVEL=INFO for NIXL's loader messages"


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """A writable uint8 buffer filled with reproducible pseudo-random bytes."""
    rng = np.random.default_rng(seed)
    return np.frombuffer(bytearray(rng.bytes(nbytes)), dtype=np.uint8)


def fast_pattern(nbytes: int, seed: int) -> np.ndarray:
    """Like pattern(), several times faster for hundreds of MiB; reproducible in any
    process of this venv (a peer regenerates what the other side holds from the seed)."""
    words = np.random.default_rng(seed).random((nbytes + 7) // 8)
    return words.view(np.uint8)[:nbytes]


def filled(nbytes: int, value: int = 0) -> np.ndarray:
    return np.full(nbytes, value, dtype=np.uint8)


def addr(buf: np.ndarray) -> int:
    return buf.ctypes.data


def register(agent: nixl_agent, *bufs: np.ndarray):
    """Register whole numpy buffers as DRAM regions; returns the reg list."""
    return agent.register_memory([(addr(b), b.nbytes, 0, "") for b in bufs], "DRAM")


def xfer_descs(agent: nixl_agent, *bufs: np.ndarray):
    return agent.get_xfer_descs([(addr(b), b.nbytes, 0) for b in bufs], "DRAM")


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def sha256(buf: np.ndarray) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()


def check_scattered_read(local, remote, total, block, l_stride, r_stride, lidx, ridx) -> None:
    """After a READ of blocks `ridx` of `remote` into blocks `lidx` of `local`
    (both strided, local pre-filled with 0xAA): the selected blocks match, and
    neither unselected blocks nor the gaps between blocks were written."""
    lv, rv = block_view(local, total, block, l_stride), block_view(remote, total, block, r_stride)
    assert same(lv[lidx], rv[ridx]), "prepped READ: block contents differ"
    untouched = np.ones(total, dtype=bool)
    untouched[lidx] = False
    assert (lv[untouched] == 0xAA).all(), "prepped READ wrote blocks it was not asked to"
    gaps = local[: total * l_stride].reshape(total, l_stride)[:, block:]
    assert (gaps == 0xAA).all(), "prepped READ wrote into the gaps between blocks"
    log("all blocks verified, gaps and unselected blocks untouched")


def check_merged_read(a: nixl_agent, remote_agent: str, local, remote_src, remote, dense: int,
                      block: int, expect_notif: Callable[[bytes], None]) -> None:
    """Runs of consecutive blocks over dense views of `local` and of the remote
    agent's buffer at `remote_src` (an array or an address; `remote` holds its
    contents): NIXL merges adjacent blocks, so the backend sees fewer, longer
    descriptors of varying length. READs them with a notification, checks it
    with `expect_notif`, and that only the requested runs were written."""
    local[:] = 0xAA
    local_dh = a.prep_xfer_dlist("NIXL_INIT_AGENT", block_table(local, dense, block, block),
                                 "DRAM")
    remote_dh = a.prep_xfer_dlist(remote_agent, block_table(remote_src, dense, block, block),
                                  "DRAM")
    runs, start = [], 0
    for length in (1, 2, 3, 64, 7, 500, 1, 1000):
        runs.append(np.arange(start, start + length))
        start += length + 5  # 5-block hole between runs
    idx = np.concatenate(runs).astype(np.int32)
    notif = b"req-0001:tp1"
    h = a.make_prepped_xfer("READ", local_dh, idx, remote_dh, idx, notif)
    post(a, h, "merged prepped READ")
    expect_notif(notif)
    ld, rd = block_view(local, dense, block, block), block_view(remote, dense, block, block)
    assert same(ld[idx], rd[idx]), "merged READ: block contents differ"
    holes = np.ones(dense, dtype=bool)
    holes[idx] = False
    assert (ld[holes] == 0xAA).all(), "merged READ wrote outside the requested runs"
    log(f"merged READ of {len(runs)} runs ({len(idx)} blocks) verified")
    a.release_xfer_handle(h)
    for dl in (local_dh, remote_dh):
        a.release_dlist_handle(dl)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = OP_TIMEOUT) -> None:
    """Poll cond() until it holds; fail after `timeout` seconds.

    Spins for a while (cheap completions), then backs off to 100 µs between polls
    so that backend threads get CPU on small machines.
    """
    deadline = time.monotonic() + timeout
    spins = 0
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        spins += 1
        if spins > 2000:
            time.sleep(100e-6)


def wait_xfer(agent: nixl_agent, handle, what: str, state: str = "PROC",
              timeout: float = OP_TIMEOUT, pump: Optional[Callable[[], None]] = None) -> None:
    """Poll check_xfer_state until the transfer leaves PROC; it must be DONE.

    `pump` is called on every poll: with the progress thread disabled, the
    target agent only makes progress when someone calls into it (a real
    deployment polls its notifications in its own process).
    """
    box = [state]

    def done() -> bool:
        if pump is not None:
            pump()
        if box[0] == "PROC":
            box[0] = agent.check_xfer_state(handle)
        return box[0] != "PROC"

    wait_until(done, f"{what} to complete", timeout)
    assert box[0] == "DONE", f"{what}: transfer finished in state {box[0]!r}"


def post(agent: nixl_agent, handle, what: str, notif: Optional[bytes] = None,
         pump: Optional[Callable[[], None]] = None) -> float:
    """transfer() + wait for DONE; returns the elapsed seconds."""
    t0 = time.perf_counter()
    state = agent.transfer(handle) if notif is None else agent.transfer(handle, notif)
    assert state in ("DONE", "PROC"), f"{what}: transfer() returned {state!r}"
    wait_xfer(agent, handle, what, state, pump=pump)
    return time.perf_counter() - t0


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB:.0f} MiB in {seconds * 1e3:.1f} ms ({nbytes / max(seconds, 1e-9) / 1e9:.2f} GB/s)"


class Notifs:
    """Accumulates an agent's notifications, as {sender: [payload, ...]}."""

    def __init__(self, agent: nixl_agent):
        self.agent = agent
        self.got: dict[str, list[bytes]] = defaultdict(list)

    def poll(self) -> None:
        for sender, msgs in self.agent.get_new_notifs().items():
            self.got[sender].extend(msgs)

    def total(self) -> int:
        return sum(len(v) for v in self.got.values())

    def wait_count(self, sender: str, count: int, what: str,
                   timeout: float = OP_TIMEOUT) -> list[bytes]:
        """Wait until at least `count` notifications from `sender` arrived."""

        def enough() -> bool:
            self.poll()
            return len(self.got[sender]) >= count

        try:
            wait_until(enough, f"{count} notification(s) from {sender!r} ({what})", timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; received so far: {dict(self.got)}") from None
        return list(self.got[sender])

    def wait_for(self, sender: str, payload: bytes, what: str,
                 timeout: float = OP_TIMEOUT) -> None:
        """Wait until `payload` from `sender` is among the received ones."""

        def seen() -> bool:
            self.poll()
            return payload in self.got[sender]

        wait_until(seen, f"{payload!r} from {sender!r} ({what})", timeout)

    def expect(self, sender: str, expected: list[bytes], what: str,
               timeout: float = OP_TIMEOUT) -> None:
        """Wait for exactly these payloads from `sender` (any order), then forget them."""
        got = self.wait_count(sender, len(expected), what, timeout)
        assert Counter(got) == Counter(expected), (
            f"{what}: notifications from {sender!r} differ\n  expected {expected!r}\n"
            f"  got      {got!r}"
        )
        others = {k: v for k, v in self.got.items() if k != sender and v}
        assert not others, f"{what}: notifications from unexpected senders: {others!r}"
        self.got.clear()

    def expect_quiet(self, window: float, what: str) -> None:
        """Poll for `window` seconds and fail if any notification shows up."""
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            self.poll()
            assert self.total() == 0, f"{what}: unexpected notification(s) {dict(self.got)!r}"
            time.sleep(1e-3)  # polling interval, not synchronisation


@contextlib.contextmanager
def capture_fds():
    """Capture what native code writes to fds 1 and 2 (e.g. a plugin's log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    box = {"text": ""}
    with tempfile.TemporaryFile() as tmp:
        try:
            for fd in (1, 2):
                os.dup2(tmp.fileno(), fd)
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


def is_nixl_error(exc: BaseException) -> bool:
    """NIXL's own status exceptions (nixlBackendError, ...), not Python misuse."""
    return type(exc).__module__.startswith("nixl_cu12")


# --------------------------------------------------------------------------------------
# a. discovery
# --------------------------------------------------------------------------------------


def sc_listing(args) -> None:
    """The plugin is listed and creatable (both by config and by create_backend)."""
    log("NIXL_PLUGIN_DIR =", os.environ.get("NIXL_PLUGIN_DIR", "<unset: the wheel's plugins/>"))
    lister = new_agent("lister", create=False)
    plugins = lister.get_plugin_list()
    log("get_plugin_list() ->", plugins)
    assert BACKEND in plugins, f"{BACKEND!r} not listed: {plugins}"
    if args.mode == "wheel":
        assert "UCX" in plugins, f"bundled UCX no longer listed beside our plugin: {plugins}"
    try:
        lister.create_backend(BACKEND)
    except Exception as e:  # noqa: BLE001 - re-raised with a diagnosis
        raise AssertionError(f"{BACKEND!r} is listed but create_backend fails ({type(e).__name__}: "
                             f"{e}); {plugin_diagnosis()}") from e
    assert BACKEND in lister.backends
    mems = lister.get_backend_mem_types(BACKEND)
    log("get_backend_mem_types ->", mems)
    assert "DRAM_SEG" in mems, mems

    # And it moves data: two agents created through the config path.
    a, b = new_agent("list-A"), new_agent("list-B")
    src, dst = pattern(MiB, 1), filled(MiB)
    register(a, src)
    register(b, dst)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer("WRITE", xfer_descs(a, src), xfer_descs(b, dst), "list-B", b"listed")
    post(a, h, "1 MiB WRITE")
    Notifs(b).expect("list-A", [b"listed"], "listing transfer")
    assert same(src, dst), "1 MiB WRITE: data mismatch"
    log("1 MiB WRITE verified")


# --------------------------------------------------------------------------------------
# b. options and memory types
# --------------------------------------------------------------------------------------

# What get_plugin_params must report, which values creation must reject, and
# whether an unknown option must be warned about.  The UCX profile exists only to
# validate this scenario's logic against NIXL's bundled backend.
PARAM_PROFILES = {
    "Mooncake": {
        "defaults": {"protocol": "auto"},
        "keys": {"protocol", "ip_addr", "port", "device_name"},
        "invalid": [{"protocol": "bogus"}, {"port": "not-a-port"}],
        "warns_on_unknown": True,
    },
    "UCX": {
        "defaults": {"ucx_error_handling_mode": "peer", "num_workers": "1"},
        "keys": {"ucx_error_handling_mode", "num_workers", "ucx_devices"},
        "invalid": [{"ucx_error_handling_mode": "bogus"}, {"num_workers": "not-a-number"}],
        "warns_on_unknown": False,
    },
}

UNKNOWN_OPTION = "e2e_unknown_option"


def sc_params(args) -> None:
    profile = PARAM_PROFILES[BACKEND]
    probe = new_agent("probe", create=False)

    opts = probe.get_plugin_params(BACKEND)
    log("get_plugin_params ->", opts)
    missing = profile["keys"] - set(opts)
    assert not missing, f"options missing from get_plugin_params: {sorted(missing)} (got {opts})"
    for key, value in profile["defaults"].items():
        assert opts[key] == value, f"default of {key!r} is {opts[key]!r}, expected {value!r}"

    mems = probe.get_plugin_mem_types(BACKEND)
    log("get_plugin_mem_types ->", mems)
    # The 1.5.1 bindings spell memory types "DRAM_SEG", "VRAM_SEG", ...
    assert "DRAM_SEG" in mems, f"DRAM missing from memory types {mems}"

    # Every rejected value fails creation cleanly (a NIXL exception, no crash).
    for i, bad in enumerate(profile["invalid"]):
        agent = new_agent(f"bad-{i}", create=False)
        try:
            agent.create_backend(BACKEND, bad)
        except Exception as e:  # noqa: BLE001 - checked just below
            assert is_nixl_error(e), f"create_backend({bad}) raised a non-NIXL error: {e!r}"
            log(f"create_backend({bad}) rejected as expected: {type(e).__name__}: {e}")
        else:
            raise AssertionError(f"create_backend({BACKEND!r}, {bad}) succeeded; it must fail")
        assert BACKEND not in agent.backends

    # Creating with exactly the reported defaults must work.
    agent = new_agent("defaults", create=False)
    agent.create_backend(BACKEND, dict(opts))
    log("create_backend with the reported defaults: ok")

    # An unknown option is accepted, with a warning that names it.
    agent = new_agent("unknown", create=False)
    with capture_fds() as cap:
        agent.create_backend(BACKEND, {UNKNOWN_OPTION: "1"})
    log("native output during create_backend with an unknown option:", repr(cap["text"]))
    assert BACKEND in agent.backends
    if profile["warns_on_unknown"]:
        assert UNKNOWN_OPTION in cap["text"], (
            f"creating with the unknown option {UNKNOWN_OPTION!r} succeeded but printed no "
            f"warning naming it"
        )
    log("unknown option accepted")

    if BACKEND == "Mooncake":
        env_options()

    # A backend created after failed attempts in the same process moves data.
    a, b = new_agent("params-A"), new_agent("params-B")
    src, dst = pattern(MiB, 2), filled(MiB)
    register(a, src)
    register(b, dst)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer("WRITE", xfer_descs(a, src), xfer_descs(b, dst), "params-B")
    post(a, h, "1 MiB WRITE after failed creations")
    assert same(src, dst)
    log("1 MiB WRITE after failed creations verified")


def env_options() -> None:
    """Options from NIXL_MOONCAKE_<OPTION>, for frameworks that pass no parameters."""
    import socket

    # An invalid value from the environment fails creation, naming the variable.
    os.environ["NIXL_MOONCAKE_PROTOCOL"] = "bogus"
    try:
        agent = new_agent("env-bad", create=False)
        with capture_fds() as cap:
            try:
                agent.create_backend(BACKEND, {})
            except Exception as e:  # noqa: BLE001 - checked just below
                assert is_nixl_error(e), f"a non-NIXL error: {e!r}"
            else:
                raise AssertionError("NIXL_MOONCAKE_PROTOCOL=bogus was accepted")
    finally:
        del os.environ["NIXL_MOONCAKE_PROTOCOL"]
    assert "NIXL_MOONCAKE_PROTOCOL" in cap["text"], f"no line names the variable: {cap['text']!r}"
    log("NIXL_MOONCAKE_PROTOCOL=bogus rejected, naming the variable")

    # A valid one is used by a backend created with no parameters at all.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["NIXL_MOONCAKE_PORT"] = str(port)
    try:
        agent = new_agent("env-port", create=False)
        agent.create_backend(BACKEND, {})
    finally:
        del os.environ["NIXL_MOONCAKE_PORT"]
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    log(f"NIXL_MOONCAKE_PORT={port}: the backend created without parameters listens there")


# --------------------------------------------------------------------------------------
# c./j. two agents, 64 MiB each way, progress thread on or off
# --------------------------------------------------------------------------------------


def sc_two_agents(args) -> None:
    size = args.size_mib * MiB
    prog = args.prog_thread == "on"
    log(f"progress thread {'enabled' if prog else 'disabled'}, {args.size_mib} MiB each way")
    a = new_agent("initiator", prog_thread=prog)
    b = new_agent("target", prog_thread=prog)
    a_src, a_dst = pattern(size, 10), filled(size)
    b_dst, b_src = filled(size), pattern(size, 11)
    a_reg = register(a, a_src, a_dst)
    b_reg = register(b, b_dst, b_src)
    # Only the initiator loads the target's metadata: notifications must reach a
    # target that never loaded the sender's.
    assert a.add_remote_agent(b.get_agent_metadata()) in ("target", b"target")
    b_notifs = Notifs(b)
    # Without progress threads the target is polled while the initiator waits.
    pump = None if prog else b_notifs.poll

    w = a.initialize_xfer("WRITE", xfer_descs(a, a_src), xfer_descs(b, b_dst), "target",
                          b"write-done")
    dt = post(a, w, "WRITE", pump=pump)
    log("WRITE", rate(size, dt))
    b_notifs.expect("initiator", [b"write-done"], "WRITE notification")
    assert same(a_src, b_dst), "WRITE: data mismatch"
    log("WRITE data verified, notification b'write-done' from 'initiator' received")

    r = a.initialize_xfer("READ", xfer_descs(a, a_dst), xfer_descs(b, b_src), "target",
                          b"read-done")
    dt = post(a, r, "READ", pump=pump)
    log("READ", rate(size, dt))
    b_notifs.expect("initiator", [b"read-done"], "READ notification")
    assert same(a_dst, b_src), "READ: data mismatch"
    log("READ data verified, notification b'read-done' from 'initiator' received")

    # Explicit teardown (release, deregister, forget the remote) before destruction.
    a.release_xfer_handle(w)
    a.release_xfer_handle(r)
    a.remove_remote_agent("target")
    a.deregister_memory(a_reg)
    b.deregister_memory(b_reg)


# --------------------------------------------------------------------------------------
# d. vLLM-style prepped READ of 20,000 non-contiguous blocks
# --------------------------------------------------------------------------------------


def block_table(buf, nblocks: int, block: int, stride: int) -> np.ndarray:
    """Nx3 (addr, len, devId) array of `nblocks` blocks spaced `stride` apart, from
    the start of `buf` (a numpy buffer, or an address in another process)."""
    base = buf if isinstance(buf, int) else addr(buf)
    return desc_table(base + np.arange(nblocks, dtype=np.uint64) * np.uint64(stride), block)


def desc_table(addrs, length: int) -> np.ndarray:
    """Nx3 (addr, len, devId) array of descriptors of `length` bytes at `addrs`."""
    t = np.zeros((len(addrs), 3), dtype=np.uint64)
    t[:, 0] = np.asarray(addrs, dtype=np.uint64)
    t[:, 1] = length
    return t


def block_view(buf: np.ndarray, nblocks: int, block: int, stride: int) -> np.ndarray:
    """(nblocks, block) view of the blocks in `buf` (gaps excluded)."""
    return buf[: nblocks * stride].reshape(nblocks, stride)[:, :block]


def sc_prepped(args) -> None:
    nsel, total, block = args.blocks, args.blocks + args.blocks // 5, 4 * KiB
    r_stride, l_stride = block + 1 * KiB, block + 2 * KiB  # gaps differ per side
    a = new_agent("decode")  # initiator, like vLLM's decode worker
    b = new_agent("prefill")
    remote = pattern(total * r_stride, 20)
    local = filled(total * l_stride, 0xAA)
    register(a, local)
    register(b, remote)
    a.add_remote_agent(b.get_agent_metadata())
    b_notifs = Notifs(b)

    # Local side as an Nx3 numpy table, remote side as a list of tuples: both forms
    # are what vLLM versions pass to prep_xfer_dlist.
    local_h = a.prep_xfer_dlist("NIXL_INIT_AGENT", block_table(local, total, block, l_stride), "DRAM")
    remote_tuples = [tuple(int(x) for x in row) for row in block_table(remote, total, block, r_stride)]
    remote_h = a.prep_xfer_dlist("prefill", remote_tuples, "DRAM")

    rng = np.random.default_rng(21)
    ridx = rng.permutation(total)[:nsel].astype(np.int32)
    lidx = rng.permutation(total)[:nsel].astype(np.int32)
    notif = b"req-0000:tp1"
    h = a.make_prepped_xfer("READ", local_h, lidx, remote_h, ridx, notif)
    dt = post(a, h, f"prepped READ of {nsel} blocks")
    log(f"prepped READ of {nsel} x 4 KiB scattered blocks:", rate(nsel * block, dt))
    b_notifs.expect("decode", [notif], "prepped READ notification")

    check_scattered_read(local, remote, total, block, l_stride, r_stride, lidx, ridx)

    # The same buffers as dense 4 KiB blocks, read in runs NIXL merges.
    dense = min(total, (remote.nbytes // block), (local.nbytes // block))
    check_merged_read(a, "prefill", local, remote, remote, dense, block,
                      lambda n: b_notifs.expect("decode", [n], "merged READ notification"))

    a.release_xfer_handle(h)
    for dl in (local_h, remote_h):
        a.release_dlist_handle(dl)


# --------------------------------------------------------------------------------------
# e. reposting one handle
# --------------------------------------------------------------------------------------


def sc_repost(args) -> None:
    n, size = args.count, MiB
    a, b = new_agent("poster"), new_agent("receiver")
    a_buf, b_buf = filled(size), filled(size)
    register(a, a_buf)
    register(b, b_buf)
    a.add_remote_agent(b.get_agent_metadata())
    b_notifs = Notifs(b)
    # WRITE: a_buf -> b_buf; READ: b_buf -> a_buf. `src` is what we change.
    src, dst = (a_buf, b_buf) if args.op == "WRITE" else (b_buf, a_buf)
    h = a.initialize_xfer(args.op, xfer_descs(a, a_buf), xfer_descs(b, b_buf), "receiver",
                          b"repost")

    expected = []
    for i in range(n):
        src[:] = i + 1
        # First half: the handle's own message. Second half: a per-post message
        # (in 1.5.1 a per-post message also replaces the handle's stored one, so
        # the halves are done in this order).
        if i < n // 2:
            post(a, h, f"{args.op} post {i}")
            expected.append(b"repost")
        else:
            msg = b"repost-%02d" % i
            post(a, h, f"{args.op} post {i}", msg)
            expected.append(msg)
        assert (dst == i + 1).all(), f"{args.op} post {i}: data mismatch"
    log(f"{n} posts of one {args.op} handle completed, data verified after each")

    got = b_notifs.wait_count("poster", n, f"{n} repost notifications")
    assert Counter(got) == Counter(expected), f"notifications differ: {got!r}"
    log(f"exactly the {n} expected notifications arrived (order: {'in order' if got == expected else got})")
    b_notifs.got.clear()
    b_notifs.expect_quiet(1.0, f"after {n} reposts")
    log(f"no notification #{n + 1} within 1 s")
    a.release_xfer_handle(h)


# --------------------------------------------------------------------------------------
# f. empty and binary notifications
# --------------------------------------------------------------------------------------

BINARY_PAYLOADS = [
    b"\x00",
    b"a\x00b",
    b"\xff",
    b"\xff\xfe\x00\x01\x7f\x80",
    bytes(range(256)),
    b"\x00" * 100 + b"\xff" * 100,
    bytes(np.random.default_rng(30).integers(0, 256, 4096, dtype=np.uint8)),
]


def sc_notif_bytes(args) -> None:
    a, b = new_agent("sender"), new_agent("listener")
    src, dst = pattern(64 * KiB, 31), filled(64 * KiB)
    register(a, src)
    register(b, dst)
    a.add_remote_agent(b.get_agent_metadata())
    b_notifs = Notifs(b)
    ld, rd = xfer_descs(a, src), xfer_descs(b, dst)

    # With transfers: one handle per payload, the payload given at creation.
    # (b"" cannot be sent this way: the 1.5.1 API treats an empty message as
    # "no notification".)
    for i, payload in enumerate(BINARY_PAYLOADS):
        dst[:] = 0
        h = a.initialize_xfer("WRITE", ld, rd, "listener", payload)
        post(a, h, f"WRITE with binary notif #{i}")
        b_notifs.expect("sender", [payload], f"transfer notif #{i} ({len(payload)} bytes)")
        assert same(src, dst)
        a.release_xfer_handle(h)
    log(f"{len(BINARY_PAYLOADS)} binary payloads intact via transfers")

    # A transfer without a message produces no notification.
    h = a.initialize_xfer("WRITE", ld, rd, "listener")
    post(a, h, "WRITE without notif")
    b_notifs.expect_quiet(0.5, "transfer without a notification message")
    a.release_xfer_handle(h)
    log("transfer without a message: no notification, as expected")

    # Standalone notifications (send_notif WITHOUT backend=: broken in 1.5.1).
    for i, payload in enumerate([b""] + BINARY_PAYLOADS + [b""]):
        a.send_notif("listener", payload)
        b_notifs.expect("sender", [payload], f"send_notif #{i} ({len(payload)} bytes)")
    log("empty and binary payloads intact via send_notif")

    # And many queued at once, arriving as a batch.
    burst = [b""] + [b"%d\x00\xff" % i for i in range(50)]
    for payload in burst:
        a.send_notif("listener", payload)
    b_notifs.expect("sender", burst, "burst of 51 send_notif")
    log("burst of 51 standalone notifications intact")


# --------------------------------------------------------------------------------------
# g. loopback
# --------------------------------------------------------------------------------------


def sc_loopback(args) -> None:
    size = 16 * MiB
    me = new_agent("self")
    src, mid, back = pattern(size, 40), filled(size), filled(size)
    register(me, src, mid, back)
    notifs = Notifs(me)
    # No add_remote_agent: in 1.5.1 loading one's own metadata is refused
    # (NIXL_ERR_INVALID_PARAM); naming oneself as the remote is the loopback API.
    h = me.initialize_xfer("WRITE", xfer_descs(me, src), xfer_descs(me, mid), "self", b"to-myself")
    post(me, h, "loopback WRITE")
    notifs.expect("self", [b"to-myself"], "loopback WRITE notification")
    assert same(src, mid), "loopback WRITE: data mismatch"
    log("loopback WRITE verified, notification received by the agent itself")

    # Prepped READ with the agent's own name on the remote side (vLLM's local copy).
    local_h = me.prep_xfer_dlist("NIXL_INIT_AGENT", [(addr(back), size, 0)], "DRAM")
    remote_h = me.prep_xfer_dlist("self", [(addr(mid), size, 0)], "DRAM")
    h2 = me.make_prepped_xfer("READ", local_h, [0], remote_h, [0], b"read-myself")
    post(me, h2, "loopback READ")
    notifs.expect("self", [b"read-myself"], "loopback READ notification")
    assert same(src, back), "loopback READ: data mismatch"
    log("loopback prepped READ verified")

    me.send_notif("self", b"\x00note to self\xff")
    notifs.expect("self", [b"\x00note to self\xff"], "send_notif to oneself")
    log("send_notif to oneself received")
    # Deliberately no explicit deregistration: the agent's destructor tears down
    # the registered regions and their loopback metadata itself.


# --------------------------------------------------------------------------------------
# h. four threads posting at once
# --------------------------------------------------------------------------------------


def sc_threads(args) -> None:
    nthreads, iters, size = 4, 10, 8 * MiB
    sync = {"default": None, "rw": nixl_thread_sync_t.NIXL_THREAD_SYNC_RW}[args.sync]
    a, b = new_agent("multi", sync=sync), new_agent("sink", sync=sync)
    a_bufs = [filled(size) for _ in range(nthreads)]
    b_bufs = [filled(size) for _ in range(nthreads)]
    register(a, *a_bufs)
    register(b, *b_bufs)
    a.add_remote_agent(b.get_agent_metadata())
    b_notifs = Notifs(b)
    barrier = threading.Barrier(nthreads, timeout=OP_TIMEOUT)
    errors: list[str] = []

    def worker(t: int) -> None:
        try:
            op = "WRITE" if t % 2 == 0 else "READ"
            src, dst = (a_bufs[t], b_bufs[t]) if op == "WRITE" else (b_bufs[t], a_bufs[t])
            barrier.wait()
            # Each thread creates its own handle, then reposts it.
            h = a.initialize_xfer(op, xfer_descs(a, a_bufs[t]), xfer_descs(b, b_bufs[t]), "sink")
            for k in range(iters):
                src[:] = (t * 16 + k) & 0xFF
                post(a, h, f"thread {t} {op} #{k}", b"t%d-%d" % (t, k))
                if not (dst == src[0]).all():
                    errors.append(f"thread {t} {op} #{k}: data mismatch")
                    return
            a.release_xfer_handle(h)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f"thread {t}: {type(e).__name__}: {e}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(nthreads)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    # Meanwhile the main thread collects notifications on the target.
    expected = [b"t%d-%d" % (t, k) for t in range(nthreads) for k in range(iters)]

    def finished_or_failed() -> bool:
        b_notifs.poll()
        return bool(errors) or len(b_notifs.got["multi"]) >= len(expected)

    wait_until(finished_or_failed, "all threads' notifications")
    deadline = time.monotonic() + OP_TIMEOUT
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, "; ".join(errors)
    got = b_notifs.got["multi"]
    assert Counter(got) == Counter(expected), f"notifications differ: {sorted(got)!r}"
    log(f"{nthreads} threads x {iters} posts of {size // MiB} MiB (WRITE and READ) verified in "
        f"{time.perf_counter() - t0:.2f}s, {len(got)} notifications")


# --------------------------------------------------------------------------------------
# i. releasing a handle while its transfer is in flight
# --------------------------------------------------------------------------------------


def sc_release_inflight(args) -> None:
    size = args.size_mib * MiB
    a, b = new_agent("canceller"), new_agent("far")
    a_big, b_big = pattern(size, 50), filled(size)
    a_small, b_small = pattern(4 * MiB, 51), filled(4 * MiB)
    register(a, a_big, a_small)
    register(b, b_big, b_small)
    a.add_remote_agent(b.get_agent_metadata())
    b_notifs = Notifs(b)

    h = a.initialize_xfer(args.op, xfer_descs(a, a_big), xfer_descs(b, b_big), "far", b"big")
    state = a.transfer(h)
    assert state in ("DONE", "PROC"), f"transfer() returned {state!r}"
    try:
        a.release_xfer_handle(h)
        log(f"release right after posting (state was {state}) succeeded: "
            f"{'finished inline' if state == 'DONE' else 'cancelled or finished'}")
    except Exception as e:  # noqa: BLE001 - checked below
        assert is_nixl_error(e), f"release raised a non-NIXL error: {e!r}"
        log(f"release refused while in flight ({type(e).__name__}: {e}); waiting for it")
        box = ["PROC"]

        def settled() -> bool:
            box[0] = a.check_xfer_state(h)
            return box[0] != "PROC"

        wait_until(settled, "the refused transfer to settle")
        log(f"transfer settled in state {box[0]}; releasing again")
        a.release_xfer_handle(h)
    assert h._released, "handle still not released"

    # The agent keeps working: a fresh transfer with its own notification.
    # (The big transfer's b"big" may or may not have been delivered.)
    h2 = a.initialize_xfer(args.op, xfer_descs(a, a_small), xfer_descs(b, b_small), "far",
                           b"after-release")
    post(a, h2, "transfer after the release")
    b_notifs.wait_for("canceller", b"after-release", "the post-release notification")
    got = b_notifs.got["canceller"]
    assert got.count(b"after-release") == 1 and got.count(b"big") <= 1, (
        f"unexpected notifications: {got!r}")
    log(f"notifications at the target: {got!r}")
    src, dst = (a_small, b_small) if args.op == "WRITE" else (b_small, a_small)
    assert same(src, dst), "transfer after the release: data mismatch"
    log("transfer after the release verified; the agent still works")
    a.release_xfer_handle(h2)


# --------------------------------------------------------------------------------------
# Extra: metadata arriving in pieces, and a remote forgotten then re-added
# --------------------------------------------------------------------------------------


def sc_metadata(args) -> None:
    size = 4 * MiB
    a, b = new_agent("md-A"), new_agent("md-B")
    src = pattern(size, 70)
    first, second = filled(size), filled(size)
    register(a, src)
    register(b, first)
    a.add_remote_agent(b.get_agent_metadata())
    b_notifs = Notifs(b)

    # B registers more memory after A loaded its metadata, and sends only the
    # new region's part (no connection info): A's backend gets loadRemoteMD for
    # it on an already-known remote.
    second_reg = register(b, second)
    assert not a.check_remote_metadata("md-B", xfer_descs(a, second)), "region known too early"
    a.add_remote_agent(b.get_partial_agent_metadata(second_reg, False))
    assert a.check_remote_metadata("md-B", xfer_descs(a, second)), "partial metadata not loaded"
    h = a.initialize_xfer("WRITE", xfer_descs(a, src), xfer_descs(b, second), "md-B", b"partial")
    post(a, h, "WRITE into a region known from partial metadata")
    b_notifs.expect("md-A", [b"partial"], "partial-metadata WRITE")
    assert same(src, second)
    a.release_xfer_handle(h)
    log("WRITE into a region announced by partial metadata verified")

    # Forget B entirely (its descriptors unloaded, disconnected), then load it again.
    a.remove_remote_agent("md-B")
    assert not a.check_remote_metadata("md-B"), "remote still known after remove_remote_agent"
    a.add_remote_agent(b.get_agent_metadata())
    first[:] = 0
    h = a.initialize_xfer("WRITE", xfer_descs(a, src), xfer_descs(b, first), "md-B", b"again")
    post(a, h, "WRITE after removing and re-adding the remote")
    b_notifs.expect("md-A", [b"again"], "WRITE after re-adding")
    assert same(src, first)
    a.release_xfer_handle(h)
    log("remove_remote_agent + add_remote_agent again: WRITE verified")


# --------------------------------------------------------------------------------------
# Extra: two processes (the cross-process transport, not an in-process shortcut)
# --------------------------------------------------------------------------------------


class Channel:
    """JSON lines over a pair of pipes, with bounded receives."""

    def __init__(self, rfile, wfile):
        self.wfile = wfile
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, args=(rfile,), daemon=True).start()

    def _reader(self, rfile) -> None:
        for line in rfile:
            self.q.put(json.loads(line))
        self.q.put(None)  # EOF

    def send(self, **msg) -> None:
        self.wfile.write(json.dumps(msg) + "\n")
        self.wfile.flush()

    def recv(self, timeout: float = OP_TIMEOUT) -> dict:
        try:
            msg = self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message from the peer process within {timeout:.0f}s") from None
        if msg is None:
            raise EOFError("peer process closed the channel (did it crash?)")
        return msg


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def twoproc_target(chan: Channel, size: int) -> None:
    """Registers two buffers, publishes metadata, then checks what it is told to."""
    t = new_agent("tp-target")
    wbuf, rbuf = filled(size), pattern(size, 60)
    register(t, wbuf, rbuf)
    notifs = Notifs(t)
    chan.send(md=b64(t.get_agent_metadata()), wbuf=[addr(wbuf), size], rbuf=[addr(rbuf), size],
              rbuf_sha=sha256(rbuf))
    bufs = {"wbuf": wbuf}
    while True:
        msg = chan.recv()
        if msg["cmd"] == "quit":
            break
        try:
            expected = [unb64(x) for x in msg["notifs"]]
            notifs.expect(msg["sender"], expected, msg["what"])
            if msg.get("buf"):
                got = sha256(bufs[msg["buf"]])
                assert got == msg["sha"], f"{msg['what']}: buffer checksum mismatch"
            chan.send(ok=True)
            log(f"target: {msg['what']} checked")
        except Exception as e:  # noqa: BLE001 - reported to the initiator
            chan.send(ok=False, error=f"{type(e).__name__}: {e}")


def twoproc_initiator(chan: Channel, size: int) -> None:
    i = new_agent("tp-initiator")
    hello = chan.recv()
    assert i.add_remote_agent(unb64(hello["md"])) in ("tp-target", b"tp-target")
    src, dst = pattern(size, 61), filled(size)
    register(i, src, dst)

    def check(what: str, notifs: list[bytes], buf: str = "", sha: str = "") -> None:
        chan.send(cmd="check", what=what, sender="tp-initiator",
                  notifs=[b64(n) for n in notifs], buf=buf, sha=sha)
        reply = chan.recv()
        assert reply["ok"], f"target reports: {reply.get('error')}"

    w = i.initialize_xfer("WRITE", xfer_descs(i, src),
                          i.get_xfer_descs([(*hello["wbuf"], 0)], "DRAM"), "tp-target",
                          b"tp-write")
    log("initiator: WRITE", rate(size, post(i, w, "cross-process WRITE")))
    check("cross-process WRITE", [b"tp-write"], "wbuf", sha256(src))

    r = i.initialize_xfer("READ", xfer_descs(i, dst),
                          i.get_xfer_descs([(*hello["rbuf"], 0)], "DRAM"), "tp-target",
                          b"tp-read\x00")
    log("initiator: READ", rate(size, post(i, r, "cross-process READ")))
    assert sha256(dst) == hello["rbuf_sha"], "cross-process READ: data mismatch"
    check("cross-process READ", [b"tp-read\x00"])

    i.send_notif("tp-target", b"\x00cross\xff")
    check("cross-process send_notif", [b"\x00cross\xff"])
    chan.send(cmd="quit")
    i.release_xfer_handle(w)
    i.release_xfer_handle(r)


def sc_idle_cpu(args) -> None:
    """Two connected agents with progress threads, idle: measure this process's CPU.

    NIXL's UCX backend spins a core per agent here; ours must sleep (well under
    1 % of one core for both agents together).
    """
    a, b = new_agent("idle-a", prog_thread=True), new_agent("idle-b", prog_thread=True)
    src, dst = filled(MiB, 7), filled(MiB)
    register(a, src)
    register(b, dst)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer("WRITE", xfer_descs(a, src), xfer_descs(b, dst), "idle-b", b"warm")
    a.transfer(h)
    wait_until(lambda: a.check_xfer_state(h) == "DONE", "the warm-up transfer")
    assert same(src, dst)
    a.release_xfer_handle(h)
    time.sleep(0.5)  # let any start-up work settle before measuring
    before_cpu, before_wall = time.process_time(), time.monotonic()
    time.sleep(args.seconds)  # the measurement window itself, not a synchronisation
    cpu, wall = time.process_time() - before_cpu, time.monotonic() - before_wall
    percent = 100.0 * cpu / wall
    log(f"idle CPU of two agents with progress threads: {percent:.3f} % of one core "
        f"({cpu * 1000:.1f} ms CPU in {wall:.2f} s)")
    assert percent < args.max_percent, f"idle agents used {percent:.2f} % of a core"


def sc_two_process(args) -> None:
    """This process takes one role, a child process the other."""
    size = args.size_mib * MiB
    child_role = "target" if args.initiator == "parent" else "initiator"
    cmd = [sys.executable, os.path.abspath(__file__), "_twoproc_peer", "--role", child_role,
           "--size-mib", str(args.size_mib)]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        chan = Channel(child.stdout, child.stdin)
        if args.initiator == "parent":
            twoproc_initiator(chan, size)
        else:
            twoproc_target(chan, size)
        rc = child.wait(timeout=OP_TIMEOUT)
        assert rc == 0, f"peer process exited with {rc}"
        log(f"two processes: parent was the {'initiator' if args.initiator == 'parent' else 'target'}, "
            f"peer exited cleanly")
    finally:
        if child.poll() is None:
            child.kill()  # only our own child, on failure
            child.wait(timeout=OP_TIMEOUT)


def sc_twoproc_peer(args) -> None:
    chan = Channel(sys.stdin, _CHANNEL_OUT)
    if args.role == "target":
        twoproc_target(chan, args.size_mib * MiB)
    else:
        twoproc_initiator(chan, args.size_mib * MiB)


# --------------------------------------------------------------------------------------
# Cross-process scenarios: the initiator is this process, the target a peer process
# (this file's _xp_target command) that this process spawns, talks to over a
# message channel (its stdin/stdout), and always reaps (killing it on failure).
# --------------------------------------------------------------------------------------


def backend_params(protocol: str) -> dict:
    """create_backend options for `protocol` (only our plugin knows the option)."""
    return {"protocol": protocol} if BACKEND == "Mooncake" else {}


def new_agent_with(name: str, protocol: str, **kw) -> nixl_agent:
    """An agent whose backend is created by create_backend(BACKEND, {protocol: ...})."""
    agent = new_agent(name, create=False, **kw)
    agent.create_backend(BACKEND, backend_params(protocol))
    assert BACKEND in agent.backends, f"agent {name!r}: backend {BACKEND!r} was not created"
    return agent


class TargetProcess:
    """A target agent in a peer process.

    `bufs` lists the buffers it registers: {"name", "size"} and either "seed"
    (fast_pattern contents) or "fill" (a byte value, default 0).  `env` changes
    its environment from ours (a value of None removes that variable).
    """

    def __init__(self, name: str, protocol: str, bufs: list[dict], prog_thread: bool = True,
                 env: Optional[dict] = None):
        self.name = name
        self.sizes = {b["name"]: b["size"] for b in bufs}
        cmd = [sys.executable, os.path.abspath(__file__), "_xp_target"]
        penv = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                penv.pop(key, None)
            else:
                penv[key] = value
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=penv)
        try:
            self.chan = Channel(self.proc.stdout, self.proc.stdin)
            hello = self.request("setup", name=name, protocol=protocol, bufs=bufs,
                                 prog_thread=prog_thread)
        except BaseException:
            self.cleanup()
            raise
        self.md = unb64(hello["md"])
        self.pid = hello["pid"]
        self.addrs: dict[str, int] = hello["bufs"]
        log(f"target {name!r} is process {self.pid}, protocol={protocol}, "
            f"progress thread {'on' if prog_thread else 'off'}")

    def request(self, cmd: str, timeout: float = OP_TIMEOUT, **fields) -> dict:
        """Sends a command and waits for its answer; the target's failure fails us."""
        self.chan.send(cmd=cmd, **fields)
        reply = self.chan.recv(timeout)
        assert reply.get("ok"), f"target {self.name!r}, command {cmd!r}: {reply.get('error')}"
        return reply

    def check(self, what: str, sender: str, notifs: Optional[list[bytes]] = None,
              data: tuple = ()) -> None:
        """The target checks that exactly `notifs` arrived from `sender` (None: skip)
        and, for each (buf, offset, length, sha256) of `data`, its memory."""
        self.request("check", what=what, sender=sender,
                     notifs=None if notifs is None else [b64(n) for n in notifs],
                     data=[list(d) for d in data])

    def descs(self, agent: nixl_agent, buf: str, offset: int = 0, length: Optional[int] = None):
        """Transfer descriptors of one of the target's buffers (or a part of it)."""
        size = length if length is not None else self.sizes[buf] - offset
        return agent.get_xfer_descs([(self.addrs[buf] + offset, size, 0)], "DRAM")

    def quit(self) -> None:
        """Clean exit: the target answers, then must exit with status 0."""
        self.request("quit")
        rc = self.proc.wait(timeout=OP_TIMEOUT)
        assert rc == 0, f"target {self.name!r} exited with {rc}"

    def kill(self) -> float:
        """SIGKILLs the target; returns time.monotonic() right after the signal."""
        os.kill(self.proc.pid, signal.SIGKILL)
        t = time.monotonic()
        self.proc.wait(timeout=OP_TIMEOUT)
        return t

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # only our own child, on failure
            self.proc.wait(timeout=OP_TIMEOUT)


@contextlib.contextmanager
def target_process(name: str, protocol: str, bufs: list[dict], prog_thread: bool = True,
                   env: Optional[dict] = None):
    """A TargetProcess that is always reaped (killed if still running on the way out)."""
    t = TargetProcess(name, protocol, bufs, prog_thread, env)
    try:
        yield t
    finally:
        t.cleanup()


def sc_xp_target(args) -> None:
    """The peer side: one target agent, driven by commands on the channel.

    Commands: setup, check (notifications and memory), quiet (no notification
    for a while), idle (no NIXL call at all until a deadline), quit.
    """
    chan = Channel(sys.stdin, _CHANNEL_OUT)
    setup = chan.recv()
    assert setup["cmd"] == "setup", setup
    agent = new_agent_with(setup["name"], setup["protocol"], prog_thread=setup["prog_thread"])
    bufs: dict[str, np.ndarray] = {}
    for spec in setup["bufs"]:
        bufs[spec["name"]] = (fast_pattern(spec["size"], spec["seed"]) if "seed" in spec
                              else filled(spec["size"], spec.get("fill", 0)))
    register(agent, *bufs.values())
    notifs = Notifs(agent)
    chan.send(ok=True, md=b64(agent.get_agent_metadata()), pid=os.getpid(),
              bufs={k: addr(v) for k, v in bufs.items()})
    while True:
        msg = chan.recv()
        cmd = msg["cmd"]
        if cmd == "quit":
            chan.send(ok=True)
            return
        if cmd == "idle":
            # From here until the deadline this process makes no NIXL call: only
            # the plugin's own threads serve the initiator.
            until = time.monotonic() + msg["seconds"]
            chan.send(ok=True, until=until)
            while time.monotonic() < until:
                time.sleep(0.05)  # the point of the scenario, not a synchronisation
            log(f"target: idle for {msg['seconds']} s, no NIXL call made; awake again")
            continue
        try:
            if cmd == "check":
                if msg["notifs"] is not None:
                    notifs.expect(msg["sender"], [unb64(n) for n in msg["notifs"]], msg["what"])
                for buf, off, length, digest in msg["data"]:
                    got = sha256(bufs[buf][off:off + length])
                    assert got == digest, (f"{msg['what']}: buffer {buf!r} [{off}, +{length}) "
                                           f"differs from what the initiator expects")
                reply = {"woke": time.monotonic()}
            elif cmd == "quiet":
                notifs.expect_quiet(msg["seconds"], msg["what"])
                reply = {}
            elif cmd == "restart":
                # A new engine under the same name (as a restarted peer
                # process has): the old agent goes, its buffers are
                # registered again, the initiator loads the new metadata.
                del notifs
                del agent
                gc.collect()
                agent = new_agent_with(setup["name"], setup["protocol"],
                                       prog_thread=setup["prog_thread"])
                register(agent, *bufs.values())
                notifs = Notifs(agent)
                reply = {"md": b64(agent.get_agent_metadata())}
            elif cmd == "digest":
                reply = {"sha": sha256(bufs[msg["buf"]])}
            elif cmd == "fake_nic":
                # The fake verbs library's counters in this process.
                lib = ctypes.CDLL(os.environ["NIXL_MOONCAKE_IBVERBS_LIB"])
                lib.fake_ibv_bytes.restype = ctypes.c_uint64
                reply = {"qps": lib.fake_ibv_live_qps(), "mrs": lib.fake_ibv_live_mrs(),
                         "served": {d: lib.fake_ibv_bytes(d.encode(), 1)
                                    for d in ("fake_mlx5_0", "fake_mlx5_1")}}
            elif cmd == "deregister":
                # deregisterMem of one buffer; the memory stays ours and is
                # reused for something else right away.
                buf = bufs[msg["buf"]]
                agent.deregister_memory(agent.get_reg_descs([(addr(buf), buf.nbytes, 0, "")],
                                                            "DRAM"))
                buf[:] = msg["refill"]
                reply = {}
            else:
                raise ValueError(f"unknown command {cmd!r}")
            log(f"target: {cmd} {msg.get('what', '')!r} ok")
            chan.send(ok=True, **reply)
        except Exception as e:  # noqa: BLE001 - reported to the initiator
            chan.send(ok=False, error=f"{type(e).__name__}: {e}")


# a. several hundred MiB in blocks of 4 KiB to 64 MiB ---------------------------------

# (block size, blocks): 192 MiB per direction.
BULK_GROUPS = [(4 * KiB, 2048), (64 * KiB, 128), (MiB, 16), (16 * MiB, 2), (64 * MiB, 2)]


def sc_xp_bulk(args) -> None:
    """WRITE per block size (one transfer each), then one READ of every block at once
    (mixed sizes, shuffled order); remote blocks permuted against local ones."""
    proto = args.protocol
    total = sum(b * n for b, n in BULK_GROUPS)
    rng = np.random.default_rng(80)
    layout = []  # (block, count, offset, perm): local block i <-> remote block perm[i]
    off = 0
    for block, n in BULK_GROUPS:
        perm = rng.permutation(n)
        if n > 1 and (perm == np.arange(n)).all():
            perm = np.roll(perm, 1)
        layout.append((block, n, off, perm))
        off += block * n
    bufs = [{"name": "w", "size": total}, {"name": "r", "size": total, "seed": 81}]
    with target_process("xp-bulk-target", proto, bufs) as tgt:
        ini = new_agent_with("xp-bulk-init", proto)
        src, dst = fast_pattern(total, 82), filled(total)
        register(ini, src, dst)
        ini.add_remote_agent(tgt.md)

        expected_w, notifs = [], []
        t_all = time.perf_counter()
        for g, (block, n, off, perm) in enumerate(layout):
            local = block_table(addr(src) + off, n, block, block)
            remote = desc_table(tgt.addrs["w"] + off + perm.astype(np.uint64) * np.uint64(block),
                                block)
            msg = b"bulk-w-%d" % g
            h = ini.initialize_xfer("WRITE", ini.get_xfer_descs(local, "DRAM"),
                                    ini.get_xfer_descs(remote, "DRAM"), tgt.name, msg)
            dt = post(ini, h, f"WRITE of {n} x {block // KiB} KiB")
            log(f"WRITE {n} x {block // KiB} KiB blocks:", rate(n * block, dt))
            ini.release_xfer_handle(h)
            notifs.append(msg)
            # Remote block perm[i] holds local block i.
            view = src[off:off + n * block].reshape(n, block)
            image = np.ascontiguousarray(view[np.argsort(perm)])
            expected_w.append(("w", off, n * block, sha256(image)))
        tgt.check("WRITEs of 4 KiB to 64 MiB blocks", "xp-bulk-init", notifs, tuple(expected_w))
        log(f"target verified {total // MiB} MiB written in {len(layout)} transfers")

        local_rows, remote_rows = [], []
        for block, n, off, perm in layout:
            local_rows.append(block_table(addr(dst) + off, n, block, block))
            remote_rows.append(desc_table(
                tgt.addrs["r"] + off + perm.astype(np.uint64) * np.uint64(block), block))
        order = rng.permutation(sum(len(t) for t in local_rows))
        local, remote = np.vstack(local_rows)[order], np.vstack(remote_rows)[order]
        h = ini.initialize_xfer("READ", ini.get_xfer_descs(local, "DRAM"),
                                ini.get_xfer_descs(remote, "DRAM"), tgt.name, b"bulk-read")
        dt = post(ini, h, f"READ of {len(order)} mixed blocks")
        log(f"READ of {len(order)} blocks of 4 KiB to 64 MiB in one transfer:", rate(total, dt))
        ini.release_xfer_handle(h)
        tgt.check("mixed READ notification", "xp-bulk-init", [b"bulk-read"])
        remote_src = fast_pattern(total, 81)  # what the target holds in "r"
        for block, n, off, perm in layout:
            got = dst[off:off + n * block].reshape(n, block)
            want = remote_src[off:off + n * block].reshape(n, block)[perm]
            assert (got == want).all(), f"READ: {block // KiB} KiB blocks differ"
        log(f"READ data verified; {2 * total // MiB} MiB moved and verified in "
            f"{time.perf_counter() - t_all:.2f}s")
        tgt.quit()


# b. vLLM-style prepped READ of 20,000 non-contiguous blocks ----------------------------


def sc_xp_prepped(args) -> None:
    proto = args.protocol
    nsel, total, block = args.blocks, args.blocks + args.blocks // 5, 4 * KiB
    r_stride, l_stride = block + 1 * KiB, block + 2 * KiB  # gaps differ per side
    bufs = [{"name": "kv", "size": total * r_stride, "seed": 90}]
    with target_process("xp-prefill", proto, bufs) as tgt:
        a = new_agent_with("xp-decode", proto)  # initiator, like vLLM's decode worker
        local = filled(total * l_stride, 0xAA)
        register(a, local)
        a.add_remote_agent(tgt.md)
        local_h = a.prep_xfer_dlist("NIXL_INIT_AGENT", block_table(local, total, block, l_stride),
                                    "DRAM")
        remote_h = a.prep_xfer_dlist(
            tgt.name, block_table(tgt.addrs["kv"], total, block, r_stride), "DRAM")
        rng = np.random.default_rng(91)
        ridx = rng.permutation(total)[:nsel].astype(np.int32)
        lidx = rng.permutation(total)[:nsel].astype(np.int32)
        notif = b"req-0000:tp1"
        h = a.make_prepped_xfer("READ", local_h, lidx, remote_h, ridx, notif)
        dt = post(a, h, f"prepped READ of {nsel} blocks")
        log(f"cross-process prepped READ of {nsel} x 4 KiB scattered blocks:",
            rate(nsel * block, dt))
        tgt.check("prepped READ notification", "xp-decode", [notif])
        log("notification checked on the target")

        remote = fast_pattern(total * r_stride, 90)  # what the target holds
        check_scattered_read(local, remote, total, block, l_stride, r_stride, lidx, ridx)

        # The same buffers as dense 4 KiB blocks, read in runs NIXL merges.
        dense = min(remote.nbytes, local.nbytes) // block
        check_merged_read(a, tgt.name, local, tgt.addrs["kv"], remote, dense, block,
                          lambda n: tgt.check("merged READ notification", "xp-decode", [n]))
        a.release_xfer_handle(h)
        for dl in (local_h, remote_h):
            a.release_dlist_handle(dl)
        tgt.quit()


# c. four threads of the initiator posting at once to one target ------------------------


def sc_xp_threads(args) -> None:
    proto = args.protocol
    nthreads, iters, size = 4, 8, 4 * MiB
    bufs = [{"name": f"slot{t}", "size": size} for t in range(nthreads)]
    with target_process("xp-sink", proto, bufs) as tgt:
        ini = new_agent_with("xp-multi", proto)
        bases = [fast_pattern(size, 100 + t) for t in range(nthreads)]
        srcs = [filled(size) for _ in range(nthreads)]
        backs = [filled(size) for _ in range(nthreads)]
        register(ini, *srcs, *backs)
        ini.add_remote_agent(tgt.md)
        barrier = threading.Barrier(nthreads, timeout=OP_TIMEOUT)
        errors: list[str] = []

        def worker(t: int) -> None:
            try:
                remote = tgt.descs(ini, f"slot{t}")
                barrier.wait()
                w = ini.initialize_xfer("WRITE", xfer_descs(ini, srcs[t]), remote, tgt.name)
                r = ini.initialize_xfer("READ", xfer_descs(ini, backs[t]), remote, tgt.name)
                for k in range(iters):
                    np.bitwise_xor(bases[t], k, out=srcs[t])
                    post(ini, w, f"thread {t} WRITE #{k}", b"t%d-%d-w" % (t, k))
                    post(ini, r, f"thread {t} READ #{k}", b"t%d-%d-r" % (t, k))
                    if not same(srcs[t], backs[t]):
                        errors.append(f"thread {t} #{k}: what was read back differs from "
                                      "what was written")
                        return
                ini.release_xfer_handle(w)
                ini.release_xfer_handle(r)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(f"thread {t}: {type(e).__name__}: {e}")
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(t,), daemon=True)
                   for t in range(nthreads)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        deadline = time.monotonic() + OP_TIMEOUT
        for th in threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), "a worker thread hung"
        assert not errors, "; ".join(errors)
        dt = time.perf_counter() - t0
        log(f"{nthreads} threads x {iters} x (WRITE + READ back) of {size // MiB} MiB verified:",
            rate(2 * nthreads * iters * size, dt))
        expected = [b"t%d-%d-%s" % (t, k, op) for t in range(nthreads) for k in range(iters)
                    for op in (b"w", b"r")]
        final = [(f"slot{t}", 0, size, sha256(srcs[t])) for t in range(nthreads)]
        tgt.check("four threads", "xp-multi", expected, tuple(final))
        log(f"target got all {len(expected)} notifications and the final contents of every slot")
        tgt.quit()


# d. a target that makes no NIXL call while it is served ---------------------------------


def sc_xp_idle_target(args) -> None:
    proto = args.protocol
    n, size = 4, 8 * MiB
    bufs = [{"name": "w", "size": n * size}, {"name": "r", "size": n * size, "seed": 110}]
    with target_process("xp-sleeper", proto, bufs, args.target_prog_thread == "on") as tgt:
        ini = new_agent_with("xp-busy", proto)
        src, dst = fast_pattern(n * size, 111), filled(n * size)
        register(ini, src, dst)
        ini.add_remote_agent(tgt.md)
        until = tgt.request("idle", seconds=args.seconds)["until"]
        # Nothing connected yet (the plugin connects on the first post): the
        # handshake, too, happens while the target sleeps.
        log(f"target idle for {args.seconds} s from now; connecting and transferring meanwhile")
        t0 = time.monotonic()
        notifs = []
        for i in range(n):
            part = src[i * size:(i + 1) * size]
            h = ini.initialize_xfer("WRITE", xfer_descs(ini, part),
                                    tgt.descs(ini, "w", i * size, size), tgt.name, b"idle-w-%d" % i)
            post(ini, h, f"WRITE #{i} to the idle target")
            ini.release_xfer_handle(h)
            notifs.append(b"idle-w-%d" % i)
            part = dst[i * size:(i + 1) * size]
            h = ini.initialize_xfer("READ", xfer_descs(ini, part),
                                    tgt.descs(ini, "r", i * size, size), tgt.name, b"idle-r-%d" % i)
            post(ini, h, f"READ #{i} from the idle target")
            ini.release_xfer_handle(h)
            notifs.append(b"idle-r-%d" % i)
        ini.send_notif(tgt.name, b"idle-standalone\x00")
        notifs.append(b"idle-standalone\x00")
        done = time.monotonic()
        log(f"{n} WRITEs and {n} READs of {size // MiB} MiB completed in {done - t0:.2f}s, "
            f"{until - done:.2f}s before the target woke up")
        assert done < until - 0.1, (
            f"the transfers ended {done - until:+.2f}s from the target's wake-up: inconclusive "
            "(raise --seconds)")
        assert same(dst, fast_pattern(n * size, 110)), "READ from the idle target: data mismatch"
        woke = tgt.request("check", what="after the idle period", sender="xp-busy",
                           notifs=[b64(m) for m in notifs],
                           data=[["w", 0, n * size, sha256(src)]])["woke"]
        assert woke >= until, "the target answered before its idle period ended"
        log("READ data verified here; WRITE data and all notifications verified by the target "
            "after its idle period")
        tgt.quit()


# e. SIGKILL of the target mid-transfer, then a new target of the same name ---------------


def round_trip(ini: nixl_agent, tgt: TargetProcess, rnd: int, src: np.ndarray, dst: np.ndarray,
               remote_r: np.ndarray, sender: str) -> None:
    """Round `rnd` of a kill scenario starts with a verified transfer each way: `src` WRITTEN to
    the start of the target's "w", the start of its "r" (which holds `remote_r`) READ into `dst`,
    each with a notification; the target checks the data and both notifications from `sender`."""
    n = src.nbytes
    h = ini.initialize_xfer("WRITE", xfer_descs(ini, src), tgt.descs(ini, "w", 0, n), tgt.name,
                            b"hello-w-%d" % rnd)
    post(ini, h, f"round {rnd}: WRITE")
    ini.release_xfer_handle(h)
    dst[:] = 0
    h = ini.initialize_xfer("READ", xfer_descs(ini, dst), tgt.descs(ini, "r", 0, n), tgt.name,
                            b"hello-r-%d" % rnd)
    post(ini, h, f"round {rnd}: READ")
    ini.release_xfer_handle(h)
    assert same(dst, remote_r), f"round {rnd}: READ data mismatch"
    tgt.check(f"round {rnd}: first transfers", sender,
              [b"hello-w-%d" % rnd, b"hello-r-%d" % rnd], (("w", 0, n, sha256(src)),))
    log(f"round {rnd}: target process {tgt.pid}: WRITE and READ of {n // MiB} MiB verified")


def sc_xp_kill_target(args) -> None:
    proto = args.protocol
    big, small = args.size_mib * MiB, 8 * MiB
    name = "xp-victim"
    ini = new_agent_with("xp-survivor", proto)
    src, dst = fast_pattern(big, 120), filled(big)
    register(ini, src, dst)
    bufs = [{"name": "w", "size": big}, {"name": "r", "size": big, "seed": 121}]
    remote_r = fast_pattern(small, 121)  # the start of what every target holds in "r"
    rounds = args.kill_ops + ["none"]
    for rnd, kill_op in enumerate(rounds):
        with target_process(name, proto, bufs) as tgt:
            loaded = ini.add_remote_agent(tgt.md)
            assert loaded in (name, name.encode()), loaded
            # A verified transfer each way first (after a kill: to the new process).
            round_trip(ini, tgt, rnd, src[:small], dst[:small], remote_r[:small], "xp-survivor")
            if kill_op == "none":
                tgt.quit()
                break

            local, remote = (src, "w") if kill_op == "WRITE" else (dst, "r")
            h = ini.initialize_xfer(kill_op, xfer_descs(ini, local), tgt.descs(ini, remote), name,
                                    b"never-mind")
            for _ in range(20):  # until one post is really in flight
                state = ini.transfer(h)
                if state != "DONE":
                    break
            assert state in ("PROC", "DONE"), f"{kill_op}: transfer() returned {state!r}"
            if state == "DONE":  # a transport that finishes posts inline: kill between posts
                log(f"round {rnd}: every post of the {kill_op} finished inline; the kill lands "
                    "between posts and the next repost must fail")
            t_kill = tgt.kill()
            seen = {"failure": "", "reposts": 0}

            def failed() -> bool:
                try:
                    state = ini.check_xfer_state(h)
                    if state == "DONE":  # it had finished before the kill took effect
                        seen["reposts"] += 1
                        state = ini.transfer(h)
                except Exception as e:  # noqa: BLE001 - checked here
                    assert is_nixl_error(e), f"a non-NIXL error: {e!r}"
                    seen["failure"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
                    return True
                if state == "ERR":
                    seen["failure"] = "state 'ERR'"
                return state == "ERR"

            wait_until(failed, f"the initiator to notice that the target was killed ({kill_op})")
            elapsed = time.monotonic() - t_kill
            log(f"round {rnd}: SIGKILL of the target during a {big // MiB} MiB {kill_op}: first "
                f"failed check after {elapsed * 1e3:.1f} ms ({seen['reposts']} repost(s)): "
                f"{seen['failure']}")
            print(f"KILL-TO-FAILURE {kill_op} {elapsed * 1e3:.1f} ms", flush=True)
            assert elapsed < 1.0, f"the dead target was noticed only after {elapsed:.3f}s"
            try:
                ini.release_xfer_handle(h)
            except Exception as e:  # noqa: BLE001 - reported
                raise AssertionError(f"releasing the failed handle: {type(e).__name__}: {e}") from e
            # NIXL 1.5.1 keeps the dead agent's metadata after check_xfer_state raised,
            # and refuses different metadata under a known name (NIXL_ERR_NOT_ALLOWED,
            # in the agent itself): forget the dead process first, as a deployment
            # that restarts a worker under the same name must.
            known = ini.check_remote_metadata(name)
            log(f"round {rnd}: after the failure NIXL {'still' if known else 'no longer'} holds "
                f"{name!r}'s metadata{'; removing it' if known else ''}")
            if known:
                ini.remove_remote_agent(name)
    log(f"{len(rounds) - 1} target(s) killed mid-transfer; every new target process served "
        "verified transfers")


# f. empty and binary notifications across processes -------------------------------------


def sc_xp_notif_bytes(args) -> None:
    proto = args.protocol
    size = 64 * KiB
    bufs = [{"name": "dst", "size": size}, {"name": "src", "size": size, "seed": 130}]
    with target_process("xp-listener", proto, bufs) as tgt:
        a = new_agent_with("xp-sender", proto)
        base, src, back = pattern(size, 131), filled(size), filled(size)
        register(a, src, back)
        a.add_remote_agent(tgt.md)
        remote_src = fast_pattern(size, 130)  # what the target holds in "src"
        # With transfers (WRITE and READ): the payload given at creation. (b"" means
        # "no notification" in the 1.5.1 API, so empty ones go by send_notif only.)
        for i, payload in enumerate(BINARY_PAYLOADS):
            if i % 2 == 0:
                np.bitwise_xor(base, i, out=src)
                h = a.initialize_xfer("WRITE", xfer_descs(a, src), tgt.descs(a, "dst"), tgt.name,
                                      payload)
                post(a, h, f"WRITE with binary notif #{i}")
                tgt.check(f"WRITE notif #{i} ({len(payload)} bytes)", "xp-sender", [payload],
                          (("dst", 0, size, sha256(src)),))
            else:
                back[:] = 0
                h = a.initialize_xfer("READ", xfer_descs(a, back), tgt.descs(a, "src"), tgt.name,
                                      payload)
                post(a, h, f"READ with binary notif #{i}")
                assert same(back, remote_src), f"READ #{i}: data mismatch"
                tgt.check(f"READ notif #{i} ({len(payload)} bytes)", "xp-sender", [payload])
            a.release_xfer_handle(h)
        log(f"{len(BINARY_PAYLOADS)} binary payloads intact via cross-process WRITEs and READs")

        h = a.initialize_xfer("WRITE", xfer_descs(a, src), tgt.descs(a, "dst"), tgt.name)
        post(a, h, "WRITE without notif")
        a.release_xfer_handle(h)
        tgt.request("quiet", seconds=0.5, what="transfer without a notification message")
        log("transfer without a message: no notification, as expected")

        for i, payload in enumerate([b""] + BINARY_PAYLOADS + [b""]):
            a.send_notif(tgt.name, payload)
            tgt.check(f"send_notif #{i} ({len(payload)} bytes)", "xp-sender", [payload])
        log("empty and binary payloads intact via cross-process send_notif")

        burst = [b""] + [b"%d\x00\xff" % i for i in range(50)] + [b""]
        for payload in burst:
            a.send_notif(tgt.name, payload)
        tgt.check("burst of 52 send_notif", "xp-sender", burst)
        log("burst of 52 standalone notifications (2 empty) intact across processes")
        tgt.quit()


# g.-j. the same-host transport (cross-memory attach) ------------------------------------
#
# The plugin logs at INFO which transport it picked for a peer, and why, when it
# loads the peer's connection info (add_remote_agent): "agent A reaches agent B by
# cross-memory attach (pid N on this host) (...)" or "... by TCP to ADDR (...)".
# The tests run these scenarios with NIXL_LOG_LEVEL=DEBUG and the
# initiator's own output (fds 1 and 2, not the target's) is captured around the
# call to check that line.

CMA_PROBE_ENV = "NIXL_MOONCAKE_CMA_PROBE"  # "fail": this process's probes of peers fail
ROUTES = {"cma": "by cross-memory attach", "tcp": "by TCP to ", "rdma": "by RDMA ("}


def replay(what: str, text: str) -> None:
    """Shows captured native output in the scenario's log."""
    for line in text.splitlines():
        log(f"  [{what}] {line}")


def add_remote_expecting(agent: nixl_agent, tgt: TargetProcess, route: Optional[str]) -> str:
    """add_remote_agent(tgt.md), then checks from the plugin's INFO line which
    transport it picked for the target ("cma", "tcp"; None: no check).  Returns
    what the plugin printed meanwhile."""
    with capture_fds() as cap:
        loaded = agent.add_remote_agent(tgt.md)
    text = cap["text"]
    replay("add_remote_agent", text)
    assert loaded in (tgt.name, tgt.name.encode()), loaded
    if route is None:
        return text
    picked = [line for line in text.splitlines() if "INFO" in line and tgt.name in line
              and "reaches agent" in line and any(phrase in line for phrase in ROUTES.values())]
    assert len(picked) == 1, (
        f"expected one INFO line naming the transport picked for {tgt.name!r}, got {picked!r} "
        "(the plugin logs it with NIXL_LOG_LEVEL=INFO or DEBUG, as the tests set)")
    assert ROUTES[route] in picked[0], (
        f"the plugin did not pick {route} for {tgt.name!r} (process {tgt.pid}): {picked[0]!r}")
    if route == "cma":
        assert f"pid {tgt.pid}" in picked[0], f"CMA to another process than {tgt.pid}: {picked[0]!r}"
    log(f"transport for {tgt.name!r} (process {tgt.pid}): {route}")
    return text


def guards(buf: str, off: int, length: int, fill: int, guard: int) -> tuple:
    """check() entries: `guard` bytes of `fill` just before and just after [off, off+length)."""
    digest = sha256(filled(guard, fill))
    return ((buf, off - guard, guard, digest), (buf, off + length, guard, digest))


# g. 1 byte to 64 MiB at unaligned addresses on both sides ------------------------------

UNALIGNED_SIZES = [1, 3, 4095, 4097, MiB + 1, 64 * MiB]
UNALIGNED_OFFSETS = [(1, 3), (3, 7), (7, 1)]  # (local, remote) bytes past a 4 KiB slot start
GUARD = 64  # bytes checked untouched on each side of every destination range
W_FILL, R_FILL = 0x5A, 0xA5  # what the target's and the initiator's destinations hold


def sc_xp_unaligned(args) -> None:
    proto = args.protocol
    layout, base = [], 4 * KiB  # (size, local offset, remote offset); slots 4 KiB apart
    for i, n in enumerate(UNALIGNED_SIZES):
        lo, ro = UNALIGNED_OFFSETS[i % len(UNALIGNED_OFFSETS)]
        layout.append((n, base + lo, base + ro))
        base += -(-(n + 8 + GUARD) // (4 * KiB)) * 4 * KiB + 4 * KiB
    total = base
    bufs = [{"name": "w", "size": total, "fill": W_FILL}, {"name": "r", "size": total, "seed": 150}]
    with target_process("xp-odd-target", proto, bufs) as tgt:
        ini = new_agent_with("xp-odd-init", proto)
        src, dst = fast_pattern(total, 151), filled(total, R_FILL)
        register(ini, src, dst)
        add_remote_expecting(ini, tgt, "cma")
        remote_r = fast_pattern(total, 150)  # what the target holds in "r"
        w_image = filled(total, W_FILL)  # what "w" must hold in the end
        t_all = time.perf_counter()
        for i, (n, lo, ro) in enumerate(layout):
            for a, what in ((addr(src) + lo, "local"), (tgt.addrs["w"] + ro, "remote w"),
                            (addr(dst) + lo, "local dst"), (tgt.addrs["r"] + ro, "remote r")):
                assert a % 8, f"{what} address {a:#x} is 8-byte aligned"
            where = f"{n} B at local +{lo % (4 * KiB)}, remote +{ro % (4 * KiB)}"
            msg = b"odd-w-%d" % i
            h = ini.initialize_xfer("WRITE", xfer_descs(ini, src[lo:lo + n]),
                                    tgt.descs(ini, "w", ro, n), tgt.name, msg)
            dt = post(ini, h, f"WRITE of {where}")
            ini.release_xfer_handle(h)
            w_image[ro:ro + n] = src[lo:lo + n]
            tgt.check(f"WRITE of {where}", "xp-odd-init", [msg],
                      (("w", ro, n, sha256(src[lo:lo + n])), *guards("w", ro, n, W_FILL, GUARD)))
            msg = b"odd-r-%d" % i
            h = ini.initialize_xfer("READ", xfer_descs(ini, dst[lo:lo + n]),
                                    tgt.descs(ini, "r", ro, n), tgt.name, msg)
            dt_r = post(ini, h, f"READ of {where}")
            ini.release_xfer_handle(h)
            assert same(dst[lo:lo + n], remote_r[ro:ro + n]), f"READ of {where}: data mismatch"
            assert (dst[lo - GUARD:lo] == R_FILL).all(), f"READ of {where} wrote before its range"
            assert (dst[lo + n:lo + n + GUARD] == R_FILL).all(), (
                f"READ of {where} wrote after its range")
            tgt.check(f"READ of {where}", "xp-odd-init", [msg])
            log(f"{where}: WRITE {dt * 1e3:.2f} ms, READ {dt_r * 1e3:.2f} ms; data, "
                f"{GUARD} guard bytes each side and notifications verified")
        # Nothing else changed anywhere: the whole of both destinations.
        tgt.check("the whole of 'w' after every WRITE", "xp-odd-init", [],
                  (("w", 0, total, sha256(w_image)),))
        d_image = filled(total, R_FILL)
        for n, lo, ro in layout:
            d_image[lo:lo + n] = remote_r[ro:ro + n]
        assert same(dst, d_image), "READs changed bytes outside their ranges"
        log(f"{len(layout)} sizes from 1 byte to {UNALIGNED_SIZES[-1] // MiB} MiB each way at "
            f"unaligned addresses verified in {time.perf_counter() - t_all:.2f}s, both "
            "destinations whole")
        tgt.quit()


# h0. revocation: after deregisterMem returns, no peer touches the region ----------------


def sc_xp_revoke(args) -> None:
    """The target deregisters two regions (and reuses the memory); the
    initiator, whose transfers were prepared (and run) before, posts them
    again: both must fail with NIXL_ERR_NOT_ALLOWED, the WRITE must not land
    and the READ must not return the target's new bytes."""
    from nixl_cu12 import _bindings as nixl_bind

    proto, size = args.protocol, 4 * MiB
    bufs = [{"name": "w", "size": size, "fill": W_FILL}, {"name": "r", "size": size, "seed": 160}]
    with target_process("xp-revoke-target", proto, bufs) as tgt:
        ini = new_agent_with("xp-revoke-init", proto)
        src, dst = fast_pattern(size, 161), filled(size, R_FILL)
        register(ini, src, dst)
        add_remote_expecting(ini, tgt, proto if proto in ("tcp", "rdma") else "cma")
        hw = ini.initialize_xfer("WRITE", xfer_descs(ini, src), tgt.descs(ini, "w"), tgt.name)
        hr = ini.initialize_xfer("READ", xfer_descs(ini, dst), tgt.descs(ini, "r"), tgt.name)
        post(ini, hw, "WRITE before deregistration")
        post(ini, hr, "READ before deregistration")
        assert same(dst, fast_pattern(size, 160)), "READ before deregistration: data mismatch"
        tgt.check("WRITE before deregistration", "xp-revoke-init", None,
                  (("w", 0, size, sha256(src)),))
        dst[:] = R_FILL
        new_w, new_r = 0x11, 0x22
        tgt.request("deregister", buf="w", refill=new_w)
        tgt.request("deregister", buf="r", refill=new_r)
        log("target deregistered both regions and reused the memory")
        def status_of(call) -> str:
            # The bindings raise one exception class per nixl_status_t error.
            try:
                return {nixl_bind.NIXL_SUCCESS: "DONE", nixl_bind.NIXL_IN_PROG: "PROC"}[call()]
            except nixl_bind.nixlNotAllowedError:
                return "NOT_ALLOWED"
            except Exception as e:  # noqa: BLE001 - reported below
                return f"{type(e).__name__}: {e}"

        for op, h in (("WRITE", hw), ("READ", hr)):
            status = status_of(lambda: ini.agent.postXferReq(h._handle, b""))
            deadline = time.monotonic() + OP_TIMEOUT
            while status == "PROC":
                assert time.monotonic() < deadline, f"{op} after deregistration never finished"
                status = status_of(lambda: ini.agent.getXferStatus(h._handle))
            assert status == "NOT_ALLOWED", (
                f"{op} after the target's deregistration: {status}, expected NIXL_ERR_NOT_ALLOWED")
            log(f"{op} after deregistration: NIXL_ERR_NOT_ALLOWED")
            ini.release_xfer_handle(h)
        tgt.check("memory reused after deregistration is untouched", "xp-revoke-init", None,
                  (("w", 0, size, sha256(filled(size, new_w))),
                   ("r", 0, size, sha256(filled(size, new_r)))))
        assert not (dst == new_r).any(), "the READ after deregistration returned the target's bytes"
        assert (dst == R_FILL).all(), "the READ after deregistration changed local memory"
        log(f"protocol={proto}: neither the WRITE nor the READ touched the deregistered memory")
        tgt.quit()


# h. 100,000 descriptors in one transfer ---------------------------------------------------


def sc_xp_many_descs(args) -> None:
    """WRITE of N scattered 64-byte blocks (remote slots permuted), then READ of N
    blocks of 1 to 128 bytes at arbitrary offsets; one transfer each, no merging
    possible (initialize_xfer lists reach the backend unmerged anyway)."""
    proto = args.protocol
    n, block = args.descs, 64
    lstride, rstride = block + 16, block + 32  # gaps differ per side
    lbase, rbase = 3, 5  # unaligned starts
    slot = 160  # READ: one block of 1..128 bytes somewhere in each 160-byte slot
    w_size, r_size = rbase + n * rstride, n * slot
    bufs = [{"name": "w", "size": w_size, "fill": W_FILL}, {"name": "r", "size": r_size, "seed": 160}]
    rng = np.random.default_rng(161)
    with target_process("xp-many-target", proto, bufs) as tgt:
        ini = new_agent_with("xp-many-init", proto)
        src, dst = fast_pattern(lbase + n * lstride, 162), filled(r_size, R_FILL)
        register(ini, src, dst)
        add_remote_expecting(ini, tgt, "cma")

        perm = rng.permutation(n)
        local = block_table(addr(src) + lbase, n, block, lstride)
        remote = desc_table(tgt.addrs["w"] + rbase + perm.astype(np.uint64) * np.uint64(rstride),
                            block)
        t0 = time.perf_counter()
        h = ini.initialize_xfer("WRITE", ini.get_xfer_descs(local, "DRAM"),
                                ini.get_xfer_descs(remote, "DRAM"), tgt.name, b"many-w")
        t1 = time.perf_counter()
        dt = post(ini, h, f"WRITE of {n} x {block} B")
        ini.release_xfer_handle(h)
        log(f"WRITE of {n} scattered {block}-byte blocks in one transfer: prepared in "
            f"{(t1 - t0) * 1e3:.0f} ms, done in {dt * 1e3:.1f} ms")
        image = filled(w_size, W_FILL)
        rows = image[rbase:].reshape(n, rstride)
        rows[perm, :block] = src[lbase:].reshape(n, lstride)[:, :block]
        tgt.check(f"WRITE of {n} blocks (whole buffer, gaps included)", "xp-many-init",
                  [b"many-w"], (("w", 0, w_size, sha256(image)),))
        log("target verified its whole buffer: every block in its permuted slot, gaps untouched")

        lengths = rng.integers(1, 129, n)
        lstart = rng.permutation(n) * slot + rng.integers(0, slot - lengths + 1)
        rstart = rng.permutation(n) * slot + rng.integers(0, slot - lengths + 1)
        local = desc_table(addr(dst) + lstart.astype(np.uint64), 0)
        local[:, 1] = lengths
        remote = desc_table(tgt.addrs["r"] + rstart.astype(np.uint64), 0)
        remote[:, 1] = lengths
        t0 = time.perf_counter()
        h = ini.initialize_xfer("READ", ini.get_xfer_descs(local, "DRAM"),
                                ini.get_xfer_descs(remote, "DRAM"), tgt.name, b"many-r")
        t1 = time.perf_counter()
        dt = post(ini, h, f"READ of {n} mixed blocks")
        ini.release_xfer_handle(h)
        log(f"READ of {n} blocks of 1-128 bytes ({int(lengths.sum())} bytes) in one transfer: "
            f"prepared in {(t1 - t0) * 1e3:.0f} ms, done in {dt * 1e3:.1f} ms")
        tgt.check(f"READ of {n} blocks", "xp-many-init", [b"many-r"])
        # Byte i of block k: dst[lstart[k] + i] == remote[rstart[k] + i].
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        expected = filled(r_size, R_FILL)
        expected[np.repeat(lstart, lengths) + within] = \
            fast_pattern(r_size, 160)[np.repeat(rstart, lengths) + within]
        assert same(dst, expected), f"READ of {n} blocks: contents differ (or bytes outside them)"
        log("READ verified over the whole local buffer: every block, nothing outside them")
        tgt.quit()


# i. the probe forced to fail ----------------------------------------------------------------


def sc_xp_probe_fail(args) -> None:
    """NIXL_MOONCAKE_CMA_PROBE=fail in this process (which loads the target's metadata)
    only: auto falls back to TCP with one warning; cma accepts the metadata but
    refuses the first transfer (and a notification) with NIXL_ERR_NOT_SUPPORTED."""
    proto = args.protocol
    os.environ[CMA_PROBE_ENV] = "fail"  # no agent exists yet in this process
    size = 4 * MiB
    bufs = [{"name": "w", "size": size}, {"name": "r", "size": size, "seed": 170}]
    with target_process("xp-unprobed", proto, bufs, env={CMA_PROBE_ENV: None}) as tgt:
        ini = new_agent_with("xp-prober", proto)
        src, dst = fast_pattern(size, 171), filled(size)
        register(ini, src, dst)
        if proto == "auto":
            text = add_remote_expecting(ini, tgt, "tcp")
            with capture_fds() as cap:
                w = ini.initialize_xfer("WRITE", xfer_descs(ini, src), tgt.descs(ini, "w"),
                                        tgt.name, b"fallback-w")
                post(ini, w, "WRITE over the fallback")
                r = ini.initialize_xfer("READ", xfer_descs(ini, dst), tgt.descs(ini, "r"),
                                        tgt.name, b"fallback-r")
                post(ini, r, "READ over the fallback")
                post(ini, w, "WRITE over the fallback, reposted", b"fallback-w2")
            replay("transfers", cap["text"])
            warnings = [line for line in (text + cap["text"]).splitlines()
                        if "cross-memory attach is not possible" in line]
            assert len(warnings) == 1, f"expected one fallback warning, got {warnings!r}"
            assert "WARN" in warnings[0] and "using TCP" in warnings[0] and \
                CMA_PROBE_ENV in warnings[0], f"fallback warning: {warnings[0]!r}"
            log(f"fallback warning (once): {warnings[0]!r}")
            assert same(dst, fast_pattern(size, 170)), "READ over the fallback: data mismatch"
            tgt.check("transfers over the fallback", "xp-prober",
                      [b"fallback-w", b"fallback-r", b"fallback-w2"], (("w", 0, size, sha256(src)),))
            log("WRITE, READ and a repost over TCP verified, notifications included")
            ini.release_xfer_handle(w)
            ini.release_xfer_handle(r)
        else:
            add_remote_expecting(ini, tgt, None)  # accepted: the refusal comes with a transfer
            attempts = {
                "initialize_xfer": lambda: ini.initialize_xfer(
                    "WRITE", xfer_descs(ini, src), tgt.descs(ini, "w"), tgt.name, b"never"),
            }
            local_h = ini.prep_xfer_dlist("NIXL_INIT_AGENT", [(addr(dst), size, 0)], "DRAM")
            remote_h = ini.prep_xfer_dlist(tgt.name, [(tgt.addrs["r"], size, 0)], "DRAM")
            attempts["make_prepped_xfer"] = lambda: ini.make_prepped_xfer(
                "READ", local_h, [0], remote_h, [0], b"never")
            attempts["send_notif"] = lambda: ini.send_notif(tgt.name, b"never")
            for call, attempt in attempts.items():
                with capture_fds() as cap:
                    try:
                        attempt()
                    except Exception as e:  # noqa: BLE001 - checked below
                        failure = e
                    else:
                        failure = None
                replay(call, cap["text"])
                assert failure is not None, f"protocol=cma with a failed probe: {call} succeeded"
                assert type(failure).__name__ == "nixlNotSupportedError", (
                    f"{call}: {type(failure).__module__}.{type(failure).__name__}: {failure} "
                    "(expected NIXL_ERR_NOT_SUPPORTED)")
                errors = [line for line in cap["text"].splitlines()
                          if "ERROR" in line and "protocol=cma" in line]
                assert errors, f"{call} failed without an ERROR line naming protocol=cma"
                assert any(CMA_PROBE_ENV in line for line in errors), (
                    f"the ERROR line does not give the reason: {errors!r}")
                log(f"{call} refused with {type(failure).__name__}; plugin said {errors[0]!r}")
            ini.release_dlist_handle(local_h)
            ini.release_dlist_handle(remote_h)
            tgt.request("quiet", seconds=0.2, what="nothing could reach the target")
        tgt.quit()


# j. SIGKILL of the target during a stream of big transfers over CMA ------------------------


def sc_xp_kill_stream(args) -> None:
    proto = args.protocol
    size = args.size_mib * MiB
    name = "xp-streamed"
    ini = new_agent_with("xp-streamer", proto)
    src, dst = fast_pattern(size, 180), filled(size)
    register(ini, src, dst)
    bufs = [{"name": "w", "size": size}, {"name": "r", "size": size, "seed": 181}]
    remote_r = fast_pattern(size, 181)  # what every target holds in "r"
    rounds = args.kill_ops + ["none"]
    for rnd, kill_op in enumerate(rounds):
        with target_process(name, proto, bufs) as tgt:
            add_remote_expecting(ini, tgt, "cma")
            # A verified transfer each way first (after a kill: to the new process).
            np.bitwise_xor(fast_pattern(size, 180), rnd, out=src)
            round_trip(ini, tgt, rnd, src, dst, remote_r, "xp-streamer")
            if kill_op == "none":
                tgt.quit()
                break

            # The stream: one handle reposted as soon as it is done; the target is
            # killed right after post number `kill_at` was issued.
            local, remote = (src, "w") if kill_op == "WRITE" else (dst, "r")
            h = ini.initialize_xfer(kill_op, xfer_descs(ini, local), tgt.descs(ini, remote), name,
                                    b"stream")
            seen = {"posts": 0, "at": "", "state": ""}
            t_kill, t_stream, t_failed, failure = None, 0.0, 0.0, None
            deadline = time.monotonic() + OP_TIMEOUT
            t0 = time.perf_counter()
            while failure is None:
                assert time.monotonic() < deadline, (
                    f"round {rnd}: no failure after {seen['posts']} posts in {OP_TIMEOUT:.0f}s "
                    f"({'after' if t_kill else 'before'} the kill)")
                try:
                    seen["at"] = "the post"
                    state = ini.transfer(h)
                    assert state in ("DONE", "PROC"), f"transfer() returned {state!r}"
                    seen["posts"] += 1
                    if seen["posts"] == args.kill_at:
                        t_stream = time.perf_counter() - t0
                        seen["state"] = state
                        t_kill = tgt.kill()
                    seen["at"] = "check_xfer_state"
                    if state == "PROC":
                        wait_xfer(ini, h, f"round {rnd}: {kill_op} post #{seen['posts']}")
                except Exception as e:  # noqa: BLE001 - checked here
                    assert is_nixl_error(e), f"a non-NIXL error: {e!r}"
                    failure, t_failed = e, time.monotonic()
                    assert t_kill is not None, f"round {rnd}: the stream failed before the kill: {e}"
            elapsed = t_failed - t_kill
            log(f"round {rnd}: {args.kill_at - 1} x {size // MiB} MiB {kill_op} streamed "
                f"({rate((args.kill_at - 1) * size, t_stream)}), target killed right after post "
                f"#{args.kill_at} (it returned {seen['state']}); {seen['at']} raised "
                f"{type(failure).__name__} ({failure}) {elapsed * 1e3:.1f} ms after the kill, "
                f"after {seen['posts']} post(s)")
            print(f"KILL-TO-FAILURE {kill_op} {elapsed * 1e3:.1f} ms", flush=True)
            assert type(failure).__name__ == "nixlRemoteDisconnectError", (
                f"expected NIXL_ERR_REMOTE_DISCONNECT, got {type(failure).__name__}: {failure}")
            assert elapsed < 1.0, f"the dead target was noticed only after {elapsed:.3f}s"
            ini.release_xfer_handle(h)
            # As in sc_xp_kill_target: forget the dead process before loading the new one.
            known = ini.check_remote_metadata(name)
            log(f"round {rnd}: after the failure NIXL {'still' if known else 'no longer'} holds "
                f"{name!r}'s metadata{'; removing it' if known else ''}")
            if known:
                ini.remove_remote_agent(name)
    log(f"{len(rounds) - 1} target(s) killed during a stream of {size // MiB} MiB transfers; "
        "every new target process served verified transfers over cross-memory attach")


# --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="scenario", required=True)

    s = sub.add_parser("listing", help="a. listed by get_plugin_list() and creatable")
    s.add_argument("--mode", choices=["dir", "wheel"], default="dir")
    s.set_defaults(fn=sc_listing)

    s = sub.add_parser("params", help="b. options, memory types, invalid/unknown options")
    s.set_defaults(fn=sc_params)

    s = sub.add_parser("two_agents", help="c./j. two agents, WRITE then READ, notifications")
    s.add_argument("--prog-thread", choices=["on", "off"], default="on")
    s.add_argument("--size-mib", type=int, default=64)
    s.set_defaults(fn=sc_two_agents)

    s = sub.add_parser("prepped", help="d. prepped READ of many non-contiguous blocks")
    s.add_argument("--blocks", type=int, default=20_000)
    s.set_defaults(fn=sc_prepped)

    s = sub.add_parser("repost", help="e. reposting one handle N times")
    s.add_argument("--op", choices=["WRITE", "READ"], default="WRITE")
    s.add_argument("--count", type=int, default=30)
    s.set_defaults(fn=sc_repost)

    s = sub.add_parser("notif_bytes", help="f. empty and binary notifications")
    s.set_defaults(fn=sc_notif_bytes)

    s = sub.add_parser("loopback", help="g. an agent transferring to itself")
    s.set_defaults(fn=sc_loopback)

    s = sub.add_parser("threads", help="h. four threads posting at once")
    s.add_argument("--sync", choices=["default", "rw"], default="default")
    s.set_defaults(fn=sc_threads)

    s = sub.add_parser("release_inflight", help="i. release a handle while in flight")
    s.add_argument("--op", choices=["WRITE", "READ"], default="WRITE")
    s.add_argument("--size-mib", type=int, default=256)
    s.set_defaults(fn=sc_release_inflight)

    s = sub.add_parser("metadata", help="extra: partial metadata, remove and re-add a remote")
    s.set_defaults(fn=sc_metadata)

    s = sub.add_parser("idle_cpu", help="idle CPU of two agents with progress threads")
    s.add_argument("--seconds", type=float, default=3.0)
    s.add_argument("--max-percent", type=float, default=1.0)
    s.set_defaults(fn=sc_idle_cpu)

    s = sub.add_parser("two_process", help="extra: initiator and target in two processes")
    s.add_argument("--initiator", choices=["parent", "child"], default="parent")
    s.add_argument("--size-mib", type=int, default=64)
    s.set_defaults(fn=sc_two_process)

    def xp(name: str, fn, help_text: str):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--protocol", choices=["auto", "tcp", "cma", "rdma"], default="auto")
        s.set_defaults(fn=fn)
        return s

    xp("xp_bulk", sc_xp_bulk, "processes: 384 MiB WRITE and READ in 4 KiB to 64 MiB blocks")
    s = xp("xp_prepped", sc_xp_prepped, "processes: prepped READ of many scattered blocks")
    s.add_argument("--blocks", type=int, default=20_000)
    xp("xp_threads", sc_xp_threads, "processes: four initiator threads, one target")
    s = xp("xp_idle_target", sc_xp_idle_target, "processes: a target that makes no NIXL call")
    s.add_argument("--seconds", type=float, default=3.0)
    s.add_argument("--target-prog-thread", choices=["on", "off"], default="on")
    s = xp("xp_kill_target", sc_xp_kill_target, "processes: SIGKILL the target mid-transfer")
    s.add_argument("--size-mib", type=int, default=128)
    s.add_argument("--kill-ops", nargs="+", choices=["WRITE", "READ"], default=["WRITE", "READ"])
    xp("xp_notif_bytes", sc_xp_notif_bytes, "processes: empty and binary notifications")
    xp("xp_unaligned", sc_xp_unaligned, "processes: 1 byte to 64 MiB at unaligned addresses")
    xp("xp_revoke", sc_xp_revoke, "processes: transfers after the target's deregisterMem")
    s = xp("xp_many_descs", sc_xp_many_descs, "processes: one transfer of many descriptors")
    s.add_argument("--descs", type=int, default=100_000)
    xp("xp_probe_fail", sc_xp_probe_fail, "processes: the cross-memory attach probe fails")
    s = xp("xp_kill_stream", sc_xp_kill_stream, "processes: SIGKILL during a stream over CMA")
    s.add_argument("--size-mib", type=int, default=64)
    s.add_argument("--kill-at", type=int, default=4, help="kill right after this post")
    s.add_argument("--kill-ops", nargs="+", choices=["WRITE", "READ"], default=["WRITE", "READ"])

    s = sub.add_parser("_xp_target", help=argparse.SUPPRESS)
    s.set_defaults(fn=sc_xp_target)

    s = sub.add_parser("_twoproc_peer", help=argparse.SUPPRESS)
    s.add_argument("--role", choices=["target", "initiator"], required=True)
    s.add_argument("--size-mib", type=int, default=64)
    s.set_defaults(fn=sc_twoproc_peer)

    args = p.parse_args()
    log(f"scenario {args.scenario}, backend {BACKEND!r}")
    args.fn(args)
    if args.scenario not in PEER_COMMANDS:
        print(f"SCENARIO {args.scenario} OK", flush=True)


if __name__ == "__main__":
    main()
