#!/usr/bin/env python3
"""Soak test of the Mooncake NIXL plugin through the real NIXL 1.5.1 Python API.

    .venv/bin/python scripts/soak.py --seconds 30
    .venv/bin/python scripts/soak.py --transfers 1000000 [--seed N]

One initiator process (this one) drives transfers over every path the plugin has:

    slot               initiator (protocol)  target                         route
    auto>inproc        soak-auto (auto)      soak-inproc, this process      direct copy
    tcp>inproc         soak-tcp  (tcp)       soak-inproc, this process      TCP
    auto>stable        soak-auto (auto)      soak-stable, child process     cross-memory attach
    tcp>stable         soak-tcp  (tcp)       soak-stable, child process     TCP
    auto>restart       soak-auto (auto)      soak-restart, child process    CMA (or TCP when
                                                                            that incarnation
                                                                            runs protocol=tcp)
    tcp>restart        soak-tcp  (tcp)       soak-restart, child process    TCP

Every slot has its own region on its target and its own local buffer, and keeps
one transfer in flight (so up to six run at once).  A transfer is a READ or a
WRITE of 1 B to 16 MiB (log-distributed, mostly small, large ones rare) in 1 to
4096 descriptors (gaps between them on both sides, the remote ones permuted),
with or without a notification (given at creation, or per post), through a
fresh handle (initialize_xfer) or a prepared one (prep_xfer_dlist with decoy
descriptors + make_prepped_xfer) that is reposted up to 16 times.  Now and then
a standalone send_notif goes instead.

Checks:
  * The initiator keeps a shadow copy of every remote region.  WRITE data is
    distinct per transfer (a per-transfer seed, and a stamp in the first 8
    bytes).  Every READ is checked against the shadow (what was last written):
    every byte, the gaps between the local descriptors and 64 guard bytes on
    each side untouched, for transfers up to 1 MiB; 4 KiB windows, strided
    samples, gaps and guards for larger ones.
  * WRITEs: into the in-process target checked at once (every byte of the
    remote extent and its guards against the shadow).  Into the process
    targets, fresh WRITEs go to fresh space (an arena, no overwrite between
    checkpoints; a reposted WRITE is read back before it is overwritten), and
    at every checkpoint the target hashes its whole region, which must equal
    the shadow's hash: every byte of every WRITE, large ones included.
  * Checkpoints (per slot, every --ckpt-every s, when the arena is full, before
    a restart and at the end): the target reports the count and an
    order-independent digest of the notifications it got from that slot's
    initiator; they must equal what was sent.
  * No transfer ends in ERR, raises, or takes longer than --op-timeout, except
    around an intentional SIGKILL of the restarting target (then a DONE READ
    must still hold the right data, and a new WRITE to the dead target must
    fail).
  * The route the plugin picked, from its INFO line at add_remote_agent
    (RUST_LOG=info is set for this process unless NIXL_LOG_LEVEL/RUST_LOG is
    given), for every target and every incarnation; skipped with a note when
    the line is not there.
  * Resources (VmRSS, open fds, threads) of this process and of the stable
    target after warm-up, in the middle and at the end (and of every cleanly
    quit incarnation of the restarting target, from a sample after it ran for
    a while to its last): the growth must stay within --max-rss-mib,
    --max-fds, --max-threads.

Restarts: every --restart-every seconds the restarting target quits cleanly
(the initiators remove_remote_agent before or after that, at random) or is
SIGKILLed (with transfers in flight when possible; --kill-frac of the
restarts, at least one in a run with two or more), and a new process with the
same name comes up; both initiators add_remote_agent its new metadata.  Each
incarnation picks protocol auto or tcp.

Output: progress every --progress-every s, resource samples, and a summary line,
then "SOAK OK"; any failure prints "SOAK FAILED: ..." and exits 1.  Every child
process is killed and reaped on every way out.

Environment: if NIXL_PLUGIN_DIR is unset, a private directory with a copy of
$MOONCAKE_PLUGIN (default target/release/libplugin_Mooncake.so) is used, with
UCX_MODULES=^efa, UCX_NET_DEVICES=lo, NIXL_MOONCAKE_IP_ADDR=127.0.0.1 (as
tests/e2e/conftest.py sets them).
"""

from __future__ import annotations

import os
import sys

TARGET_CMD = "_soak_target"
IS_TARGET = len(sys.argv) > 1 and sys.argv[1] == TARGET_CMD
_CHANNEL_OUT = None
if IS_TARGET:
    # The target talks to the initiator over its stdout: move it away before NIXL
    # (or anything else) can write there.
    sys.stdout.flush()
    _CHANNEL_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KiB, MiB = 1 << 10, 1 << 20
MASK64 = (1 << 64) - 1
_OWN_PLUGIN_DIR: Optional[str] = None
_SET_RUST_LOG = False


def _prepare_environment() -> None:
    """Standalone runs: the environment conftest.py would give us."""
    global _OWN_PLUGIN_DIR, _SET_RUST_LOG
    for key, value in (("UCX_MODULES", "^efa"), ("UCX_NET_DEVICES", "lo"),
                       ("NIXL_MOONCAKE_IP_ADDR", "127.0.0.1"), ("PYTHONUNBUFFERED", "1")):
        os.environ.setdefault(key, value)
    if not os.environ.get("NIXL_PLUGIN_DIR"):
        src = Path(os.environ.get("MOONCAKE_PLUGIN") or
                   REPO / "target" / "release" / "libplugin_Mooncake.so")
        backend = os.environ.get("E2E_BACKEND", "Mooncake")
        d = tempfile.mkdtemp(prefix="soak-plugins-")
        _OWN_PLUGIN_DIR = d
        dest = Path(d) / f"libplugin_{backend}.so"
        deadline = time.monotonic() + 300
        while True:  # the plugin may be missing for a moment while it is rebuilt
            try:
                tmp = dest.with_name(f".{dest.name}.tmp")
                shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o755)
                os.replace(tmp, dest)
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    sys.exit(f"soak: plugin not found: {src} (build it: cargo build --release)")
                print(f"soak: waiting for {src} to appear", file=sys.stderr, flush=True)
                time.sleep(2)
        os.environ["NIXL_PLUGIN_DIR"] = d
    if "RUST_LOG" not in os.environ and "NIXL_LOG_LEVEL" not in os.environ:
        # The plugin's own INFO lines (which route it picked), not NIXL's per-transfer ones.
        os.environ["RUST_LOG"] = "info"
        _SET_RUST_LOG = True


if not IS_TARGET:
    _prepare_environment()

sys.path.insert(0, str(REPO / "tests" / "e2e"))
import numpy as np  # noqa: E402
import scenarios as sc  # noqa: E402  (helpers: agents, buffers, channel, fd capture)


def log(*parts: object) -> None:
    prefix = f"[soak-target {os.getpid()}]" if IS_TARGET else "soak:"
    print(prefix, *parts, file=sys.stderr if IS_TARGET else sys.stdout, flush=True)


def notif_digest(payload: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def proc_stats(pid: str = "self") -> dict:
    """VmRSS (KiB), open fds and threads of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def fd_kinds(pid: str = "self") -> collections.Counter:
    """What the open fds are (socket, pipe, anon_inode:[eventfd], /path ...)."""
    kinds: collections.Counter = collections.Counter()
    d = f"/proc/{pid}/fd"
    for fd in os.listdir(d):
        try:
            link = os.readlink(f"{d}/{fd}")
        except OSError:
            continue
        kinds[link.split(":[")[0] if ":[" in link else
              link if link.startswith("anon_inode:") else "file " + link] += 1
    return kinds


def fmt_stats(s: Optional[dict]) -> str:
    if not s:
        return "n/a"
    return f"rss {s['rss_kib'] / 1024:.1f} MiB, fds {s['fds']}, threads {s['threads']}"


def region_hash(buf: np.ndarray) -> str:
    return hashlib.sha1(memoryview(buf)).hexdigest()


# --------------------------------------------------------------------------------------
# The target process
# --------------------------------------------------------------------------------------


def target_main(parent: int) -> int:
    try:  # die with the initiator, whatever happens to it
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return 3
    chan = sc.Channel(sys.stdin, _CHANNEL_OUT)
    setup = chan.recv(timeout=120)
    assert setup["cmd"] == "setup", setup
    agent = sc.new_agent_with(setup["name"], setup["protocol"])
    regions = {r["name"]: sc.fast_pattern(r["size"], r["seed"]) for r in setup["regions"]}
    reg = sc.register(agent, *regions.values())
    counts: dict[str, list[int]] = {}

    def poll() -> None:
        for sender, msgs in agent.get_new_notifs().items():
            c = counts.setdefault(sender, [0, 0])
            for m in msgs:
                c[0] += 1
                c[1] = (c[1] + notif_digest(m)) & MASK64

    chan.send(ok=True, md=sc.b64(agent.get_agent_metadata()), pid=os.getpid(),
              addrs={k: sc.addr(v) for k, v in regions.items()})
    while True:
        try:
            msg = chan.q.get(timeout=0.05)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned (PR_SET_PDEATHSIG may come late or not at all)
                os._exit(3)
            poll()
            continue
        if msg is None:  # the initiator is gone: no teardown, nobody waits for it
            log("the initiator closed the channel; exiting")
            os._exit(3)
        cmd = msg["cmd"]
        try:
            if cmd == "ckpt":
                sender, want = msg["sender"], msg["expect"]
                deadline = time.monotonic() + msg["wait"]
                while True:
                    poll()
                    if counts.get(sender, [0])[0] >= want or time.monotonic() > deadline:
                        break
                    time.sleep(0.0005)
                settle = time.monotonic() + msg.get("settle", 0.0)
                while time.monotonic() < settle:  # extra ones that would come late
                    poll()
                    time.sleep(0.002)
                c = counts.get(sender, [0, 0])
                lo, hi = msg["range"]
                chan.send(ok=True, count=c[0], digest=c[1],
                          hash=region_hash(regions[msg["region"]][lo:hi]),
                          senders={k: v[0] for k, v in counts.items()}, stats=proc_stats())
            elif cmd == "stats":
                chan.send(ok=True, stats=proc_stats())
            elif cmd == "quit":
                poll()
                agent.deregister_memory(reg)
                del agent
                chan.send(ok=True)
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as e:  # noqa: BLE001 - reported to the initiator
            chan.send(ok=False, error=f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------
# The initiator
# --------------------------------------------------------------------------------------


class SoakFailure(Exception):
    pass


POOL_SIZE = 17 * MiB          # random bytes every data and filler pattern is cut from
RSIZE = 36 * MiB              # each slot's region on its target
LSIZE = 18 * MiB              # each slot's local buffer
GUARD = 64                    # guard bytes checked on each side of local READ extents
LARGE = 1 * MiB               # above this: uniform layout, sampled READ checks
MAX_SIZE = 16 * MiB
MAX_DESCS = 4096
IDLE, XFER, CKPT = "idle", "xfer", "ckpt"
FINAL_ROUND = [("W", 4096, 16), ("R", 4096, 16), ("W", 100, 1), ("R", 100, 1)]

# target states
UP, DRAINING, QUITTING, EXITING, STARTING, KILL_PENDING, KILLED = (
    "up", "draining", "quitting", "exiting", "starting", "kill-pending", "killed")


def log_uniform(rng, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


class Layout:
    """Where the S bytes of a transfer lie: n segments, gaps on both sides,
    the remote segments permuted.  Offsets are relative to the extent bases."""

    def __init__(self, rng, size: int, n: int):
        self.uniform = size > LARGE
        gap_choices = (0, 0, 1, 7, 64) if self.uniform else (0, 0, 1, 7, 64, 512)
        gl, gr = int(rng.choice(gap_choices)), int(rng.choice(gap_choices))
        permute = rng.random() < 0.6
        if self.uniform:
            l = size // n
            self.size, self.n, self.l = n * l, n, l
            self.lstride, self.rstride = l + gl, l + gr
            self.lengths = np.full(n, l, dtype=np.int64)
            self.perm = rng.permutation(n) if permute else np.arange(n)
            self.loff = np.arange(n, dtype=np.int64) * self.lstride
            self.roff = self.perm.astype(np.int64) * self.rstride
            self.lext, self.rext = n * self.lstride, n * self.rstride
        else:
            self.size, self.n = size, n
            if n == 1:
                lengths = np.array([size], dtype=np.int64)
            else:
                if 4 * (n - 1) > size - 1:
                    cuts = np.sort(rng.permutation(size - 1)[:n - 1]) + 1
                else:  # n - 1 distinct cut points, cheaply (collisions are rare)
                    cuts = np.unique(rng.integers(1, size, n - 1))
                    while len(cuts) < n - 1:
                        cuts = np.unique(np.concatenate(
                            (cuts, rng.integers(1, size, n - 1 - len(cuts)))))
                n = len(cuts) + 1
                self.n = n
                lengths = np.diff(np.concatenate(([0], cuts, [size]))).astype(np.int64)
            self.lengths = lengths
            lg = rng.integers(0, gl + 1, n) if gl else np.zeros(n, dtype=np.int64)
            rg = rng.integers(0, gr + 1, n) if gr else np.zeros(n, dtype=np.int64)
            steps = lengths + lg
            self.loff = np.concatenate(([0], np.cumsum(steps)[:-1])).astype(np.int64)
            self.lext = int(steps.sum())
            order = rng.permutation(n) if permute else np.arange(n)
            rsteps = lengths[order] + rg
            rpos = np.concatenate(([0], np.cumsum(rsteps)[:-1])).astype(np.int64)
            self.roff = np.empty(n, dtype=np.int64)
            self.roff[order] = rpos
            self.rext = int(rsteps.sum())
            self.cum = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
            self._idx = None
        self.gaps = (gl, gr)

    def describe(self) -> str:
        kind = "uniform" if self.uniform else "random"
        return (f"{self.size} B in {self.n} desc(s) ({kind} lengths, gaps <= {self.gaps[0]} local / "
                f"{self.gaps[1]} remote, extents {self.lext} / {self.rext})")

    def table(self, base: int, offs: np.ndarray) -> np.ndarray:
        t = np.zeros((self.n, 3), dtype=np.uint64)
        t[:, 0] = np.uint64(base) + offs.astype(np.uint64)
        t[:, 1] = self.lengths.astype(np.uint64)
        return t

    def _indices(self):
        if self._idx is None:
            lengths = self.lengths
            within = np.arange(self.size, dtype=np.int64) - np.repeat(self.cum, lengths)
            self._idx = (np.repeat(self.loff, lengths) + within, np.repeat(self.roff, lengths) + within)
        return self._idx

    # The logical stream (S bytes) in and out of either side.
    def put(self, side: str, buf: np.ndarray, base: int, data: np.ndarray) -> None:
        offs = self.loff if side == "l" else self.roff
        if self.n == 1:
            buf[base:base + self.size] = data
        elif self.uniform:
            stride = self.lstride if side == "l" else self.rstride
            view = buf[base:base + self.n * stride].reshape(self.n, stride)[:, :self.l]
            if side == "l":
                view[:] = data.reshape(self.n, self.l)
            else:
                view[self.perm] = data.reshape(self.n, self.l)
        elif self.n <= 32:
            for o, c, ln in zip(offs.tolist(), self.cum.tolist(), self.lengths.tolist()):
                buf[base + o:base + o + ln] = data[c:c + ln]
        else:
            idx = self._indices()[0 if side == "l" else 1]
            buf[base:base + (self.lext if side == "l" else self.rext)][idx] = data

    def get(self, side: str, buf: np.ndarray, base: int) -> np.ndarray:
        offs = self.loff if side == "l" else self.roff
        if self.n == 1:
            return buf[base:base + self.size].copy()
        if self.uniform:
            stride = self.lstride if side == "l" else self.rstride
            view = buf[base:base + self.n * stride].reshape(self.n, stride)[:, :self.l]
            return (view if side == "l" else view[self.perm]).reshape(-1).copy()
        if self.n <= 32:
            return np.concatenate([buf[base + o:base + o + ln]
                                   for o, ln in zip(offs.tolist(), self.lengths.tolist())])
        idx = self._indices()[0 if side == "l" else 1]
        return buf[base:base + (self.lext if side == "l" else self.rext)][idx]


def first_diff(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.flatnonzero(got != want)
    if len(bad) == 0:
        return "no difference?"
    i = int(bad[0])
    return (f"{len(bad)} of {len(got)} bytes differ, first at {i}: got "
            f"{bytes(got[i:i + 16]).hex()} want {bytes(want[i:i + 16]).hex()}")


def equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.nbytes <= 64 * KiB:
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))


class Op:
    """One post of a transfer (a series reposts one handle several times)."""

    def __init__(self, slot: "Slot", kind: str, lay: Layout, lb: int, rb: int):
        self.slot, self.kind, self.lay, self.lb, self.rb = slot, kind, lay, lb, rb
        self.handle = None
        self.series: Optional["Series"] = None
        self.probe = False
        self.inc = slot.target.inc
        self.filler: Optional[tuple[int, int]] = None  # (pool offset, xor) of the READ extent
        self.seed: Optional[tuple[int, int]] = None
        self.t_post = 0.0
        self.notif: Optional[bytes] = None

    def describe(self) -> str:
        how = ("probe" if self.probe else
               f"prepped handle, post {self.series.done + 1} of {self.series.k}" if self.series
               else "fresh handle")
        return (f"{self.slot.name} {self.kind} #{self.slot.seq} ({how}) of {self.lay.describe()}, "
                f"local base {self.lb}, remote base {self.rb}, notification {self.notif!r}"[:400])


class Series:
    """A prepared pair of dlists (with decoys) and up to two handles, reposted k times."""

    def __init__(self, slot: "Slot", lay: Layout, lb: int, rb: int, k: int):
        self.slot, self.lay, self.lb, self.rb, self.k = slot, lay, lb, rb, k
        self.done = 0
        self.handles: dict[str, object] = {}
        self.stored: dict[str, bytes] = {}
        self.unverified_write = False
        rng, ini, tgt = slot.rng, slot.ini, slot.target
        n = lay.n
        m_l, m_r = int(rng.integers(0, 33)), int(rng.integers(0, 33))
        ltab = self._with_decoys(rng, lay.table(sc.addr(slot.local) + lb, lay.loff),
                                 sc.addr(slot.local), LSIZE, m_l)
        rtab = self._with_decoys(rng, lay.table(slot.raddr + rb, lay.roff), slot.raddr, RSIZE, m_r)
        lperm, rperm = rng.permutation(n + m_l), rng.permutation(n + m_r)
        lrows, rrows = np.empty_like(ltab), np.empty_like(rtab)
        lrows[lperm] = ltab
        rrows[rperm] = rtab
        sel = rng.permutation(n) if rng.random() < 0.5 else np.arange(n)
        self.lidx = lperm[:n][sel].astype(np.int32)
        self.ridx = rperm[:n][sel].astype(np.int32)
        self.ldl = ini.prep_xfer_dlist("NIXL_INIT_AGENT", lrows, "DRAM")
        try:
            self.rdl = ini.prep_xfer_dlist(tgt.name, rrows, "DRAM")
        except BaseException:
            ini.release_dlist_handle(self.ldl)
            raise

    @staticmethod
    def _with_decoys(rng, table: np.ndarray, base: int, size: int, m: int) -> np.ndarray:
        if m == 0:
            return table
        d = np.zeros((m, 3), dtype=np.uint64)
        lens = rng.integers(1, 4097, m)
        d[:, 0] = np.uint64(base) + rng.integers(0, size - 4096, m).astype(np.uint64)
        d[:, 1] = lens.astype(np.uint64)
        return np.vstack([table, d])

    def handle(self, kind: str):
        if kind not in self.handles:
            msg = self.slot.new_payload() if self.slot.rng.random() < 0.3 else b""
            self.handles[kind] = self.slot.ini.make_prepped_xfer(
                "WRITE" if kind == "W" else "READ", self.ldl, self.lidx, self.rdl, self.ridx, msg)
            self.stored[kind] = msg
        return self.handles[kind]

    def release(self) -> None:
        ini = self.slot.ini
        for h in self.handles.values():
            ini.release_xfer_handle(h)
        self.handles.clear()
        ini.release_dlist_handle(self.ldl)
        ini.release_dlist_handle(self.rdl)


class Slot:
    def __init__(self, soak: "Soak", index: int, name: str, ini, ini_name: str, target: "Target",
                 region: str):
        self.soak, self.index, self.name = soak, index, name
        self.ini, self.ini_name, self.target, self.region = ini, ini_name, target, region
        self.rng = np.random.default_rng([soak.seed, index])
        self.local = sc.filled(LSIZE)
        sc.register(ini, self.local)
        self.state = IDLE
        self.op: Optional[Op] = None
        self.series: Optional[Series] = None
        self.seq = 0
        self.forced: collections.deque = collections.deque()
        self.hold = False            # no new work (warm-up/final done, or target restarting)
        self.phase_ckpt = False      # the checkpoint that ends the current phase is done
        self.transfers = 0
        self.bytes = 0
        self.latency = 0.0
        self.recent: collections.deque = collections.deque(maxlen=8)
        self.ckpt_deadline = 0.0
        self.ckpt_cb: Optional[Callable[[], None]] = None
        self.ckpts = 0
        self.reset_remote()

    # -- the remote region ----------------------------------------------------------------
    def reset_remote(self) -> None:
        """A (new) target incarnation: the region holds its initial pattern."""
        spec = self.target.region_spec(self.region)
        self.raddr = self.target.addrs[self.region]
        self.shadow = sc.fast_pattern(RSIZE, spec["seed"])
        self.arena = int(self.rng.integers(0, 4096))
        self.epoch_lo = self.arena
        self.recent.clear()
        self.sent_count = 0
        self.sent_digest = 0
        self.last_ckpt = time.monotonic()
        self.killed_done = False

    def alloc_write(self, rext: int) -> Optional[int]:
        rb = self.arena + int(self.rng.integers(0, 65))
        if rb + rext > RSIZE:
            return None
        self.arena = rb + rext
        return rb

    def pick_read(self, rext: int) -> int:
        if self.recent and self.rng.random() < 0.5:
            wb, wext = self.recent[int(self.rng.integers(0, len(self.recent)))]
            rb = wb + int(self.rng.integers(-rext // 2 - 1, wext + 1))
        else:
            rb = int(self.rng.integers(0, RSIZE - rext + 1))
        return max(0, min(RSIZE - rext, rb))

    def pick_local(self, lext: int) -> int:
        return int(self.rng.integers(GUARD, LSIZE - lext - GUARD + 1))

    # -- random choices ------------------------------------------------------------------
    def pick_size(self) -> int:
        a = self.soak.args
        if self.target.state == KILL_PENDING and self.rng.random() < 0.7:
            return log_uniform(self.rng, 4 * MiB, MAX_SIZE)  # something in flight for the kill
        u = self.rng.random()
        if u < a.large_frac:
            return log_uniform(self.rng, LARGE + 1, MAX_SIZE)
        if u < a.large_frac + a.medium_frac:
            return log_uniform(self.rng, 64 * KiB + 1, LARGE)
        return log_uniform(self.rng, 1, 64 * KiB)

    def pick_descs(self, size: int) -> int:
        u = self.rng.random()
        if u < 0.5:
            n = 1
        elif u < 0.75:
            n = log_uniform(self.rng, 2, 16)
        elif u < 0.92:
            n = log_uniform(self.rng, 17, 256)
        else:
            n = log_uniform(self.rng, 257, MAX_DESCS)
        return max(1, min(n, size if size <= LARGE else size // 256))

    def new_payload(self) -> bytes:
        self.soak.payload_seq += 1
        p = b"%s|%d|%d" % (self.name.encode(), self.target.inc, self.soak.payload_seq)
        r = self.rng.random()
        if r < 0.2:
            p += bytes(self.rng.integers(0, 256, int(self.rng.integers(1, 64)), dtype=np.uint8))
        elif r < 0.21:
            p += bytes(self.rng.integers(0, 256, int(self.rng.integers(1024, 4097)), dtype=np.uint8))
        return p

    # -- data ------------------------------------------------------------------------------
    def fill_write(self, op: Op) -> None:
        """New data for a WRITE: into the local segments and into the shadow."""
        lay = op.lay
        s = self.soak
        o = int(self.rng.integers(0, POOL_SIZE - lay.size + 1))
        k = int(self.rng.integers(1, 256))
        data = s.pool[o:o + lay.size] ^ np.uint8(k)
        if lay.size >= 8:
            s.stamp += 1
            data[:8] = np.frombuffer(((s.stamp << 8) | self.index).to_bytes(8, "little"), np.uint8)
        op.seed = (o, k)
        lay.put("l", self.local, op.lb, data)
        lay.put("r", self.shadow, op.rb, data)

    def fill_read(self, op: Op) -> None:
        """A fresh filler over the local extent and its guards (a READ that writes
        nothing, or too much, or stale data, shows)."""
        lo, hi = op.lb - GUARD, op.lb + op.lay.lext + GUARD
        o = int(self.rng.integers(0, POOL_SIZE - (hi - lo) + 1))
        k = int(self.rng.integers(1, 256))
        np.bitwise_xor(self.soak.pool[o:o + hi - lo], np.uint8(k), out=self.local[lo:hi])
        op.filler = (o, k)

    def verify(self, op: Op) -> None:
        lay = op.lay
        inject = self.soak.args.inject
        if inject and self.soak.phase == "main" and self.soak.transfers >= 2000 and \
                not self.soak.injected and (self.target.inproc is False or inject == "read"):
            # Validation of the soak itself: a fault it must report.
            if inject == "read" and op.kind == "R":
                self.local[op.lb + int(self.rng.integers(0, lay.lext))] ^= 0x01
                self.soak.injected = True
            elif inject == "write" and op.kind == "W":
                self.shadow[op.rb + int(lay.roff[0])] ^= 0x01  # as if the byte did not land
                self.soak.injected = True
            elif inject == "notif":
                self.sent_count += 1  # as if one notification got lost
                self.soak.injected = True
            if self.soak.injected:
                log(f"injected a {inject} fault at {op.describe()}")
        if op.kind == "R":
            o, k = op.filler
            lo, hi = op.lb - GUARD, op.lb + lay.lext + GUARD
            if not lay.uniform:
                want = self.soak.pool[o:o + hi - lo] ^ np.uint8(k)
                lay.put("l", want, GUARD, lay.get("r", self.shadow, op.rb))
                got = self.local[lo:hi]
                if not equal(got, want):
                    self.soak.fail(f"READ data wrong: {op.describe()}: {first_diff(got, want)} "
                                   f"(offsets from the local extent start - {GUARD})")
            else:
                self.verify_large_read(op)
        elif self.target.inproc:
            mem = self.target.arrays[self.region]
            lo, hi = max(0, op.rb - GUARD), min(RSIZE, op.rb + lay.rext + GUARD)
            if not equal(mem[lo:hi], self.shadow[lo:hi]):
                self.soak.fail(f"WRITE landed wrong: {op.describe()}: "
                               f"{first_diff(mem[lo:hi], self.shadow[lo:hi])} (offsets from {lo})")
        if op.kind == "W":
            self.recent.append((op.rb, lay.rext))

    def verify_large_read(self, op: Op) -> None:
        """Sampled: 4 KiB windows in random and the first/last segments, strided
        samples over the whole stream, gaps of the sampled segments, guards."""
        lay, rng = op.lay, self.rng
        o, k = op.filler
        n, l = lay.n, lay.l
        lv = self.local[op.lb:op.lb + lay.lext].reshape(n, lay.lstride)
        rv = self.shadow[op.rb:op.rb + lay.rext].reshape(n, lay.rstride)
        filler = self.soak.pool[o:o + lay.lext + 2 * GUARD] ^ np.uint8(k)
        fv = filler[GUARD:GUARD + lay.lext].reshape(n, lay.lstride)
        rows = np.unique(np.concatenate(([0, n - 1], rng.integers(0, n, 6))))
        w = min(l, 4 * KiB)
        for j in rows.tolist():
            off = int(rng.integers(0, l - w + 1))
            got, want = lv[j, off:off + w], rv[lay.perm[j], off:off + w]
            if not equal(got, want):
                self.soak.fail(f"large READ data wrong: {op.describe()}: segment {j} bytes "
                               f"[{off}, +{w}): {first_diff(got, want)}")
            if lay.lstride > l and not equal(lv[j, l:], fv[j, l:]):
                self.soak.fail(f"large READ wrote into the gap after local segment {j}: "
                               f"{op.describe()}")
        p = int(rng.integers(0, 4093)) + np.arange(0, lay.size, 4093)
        p = p[p < lay.size]
        r, c = p // l, p % l
        got, want = lv[r, c], rv[lay.perm[r], c]
        if hashlib.sha1(got.tobytes()).digest() != hashlib.sha1(want.tobytes()).digest():
            self.soak.fail(f"large READ data wrong (strided samples): {op.describe()}: "
                           f"{first_diff(got, want)}")
        lo = op.lb - GUARD
        if not equal(self.local[lo:op.lb], filler[:GUARD]) or not equal(
                self.local[op.lb + lay.lext:op.lb + lay.lext + GUARD], filler[-GUARD:]):
            self.soak.fail(f"large READ wrote outside its local extent: {op.describe()}")

    # -- the state machine ----------------------------------------------------------------
    def tick(self) -> bool:
        """Advances this slot; True if something happened."""
        if self.state == XFER:
            return self.poll_xfer()
        if self.state == CKPT:
            return self.poll_ckpt()
        tgt = self.target
        if tgt.state == KILLED:
            return self.after_kill()
        if tgt.state == DRAINING:
            if self.series:
                self.end_series()
            if not self.hold:
                self.start_ckpt(final=True, then=self.set_hold)
                return True
            return False
        if tgt.state not in (UP, KILL_PENDING) or self.hold:
            return False
        if self.series:
            self.series_post()
            return True
        if self.forced:
            spec = self.forced.popleft()
            if spec is None:
                self.new_op()
            else:
                self.start_fresh(*spec)
            return True
        phase = self.soak.phase
        if phase != "main":
            if not self.phase_ckpt:
                self.phase_ckpt = True
                self.start_ckpt(final=phase == "final", then=self.set_hold)
                return True
            return False
        if (tgt.state == UP and time.monotonic() - self.last_ckpt > self.soak.args.ckpt_every):
            self.start_ckpt()
            return True
        self.new_op()
        return True

    def set_hold(self) -> None:
        self.hold = True

    def new_op(self) -> None:
        u = self.rng.random()
        if u < 0.02:
            self.send_notif()
        elif u < 0.17 and self.target.state == UP:
            self.start_series()
        else:
            self.start_fresh(None, None, None)

    def send_notif(self) -> None:
        payload = self.new_payload() if self.rng.random() < 0.9 else b""
        try:
            self.ini.send_notif(self.target.name, payload)
        except Exception as e:  # noqa: BLE001
            self.soak.fail(f"{self.name}: send_notif raised {type(e).__name__}: {e}")
        self.sent_count += 1
        self.sent_digest = (self.sent_digest + notif_digest(payload)) & MASK64
        self.soak.notifs += 1

    def start_fresh(self, kind: Optional[str], size: Optional[int], n: Optional[int]) -> None:
        rng = self.rng
        kind = kind or ("W" if rng.random() < 0.5 else "R")
        size = size or self.pick_size()
        lay = Layout(rng, size, n or self.pick_descs(size))
        if kind == "W":
            rb = self.alloc_write(lay.rext)
            if rb is None:  # the arena is full: verify it, then start over
                self.forced.appendleft((kind, size, lay.n))
                self.start_ckpt()
                return
        else:
            rb = self.pick_read(lay.rext)
        op = Op(self, kind, lay, self.pick_local(lay.lext), rb)
        self.seq += 1
        mode = rng.random()
        create_msg = self.new_payload() if 0.5 <= mode < 0.7 else b""
        post_msg = self.new_payload() if mode >= 0.7 else b""
        try:
            ld = self.ini.get_xfer_descs(lay.table(sc.addr(self.local) + op.lb, lay.loff), "DRAM")
            rd = self.ini.get_xfer_descs(lay.table(self.raddr + rb, lay.roff), "DRAM")
            op.handle = self.ini.initialize_xfer("WRITE" if kind == "W" else "READ", ld, rd,
                                                 self.target.name, create_msg)
        except Exception as e:  # noqa: BLE001
            self.failed(op, f"initialize_xfer raised {type(e).__name__}: {e}")
            return
        (self.fill_write if kind == "W" else self.fill_read)(op)
        self.post(op, post_msg or create_msg, post_msg)

    def start_series(self) -> None:
        rng = self.rng
        size = self.pick_size()
        lay = Layout(rng, size, self.pick_descs(size))
        rb = self.alloc_write(lay.rext)
        if rb is None:
            self.start_ckpt()
            return
        k = log_uniform(rng, 1, 16)
        try:
            self.series = Series(self, lay, self.pick_local(lay.lext), rb, k)
        except Exception as e:  # noqa: BLE001
            self.soak.fail(f"{self.name}: preparing dlists for {lay.describe()} raised "
                           f"{type(e).__name__}: {e}")
        self.series_post()

    def series_post(self) -> None:
        s, rng = self.series, self.rng
        if self.target.inproc:
            kind = "W" if rng.random() < 0.5 else "R"
        else:  # a WRITE is read back before the next one overwrites it
            kind = "R" if s.unverified_write else ("W" if rng.random() < 0.5 else "R")
        op = Op(self, kind, s.lay, s.lb, s.rb)
        op.series = s
        self.seq += 1
        try:
            op.handle = s.handle(kind)
        except Exception as e:  # noqa: BLE001
            self.failed(op, f"make_prepped_xfer raised {type(e).__name__}: {e}")
            return
        post_msg = self.new_payload() if rng.random() < 0.3 else b""
        if post_msg:
            s.stored[kind] = post_msg
        (self.fill_write if kind == "W" else self.fill_read)(op)
        if kind == "W":
            s.unverified_write = not self.target.inproc
        else:
            s.unverified_write = False
        self.post(op, post_msg or s.stored[kind], post_msg)

    def end_series(self) -> None:
        s, self.series = self.series, None
        try:
            s.release()
        except Exception as e:  # noqa: BLE001
            if not self.target.state == KILLED:
                self.soak.fail(f"{self.name}: releasing a prepared series raised "
                               f"{type(e).__name__}: {e}")
            log(f"{self.name}: releasing the series after the kill raised {type(e).__name__}: {e}")

    def post(self, op: Op, effective_msg: bytes, post_msg: bytes) -> None:
        self.op = op
        op.notif = effective_msg or None
        op.t_post = time.monotonic()
        try:
            state = self.ini.transfer(op.handle, post_msg)
        except Exception as e:  # noqa: BLE001
            self.failed(op, f"transfer() raised {type(e).__name__}: {e}")
            return
        if effective_msg and not op.probe:
            self.sent_count += 1
            self.sent_digest = (self.sent_digest + notif_digest(effective_msg)) & MASK64
            self.soak.notifs += 1
        if state == "DONE":
            self.complete(op)
        elif state == "PROC":
            self.state = XFER
        else:
            self.failed(op, f"transfer() returned {state!r}")

    def poll_xfer(self) -> bool:
        op = self.op
        try:
            state = self.ini.check_xfer_state(op.handle)
        except Exception as e:  # noqa: BLE001
            self.failed(op, f"check_xfer_state raised {type(e).__name__}: {e}")
            return True
        if state == "DONE":
            self.complete(op)
            return True
        if state != "PROC":
            self.failed(op, f"check_xfer_state returned {state!r}")
            return True
        age = time.monotonic() - op.t_post
        if age > self.soak.args.op_timeout:
            self.soak.fail(f"transfer still in progress after {age:.0f}s: {op.describe()}")
        if self.target.state == KILLED:
            since = time.monotonic() - max(op.t_post, self.target.t_kill)
            if since > self.soak.args.kill_timeout:
                self.soak.fail(f"transfer to the killed target neither failed nor finished "
                               f"{since:.1f}s after the kill: {op.describe()}")
        return False

    def complete(self, op: Op) -> None:
        self.state = IDLE
        killed = op.inc != self.target.inc or self.target.state == KILLED
        if op.probe:
            self.soak.fail(f"a WRITE to the SIGKILLed target reported DONE: {op.describe()}")
        if not killed or op.kind == "R":  # a READ that finished must hold the right data
            self.verify(op)
        if killed and op.kind == "R":
            self.soak.reads_across_kill += 1
        self.transfers += 1
        self.bytes += op.lay.size
        self.latency += time.monotonic() - op.t_post
        self.soak.count(op)
        if op.series is None:
            self.release(op)
        else:
            op.series.done += 1
            if op.series.done >= op.series.k or self.target.state in (DRAINING, KILLED) or \
                    (self.soak.phase != "main" and not self.forced):
                self.end_series()
        self.op = None

    def release(self, op: Op) -> None:
        try:
            self.ini.release_xfer_handle(op.handle)
        except Exception as e:  # noqa: BLE001
            self.soak.fail(f"release_xfer_handle raised {type(e).__name__}: {e}: {op.describe()}")

    def failed(self, op: Op, why: str) -> None:
        """A transfer failed: fine only around the intentional kill."""
        self.state = IDLE
        self.op = None
        tgt = self.target
        if op.inc == tgt.inc and tgt.state == KILLED:
            tgt.failures_after_kill.append((self.name, op.probe, time.monotonic() - tgt.t_kill,
                                            why.split(":")[0]))
            if op.handle is not None and op.series is None:
                try:
                    self.ini.release_xfer_handle(op.handle)
                except Exception as e:  # noqa: BLE001
                    self.soak.fail(f"releasing a failed handle after the kill raised "
                                   f"{type(e).__name__}: {e}: {op.describe()}")
            if self.series:
                self.end_series()
            if op.probe:
                self.killed_done = True
            return
        self.soak.fail(f"{why}: {op.describe()}")

    def after_kill(self) -> bool:
        """The target was killed and nothing of ours is in flight: a WRITE to the
        dead target must fail; then wait for the new incarnation."""
        if self.series:
            self.end_series()
        if self.killed_done:
            return False
        lay = Layout(self.rng, 4096, 1)
        op = Op(self, "W", lay, GUARD, 0)
        op.probe = True
        try:
            ld = self.ini.get_xfer_descs(lay.table(sc.addr(self.local) + GUARD, lay.loff), "DRAM")
            rd = self.ini.get_xfer_descs(lay.table(self.raddr, lay.roff), "DRAM")
            op.handle = self.ini.initialize_xfer("WRITE", ld, rd, self.target.name, b"dead?")
        except Exception as e:  # noqa: BLE001
            self.failed(op, f"initialize_xfer raised {type(e).__name__}: {e}")
            return True
        self.post(op, b"", b"")
        return True

    # -- checkpoints --------------------------------------------------------------------------
    def start_ckpt(self, final: bool = False, then: Optional[Callable[[], None]] = None) -> None:
        self.state = CKPT
        self.ckpt_cb = then
        self.ckpt_deadline = time.monotonic() + self.soak.args.op_timeout
        self.ckpt_final = final
        expect, digest = self.sent_count, self.sent_digest
        settle = 0.1 if final else 0.0
        # Every WRITE since the last checkpoint lies in [epoch_lo, arena): that range
        # is compared each time, the whole region at every 4th and every final one.
        if final or self.ckpts % 4 == 3:
            lo, hi = 0, RSIZE
        else:
            lo, hi = self.epoch_lo, max(self.epoch_lo, self.arena)
        self.ckpt_range = (lo, hi)
        if self.target.inproc:
            self.ckpt_expect = (expect, digest, settle)
            self.ckpt_t0 = time.monotonic()
            return
        want_hash = region_hash(self.shadow[lo:hi])
        inc = self.target.inc

        def done(reply: dict) -> None:
            if inc != self.target.inc:
                return
            self.target.record_stats(reply["stats"])
            if reply["count"] != expect or reply["digest"] != digest:
                self.soak.fail(f"{self.name}: target {self.target.name} (process "
                               f"{self.target.pid}) got {reply['count']} notification(s) from "
                               f"{self.ini_name}, {expect} were sent (digest "
                               f"{'matches' if reply['digest'] == digest else 'differs'}); "
                               f"counts per sender there: {reply['senders']}")
            if reply["hash"] != want_hash:
                self.soak.fail(f"{self.name}: region {self.region} [{lo}, {hi}) of target "
                               f"{self.target.name} (process {self.target.pid}) differs from "
                               f"what was written (sha1 {reply['hash']} != shadow {want_hash}); "
                               f"last writes (base, extent): {list(self.recent)}")
            self.ckpt_done()

        self.target.request("ckpt", done, region=self.region, sender=self.ini_name,
                            expect=expect, wait=self.soak.args.op_timeout / 2, settle=settle,
                            range=[lo, hi])

    def poll_ckpt(self) -> bool:
        if not self.target.inproc:
            if time.monotonic() > self.ckpt_deadline:
                self.soak.fail(f"{self.name}: no checkpoint reply within "
                               f"{self.soak.args.op_timeout:.0f}s")
            return False
        expect, digest, settle = self.ckpt_expect
        got = self.target.counts.get(self.ini_name, [0, 0])
        now = time.monotonic()
        if got[0] < expect and now < self.ckpt_deadline:
            return False
        if now - self.ckpt_t0 < settle:
            return False
        if got[0] != expect or got[1] != digest:
            self.soak.fail(f"{self.name}: in-process target got {got[0]} notification(s) from "
                           f"{self.ini_name}, {expect} were sent (digest "
                           f"{'matches' if got[1] == digest else 'differs'})")
        lo, hi = self.ckpt_range
        mem, shadow = self.target.arrays[self.region][lo:hi], self.shadow[lo:hi]
        if not equal(mem, shadow):
            self.soak.fail(f"{self.name}: in-process region differs from the shadow: "
                           f"{first_diff(mem, shadow)} (offsets from {lo})")
        self.ckpt_done()
        return True

    def ckpt_done(self) -> None:
        self.state = IDLE
        self.ckpts += 1
        self.soak.ckpts += 1
        self.last_ckpt = time.monotonic()
        self.arena = int(self.rng.integers(0, 4096))  # everything in it is verified
        self.epoch_lo = self.arena
        cb, self.ckpt_cb = self.ckpt_cb, None
        if cb:
            cb()


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


class Target:
    inproc = False

    def __init__(self, soak: "Soak", name: str, regions: list[str]):
        self.soak, self.name, self.region_names = soak, name, regions
        self.inc = 0
        self.state = UP
        self.slots: list[Slot] = []
        self.addrs: dict[str, int] = {}
        self.specs: dict[str, dict] = {}
        self.failures_after_kill: list = []
        self.t_kill = 0.0

    def region_spec(self, region: str) -> dict:
        return self.specs[region]

    def new_specs(self) -> list[dict]:
        self.specs = {r: {"name": r, "size": RSIZE,
                          "seed": (self.soak.seed * 1000003 + hash_name(self.name) * 7919 +
                                   self.inc * 101 + i) & 0xFFFFFFFF}
                      for i, r in enumerate(self.region_names)}
        return list(self.specs.values())


def hash_name(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


class InProcTarget(Target):
    inproc = True

    def __init__(self, soak: "Soak", name: str, regions: list[str]):
        super().__init__(soak, name, regions)
        self.agent = sc.new_agent_with(name, "auto")
        self.arrays = {s["name"]: sc.fast_pattern(s["size"], s["seed"]) for s in self.new_specs()}
        sc.register(self.agent, *self.arrays.values())
        self.addrs = {k: sc.addr(v) for k, v in self.arrays.items()}
        self.md = self.agent.get_agent_metadata()
        self.pid = os.getpid()
        self.protocol = "auto"
        self.counts: dict[str, list[int]] = {}

    def poll(self) -> None:
        for sender, msgs in self.agent.get_new_notifs().items():
            c = self.counts.setdefault(sender, [0, 0])
            for m in msgs:
                c[0] += 1
                c[1] = (c[1] + notif_digest(m)) & MASK64


class ProcTarget(Target):
    """A target agent in a child process of ours, driven over its stdin/stdout."""

    def __init__(self, soak: "Soak", name: str, regions: list[str], protocols: tuple[str, ...],
                 restarts: bool):
        super().__init__(soak, name, regions)
        self.protocols, self.restarts = protocols, restarts
        self.proc: Optional[subprocess.Popen] = None
        self.pending: collections.deque = collections.deque()
        self.state = STARTING
        self.inc = -1
        self.removed = False
        self.inc_stats: dict = {}
        self.deadline = 0.0
        self.kill_mode = False

    def spawn(self) -> None:
        self.inc += 1
        self.protocol = self.protocols[int(self.soak.rng.integers(0, len(self.protocols)))]
        env = dict(os.environ)
        if _SET_RUST_LOG:
            env.pop("RUST_LOG", None)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), TARGET_CMD, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.soak.children.append(self.proc)
        self.chan = sc.Channel(self.proc.stdout, self.proc.stdin)
        self.pending.clear()
        self.state = STARTING
        self.t_spawn = time.monotonic()
        self.inc_stats = {"first": None, "last": None}
        self.request("setup", self.on_hello, name=self.name, protocol=self.protocol,
                     regions=self.new_specs(), timeout=120)

    def on_hello(self, reply: dict) -> None:
        self.md = sc.unb64(reply["md"])
        self.pid = reply["pid"]
        self.addrs = reply["bufs"] if "bufs" in reply else reply["addrs"]
        self.removed = False
        for ini_name in self.soak.agents:
            self.soak.add_remote(ini_name, self)
        for s in self.slots:
            s.reset_remote()
            s.hold = False
            if self.soak.phase == "final":  # came back during the final round: do it too
                s.forced.extend(FINAL_ROUND)
                s.phase_ckpt = False
        self.state = UP
        self.t_up = time.monotonic()
        log(f"target {self.name} incarnation {self.inc} is process {self.pid} "
            f"(protocol={self.protocol}), {time.monotonic() - self.t_spawn:.2f}s to start")

    def request(self, cmd: str, cb: Callable[[dict], None], timeout: Optional[float] = None,
                **fields) -> None:
        try:
            self.chan.send(cmd=cmd, **fields)
        except (BrokenPipeError, OSError) as e:
            self.soak.fail(f"target {self.name}: cannot send {cmd!r}: {e}")
        t = self.soak.args.op_timeout if timeout is None else timeout
        self.pending.append((cmd, time.monotonic() + t, cb, self.inc))

    def poll(self) -> bool:
        did = False
        while self.pending:
            try:
                msg = self.chan.q.get_nowait()
            except queue.Empty:
                cmd, deadline, _, _ = self.pending[0]
                if time.monotonic() > deadline:
                    self.soak.fail(f"target {self.name} (process {self.proc.pid}): no answer "
                                   f"to {cmd!r} in time")
                break
            cmd, _, cb, inc = self.pending.popleft()
            if msg is None:
                self.soak.fail(f"target {self.name} (process {self.proc.pid}) closed its channel "
                               f"(exit status {self.proc.poll()}) while {cmd!r} was pending")
            if not msg.get("ok"):
                self.soak.fail(f"target {self.name}, command {cmd!r}: {msg.get('error')}")
            if inc == self.inc:
                cb(msg)
            did = True
        return did

    def wait_reply(self, cmd: str, **fields) -> dict:
        """A request whose answer we wait for (only where nothing else runs)."""
        box: list = []
        self.request(cmd, box.append, **fields)
        deadline = time.monotonic() + self.soak.args.op_timeout
        while not box:
            if not self.poll():
                time.sleep(0.001)
            if time.monotonic() > deadline:
                self.soak.fail(f"target {self.name}: no answer to {cmd!r}")
        return box[0]

    def record_stats(self, stats: dict) -> None:
        self.last_stats = stats
        if self.inc_stats.get("first") is None and time.monotonic() - self.t_up > 2.0:
            self.inc_stats["first"] = stats
        self.inc_stats["last"] = stats

    # -- restarts ----------------------------------------------------------------------------
    def begin_restart(self, kill: bool) -> None:
        self.kill_mode = kill
        self.t_restart = time.monotonic()
        if kill:
            self.state = KILL_PENDING
        else:
            self.state = DRAINING
        log(f"restart #{self.soak.restarts + 1} of {self.name} (process {self.pid}): "
            f"{'SIGKILL' if kill else 'clean quit'}")

    def tick(self) -> bool:
        did = self.poll()
        now = time.monotonic()
        if self.state == KILL_PENDING:
            inflight = any(s.state == XFER and s.op is not None and s.op.lay.size >= MiB
                           for s in self.slots)
            if not self.pending and (inflight or now - self.t_restart > 2.0):
                self.kill(inflight)
                did = True
        elif self.state == DRAINING:
            if all(s.hold and s.state == IDLE for s in self.slots) and not self.pending:
                self.check_incarnation_stats()
                if self.soak.rng.random() < 0.5:
                    self.remove_everywhere("before it quits")
                self.state = QUITTING
                self.request("quit", lambda _: None)
                self.deadline = now + self.soak.args.op_timeout
                did = True
        elif self.state == QUITTING:
            if not self.pending:
                self.state = EXITING
        if self.state == EXITING:
            rc = self.proc.poll()
            if rc is None:
                if now > self.deadline:
                    self.soak.fail(f"target {self.name} (process {self.proc.pid}) answered "
                                   f"'quit' but did not exit")
                return did
            if rc != 0:
                self.soak.fail(f"target {self.name} (process {self.proc.pid}) quit with status {rc}")
            self.after_exit()
            did = True
        elif self.state == KILLED:
            if all(s.state == IDLE and s.killed_done for s in self.slots):
                self.after_exit()
                did = True
        return did

    def kill(self, inflight: bool) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.t_kill = time.monotonic()
        self.proc.wait(timeout=30)
        self.state = KILLED
        self.failures_after_kill = []
        busy = [s.name for s in self.slots if s.state == XFER]
        log(f"SIGKILLed {self.name} (process {self.pid}); in flight then: "
            f"{', '.join(busy) or 'nothing'}")

    def close_channel(self) -> None:
        """The incarnation is gone: its pipes go too (after the reader saw EOF)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.chan.q.get(timeout=0.1) is None:
                    break
            except queue.Empty:
                pass
        self.proc.stdout.close()

    def after_exit(self) -> None:
        self.close_channel()
        if self.kill_mode:
            fails = self.failures_after_kill
            log(f"{self.name} killed: {len(fails)} failure(s) around the kill: " + "; ".join(
                f"{n}{' (probe)' if p else ''} after {dt * 1e3:.1f} ms: {w}"
                for n, p, dt, w in fails))
            self.soak.kills += 1
        self.remove_everywhere("after it exited")
        self.soak.restarts += 1
        self.soak.schedule_restart()
        for s in self.slots:
            s.hold = True
            s.killed_done = False
        self.spawn()

    def remove_everywhere(self, when: str) -> None:
        if self.removed:
            return
        for ini_name, ini in self.soak.agents.items():
            try:
                if ini.check_remote_metadata(self.name):
                    ini.remove_remote_agent(self.name)
            except Exception as e:  # noqa: BLE001
                self.soak.fail(f"{ini_name}: remove_remote_agent({self.name}) {when} raised "
                               f"{type(e).__name__}: {e}")
        self.removed = True

    def check_incarnation_stats(self) -> None:
        first, last = self.inc_stats.get("first"), self.inc_stats.get("last")
        if first and last:
            self.soak.check_growth(f"{self.name} incarnation {self.inc} (process {self.pid})",
                                   first, last)
            self.soak.inc_checked += 1


# --------------------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.rng = np.random.default_rng([args.seed, 999])
        self.pool = np.random.default_rng([args.seed, 1]).integers(0, 256, POOL_SIZE, dtype=np.uint8)
        self.children: list[subprocess.Popen] = []
        self.phase = "warmup"
        self.transfers = self.bytes = self.notifs = self.restarts = self.kills = 0
        self.ckpts = self.stamp = self.payload_seq = 0
        self.reads_across_kill = 0
        self.injected = False
        self.inc_checked = 0
        self.route_checks = {"checked": 0, "skipped": 0}
        self.kinds = collections.Counter()
        self.stats: dict[str, dict] = {}
        self.fd_kinds: dict[str, collections.Counter] = {}
        self.t_start = time.monotonic()

    def fail(self, why: str) -> None:
        raise SoakFailure(why)

    def count(self, op: Op) -> None:
        self.transfers += 1
        self.bytes += op.lay.size
        self.kinds[(op.kind, "prepped" if op.series else "fresh")] += 1

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        assert sc.BACKEND == "Mooncake", f"the soak drives the Mooncake backend, not {sc.BACKEND!r}"
        self.agents = {"soak-auto": sc.new_agent_with("soak-auto", "auto"),
                       "soak-tcp": sc.new_agent_with("soak-tcp", "tcp")}
        self.inproc = InProcTarget(self, "soak-inproc", ["from-auto", "from-tcp"])
        self.stable = ProcTarget(self, "soak-stable", ["from-auto", "from-tcp"], ("auto",), False)
        self.restarting = ProcTarget(self, "soak-restart", ["from-auto", "from-tcp"],
                                     ("auto", "auto", "tcp"), True)
        self.proc_targets = [self.stable, self.restarting]
        for t in self.proc_targets:
            t.spawn()
        for ini in ("soak-auto", "soak-tcp"):
            self.add_remote(ini, self.inproc)
        self.slots: list[Slot] = []
        for i, (ini, tgt) in enumerate([("soak-auto", self.inproc), ("soak-tcp", self.inproc),
                                        ("soak-auto", self.stable), ("soak-tcp", self.stable),
                                        ("soak-auto", self.restarting), ("soak-tcp", self.restarting)]):
            if not tgt.inproc:
                while tgt.state == STARTING:  # the first hello (slots need the addresses)
                    if not tgt.poll():
                        time.sleep(0.005)
                    if tgt.proc.poll() is not None:
                        self.fail(f"target {tgt.name} exited with {tgt.proc.returncode} at start")
            region = "from-auto" if ini == "soak-auto" else "from-tcp"
            slot = Slot(self, i, f"{ini[5:]}>{tgt.name[5:]}", self.agents[ini], ini, tgt, region)
            tgt.slots.append(slot)
            self.slots.append(slot)
        for s in self.slots:
            # warm-up: the biggest transfers each way, then a mix
            s.forced.extend([("W", MAX_SIZE, int(s.rng.integers(1, MAX_DESCS + 1))),
                             ("R", MAX_SIZE, int(s.rng.integers(1, MAX_DESCS + 1))),
                             ("W", 4096, 4096), ("R", 4096, 4096)])
            s.forced.extend([None] * 60)

    def add_remote(self, ini_name: str, tgt: Target) -> None:
        """add_remote_agent, and the route the plugin says it picked."""
        ini = self.agents[ini_name]
        with sc.capture_fds() as cap:
            loaded = ini.add_remote_agent(tgt.md)
        text = cap["text"]
        for line in text.splitlines():
            print(f"  [{ini_name} add_remote_agent] {line}", flush=True)
        if loaded not in (tgt.name, tgt.name.encode()):
            self.fail(f"add_remote_agent returned {loaded!r}, expected {tgt.name!r}")
        ini_proto = "tcp" if ini_name == "soak-tcp" else "auto"
        if tgt.inproc:
            want = "by direct copy" if ini_proto == "auto" else "by TCP to "
        elif ini_proto == "auto" and tgt.protocol == "auto":
            want = f"by cross-memory attach (pid {tgt.pid}"
        else:
            want = "by TCP to "
        lines = [ln for ln in text.splitlines() if "reaches agent" in ln and ini_name in ln
                 and tgt.name in ln]
        if not lines:
            self.route_checks["skipped"] += 1
            if self.route_checks["skipped"] == 1:
                log(f"route check skipped: no 'reaches agent' INFO line from the plugin "
                    f"(RUST_LOG={os.environ.get('RUST_LOG')!r}, "
                    f"NIXL_LOG_LEVEL={os.environ.get('NIXL_LOG_LEVEL')!r})")
            return
        if len(lines) != 1 or want not in lines[0]:
            self.fail(f"{ini_name} -> {tgt.name} (process {tgt.pid}, protocol={tgt.protocol}): "
                      f"expected a route {want!r}, the plugin said {lines!r}")
        self.route_checks["checked"] += 1
        log(f"route {ini_name} -> {tgt.name} (process {tgt.pid}): {want.strip()}")

    # -- restarts ------------------------------------------------------------------------------
    def schedule_restart(self) -> None:
        self.next_restart = time.monotonic() + self.args.restart_every

    def maybe_restart(self) -> None:
        t = self.restarting
        if self.phase != "main" or t.state != UP or time.monotonic() < self.next_restart:
            return
        if self.args.restart_every <= 0:
            return
        n = self.restarts  # completed ones
        kill = self.rng.random() < self.args.kill_frac or (n >= 1 and self.kills == 0)
        t.begin_restart(kill)

    # -- resources -------------------------------------------------------------------------
    def sample(self, when: str) -> None:
        s = {"initiator": proc_stats()}
        self.fd_kinds[when] = fd_kinds()
        for t in self.proc_targets:  # (only where no slot is busy: start and end)
            if t.state == UP:
                s[t.name if t is self.stable else f"{t.name}#{t.inc}"] = \
                    t.wait_reply("stats")["stats"]
        self.stats[when] = s
        for k, v in s.items():
            log(f"resources {when:5s} {k:18s} {fmt_stats(v)}")

    def check_growth(self, what: str, a: dict, b: dict) -> None:
        g = self.args
        rss = (b["rss_kib"] - a["rss_kib"]) / 1024
        fds, thr = b["fds"] - a["fds"], b["threads"] - a["threads"]
        if rss > g.max_rss_mib or fds > g.max_fds or thr > g.max_threads:
            self.fail(f"{what}: resources grew beyond the bounds (RSS +{rss:.1f} MiB of "
                      f"+{g.max_rss_mib}, fds {fds:+d} of +{g.max_fds}, threads {thr:+d} of "
                      f"+{g.max_threads}): from {fmt_stats(a)} to {fmt_stats(b)}")

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> str:
        a = self.args
        self.setup()
        log(f"{len(self.slots)} slots: " + ", ".join(
            f"{s.name} (target process {s.target.pid})" for s in self.slots))
        t0 = time.monotonic()
        self.loop(lambda: all(s.hold and s.state == IDLE for s in self.slots))
        log(f"warm-up done in {time.monotonic() - t0:.1f}s: {self.transfers} transfers, "
            f"{self.bytes / MiB:.0f} MiB, every slot checkpointed")
        self.sample("start")
        warm_transfers, warm_bytes, warm_notifs = self.transfers, self.bytes, self.notifs
        self.phase = "main"
        for s in self.slots:
            s.hold = False
        self.schedule_restart()
        self.t_main = time.monotonic()
        mid_done = [False]

        def main_done() -> bool:
            done_t = self.transfers - warm_transfers
            el = time.monotonic() - self.t_main
            frac = done_t / a.transfers if a.transfers else el / a.seconds
            if not mid_done[0] and frac >= 0.5:
                mid_done[0] = True
                self.sample_mid()
            return frac >= 1.0

        self.loop(main_done)
        t_main_end = time.monotonic()
        main_transfers = self.transfers - warm_transfers
        main_bytes = self.bytes - warm_bytes
        main_notifs = self.notifs - warm_notifs
        main_dt = t_main_end - self.t_main
        log(f"main phase: {main_transfers} transfers in {main_dt:.1f}s; final round")
        self.phase = "final"
        for s in self.slots:
            s.phase_ckpt = False
            s.forced.extend(FINAL_ROUND)
        self.loop(lambda: all(s.hold and s.state == IDLE and s.target.state == UP
                              for s in self.slots))
        self.end_sample()
        for s in self.slots:
            log(f"slot {s.name:12s} {s.transfers:8d} transfers {s.bytes / MiB:9.0f} MiB, "
                f"mean time to DONE {s.latency / max(1, s.transfers) * 1e6:6.0f} us, "
                f"{s.ckpts} checkpoints")
        log("transfers by kind: " + ", ".join(
            f"{'WRITE' if op == 'W' else 'READ'} {how} {n}"
            for (op, how), n in sorted(self.kinds.items())))
        summary = (
            f"SOAK SUMMARY seed={self.seed} transfers={main_transfers} "
            f"(+{warm_transfers} warm-up, +{self.transfers - warm_transfers - main_transfers} final) "
            f"bytes={main_bytes} ({main_bytes / 2**30:.2f} GiB) duration={main_dt:.1f}s "
            f"rate={main_transfers / main_dt:.0f} transfers/s "
            f"({main_bytes / main_dt / 2**20:.0f} MiB/s) notifications={main_notifs} "
            f"restarts={self.restarts} (kills={self.kills}) checkpoints={self.ckpts} "
            f"routes checked={self.route_checks['checked']} skipped={self.route_checks['skipped']} "
            + " ".join(self.resource_line(k) for k in ("initiator", self.stable.name)))
        return summary

    def sample_mid(self) -> None:
        s = {"initiator": proc_stats()}
        self.stats["mid"] = s
        log(f"resources mid   {'initiator':18s} {fmt_stats(s['initiator'])}")
        for t in self.proc_targets:
            if t.state == UP:
                key = t.name if t is self.stable else f"{t.name}#{t.inc}"

                def got(reply: dict, key=key) -> None:
                    s[key] = reply["stats"]
                    log(f"resources mid   {key:18s} {fmt_stats(reply['stats'])}")

                t.request("stats", got)

    def end_sample(self) -> None:
        self.sample("end")
        start, end = self.stats["start"], self.stats["end"]
        for key in ("initiator", self.stable.name):
            a, b = start[key], end[key]
            deadline = time.monotonic() + 5.0
            while True:  # threads/fds of closed connections may take a moment to go
                try:
                    self.check_growth(key, a, b)
                    break
                except SoakFailure as e:
                    if time.monotonic() > deadline:
                        if key == "initiator":
                            now = fd_kinds()
                            grown = {k: now[k] - self.fd_kinds["start"][k] for k in now
                                     if now[k] != self.fd_kinds["start"][k]}
                            raise SoakFailure(f"{e}; fds by kind, changes: {grown}") from None
                        raise
                    time.sleep(0.25)
                    b = proc_stats() if key == "initiator" else \
                        self.stable.wait_reply("stats")["stats"]
                    end[key] = b
        log(f"incarnations of {self.restarting.name} checked for growth: {self.inc_checked}")
        changed = {k: v - self.fd_kinds["start"][k] for k, v in fd_kinds().items()
                   if v != self.fd_kinds["start"][k]}
        log(f"initiator fds by kind at the end: {dict(fd_kinds())}; changes since the start: "
            f"{changed or 'none'}")

    def resource_line(self, key: str) -> str:
        vals = [self.stats.get(w, {}).get(key) for w in ("start", "mid", "end")]

        def f(field: str, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
            return "/".join(fmt.format(v[field] / scale) if v else "-" for v in vals)

        return (f"{key}: rss_mib={f('rss_kib', 1024, '{:.1f}')} fds={f('fds')} "
                f"threads={f('threads')}")

    def loop(self, done: Callable[[], bool]) -> None:
        a = self.args
        idle = 0
        last_progress = time.monotonic()
        last_transfers = self.transfers
        last_poll = 0.0
        while True:
            now = time.monotonic()
            if now - last_poll > 0.001:
                self.inproc.poll()
                last_poll = now
            did = False
            for t in self.proc_targets:
                did |= t.tick()
            for s in self.slots:
                did |= s.tick()
            if self.phase == "main":
                self.maybe_restart()
            if now - last_progress >= a.progress_every:
                self.progress(now)
                last_progress = now
            if self.transfers != last_transfers:
                last_transfers = self.transfers
                self.t_last_transfer = now
            elif now - getattr(self, "t_last_transfer", now) > a.op_timeout + 30:
                self.fail(f"no transfer completed for {a.op_timeout + 30:.0f}s; slots: " +
                          ", ".join(f"{s.name}={s.state}/{s.target.state}" for s in self.slots))
            if done():
                return
            if did:
                idle = 0
            else:
                idle += 1
                if idle > 20:
                    time.sleep(50e-6)
                elif idle > 5:
                    time.sleep(0)

    def progress(self, now: float) -> None:
        el = now - self.t_start
        per = " ".join(f"{s.name}={s.transfers}" for s in self.slots)
        rate = ""
        if self.phase == "main":
            dt = now - self.t_main
            rate = f" main {dt:.0f}s"
        log(f"[{el:6.1f}s {self.phase}{rate}] transfers {self.transfers} "
            f"({self.transfers / el:.0f}/s) bytes {self.bytes / 2**30:.2f} GiB notifs {self.notifs} "
            f"restarts {self.restarts} (kills {self.kills}) ckpts {self.ckpts} | {per} | "
            f"load {os.getloadavg()[0]:.1f}")

    def teardown(self) -> None:
        """Clean exit: the targets quit, the initiators forget them, buffers go."""
        for t in self.proc_targets:
            if t.state == UP:
                t.remove_everywhere("at the end")
                t.wait_reply("quit")
                rc = t.proc.wait(timeout=self.args.op_timeout)
                if rc != 0:
                    self.fail(f"target {t.name} exited with status {rc} at the end")
        for ini_name, ini in self.agents.items():
            if ini.check_remote_metadata(self.inproc.name):
                ini.remove_remote_agent(self.inproc.name)

    def kill_children(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()  # only our own children
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Soak test of the Mooncake NIXL plugin.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--transfers", type=int, help="main-phase transfers to run")
    g.add_argument("--seconds", type=float, help="main-phase duration (default 30)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--large-frac", type=float, default=0.002,
                   help="fraction of transfers of 1-16 MiB (default 0.002)")
    p.add_argument("--medium-frac", type=float, default=0.03,
                   help="fraction of transfers of 64 KiB-1 MiB (default 0.03)")
    p.add_argument("--restart-every", type=float, default=8.0,
                   help="seconds between restarts of the restarting target (0: never)")
    p.add_argument("--kill-frac", type=float, default=0.3, help="share of restarts by SIGKILL")
    p.add_argument("--ckpt-every", type=float, default=3.0, help="seconds between checkpoints")
    p.add_argument("--progress-every", type=float, default=5.0)
    p.add_argument("--op-timeout", type=float, default=60.0,
                   help="most seconds any transfer or answer may take")
    p.add_argument("--kill-timeout", type=float, default=5.0,
                   help="most seconds a transfer to a killed target may stay in progress")
    p.add_argument("--inject", choices=["read", "write", "notif"],
                   help="validate the soak itself: inject one fault it must report (it then "
                        "exits 1)")
    p.add_argument("--max-rss-mib", type=float, default=64.0)
    p.add_argument("--max-fds", type=int, default=16)
    p.add_argument("--max-threads", type=int, default=8)
    args = p.parse_args(argv)
    if args.transfers is None and args.seconds is None:
        args.seconds = 30.0
    if args.seed is None:
        args.seed = int(time.time() * 1000) % 1_000_000_007
    return args


def main() -> int:
    if IS_TARGET:
        return target_main(int(sys.argv[2]))
    args = parse_args()
    log(f"seed {args.seed} (--seed {args.seed} repeats the random choices); "
        f"{'%d transfers' % args.transfers if args.transfers else '%.0f s' % args.seconds}; "
        f"plugin dir {os.environ['NIXL_PLUGIN_DIR']}")
    soak = Soak(args)
    t0 = time.monotonic()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        summary = soak.run()
        soak.teardown()
    except SoakFailure as e:
        log(f"SOAK FAILED: {e}")
        print(f"SOAK FAILED: {e}", flush=True)
        return 1
    except KeyboardInterrupt as e:
        print(f"SOAK INTERRUPTED ({e or 'Ctrl-C'})", flush=True)
        return 130
    except BaseException as e:  # noqa: BLE001 - reported, children reaped below
        import traceback
        traceback.print_exc()
        print(f"SOAK FAILED: {type(e).__name__}: {e}", flush=True)
        return 1
    finally:
        soak.kill_children()
        if _OWN_PLUGIN_DIR:
            shutil.rmtree(_OWN_PLUGIN_DIR, ignore_errors=True)
    print(summary, flush=True)
    print(f"soak: wall time {time.monotonic() - t0:.1f}s", flush=True)
    print("SOAK OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
