#!/usr/bin/env python3
"""Two-process comparison of NIXL backends through the real NIXL Python API.

For every configuration (our "Mooncake" plugin with protocol=auto/cma/tcp,
NIXL's bundled UCX with its defaults and with UCX_TLS=tcp) the harness spawns
a *target* and an *initiator* process, as nixlbench does, and runs the same
workloads in each pair.  Runs are interleaved (config A rep 1, config B rep 1,
..., config A rep 2, ...) so that noise hits every configuration alike, and
the table reports medians over the repetitions plus the ratio ours/UCX.

Agent metadata and the bench's own commands (fill a pattern, verify, expect a
notification, measure idle CPU) travel over a Unix socket between the two
processes; NIXL's etcd and listener threads are not used.

Every transfer's data is verified (outside the timed region): each block gets
a pattern derived from a fresh per-iteration seed, the block's logical index
and the word offset, so a stale, misplaced, shifted or partial block is
caught.  The whole of every block is checked.

Usage (normally through scripts/bench-compare.sh, which builds the plugin and
the venv first):

    .venv/bin/python benches/compare/harness.py                 # full run, 3 reps
    .venv/bin/python benches/compare/harness.py --quick         # CI smoke: few sizes, 1 rep
    .venv/bin/python benches/compare/harness.py --configs ucx,ucx-tcp --json out.json

See benches/compare/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import pickle
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PLUGIN = REPO / "target" / "release" / "libplugin_Mooncake.so"

KiB = 1 << 10
MiB = 1 << 20
MASK64 = (1 << 64) - 1

# ---- configurations -------------------------------------------------------------

OURS_PARAMS = {"ip_addr": "127.0.0.1"}
BARE_CMA = "bare process_vm_writev"
CONFIGS: dict[str, dict] = {
    "ours-auto": {"backend": "Mooncake", "params": {"protocol": "auto", **OURS_PARAMS}, "env": {}},
    "ours-cma": {"backend": "Mooncake", "params": {"protocol": "cma", **OURS_PARAMS}, "env": {}},
    "ours-tcp": {"backend": "Mooncake", "params": {"protocol": "tcp", **OURS_PARAMS}, "env": {}},
    "ucx": {"backend": "UCX", "params": {}, "env": {}},
    "ucx-tcp": {"backend": "UCX", "params": {}, "env": {"UCX_TLS": "tcp"}},
    # Not NIXL: the same transfers as bare process_vm_writev/readv calls (the
    # ceiling any cross-memory-attach backend can reach on this machine).
    "bare-cma": {"backend": BARE_CMA, "params": {}, "env": {}},
}
# (ours, reference) pairs for the ratio columns.
RATIOS = [("ours-auto", "ucx"), ("ours-cma", "ucx"), ("ours-tcp", "ucx-tcp"), ("ours-cma", "bare-cma")]

# Environment of every NIXL process (see shared/nixl-abi.md section 7).
BASE_ENV = {"UCX_MODULES": "^efa", "UCX_NET_DEVICES": "lo", "NIXL_MOONCAKE_IP_ADDR": "127.0.0.1"}

# ---- workload parameters ----------------------------------------------------------

BATCH = 32  # descriptors per bandwidth transfer
BATCH_CAP = 512 * MiB  # bytes per bandwidth transfer at most (64 MiB blocks -> 8 descriptors)
LAT_SLOTS = 32  # distinct 4 KiB slots (and handles) the latency loop cycles through
MANY_DESCS = 4096  # descriptors of the non-contiguous transfer
RUN_BLOCKS = 16  # consecutive blocks per run in the runs variant of that transfer


def default_spec(quick: bool) -> dict:
    return {
        "sizes": [4 * KiB, 1 * MiB] if quick else [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB],
        "batch": BATCH,
        "batch_cap": BATCH_CAP,
        "bw_warmup": 1,  # verified but not timed
        "bw_min_iters": 3,
        "bw_max_iters": 50 if quick else 200,
        "bw_timed_budget_s": 0.2,  # stop once this much transfer time was measured (after min iters)
        "bw_wall_budget_s": 1.0,  # ... or this much wall time went by (after min iters)
        "lat_iters": 256 if quick else 1024,
        "lat_slots": LAT_SLOTS,
        "many_descs": MANY_DESCS,
        "many_iters": 2 if quick else 5,
        "idle_s": 1.0 if quick else 2.0,
        "idle_settle_s": 0.5,
        "xfer_timeout_s": 30.0,
        "rpc_timeout_s": 60.0,
    }


def size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if s[-1:] in "KMG" else s) * mult


def batch_descs(spec: dict, size: int) -> int:
    return max(1, min(spec["batch"], spec["batch_cap"] // size))


# ================================================================================
# Part 1: code shared by the two bench processes (target and initiator)
# ================================================================================

def send_msg(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the control socket")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket):
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    return pickle.loads(_recv_exact(sock, n))


def short_error(e: BaseException, where: str = "") -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if type(e) is not RuntimeError and type(e).__name__ not in text and not text.startswith("NIXL_"):
        text = f"{type(e).__name__}: {text}"
    text = f"{where}: {text}" if where else text
    return text[:120]


class Patterns:
    """Per-block verification patterns over uint64 words.

    Word w of a block with logical index k, for seed s, holds
    ((k + 1) * PHI) ^ s ^ w: a stale block (other seed), a block landed in the
    wrong place (other k), a shifted or partially copied block (other w) all
    fail the check.
    """

    PHI = 0x9E3779B97F4A7C15
    CHUNK = 1 << 20  # words per verification step of a large block

    def __init__(self, np, max_block_bytes: int):
        self.np = np
        self.widx = np.arange(max_block_bytes // 8, dtype=np.uint64)

    def consts(self, seed: int, keys):
        np = self.np
        k = np.asarray(keys, dtype=np.uint64) + np.uint64(1)
        return (k * np.uint64(self.PHI)) ^ np.uint64(seed & MASK64)

    def _view(self, buf, block_bytes: int, slots):
        words = block_bytes // 8
        nslots = int(max(slots)) + 1
        return buf.view(self.np.uint64)[: nslots * words].reshape(nslots, words), words

    def fill(self, buf, block_bytes: int, slots, keys, seed: int) -> None:
        np = self.np
        view, words = self._view(buf, block_bytes, slots)
        c = self.consts(seed, keys)
        if words * len(slots) <= (4 << 20):  # up to 32 MiB: one vectorised step
            view[np.asarray(slots, dtype=np.intp)] = c[:, None] ^ self.widx[None, :words]
        else:
            for s, ck in zip(slots, c):
                np.bitwise_xor(self.widx[:words], ck, out=view[int(s)])

    def verify(self, buf, block_bytes: int, slots, keys, seed: int):
        """None when every word of every block matches, else a description of the first mismatch."""
        np = self.np
        view, words = self._view(buf, block_bytes, slots)
        c = self.consts(seed, keys)
        if words * len(slots) <= (4 << 20):
            got = view[np.asarray(slots, dtype=np.intp)]
            exp = c[:, None] ^ self.widx[None, :words]
            bad = np.nonzero(got != exp)
            if bad[0].size:
                i, w = int(bad[0][0]), int(bad[1][0])
                return (f"block {int(keys[i])} (slot {int(slots[i])}) word {w}: "
                        f"{int(got[i, w]):#x} != {int(exp[i, w]):#x}; {bad[0].size} bad words")
            return None
        tmp = np.empty(min(words, self.CHUNK), dtype=np.uint64)
        for i, (s, ck) in enumerate(zip(slots, c)):
            row = view[int(s)]
            for off in range(0, words, self.CHUNK):
                seg = row[off: off + self.CHUNK]
                t = tmp[: seg.size]
                np.bitwise_xor(seg, self.widx[off: off + seg.size], out=t)
                if not (t == ck).all():
                    w = off + int(np.argmax(t != ck))
                    return (f"block {int(keys[i])} (slot {int(s)}) word {w}: "
                            f"{int(row[w]):#x} != {int(ck ^ self.widx[w]):#x}")
        return None


def alloc(np, nbytes: int):
    """A page-faulted (touched) buffer, so that first-touch costs stay out of timings."""
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(0xA5)
    return buf


class BareCma:
    """Stands in for a NIXL agent with the calls the harness makes, done with
    bare process_vm_writev/readv (ctypes, up to 1024 iovecs per call,
    synchronous): the ceiling for cross-memory attach on this machine."""

    IOV_MAX = 1024

    class _Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class _Handle:
        def __init__(self, op: str, calls):
            self.op, self.calls = op, calls

        def release(self) -> None:
            pass

    class _DList:
        def __init__(self, arr):
            self.descs = [(int(a), int(n)) for a, n, _ in arr]

        def release(self) -> None:
            pass

    def __init__(self, name: str):
        self.name = name
        self.pid = os.getpid()
        libc = ctypes.CDLL(None, use_errno=True)
        self._calls = {"WRITE": libc.process_vm_writev, "READ": libc.process_vm_readv}
        for f in self._calls.values():
            f.restype = ctypes.c_ssize_t
        self.peer = None

    def get_plugin_list(self):
        return [BARE_CMA]

    def register_memory(self, descs, mem):
        pass

    def get_agent_metadata(self):
        return {"pid": self.pid}

    def add_remote_agent(self, md):
        self.peer = md["pid"]
        return "bench-target"

    def get_xfer_descs(self, arr, mem):
        return [(int(a), int(n)) for a, n, _ in arr]

    def _handle(self, op: str, local, remote):
        calls = []
        for i in range(0, len(local), self.IOV_MAX):
            lo, re_ = local[i:i + self.IOV_MAX], remote[i:i + self.IOV_MAX]
            liov = (self._Iovec * len(lo))(*[self._Iovec(a, n) for a, n in lo])
            riov = (self._Iovec * len(re_))(*[self._Iovec(a, n) for a, n in re_])
            calls.append((liov, riov, len(lo), sum(n for _, n in lo)))
        return self._Handle(op, calls)

    def initialize_xfer(self, op, local, remote, agent, note=b""):
        return self._handle(op, local, remote)

    def prep_xfer_dlist(self, agent, arr, mem):
        return self._DList(arr)

    def make_prepped_xfer(self, op, lside, lidx, rside, ridx, note=b""):
        return self._handle(op, [lside.descs[i] for i in lidx], [rside.descs[i] for i in ridx])

    def transfer(self, h) -> str:
        call = self._calls[h.op]
        for liov, riov, n, total in h.calls:
            got = call(self.peer, liov, n, riov, n, 0)
            if got != total:
                raise OSError(ctypes.get_errno(), f"{h.op} moved {got} of {total} bytes")
        return "DONE"

    def check_xfer_state(self, h) -> str:
        return "DONE"


def make_agent(name: str, cfg: dict):
    if cfg["backend"] == BARE_CMA:
        return BareCma(name)
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    try:
        agent = nixl_agent(name, nixl_agent_config(backends=[]))  # progress thread on (default)
    except Exception as e:
        raise RuntimeError(short_error(e, "nixl_agent")) from e
    if cfg["backend"] not in agent.get_plugin_list():
        raise RuntimeError(f"plugin {cfg['backend']} not found (plugins: {','.join(agent.get_plugin_list())})")
    try:
        agent.create_backend(cfg["backend"], dict(cfg["params"]))
    except Exception as e:
        raise RuntimeError(short_error(e, "create_backend")) from e
    return agent


def buffer_sizes(spec: dict) -> dict[str, int]:
    bw = max(batch_descs(spec, s) * s for s in spec["sizes"]) if spec["sizes"] else 4 * KiB
    return {"bw": bw, "lat": spec["lat_slots"] * 4 * KiB, "many": 2 * spec["many_descs"] * 4 * KiB}


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return ru.ru_utime + ru.ru_stime


def measure_idle(seconds: float) -> dict:
    c0, t0 = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(), time.monotonic()
    return {"cpu_s": c1 - c0, "wall_s": t1 - t0, "pct": 100.0 * (c1 - c0) / (t1 - t0)}


# ---- target ------------------------------------------------------------------------

def run_target(args, spec: dict, cfg: dict) -> int:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(args.sock)
    srv.listen(1)
    srv.settimeout(spec["rpc_timeout_s"])
    hello: dict
    agent = None
    try:
        import numpy as np

        pat = Patterns(np, max([*spec["sizes"], 4 * KiB]))
        bufs = {k: alloc(np, n) for k, n in buffer_sizes(spec).items()}
        agent = make_agent("bench-target", cfg)
        agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in bufs.values()], "DRAM")
        hello = {"md": agent.get_agent_metadata(), "name": agent.name,
                 "bufs": {k: (b.ctypes.data, b.nbytes) for k, b in bufs.items()}}
    except Exception as e:
        hello = {"error": short_error(e, "target setup")}
    conn, _ = srv.accept()
    conn.settimeout(spec["rpc_timeout_s"])
    send_msg(conn, hello)
    if "error" in hello:
        return 1

    notifs: list[tuple[str, bytes]] = []

    def pull_notifs():
        for sender, msgs in agent.get_new_notifs().items():
            s = sender.decode() if isinstance(sender, bytes) else sender
            notifs.extend((s, m) for m in msgs)

    while True:
        try:
            msg = recv_msg(conn)
        except (ConnectionError, socket.timeout):
            return 0
        cmd = msg[0]
        try:
            if cmd == "quit":
                send_msg(conn, {"ok": True})
                return 0
            if cmd == "fill":
                _, region, block, slots, keys, seed = msg
                pat.fill(bufs[region], block, slots, keys, seed)
                send_msg(conn, {"ok": True})
            elif cmd == "verify":
                # Data must be in place once the initiator saw DONE.  A mismatch is
                # re-checked for up to 1 s to tell "landed late" from "wrong".
                _, region, block, slots, keys, seed = msg
                t0 = time.monotonic()
                err = pat.verify(bufs[region], block, slots, keys, seed)
                late = None
                while err is not None and time.monotonic() - t0 < 1.0:
                    time.sleep(0.005)
                    if pat.verify(bufs[region], block, slots, keys, seed) is None:
                        late = time.monotonic() - t0
                        break
                if late is not None:
                    send_msg(conn, {"ok": True, "late_s": late, "first_error": err})
                elif err is not None:
                    send_msg(conn, {"error": err})
                else:
                    send_msg(conn, {"ok": True})
            elif cmd == "expect_notif":
                _, sender, payload, timeout = msg
                deadline = time.monotonic() + timeout
                while True:
                    pull_notifs()
                    if (sender, payload) in notifs:
                        notifs.remove((sender, payload))
                        send_msg(conn, {"ok": True})
                        break
                    if time.monotonic() > deadline:
                        seen = [m for _, m in notifs][-3:]
                        send_msg(conn, {"error": f"notification {payload!r} from {sender} never arrived "
                                                 f"(last seen: {seen})"})
                        break
                    time.sleep(1e-4)
            elif cmd == "idle":
                send_msg(conn, {"ok": True, **measure_idle(msg[1])})
            else:
                send_msg(conn, {"error": f"unknown command {cmd!r}"})
        except Exception as e:
            send_msg(conn, {"error": short_error(e, f"target {cmd}")})


# ---- initiator --------------------------------------------------------------------------

class Initiator:
    def __init__(self, args, spec: dict, cfg: dict):
        self.args, self.spec, self.cfg = args, spec, cfg
        self.result: dict = {"config": args.config, "setup_error": None, "metrics": {}, "errors": {},
                             "details": {}, "late_landings": 0, "complete": False}
        self.seed_base = int.from_bytes(os.urandom(8), "little")
        self.seed_n = 0
        self.save()

    def save(self) -> None:
        tmp = self.args.result + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f)
        os.replace(tmp, self.args.result)

    def next_seed(self) -> int:
        self.seed_n += 1
        return (self.seed_base + self.seed_n * 0xD1B54A32D192ED03) & MASK64

    # -- control channel

    def rpc(self, *msg):
        send_msg(self.conn, msg)
        reply = recv_msg(self.conn)
        if "error" in reply:
            raise RuntimeError(f"target: {reply['error']}")
        if reply.get("late_s") is not None:
            self.result["late_landings"] += 1
            self.result["details"].setdefault("late_examples", []).append(
                {"late_s": reply["late_s"], "first_error": reply["first_error"]})
        return reply

    def connect(self) -> None:
        deadline = time.monotonic() + self.spec["rpc_timeout_s"]
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.args.sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("the target never opened its control socket")
                time.sleep(0.02)
        s.settimeout(self.spec["rpc_timeout_s"])
        self.conn = s

    # -- transfers

    def post_wait(self, h) -> float:
        """transfer() to DONE, busy-polling as nixlbench does; seconds."""
        agent = self.agent
        t0 = time.perf_counter()
        st = agent.transfer(h)
        n = 0
        while st == "PROC":
            st = agent.check_xfer_state(h)
            n += 1
            if n & 0xFFF == 0 and time.perf_counter() - t0 > self.spec["xfer_timeout_s"]:
                raise TimeoutError(f"transfer not done after {self.spec['xfer_timeout_s']:.0f}s")
        t1 = time.perf_counter()
        if st != "DONE":
            raise RuntimeError(f"transfer state {st}")
        return t1 - t0

    def release(self, h) -> None:
        try:
            h.release()
        except Exception as e:  # noted, not fatal
            self.result["details"].setdefault("release_errors", []).append(short_error(e))

    # -- workloads

    def setup(self) -> None:
        import numpy as np

        self.np = np
        self.connect()
        hello = recv_msg(self.conn)
        if "error" in hello:
            raise RuntimeError(hello["error"])
        self.remote_bufs = hello["bufs"]
        self.pat = Patterns(np, max([*self.spec["sizes"], 4 * KiB]))
        self.bufs = {k: alloc(np, n) for k, n in buffer_sizes(self.spec).items()}
        self.agent = make_agent("bench-initiator", self.cfg)
        try:
            self.agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in self.bufs.values()], "DRAM")
        except Exception as e:
            raise RuntimeError(short_error(e, "register_memory")) from e
        try:
            name = self.agent.add_remote_agent(hello["md"])
        except Exception as e:
            raise RuntimeError(short_error(e, "add_remote_agent")) from e
        self.remote = name.decode() if isinstance(name, bytes) else name

    def descs(self, base: int, block: int, slots):
        np = self.np
        arr = np.zeros((len(slots), 3), dtype=np.uint64)
        arr[:, 0] = base + np.asarray(slots, dtype=np.uint64) * np.uint64(block)
        arr[:, 1] = block
        return arr

    def bandwidth(self, op: str, size: int) -> dict:
        spec, agent = self.spec, self.agent
        n = batch_descs(spec, size)
        keys = list(range(n))
        lslots = keys
        rslots = [n - 1 - k for k in keys]  # reversed: never adjacent-mergeable
        lbase = self.bufs["bw"].ctypes.data
        rbase = self.remote_bufs["bw"][0]
        try:
            h = agent.initialize_xfer(op, agent.get_xfer_descs(self.descs(lbase, size, lslots), "DRAM"),
                                      agent.get_xfer_descs(self.descs(rbase, size, rslots), "DRAM"),
                                      self.remote, b"")
        except Exception as e:
            raise RuntimeError(short_error(e, "initialize_xfer")) from e
        times: list[float] = []
        try:
            it, t_start = 0, time.monotonic()
            while True:
                seed = self.next_seed()
                if op == "WRITE":
                    self.pat.fill(self.bufs["bw"], size, lslots, keys, seed)
                else:
                    self.rpc("fill", "bw", size, rslots, keys, seed)
                t = self.post_wait(h)
                if op == "WRITE":
                    self.rpc("verify", "bw", size, rslots, keys, seed)
                else:
                    err = self.pat.verify(self.bufs["bw"], size, lslots, keys, seed)
                    if err:
                        raise RuntimeError(f"READ data mismatch: {err}")
                if it >= spec["bw_warmup"]:
                    times.append(t)
                it += 1
                if len(times) >= spec["bw_max_iters"]:
                    break
                if len(times) >= spec["bw_min_iters"] and (
                        sum(times) >= spec["bw_timed_budget_s"]
                        or time.monotonic() - t_start >= spec["bw_wall_budget_s"]):
                    break
        finally:
            self.release(h)
        med = statistics.median(times)
        return {"gbps": n * size / med / 1e9, "descs": n, "bytes": n * size, "iters": len(times),
                "median_s": med, "min_s": min(times)}

    def latency(self) -> dict:
        spec, agent = self.spec, self.agent
        k = spec["lat_slots"]
        block = 4 * KiB
        lbase, rbase = self.bufs["lat"].ctypes.data, self.remote_bufs["lat"][0]
        handles = []
        try:
            for s in range(k):
                try:
                    handles.append(agent.initialize_xfer(
                        "WRITE", agent.get_xfer_descs(self.descs(lbase, block, [s]), "DRAM"),
                        agent.get_xfer_descs(self.descs(rbase, block, [s]), "DRAM"), self.remote, b""))
                except Exception as e:
                    raise RuntimeError(short_error(e, "initialize_xfer")) from e
            slots = list(range(k))
            rounds = 1 + -(-spec["lat_iters"] // k)  # first round: warm-up
            samples: list[float] = []
            firsts: list[float] = []  # the first transfer after each round's fill and verify
            for r in range(rounds):
                seed = self.next_seed()
                self.pat.fill(self.bufs["lat"], block, slots, slots, seed)
                times = [self.post_wait(h) for h in handles]
                self.rpc("verify", "lat", block, slots, slots, seed)  # every slot, every round
                if r > 0:
                    samples.extend(times)
                    firsts.append(times[0])
        finally:
            for h in handles:
                self.release(h)
        samples.sort()
        p99 = samples[min(len(samples) - 1, int(round(0.99 * (len(samples) - 1))))]
        return {"median_us": statistics.median(samples) * 1e6, "p99_us": p99 * 1e6,
                "first_median_us": statistics.median(firsts) * 1e6,
                "min_us": samples[0] * 1e6, "n": len(samples)}

    def many(self, run: int = 1) -> dict:
        """vLLM-style: prep both sides once, then one READ of D 4 KiB blocks with a notification:
        scattered (run 1), or in runs of `run` blocks consecutive on both sides (a request's
        blocks as a paged KV cache hands them out), the runs scattered."""
        np, spec, agent = self.np, self.spec, self.agent
        d, block = spec["many_descs"], 4 * KiB
        lbase, rbase = self.bufs["many"].ctypes.data, self.remote_bufs["many"][0]
        all_slots = list(range(2 * d))
        try:
            lside = agent.prep_xfer_dlist("NIXL_INIT_AGENT", self.descs(lbase, block, all_slots), "DRAM")
            rside = agent.prep_xfer_dlist(self.remote, self.descs(rbase, block, all_slots), "DRAM")
        except Exception as e:
            raise RuntimeError(short_error(e, "prep_xfer_dlist")) from e
        rng = np.random.default_rng(1234)
        if run == 1:
            lslots = [2 * j for j in range(d)]  # even slots: no two adjacent
            rslots = [2 * int(p) + 1 for p in rng.permutation(d)]  # odd slots, shuffled
        else:
            # Runs of `run` slots with a free slot after each; the remote runs shuffled.
            nruns = d // run
            lslots = [r * (run + 1) + k for r in range(nruns) for k in range(run)]
            order = rng.permutation(nruns)
            rslots = [int(order[r]) * (run + 1) + k for r in range(nruns) for k in range(run)]
            d = len(lslots)
        keys = list(range(d))
        times, preps = [], []
        try:
            for it in range(1 + spec["many_iters"]):
                seed = self.next_seed()
                self.rpc("fill", "many", block, rslots, keys, seed)
                note = f"req-{self.seed_n}:0".encode()
                t0 = time.perf_counter()
                try:
                    h = agent.make_prepped_xfer("READ", lside, lslots, rside, rslots, note)
                except Exception as e:
                    raise RuntimeError(short_error(e, "make_prepped_xfer")) from e
                tp = time.perf_counter() - t0
                try:
                    t = self.post_wait(h)
                finally:
                    self.release(h)
                err = self.pat.verify(self.bufs["many"], block, lslots, keys, seed)
                if err:
                    raise RuntimeError(f"READ data mismatch: {err}")
                if self.cfg["backend"] != BARE_CMA:  # plain system calls send no notification
                    self.rpc("expect_notif", agent.name, note, spec["xfer_timeout_s"])
                if it > 0:
                    times.append(t)
                    preps.append(tp)
        finally:
            lside.release()
            rside.release()
        return {"ms": statistics.median(times) * 1e3, "prep_ms": statistics.median(preps) * 1e3,
                "iters": len(times), "min_ms": min(times) * 1e3}

    def idle(self) -> dict:
        if self.cfg["backend"] == BARE_CMA:
            raise RuntimeError("n/a (no agent)")
        time.sleep(self.spec["idle_settle_s"])
        send_msg(self.conn, ("idle", self.spec["idle_s"]))
        mine = measure_idle(self.spec["idle_s"])
        theirs = recv_msg(self.conn)
        if "error" in theirs:
            raise RuntimeError(f"target: {theirs['error']}")
        return {"initiator": mine, "target": theirs}

    def run(self) -> int:
        try:
            self.setup()
        except Exception as e:
            self.result["setup_error"] = short_error(e)
            self.result["details"]["setup_traceback"] = traceback.format_exc()
            self.save()
            return 1
        m, errs = self.result["metrics"], self.result["errors"]

        def attempt(keys: list[str], fn, fill):
            try:
                out = fn()
            except Exception as e:
                for k in keys:
                    errs[k] = short_error(e)
                self.result["details"].setdefault("tracebacks", {})[keys[0]] = traceback.format_exc()
            else:
                fill(out)
            self.save()

        for size in self.spec["sizes"]:
            for op in ("WRITE", "READ"):
                key = f"{op.lower()}_gbps/{size}"
                attempt([key], lambda: self.bandwidth(op, size),
                        lambda o, key=key: (m.__setitem__(key, o["gbps"]),
                                            self.result["details"].__setitem__(key, o)))
        attempt(["lat_median_us", "lat_p99_us", "lat_first_us"], self.latency,
                lambda o: (m.update(lat_median_us=o["median_us"], lat_p99_us=o["p99_us"],
                                    lat_first_us=o["first_median_us"]),
                           self.result["details"].__setitem__("latency", o)))
        attempt(["many_ms", "many_prep_ms"], self.many,
                lambda o: (m.update(many_ms=o["ms"], many_prep_ms=o["prep_ms"]),
                           self.result["details"].__setitem__("many", o)))
        attempt(["runs_ms"], lambda: self.many(RUN_BLOCKS),
                lambda o: (m.update(runs_ms=o["ms"]), self.result["details"].__setitem__("runs", o)))
        attempt(["idle_cpu_initiator_pct", "idle_cpu_target_pct"], self.idle,
                lambda o: (m.update(idle_cpu_initiator_pct=o["initiator"]["pct"],
                                    idle_cpu_target_pct=o["target"]["pct"]),
                           self.result["details"].__setitem__("idle", o)))
        try:
            self.rpc("quit")
        except Exception:
            pass
        self.result["complete"] = True
        self.save()
        return 0


def child_main(args) -> int:
    spec = json.loads(args.spec)
    cfg = CONFIGS[args.config]
    if args.role == "target":
        return run_target(args, spec, cfg)
    return Initiator(args, spec, cfg).run()


# ================================================================================
# Part 2: the harness (spawns pairs, aggregates, reports)
# ================================================================================

CHILDREN: list[subprocess.Popen] = []


def kill_children() -> None:
    for p in CHILDREN:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: it and anything it started
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    CHILDREN.clear()


def child_env(cfg: dict) -> dict:
    env = dict(os.environ)
    env.pop("NIXL_PLUGIN_DIR", None)  # NIXL must scan the wheel's plugins dir (UCX and ours)
    env.pop("UCX_TLS", None)  # "ucx" means UCX's defaults
    env.update(BASE_ENV)
    env.update(cfg["env"])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_hint(path: Path) -> str | None:
    """The last error-looking line a process printed (NIXL's glog 'E' lines, our plugin's lines)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for want in (lambda s: "Mooncake" in s and ("ERROR" in s or "WARN" in s),  # our plugin's reason
                 lambda s: s.startswith("E") and "]" in s[:60] or "ERROR" in s):  # NIXL's glog errors
        for line in reversed(lines):
            if want(line.strip()):
                return line.strip()[:300]
    return None


def tail(path: Path, n: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_pair(name: str, rep: int, spec: dict, workdir: Path, timeout: float) -> dict:
    d = workdir / f"{name}-rep{rep}"
    d.mkdir()
    sock, tres, ires = d / "ctl.sock", d / "target.json", d / "initiator.json"
    env = child_env(CONFIGS[name])
    out: dict = {"config": name, "rep": rep}

    def spawn(role: str, result: Path) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--config", name,
               "--sock", str(sock), "--result", str(result), "--spec", json.dumps(spec)]
        with open(d / f"{role}.out", "wb") as f:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 env=env, cwd=str(d), start_new_session=True)
        CHILDREN.append(p)
        return p

    t0 = time.monotonic()
    target = spawn("target", tres)
    initiator = spawn("initiator", ires)
    timed_out = False
    try:
        initiator.wait(timeout=timeout)
        target.wait(timeout=max(5.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill_children()
    out["wall_s"] = time.monotonic() - t0
    out["exit"] = {"initiator": initiator.returncode, "target": target.returncode}
    try:
        res = json.loads(ires.read_text())
    except (OSError, ValueError):
        res = None
    hints = {r: log_hint(d / f"{r}.out") for r in ("initiator", "target")}
    out["log_hints"] = {k: v for k, v in hints.items() if v}
    if res is None:
        why = (f"timeout after {timeout:.0f}s" if timed_out
               else f"initiator died (exit {initiator.returncode}) before reporting")
        out["setup_error"] = why
        out["metrics"], out["errors"] = {}, {}
        out["output_tail"] = {r: tail(d / f"{r}.out") for r in ("initiator", "target")}
        return out
    out.update({k: res[k] for k in ("setup_error", "metrics", "errors", "details", "late_landings")})
    if not res.get("complete") and not res.get("setup_error"):
        why = (f"timeout after {timeout:.0f}s" if timed_out
               else f"initiator died (exit {initiator.returncode})")
        out["incomplete"] = why
    if res.get("setup_error") or res.get("errors") or not res.get("complete"):
        out["output_tail"] = {r: tail(d / f"{r}.out") for r in ("initiator", "target")}
    for role, code in out["exit"].items():
        if code not in (0, None) and res.get("complete"):
            out.setdefault("warnings", []).append(f"{role} exited with {code} after reporting")
    return out


# ---- aggregation and report -----------------------------------------------------------

def metric_rows(spec: dict) -> list[tuple[str, str, bool]]:
    """(key, label, higher_is_better)"""
    rows = []
    for op in ("write", "read"):
        for s in spec["sizes"]:
            n = batch_descs(spec, s)
            rows.append((f"{op}_gbps/{s}", f"{op.upper()} {size_label(s)} x {n} (GB/s)", True))
    rows += [
        ("lat_median_us", "4 KiB WRITE latency, median (us)", False),
        ("lat_p99_us", "4 KiB WRITE latency, p99 (us)", False),
        ("lat_first_us", "4 KiB WRITE latency, first after a pause, median (us)", False),
        ("many_ms", f"READ {spec['many_descs']} x 4 KiB scattered, prepped (ms)", False),
        ("many_prep_ms", f"make_prepped_xfer of {spec['many_descs']} descs (ms)", False),
        ("runs_ms", f"READ {spec['many_descs']} x 4 KiB in runs of {RUN_BLOCKS}, prepped (ms)", False),
        ("idle_cpu_initiator_pct", "idle CPU, initiator (% of a core)", False),
        ("idle_cpu_target_pct", "idle CPU, target (% of a core)", False),
    ]
    return rows


def aggregate(runs: list[dict], configs: list[str], spec: dict) -> dict:
    summary: dict = {}
    for key, _, _ in metric_rows(spec):
        summary[key] = {}
        for c in configs:
            vals, errs = [], []
            for r in runs:
                if r["config"] != c:
                    continue
                if key in r["metrics"]:
                    vals.append(r["metrics"][key])
                else:
                    errs.append(r.get("setup_error") or r["errors"].get(key) or r.get("incomplete")
                                or "not measured")
            summary[key][c] = {"median": statistics.median(vals) if vals else None, "values": vals,
                               "n": len(vals), "errors": errs}
    return summary


def fmt_num(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render_markdown(summary: dict, configs: list[str], spec: dict, reps: int, meta: dict) -> str:
    ratios = [(a, b) for a, b in RATIOS if a in configs and b in configs]
    head = ["metric", *configs, *[f"{a} / {b}" for a, b in ratios]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for key, label, higher in metric_rows(spec):
        cells = [f"{label} {'↑' if higher else '↓'}"]
        for c in configs:
            s = summary[key][c]
            if s["median"] is None:
                reason = s["errors"][0] if s["errors"] else "no data"
                cells.append("error: " + reason.replace("|", "/"))
            else:
                cell = fmt_num(s["median"])
                if s["errors"]:
                    cell += f" ({s['n']}/{s['n'] + len(s['errors'])} reps)"
                cells.append(cell)
        for a, b in ratios:
            va, vb = summary[key][a]["median"], summary[key][b]["median"]
            cells.append(f"{va / vb:.2f}" if va is not None and vb not in (None, 0) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Medians of {reps} interleaved run(s) per configuration; one target and one initiator process "
        f"per run, on {meta['host']['cpus']} CPU(s). ↑: higher is better, ↓: lower is better. "
        "Ratios are ours / UCX (for ↑ rows above 1 is better, for ↓ rows below 1 is better).",
        f"Bandwidth: one transfer = the listed number of blocks (32, fewer where {size_label(spec['batch_cap'])} "
        "would be exceeded), post to DONE, median over iterations; every block of every transfer verified.",
        "Latency: post to DONE of one 4 KiB WRITE (no notification), busy-polled. "
        f"Scattered READ: {spec['many_descs']} non-adjacent 4 KiB blocks through prep_xfer_dlist + "
        "make_prepped_xfer with a notification, as vLLM does; post to DONE. "
        f"In runs: the same with the blocks in runs of {RUN_BLOCKS} consecutive on both sides "
        "(the runs scattered), as a request's blocks often are.",
        "Idle CPU: process CPU time over a sleep of "
        f"{spec['idle_s']:g} s after the workloads, progress thread on, buffers registered, remote loaded.",
    ]
    return "\n".join(lines + notes) + "\n"


# ---- plugin placement ------------------------------------------------------------------------

class PluginBesideWheel:
    """Copies our plugin into the wheel's plugins/ directory for the run; restores it afterwards."""

    def __init__(self, src: Path, plugins_dir: Path):
        self.src, self.dest = src, plugins_dir / "libplugin_Mooncake.so"
        self.backup: Path | None = None
        self.installed = False

    def __enter__(self):
        if self.dest.exists():
            fd, tmp = tempfile.mkstemp(prefix="libplugin_Mooncake.", suffix=".saved")
            os.close(fd)
            shutil.copy2(self.dest, tmp)
            self.backup = Path(tmp)
        tmp = self.dest.with_name(f".{self.dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(self.src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, self.dest)  # never rewrite a file someone may have mapped
        self.installed = True
        return self

    def __exit__(self, *exc):
        if not self.installed:
            return
        if self.backup is not None:
            tmp = self.dest.with_name(f".{self.dest.name}.{os.getpid()}.tmp")
            shutil.copy2(self.backup, tmp)
            os.replace(tmp, self.dest)
            self.backup.unlink()
        else:
            self.dest.unlink(missing_ok=True)


def find_wheel_plugins_dir() -> Path:
    spec = importlib.util.find_spec("nixl_cu12")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("harness: nixl-cu12 is not importable by this python; run it with the venv of "
                 "scripts/setup-venv.sh (or use scripts/bench-compare.sh)")
    return Path(list(spec.submodule_search_locations)[0]).parent / ".nixl_cu12.mesonpy.libs" / "plugins"


def run_meta(configs: list[str], plugin: Path) -> dict:
    import importlib.metadata as md

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return None

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nixl_version": md.version("nixl-cu12"),
        "python": platform.python_version(),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release(),
                 "loadavg_start": os.getloadavg()},
        "git": {"head": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))},
        "plugin": str(plugin) if any(CONFIGS[c]["backend"] == "Mooncake" for c in configs) else None,
        "env": {**BASE_ENV, "NIXL_PLUGIN_DIR": "(unset)"},
        "configs": {c: CONFIGS[c] for c in configs},
    }


def harness_main(args) -> int:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        sys.exit(f"harness: unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    spec = default_spec(args.quick)
    if args.sizes:
        spec["sizes"] = [parse_size(s) for s in args.sizes.split(",")]
    if args.lat_iters:
        spec["lat_iters"] = args.lat_iters
    if args.idle_seconds is not None:
        spec["idle_s"] = args.idle_seconds
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    plugin = Path(args.plugin).resolve()
    plugins_dir = find_wheel_plugins_dir()
    meta = run_meta(configs, plugin)

    ours = [c for c in configs if CONFIGS[c]["backend"] == "Mooncake"]
    plugin_error = None
    if ours and not plugin.is_file():
        plugin_error = f"plugin not built ({plugin})"

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    runs: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="nixl-cmp-"))
    placement = PluginBesideWheel(plugin, plugins_dir) if ours and plugin_error is None else None
    try:
        if placement:
            placement.__enter__()
        for rep in range(1, reps + 1):
            for c in configs:
                if c in ours and plugin_error:
                    r = {"config": c, "rep": rep, "setup_error": plugin_error, "metrics": {}, "errors": {}}
                else:
                    r = run_pair(c, rep, spec, workdir, args.pair_timeout)
                runs.append(r)
                status = ("ok" if not (r.get("setup_error") or r.get("errors") or r.get("incomplete"))
                          else f"errors: {r.get('setup_error') or r.get('incomplete') or next(iter(r['errors'].values()))}")
                print(f"[harness] rep {rep}/{reps} {c:<10} {r.get('wall_s', 0):6.1f}s  {status}",
                      file=sys.stderr, flush=True)
    finally:
        kill_children()
        if placement:
            placement.__exit__(None, None, None)
        if args.keep_workdir:
            print(f"[harness] per-run logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta["host"]["loadavg_end"] = os.getloadavg()
    summary = aggregate(runs, configs, spec)
    md_text = render_markdown(summary, configs, spec, reps, meta)
    if args.markdown:
        Path(args.markdown).write_text(md_text)
    if args.json:
        ratios = {}
        for a, b in RATIOS:
            if a in configs and b in configs:
                ratios[f"{a}/{b}"] = {
                    k: (summary[k][a]["median"] / summary[k][b]["median"]
                        if summary[k][a]["median"] is not None and summary[k][b]["median"] else None)
                    for k in summary}
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "spec": spec, "reps": reps, "configs": configs, "summary": summary,
             "ratios": ratios, "runs": runs, "markdown": md_text}, indent=2, default=str))
    print(md_text, flush=True)
    failed = any(s["median"] is None or s["errors"] for row in summary.values() for s in row.values())
    return 1 if (failed and args.fail_on_error) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated configurations to run (default: all of {', '.join(CONFIGS)})")
    p.add_argument("--reps", type=int, help="repetitions of every configuration (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="CI smoke: sizes 4 KiB and 1 MiB, 1 rep, shorter loops")
    p.add_argument("--sizes", help="block sizes for the bandwidth rows, e.g. 4K,1M,64M")
    p.add_argument("--lat-iters", type=int, help="4 KiB WRITEs timed for the latency rows (default 1024)")
    p.add_argument("--idle-seconds", type=float, help="idle CPU window in seconds (default 2, --quick 1)")
    p.add_argument("--json", metavar="PATH", help="write every figure and raw run to this JSON file")
    p.add_argument("--markdown", metavar="PATH", help="also write the table to this file")
    p.add_argument("--plugin", default=str(DEFAULT_PLUGIN), help="our plugin (default target/release/...)")
    p.add_argument("--pair-timeout", type=float, default=240.0, help="seconds allowed to one pair of processes")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any cell is an error")
    p.add_argument("--keep-workdir", action="store_true", help="keep the per-run logs (path printed)")
    # internal: the bench processes
    p.add_argument("--role", choices=["target", "initiator"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--sock", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        return child_main(args)
    return harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
