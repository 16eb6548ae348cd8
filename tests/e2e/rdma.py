#!/usr/bin/env python3
"""RDMA through the real NIXL 1.5.1 Python API, on a verbs library.

Every case runs in its own process (test_rdma.py starts them), with
backend "Mooncake" created with protocol=rdma.  The verbs library is the one
the plugin loads: $NIXL_MOONCAKE_IBVERBS_LIB (the fake NIC of
tests/fakes/ibverbs, built by scripts/build-fakes.sh: two RoCE devices per
process, data moved between processes by its soft-NIC threads), else
libibverbs.so.1 (a real NIC).  The target is a peer process (scenarios.py's
_xp_target).  Cases that need the fake's test controls (byte counters,
corrupted keys, delays) say so and refuse to run on a real library.

    python tests/e2e/rdma.py <case> [options]

Each case ends with the line ``SCENARIO <case> OK``; any failure raises.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as S  # noqa: E402
from scenarios import KiB, MiB, log  # noqa: E402

DEVICES = ("fake_mlx5_0", "fake_mlx5_1")


class FakeNic:
    """The fake verbs library's test controls, in this process (the plugin
    dlopens the same file, so this is the instance it uses)."""

    def __init__(self) -> None:
        path = os.environ.get("NIXL_MOONCAKE_IBVERBS_LIB", "")
        self.lib = ctypes.CDLL(path) if path else None
        if self.lib is None or not hasattr(self.lib, "fake_ibv_bytes"):
            raise SystemExit(f"this case needs the fake verbs library (got {path!r})")
        self.lib.fake_ibv_bytes.restype = ctypes.c_uint64

    @staticmethod
    def maybe() -> "Optional[FakeNic]":
        """The fake's controls, or None on a real verbs library."""
        path = os.environ.get("NIXL_MOONCAKE_IBVERBS_LIB", "")
        if path and hasattr(ctypes.CDLL(path), "fake_ibv_bytes"):
            return FakeNic()
        return None

    def sent(self) -> dict:
        return {d: self.lib.fake_ibv_bytes(d.encode(), 0) for d in DEVICES}

    def live_qps(self) -> int:
        return self.lib.fake_ibv_live_qps()

    def corrupt_rkeys(self, n: int) -> None:
        self.lib.fake_ibv_corrupt_rkeys(n)

    def set_delay_us(self, us: int) -> None:
        self.lib.fake_ibv_set_delay_us(us)


def status_of(agent, handle, post: bool) -> str:
    """DONE, PROC, or the NIXL error class name of a post or a check."""
    try:
        return agent.transfer(handle) if post else agent.check_xfer_state(handle)
    except Exception as e:  # noqa: BLE001 - the bindings raise per status
        assert S.is_nixl_error(e), repr(e)
        return type(e).__name__


def finish(agent, handle, what: str, timeout: float = S.OP_TIMEOUT) -> str:
    """Posts `handle` and waits for its end: DONE or the error's class name."""
    st = status_of(agent, handle, True)
    deadline = time.monotonic() + timeout
    while st == "PROC":
        assert time.monotonic() < deadline, f"{what}: never finished"
        st = status_of(agent, handle, False)
    return st


def target(size: int, name: str = "rdma-target"):
    bufs = [{"name": "w", "size": size}, {"name": "r", "size": size, "seed": 70}]
    return S.target_process(name, "rdma", bufs)


def case_nics(args) -> None:
    """Both fake NICs of each side carry bytes of one transfer (rail-aligned
    pairs), WRITE and READ verified."""
    nic = FakeNic()
    size = 64 * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src, dst = S.fast_pattern(size, 71), S.filled(size)
        S.register(a, src, dst)
        S.add_remote_expecting(a, tgt, "rdma")
        before = nic.sent()
        served_before = tgt.request("fake_nic")["served"]
        hw = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name, b"w")
        S.post(a, hw, "64 MiB WRITE")
        tgt.check("64 MiB WRITE", "rdma-init", [b"w"], (("w", 0, size, S.sha256(src)),))
        hr = a.initialize_xfer("READ", S.xfer_descs(a, dst), tgt.descs(a, "r"), tgt.name, b"r")
        S.post(a, hr, "64 MiB READ")
        assert S.same(dst, S.fast_pattern(size, 70)), "64 MiB READ: data mismatch"
        tgt.check("64 MiB READ", "rdma-init", [b"r"])
        after = nic.sent()
        served = tgt.request("fake_nic")["served"]
        moved = {d: after[d] - before[d] for d in DEVICES}
        took = {d: served[d] - served_before[d] for d in DEVICES}
        log(f"bytes our NICs moved as initiator: {moved}; the target's NICs served: {took}")
        for d in DEVICES:
            assert moved[d] >= size // 4, f"our NIC {d} carried only {moved[d]} bytes"
            assert took[d] >= size // 4, f"the target's NIC {d} served only {took[d]} bytes"
        assert sum(moved.values()) >= 2 * size, moved
        a.release_xfer_handle(hw)
        a.release_xfer_handle(hr)
        tgt.quit()


def case_rkey(args) -> None:
    """A work request with a wrong rkey is refused by the target's NIC: the
    transfer fails with NIXL_ERR_NOT_ALLOWED, no byte lands, and the next
    transfer (on rebuilt queue pairs) works."""
    nic = FakeNic()
    size = 4 * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src = S.fast_pattern(size, 72)
        S.register(a, src)
        a.add_remote_agent(tgt.md)
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name)
        nic.corrupt_rkeys(1)
        st = finish(a, h, "WRITE with a corrupted rkey")
        log(f"WRITE with a corrupted rkey: {st}")
        assert st == "nixlNotAllowedError", st
        # Slices on other queue pairs may have landed; the corrupted one did
        # not, so the region is not what we wrote.
        tgt.check("nothing more after the refusal", "rdma-init", [])
        st = finish(a, h, "the same WRITE again")
        assert st == "DONE", st
        tgt.check("WRITE after the refusal", "rdma-init", [], (("w", 0, size, S.sha256(src)),))
        log("the next WRITE, on new queue pairs, landed whole")
        a.release_xfer_handle(h)
        tgt.quit()


def case_release(args) -> None:
    """releaseReqH of a WRITE in flight returns within a bound, and no byte
    of it lands afterwards (on a real NIC: give a size that takes a while)."""
    nic = FakeNic.maybe()
    size = args.size_mib * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src = S.fast_pattern(size, 73)
        S.register(a, src)
        a.add_remote_agent(tgt.md)
        if nic:
            # 1 ms per work request on our NIC: the 1024 slices of 64 KiB
            # over 4 queue pairs take about 256 ms.
            nic.set_delay_us(1000)
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name, b"x")
        assert status_of(a, h, True) == "PROC"
        time.sleep(0.05 if nic else 0.001)  # let part of it land: the release stops the rest
        t0 = time.monotonic()
        a.release_xfer_handle(h)
        took = time.monotonic() - t0
        if nic:
            nic.set_delay_us(0)
        log(f"release of a WRITE in flight returned in {took * 1e3:.0f} ms")
        assert took < 5.0, took
        # The target's memory does not change any more (its NIC's counter
        # too, on the fake).
        snap = tgt.request("digest", buf="w")["sha"]
        served = nic and tgt.request("fake_nic")["served"]
        time.sleep(0.3)
        assert tgt.request("digest", buf="w")["sha"] == snap, "bytes landed after the release"
        if nic:
            assert tgt.request("fake_nic")["served"] == served, "the NIC served bytes after it"
        tgt.request("quiet", seconds=0.3, what="no notification of the released WRITE")
        log("RELEASE-BOUND %.1f ms" % (took * 1e3))
        tgt.quit()


def case_kill(args) -> None:
    """SIGKILL of the target during a READ: the READ fails within a second,
    then a new target process works (on a real NIC: give a size that takes
    a while)."""
    nic = FakeNic.maybe()
    size = args.size_mib * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        dst = S.filled(size)
        S.register(a, dst)
        a.add_remote_agent(tgt.md)
        if nic:
            nic.set_delay_us(2000)
        h = a.initialize_xfer("READ", S.xfer_descs(a, dst), tgt.descs(a, "r"), tgt.name, b"k")
        assert status_of(a, h, True) == "PROC"
        time.sleep(0.05 if nic else 0.001)
        t0 = tgt.kill()
        st = "PROC"
        while st == "PROC":
            assert time.monotonic() - t0 < 30, "the READ neither failed nor finished in 30 s"
            st = status_of(a, h, False)
        ms = (time.monotonic() - t0) * 1e3
        if nic:
            nic.set_delay_us(0)
        log(f"READ from a killed target ended as {st} {ms:.0f} ms after the kill")
        assert st != "DONE", st
        print(f"KILL-TO-FAILURE READ {ms:.1f} ms", flush=True)
        a.release_xfer_handle(h)
        a.remove_remote_agent(tgt.name)
    with target(size) as tgt:
        a.add_remote_agent(tgt.md)
        h = a.initialize_xfer("READ", S.xfer_descs(a, dst), tgt.descs(a, "r"), tgt.name, b"n")
        S.post(a, h, "READ from the new target")
        assert S.same(dst, S.fast_pattern(size, 70)), "READ from the new target differs"
        tgt.check("the new target's notification", "rdma-init", [b"n"])
        log("a new target process works: 64 MiB READ verified")
        a.release_xfer_handle(h)
        tgt.quit()


def case_restarts(args) -> None:
    """The target restarts (a new engine under the same name) N times; each
    time we load its new metadata, WRITE with a notification, and check that
    queue pairs do not pile up on either side (counted by the fake NIC)."""
    nic = FakeNic()
    size = 64 * KiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src = S.fast_pattern(size, 74)
        S.register(a, src)
        md = tgt.md
        ours, theirs = [], []
        t0 = time.monotonic()
        for i in range(args.rounds):
            a.add_remote_agent(md)
            h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name,
                                  b"r%d" % i)
            S.post(a, h, f"WRITE to restart {i}")
            tgt.check(f"restart {i}", "rdma-init", [b"r%d" % i], (("w", 0, size, S.sha256(src)),))
            if i == 0:
                busy = (nic.live_qps(), tgt.request("fake_nic")["qps"])
                log(f"while connected: live queue pairs here {busy[0]}, on the target {busy[1]}")
                assert busy[0] > 0 and busy[1] > 0, busy
            a.release_xfer_handle(h)
            a.remove_remote_agent(tgt.name)
            md = S.unb64(tgt.request("restart")["md"])
            if i % max(1, args.rounds // 10) == 0 or i == args.rounds - 1:
                ours.append(nic.live_qps())
                theirs.append(tgt.request("fake_nic")["qps"])
                log(f"restart {i}: live queue pairs here {ours[-1]}, on the target {theirs[-1]}")
        log(f"{args.rounds} restarts in {time.monotonic() - t0:.1f} s")
        # Bounded: what one connection holds (2 NIC pairs x 2 queue pairs),
        # plus the ones of the last rounds still draining.
        assert max(ours) <= 8 and max(theirs) <= 8, (ours, theirs)
        print(f"RESTARTS {args.rounds} max live QPs here {max(ours)} on the target {max(theirs)}",
              flush=True)
        tgt.quit()


def case_failover(args) -> None:
    """The link of one of our two NICs fails in the middle of a WRITE: the
    work of its queue pairs moves to the other NIC pair; the WRITE ends DONE
    with every byte and one notification, and the next transfers work."""
    nic = FakeNic()
    size = 64 * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src, dst = S.fast_pattern(size, 78), S.filled(size)
        S.register(a, src, dst)
        a.add_remote_agent(tgt.md)
        nic.set_delay_us(1000)  # 1 ms per work request: about 256 ms in all
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name, b"f")
        assert status_of(a, h, True) == "PROC"
        time.sleep(0.05)
        nic.lib.fake_ibv_drop_link(b"fake_mlx5_1", 1)
        t0 = time.monotonic()
        st = "PROC"
        while st == "PROC":
            assert time.monotonic() - t0 < 30, "the WRITE never ended"
            st = status_of(a, h, False)
        nic.set_delay_us(0)
        log(f"WRITE with a failed link ended {st} {(time.monotonic() - t0) * 1e3:.0f} ms later")
        assert st == "DONE", st
        tgt.check("WRITE over the NIC pair that works", "rdma-init", [b"f"],
                  (("w", 0, size, S.sha256(src)),))
        hr = a.initialize_xfer("READ", S.xfer_descs(a, dst), tgt.descs(a, "r"), tgt.name)
        S.post(a, hr, "READ while the link is down")
        assert S.same(dst, S.fast_pattern(size, 70)), "READ while the link is down differs"
        nic.lib.fake_ibv_drop_link(b"fake_mlx5_1", 0)
        log("the next READ works (connected without the failed NIC pair)")
        tgt.quit()


def case_numa(args) -> None:
    """Our NICs on two NUMA nodes (FAKE_IBV_DEVICES: fake_mlx5_0 on node 1,
    fake_mlx5_1 on node 0, where this machine's memory is): transfers of one
    slice go over the NIC local to their memory; a large one still uses
    both."""
    nic = FakeNic()
    assert "numa=1" in os.environ.get("FAKE_IBV_DEVICES", ""), "run with the NUMA layout"
    size = 64 * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src = S.fast_pattern(size, 79)
        S.register(a, src)
        a.add_remote_agent(tgt.md)
        before = nic.sent()
        for i in range(50):
            off = i * 64 * KiB
            h = a.initialize_xfer("WRITE", a.get_xfer_descs([(S.addr(src) + off, 64 * KiB, 0)],
                                                            "DRAM"),
                                  tgt.descs(a, "w", off, 64 * KiB), tgt.name)
            S.post(a, h, f"small WRITE {i}")
            a.release_xfer_handle(h)
        small = {d: nic.sent()[d] - before[d] for d in DEVICES}
        log(f"50 WRITEs of 64 KiB: bytes per NIC {small}")
        assert small["fake_mlx5_0"] == 0 and small["fake_mlx5_1"] >= 50 * 64 * KiB, small
        before = nic.sent()
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name)
        S.post(a, h, "64 MiB WRITE")
        big = {d: nic.sent()[d] - before[d] for d in DEVICES}
        log(f"a 64 MiB WRITE: bytes per NIC {big}")
        assert all(v >= size // 4 for v in big.values()), big
        tgt.check("WRITEs", "rdma-init", [], (("w", 0, size, S.sha256(src)),))
        tgt.quit()


def case_noverbs(args) -> None:
    """No verbs library: the plugin loads, protocol=rdma refuses peers with
    NIXL_ERR_NOT_SUPPORTED and the reason, and TCP moves data."""
    assert os.environ.get("NIXL_MOONCAKE_IBVERBS_LIB", "").startswith("/nonexistent"), \
        "run with NIXL_MOONCAKE_IBVERBS_LIB=/nonexistent/libibverbs.so.1"
    size = 4 * MiB
    with S.target_process("tcp-target", "tcp", [{"name": "w", "size": size}]) as tgt:
        r = S.new_agent_with("rdma-init", "rdma")
        try:
            r.add_remote_agent(tgt.md)
            src = S.fast_pattern(size, 75)
            S.register(r, src)
            r.initialize_xfer("WRITE", S.xfer_descs(r, src), tgt.descs(r, "w"), tgt.name)
        except Exception as e:  # noqa: BLE001 - checked
            assert S.is_nixl_error(e), repr(e)
            log(f"protocol=rdma without a verbs library: {type(e).__name__}")
            assert "NotSupported" in type(e).__name__ or "NOT_SUPPORTED" in str(e), repr(e)
        else:
            raise AssertionError("protocol=rdma reached a peer without a verbs library")
        a = S.new_agent_with("tcp-init", "tcp")
        src = S.fast_pattern(size, 76)
        S.register(a, src)
        a.add_remote_agent(tgt.md)
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), tgt.descs(a, "w"), tgt.name, b"t")
        S.post(a, h, "WRITE over TCP without a verbs library")
        tgt.check("WRITE over TCP", "tcp-init", [b"t"], (("w", 0, size, S.sha256(src)),))
        maps = open("/proc/self/maps").read()
        assert "libibverbs" not in maps, "a verbs library was loaded"
        log("TCP works, and no verbs library is mapped in this process")
        tgt.quit()


def case_threads(args) -> None:
    """Four threads, each its own handle, posting WRITE+READ rounds at once."""
    size = 16 * MiB
    with target(size) as tgt:
        a = S.new_agent_with("rdma-init", "rdma")
        src, dst = S.fast_pattern(size, 77), S.filled(size)
        S.register(a, src, dst)
        a.add_remote_agent(tgt.md)
        q = size // 4
        errors: list[str] = []

        def worker(t: int) -> None:
            try:
                hw = a.initialize_xfer("WRITE", a.get_xfer_descs([(S.addr(src) + t * q, q, 0)],
                                                                 "DRAM"),
                                       tgt.descs(a, "w", t * q, q), tgt.name, b"t%d" % t)
                hr = a.initialize_xfer("READ", a.get_xfer_descs([(S.addr(dst) + t * q, q, 0)],
                                                                "DRAM"),
                                       tgt.descs(a, "w", t * q, q), tgt.name)
                for _ in range(args.rounds):
                    S.post(a, hw, f"thread {t} WRITE")
                    S.post(a, hr, f"thread {t} READ")
                    assert S.same(dst[t * q:(t + 1) * q], src[t * q:(t + 1) * q]), f"thread {t}"
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(f"thread {t}: {e!r}")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(S.OP_TIMEOUT)
        assert not errors, errors
        tgt.check("four threads", "rdma-init", sorted([b"t%d" % t for t in range(4)] * args.rounds),
                  (("w", 0, size, S.sha256(src)),))
        log(f"4 threads x {args.rounds} rounds of WRITE + READ of 4 MiB verified")
        tgt.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="case", required=True)
    sub.add_parser("nics").set_defaults(fn=case_nics)
    sub.add_parser("rkey").set_defaults(fn=case_rkey)
    for name, fn in (("release", case_release), ("kill", case_kill)):
        s = sub.add_parser(name)
        s.add_argument("--size-mib", type=int, default=64)
        s.set_defaults(fn=fn)
    s = sub.add_parser("restarts")
    s.add_argument("--rounds", type=int, default=1000)
    s.set_defaults(fn=case_restarts)
    sub.add_parser("noverbs").set_defaults(fn=case_noverbs)
    sub.add_parser("failover").set_defaults(fn=case_failover)
    sub.add_parser("numa").set_defaults(fn=case_numa)
    s = sub.add_parser("threads")
    s.add_argument("--rounds", type=int, default=8)
    s.set_defaults(fn=case_threads)
    args = p.parse_args()
    args.fn(args)
    print(f"SCENARIO {args.case} OK", flush=True)


if __name__ == "__main__":
    main()
