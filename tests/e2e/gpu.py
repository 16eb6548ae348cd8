#!/usr/bin/env python3
"""GPU memory (VRAM) through the real NIXL 1.5.1 Python API, on a CUDA driver.

Every case runs in its own process (test_gpu.py starts them).  The driver is
the one the plugin loads: $NIXL_MOONCAKE_CUDA_LIB (the fake of
tests/fakes/cuda, built by scripts/build-fakes.sh), else libcuda.so.1 (a real
GPU).  This script allocates device memory through the same library with
ctypes, registers it with NIXL as "VRAM" and moves it with backend
"Mooncake".  On the fake, device memory faults on any CPU access; the script
fills and checks it through the fake's test-only shadow mapping (on a real
driver, with cuMemcpyHtoD/DtoH).

    python tests/e2e/gpu.py <case> [options]

Each case ends with the line ``SCENARIO <case> OK``; any failure raises.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import threading
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The target process of the cross-process cases talks to its parent over its
# stdout: keep that for the channel and send every other output to stderr,
# before NIXL (or anything) can write to it.
_CHANNEL_OUT = None
if len(sys.argv) > 1 and sys.argv[1] == "_xp_gpu_target":
    sys.stdout.flush()
    _CHANNEL_OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

import numpy as np  # noqa: E402

import scenarios as S  # noqa: E402
from scenarios import KiB, MiB, log  # noqa: E402

CASE = sys.argv[1] if len(sys.argv) > 1 else "?"


class Gpu:
    """Device memory through the CUDA driver API (the one the plugin loads)."""

    def __init__(self) -> None:
        path = os.environ.get("NIXL_MOONCAKE_CUDA_LIB") or "libcuda.so.1"
        self.lib = ctypes.CDLL(path)
        self.fake = hasattr(self.lib, "fake_cuda_shadow")
        self.lib.fake_cuda_shadow.restype = ctypes.c_void_p if self.fake else None
        self._ok(self.lib.cuInit(0), "cuInit")
        n = ctypes.c_int()
        self._ok(self.lib.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
        self.devices = n.value
        self.ctx = {}
        self.vmm = {}  # base -> (size, chunk) of our VMM allocations
        log(f"CUDA driver {path}: {self.devices} device(s){' (fake)' if self.fake else ''}")

    @staticmethod
    def _ok(rc: int, what: str) -> None:
        assert rc == 0, f"{what} failed with CUDA error {rc}"

    def enter(self, dev: int) -> None:
        """Make device `dev`'s primary context current on this thread."""
        if dev not in self.ctx:
            d, c = ctypes.c_int(), ctypes.c_void_p()
            self._ok(self.lib.cuDeviceGet(ctypes.byref(d), dev), "cuDeviceGet")
            self._ok(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(c), d), "cuDevicePrimaryCtxRetain")
            self.ctx[dev] = c
        self._ok(self.lib.cuCtxSetCurrent(self.ctx[dev]), "cuCtxSetCurrent")

    def alloc(self, dev: int, nbytes: int) -> int:
        self.enter(dev)
        p = ctypes.c_uint64()
        self._ok(self.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(nbytes)), "cuMemAlloc_v2")
        return p.value

    def alloc_vmm(self, dev: int, nbytes: int, shareable: bool, chunk: int = 2 * MiB) -> int:
        """`nbytes` (rounded up to chunks) of VMM memory of device `dev`: chunks
        of `chunk` bytes made by cuMemCreate (with the POSIX file descriptor
        handle type when `shareable`), mapped side by side in one reservation."""

        class Prop(ctypes.Structure):  # CUmemAllocationProp
            _fields_ = [("type", ctypes.c_int), ("handle_types", ctypes.c_int),
                        ("loc_type", ctypes.c_int), ("loc_id", ctypes.c_int),
                        ("win32", ctypes.c_void_p), ("flags", ctypes.c_uint8 * 8)]

        class Access(ctypes.Structure):  # CUmemAccessDesc
            _fields_ = [("loc_type", ctypes.c_int), ("loc_id", ctypes.c_int),
                        ("flags", ctypes.c_int)]

        self.enter(dev)
        n = (nbytes + chunk - 1) // chunk * chunk
        ptr = ctypes.c_uint64()
        self._ok(self.lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(n),
                                              ctypes.c_size_t(0), ctypes.c_uint64(0),
                                              ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        prop = Prop(1, 1 if shareable else 0, 1, dev, None)
        for i in range(n // chunk):
            h = ctypes.c_uint64()
            self._ok(self.lib.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(chunk),
                                          ctypes.byref(prop), ctypes.c_ulonglong(0)), "cuMemCreate")
            self._ok(self.lib.cuMemMap(ctypes.c_uint64(ptr.value + i * chunk),
                                       ctypes.c_size_t(chunk), ctypes.c_size_t(0), h,
                                       ctypes.c_ulonglong(0)), "cuMemMap")
            self._ok(self.lib.cuMemRelease(h), "cuMemRelease")  # the mapping holds it
        access = Access(1, dev, 3)  # device `dev`, read and write
        self._ok(self.lib.cuMemSetAccess(ctypes.c_uint64(ptr.value), ctypes.c_size_t(n),
                                         ctypes.byref(access), ctypes.c_size_t(1)),
                 "cuMemSetAccess")
        self.vmm[ptr.value] = (n, chunk)
        return ptr.value

    def _spans(self, ptr: int, nbytes: int):
        """(address, offset, length) pieces of [ptr, ptr+nbytes) that do not
        cross a VMM chunk (the fake's CPU view is per chunk)."""
        chunk = next((c for base, (size, c) in self.vmm.items() if base <= ptr < base + size),
                     None)
        off = 0
        while off < nbytes:
            n = nbytes - off if chunk is None else min(nbytes - off, chunk - (ptr + off) % chunk)
            yield ptr + off, off, n
            off += n

    def free(self, ptr: int) -> None:
        self._ok(self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree_v2")

    def write(self, ptr: int, data: np.ndarray) -> None:
        if self.fake:
            for p, off, n in self._spans(ptr, data.nbytes):
                view = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(
                    self.lib.fake_cuda_shadow(ctypes.c_uint64(p))))
                view[:] = data[off:off + n]
        else:
            self._ok(self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(ptr), ctypes.c_void_p(S.addr(data)),
                                              ctypes.c_size_t(data.nbytes)), "cuMemcpyHtoD_v2")

    def read(self, ptr: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, dtype=np.uint8)
        if self.fake:
            for p, off, n in self._spans(ptr, nbytes):
                view = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(
                    self.lib.fake_cuda_shadow(ctypes.c_uint64(p))))
                out[off:off + n] = view
        else:
            self._ok(self.lib.cuMemcpyDtoH_v2(ctypes.c_void_p(S.addr(out)), ctypes.c_uint64(ptr),
                                              ctypes.c_size_t(nbytes)), "cuMemcpyDtoH_v2")
        return out

    def ipc_imports(self) -> Optional[int]:
        """Live CUDA IPC mappings in this process (fake only; None on a real driver)."""
        return int(self.lib.fake_cuda_live_ipc_imports()) if self.fake else None

    def vmm_imports(self) -> Optional[int]:
        """Live mappings of imported VMM chunks in this process (fake only)."""
        return int(self.lib.fake_cuda_live_vmm_imports()) if self.fake else None

    def set_copy_delay_us(self, us: int) -> None:
        """Make each asynchronous copy take `us` longer (fake only)."""
        if self.fake:
            self.lib.fake_cuda_set_copy_delay_us(ctypes.c_uint(us))


def vram_descs(agent, ptr: int, nbytes: int, dev: int):
    return agent.get_xfer_descs([(ptr, nbytes, dev)], "VRAM")


def register_vram(agent, ptr: int, nbytes: int, dev: int):
    return agent.register_memory([(ptr, nbytes, dev, "")], "VRAM")


def two_agents(prog: bool = True):
    a = S.new_agent("gpu-initiator", prog_thread=prog)
    b = S.new_agent("gpu-target", prog_thread=prog)
    a.add_remote_agent(b.get_agent_metadata())
    return a, b


def checked(what: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.nbytes == want.nbytes and np.array_equal(got, want), (
        f"{what}: data mismatch (sha {S.sha256(got)[:12]} != {S.sha256(want)[:12]})")
    log(f"{what}: {got.nbytes} bytes verified")


# --------------------------------------------------------------------------------------


def case_inproc(args) -> None:
    """VRAM<->VRAM and VRAM<->DRAM both ways in one process, with notifications."""
    gpu = Gpu()
    size = args.size_mib * MiB
    devs = (0, 1 % gpu.devices)
    a, b = two_agents(args.prog_thread == "on")
    notifs = S.Notifs(b)
    pump = None if args.prog_thread == "on" else notifs.poll
    src = S.fast_pattern(size, 1)
    a_gpu, b_gpu = gpu.alloc(devs[0], size), gpu.alloc(devs[1], size)
    gpu.write(a_gpu, src)
    gpu.write(b_gpu, np.zeros(size, dtype=np.uint8))
    a_host, b_host = S.fast_pattern(size, 2), S.filled(size)
    regs = [register_vram(a, a_gpu, size, devs[0]), S.register(a, a_host),
            register_vram(b, b_gpu, size, devs[1]), S.register(b, b_host)]
    a.add_remote_agent(b.get_agent_metadata())  # after b's registrations

    cases = [
        ("WRITE VRAM->VRAM", "WRITE", vram_descs(a, a_gpu, size, devs[0]),
         vram_descs(b, b_gpu, size, devs[1]), lambda: gpu.read(b_gpu, size), src),
        ("READ VRAM<-VRAM into DRAM", "READ", S.xfer_descs(a, a_host),
         vram_descs(b, b_gpu, size, devs[1]), lambda: a_host.copy(), src),
        # a_host holds src since the READ before.
        ("WRITE DRAM->VRAM", "WRITE", S.xfer_descs(a, a_host),
         vram_descs(b, b_gpu, size, devs[1]), lambda: gpu.read(b_gpu, size), src),
        ("WRITE VRAM->DRAM", "WRITE", vram_descs(a, a_gpu, size, devs[0]), S.xfer_descs(b, b_host),
         lambda: b_host.copy(), src),
    ]
    for i, (what, op, local, remote, result, want) in enumerate(cases):
        tag = f"gpu-{i}".encode()
        h = a.initialize_xfer(op, local, remote, "gpu-target", tag)
        dt = S.post(a, h, what, pump=pump)
        log(what, S.rate(size, dt))
        notifs.expect("gpu-initiator", [tag], f"{what} notification")
        checked(what, result(), want)
        a.release_xfer_handle(h)
    # A READ of fresh remote bytes into VRAM.
    fresh = S.fast_pattern(size, 3)
    b_host[:] = fresh
    h = a.initialize_xfer("READ", vram_descs(a, a_gpu, size, devs[0]), S.xfer_descs(b, b_host),
                          "gpu-target", b"gpu-r")
    S.post(a, h, "READ DRAM into VRAM", pump=pump)
    notifs.expect("gpu-initiator", [b"gpu-r"], "READ notification")
    checked("READ DRAM into VRAM", gpu.read(a_gpu, size), fresh)
    a.release_xfer_handle(h)
    for r, ag in zip(regs, (a, a, b, b)):
        ag.deregister_memory(r)
    gpu.free(a_gpu)
    gpu.free(b_gpu)


def case_prepped(args) -> None:
    """vLLM's shape: prepped lists over VRAM caches, a READ of N scattered blocks
    with one notification, reposted."""
    gpu = Gpu()
    nsel, block = args.blocks, args.block_kib * KiB
    total = nsel + nsel // 5
    devs = (0, 1 % gpu.devices)
    a = S.new_agent("decode")
    b = S.new_agent("prefill")
    size = total * block
    remote_data = S.fast_pattern(size, 20)
    theirs, ours = gpu.alloc(devs[1], size), gpu.alloc(devs[0], size)
    gpu.write(theirs, remote_data)
    gpu.write(ours, np.zeros(size, dtype=np.uint8))
    register_vram(a, ours, size, devs[0])
    register_vram(b, theirs, size, devs[1])
    a.add_remote_agent(b.get_agent_metadata())
    notifs = S.Notifs(b)
    lt = S.desc_table(ours + np.arange(total, dtype=np.uint64) * np.uint64(block), block)
    lt[:, 2] = devs[0]
    rt = S.desc_table(theirs + np.arange(total, dtype=np.uint64) * np.uint64(block), block)
    rt[:, 2] = devs[1]
    local_h = a.prep_xfer_dlist("NIXL_INIT_AGENT", lt, "VRAM")
    remote_h = a.prep_xfer_dlist("prefill", rt, "VRAM")
    rng = np.random.default_rng(5)
    ridx = rng.permutation(total)[:nsel].astype(np.int32)
    lidx = rng.permutation(total)[:nsel].astype(np.int32)
    for rnd in range(args.rounds):
        notif = f"req-{rnd}:tp1".encode()
        h = a.make_prepped_xfer("READ", local_h, lidx, remote_h, ridx, notif)
        dt = S.post(a, h, f"prepped READ of {nsel} VRAM blocks")
        log(f"round {rnd}: prepped READ of {nsel} x {args.block_kib} KiB VRAM blocks:",
            S.rate(nsel * block, dt))
        notifs.expect("decode", [notif], "prepped READ notification")
        a.release_xfer_handle(h)
    got = gpu.read(ours, size).reshape(total, block)
    want = remote_data.reshape(total, block)
    assert np.array_equal(got[lidx], want[ridx]), "prepped READ: blocks differ"
    untouched = np.setdiff1d(np.arange(total), lidx)
    assert not got[untouched].any(), "prepped READ wrote outside the selected blocks"
    log(f"{nsel} blocks verified, {len(untouched)} untouched blocks still zero")
    a.release_dlist_handle(local_h)
    a.release_dlist_handle(remote_h)


def case_threads(args) -> None:
    """Four threads post VRAM transfers through one agent at once."""
    gpu = Gpu()
    a, b = two_agents()
    notifs = S.Notifs(b)
    size, nthreads, rounds = 4 * MiB + 3, 4, args.rounds
    bufs = []
    for t in range(nthreads):
        src, dst = gpu.alloc(0, size), gpu.alloc(1 % gpu.devices, size)
        gpu.write(src, S.fast_pattern(size, 40 + t))
        register_vram(a, src, size, 0)
        register_vram(b, dst, size, 1 % gpu.devices)
        bufs.append((src, dst))
    a.add_remote_agent(b.get_agent_metadata())
    errors = []

    def worker(t: int) -> None:
        try:
            src, dst = bufs[t]
            for r in range(rounds):
                h = a.initialize_xfer("WRITE", vram_descs(a, src, size, 0),
                                      vram_descs(b, dst, size, 1 % gpu.devices), "gpu-target",
                                      f"t{t}-{r}".encode())
                S.post(a, h, f"thread {t} round {r}")
                a.release_xfer_handle(h)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    got = notifs.wait_count("gpu-initiator", nthreads * rounds, "all threads' notifications")
    assert sorted(got) == sorted(f"t{t}-{r}".encode() for t in range(nthreads) for r in range(rounds))
    for t, (src, dst) in enumerate(bufs):
        checked(f"thread {t}", gpu.read(dst, size), S.fast_pattern(size, 40 + t))


def case_release(args) -> None:
    """Release in flight and deregistration while device copies run: after the
    call returns, no byte of the transfer lands."""
    gpu = Gpu()
    a, b = two_agents()
    size = 64 * MiB
    src, dst = gpu.alloc(0, size), gpu.alloc(1 % gpu.devices, size)
    gpu.write(src, S.fast_pattern(size, 7))
    zeros = np.zeros(size, dtype=np.uint8)
    a_reg = register_vram(a, src, size, 0)
    register_vram(b, dst, size, 1 % gpu.devices)
    a.add_remote_agent(b.get_agent_metadata())
    notifs = S.Notifs(b)
    gpu.set_copy_delay_us(2000)  # 64 descriptors x 2 ms: still in flight when released
    blk = MiB
    # The remote blocks in reverse order: no two descriptors continue each
    # other (they would join into one segment), so 64 device copies.
    local = a.get_xfer_descs([(src + i * blk, blk, 0) for i in range(64)], "VRAM")
    remote = b.get_xfer_descs([(dst + (63 - i) * blk, blk, 1 % gpu.devices) for i in range(64)],
                              "VRAM")
    for how in ("release", "deregister"):
        gpu.write(dst, zeros)
        h = a.initialize_xfer("WRITE", local, remote, "gpu-target", b"never")
        state = a.transfer(h, b"never")
        log(f"{how}: transfer() -> {state}")
        if how == "release":
            try:
                a.release_xfer_handle(h)
            except Exception as e:  # a NIXL error is fine; the promise is what counts
                assert S.is_nixl_error(e), e
        else:
            a.deregister_memory(a_reg)
        after = gpu.read(dst, size)
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:  # a window in which a late copy would land
            time.sleep(0.01)
        assert np.array_equal(gpu.read(dst, size), after), f"{how}: bytes landed after it returned"
        landed = int(np.count_nonzero(after.reshape(64, blk).any(axis=1)))
        log(f"{how}: {landed} of 64 blocks had landed before the call returned; none after")
        if landed == 64:
            # The transfer completed before the release took effect: then,
            # and only then, its notification was delivered.
            notifs.wait_for("gpu-initiator", b"never", "the completed transfer's notification")
            notifs.got.clear()
        if how == "deregister":
            try:
                st = a.check_xfer_state(h)
            except Exception as e:
                assert S.is_nixl_error(e), e
                st = type(e).__name__
            log(f"after deregistration the transfer is {st}")
            try:
                a.release_xfer_handle(h)
            except Exception as e:
                assert S.is_nixl_error(e), e
            a_reg = register_vram(a, src, size, 0)
        notifs.expect_quiet(0.2, f"no notification of a transfer stopped by {how}")
    gpu.set_copy_delay_us(0)
    h = a.initialize_xfer("WRITE", local, remote, "gpu-target", b"after")
    S.post(a, h, "a transfer after the releases")
    notifs.expect("gpu-initiator", [b"after"], "the next transfer")
    checked("the next transfer", gpu.read(dst, size),
            S.fast_pattern(size, 7).reshape(64, blk)[::-1].reshape(-1))


def case_bad(args) -> None:
    """Registration mismatches fail with a NIXL error; the next valid one works."""
    gpu = Gpu()
    a, b = two_agents()
    size = MiB
    buf = gpu.alloc(1 % gpu.devices, size)
    host = S.filled(size)
    bad = [
        ("another devId", [(buf, size, (1 % gpu.devices) ^ 1 if gpu.devices > 1 else 5, "")]),
        ("past the allocation's end", [(buf + 4096, size, 1 % gpu.devices, "")]),
        ("host memory as VRAM", [(S.addr(host), size, 0, "")]),
        ("a device that does not exist", [(buf, size, 99, "")]),
    ]
    for what, descs in bad:
        try:
            a.register_memory(descs, "VRAM")
        except Exception as e:
            assert S.is_nixl_error(e), f"{what}: {e!r}"
            log(f"register {what}: refused ({type(e).__name__})")
        else:
            raise AssertionError(f"register {what}: accepted")
    reg = register_vram(a, buf + 4096, 8192, 1 % gpu.devices)
    log("register at an offset inside the allocation: ok")
    a.deregister_memory(reg)


def case_nodriver(args) -> None:
    """No CUDA driver: the plugin loads, VRAM registration fails, DRAM works."""
    assert os.environ.get("NIXL_MOONCAKE_CUDA_LIB", "").startswith("/nonexistent"), \
        "run with NIXL_MOONCAKE_CUDA_LIB=/nonexistent/libcuda.so.1"
    a, b = two_agents()
    mems = a.get_backend_mem_types(S.BACKEND)
    log("memory types:", mems)
    assert "VRAM_SEG" in mems and "DRAM_SEG" in mems, mems
    fake_ptr = 0x7F0000000000
    try:
        a.register_memory([(fake_ptr, 4096, 0, "")], "VRAM")
    except Exception as e:
        assert S.is_nixl_error(e), repr(e)
        log(f"VRAM registration without a driver: refused ({type(e).__name__})")
    else:
        raise AssertionError("VRAM registered without a driver")
    src, dst = S.fast_pattern(MiB, 1), S.filled(MiB)
    S.register(a, src)
    S.register(b, dst)
    a.add_remote_agent(b.get_agent_metadata())
    h = a.initialize_xfer("WRITE", S.xfer_descs(a, src), S.xfer_descs(b, dst), "gpu-target")
    S.post(a, h, "DRAM WRITE without a driver")
    checked("DRAM WRITE without a driver", dst, src)


def xp_target(args) -> None:
    """The target of the cross-process cases: VRAM buffers of its own device
    memory, registered with NIXL; answers checks over the channel."""
    chan = S.Channel(sys.stdin, _CHANNEL_OUT)
    gpu = Gpu()
    dev = 1 % gpu.devices
    t = S.new_agent_with("gpu-target", args.protocol)
    size = args.size
    if args.vmm == "none":
        bufs = {name: gpu.alloc(dev, size) for name in ("wbuf", "rbuf")}
    else:
        bufs = {name: gpu.alloc_vmm(dev, size, args.vmm == "shared") for name in ("wbuf", "rbuf")}
    gpu.write(bufs["wbuf"], np.zeros(size, dtype=np.uint8))
    rdata = S.fast_pattern(size, 60)
    gpu.write(bufs["rbuf"], rdata)
    regs = {name: register_vram(t, ptr, size, dev) for name, ptr in bufs.items()}
    host = S.filled(size)  # DRAM, for the reference figure
    S.register(t, host)
    notifs = S.Notifs(t)
    chan.send(md=S.b64(t.get_agent_metadata()), dev=dev, size=size,
              wbuf=bufs["wbuf"], rbuf=bufs["rbuf"], rbuf_sha=S.sha256(rdata), hbuf=S.addr(host))
    while True:
        msg = chan.recv()
        if msg["cmd"] == "quit":
            break
        if msg["cmd"] == "watch":
            # Snapshot the buffer the moment the notification shows.
            payload = S.unb64(msg["payload"])
            S.wait_until(lambda: (notifs.poll(), payload in notifs.got[msg["sender"]])[1],
                         f"notification {payload!r}")
            notifs.got.clear()
            chan.send(ok=True, sha=S.sha256(gpu.read(bufs[msg["buf"]], size)))
            continue
        if msg["cmd"] == "delay":
            gpu.set_copy_delay_us(msg["us"])
            chan.send(ok=True)
            continue
        if msg["cmd"] == "dereg":
            t.deregister_memory(regs.pop(msg["buf"]))
            chan.send(ok=True, sha=S.sha256(gpu.read(bufs[msg["buf"]], size)))
            continue
        try:
            notifs.expect(msg["sender"], [S.unb64(x) for x in msg["notifs"]], msg["what"])
            if msg.get("buf") == "hbuf":
                assert S.sha256(host) == msg["sha"], f"{msg['what']}: the target's DRAM differs"
            elif msg.get("buf"):
                got = S.sha256(gpu.read(bufs[msg["buf"]], size))
                assert got == msg["sha"], f"{msg['what']}: the target's VRAM differs"
            if msg.get("reset"):
                gpu.write(bufs[msg["reset"]], np.zeros(size, dtype=np.uint8))
            chan.send(ok=True)
        except Exception as e:  # noqa: BLE001 - reported to the initiator
            chan.send(ok=False, error=f"{type(e).__name__}: {e}")


def spawn_target(protocol: str, size: int, env: Optional[dict] = None, vmm: str = "none"):
    cmd = [sys.executable, os.path.abspath(__file__), "_xp_gpu_target",
           "--protocol", protocol, "--size", str(size), "--vmm", vmm]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
    return child, S.Channel(child.stdout, child.stdin)


def case_xp(args) -> None:
    """Two processes: this one initiates, a child process is the target; its
    VRAM is reached over TCP with staging (protocol=tcp, and auto on this
    host, where cross-memory attach cannot serve device memory), by CUDA IPC
    (auto), or by the NICs directly (protocol=rdma: GPUDirect RDMA, the
    memory registered as dmabufs)."""
    gpu = Gpu()
    size = args.size_mib * MiB
    # With --no-ipc the target publishes no IPC handle.
    child, chan = spawn_target(args.protocol, size,
                               {"NIXL_MOONCAKE_CUDA_IPC": "0"} if args.no_ipc else None,
                               args.vmm)
    try:
        hello = chan.recv()
        a = S.new_agent_with("gpu-initiator", args.protocol)
        a.add_remote_agent(S.unb64(hello["md"]))
        tdev = hello["dev"]

        def check(what: str, notifs: list[bytes], buf: str = "", sha: str = "", reset: str = ""):
            chan.send(cmd="check", what=what, sender="gpu-initiator",
                      notifs=[S.b64(n) for n in notifs], buf=buf, sha=sha, reset=reset)
            reply = chan.recv()
            assert reply["ok"], f"target reports: {reply.get('error')}"
            log(f"{what}: checked by the target")

        def remote(name: str, off: int = 0, n: int = size):
            return a.get_xfer_descs([(hello[name] + off, n, tdev)], "VRAM")

        src_data = S.fast_pattern(size, 61)
        src, dst = gpu.alloc(0, size), gpu.alloc(0, size)
        gpu.write(src, src_data)
        gpu.write(dst, np.zeros(size, dtype=np.uint8))
        register_vram(a, src, size, 0)
        register_vram(a, dst, size, 0)
        host_src, host_dst = S.fast_pattern(size, 62), S.filled(size)
        S.register(a, host_src, host_dst)

        # The reference: DRAM to DRAM over the same path (protocol=auto on one
        # host: cross-memory attach).
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, host_src),
                              a.get_xfer_descs([(hello["hbuf"], size, 0)], "DRAM"),
                              "gpu-target", b"xp-ref")
        log("WRITE DRAM -> remote DRAM (reference):",
            S.rate(size, S.post(a, h, "WRITE DRAM->DRAM")))
        check("WRITE DRAM->DRAM", [b"xp-ref"], "hbuf", S.sha256(host_src))
        a.release_xfer_handle(h)

        # Every device copy takes 2 ms, here (CUDA IPC, the initiator's
        # staging) and on the target (its staging), and the target snapshots
        # its memory the moment the notification shows: one sent before the
        # last copy finished is caught.
        chan.send(cmd="delay", us=2000)
        assert chan.recv()["ok"]
        gpu.set_copy_delay_us(2000)
        chan.send(cmd="watch", sender="gpu-initiator", payload=S.b64(b"xp-w"), buf="wbuf")
        h = a.initialize_xfer("WRITE", vram_descs(a, src, size, 0), remote("wbuf"),
                              "gpu-target", b"xp-w")
        log("WRITE VRAM -> remote VRAM:", S.rate(size, S.post(a, h, "WRITE VRAM->VRAM")))
        assert chan.recv()["sha"] == S.sha256(src_data), \
            "WRITE VRAM->VRAM: the notification arrived before the data"
        log("WRITE VRAM->VRAM: the data was in place when the notification arrived")
        a.release_xfer_handle(h)
        gpu.set_copy_delay_us(0)
        chan.send(cmd="delay", us=0)
        assert chan.recv()["ok"]
        chan.send(cmd="check", what="reset", sender="gpu-initiator", notifs=[], buf="", sha="",
                  reset="wbuf")
        assert chan.recv()["ok"]

        h = a.initialize_xfer("WRITE", S.xfer_descs(a, host_src), remote("wbuf"),
                              "gpu-target", b"xp-hw")
        log("WRITE DRAM -> remote VRAM:", S.rate(size, S.post(a, h, "WRITE DRAM->VRAM")))
        check("WRITE DRAM->VRAM", [b"xp-hw"], "wbuf", S.sha256(host_src))
        a.release_xfer_handle(h)

        h = a.initialize_xfer("READ", vram_descs(a, dst, size, 0), remote("rbuf"),
                              "gpu-target", b"xp-r")
        log("READ remote VRAM -> VRAM:", S.rate(size, S.post(a, h, "READ VRAM<-VRAM")))
        assert S.sha256(gpu.read(dst, size)) == hello["rbuf_sha"], "READ VRAM<-VRAM: data differs"
        check("READ VRAM<-VRAM", [b"xp-r"])
        a.release_xfer_handle(h)

        h = a.initialize_xfer("READ", S.xfer_descs(a, host_dst), remote("rbuf"),
                              "gpu-target", b"xp-hr")
        log("READ remote VRAM -> DRAM:", S.rate(size, S.post(a, h, "READ DRAM<-VRAM")))
        assert S.sha256(host_dst) == hello["rbuf_sha"], "READ DRAM<-VRAM: data differs"
        check("READ DRAM<-VRAM", [b"xp-hr"])
        a.release_xfer_handle(h)

        # vLLM's shape: prepped lists, a READ of scattered 4 KiB blocks with one
        # notification, reposted.
        block = 4 * KiB
        total = size // block
        nsel = min(args.blocks, total)
        lt = S.desc_table(dst + np.arange(total, dtype=np.uint64) * np.uint64(block), block)
        rt = S.desc_table(hello["rbuf"] + np.arange(total, dtype=np.uint64) * np.uint64(block),
                          block)
        rt[:, 2] = tdev
        local_h = a.prep_xfer_dlist("NIXL_INIT_AGENT", lt, "VRAM")
        remote_h = a.prep_xfer_dlist("gpu-target", rt, "VRAM")
        rng = np.random.default_rng(9)
        lidx = rng.permutation(total)[:nsel].astype(np.int32)
        ridx = rng.permutation(total)[:nsel].astype(np.int32)
        want = S.fast_pattern(size, 60).reshape(total, block)
        for rnd in range(2):
            gpu.write(dst, np.zeros(size, dtype=np.uint8))
            notif = f"xp-req-{rnd}".encode()
            h = a.make_prepped_xfer("READ", local_h, lidx, remote_h, ridx, notif)
            log(f"prepped READ of {nsel} VRAM blocks:",
                S.rate(nsel * block, S.post(a, h, "prepped READ")))
            got = gpu.read(dst, size).reshape(total, block)
            assert np.array_equal(got[lidx], want[ridx]), "prepped READ: blocks differ"
            check(f"prepped READ round {rnd}", [notif])
            a.release_xfer_handle(h)
        a.release_dlist_handle(local_h)
        a.release_dlist_handle(remote_h)
        # The target deregisters a region (and keeps the memory): no later
        # WRITE or READ of ours may touch it, on any path.
        chan.send(cmd="dereg", buf="wbuf")
        before = chan.recv()["sha"]
        for op, local in (("WRITE", src), ("READ", dst)):
            h = a.initialize_xfer(op, vram_descs(a, local, size, 0), remote("wbuf"),
                                  "gpu-target", b"never")
            try:
                state = a.transfer(h)
                while state == "PROC":
                    state = a.check_xfer_state(h)
            except Exception as e:
                assert S.is_nixl_error(e), repr(e)
                state = type(e).__name__
            assert state != "DONE", f"{op} of a deregistered region reported DONE"
            log(f"{op} of a region the target deregistered: {state}")
            try:
                a.release_xfer_handle(h)
            except Exception as e:
                assert S.is_nixl_error(e), repr(e)
        check("after the deregistration", [], "wbuf", before)
        imports, vmm_imports = gpu.ipc_imports(), gpu.vmm_imports()
        log(f"mappings of the target's memory in this process: CUDA IPC {imports}, "
            f"VMM chunks {vmm_imports}")
        if imports is not None:
            # auto on one host maps the target's GPU memory (CUDA IPC: legacy
            # handles for cuMemAlloc memory, file descriptors for shareable
            # VMM chunks); tcp never does (staging), nor auto without handles.
            mapped = args.protocol == "auto" and not args.no_ipc and args.vmm != "private"
            assert (imports > 0) == (mapped and args.vmm == "none"), imports
            assert (vmm_imports > 0) == (mapped and args.vmm == "shared"), vmm_imports
        chan.send(cmd="quit")
        rc = child.wait(timeout=S.OP_TIMEOUT)
        assert rc == 0, f"target process exited with {rc}"
    finally:
        if child.poll() is None:
            child.kill()  # only our own child, on failure
            child.wait(timeout=S.OP_TIMEOUT)


def ended(a, h, what: str, bound: float = 30.0) -> str:
    """Polls `h` until it is no longer in progress (at most `bound` seconds):
    its final state, or the name of the NIXL error that ended it."""
    t0 = time.monotonic()
    while True:
        try:
            st = a.check_xfer_state(h)
            if st != "PROC":
                return st
        except Exception as e:  # the expected end of a failing transfer
            assert S.is_nixl_error(e), repr(e)
            return type(e).__name__
        assert time.monotonic() - t0 < bound, f"{what} neither failed nor finished within {bound} s"
        time.sleep(1e-3)


def case_xp_fault(args) -> None:
    """A device error in the middle of a WRITE of our VRAM over TCP (the fake
    fails the 6th device copy with an illegal address, a sticky fault as on a
    GPU): the transfer fails (never DONE, never a hang), its notification is
    not delivered, and the link stays in step: a DRAM WRITE right after it on
    the same connections arrives whole."""
    gpu = Gpu()
    assert gpu.fake, "the fault is injected into the fake driver"
    size = 8 * MiB
    child, chan = spawn_target("tcp", size)
    try:
        hello = chan.recv()
        a = S.new_agent_with("gpu-initiator", "tcp")
        a.add_remote_agent(S.unb64(hello["md"]))
        src = gpu.alloc(0, size)
        gpu.write(src, S.fast_pattern(size, 63))
        register_vram(a, src, size, 0)
        host_src = S.fast_pattern(size, 64)
        S.register(a, host_src)
        # 1 MiB frames, each copied out of the device in 256 KiB pieces.
        gpu.lib.fake_cuda_fail_after_copies(ctypes.c_long(5), 0)
        h = a.initialize_xfer("WRITE", vram_descs(a, src, size, 0),
                              a.get_xfer_descs([(hello["wbuf"], size, hello["dev"])], "VRAM"),
                              "gpu-target", b"never")
        outcome = a.transfer(h)
        if outcome == "PROC":
            outcome = ended(a, h, "the WRITE with a device error")
        log(f"a device error in the middle of a VRAM WRITE: the WRITE ended as {outcome}")
        assert outcome != "DONE", "a WRITE whose device copies failed reported DONE"
        try:
            a.release_xfer_handle(h)
        except Exception as e:
            assert S.is_nixl_error(e), repr(e)
        h = a.initialize_xfer("WRITE", S.xfer_descs(a, host_src),
                              a.get_xfer_descs([(hello["hbuf"], size, 0)], "DRAM"),
                              "gpu-target", b"after")
        S.post(a, h, "WRITE DRAM->DRAM after the device error")
        chan.send(cmd="check", what="the DRAM WRITE after the device error",
                  sender="gpu-initiator", notifs=[S.b64(b"after")], buf="hbuf",
                  sha=S.sha256(host_src), reset="")
        reply = chan.recv()
        assert reply["ok"], f"target reports: {reply.get('error')}"
        log("the link stayed in step: 8 MiB DRAM WRITE verified, only its notification delivered")
        a.release_xfer_handle(h)
        chan.send(cmd="quit")
        assert child.wait(timeout=S.OP_TIMEOUT) == 0
    finally:
        if child.poll() is None:
            child.kill()  # only our own child, on failure
            child.wait(timeout=S.OP_TIMEOUT)


def case_xp_kill(args) -> None:
    """SIGKILL of the target while a VRAM READ from it is in flight: the
    request fails (never DONE, never a hang), then a new target works."""
    gpu = Gpu()
    size = 64 * MiB
    # Device copies take 20 ms each, on the target (staging, tcp) and here
    # (CUDA IPC, auto): the READ is in flight for a second or more when the
    # target dies.
    child, chan = spawn_target(args.protocol, size, {"FAKE_CUDA_COPY_DELAY_US": "20000"})
    gpu.set_copy_delay_us(20000)
    try:
        hello = chan.recv()
        a = S.new_agent_with("gpu-initiator", args.protocol)
        a.add_remote_agent(S.unb64(hello["md"]))
        dst = gpu.alloc(0, size)
        gpu.write(dst, np.zeros(size, dtype=np.uint8))
        register_vram(a, dst, size, 0)
        # 64 descriptors of 1 MiB: 64 device copies.
        h = a.initialize_xfer(
            "READ", a.get_xfer_descs([(dst + k * MiB, MiB, 0) for k in range(64)], "VRAM"),
            a.get_xfer_descs([(hello["rbuf"] + k * MiB, MiB, hello["dev"]) for k in range(64)],
                             "VRAM"),
            "gpu-target", b"never")
        state = a.transfer(h)
        assert state == "PROC", f"the READ finished before the kill ({state})"
        t0 = time.monotonic()
        child.kill()
        child.wait(timeout=S.OP_TIMEOUT)
        outcome = ended(a, h, "the READ")
        gpu.set_copy_delay_us(0)
        log(f"after SIGKILL of the target the READ ended as {outcome} in "
            f"{(time.monotonic() - t0) * 1e3:.0f} ms")
        assert outcome != "DONE", "a READ from a killed target reported DONE"
        try:
            a.release_xfer_handle(h)
        except Exception as e:
            assert S.is_nixl_error(e), repr(e)
        a.remove_remote_agent("gpu-target")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=S.OP_TIMEOUT)
    # A new target (same name) works.
    child, chan = spawn_target(args.protocol, size)
    try:
        hello = chan.recv()
        a.add_remote_agent(S.unb64(hello["md"]))
        h = a.initialize_xfer("READ", vram_descs(a, dst, size, 0),
                              a.get_xfer_descs([(hello["rbuf"], size, hello["dev"])], "VRAM"),
                              "gpu-target", b"again")
        S.post(a, h, "READ from the new target")
        assert S.sha256(gpu.read(dst, size)) == hello["rbuf_sha"], "READ from the new target differs"
        chan.send(cmd="check", what="the new target's notification", sender="gpu-initiator",
                  notifs=[S.b64(b"again")], buf="", sha="", reset="")
        assert chan.recv()["ok"]
        log("a new target works: 64 MiB READ verified")
        chan.send(cmd="quit")
        assert child.wait(timeout=S.OP_TIMEOUT) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=S.OP_TIMEOUT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="case", required=True)
    s = sub.add_parser("inproc")
    s.add_argument("--size-mib", type=int, default=64)
    s.add_argument("--prog-thread", choices=["on", "off"], default="on")
    s.set_defaults(fn=case_inproc)
    s = sub.add_parser("prepped")
    s.add_argument("--blocks", type=int, default=20000)
    s.add_argument("--block-kib", type=int, default=4)
    s.add_argument("--rounds", type=int, default=3)
    s.set_defaults(fn=case_prepped)
    s = sub.add_parser("threads")
    s.add_argument("--rounds", type=int, default=10)
    s.set_defaults(fn=case_threads)
    sub.add_parser("release").set_defaults(fn=case_release)
    sub.add_parser("bad").set_defaults(fn=case_bad)
    sub.add_parser("nodriver").set_defaults(fn=case_nodriver)
    s = sub.add_parser("xp")
    s.add_argument("--protocol", choices=["auto", "tcp", "rdma"], default="tcp")
    s.add_argument("--size-mib", type=int, default=32)
    s.add_argument("--blocks", type=int, default=20000)
    s.add_argument("--no-ipc", action="store_true",
                   help="the target publishes no CUDA IPC handle (NIXL_MOONCAKE_CUDA_IPC=0)")
    s.add_argument("--vmm", choices=["none", "shared", "private"], default="none",
                   help="the target's memory: cuMemAlloc, or VMM chunks of 2 MiB made with "
                        "(shared) or without (private) the POSIX file descriptor handle type")
    s.set_defaults(fn=case_xp)
    sub.add_parser("xp_fault").set_defaults(fn=case_xp_fault)
    s = sub.add_parser("xp_kill")
    s.add_argument("--protocol", choices=["auto", "tcp"], default="tcp")
    s.set_defaults(fn=case_xp_kill)
    s = sub.add_parser("_xp_gpu_target")
    s.add_argument("--protocol", default="tcp")
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--vmm", choices=["none", "shared", "private"], default="none")
    s.set_defaults(fn=xp_target)
    args = p.parse_args()
    args.fn(args)
    print(f"SCENARIO {args.case} OK", flush=True)


if __name__ == "__main__":
    main()
