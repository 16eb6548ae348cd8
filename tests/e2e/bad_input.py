#!/usr/bin/env python3
"""Bad input through the real NIXL Python API (nixl-cu12 1.5.1), in one and in two processes.

    python tests/e2e/bad_input.py <case> [--mode local|auto|tcp]

Every case feeds the agents something wrong (corrupted or foreign metadata,
descriptors outside registered memory, wrong memory types, misused handles,
unknown agents, huge notifications, odd agent names, zero-length and a million
descriptors).  Each attempt must either work (and then be byte-verified) or end
with a NIXL exception (``scenarios.is_nixl_error``); the process must survive
and, after every attempt, a valid WRITE and READ with a notification between
the same agents must work and be verified byte for byte ("alive" check).
Guard bytes around every registered region are checked untouched.

``--mode local``: initiator and target are two agents in this process.
``--mode auto`` / ``--mode tcp``: the target is an agent in a child process
(this file's ``_target`` command) created with ``protocol=auto`` (cross-memory
attach on this host) or ``protocol=tcp``; with another backend than Mooncake
the protocol is ignored.

Every attempt prints a line ``OUTCOME <case> | <what> | <result>`` where result
is ``ok`` (it worked and was verified) or the NIXL status it raised (with the
stage: init = initialize_xfer/prep, post = transfer(), check =
check_xfer_state), and the script ends with ``SCENARIO <case> OK``.  Findings
that look like plugin bugs raise (a non-NIXL exception, wrong bytes, DONE where
no byte may move, a hang past E2E_OP_TIMEOUT).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Callable, Optional

# The child (target) uses its stdout as the message channel: move the real one
# away before NIXL can write to it (as scenarios.py does for its peers).
CHILD_COMMANDS = ("_target", "_ucx_md")
_CHANNEL_OUT = None
if len(sys.argv) > 1 and sys.argv[1] in CHILD_COMMANDS:
    sys.stdout.flush()
    _CHANNEL_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import scenarios as S  # noqa: E402  (importing it has no side effects)

BACKEND = S.BACKEND
MOONCAKE = BACKEND == "Mooncake"
OP_TIMEOUT = float(os.environ.get("E2E_OP_TIMEOUT", "30"))
KiB, MiB = S.KiB, S.MiB

W_SIZE = R_SIZE = 1 * MiB  # the target's write and read regions
GUARD = 4 * KiB  # unregistered bytes on each side of every region
GUARD_FILL = 0xC3
W_FILL, R_FILL = 0x5A, 0xA5
R_SEED, SRC_SEED = 500, 501
ALIVE_LEN = 64 * KiB

log = S.log


def digest(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def status_name(exc: BaseException) -> str:
    """NIXL_ERR_... of a NIXL exception (its message), else its class name."""
    text = str(exc).strip()
    return text if text.startswith("NIXL_") else type(exc).__name__


# --------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------

OUTCOMES: list[tuple[str, str, str]] = []
CASE = "?"


def record(what: str, result: str, quiet: bool = False) -> str:
    OUTCOMES.append((CASE, what, result))
    if not quiet:
        print(f"OUTCOME {CASE} | {what} | {result}", flush=True)
    return result


def attempt(what: str, fn: Callable[[], object], quiet: bool = False):
    """Runs fn; returns ("ok", value) or ("err", status). A non-NIXL exception fails."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - classified just below
        if not S.is_nixl_error(e):
            raise AssertionError(
                f"{CASE} / {what}: raised a non-NIXL exception {type(e).__name__}: {e}") from e
        return "err", record(what, status_name(e), quiet)
    record(what, "ok", quiet)
    return "ok", value


def summary() -> None:
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for case, what, result in OUTCOMES:
        groups[(case, what.split(" #")[0])][result] += 1
    for (case, what), counts in groups.items():
        text = ", ".join(f"{r} x{n}" if n > 1 else r for r, n in counts.most_common())
        print(f"SUMMARY {case} | {what} | {text}", flush=True)


# --------------------------------------------------------------------------------------
# Buffers with guard bytes
# --------------------------------------------------------------------------------------


class Guarded:
    """A buffer of `size` bytes with `guard` bytes of GUARD_FILL on each side.

    Only `inner` is ever registered; `image` is what the whole allocation
    must hold (kept up to date by the checks)."""

    def __init__(self, size: int, guard: int = GUARD, seed: Optional[int] = None,
                 fill: int = 0):
        self.size, self.guard = size, guard
        self.whole = np.full(size + 2 * guard, GUARD_FILL, dtype=np.uint8)
        self.inner = self.whole[guard:guard + size]
        if seed is not None:
            self.inner[:] = S.fast_pattern(size, seed)
        else:
            self.inner[:] = fill
        self.image = self.whole.copy()

    @property
    def addr(self) -> int:
        return S.addr(self.inner)

    def view(self, off: int, n: int) -> np.ndarray:
        """Bytes [off, off+n) relative to the registered start (guards reachable)."""
        g = self.guard
        assert -g <= off and off + n <= self.size + g, (off, n)
        return self.whole[g + off:g + off + n]

    def image_view(self, off: int, n: int) -> np.ndarray:
        g = self.guard
        return self.image[g + off:g + off + n]

    def fill(self, value: int) -> None:
        self.inner[:] = value
        self.image[self.guard:self.guard + self.size] = value

    def intact(self) -> bool:
        return bool(np.array_equal(self.whole, self.image))

    def guards_intact(self) -> bool:
        g = self.guard
        return bool(np.array_equal(self.whole[:g], self.image[:g])
                    and np.array_equal(self.whole[g + self.size:], self.image[g + self.size:]))


# --------------------------------------------------------------------------------------
# The target: an agent in this process, or in a child process with the same interface
# --------------------------------------------------------------------------------------


class LocalTarget:
    """The target agent and its buffers. `bufs`: [{"name", "size", "seed"|"fill", "guard"}]."""

    def __init__(self, name: str, protocol: str, bufs: list[dict], prog_thread: bool = True):
        self.name = name
        self.agent = S.new_agent_with(name, protocol, prog_thread=prog_thread)
        self.bufs: dict[str, Guarded] = {}
        for spec in bufs:
            self.bufs[spec["name"]] = Guarded(spec["size"], spec.get("guard", GUARD),
                                              spec.get("seed"), spec.get("fill", 0))
        S.register(self.agent, *(b.inner for b in self.bufs.values()))
        self.notifs = S.Notifs(self.agent)
        self.pid = os.getpid()

    # Each method's arguments and result are JSON-able (RemoteTarget forwards them).
    def md(self) -> bytes:
        return self.agent.get_agent_metadata()

    def addrs(self) -> dict:
        return {k: b.addr for k, b in self.bufs.items()}

    def sha(self, buf: str, off: int, n: int) -> str:
        return digest(self.bufs[buf].view(off, n))

    def whole_sha(self, buf: str) -> str:
        return digest(self.bufs[buf].whole)

    def fill(self, buf: str, value: int) -> None:
        self.bufs[buf].inner[:] = value

    def take_sha(self, sender: str, count: int, timeout: float, ranges: list) -> list:
        """take(), then the sha256 of each (buf, off, n) of `ranges` (read after the
        notifications arrived): [notifications, [sha, ...]]."""
        got = self.take(sender, count, timeout)
        return [got, [self.sha(b, o, n) for b, o, n in ranges]]

    def take(self, sender: str, count: int, timeout: float) -> dict:
        """Waits (bounded) for `count` notifications from `sender`; returns every
        notification received so far as {sender: [[len, sha256], ...]} and forgets them."""
        def enough() -> bool:
            self.notifs.poll()
            return len(self.notifs.got[sender]) >= count

        try:
            S.wait_until(enough, f"{count} notification(s) from {sender!r}", timeout)
        except TimeoutError:
            pass  # the caller compares and reports
        got = {k: [[len(m), digest(m)] for m in v] for k, v in self.notifs.got.items() if v}
        self.notifs.got.clear()
        return got

    def add_region(self, name: str, size: int, seed: int) -> dict:
        """Registers one more region; returns its address and its partial metadata."""
        self.bufs[name] = Guarded(size, GUARD, seed)
        reg = S.register(self.agent, self.bufs[name].inner)
        md = self.agent.get_partial_agent_metadata(reg, False)
        return {"addr": self.bufs[name].addr, "md": b64(md)}

    def quit(self) -> None:
        pass


class RemoteTarget:
    """A LocalTarget in a child process (`bad_input.py _target`), driven over pipes."""

    def __init__(self, name: str, protocol: str, bufs: list[dict], prog_thread: bool = True):
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), "_target"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.chan = S.Channel(self.proc.stdout, self.proc.stdin)
            hello = self._call("setup", name=name, protocol=protocol, bufs=bufs,
                               prog_thread=prog_thread)
        except BaseException:
            self.cleanup()
            raise
        self.pid = hello["pid"]
        log(f"target {name!r} is process {self.pid} (protocol={protocol})")

    def _call(self, cmd: str, timeout: float = OP_TIMEOUT + 10, **args):
        self.chan.send(cmd=cmd, args=args)
        reply = self.chan.recv(timeout)
        assert reply.get("ok"), f"target process, command {cmd!r}: {reply.get('error')}"
        return reply.get("result")

    def md(self) -> bytes:
        return unb64(self._call("md"))

    def addrs(self) -> dict:
        return self._call("addrs")

    def sha(self, buf: str, off: int, n: int) -> str:
        return self._call("sha", buf=buf, off=off, n=n)

    def whole_sha(self, buf: str) -> str:
        return self._call("whole_sha", buf=buf)

    def fill(self, buf: str, value: int) -> None:
        self._call("fill", buf=buf, value=value)

    def take(self, sender: str, count: int, timeout: float) -> dict:
        return self._call("take", timeout=timeout + OP_TIMEOUT, sender=sender, count=count,
                          timeout_s=timeout)

    def take_sha(self, sender: str, count: int, timeout: float, ranges: list) -> list:
        return self._call("take_sha", timeout=timeout + OP_TIMEOUT, sender=sender, count=count,
                          timeout_s=timeout, ranges=ranges)

    def add_region(self, name: str, size: int, seed: int) -> dict:
        return self._call("add_region", name=name, size=size, seed=seed)

    def quit(self) -> None:
        self._call("quit")
        rc = self.proc.wait(timeout=OP_TIMEOUT)
        assert rc == 0, f"target process exited with {rc}"

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # only our own child, on failure
            self.proc.wait(timeout=OP_TIMEOUT)


def child_target() -> None:
    """The `_target` command: a LocalTarget serving the parent's requests."""
    S._LOG_PREFIX = f"[target {os.getpid()}]"
    chan = S.Channel(sys.stdin, _CHANNEL_OUT)
    setup = chan.recv()
    assert setup["cmd"] == "setup", setup
    a = setup["args"]
    tgt = LocalTarget(a["name"], a["protocol"], a["bufs"], a["prog_thread"])
    chan.send(ok=True, result={"pid": os.getpid()})
    while True:
        msg = chan.recv(timeout=3600)
        cmd, args = msg["cmd"], msg["args"]
        try:
            if cmd == "md":
                result = b64(tgt.md())
            elif cmd == "take":
                result = tgt.take(args["sender"], args["count"], args["timeout_s"])
            elif cmd == "take_sha":
                result = tgt.take_sha(args["sender"], args["count"], args["timeout_s"],
                                      args["ranges"])
            else:
                result = getattr(tgt, cmd)(**args)
            chan.send(ok=True, result=result)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            chan.send(ok=False, error=f"{type(e).__name__}: {e}")
        if cmd == "quit":
            return


def child_ucx_md() -> None:
    """The `_ucx_md` command: prints the metadata of a UCX-only agent (run with the
    wheel's own plugin directory, where UCX lives)."""
    agent = S.nixl_agent("bi-ucx-only", S.nixl_agent_config(backends=["UCX"]))
    assert "UCX" in agent.backends, agent.get_plugin_list()
    buf = S.filled(64 * KiB, 1)
    agent.register_memory([(S.addr(buf), buf.nbytes, 0, "")], "DRAM")
    _CHANNEL_OUT.write(json.dumps({"md": b64(agent.get_agent_metadata())}) + "\n")
    _CHANNEL_OUT.flush()
    os._exit(0)  # no teardown: only the blob matters


def ucx_only_metadata() -> Optional[bytes]:
    env = dict(os.environ)
    env.pop("NIXL_PLUGIN_DIR", None)  # the wheel's plugins/: UCX
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "_ucx_md"], env=env,
                             stdout=subprocess.PIPE, timeout=OP_TIMEOUT, text=True)
        return unb64(json.loads(out.stdout.strip().splitlines()[-1])["md"])
    except Exception as e:  # noqa: BLE001 - the case then uses a synthetic blob only
        log(f"could not get a UCX-only agent's metadata: {type(e).__name__}: {e}")
        return None


# --------------------------------------------------------------------------------------
# A session: initiator here, target here or in a child; the "alive" check
# --------------------------------------------------------------------------------------


class Session:
    def __init__(self, case: str, mode: str, extra_bufs: Optional[list[dict]] = None,
                 ini_name: Optional[str] = None, tgt_name: Optional[str] = None):
        self.mode = mode
        self.protocol = "auto" if mode == "local" else mode
        bufs = [{"name": "w", "size": W_SIZE, "fill": W_FILL},
                {"name": "r", "size": R_SIZE, "seed": R_SEED}] + (extra_bufs or [])
        self.specs = {b["name"]: b for b in bufs}
        self.tgt_name = tgt_name or f"bi-{case}-tgt"
        self.ini_name = ini_name or f"bi-{case}-ini"
        if mode == "local":
            self.tgt = LocalTarget(self.tgt_name, self.protocol, bufs)
        else:
            self.tgt = RemoteTarget(self.tgt_name, self.protocol, bufs)
        self.ini = S.new_agent_with(self.ini_name, self.protocol)
        self.src = Guarded(W_SIZE, seed=SRC_SEED)
        self.dst = Guarded(R_SIZE, fill=R_FILL)
        S.register(self.ini, self.src.inner, self.dst.inner)
        self.addrs = self.tgt.addrs()
        # What the target's regions must hold (guards included).
        self.images = {}
        for name, spec in self.specs.items():
            g = Guarded(spec["size"], spec.get("guard", GUARD), spec.get("seed"),
                        spec.get("fill", 0))
            self.images[name] = g.image
        self.good_md = self.tgt.md()
        loaded = self.ini.add_remote_agent(self.good_md)
        assert loaded in (self.tgt_name, self.tgt_name.encode()), loaded
        self.rounds = 0
        self.notif_timeout = OP_TIMEOUT
        self.late_ok: list[bytes] = []  # payloads that may still arrive (once) at any time
        self.alive("session start")

    # descriptors ----------------------------------------------------------------------
    def rd(self, buf: str, off: int, n: int) -> tuple:
        return (self.addrs[buf] + off, n, 0)

    @staticmethod
    def ld(g: Guarded, off: int, n: int) -> tuple:
        return (g.addr + off, n, 0)

    def descs(self, rows) -> object:
        return self.ini.get_xfer_descs(list(rows), "DRAM")

    # checks ---------------------------------------------------------------------------
    def expect_notifs(self, what: str, payloads: list[bytes], sender: Optional[str] = None,
                      timeout: Optional[float] = None, ranges: Optional[list] = None) -> list:
        """Exactly `payloads` from `sender` arrive (within `timeout`); returns the
        target's sha256 of `ranges`, read once the first batch arrived."""
        sender = sender or self.ini_name
        timeout = self.notif_timeout if timeout is None else timeout
        deadline = time.monotonic() + (timeout if payloads else 0.0)
        got: dict = defaultdict(list)
        shas = None
        while True:
            need = len(payloads) - len(got[sender])
            wait = max(0.0, deadline - time.monotonic()) if need > 0 else 0.0
            if shas is None and ranges:
                batch, shas = self.tgt.take_sha(sender, max(need, 0), wait, ranges)
            else:
                batch = self.tgt.take(sender, max(need, 0), wait)
            for k, v in batch.items():
                got[k].extend(v)
            # Notifications allowed to arrive late, at most once each (then forgotten).
            for late in list(self.late_ok):
                entry = [len(late), digest(late)]
                if entry in got[sender]:
                    got[sender].remove(entry)
                    self.late_ok.remove(late)
            if len(got[sender]) >= len(payloads) or time.monotonic() >= deadline:
                break
        got = {k: v for k, v in got.items() if v}
        want = {sender: [[len(p), digest(p)] for p in payloads]} if payloads else {}
        norm = lambda d: {k: sorted(map(tuple, v)) for k, v in d.items()}  # noqa: E731
        assert norm(got) == norm(want), (
            f"{CASE} / {what}: the target's notifications differ\n  expected {want}\n"
            f"  got      {got}")
        return shas or []

    def region_intact(self, buf: str) -> bool:
        return self.tgt.whole_sha(buf) == digest(self.images[buf])

    def check_all_intact(self, what: str) -> None:
        """Every target region and local buffer holds exactly what it should."""
        for buf in self.specs:
            assert self.region_intact(buf), (
                f"{CASE} / {what}: target region {buf!r} (or its guard bytes) changed")
        assert self.src.intact(), f"{CASE} / {what}: local source buffer changed"
        assert self.dst.intact(), f"{CASE} / {what}: local destination (or its guards) changed"

    def alive(self, after: str) -> None:
        """A valid WRITE and READ with notifications, byte-verified (the process and
        both agents still work after `after`)."""
        self.rounds += 1
        k = self.rounds
        lo = (k * 4111) % (W_SIZE - ALIVE_LEN)
        ro = (k * 7919) % (W_SIZE - ALIVE_LEN)
        wmsg, rmsg = b"alive-%d" % k, b"alive-r-%d" % k
        what = f"valid WRITE and READ after {after}"
        h = self.ini.initialize_xfer("WRITE", self.descs([self.ld(self.src, lo, ALIVE_LEN)]),
                                     self.descs([self.rd("w", ro, ALIVE_LEN)]), self.tgt_name, wmsg)
        S.wait_xfer(self.ini, h, f"valid WRITE after {after}", self.ini.transfer(h),
                    timeout=OP_TIMEOUT)
        self.ini.release_xfer_handle(h)
        h = self.ini.initialize_xfer("READ", self.descs([self.ld(self.dst, ro, ALIVE_LEN)]),
                                     self.descs([self.rd("r", lo, ALIVE_LEN)]), self.tgt_name, rmsg)
        S.wait_xfer(self.ini, h, f"valid READ after {after}", self.ini.transfer(h),
                    timeout=OP_TIMEOUT)
        self.ini.release_xfer_handle(h)
        # Both notifications, and the WRITE's bytes as the target sees them.
        (sha_w,) = self.expect_notifs(what, [wmsg, rmsg], ranges=[["w", ro, ALIVE_LEN]])
        g = GUARD
        want = self.src.inner[lo:lo + ALIVE_LEN]
        assert sha_w == digest(want), f"{CASE} / valid WRITE after {after}: data mismatch"
        self.images["w"][g + ro:g + ro + ALIVE_LEN] = want
        want = self.images["r"][g + lo:g + lo + ALIVE_LEN]
        assert S.same(self.dst.inner[ro:ro + ALIVE_LEN], want), \
            f"{CASE} / valid READ after {after}: data mismatch"
        self.dst.image[g + ro:g + ro + ALIVE_LEN] = want

    def ensure_target_known(self, what: str) -> bool:
        """After a failed add_remote_agent, NIXL 1.5.1 may have dropped the target it
        knew (a failed load of a known agent's sections erases it, without telling
        the backend): load the good metadata again. Returns whether that was needed.

        The good metadata is loaded, forgotten (remove_remote_agent: the backend's
        disconnect) and loaded again: a corrupted blob whose connection info the
        backend accepted before NIXL refused the rest leaves that info in the
        plugin, and the plugin ignores the good one while the token is the same
        (the bug shown by case stale_conn); the reset keeps the fuzzing independent
        of it."""
        descs = self.descs([self.rd("w", 0, W_SIZE), self.rd("r", 0, R_SIZE)])
        if self.ini.check_remote_metadata(self.tgt_name, descs):
            return False
        for step in ("forget", "load", "forget", "load"):
            try:
                if step == "forget":
                    self.ini.remove_remote_agent(self.tgt_name)
                else:
                    loaded = self.ini.add_remote_agent(self.good_md)
            except Exception as e:  # noqa: BLE001 - NOT_FOUND: nothing was left
                assert S.is_nixl_error(e) and step == "forget", f"{what}: {step}: {e!r}"
        assert loaded in (self.tgt_name, self.tgt_name.encode()), f"{what}: re-add gave {loaded!r}"
        return True

    def close(self) -> None:
        self.check_all_intact("the end of the case")
        self.tgt.quit()
        if isinstance(self.tgt, RemoteTarget):
            self.tgt.cleanup()


def run_xfer(agent, op: str, local, remote, peer: str, notif: Optional[bytes] = None,
             what: str = "", quiet: bool = False) -> str:
    """initialize_xfer + transfer + wait; returns "ok" (DONE) or "<stage>:<NIXL status>"."""
    try:
        h = agent.initialize_xfer(op, local, remote, peer, notif or b"")
    except Exception as e:  # noqa: BLE001 - classified
        if not S.is_nixl_error(e):
            raise AssertionError(f"{CASE} / {what}: initialize_xfer raised {e!r}") from e
        return record(what, f"init:{status_name(e)}", quiet)
    try:
        return record(what, post_and_wait(agent, h, what), quiet)
    finally:
        release(agent, h, what)


def post_and_wait(agent, h, what: str, notif: Optional[bytes] = None) -> str:
    """transfer() then check_xfer_state() until it settles: "ok" or "<stage>:<status>"."""
    try:
        state = agent.transfer(h) if notif is None else agent.transfer(h, notif)
    except Exception as e:  # noqa: BLE001 - classified
        if not S.is_nixl_error(e):
            raise AssertionError(f"{CASE} / {what}: transfer raised {e!r}") from e
        return f"post:{status_name(e)}"
    if state == "ERR":
        return "post:ERR"
    deadline = time.monotonic() + OP_TIMEOUT
    spins = 0
    while state == "PROC":
        if time.monotonic() > deadline:
            raise AssertionError(f"{CASE} / {what}: still in progress after {OP_TIMEOUT:.0f}s (hang)")
        try:
            state = agent.check_xfer_state(h)
        except Exception as e:  # noqa: BLE001 - classified
            if not S.is_nixl_error(e):
                raise AssertionError(f"{CASE} / {what}: check_xfer_state raised {e!r}") from e
            return f"check:{status_name(e)}"
        spins += 1
        if spins > 2000:
            time.sleep(100e-6)
    return "ok" if state == "DONE" else f"check:{state}"


def release(agent, h, what: str) -> None:
    try:
        agent.release_xfer_handle(h)
    except Exception as e:  # noqa: BLE001 - classified
        if not S.is_nixl_error(e):
            raise AssertionError(f"{CASE} / {what}: release raised {e!r}") from e
        record(f"{what}: release", status_name(e))


# --------------------------------------------------------------------------------------
# NIXL's metadata framing (nixlSerDes): "nixlSerDes|" then <tag><u64 len><value>"|" ...
# --------------------------------------------------------------------------------------

SERDES_HDR = b"nixlSerDes|"
SERDES_TAGS = sorted([b"Agent", b"Conns", b"t", b"c", b"MemSection", b"nixlSecElms", b"bknd",
                      b"nixlDList", b"n", b""], key=len, reverse=True)


def serdes_spans(blob: bytes) -> list[tuple[bytes, int, int]]:
    """(tag, value start, value end) of every field of a NIXL metadata blob."""
    assert blob.startswith(SERDES_HDR), blob[:16]
    spans, p = [], len(SERDES_HDR)
    while p < len(blob):
        for tag in SERDES_TAGS:
            q = p + len(tag)
            if blob[p:q] != tag or q + 8 > len(blob):
                continue
            n = int.from_bytes(blob[q:q + 8], "little")
            end = q + 8 + n
            if end < len(blob) and blob[end:end + 1] == b"|":
                spans.append((tag, q + 8, end))
                p = end + 1
                break
        else:
            raise ValueError(f"cannot parse NIXL metadata at offset {p}: {blob[p:p + 32]!r}")
    return spans


def serdes_parse(blob: bytes) -> list[list]:
    fields = [[tag, blob[a:b]] for tag, a, b in serdes_spans(blob)]
    assert serdes_build(fields) == blob, "serdes round trip"
    return fields


def locate(blob: bytes, pos: int) -> str:
    """Which field of a (good) metadata blob byte `pos` belongs to."""
    for i, (tag, a, b) in enumerate(serdes_spans(blob)):
        if pos < a:
            return f"field {i} ({tag.decode()!r}) header"
        if pos < b:
            return f"field {i} ({tag.decode()!r}) value byte {pos - a} of {b - a}"
    return "trailer"


def mem_type_bytes(blob: bytes) -> set[int]:
    """Byte positions of the descriptor lists' memory type (a 4-byte "t" field).

    A memory type >= 5 there crashes libnixl itself (nixlRemoteSection's
    destructor, seen with UCX as well): bit flips leave these bytes alone."""
    return {j for tag, a, b in serdes_spans(blob) if tag == b"t" and b - a == 4 for j in range(a, b)}


def serdes_build(fields) -> bytes:
    out = bytearray(SERDES_HDR)
    for tag, value in fields:
        out += tag + len(value).to_bytes(8, "little") + value + b"|"
    return bytes(out)


def serdes_edit(blob: bytes, edit: Callable[[list], None]) -> bytes:
    fields = serdes_parse(blob)
    edit(fields)
    return serdes_build(fields)


def element_indices(fields) -> list[int]:
    """Indices of the descriptor elements (empty tag, 24 bytes of addr/len/devId + metaInfo)
    that follow an "n" count."""
    out, in_list = [], False
    for i, (tag, value) in enumerate(fields):
        if tag == b"n":
            in_list = True
        elif tag == b"" and in_list and len(value) >= 24:
            out.append(i)
        elif tag != b"":
            in_list = False
    return out


def conn_index(fields, backend: bytes) -> Optional[int]:
    for i in range(len(fields) - 1):
        if fields[i][0] == b"t" and fields[i][1] == backend and fields[i + 1][0] == b"c":
            return i + 1
    return None


def set_u64(value: bytes, offset: int, new: int) -> bytes:
    return value[:offset] + (new % (1 << 64)).to_bytes(8, "little") + value[offset + 8:]


def get_u64(value: bytes, offset: int) -> int:
    return int.from_bytes(value[offset:offset + 8], "little")


# --------------------------------------------------------------------------------------
# 1. corrupted, truncated and foreign metadata
# --------------------------------------------------------------------------------------


def feed_md(s: Session, what: str, blob: bytes, quiet: bool = True, alive: bool = True,
            fresh: bool = False) -> str:
    """add_remote_agent(blob) on the initiator (with the target known, or first
    forgotten if `fresh`); afterwards the target is made known again and, if
    `alive`, a valid transfer must work."""
    if fresh and s.ini.check_remote_metadata(s.tgt_name):
        s.ini.remove_remote_agent(s.tgt_name)
    st, value = attempt(what, lambda: s.ini.add_remote_agent(blob), quiet=quiet)
    result = "rejected" if st == "err" else "accepted"
    if st == "ok":
        name = value.decode(errors="replace") if isinstance(value, bytes) else value
        if name != s.tgt_name:
            record(f"{what}: accepted as agent", repr(name)[:80], quiet)
            # A new agent: forget it (it may not even be reachable).
            attempt(f"{what}: remove accepted agent", lambda: s.ini.remove_remote_agent(name),
                    quiet=quiet)
        elif blob != s.good_md:
            result = "accepted-corrupt"
            s.ini.remove_remote_agent(s.tgt_name)
    s.ensure_target_known(what)
    if alive:
        s.alive(what)
    return result


def flip_variants(blob: bytes, count: int, seed0: int):
    """`count` variants of `blob` with 1 to 8 bits flipped (deterministic seeds),
    never in the memory-type bytes (see mem_type_bytes)."""
    protected = mem_type_bytes(blob)
    allowed = np.array([j for j in range(len(blob)) if j not in protected])
    for i in range(count):
        rng = np.random.default_rng(seed0 + i)
        b = bytearray(blob)
        nflips = int(rng.integers(1, 9))
        for pos, bit in zip(rng.choice(allowed, nflips), rng.integers(0, 8, nflips)):
            b[pos] ^= 1 << int(bit)
        yield i, nflips, bytes(b)


def fuzz(s: Session, label: str, good: bytes, flips: int, seed0: int, every: int,
         fresh: bool, step: int = 1) -> None:
    """Truncations (every `step`-th length) and bit flips of `good`; a truncated blob
    must never be accepted; accepted bit-flipped ones are listed (with the fields hit)."""
    state = "target forgotten first" if fresh else "target known"
    results = Counter()
    for n in range(0, len(good), step):
        r = feed_md(s, f"{label} truncated ({state}) #{n}", good[:n], fresh=fresh,
                    alive=(n // step) % every == 0)
        results[r] += 1
    log(f"{label} truncated at {len(range(0, len(good), step))} lengths ({state}): {dict(results)}")
    assert results["accepted"] == 0 and results["accepted-corrupt"] == 0, \
        f"BUG?: a truncated blob was accepted: {dict(results)}"
    s.alive(f"{label} truncations")
    results = Counter()
    for i, nflips, blob in flip_variants(good, flips, seed0):
        r = feed_md(s, f"{label} bits flipped ({state}) #{i}", blob, fresh=fresh,
                    alive=i % every == 0)
        results[r] += 1
        if r != "rejected":
            where = "; ".join(locate(good, j) for j in range(len(good)) if blob[j] != good[j])
            record(f"{label} bit flips ({state}): variant {i} {r}", where)
    log(f"{flips} bit-flipped variants of {label} ({state}): {dict(results)}")
    s.alive(f"{label} bit flips")


def case_metadata(s: Session, args) -> None:
    good = s.good_md
    fields = serdes_parse(good)
    log(f"the target's metadata: {len(good)} bytes, {len(fields)} fields")
    every = max(1, args.alive_every)
    for fresh in (False, True):
        fuzz(s, "metadata", good, args.flips, 10_000, every, fresh)

    # Random bytes, raw and behind NIXL's header.
    rng = np.random.default_rng(77)
    for i in range(40):
        junk = rng.bytes(int(rng.integers(0, 2048)))
        feed_md(s, f"random bytes #{i}", junk, alive=(i % every == 0))
        feed_md(s, f"random bytes behind the nixlSerDes header #{i}", SERDES_HDR + junk,
                alive=(i % every == 0), fresh=True)

    # Targeted corruptions of the framing (deterministic, each named).
    ci = conn_index(fields, BACKEND.encode())
    elems = element_indices(fields)
    assert ci is not None and elems, f"unexpected metadata layout: {[f[0] for f in fields]}"
    other = S.new_agent_with(f"bi-{CASE}-other", s.protocol)
    other_buf = S.filled(64 * KiB)
    S.register(other, other_buf)
    other_fields = serdes_parse(other.get_agent_metadata())
    other_conn = other_fields[conn_index(other_fields, BACKEND.encode())][1]
    other_elem = other_fields[element_indices(other_fields)[0]][1]
    conn = fields[ci][1]
    e0 = fields[elems[0]][1]

    def put(idx, value):
        return lambda f: f.__setitem__(idx, [f[idx][0], value])

    def elem_u64(off, value):
        return put(elems[0], set_u64(e0, off, value))

    def rename(new: bytes):
        return lambda f: f.__setitem__(0, [b"Agent", new])

    def all_fields(tag: bytes, size: int, value: bytes):
        return lambda f: [f.__setitem__(i, [tag, value]) for i, (t, v) in enumerate(f)
                          if t == tag and len(v) == size]

    targeted = {
        "conn info replaced by random bytes": put(ci, rng.bytes(len(conn))),
        "conn info empty": put(ci, b""),
        "conn info truncated by one byte": put(ci, conn[:-1]),
        "conn info with a trailing byte": put(ci, conn + b"\x00"),
        "conn info of another agent": put(ci, other_conn),
        "conn info with a wrong version byte": put(ci, conn[:4] + bytes([conn[4] ^ 0x7F]) + conn[5:]),
        "agent name changed, conn info kept": rename(b"bi-ghost"),
        "agent name empty": rename(b""),
        "region length grown by 4 KiB": elem_u64(8, get_u64(e0, 8) + 4096),
        "region length 2^64-1": elem_u64(8, (1 << 64) - 1),
        "region address moved 4 KiB down": elem_u64(0, get_u64(e0, 0) - 4096),
        "region address near 2^64": elem_u64(0, (1 << 64) - 4096),
        "region devId 7": elem_u64(16, 7),
        "region public data of another agent": put(elems[0], e0[:24] + other_elem[24:]),
        "region public data truncated": put(elems[0], e0[:-3]),
        "region public data with a trailing byte": put(elems[0], e0 + b"\x00"),
        "region public data empty": put(elems[0], e0[:24]),
        "connection count 2^40": all_fields(b"Conns", 8, (1 << 40).to_bytes(8, "little")),
        "connection count 0": all_fields(b"Conns", 8, bytes(8)),
        "descriptor count 1000": all_fields(b"n", 8, (1000).to_bytes(8, "little")),
        "descriptor count 0 (element kept)": all_fields(b"n", 8, bytes(8)),
        # Memory types 1 to 4 only: >= 5 crashes libnixl itself (also with UCX).
        "memory type VRAM": all_fields(b"t", 4, (1).to_bytes(4, "little")),
        "memory type BLK": all_fields(b"t", 4, (2).to_bytes(4, "little")),
        "memory type FILE": all_fields(b"t", 4, (4).to_bytes(4, "little")),
    }
    accepted = []
    for fresh in (False, True):
        state = "target forgotten first" if fresh else "target known"
        for what, edit in targeted.items():
            r = feed_md(s, f"{what} ({state})", serdes_edit(good, edit), quiet=False, fresh=fresh)
            if r != "rejected":
                accepted.append(f"{what} ({state}): {r}")
    for line in accepted:
        log(f"accepted: {line}")

    # A foreign agent's NIXL framing: a UCX-only agent given to a Mooncake-only one,
    # and UCX's connection blob in our backend's slot.
    if MOONCAKE:
        ucx_md = ucx_only_metadata()
        if ucx_md is not None:
            st, name = attempt("UCX-only agent's metadata", lambda: s.ini.add_remote_agent(ucx_md))
            if st == "ok":
                name = name.decode() if isinstance(name, bytes) else name
                res = run_xfer(s.ini, "WRITE", s.descs([s.ld(s.src, 0, 64)]),
                               s.ini.get_xfer_descs([(0x1000, 64, 0)], "DRAM"), name, None,
                               "transfer to the UCX-only agent")
                assert res != "ok", "a transfer to a UCX-only agent succeeded"
                attempt("send_notif to the UCX-only agent", lambda: s.ini.send_notif(name, b"x"))
                attempt("remove the UCX-only agent", lambda: s.ini.remove_remote_agent(name))
            s.ensure_target_known("UCX-only metadata")
            s.alive("the UCX-only agent's metadata")
            uf = serdes_parse(ucx_md)
            ucx_conn = uf[conn_index(uf, b"UCX")][1]
            for fresh in (False, True):
                feed_md(s, f"UCX's connection blob in Mooncake's slot (fresh={fresh})",
                        serdes_edit(good, put(ci, ucx_conn)), quiet=False, fresh=fresh)
            for n in (0, 1, len(ucx_md) // 2, len(ucx_md) - 1):
                feed_md(s, f"UCX-only metadata truncated to {n}", ucx_md[:n], quiet=False)
            flips = Counter(feed_md(s, f"UCX-only metadata bits flipped #{i}", blob)
                            for i, _, blob in flip_variants(ucx_md, 20, 30_000))
            log(f"20 bit-flipped variants of the UCX-only metadata: {dict(flips)}")
        else:
            record("UCX-only agent's metadata", "skipped (UCX plugin not loadable here)")

    # Partial metadata (a region registered later, no connection info), corrupted.
    added = s.tgt.add_region("late", 256 * KiB, 502)
    s.addrs["late"] = added["addr"]
    partial = unb64(added["md"])
    pf = serdes_parse(partial)
    pe = element_indices(pf)
    log(f"partial metadata of the late region: {len(partial)} bytes")
    fuzz(s, "partial metadata", partial, max(20, args.flips // 4), 20_000, every, False, step=2)
    pe0 = pf[pe[0]][1]
    for what, edit in {
        "partial: region length grown by 4 KiB": lambda f: f.__setitem__(
            pe[0], [b"", set_u64(pe0, 8, get_u64(pe0, 8) + 4096)]),
        "partial: public data of another agent": lambda f: f.__setitem__(
            pe[0], [b"", pe0[:24] + other_elem[24:]]),
        "partial: public data of the target's other region": lambda f: f.__setitem__(
            pe[0], [b"", pe0[:24] + e0[24:]]),
        "partial: agent name of an unknown agent": rename(b"bi-never-seen"),
    }.items():
        feed_md(s, what, serdes_edit(partial, edit), quiet=False)
    late = s.descs([s.rd("late", 0, 256 * KiB)])
    assert not s.ini.check_remote_metadata(s.tgt_name, late), \
        "the late region is known although only corrupted partial metadata was given"
    # The grown region (had it been accepted) must not be usable beyond the real end.
    res = run_xfer(s.ini, "WRITE", s.descs([s.ld(s.src, 0, 256)]),
                   s.descs([s.rd("w", W_SIZE - 128, 256)]), s.tgt_name, None,
                   "WRITE past the real end after the corrupted blobs")
    assert res != "ok", "BUG: a WRITE past the region's end succeeded"
    s.check_all_intact("WRITE past the real end")
    # Now the good partial metadata: the late region becomes usable.
    st, _ = attempt("the good partial metadata", lambda: s.ini.add_remote_agent(partial))
    assert st == "ok"
    data = S.pattern(256 * KiB, 503)
    buf = S.filled(256 * KiB)
    buf[:] = data
    reg = S.register(s.ini, buf)
    res = run_xfer(s.ini, "WRITE", s.ini.get_xfer_descs([(S.addr(buf), buf.nbytes, 0)], "DRAM"),
                   late, s.tgt_name, b"late", "WRITE into the late region")
    assert res == "ok", res
    s.expect_notifs("WRITE into the late region", [b"late"])
    assert s.tgt.sha("late", 0, 256 * KiB) == digest(data), "late region: data mismatch"
    s.ini.deregister_memory(reg)
    s.specs["late"] = {"name": "late", "size": 256 * KiB, "seed": 502}
    s.images["late"] = Guarded(256 * KiB, GUARD, None).image
    s.images["late"][GUARD:GUARD + 256 * KiB] = data
    s.alive("corrupted partial metadata")


def case_stale_conn(s: Session, args) -> None:
    """BUG reproducer (plugin): connection info that the plugin accepted from a blob
    NIXL then refused stays in the plugin, and the correct metadata loaded next is
    ignored because its token is the same.

    The blob: the target's own metadata with the TCP endpoint's address changed
    (127.0.0.1 -> 127.0.0.129, token untouched) and its last byte cut (so NIXL
    fails on the sections, after the backend's loadRemoteConnInfo succeeded, and
    drops the remote without calling the backend's disconnect). Then the good
    metadata is loaded (NIXL: success) and a valid WRITE and READ with
    notifications must work. Observed with the plugin of 2026-12-03: protocol=auto
    -> the WRITE and READ are DONE over cross-memory attach but their notifications
    are sent to 127.0.0.129 and dropped ("WARN Mooncake: a notification of N bytes
    was not delivered: remote disconnected: cannot connect to agent ... at
    127.0.0.129:...: Connection refused"); depending on timing the READ posted
    right after fails with NIXL_ERR_REMOTE_DISCONNECT instead; protocol=tcp -> the
    WRITE fails with NIXL_ERR_REMOTE_DISCONNECT ("ERROR Mooncake: checkXfer: remote
    disconnected: cannot connect to agent ... at 127.0.0.129:...: Connection
    refused"). The plugin compares only the token in loadRemoteConnInfo
    (src/backend/engine.rs, `old.info.token == info.token` -> no-op)."""
    assert MOONCAKE, "stale_conn only makes sense for the Mooncake plugin's connection info"
    fields = serdes_parse(s.good_md)
    ci = conn_index(fields, BACKEND.encode())
    conn = fields[ci][1]
    i = conn.find(b"\x7f\x00\x00\x01")
    assert i > 0, "no 127.0.0.1 endpoint in the connection info"
    bad_conn = conn[:i + 3] + b"\x81" + conn[i + 4:]
    bad = serdes_edit(s.good_md, lambda f: f.__setitem__(ci, [b"c", bad_conn]))[:-1]
    s.notif_timeout = 2.0
    s.ini.remove_remote_agent(s.tgt_name)
    st, _ = attempt("blob with another endpoint (same token) and broken sections",
                    lambda: s.ini.add_remote_agent(bad))
    assert st == "err", "the broken blob was accepted"
    st, _ = attempt("the good metadata next", lambda: s.ini.add_remote_agent(s.good_md))
    assert st == "ok"
    s.alive("a refused blob with another endpoint, then the good metadata")
    s.ini.send_notif(s.tgt_name, b"after-stale")
    s.expect_notifs("send_notif after the good metadata", [b"after-stale"])


# --------------------------------------------------------------------------------------
# 2. descriptors crossing or outside registered regions
# --------------------------------------------------------------------------------------


def case_bounds(s: Session, args) -> None:
    W, R = W_SIZE, R_SIZE
    src, dst = s.src, s.dst

    def wrap(la: int, ra: int) -> int:
        return (1 << 64) - min(la, ra) + 128 - 64

    cases = [
        # (what, op, local rows, remote rows)
        ("remote crossing the region's end", "WRITE", [s.ld(src, 0, 256)], [s.rd("w", W - 128, 256)]),
        ("remote crossing the region's end", "READ", [s.ld(dst, 0, 256)], [s.rd("r", R - 128, 256)]),
        ("remote crossing the region's start", "WRITE", [s.ld(src, 0, 256)], [s.rd("w", -128, 256)]),
        ("remote crossing the region's start", "READ", [s.ld(dst, 0, 256)], [s.rd("r", -128, 256)]),
        ("remote one byte past the end", "WRITE", [s.ld(src, 0, 1)], [s.rd("w", W, 1)]),
        ("remote wholly outside, just after", "WRITE", [s.ld(src, 0, 256)], [s.rd("w", W + 64, 256)]),
        ("remote wholly outside, just after", "READ", [s.ld(dst, 0, 256)], [s.rd("r", R + 64, 256)]),
        ("remote wholly outside, far away", "WRITE", [s.ld(src, 0, 256)], [s.rd("w", 1 << 30, 256)]),
        ("remote at address 0x1000", "WRITE", [s.ld(src, 0, 256)], [(0x1000, 256, 0)]),
        ("remote covering the whole region and more", "WRITE", [s.ld(src, -64, W + 128)],
         [s.rd("w", -64, W + 128)]),
        ("local crossing the region's end", "WRITE", [s.ld(src, W - 128, 256)], [s.rd("w", 0, 256)]),
        ("local crossing the region's end", "READ", [s.ld(dst, R - 128, 256)], [s.rd("r", 0, 256)]),
        ("local crossing the region's start", "READ", [s.ld(dst, -128, 256)], [s.rd("r", 0, 256)]),
        ("local wholly outside", "READ", [s.ld(dst, R + 64, 256)], [s.rd("r", 0, 256)]),
        ("valid descriptor then one crossing the end", "WRITE",
         [s.ld(src, 0, 4096), s.ld(src, 8192, 256)], [s.rd("w", 0, 4096), s.rd("w", W - 128, 256)]),
        ("valid descriptor then one crossing the end", "READ",
         [s.ld(dst, 0, 4096), s.ld(dst, 8192, 256)], [s.rd("r", 0, 4096), s.rd("r", R - 128, 256)]),
        ("valid descriptor then a local one outside", "READ",
         [s.ld(dst, 0, 4096), s.ld(dst, R + 64, 256)], [s.rd("r", 0, 4096), s.rd("r", 8192, 256)]),
        # Lengths whose end wraps around 2^64: a range check that adds may overflow.
        # (Both ends wrap to a small address, below each region's end.)
        ("lengths wrapping around 2^64", "WRITE", [(src.addr + 64, wrap(src.addr, s.addrs["w"]), 0)],
         [(s.addrs["w"] + 64, wrap(src.addr, s.addrs["w"]), 0)]),
        ("lengths wrapping around 2^64", "READ", [(dst.addr + 64, wrap(dst.addr, s.addrs["r"]), 0)],
         [(s.addrs["r"] + 64, wrap(dst.addr, s.addrs["r"]), 0)]),
        ("lengths wrapping around 2^64, local only", "WRITE",
         [(src.addr + 64, (1 << 64) - src.addr - 64 + 128, 0)],
         [(s.addrs["w"] + 64, (1 << 64) - src.addr - 64 + 128, 0)]),
        ("length 2^63", "WRITE", [(src.addr, 1 << 63, 0)], [(s.addrs["w"], 1 << 63, 0)]),
    ]
    for what, op, lrows, rrows in cases:
        label = f"{op} {what}"
        if "wrapping" in what and not MOONCAKE:
            # NIXL's own range check overflows and lets these through; UCX then
            # crashes the process (SIGSEGV). Our plugin refuses them (INVALID_PARAM).
            record(label, f"skipped: {BACKEND} crashes on it")
            continue
        try:
            ldl = s.ini.get_xfer_descs(np.array(lrows, dtype=np.uint64), "DRAM")
            rdl = s.ini.get_xfer_descs(np.array(rrows, dtype=np.uint64), "DRAM")
        except Exception as e:  # noqa: BLE001 - the bindings may refuse such numbers
            record(label, f"descs:{type(e).__name__}")
            continue
        res = run_xfer(s.ini, op, ldl, rdl, s.tgt_name, b"must-not-arrive", label)
        if res == "ok":
            raise AssertionError(f"BUG: {label}: the transfer finished DONE, it must fail")
        # Guards always intact; the regions too when nothing was posted.
        changed = [b for b in s.specs if not s.region_intact(b)]
        local_changed = not (s.src.intact() and s.dst.intact())
        guards_ok = s.src.guards_intact() and s.dst.guards_intact()
        assert guards_ok, f"BUG: {label}: local guard bytes were overwritten"
        if changed or local_changed:
            assert not res.startswith("init:"), (
                f"BUG: {label}: refused at initialize_xfer, yet bytes changed "
                f"(target regions {changed}, local {local_changed})")
            # A post that failed part-way may have moved the in-range part: check the
            # target's guards, then reset the images.
            for b in changed:
                spec = s.specs[b]
                g = spec.get("guard", GUARD)
                for off, n in ((-g, g), (spec["size"], g)):
                    assert s.tgt.sha(b, off, n) == digest(s.images[b][g + off:g + off + n]), \
                        f"BUG: {label}: guard bytes of target region {b!r} were overwritten"
                record(f"{label}: in-range bytes moved before the failure", b)
                if b == "w":
                    s.tgt.fill("w", W_FILL)
                    s.images["w"][g:g + W_SIZE] = W_FILL
            if local_changed:
                record(f"{label}: local in-range bytes moved before the failure", "dst")
                s.dst.fill(R_FILL)
                s.dst.image[GUARD:GUARD + R_SIZE] = R_FILL
                s.dst.whole[GUARD:GUARD + R_SIZE] = R_FILL
        s.expect_notifs(f"{label}: no notification", [], timeout=0)
        s.alive(label)

    # Prepped lists: a crossing entry refused at prep, and adjacent entries in two
    # regions registered back to back (NIXL merges adjacent entries of prepped
    # transfers: the merge must not cross the regions' boundary, or must still work).
    two = Guarded(2 * 64 * KiB, seed=504)
    halves = [two.inner[:64 * KiB], two.inner[64 * KiB:]]
    st, _ = attempt("prep_xfer_dlist with an entry crossing the end",
                    lambda: s.ini.prep_xfer_dlist(s.tgt_name, [s.rd("w", W - 128, 256)], "DRAM"))
    assert st == "err", "prep_xfer_dlist accepted a descriptor crossing the region's end"
    reg = s.ini.register_memory([(S.addr(h), h.nbytes, 0, "") for h in halves], "DRAM")
    local_h = s.ini.prep_xfer_dlist("NIXL_INIT_AGENT", [(S.addr(halves[0]) + 64 * KiB - 4096, 4096, 0),
                                                       (S.addr(halves[1]), 4096, 0)], "DRAM")
    remote_h = s.ini.prep_xfer_dlist(s.tgt_name, [s.rd("w", 4096, 4096), s.rd("w", 8192, 4096)],
                                     "DRAM")
    h = s.ini.make_prepped_xfer("WRITE", local_h, [0, 1], remote_h, [0, 1], b"two-regions")
    res = record("prepped WRITE of adjacent entries in two back-to-back local regions",
                 post_and_wait(s.ini, h, "two regions"))
    s.ini.release_xfer_handle(h)
    if res == "ok":
        s.expect_notifs("two regions", [b"two-regions"])
        want = two.inner[64 * KiB - 4096:64 * KiB + 4096]
        assert s.tgt.sha("w", 4096, 8192) == digest(want), "two back-to-back regions: data mismatch"
        s.images["w"][GUARD + 4096:GUARD + 4096 + 8192] = want
    else:
        s.expect_notifs("two regions", [], timeout=0)
    for dl in (local_h, remote_h):
        s.ini.release_dlist_handle(dl)
    s.ini.deregister_memory(reg)
    s.alive("prepped lists")


# --------------------------------------------------------------------------------------
# 3. wrong memory types
# --------------------------------------------------------------------------------------


def case_memtypes(s: Session, args) -> None:
    mems = s.ini.get_backend_mem_types(BACKEND)
    log(f"get_backend_mem_types({BACKEND!r}) -> {mems}")
    record("get_backend_mem_types", ",".join(mems))
    buf = S.filled(64 * KiB, 9)
    for mem in ("VRAM", "BLOCK", "FILE", "OBJ"):
        for backends in ([], [BACKEND]):
            what = f"register_memory as {mem}" + (f" with backends=[{BACKEND}]" if backends else "")
            st, reg = attempt(what, lambda: s.ini.register_memory(
                [(S.addr(buf), buf.nbytes, 0, "")], mem, backends=backends))
            if mem == "VRAM" and MOONCAKE:
                assert st == "err", f"BUG: {what} succeeded (VRAM is not supported)"
            if st == "ok":
                attempt(f"deregister_memory as {mem}", lambda: s.ini.deregister_memory(reg))
            s.alive(what)
    for mem in ("VRAM", "BLOCK", "FILE", "OBJ"):
        what = f"register_memory as {mem} with devId 1"
        st, reg = attempt(what, lambda: s.ini.register_memory([(S.addr(buf), buf.nbytes, 1, "")], mem))
        if st == "ok":
            attempt(f"deregister_memory as {mem} devId 1", lambda: s.ini.deregister_memory(reg))
    # Transfer descriptors of registered DRAM labelled with other types, or mixed.
    ok_local = [s.ld(s.src, 0, 4096)]
    ok_remote = [s.rd("w", 0, 4096)]
    for lmem, rmem in (("VRAM", "VRAM"), ("DRAM", "VRAM"), ("VRAM", "DRAM"), ("FILE", "FILE"),
                       ("BLOCK", "DRAM"), ("OBJ", "OBJ")):
        what = f"WRITE with local {lmem}, remote {rmem} descriptors"
        res = run_xfer(s.ini, "WRITE", s.ini.get_xfer_descs(ok_local, lmem),
                       s.ini.get_xfer_descs(ok_remote, rmem), s.tgt_name, b"wrong-type", what)
        assert res != "ok", f"BUG: {what} finished DONE"
        s.expect_notifs(what, [], timeout=0)
        s.check_all_intact(what)
        s.alive(what)
    for mem in ("VRAM", "FILE"):
        what = f"prep_xfer_dlist of DRAM memory labelled {mem}"
        st, h = attempt(what, lambda: s.ini.prep_xfer_dlist(s.tgt_name, ok_remote, mem))
        if st == "ok":
            s.ini.release_dlist_handle(h)
    # devId other than the registered one.
    for dev in (1, 7):
        what = f"WRITE with DRAM descriptors of devId {dev}"
        res = run_xfer(s.ini, "WRITE", s.descs([(s.src.addr, 4096, dev)]),
                       s.descs([(s.addrs["w"], 4096, dev)]), s.tgt_name, None, what)
        assert res != "ok", f"{what} finished DONE"
        s.check_all_intact(what)
    # DRAM registered with devId 3 on both sides: works (verified) or a clean error.
    a3 = S.pattern(64 * KiB, 11)
    b3 = S.filled(64 * KiB)
    st_a, reg_a = attempt("register DRAM with devId 3 (initiator)",
                          lambda: s.ini.register_memory([(S.addr(a3), a3.nbytes, 3, "")], "DRAM"))
    peer = S.new_agent_with(f"bi-{CASE}-dev3", s.protocol)
    st_b, reg_b = attempt("register DRAM with devId 3 (second agent)",
                          lambda: peer.register_memory([(S.addr(b3), b3.nbytes, 3, "")], "DRAM"))
    if st_a == "ok" and st_b == "ok":
        s.ini.add_remote_agent(peer.get_agent_metadata())
        what = "WRITE between DRAM regions of devId 3"
        res = run_xfer(s.ini, "WRITE", s.ini.get_xfer_descs([(S.addr(a3), a3.nbytes, 3)], "DRAM"),
                       s.ini.get_xfer_descs([(S.addr(b3), b3.nbytes, 3)], "DRAM"), peer.name,
                       None, what)
        if res == "ok":
            assert S.same(a3, b3), f"{what}: data mismatch"
        else:
            assert not b3.any(), f"{what} failed ({res}) but bytes moved"
        s.ini.remove_remote_agent(peer.name)
    s.alive("wrong memory types")


# --------------------------------------------------------------------------------------
# 4. handles: repost while in progress, release twice
# --------------------------------------------------------------------------------------


def case_handles(s: Session, args) -> None:
    size = args.size_mib * MiB
    big_src = S.fast_pattern(size, 600)
    peer = S.new_agent_with(f"bi-{CASE}-sink", s.protocol) if s.mode == "local" else None
    if peer is None:
        raise AssertionError("case handles runs in one process only")
    big_dst = S.filled(size)
    S.register(s.ini, big_src)
    S.register(peer, big_dst)
    s.ini.add_remote_agent(peer.get_agent_metadata())
    notifs = S.Notifs(peer)
    ld = s.ini.get_xfer_descs([(S.addr(big_src), size, 0)], "DRAM")
    rd = s.ini.get_xfer_descs([(S.addr(big_dst), size, 0)], "DRAM")

    h = s.ini.initialize_xfer("WRITE", ld, rd, peer.name, b"first")
    caught = 0
    expected = []
    for i in range(3):
        big_src[:8] = i  # a marker that changes per post
        state = s.ini.transfer(h, b"post-%d" % i)
        expected.append(b"post-%d" % i)
        assert state in ("DONE", "PROC"), state
        if state == "PROC":
            st, res = attempt(f"repost #{i} while in progress", lambda: s.ini.transfer(h, b"refused"))
            if st == "err":
                caught += 1
                assert res == "NIXL_ERR_REPOST_ACTIVE", res
            else:
                record(f"repost #{i} while in progress accepted", str(res))
                expected.append(b"refused")
        else:
            record(f"repost #{i}", "first post finished inline; nothing in flight to repost")
        S.wait_xfer(s.ini, h, f"post {i}", "PROC", timeout=OP_TIMEOUT)
        assert S.same(big_src, big_dst), f"post {i}: data mismatch after the refused repost"
    log(f"{caught} of 3 reposts were made while in progress (NIXL_ERR_REPOST_ACTIVE each)")
    got = notifs.wait_count(s.ini_name, len(expected), "post notifications", OP_TIMEOUT)
    assert Counter(got) == Counter(expected), f"notifications {got!r}, expected {expected!r}"
    notifs.got.clear()
    notifs.expect_quiet(0.2, "a refused repost's notification")
    # A completed handle reposts fine.
    big_src[:8] = 99
    S.post(s.ini, h, "repost after completion")
    assert S.same(big_src, big_dst)
    notifs.wait_for(s.ini_name, b"post-2", "repost after completion (its last message)")
    notifs.got.clear()

    # Releasing twice through the Python API: the second is a no-op of the wrapper.
    attempt("release_xfer_handle", lambda: s.ini.release_xfer_handle(h))
    attempt("release_xfer_handle again (Python wrapper: no-op)", lambda: s.ini.release_xfer_handle(h))
    assert h._released
    # NOTE: using or releasing a released handle *below* the wrapper (transfer(h),
    # agent.releaseXferReq(h._handle)) passes a freed nixlXferReqH* to libnixl: that is
    # a use-after-free inside NIXL itself, before the plugin is reached; not tested.
    record("use after release", "not tested: libnixl dereferences the freed handle itself")

    # Release in flight, then a fresh handle on the same lists.
    h = s.ini.initialize_xfer("WRITE", ld, rd, peer.name, b"cancelled")
    state = s.ini.transfer(h)
    attempt(f"release while {state}", lambda: s.ini.release_xfer_handle(h))
    if not h._released:
        S.wait_until(lambda: s.ini.check_xfer_state(h) != "PROC", "refused release to settle")
        s.ini.release_xfer_handle(h)
    big_src[:8] = 123
    h = s.ini.initialize_xfer("WRITE", ld, rd, peer.name, b"after-cancel")
    S.post(s.ini, h, "WRITE after a release in flight")
    assert S.same(big_src, big_dst), "WRITE after a release in flight: data mismatch"
    notifs.wait_for(s.ini_name, b"after-cancel", "notification after the cancel")
    assert notifs.got[s.ini_name].count(b"cancelled") <= 1
    s.ini.release_xfer_handle(h)

    # A handle never posted: its state, then release.
    h = s.ini.initialize_xfer("READ", ld, rd, peer.name)
    attempt("check_xfer_state of a never-posted handle", lambda: s.ini.check_xfer_state(h))
    attempt("release a never-posted handle", lambda: s.ini.release_xfer_handle(h))
    # Prepped list handles released twice (wrapper no-op).
    dl = s.ini.prep_xfer_dlist("NIXL_INIT_AGENT", [(S.addr(big_src), 4096, 0)], "DRAM")
    attempt("release_dlist_handle", lambda: s.ini.release_dlist_handle(dl))
    attempt("release_dlist_handle again (Python wrapper: no-op)", lambda: s.ini.release_dlist_handle(dl))
    # Many handles created and released without a post.
    hs = [s.ini.initialize_xfer("WRITE", ld, rd, peer.name) for _ in range(2000)]
    for hh in hs:
        s.ini.release_xfer_handle(hh)
    record("2000 handles created and released unposted", "ok")
    s.alive("handle misuse")


# --------------------------------------------------------------------------------------
# 5. unknown agents
# --------------------------------------------------------------------------------------


def case_unknown(s: Session, args) -> None:
    ld = s.descs([s.ld(s.src, 0, 4096)])
    rd = s.descs([s.rd("w", 0, 4096)])
    ghost = "bi-never-added"
    res = run_xfer(s.ini, "WRITE", ld, rd, ghost, b"x", "initialize_xfer to an agent never added")
    assert res.startswith("init:"), res
    attempt("prep_xfer_dlist of an agent never added",
            lambda: s.ini.prep_xfer_dlist(ghost, [s.rd("w", 0, 4096)], "DRAM"))
    st, _ = attempt("send_notif to an agent never added", lambda: s.ini.send_notif(ghost, b"x"))
    assert st == "err", "send_notif to an unknown agent succeeded"
    attempt("make_connection to an agent never added", lambda: s.ini.make_connection(ghost))
    attempt("remove_remote_agent of an agent never added", lambda: s.ini.remove_remote_agent(ghost))
    attempt("initialize_xfer to the empty agent name",
            lambda: s.ini.initialize_xfer("WRITE", ld, rd, "", b"x"))
    attempt("remove_remote_agent of oneself", lambda: s.ini.remove_remote_agent(s.ini_name))
    s.alive("unknown agents")

    # After remove_remote_agent: a handle made before, a new one, a notification.
    old = s.ini.initialize_xfer("WRITE", ld, rd, s.tgt_name, b"stale")
    S.post(s.ini, old, "WRITE before the removal")
    s.expect_notifs("WRITE before the removal", [b"stale"])
    s.images["w"][GUARD:GUARD + 4096] = s.src.inner[:4096]
    st, _ = attempt("remove_remote_agent of the target", lambda: s.ini.remove_remote_agent(s.tgt_name))
    assert st == "ok"
    attempt("remove_remote_agent of the target again", lambda: s.ini.remove_remote_agent(s.tgt_name))
    assert not s.ini.check_remote_metadata(s.tgt_name)
    s.tgt.fill("w", W_FILL)
    s.images["w"][GUARD:GUARD + W_SIZE] = W_FILL
    res = record("repost of a handle made before remove_remote_agent", post_and_wait(s.ini, old, "stale"))
    assert res != "ok", "BUG: a handle to a removed agent posted DONE"
    release(s.ini, old, "stale handle")
    res = run_xfer(s.ini, "WRITE", ld, rd, s.tgt_name, b"x", "initialize_xfer after remove_remote_agent")
    assert res.startswith("init:"), res
    st, _ = attempt("send_notif after remove_remote_agent", lambda: s.ini.send_notif(s.tgt_name, b"x"))
    assert st == "err"
    s.expect_notifs("after the removal", [], timeout=0)
    s.check_all_intact("after the removal")
    loaded = s.ini.add_remote_agent(s.good_md)
    assert loaded in (s.tgt_name, s.tgt_name.encode())
    s.alive("remove_remote_agent and re-adding")

    # Removal while a large transfer is in flight.
    size = 64 * MiB
    bufs_src = S.fast_pattern(size, 700)
    reg = S.register(s.ini, bufs_src)
    if isinstance(s.tgt, LocalTarget):
        sink = Guarded(size, fill=0)
        sink_reg = S.register(s.tgt.agent, sink.inner)
        sink_addr = sink.addr
        md = s.tgt.md()
    else:
        added = s.tgt.add_region("sink", size, 701)
        sink_addr = added["addr"]
        md = unb64(added["md"])
    s.ini.add_remote_agent(md)  # the sink region (full or partial metadata)
    h = s.ini.initialize_xfer("WRITE", s.ini.get_xfer_descs([(S.addr(bufs_src), size, 0)], "DRAM"),
                              s.ini.get_xfer_descs([(sink_addr, size, 0)], "DRAM"), s.tgt_name,
                              b"in-flight")
    state = s.ini.transfer(h)
    attempt(f"remove_remote_agent while a 64 MiB WRITE is {state}",
            lambda: s.ini.remove_remote_agent(s.tgt_name))
    res = record("state of the in-flight WRITE after the removal", post_state_settle(s.ini, h))
    release(s.ini, h, "in-flight handle after removal")
    s.ini.deregister_memory(reg)
    if isinstance(s.tgt, LocalTarget):
        s.tgt.agent.deregister_memory(sink_reg)
    # The notification may or may not come (the transfer may have finished, and its
    # notification may still be on its way): allowed once, at any later time.
    s.late_ok.append(b"in-flight")
    s.good_md = s.tgt.md()
    loaded = s.ini.add_remote_agent(s.good_md)
    assert loaded in (s.tgt_name, s.tgt_name.encode())
    s.alive("removal during a transfer")


def post_state_settle(agent, h) -> str:
    deadline = time.monotonic() + OP_TIMEOUT
    while True:
        try:
            state = agent.check_xfer_state(h)
        except Exception as e:  # noqa: BLE001 - classified
            if not S.is_nixl_error(e):
                raise
            return f"check:{status_name(e)}"
        if state != "PROC":
            return "ok" if state == "DONE" else state
        if time.monotonic() > deadline:
            raise AssertionError(f"{CASE}: transfer still in progress after {OP_TIMEOUT:.0f}s")
        time.sleep(1e-4)


# --------------------------------------------------------------------------------------
# 6. a 64 MiB notification
# --------------------------------------------------------------------------------------


def case_bignotif(s: Session, args) -> None:
    rng = np.random.default_rng(800)
    sizes = [64 * MiB, 16 * MiB, 16 * MiB + 1]
    payloads = {n: rng.bytes(n) for n in sizes}
    for n in sizes:
        p = payloads[n]
        label = f"send_notif of {n} bytes"
        t0 = time.perf_counter()
        st, _ = attempt(label, lambda: s.ini.send_notif(s.tgt_name, p))
        if st == "ok":
            s.expect_notifs(label, [p])
            record(f"{label}: delivered intact", f"{time.perf_counter() - t0:.2f}s")
        else:
            s.expect_notifs(label, [], timeout=0)
        s.alive(label)

        label = f"WRITE with a {n}-byte notification"
        res = run_xfer(s.ini, "WRITE", s.descs([s.ld(s.src, 0, 4096)]), s.descs([s.rd("w", 0, 4096)]),
                       s.tgt_name, p, label)
        if res == "ok":
            s.expect_notifs(label, [p])
            s.images["w"][GUARD:GUARD + 4096] = s.src.inner[:4096]
        else:
            s.expect_notifs(label, [], timeout=0)
            # A refused post moves no byte.
            if res.startswith("init:") or res.startswith("post:"):
                assert s.region_intact("w"), f"{label} failed ({res}) but bytes moved"
        s.alive(label)

        label = f"repost with a per-post {n}-byte notification"
        h = s.ini.initialize_xfer("READ", s.descs([s.ld(s.dst, 0, 4096)]), s.descs([s.rd("r", 0, 4096)]),
                                  s.tgt_name, b"small")
        res = record(label, post_and_wait(s.ini, h, label, p))
        release(s.ini, h, label)
        if res == "ok":
            s.expect_notifs(label, [p])
            s.dst.image[GUARD:GUARD + 4096] = s.images["r"][GUARD:GUARD + 4096]
        else:
            s.expect_notifs(label, [], timeout=0)
        assert s.dst.intact(), f"{label}: local bytes differ"
        s.alive(label)
    # The limit itself must work for Mooncake (README: over 16 MiB is refused).
    if MOONCAKE:
        ok = [(c, w, r) for c, w, r in OUTCOMES if c == CASE and w.startswith("send_notif of 16777216")]
        assert ok and ok[0][2] == "ok", f"a 16 MiB send_notif failed: {ok}"


# --------------------------------------------------------------------------------------
# 7. agent names with NUL bytes, 4 KiB long, empty
# --------------------------------------------------------------------------------------


def case_names(s: Session, args) -> None:
    names = {
        "with NUL bytes": ("bi-nul\x00ini\x00", "bi-nul\x00tgt\x00\x00x"),
        "4 KiB long": ("I" * 4096, "T" * 4095 + "z"),
        "non-ASCII": ("bi-ïnï-名前", "bi-tgt-\u2603\U0001F600"),
        "64 KiB long": ("J" * 65536, "U" * 65536),
    }
    for label, (ini_name, tgt_name) in names.items():
        st, ini = attempt(f"create an agent named {label}", lambda: S.new_agent_with(ini_name, "auto"))
        st2, tgt = attempt(f"create a target named {label}", lambda: S.new_agent_with(tgt_name, "auto"))
        if st != "ok" or st2 != "ok":
            s.alive(f"creating agents named {label}")
            continue
        src, dst = S.pattern(64 * KiB, 900), S.filled(64 * KiB)
        S.register(ini, src)
        S.register(tgt, dst)
        st, loaded = attempt(f"add_remote_agent of a target named {label}",
                             lambda: ini.add_remote_agent(tgt.get_agent_metadata()))
        if st == "ok":
            got = loaded.decode() if isinstance(loaded, bytes) else loaded
            assert got == tgt_name, f"add_remote_agent returned {got!r}, expected {tgt_name!r}"
            res = run_xfer(ini, "WRITE", ini.get_xfer_descs([(S.addr(src), src.nbytes, 0)], "DRAM"),
                           ini.get_xfer_descs([(S.addr(dst), dst.nbytes, 0)], "DRAM"), tgt_name,
                           b"named", f"WRITE between agents named {label}")
            notifs = S.Notifs(tgt)
            if res == "ok":
                assert S.same(src, dst), f"{label}: data mismatch"
                got = notifs.wait_count(ini_name, 1, f"notification from {label}", OP_TIMEOUT)
                assert got == [b"named"], got
            attempt(f"send_notif between agents named {label}",
                    lambda: ini.send_notif(tgt_name, b"hello\x00"))
            notifs.wait_for(ini_name, b"hello\x00", f"send_notif from an agent named {label}")
            record(f"notification sender name ({label}) arrives intact", "ok")
            # The notification's sender name is exactly the initiator's.
            assert set(k for k, v in notifs.got.items() if v) == {ini_name}, list(notifs.got)
            # And the target agent under a truncated name is unknown.
            cut = tgt_name.split("\x00")[0] if "\x00" in tgt_name else tgt_name[:-1]
            res = run_xfer(ini, "WRITE", ini.get_xfer_descs([(S.addr(src), 64, 0)], "DRAM"),
                           ini.get_xfer_descs([(S.addr(dst), 64, 0)], "DRAM"), cut, None,
                           f"WRITE to the {label} target's name cut short")
            assert res != "ok", f"{label}: a transfer to a different (cut) name succeeded"
            attempt(f"remove_remote_agent of a target named {label}",
                    lambda: ini.remove_remote_agent(tgt_name))
        del ini, tgt
        s.alive(f"agents named {label}")
    # The empty name.
    try:
        st, empty = attempt("create an agent with the empty name", lambda: S.new_agent_with("", "auto"))
    except AssertionError as e:
        # The bindings refuse it before NIXL: "ValueError: Agent needs a non-empty name".
        assert isinstance(e.__cause__, ValueError), e
        st = record("create an agent with the empty name", f"ValueError: {e.__cause__}")
    if st == "ok":
        buf = S.filled(4096)
        S.register(empty, buf)
        st, _ = attempt("add_remote_agent of the agent with the empty name",
                        lambda: s.ini.add_remote_agent(empty.get_agent_metadata()))
        if st == "ok":
            attempt("remove the agent with the empty name", lambda: s.ini.remove_remote_agent(""))
        s.ensure_target_known("empty name")
        st, _ = attempt("add_remote_agent of the NUL-named agent's metadata to the empty-named agent",
                        lambda: empty.add_remote_agent(s.good_md))
        del empty
    s.alive("the empty name")


# --------------------------------------------------------------------------------------
# 8. zero-length descriptors
# --------------------------------------------------------------------------------------


def case_zerolen(s: Session, args) -> None:
    W = W_SIZE
    src, dst = s.src, s.dst
    g = GUARD
    for op in ("WRITE", "READ"):
        loc = src if op == "WRITE" else dst
        rbuf = "w" if op == "WRITE" else "r"
        cases = [
            ("one zero-length descriptor", [s.ld(loc, 100, 0)], [s.rd(rbuf, 200, 0)]),
            ("zero-length at the region's end", [s.ld(loc, W, 0)], [s.rd(rbuf, W, 0)]),
            ("zero-length at address 0x10", [(0x10, 0, 0)], [(0x10, 0, 0)]),
            ("zero-length outside any region", [s.ld(loc, W + 64, 0)], [s.rd(rbuf, W + 64, 0)]),
            ("mixed with valid ones", [s.ld(loc, 0, 4096), s.ld(loc, 5000, 0), s.ld(loc, 8192, 4096),
                                       s.ld(loc, W, 0)],
             [s.rd(rbuf, 16384, 4096), s.rd(rbuf, 30000, 0), s.rd(rbuf, 40960, 4096),
              s.rd(rbuf, 0, 0)]),
            ("1000 zero-length descriptors", [s.ld(loc, i, 0) for i in range(1000)],
             [s.rd(rbuf, 3 * i, 0) for i in range(1000)]),
        ]
        for what, lrows, rrows in cases:
            label = f"{op} {what}"
            msg = b"zero-%d" % len(OUTCOMES)
            res = run_xfer(s.ini, op, s.descs(lrows), s.descs(rrows), s.tgt_name, msg, label)
            # Expected image: the non-empty descriptors moved.
            for (la, n, _), (ra, _, _) in zip(lrows, rrows):
                if n and res == "ok":
                    if op == "WRITE":
                        off_l, off_r = la - src.addr, ra - s.addrs["w"]
                        s.images["w"][g + off_r:g + off_r + n] = src.inner[off_l:off_l + n]
                    else:
                        off_l, off_r = la - dst.addr, ra - s.addrs["r"]
                        dst.image[g + off_l:g + off_l + n] = s.images["r"][g + off_r:g + off_r + n]
            s.expect_notifs(label, [msg] if res == "ok" else [], timeout=OP_TIMEOUT if res == "ok" else 0)
            s.check_all_intact(label)
            s.alive(label)
    # (The wrapper's get_xfer_descs indexes element 0: build the lists directly.)
    from nixl_cu12 import _bindings as nixl_bind

    empty = np.zeros((0, 3), dtype=np.uint64)
    st, h = attempt("initialize_xfer with empty descriptor lists",
                    lambda: s.ini.initialize_xfer("WRITE", nixl_bind.nixlXferDList(nixl_bind.DRAM_SEG, empty),
                                                  nixl_bind.nixlXferDList(nixl_bind.DRAM_SEG, empty),
                                                  s.tgt_name, b"empty-lists"))
    if st == "ok":
        res = record("post of empty descriptor lists", post_and_wait(s.ini, h, "empty lists"))
        release(s.ini, h, "empty lists")
        s.expect_notifs("empty lists", [b"empty-lists"] if res == "ok" else [],
                        timeout=OP_TIMEOUT if res == "ok" else 0)
    s.check_all_intact("empty lists")
    # Prepped lists with zero-length entries.
    local_h = s.ini.prep_xfer_dlist("NIXL_INIT_AGENT", [s.ld(src, 0, 0), s.ld(src, 0, 4096),
                                                       s.ld(src, 4096, 0)], "DRAM")
    remote_h = s.ini.prep_xfer_dlist(s.tgt_name, [s.rd("w", 0, 0), s.rd("w", 65536, 4096),
                                                 s.rd("w", 0, 0)], "DRAM")
    h = s.ini.make_prepped_xfer("WRITE", local_h, [0, 1, 2], remote_h, [0, 1, 2], b"zero-prepped")
    res = record("prepped WRITE with zero-length entries", post_and_wait(s.ini, h, "prepped zero"))
    s.ini.release_xfer_handle(h)
    if res == "ok":
        s.images["w"][g + 65536:g + 65536 + 4096] = src.inner[:4096]
        s.expect_notifs("prepped zero", [b"zero-prepped"])
    s.check_all_intact("prepped zero")
    for dl in (local_h, remote_h):
        s.ini.release_dlist_handle(dl)
    s.alive("zero-length descriptors")


# --------------------------------------------------------------------------------------
# 9. a million descriptors in one transfer
# --------------------------------------------------------------------------------------


def scramble(n: int, modulus: int, a: int, b: int) -> np.ndarray:
    """n distinct values in [0, modulus) (a power of two) in scattered order:
    i -> (a*i + b) mod modulus with odd a is a bijection (cheaper than a permutation)."""
    assert modulus & (modulus - 1) == 0 and a % 2 == 1 and n <= modulus
    with np.errstate(over="ignore"):
        v = np.arange(n, dtype=np.uint64) * np.uint64(a) + np.uint64(b)
    return v & np.uint64(modulus - 1)


def case_manydescs(s: Session, args) -> None:
    n = args.descs
    size = 8 * MiB
    slots = size // 8
    assert n <= slots
    rng = np.random.default_rng(950)
    big_src = S.fast_pattern(size, 951)
    big_dst = S.filled(size, R_FILL)
    S.register(s.ini, big_src, big_dst)
    w8, r8 = s.addrs["w8"], s.addrs["r8"]

    # WRITE: n descriptors of 8 bytes, remote slots permuted.
    perm = scramble(n, slots, 0x9E3779B97F4A7C15, 12345)
    local = S.desc_table(S.addr(big_src) + np.arange(n, dtype=np.uint64) * np.uint64(8), 8)
    remote = S.desc_table(np.uint64(w8) + perm * np.uint64(8), 8)
    t0 = time.perf_counter()
    ldl, rdl = s.ini.get_xfer_descs(local, "DRAM"), s.ini.get_xfer_descs(remote, "DRAM")
    t1 = time.perf_counter()
    st, h = attempt(f"initialize_xfer WRITE of {n} 8-byte descriptors",
                    lambda: s.ini.initialize_xfer("WRITE", ldl, rdl, s.tgt_name, b"million-w"))
    t2 = time.perf_counter()
    if st == "ok":
        res = record(f"WRITE of {n} 8-byte descriptors", post_and_wait(s.ini, h, "million WRITE"))
        t3 = time.perf_counter()
        release(s.ini, h, "million WRITE")
        log(f"WRITE of {n} x 8 B: descs {t1 - t0:.2f}s, initialize_xfer {t2 - t1:.2f}s, "
            f"transfer {t3 - t2:.2f}s; {res}")
        if res == "ok":
            img = s.images["w8"][GUARD:GUARD + size].view(np.uint64)
            img[perm.astype(np.int64)] = big_src.view(np.uint64)[:n]
            s.expect_notifs("million WRITE", [b"million-w"])
            assert s.region_intact("w8"), "BUG: WRITE of a million descriptors: target bytes differ"
            log("target region verified whole (every slot, untouched ones, guards)")
        else:
            s.expect_notifs("million WRITE", [], timeout=0)
    del ldl, rdl, local, remote
    s.alive("a million-descriptor WRITE")

    # READ: n descriptors of 1 byte at scattered offsets on both sides.
    lpos = scramble(n, size, 0xD1B54A32D192ED03, 777)
    rpos = scramble(n, size, 0x8CB92BA72F3D8DD7, 4242)
    local = S.desc_table(np.uint64(S.addr(big_dst)) + lpos, 1)
    remote = S.desc_table(np.uint64(r8) + rpos, 1)
    t0 = time.perf_counter()
    ldl, rdl = s.ini.get_xfer_descs(local, "DRAM"), s.ini.get_xfer_descs(remote, "DRAM")
    st, h = attempt(f"initialize_xfer READ of {n} 1-byte descriptors",
                    lambda: s.ini.initialize_xfer("READ", ldl, rdl, s.tgt_name, b"million-r"))
    t1 = time.perf_counter()
    if st == "ok":
        res = record(f"READ of {n} 1-byte descriptors", post_and_wait(s.ini, h, "million READ"))
        t2 = time.perf_counter()
        release(s.ini, h, "million READ")
        log(f"READ of {n} x 1 B: descs+initialize_xfer {t1 - t0:.2f}s, transfer {t2 - t1:.2f}s; {res}")
        if res == "ok":
            expect = S.filled(size, R_FILL)
            expect[lpos.astype(np.int64)] = S.fast_pattern(size, 952)[rpos.astype(np.int64)]
            assert S.same(big_dst, expect), "BUG: READ of a million descriptors: bytes differ"
            s.expect_notifs("million READ", [b"million-r"])
            log("local buffer verified whole")
        else:
            s.expect_notifs("million READ", [], timeout=0)
    s.alive("a million-descriptor READ")


# --------------------------------------------------------------------------------------

CASES = {
    "metadata": (case_metadata, None),
    "bounds": (case_bounds, None),
    "stale_conn": (case_stale_conn, None),
    "memtypes": (case_memtypes, None),
    "handles": (case_handles, None),
    "unknown": (case_unknown, None),
    "bignotif": (case_bignotif, None),
    "names": (case_names, None),
    "zerolen": (case_zerolen, None),
    "manydescs": (case_manydescs, [{"name": "w8", "size": 8 * MiB, "fill": W_FILL},
                                   {"name": "r8", "size": 8 * MiB, "seed": 952}]),
}


def main() -> None:
    global CASE
    if len(sys.argv) > 1 and sys.argv[1] == "_target":
        child_target()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_ucx_md":
        child_ucx_md()
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--mode", choices=["local", "auto", "tcp"], default="local")
    p.add_argument("--flips", type=int, default=200, help="metadata: bit-flipped variants")
    p.add_argument("--alive-every", type=int, default=1,
                   help="metadata: the valid transfer after every Nth variant (and at the end)")
    p.add_argument("--size-mib", type=int, default=128, help="handles: size of the in-flight WRITE")
    p.add_argument("--descs", type=int, default=1_000_000, help="manydescs: descriptors")
    args = p.parse_args()
    CASE = args.case
    fn, extra = CASES[args.case]
    log(f"bad input: case {args.case}, mode {args.mode}, backend {BACKEND!r}")
    t0 = time.perf_counter()
    s = Session(args.case, args.mode, extra)
    try:
        fn(s, args)
        s.close()
    finally:
        if isinstance(s.tgt, RemoteTarget):
            s.tgt.cleanup()
    summary()
    log(f"case {args.case} ({args.mode}) done in {time.perf_counter() - t0:.1f}s, "
        f"{s.rounds} valid transfers verified along the way")
    print(f"SCENARIO {args.case} OK", flush=True)


if __name__ == "__main__":
    main()
