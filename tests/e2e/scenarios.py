#!/usr/bin/env python3
"""End-to-end scenarios driven through the real NIXL Python API (nixl-cu12 1.5.1).

Every scenario runs in its own process (NIXL's plugin manager is a process-wide
singleton, and a crash in a plugin must not take the test runner down); the
pytest side lives in ``test_e2e.py`` / ``conftest.py``.  Run one by hand with

    UCX_MODULES=^efa UCX_NET_DEVICES=lo NIXL_PLUGIN_DIR=<dir with libplugin_Mooncake.so> \\
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
import hashlib
import json
import os
import queue
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

# The two-process scenario's peer uses its stdout as a message channel. Move the
# real stdout away before NIXL (or anything else) can write to it, and send all
# stray output to stderr instead.
_CHANNEL_OUT = None
_LOG_PREFIX = ""
if len(sys.argv) > 1 and sys.argv[1] == "_twoproc_peer":
    _LOG_PREFIX = "[peer]"
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


def block_table(buf: np.ndarray, nblocks: int, block: int, stride: int) -> np.ndarray:
    """Nx3 (addr, len, devId) array of `nblocks` blocks spaced `stride` apart."""
    t = np.zeros((nblocks, 3), dtype=np.uint64)
    t[:, 0] = addr(buf) + np.arange(nblocks, dtype=np.uint64) * np.uint64(stride)
    t[:, 1] = block
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

    lv, rv = block_view(local, total, block, l_stride), block_view(remote, total, block, r_stride)
    assert same(lv[lidx], rv[ridx]), "prepped READ: block contents differ"
    untouched = np.ones(total, dtype=bool)
    untouched[lidx] = False
    assert (lv[untouched] == 0xAA).all(), "prepped READ wrote blocks it was not asked to"
    gaps = local[: total * l_stride].reshape(total, l_stride)[:, block:]
    assert (gaps == 0xAA).all(), "prepped READ wrote into the gaps between blocks"
    log("all blocks verified, gaps and unselected blocks untouched")

    # Same buffers viewed as dense 4 KiB blocks, reading runs of consecutive
    # indices: NIXL merges adjacent blocks, so the backend sees fewer, longer
    # descriptors of varying length.
    local[:] = 0xAA
    dense = min(total, (remote.nbytes // block), (local.nbytes // block))
    local_dh = a.prep_xfer_dlist("NIXL_INIT_AGENT", block_table(local, dense, block, block), "DRAM")
    remote_dh = a.prep_xfer_dlist("prefill", block_table(remote, dense, block, block), "DRAM")
    runs, start = [], 0
    for length in (1, 2, 3, 64, 7, 500, 1, 1000):
        runs.append(np.arange(start, start + length))
        start += length + 5  # 5-block hole between runs
    idx = np.concatenate(runs).astype(np.int32)
    h2 = a.make_prepped_xfer("READ", local_dh, idx, remote_dh, idx, b"req-0001:tp1")
    post(a, h2, "merged prepped READ")
    b_notifs.expect("decode", [b"req-0001:tp1"], "merged READ notification")
    ld, rd = block_view(local, dense, block, block), block_view(remote, dense, block, block)
    assert same(ld[idx], rd[idx]), "merged READ: block contents differ"
    holes = np.ones(dense, dtype=bool)
    holes[idx] = False
    assert (ld[holes] == 0xAA).all(), "merged READ wrote outside the requested runs"
    log(f"merged READ of {len(runs)} runs ({len(idx)} blocks) verified")

    for handle in (h, h2):
        a.release_xfer_handle(handle)
    for dl in (local_h, remote_h, local_dh, remote_dh):
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

    s = sub.add_parser("_twoproc_peer", help=argparse.SUPPRESS)
    s.add_argument("--role", choices=["target", "initiator"], required=True)
    s.add_argument("--size-mib", type=int, default=64)
    s.set_defaults(fn=sc_twoproc_peer)

    args = p.parse_args()
    log(f"scenario {args.scenario}, backend {BACKEND!r}")
    args.fn(args)
    if args.scenario != "_twoproc_peer":
        print(f"SCENARIO {args.scenario} OK", flush=True)


if __name__ == "__main__":
    main()
