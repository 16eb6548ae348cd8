"""A loopback TCP proxy with programmable faults, for the plugin's TCP transport.

It sits between an initiator and a target engine: the initiator loads the
target's metadata with the published TCP endpoint rewritten to the proxy's port
(see ``rewrite_metadata``), so every stream of the link goes through here.  The
proxy understands the plugin's frame format just enough to find frame
boundaries (24-byte header ``"MC" | version | kind | body_len u32 | tag | aux``,
then ``body_len`` bytes; see src/wire/frame.rs), so a fault can be aimed at a
point inside a frame: "after the header and the segment table of the next Write
frame, plus 1000 bytes".

Directions: ``C2S`` (initiator to target: Hello, Write, ReadReq, Notif) and
``S2C`` (target to initiator: HelloOk, WriteAck, ReadResp, NotifRefused).

Shaping (persistent, per direction, applies to every connection):
    ``shape(direction, delay=s)``  wait this long before forwarding each chunk
    ``shape(direction, rate=B/s)`` forward at most this many bytes per second
One-shot faults, armed per direction and claimed by the first connection whose
stream reaches the trigger point (``arm(...)`` returns a ``Fault`` that records
where and when it fired):
    ``stall``       stop forwarding for ``seconds`` (reading goes on, up to a
                    cap: the bytes are held, as by a store-and-forward hop),
                    then forward what was held
    ``reset``       abortive close (SO_LINGER 0: RST) of both sockets
    ``truncate``    clean close: FIN to both sides, the rest is dropped
    ``half_close``  FIN towards the receiver of this direction only; the
                    rest of this direction is dropped, the other one flows
``half_close_now(direction)`` half-closes every open connection at once
(between frames, e.g. on an idle link).

Everything runs on one thread (a poll loop over non-blocking sockets), so a
fault never races a blocked recv, and an RST really goes out when it is asked
for.  The loop only sleeps in poll() with a timeout; every wait is bounded.
"""

from __future__ import annotations

import fcntl
import itertools
import queue
import select
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

HEADER_LEN = 24
SEG_LEN = 20
KINDS = {1: "Hello", 2: "HelloOk", 3: "Write", 4: "WriteAck", 5: "ReadReq", 6: "ReadResp",
         7: "Notif", 8: "NotifRefused"}
WRITE, WRITE_ACK, READ_REQ, READ_RESP, NOTIF = 3, 4, 5, 6, 7
C2S, S2C = "c2s", "s2c"

CHUNK = 256 << 10          # most bytes moved per recv/send
HIGH_WATER = 1 << 20       # stop reading a direction with this much unsent
STALL_CAP = 64 << 20       # while stalled, keep reading up to this much
BURST = 64 << 10           # rate shaping: the most bytes sent at once
IDLE_WAKE = 0.5           # the loop looks around at least this often
OUTQ_WAIT = 1.0            # before a reset/truncate: wait at most this long for the
                           # receiver to take what was forwarded (socket send queue empty)


# ------------------------------------------------------------------------------------
# Metadata rewriting: point the target's published TCP endpoint at the proxy
# ------------------------------------------------------------------------------------

def _varint(b: bytes, i: int) -> tuple[int, int]:
    v, shift = 0, 0
    while True:
        byte = b[i]
        i += 1
        v |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return v, i
        shift += 7


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _conn_info_endpoints(blob: bytes) -> list[tuple[int, int, int, tuple]]:
    """Parses the plugin's connection info (envelope "MCci" v1, postcard body:
    agent bytes, token u128, host {boot_id, pid_ns u64, hostname}, pid u32,
    endpoints Vec<Endpoint::Tcp(SocketAddr)>, cma_probe Option<u64>) and returns,
    per TCP endpoint, (start, end) of its port varint, the port, and (family, ip)."""
    assert blob[:4] == b"MCci" and blob[4] == 1, f"not a connection info v1: {blob[:8]!r}"
    i = 5
    n, i = _varint(blob, i)
    i += n                                  # agent name
    _, i = _varint(blob, i)                 # token
    n, i = _varint(blob, i)
    i += n                                  # boot_id
    _, i = _varint(blob, i)                 # pid_ns
    n, i = _varint(blob, i)
    i += n                                  # hostname
    _, i = _varint(blob, i)                 # pid
    count, i = _varint(blob, i)
    found = []
    for _ in range(count):
        variant, i = _varint(blob, i)
        assert variant == 0, f"unknown endpoint kind {variant}"
        fam, i = _varint(blob, i)
        iplen = 4 if fam == 0 else 16
        ip = bytes(blob[i:i + iplen])
        i += iplen
        start = i
        port, i = _varint(blob, i)
        found.append((start, i, port, (fam, ip)))
    has_probe, i = _varint(blob, i)
    if has_probe:
        _, i = _varint(blob, i)
    assert i == len(blob), f"connection info: {len(blob) - i} unparsed bytes"
    return found


def target_port(md: bytes, backend: str = "Mooncake") -> int:
    """The TCP port the target's metadata publishes."""
    _, _, blob = _find_conn_info(md, backend)
    eps = _conn_info_endpoints(blob)
    assert len(eps) == 1, eps
    return eps[0][2]


def _find_conn_info(md: bytes, backend: str) -> tuple[int, int, bytes]:
    """Locates our backend's connection blob in NIXL's serialized agent metadata:
    ``...|t<u64 len>Mooncake|c<u64 len><blob>|...`` (nixlSerDes)."""
    tag = b"|t" + struct.pack("<Q", len(backend)) + backend.encode() + b"|c"
    at = md.find(tag)
    assert at >= 0 and md.find(tag, at + 1) < 0, "backend connection info not found once"
    len_at = at + len(tag)
    (n,) = struct.unpack_from("<Q", md, len_at)
    start = len_at + 8
    return len_at, start, md[start:start + n]


def rewrite_metadata(md: bytes, port: int, backend: str = "Mooncake") -> bytes:
    """NIXL agent metadata whose TCP endpoint names `port` (same address)."""
    len_at, start, blob = _find_conn_info(md, backend)
    eps = _conn_info_endpoints(blob)
    assert len(eps) == 1, f"expected one TCP endpoint, found {eps}"
    s, e, _, _ = eps[0]
    new_blob = blob[:s] + _enc_varint(port) + blob[e:]
    assert _conn_info_endpoints(new_blob)[0][2] == port
    return (md[:len_at] + struct.pack("<Q", len(new_blob)) + new_blob
            + md[start + len(blob):])


# ------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------

@dataclass
class Fault:
    """A one-shot fault, armed for a direction; filled in when it fires."""

    direction: str
    action: str                       # stall | reset | truncate | half_close
    kind: Optional[int] = None        # frame kind to aim at (None: any frame but the hello)
    offset: int = 0                   # bytes into that frame (>= 24 when kind is given)
    seconds: float = 0.0              # stall duration
    fired: threading.Event = field(default_factory=threading.Event)
    at: float = 0.0                   # time.monotonic() when it fired
    ended: threading.Event = field(default_factory=threading.Event)  # stall over / closed
    conn: int = -1
    frame_kind: int = 0
    frame_len: int = 0                # the aimed-at frame's total length
    into: int = 0                     # bytes of that frame forwarded before the fault
    note: str = ""

    def describe(self) -> str:
        kind = KINDS.get(self.frame_kind, self.frame_kind)
        size = f" of {self.frame_len} bytes" if self.frame_len else ""
        where = (f"{self.into} bytes into a {kind} frame{size}" if self.frame_kind
                 else "between frames")
        extra = f" for {self.seconds:.2f}s" if self.action == "stall" else ""
        return f"{self.action}{extra} {self.direction} on connection {self.conn}, {where}"


class _Tracker:
    """Follows frame boundaries in one direction of one connection."""

    def __init__(self):
        self.pos = 0            # bytes scanned so far
        self.hdr = bytearray()
        self.remaining = 0      # body bytes left in the current frame
        self.in_body = False
        self.frames = 0         # frames started
        self.frame_start = 0
        self.kind = 0
        self.frame_len = 0
        self.broken = False
        self.fire_at: Optional[int] = None

    def scan(self, data, claim) -> Optional[int]:
        """Scans `data`; returns the index at which a trigger point lies (what
        precedes it may be forwarded, then the fault fires), or None.
        `claim(tracker, at_start)` is asked at each frame start (at_start=True)
        and after each header (False), never for a connection's first frame
        (the hello); it returns the absolute position at which to fire, or None."""
        i, n = 0, len(data)
        while True:
            if self.fire_at is not None and self.pos >= self.fire_at:
                self.fire_at = None
                return i
            if i >= n or self.broken:
                return None
            limit = n if self.fire_at is None else min(n, i + (self.fire_at - self.pos))
            if not self.in_body:
                if not self.hdr:
                    self.frame_start, self.kind, self.frame_len = self.pos, 0, 0
                    self.frames += 1
                    if self.frames > 1 and self.fire_at is None:
                        self.fire_at = claim(self, True)
                        if self.fire_at is not None:
                            continue
                take = min(HEADER_LEN - len(self.hdr), limit - i)
                self.hdr += data[i:i + take]
                i += take
                self.pos += take
                if len(self.hdr) == HEADER_LEN:
                    if self.hdr[:2] != b"MC":
                        self.broken = True  # not our protocol: stop following
                        continue
                    self.kind = self.hdr[3]
                    (body,) = struct.unpack_from("<I", self.hdr, 4)
                    self.frame_len = HEADER_LEN + body
                    self.remaining = body
                    self.hdr = bytearray()
                    self.in_body = body > 0
                    if self.frames > 1 and self.fire_at is None:
                        self.fire_at = claim(self, False)
            else:
                take = min(self.remaining, limit - i)
                i += take
                self.pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.in_body = False


class _Half:
    """One direction of a proxied connection: src -> (inbuf -> scan -> outbuf) -> dst."""

    def __init__(self, conn: "_Conn", direction: str, src: socket.socket, dst: socket.socket):
        self.conn, self.direction, self.src, self.dst = conn, direction, src, dst
        self.inbuf = bytearray()    # read, not yet scanned
        self.outbuf = bytearray()   # scanned, ready to send
        self.eof_in = False         # src sent FIN
        self.shut_out = False       # FIN sent to dst
        self.dropping = False       # half-closed by a fault: discard what src sends
        self.pace_until = 0.0       # shaping: nothing is sent before
        self.stall_until = 0.0      # a stall fault: nothing is sent before
        self.stall: Optional[Fault] = None
        self.claimed: Optional[Fault] = None  # aimed at a point of this stream
        self.reached = False        # ... and that point is reached: fire when drained
        self.reached_at = 0.0
        self.tracker = _Tracker()
        self.rate_t0 = 0.0
        self.tokens = 0.0
        self.forwarded = 0

    def buffered(self) -> int:
        return len(self.inbuf) + len(self.outbuf)

    def held(self, now: float) -> bool:
        return self.pace_until > now or self.stall_until > now


class _Conn:
    def __init__(self, cid: int, client: socket.socket, server: socket.socket):
        self.id = cid
        self.client, self.server = client, server
        self.halves = {C2S: _Half(self, C2S, client, server), S2C: _Half(self, S2C, server, client)}
        self.closed = False
        self.closing_clean = False  # truncated: both FINs sent, draining to EOF


class FaultProxy:
    """Listens on 127.0.0.1:<ephemeral>, forwards every connection to `target`."""

    def __init__(self, target: tuple[str, int], name: str = "proxy", log=None):
        self.target = target
        self.log = log or (lambda *a: None)
        self.name = name
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.conns: dict[int, _Conn] = {}
        self._ids = itertools.count()
        self._armed: dict[str, Optional[Fault]] = {C2S: None, S2C: None}
        self._shape: dict[str, dict] = {C2S: {}, S2C: {}}
        self._cmds: "queue.Queue" = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = False
        self.events: list[str] = []
        self.accepted = 0
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- control (any thread)

    def _call(self, fn, timeout: float = 10.0):
        """Runs fn() on the loop thread and returns its result."""
        if self.error is not None:
            raise RuntimeError(f"{self.name}: the proxy loop failed") from self.error
        box: dict = {}
        done = threading.Event()
        self._cmds.put((fn, box, done))
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError(f"{self.name}: the proxy loop did not answer within {timeout}s "
                               f"(loop error: {self.error!r})")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def shape(self, direction: str, delay: float = 0.0, rate: float = 0.0) -> None:
        """Persistent shaping of `direction` on every connection: `delay` seconds
        before each forwarded chunk, at most `rate` bytes/s (0: off)."""
        def apply():
            self._shape[direction] = {"delay": delay, "rate": rate}
            now = time.monotonic()
            for c in self.conns.values():
                h = c.halves[direction]
                h.rate_t0, h.tokens = now, 0.0
        self._call(apply)

    def arm(self, direction: str, action: str, kind: Optional[int] = None, offset: int = 0,
            seconds: float = 0.0) -> Fault:
        """A one-shot fault at `offset` bytes into the next frame of `kind` (None:
        any frame but a connection's hello) that any connection sends in
        `direction` from now on."""
        assert direction in (C2S, S2C), direction
        assert action in ("stall", "reset", "truncate", "half_close"), action
        assert kind is None or offset >= HEADER_LEN, "a kind is known only after its header"
        f = Fault(direction, action, kind, offset, seconds)

        def apply():
            self._armed[direction] = f
        self._call(apply)
        return f

    def disarm(self, end_stalls: bool = False) -> None:
        """Forgets faults not fired yet and all shaping; with `end_stalls`, also
        ends stalls in progress (what they held is forwarded)."""
        def apply():
            self._armed = {C2S: None, S2C: None}
            self._shape = {C2S: {}, S2C: {}}
            for c in self.conns.values():
                for h in c.halves.values():
                    h.pace_until = 0.0
                    if end_stalls:
                        h.stall_until = 0.0
                    if not h.reached:
                        h.claimed = None
                        h.tracker.fire_at = None
        self._call(apply)

    def half_close_now(self, direction: str) -> int:
        """FIN towards the receiver of `direction` on every open connection now;
        returns how many."""
        def apply():
            n = 0
            for c in list(self.conns.values()):
                h = c.halves[direction]
                if not c.closed and not h.shut_out:
                    self._half_close(h, "half_close_now")
                    n += 1
            return n
        return self._call(apply)

    def open_connections(self) -> int:
        return self._call(lambda: sum(1 for c in self.conns.values() if not c.closed))

    def wait_closed(self, timeout: float) -> bool:
        """Waits until no connection is open; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.open_connections() == 0:
                return True
            time.sleep(0.01)  # polling interval
        return False

    def reset_all(self) -> None:
        """Abortively closes every connection."""
        def apply():
            for c in list(self.conns.values()):
                self._abort(c, "reset_all")
        self._call(apply)

    def close(self) -> None:
        if self._stop:
            return
        try:
            self.reset_all()
        except (TimeoutError, RuntimeError):
            pass
        self._stop = True
        self._wake()
        self._thread.join(timeout=10)
        for s in (self.listener, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- loop thread

    def _event(self, text: str) -> None:
        line = f"[{self.name} {time.monotonic():.3f}] {text}"
        self.events.append(line)
        self.log(line)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._step()
        except BaseException as e:  # noqa: BLE001 - surfaced to the callers
            self.error = e
            self._event(f"proxy loop failed: {type(e).__name__}: {e}")
        finally:
            for c in list(self.conns.values()):
                self._abort(c, "proxy stopped")
            while True:  # nobody waits forever for a command
                try:
                    _, box, done = self._cmds.get_nowait()
                except queue.Empty:
                    break
                box["error"] = RuntimeError(f"{self.name}: the proxy stopped")
                done.set()

    def _step(self) -> None:
        now = time.monotonic()
        poll = select.poll()
        poll.register(self._wake_r, select.POLLIN)
        poll.register(self.listener, select.POLLIN)
        timeout = IDLE_WAKE
        fds: dict[int, list] = {}
        for c in self.conns.values():
            if c.closed:
                continue
            for h in c.halves.values():
                cap = STALL_CAP if h.stall_until > now and not h.reached else HIGH_WATER
                want_read = not h.eof_in and (h.dropping or c.closing_clean or h.buffered() < cap)
                want_write = bool(h.outbuf) and not h.shut_out
                if want_write and h.held(now):
                    timeout = min(timeout, max(h.pace_until, h.stall_until) - now)
                    want_write = False
                if h.reached:
                    timeout = min(timeout, 0.002)  # waiting for the send queue to drain
                elif h.inbuf:
                    timeout = 0.0  # bytes to scan (after a fault fired)
                if h.stall is not None:
                    timeout = min(timeout, h.stall_until - now)
                if want_read:
                    fds.setdefault(h.src.fileno(), [h.src, 0, c])[1] |= select.POLLIN
                if want_write:
                    fds.setdefault(h.dst.fileno(), [h.dst, 0, c])[1] |= select.POLLOUT
        for fd, (_, ev, _) in fds.items():
            poll.register(fd, ev)
        ready = poll.poll(max(0.0, timeout) * 1000)
        for fd, ev in ready:
            if fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            elif fd == self.listener.fileno():
                self._accept()
            else:
                sock, _, c = fds[fd]
                if c.closed:
                    continue
                if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    for h in c.halves.values():
                        if h.src is sock and not h.eof_in and not c.closed:
                            self._read(h)
                if ev & (select.POLLOUT | select.POLLERR):
                    for h in c.halves.values():
                        if h.dst is sock and not c.closed:
                            self._send(h)
        while True:
            try:
                fn, box, done = self._cmds.get_nowait()
            except queue.Empty:
                break
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e
            done.set()
        now = time.monotonic()
        for c in list(self.conns.values()):
            for h in c.halves.values():
                if not c.closed:
                    self._advance(h, now)
            self._maybe_finish(c, now)
        for cid in [cid for cid, c in self.conns.items() if c.closed]:
            del self.conns[cid]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError as e:
                self._event(f"cannot reach the target {self.target}: {e}; resetting the client")
                self._rst(client)
                continue
            for s in (client, server):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cid = next(self._ids)
            self.accepted += 1
            c = _Conn(cid, client, server)
            now = time.monotonic()
            for h in c.halves.values():
                h.rate_t0 = now
            self.conns[cid] = c
            self._event(f"connection {cid} opened")

    def _read(self, h: _Half) -> None:
        c = h.conn
        try:
            data = h.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            # The sender is gone. What it had sent before is still delivered
            # (bytes in flight reach the receiver); nothing goes back to it.
            h.eof_in = True
            self._lost(self._other(h), f"{h.direction} read failed: {e}")
            return
        if not data:
            h.eof_in = True
            if not (c.closing_clean or h.dropping):
                who = "initiator" if h.direction == C2S else "target"
                self._event(f"connection {c.id}: EOF from the {who}")
            return
        if h.dropping or c.closing_clean:
            return  # what a half-closed or truncated direction still receives is dropped
        h.inbuf += data

    def _claimer(self, h: _Half):
        def claim(tr: _Tracker, at_start: bool):
            f = self._armed[h.direction]
            if f is None or h.claimed is not None:
                return None
            if f.kind is None:
                if not at_start:
                    return None
            elif at_start or tr.kind != f.kind:
                return None
            self._armed[h.direction] = None
            f.conn, f.frame_kind, f.frame_len = h.conn.id, tr.kind, tr.frame_len
            h.claimed = f
            return tr.frame_start + f.offset
        return claim

    def _advance(self, h: _Half, now: float) -> None:
        """Scans read bytes into the send buffer up to a trigger point, sends
        what may go, fires a fault whose point was reached once everything
        before it went out, and passes an EOF on once everything went out."""
        c = h.conn
        if h.inbuf and not h.reached:
            cut = h.tracker.scan(memoryview(h.inbuf), self._claimer(h))
            take = len(h.inbuf) if cut is None else cut
            if take:
                h.outbuf += h.inbuf[:take]
                del h.inbuf[:take]
            if cut is not None:
                h.reached, h.reached_at = True, now
        if h.outbuf and not h.held(now):
            self._send(h)
            if c.closed:
                return
        if h.reached and not h.outbuf:
            f = h.claimed
            drained = f.action == "stall" or _outq(h.dst) == 0
            if drained or now - h.reached_at >= OUTQ_WAIT:
                h.reached, h.claimed = False, None
                self._fire(h, f, now)
                if c.closed:
                    return
        if h.stall is not None and h.stall_until <= now:
            f, h.stall = h.stall, None
            f.note += f"; over at {now:.3f}, forwarding {h.buffered()} held bytes"
            f.ended.set()
            self._event(f"stall over on connection {c.id} {h.direction}: forwarding "
                        f"{h.buffered()} held bytes")
        if h.eof_in and not h.buffered() and not h.shut_out and not c.closing_clean:
            self._shutdown_wr(h)

    def _fire(self, h: _Half, f: Fault, now: float) -> None:
        c = h.conn
        f.at = now
        tr = h.tracker
        if not f.frame_kind and len(tr.hdr) > 3:  # aimed inside a header: what it says so far
            f.frame_kind = tr.hdr[3]
            if len(tr.hdr) >= 8:
                f.frame_len = HEADER_LEN + struct.unpack_from("<I", tr.hdr, 4)[0]
        f.into = tr.pos - tr.frame_start if f.frame_kind else 0
        f.fired.set()
        self._event(f"FAULT {f.describe()}")
        if f.action == "stall":
            h.stall_until = now + f.seconds
            h.stall = f
            f.note = f"stalled until {h.stall_until:.3f}"
        elif f.action == "reset":
            self._abort(c, "reset fault")
            f.ended.set()
        elif f.action == "truncate":
            c.closing_clean = True
            for half in c.halves.values():
                half.inbuf.clear()
                half.outbuf.clear()
                self._shutdown_wr(half)
            f.ended.set()
        elif f.action == "half_close":
            self._half_close(h, "half_close fault")
            f.ended.set()

    @staticmethod
    def _other(h: _Half) -> _Half:
        return h.conn.halves[S2C if h.direction == C2S else C2S]

    def _lost(self, h: _Half, why: str) -> None:
        """h's receiver is gone: drop what h holds and will read."""
        if h.dropping:
            return
        h.inbuf.clear()
        h.outbuf.clear()
        h.dropping = h.shut_out = True
        self._event(f"connection {h.conn.id}: {h.direction} receiver gone ({why}); "
                    "dropping that direction")

    def _half_close(self, h: _Half, why: str) -> None:
        h.inbuf.clear()
        h.outbuf.clear()
        h.dropping = True
        self._shutdown_wr(h)
        self._event(f"connection {h.conn.id}: {h.direction} half-closed ({why})")

    def _send(self, h: _Half) -> None:
        c = h.conn
        now = time.monotonic()
        if h.shut_out or c.closing_clean or not h.outbuf or h.held(now):
            return
        sh = self._shape[h.direction]
        n = min(len(h.outbuf), CHUNK)
        rate = sh.get("rate", 0.0)
        if rate:
            # A token bucket of at most 64 KiB: no burst after an idle spell.
            h.tokens = min(float(BURST), h.tokens + rate * (now - h.rate_t0))
            h.rate_t0 = now
            if h.tokens < 1024:
                h.pace_until = now + (1024 - h.tokens) / rate
                return
            n = min(n, int(h.tokens))
        try:
            sent = h.dst.send(memoryview(h.outbuf)[:n])
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(h, f"{h.direction} send failed: {e}")
            self._other(h).eof_in = True
            return
        del h.outbuf[:sent]
        h.forwarded += sent
        if rate:
            h.tokens -= sent
        if sh.get("delay"):
            h.pace_until = now + sh["delay"]

    def _shutdown_wr(self, h: _Half) -> None:
        if h.shut_out:
            return
        h.shut_out = True
        try:
            h.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _maybe_finish(self, c: _Conn, now: float) -> None:
        if c.closed:
            return
        hs = c.halves.values()
        if c.closing_clean:
            if all(h.eof_in for h in hs):
                self._close(c, "truncated; both sides closed")
            return
        if all(h.eof_in and not h.buffered() and h.shut_out for h in hs):
            self._close(c, "closed by both sides")
        elif all(h.dropping for h in hs):
            self._abort(c, "both receivers gone")

    def _ended(self, c: _Conn, how: str) -> None:
        for h in c.halves.values():
            if h.stall is not None:
                h.stall.note += f"; connection {how} at {time.monotonic():.3f} during the stall"
                h.stall.ended.set()
                h.stall = None
            if h.claimed is not None:
                h.claimed.note = f"never fired: connection {how} first"
                h.claimed = None

    def _close(self, c: _Conn, why: str) -> None:
        c.closed = True
        for s in (c.client, c.server):
            try:
                s.close()
            except OSError:
                pass
        self._event(f"connection {c.id} closed ({why}; forwarded c2s "
                    f"{c.halves[C2S].forwarded} B, s2c {c.halves[S2C].forwarded} B)")
        self._ended(c, "closed")

    def _abort(self, c: _Conn, why: str) -> None:
        if c.closed:
            return
        c.closed = True
        for s in (c.client, c.server):
            self._rst(s)
        self._event(f"connection {c.id} reset ({why}; forwarded c2s "
                    f"{c.halves[C2S].forwarded} B, s2c {c.halves[S2C].forwarded} B)")
        self._ended(c, "reset")

    @staticmethod
    def _rst(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass


def _outq(s: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the receiver."""
    try:
        buf = fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]
    except OSError:
        return 0
