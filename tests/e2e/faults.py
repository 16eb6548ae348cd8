#!/usr/bin/env python3
"""Fault injection over TCP, through the real NIXL: two processes (the target in
a child process), protocol=tcp on both, and fault_proxy.FaultProxy between them.

    UCX_MODULES=^efa UCX_NET_DEVICES=lo NIXL_MOONCAKE_IP_ADDR=127.0.0.1 \\
        NIXL_PLUGIN_DIR=<dir with libplugin_Mooncake.so> python tests/e2e/faults.py <case>

How the initiator reaches the target through the proxy: the target publishes its
TCP listener (ip, port) in its connection info, inside NIXL's agent metadata.
The initiator loads that metadata with the port rewritten to the proxy's
(fault_proxy.rewrite_metadata): no plugin option is needed.  The proxy connects
to the real port; the hello (with the target's token) passes through unchanged.

Every case posts WRITE and READ (each with a notification) of 4 KiB and 16 MiB
while a fault is armed, and checks:
  * the transfer ends DONE with exactly the right bytes (READ: the initiator's
    buffer; WRITE: the target's memory, checked by the target when the
    notification arrives), or with a NIXL error within the case's bound;
    no wait is unbounded, so a hang fails the case;
  * the target never sees a notification for data that did not fully land: it
    checks its memory against the expected bytes whenever a notification
    arrives, and any notification of a transfer the initiator saw fail, or
    that nobody announced, is a violation;
  * afterwards (fault off, the remote reloaded when NIXL dropped it) a fresh
    WRITE and READ through the proxy succeed and are verified.
A line ``OUTCOME <case> <fault> <op> <size> <result> <ms>`` is printed per
faulted transfer; the scenario ends with ``SCENARIO <case> OK``.
"""

from __future__ import annotations

import os
import sys
import time

TARGET_CMD = "_fault_target"
_CHANNEL_OUT = None
if len(sys.argv) > 1 and sys.argv[1] == TARGET_CMD:
    # The peer uses its stdout as the message channel: move it away before
    # NIXL can write to it (as scenarios.py does for its peers).
    sys.stdout.flush()
    _CHANNEL_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import queue  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import scenarios as S  # noqa: E402  (no side effects for this argv)
from fault_proxy import (  # noqa: E402
    C2S, HEADER_LEN, NOTIF, READ_REQ, READ_RESP, S2C, SEG_LEN, WRITE, FaultProxy,
    rewrite_metadata, target_port,
)

KiB, MiB = S.KiB, S.MiB
BIG = 16 * MiB
SIZES = (4 * KiB, BIG)
BUF = BIG  # every buffer on both sides
R_SEED = 7001  # what the target's "r" buffer holds
HANG = float(os.environ.get("FAULTS_HANG_S", "20"))  # no single wait may exceed this
MARGIN = float(os.environ.get("FAULTS_MARGIN_S", "1.5"))  # slack on a loaded 2-core host
FAST = 1.0  # a reset/close must be noticed within FAST + MARGIN (the stall timeout is far)


def log(*parts) -> None:
    S.log(*parts)


def say(line: str) -> None:
    """A result line on stdout, written at once (print() writes the newline
    separately, and the target process shares the terminal)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# The target process
# --------------------------------------------------------------------------------------


def sc_fault_target() -> None:
    """A target that checks its memory whenever a notification arrives.

    Commands: setup; expect (a payload and what its data must be); wait_notif;
    check (memory now); report (everything received, every violation); quit.
    """
    S._LOG_PREFIX = f"[target {os.getpid()}]"
    chan = S.Channel(sys.stdin, _CHANNEL_OUT)
    setup = chan.recv()
    agent = S.new_agent(setup["name"], create=False)
    agent.create_backend(S.BACKEND, setup["params"])
    size = setup["size"]
    bufs = {"w": S.filled(size), "r": S.fast_pattern(size, R_SEED)}
    S.register(agent, *bufs.values())
    chan.send(ok=True, md=S.b64(agent.get_agent_metadata()), pid=os.getpid(),
              bufs={k: S.addr(v) for k, v in bufs.items()})
    expect: dict[bytes, Optional[list]] = {}
    received: list[list] = []  # [sender, payload b64, monotonic, memory ok]
    violations: list[str] = []
    seen: set[bytes] = set()

    def poll() -> None:
        for sender, msgs in agent.get_new_notifs().items():
            for m in msgs:
                now = time.monotonic()
                ok = True
                if m not in expect:
                    violations.append(f"unannounced notification {m!r} from {sender!r}")
                    ok = False
                elif expect[m] is not None:
                    buf, off, length, digest = expect[m]
                    if S.sha256(bufs[buf][off:off + length]) != digest:
                        violations.append(
                            f"notification {m!r} arrived but {buf}[{off}:+{length}] does not hold "
                            "the transfer's bytes: a notification for data that did not land")
                        ok = False
                if m in seen:
                    violations.append(f"notification {m!r} arrived twice")
                seen.add(m)
                received.append([sender, S.b64(m), now, ok])
                S.log(f"notification {m!r} from {sender!r}: "
                      f"{'memory verified' if ok and expect.get(m) else 'recorded'}")

    while True:
        poll()
        try:
            msg = chan.q.get(timeout=0.002)
        except queue.Empty:
            continue
        if msg is None:
            return  # the initiator went away
        cmd = msg["cmd"]
        try:
            reply: dict = {}
            if cmd == "quit":
                chan.send(ok=True)
                return
            if cmd == "expect":
                expect[S.unb64(msg["payload"])] = msg["data"]
            elif cmd == "wait_notif":
                payload = S.unb64(msg["payload"])
                deadline = time.monotonic() + msg["within"]
                while payload not in seen:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no notification {payload!r} within {msg['within']}s")
                    poll()
                    time.sleep(0.0005)
                reply = {"at": next(r[2] for r in received if S.unb64(r[1]) == payload)}
            elif cmd == "check":
                bad = [f"{b}[{o}:+{n}]" for b, o, n, d in msg["data"]
                       if S.sha256(bufs[b][o:o + n]) != d]
                reply = {"bad": bad}
            elif cmd == "report":
                poll()
                reply = {"received": received, "violations": violations}
            else:
                raise ValueError(f"unknown command {cmd!r}")
            chan.send(ok=True, **reply)
        except Exception as e:  # noqa: BLE001 - reported to the initiator
            chan.send(ok=False, error=f"{type(e).__name__}: {e}")


class FaultTarget:
    """The target process, driven over its stdin/stdout."""

    def __init__(self, name: str, params: dict, size: int):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), TARGET_CMD],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.chan = S.Channel(self.proc.stdout, self.proc.stdin)
            hello = self.request("setup", name=name, params=params, size=size)
        except BaseException:
            self.cleanup()
            raise
        self.md = S.unb64(hello["md"])
        self.pid = hello["pid"]
        self.addrs = hello["bufs"]

    def request(self, cmd: str, timeout: float = HANG, **fields) -> dict:
        self.chan.send(cmd=cmd, **fields)
        reply = self.chan.recv(timeout)
        assert reply.get("ok"), f"target, command {cmd!r}: {reply.get('error')}"
        return reply

    def quit(self) -> None:
        self.request("quit")
        rc = self.proc.wait(timeout=HANG)
        assert rc == 0, f"target exited with {rc}"

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # only our own child, on failure
            self.proc.wait(timeout=HANG)


# --------------------------------------------------------------------------------------
# The initiator's side
# --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    op: str
    size: int
    ok: bool
    error: str
    seconds: float      # from transfer() to DONE or the error
    after_fault: float  # from the fault firing to the end (-1: it never fired)
    fired: str          # where the fault hit

    def result(self) -> str:
        return "DONE" if self.ok else f"ERR({self.error.split(':')[0]})"


class Rig:
    """Initiator agent + target process + proxy, for one case."""

    def __init__(self, case: str, timeout_ms: int, streams: int = 2):
        self.case = case
        self.timeout_s = timeout_ms / 1000
        params = {"protocol": "tcp", "streams": str(streams), "timeout_ms": str(timeout_ms)}
        self.streams = streams
        self.tgt = FaultTarget("ft-target", params, BUF)
        self.proxy = None
        try:
            port = target_port(self.tgt.md, S.BACKEND)
            self.proxy = FaultProxy(("127.0.0.1", port), name=f"proxy:{case}", log=log)
            self.md = rewrite_metadata(self.tgt.md, self.proxy.port, S.BACKEND)
            log(f"target process {self.tgt.pid} listens on 127.0.0.1:{port}; the initiator "
                f"reaches it through the proxy on 127.0.0.1:{self.proxy.port}; "
                f"timeout_ms={timeout_ms}, streams={streams}")
            self.ini = S.new_agent("ft-init", create=False)
            self.ini.create_backend(S.BACKEND, params)
            self.src, self.dst = S.filled(BUF), S.filled(BUF)
            S.register(self.ini, self.src, self.dst)
            self.remote_r = S.fast_pattern(BUF, R_SEED)
            self.load()
        except BaseException:
            self.close()
            raise
        self.outcomes: list[tuple[str, Outcome]] = []
        self.ok_notifs: list[bytes] = []
        self.failed_notifs: list[bytes] = []
        self.seq = 0

    def load(self) -> None:
        name = self.ini.add_remote_agent(self.md)
        assert name in (self.tgt.name, self.tgt.name.encode()), name

    def reload(self) -> str:
        """Makes the target reachable again after a failure: NIXL may have dropped
        it (REMOTE_DISCONNECT), or may hold it with the link in its backoff."""
        known = self.ini.check_remote_metadata(self.tgt.name)
        if known:
            self.ini.remove_remote_agent(self.tgt.name)
        self.load()
        return "removed and reloaded" if known else "reloaded (NIXL had dropped it)"

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.tgt.cleanup()

    # ---------------------------------------------------------------- transfers

    def _prepare(self, op: str, size: int, notif: bytes):
        self.seq += 1
        if op == "WRITE":
            self.src[:size] = S.fast_pattern(size, 9000 + self.seq)
            digest = S.sha256(self.src[:size])
            self.tgt.request("expect", payload=S.b64(notif), data=["w", 0, size, digest])
            local, remote = self.src[:size], ("w", digest)
        else:
            self.dst[:size] = 0
            self.tgt.request("expect", payload=S.b64(notif), data=None)
            local, remote = self.dst[:size], ("r", None)
        h = self.ini.initialize_xfer(
            op, S.xfer_descs(self.ini, local),
            self.ini.get_xfer_descs([(self.tgt.addrs[remote[0]], size, 0)], "DRAM"),
            self.tgt.name, notif)
        return h, remote[1]

    def attempt(self, op: str, size: int, notif: bytes, fault=None,
                bound: float = HANG) -> Outcome:
        """Posts one transfer and waits (at most `bound`, else: a hang) for DONE or
        an error. On DONE its bytes are verified (WRITE: at the target, when the
        notification arrives)."""
        h, digest = self._prepare(op, size, notif)
        error = ""
        t0 = time.monotonic()
        try:
            state = self.ini.transfer(h)
            deadline = t0 + bound
            spins = 0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{op} of {size} B ({fault.describe() if fault else 'no fault'}) neither "
                        f"completed nor failed within {bound:.1f}s: a hang")
                spins += 1
                if spins > 200:
                    time.sleep(100e-6)
                state = self.ini.check_xfer_state(h)
            if state != "DONE":
                error = f"state {state}"
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - checked here
            assert S.is_nixl_error(e), f"{op}: a non-NIXL error: {type(e).__name__}: {e!r}"
            error = f"{type(e).__name__}: {e}"
        t1 = time.monotonic()
        fired = fault is not None and fault.fired.is_set()
        out = Outcome(op, size, not error, error, t1 - t0, (t1 - fault.at) if fired else -1.0,
                      fault.describe() if fired else "not fired")
        try:
            self.ini.release_xfer_handle(h)
        except Exception as e:  # noqa: BLE001 - reported
            raise AssertionError(f"releasing the handle of a {out.result()} {op}: "
                                 f"{type(e).__name__}: {e}") from e
        if out.ok:
            if op == "READ":
                assert S.same(self.dst[:size], self.remote_r[:size]), (
                    f"READ of {size} B reported DONE with wrong bytes ({out.fired})")
            self.ok_notifs.append(notif)
        else:
            self.failed_notifs.append(notif)
        return out

    def expect_notif(self, notif: bytes, what: str) -> None:
        """The target got `notif` (its data verified on arrival)."""
        self.tgt.request("wait_notif", payload=S.b64(notif), within=HANG)

    def healthy(self, tag: str, sizes=SIZES) -> None:
        """WRITE and READ through the proxy with no fault: both verified."""
        for size in sizes:
            for op in ("WRITE", "READ"):
                notif = f"healthy-{tag}-{op}-{size}".encode()
                out = self.attempt(op, size, notif)
                assert out.ok, f"after {tag}: a healthy {op} of {size} B failed: {out.error}"
                self.expect_notif(notif, f"healthy {op}")

    def recover(self, tag: str, sizes=(4 * KiB,)) -> str:
        """Fault off; reload the target if needed; a verified WRITE and READ."""
        self.proxy.disarm()
        how = self.reload()
        self.healthy(tag, sizes)
        return how

    def faulted(self, fault_name: str, op: str, size: int, arm, expect: str,
                bound: float, lower: float = 0.0, recover_sizes=None) -> Outcome:
        """Arms a fault (arm() -> Fault or None), runs one transfer, checks it
        against `expect` ("ok", "error" or "either") and the time bound, then
        recovers. Returns the outcome."""
        self.proxy.disarm()
        fault = arm()
        notif = f"{fault_name}-{op}-{size}-{self.seq}".encode()
        out = self.attempt(op, size, notif, fault, bound=max(bound + MARGIN, HANG))
        if fault is not None and out.ok and not fault.fired.is_set():
            # A fault aimed past the end of the transfer (its notification) may
            # fire just after the initiator saw DONE.
            fault.fired.wait(HANG)
            out.fired = fault.describe()
        if fault is not None:
            assert fault.fired.is_set(), (
                f"{fault_name}: the fault never fired during the {op} of {size} B "
                f"({fault.note or 'trigger point not reached'})")
        line = (f"OUTCOME {self.case} {fault_name} {op} {size} {out.result()} "
                f"{out.seconds * 1e3:.0f}ms"
                + (f" ({out.after_fault * 1e3:.0f}ms after the fault)" if out.after_fault >= 0 else ""))
        say(line)
        log(f"{fault_name}: {op} {size} B -> {out.result()} in {out.seconds * 1e3:.0f} ms; "
            f"fault: {out.fired}; {out.error}")
        if expect == "ok":
            assert out.ok, f"{fault_name}: {op} of {size} B must complete, failed: {out.error}"
        elif expect == "error":
            assert not out.ok, f"{fault_name}: {op} of {size} B must fail, it completed"
        if not out.ok:
            ref = out.after_fault if out.after_fault >= 0 else out.seconds
            assert ref <= bound + MARGIN, (
                f"{fault_name}: the {op} of {size} B failed only {ref:.2f}s after the fault "
                f"(bound {bound:.2f}s + {MARGIN}s)")
            assert out.seconds >= lower, (
                f"{fault_name}: the {op} of {size} B failed after {out.seconds:.2f}s, before "
                f"{lower:.2f}s")
        if out.ok:
            # WRITE: its data verified by the target when the notification came;
            # READ: verified here, and the notification must arrive too.
            self.expect_notif(notif, f"{fault_name} {op}")
        self.outcomes.append((fault_name, out))
        how = self.recover(f"{fault_name}-{op}-{size}", recover_sizes or (4 * KiB,))
        log(f"{fault_name}: healthy WRITE and READ verified after the {out.result()} ({how})")
        return out

    def finish(self) -> None:
        """A fence notification, then the target's report: no violation, every
        DONE transfer's notification once, none of a failed one."""
        self.proxy.disarm()
        self.tgt.request("expect", payload=S.b64(b"fence"), data=None)
        self.ini.send_notif(self.tgt.name, b"fence")
        self.expect_notif(b"fence", "fence")
        rep = self.tgt.request("report")
        assert not rep["violations"], "target: " + "; ".join(rep["violations"])
        got = [S.unb64(r[1]) for r in rep["received"]]
        late = [n for n in self.failed_notifs if n in got]
        assert not late, f"notifications of transfers the initiator saw fail arrived: {late!r}"
        missing = [n for n in self.ok_notifs if n not in got]
        assert not missing, f"notifications of DONE transfers never arrived: {missing!r}"
        log(f"target report: {len(got)} notifications, all with their data in place; none of "
            f"the {len(self.failed_notifs)} failed transfers notified")
        self.tgt.quit()


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

MID_WRITE = HEADER_LEN + SEG_LEN + 1000   # inside a Write frame's data
MID_READ_RESP = HEADER_LEN + 1000         # inside a ReadResp frame's data
MID_READ_REQ = HEADER_LEN + 10            # inside a ReadReq's segment table
# (kind None, offset 12): inside the next frame's header, e.g. a WriteAck


def aimed(rig: Rig, action: str, **kw):
    """The four places a connection can break for each op: the request or the
    answer, both in the middle of a frame."""
    p = rig.proxy
    return {
        ("WRITE", "request"): lambda: p.arm(C2S, action, WRITE, MID_WRITE, **kw),
        ("WRITE", "answer"): lambda: p.arm(S2C, action, None, 12, **kw),
        ("READ", "request"): lambda: p.arm(C2S, action, READ_REQ, MID_READ_REQ, **kw),
        ("READ", "answer"): lambda: p.arm(S2C, action, READ_RESP, MID_READ_RESP, **kw),
    }


def run_breaks(rig: Rig, action: str, auto_recovery: bool = False) -> None:
    """reset / truncate / half_close: every place, both ops, both sizes: a NIXL
    error within FAST + MARGIN (the stall timeout is far longer)."""
    places = aimed(rig, action)
    first = True
    for (op, where), arm in places.items():
        for size in SIZES:
            name = f"{action}-{where}"
            if first and auto_recovery:
                first = False
                auto_recover(rig, name, op, size, arm)
                continue
            rig.faulted(name, op, size, arm, "error", FAST)


def auto_recover(rig: Rig, name: str, op: str, size: int, arm) -> None:
    """One fault where the link must come back by itself: NIXL keeps the
    remote (or reloads it), the plugin reconnects after its backoff (2 s)."""
    rig.proxy.disarm()
    fault = arm()
    notif = f"{name}-{op}-{size}-auto".encode()
    out = rig.attempt(op, size, notif, fault)
    say(f"OUTCOME {rig.case} {name} {op} {size} {out.result()} {out.seconds * 1e3:.0f}ms "
          f"({out.after_fault * 1e3:.0f}ms after the fault)")
    assert not out.ok and out.after_fault <= FAST + MARGIN, out
    rig.outcomes.append((name, out))
    rig.proxy.disarm()
    if not rig.ini.check_remote_metadata(rig.tgt.name):
        log(f"{name}: NIXL dropped the remote after the error; reloading it")
        rig.load()
    t0 = time.monotonic()
    attempts, last = 0, ""
    while True:
        attempts += 1
        probe = f"{name}-probe-{attempts}".encode()
        o = rig.attempt("WRITE", 4 * KiB, probe, bound=HANG)
        if o.ok:
            rig.expect_notif(probe, "recovery probe")
            break
        last = o.error
        if "RemoteDisconnect" not in o.error and "Remote" not in o.error:
            log(f"{name}: a post during the backoff failed with {o.error}")
        assert time.monotonic() - t0 < 2.0 + 5.0, (
            f"{name}: the link did not come back by itself within 7s ({attempts} posts; {last})")
        time.sleep(0.05)  # polling interval between posts during the backoff
    # Posts during the backoff fail on purpose: not transfers of the fault.
    rig.failed_notifs = [n for n in rig.failed_notifs if b"-probe-" not in n]
    log(f"{name}: the link came back by itself {time.monotonic() - t0:.2f}s after the failure "
        f"({attempts} post(s))")
    rig.healthy(f"{name}-auto")


def case_pass(rig: Rig) -> None:
    """No fault: the proxy itself is transparent (and 16 MiB each way works)."""
    rig.healthy("pass", SIZES)
    assert rig.proxy.accepted >= 1, "nothing went through the proxy"
    log(f"proxy carried {rig.proxy.accepted} connection(s)")


def case_delay(rig: Rig) -> None:
    """A fixed delay before every forwarded chunk, both directions: all DONE."""
    for d in (C2S, S2C):
        rig.proxy.shape(d, delay=0.002)
    for op in ("WRITE", "READ"):
        for size in SIZES:
            def arm():
                for d in (C2S, S2C):
                    rig.proxy.shape(d, delay=0.002)
            rig.faulted("delay-2ms-per-chunk", op, size, arm, "ok", HANG)


def case_slow_reader(rig: Rig) -> None:
    """The receiving side reads slowly (6 MiB/s per stream, the whole 16 MiB
    takes longer than timeout_ms = 1 s, while bytes keep moving): all DONE."""
    rate = 6 * MiB
    for op in ("WRITE", "READ"):
        for size in SIZES:
            direction = C2S if op == "WRITE" else S2C
            out = rig.faulted(f"slow-{rate // MiB}MiB/s", op, size,
                              lambda d=direction: rig.proxy.shape(d, rate=rate), "ok", HANG)
            if size == BIG:
                log(f"slow {op}: {S.rate(size, out.seconds)}; longer than timeout_ms: "
                    f"{out.seconds > rig.timeout_s}")
    # Slower still: one 1 MiB frame takes ~2x timeout_ms. Either the transfer
    # completes, or it fails with a clear error within timeout_ms + margin.
    for op in ("WRITE", "READ"):
        direction = C2S if op == "WRITE" else S2C
        out = rig.faulted("slow-512KiB/s", op, 2 * MiB,
                          lambda d=direction: rig.proxy.shape(d, rate=512 * KiB), "either",
                          rig.timeout_s)
        if not out.ok:
            say(f"NOTE {rig.case}: a {op} whose 1 MiB frames each take ~2 s to cross a "
                f"512 KiB/s link failed after {out.seconds:.2f}s with timeout_ms="
                f"{rig.timeout_s * 1e3:.0f} although bytes kept moving: {out.error}")


def case_stall_short(rig: Rig) -> None:
    """A stall of 0.3 s (timeout_ms = 2000) at each place: all DONE, slower."""
    for (op, where), arm in aimed(rig, "stall", seconds=0.3).items():
        for size in SIZES:
            out = rig.faulted(f"stall-0.3s-{where}", op, size, arm, "ok", HANG)
            assert out.seconds >= 0.25, f"a 0.3 s stall, yet done in {out.seconds:.2f}s"


def case_stall_long(rig: Rig) -> None:
    """A stall of 4 s, longer than timeout_ms = 1500, in the middle of the data:
    a NIXL error no earlier than timeout_ms after the post, no later than
    timeout_ms (+ margin) after the stall began."""
    p, t = rig.proxy, rig.timeout_s
    arms = {
        ("WRITE", "request"): lambda: p.arm(C2S, "stall", WRITE, MID_WRITE, seconds=4.0),
        ("READ", "answer"): lambda: p.arm(S2C, "stall", READ_RESP, MID_READ_RESP, seconds=4.0),
    }
    for (op, where), arm in arms.items():
        for size in SIZES:
            rig.faulted(f"stall-4s-{where}", op, size, arm, "error", t, lower=0.9 * t)


def case_stall_late(rig: Rig) -> None:
    """A WRITE's stream stalls at a frame boundary (the target sits idle between
    frames, so only the initiator times out, timeout_ms = 1500) while the proxy
    holds the rest of that stream's frames, as a slow hop (or a target whose
    serving threads are descheduled while its socket buffer holds the data)
    would. The initiator fails, recovers and writes new data to the same range,
    which the target verifies on the notification. Only then are the held
    frames of the failed WRITE released: the new data must stay intact."""
    p, t = rig.proxy, rig.timeout_s
    holder = {}

    def arm():
        holder["f"] = p.arm(C2S, "stall", None, 0, seconds=HANG)  # ended by hand below
        return holder["f"]

    rig.faulted("stall-boundary", "WRITE", BIG, arm, "error", t, lower=0.9 * t,
                recover_sizes=(BIG,))
    f = holder["f"]
    assert not f.ended.is_set(), f"the stall ended before the recovery was done: {f.note}"
    # The recovery wrote (and the target verified) new data over the same range.
    healthy_digest = S.sha256(rig.src[:BIG])
    p.disarm(end_stalls=True)  # the held frames of the failed WRITE go on now
    assert f.ended.wait(HANG), "the stall never ended"
    deadline = time.monotonic() + HANG
    while f.conn in rig.proxy._call(lambda: list(rig.proxy.conns)):
        assert time.monotonic() < deadline, "the stalled connection never closed"
        time.sleep(0.01)  # polling interval
    # The connection is closed only once the target closed its side, after it
    # served (or refused) every frame it had received.
    bad = rig.tgt.request("check", data=[["w", 0, BIG, healthy_digest]])["bad"]
    say(f"OUTCOME {rig.case} late-delivery WRITE {BIG} "
        f"{'STALE-DATA-LANDED' if bad else 'intact'} -")
    log(f"stall released ({f.note}): the held frames of the failed WRITE reached the target "
        f"after the recovery; the recovered data is {'OVERWRITTEN' if bad else 'intact'}")
    assert not bad, (
        "PLUGIN BUG: frames of a WRITE that had failed (NIXL_ERR_REMOTE_DISCONNECT after "
        "timeout_ms) were applied by the target after a later WRITE to the same range had "
        f"completed and been notified: {bad} now holds the failed WRITE's bytes. The target "
        "keeps serving the dead link's connection (idle between frames, so no timeout of "
        "its own), and nothing fences it off when the initiator reconnects.")


def case_reset(rig: Rig) -> None:
    """RST (SO_LINGER 0) in the middle of a frame, request or answer side."""
    run_breaks(rig, "reset", auto_recovery=True)


def case_truncate(rig: Rig) -> None:
    """Forward up to the middle of a frame, then a clean close (FIN) both ways."""
    run_breaks(rig, "truncate")


def case_half_close(rig: Rig) -> None:
    """FIN in one direction only, mid-frame; then an idle half-close of each
    direction, after which the next transfer must work (clean close between
    frames: the link reconnects at once)."""
    run_breaks(rig, "half_close")
    for d in (S2C, C2S):
        rig.healthy(f"warm-{d}", (BIG,))  # every stream up
        deadline = time.monotonic() + HANG
        while rig.proxy.open_connections() < rig.streams:
            assert time.monotonic() < deadline, "the streams never all came up"
            time.sleep(0.01)  # polling interval
        n = rig.proxy.half_close_now(d)
        assert rig.proxy.wait_closed(HANG), f"idle half-close {d}: connections stayed open"
        t0 = time.monotonic()
        for op in ("WRITE", "READ"):
            notif = f"after-idle-half-close-{d}-{op}".encode()
            out = rig.attempt(op, 4 * KiB, notif)
            say(f"OUTCOME {rig.case} idle-half-close-{d} {op} {4 * KiB} {out.result()} "
                  f"{out.seconds * 1e3:.0f}ms")
            assert out.ok, (f"the first {op} after an idle half-close ({d}) of {n} connection(s) "
                            f"failed: {out.error}")
            rig.expect_notif(notif, "after idle half-close")
        log(f"idle half-close {d} of {n} connection(s): the next transfers reconnected and "
            f"were verified ({(time.monotonic() - t0) * 1e3:.0f} ms)")


def case_notif_cut(rig: Rig) -> None:
    """RST in the middle of a notification frame (a transfer's, and one sent
    outside any transfer), and in the middle of the target's acknowledgement
    of a notification. The initiator has written the small frame whole when
    the proxy cuts it, so a transfer completes; the notification, never
    acknowledged, is sent again on the link's next connections (opened by
    the plugin itself after its backoff) and must arrive exactly once: the
    target reports a second copy as a violation."""
    for op in ("WRITE", "READ"):
        for size in SIZES:
            rig.faulted("reset-in-notif", op, size,
                        lambda: rig.proxy.arm(C2S, "reset", NOTIF, HEADER_LEN + 2), "ok", FAST)
    for name, arm in (
        ("reset-in-gen-notif", lambda: rig.proxy.arm(C2S, "reset", NOTIF, HEADER_LEN + 2)),
        # Inside the next frame from the target: the notification's acknowledgement.
        ("reset-in-notif-ack", lambda: rig.proxy.arm(S2C, "reset", None, 12)),
    ):
        rig.proxy.disarm()
        before = rig.proxy.accepted
        fault = arm()
        rig.seq += 1
        notif = f"{name}-{rig.seq}".encode()
        rig.tgt.request("expect", payload=S.b64(notif), data=None)
        t0 = time.monotonic()
        rig.ini.send_notif(rig.tgt.name, notif)
        rig.expect_notif(notif, name)
        took = time.monotonic() - t0
        assert fault.fired.wait(HANG), f"{name}: the fault never fired"
        # The link comes back by itself for the unacknowledged notification.
        deadline = time.monotonic() + HANG
        while rig.proxy.accepted == before:
            assert time.monotonic() < deadline, f"{name}: the link never reconnected"
            time.sleep(0.01)  # polling interval
        # A notification behind the one sent again (same stream, in order):
        # once it is in, a second copy would have come before it.
        fence = f"{name}-fence".encode()
        rig.tgt.request("expect", payload=S.b64(fence), data=None)
        while True:
            try:
                rig.ini.send_notif(rig.tgt.name, fence)
                break
            except Exception as e:  # noqa: BLE001 - checked here
                assert S.is_nixl_error(e), f"{name}: {type(e).__name__}: {e!r}"
                assert time.monotonic() < deadline, f"{name}: the link stayed down: {e}"
                time.sleep(0.01)  # the link's backoff
        rig.expect_notif(fence, f"{name} fence")
        rig.ok_notifs += [notif, fence]
        say(f"OUTCOME {rig.case} {name} NOTIF {len(notif)} DELIVERED {took * 1e3:.0f}ms "
            f"({fault.describe()})")


CASES = {
    "pass": (case_pass, 5000),
    "delay": (case_delay, 5000),
    "slow_reader": (case_slow_reader, 1000),
    "stall_short": (case_stall_short, 2000),
    "stall_long": (case_stall_long, 1500),
    "stall_late": (case_stall_late, 1500),
    "reset": (case_reset, 10000),
    "truncate": (case_truncate, 10000),
    "half_close": (case_half_close, 10000),
    "notif_cut": (case_notif_cut, 10000),
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == TARGET_CMD:
        sc_fault_target()
        return
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        sys.exit(f"usage: {sys.argv[0]} <case>; cases: {', '.join(CASES)}")
    case = sys.argv[1]
    fn, timeout_ms = CASES[case]
    t0 = time.monotonic()
    log(f"fault case {case}, backend {S.BACKEND!r}")
    rig = Rig(case, timeout_ms)
    try:
        fn(rig)
        rig.finish()
        if rig.proxy.error is not None:
            raise AssertionError(f"the proxy failed: {rig.proxy.error!r}")
    finally:
        rig.close()
    log(f"case {case}: {len(rig.outcomes)} faulted transfer(s) in {time.monotonic() - t0:.1f}s")
    say(f"SCENARIO {case} OK")


if __name__ == "__main__":
    main()
