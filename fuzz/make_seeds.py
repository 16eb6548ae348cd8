#!/usr/bin/env python3
"""Writes the hand-made seeds of each fuzz target into corpus/<target>/seed-*.

The seeds are valid encodings (postcard bodies in our envelopes, TCP frames
as src/wire/frame.rs lays them out), so the fuzzer starts past the magic
numbers. In tcp_server inputs, KEY!KEY! and ADDR!ADR stand for the fuzz
region's key and address (the target substitutes them).
"""
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string(b: bytes) -> bytes:
    return varint(len(b)) + b


def region(owner, key, addr, length, mem_type=0, dev_id=0) -> bytes:
    body = b"".join(varint(v) for v in (owner, key, addr, length, mem_type, dev_id))
    return b"MCrg\x01" + body


def conn_info(agent: bytes, ports, probe) -> bytes:
    body = string(agent) + varint(0xDEADBEEF_0123456789) + string(b"boot-id") + varint(4026531836)
    body += string(b"host") + varint(4242) + varint(len(ports))
    for p in ports:
        body += varint(0) + varint(0) + bytes([127, 0, 0, 1]) + varint(p)  # Tcp(V4(ip, port))
    body += b"\x00" if probe is None else b"\x01" + varint(probe)
    return b"MCci\x01" + body


def header(kind: int, body_len: int, tag: int, aux: int) -> bytes:
    return b"MC\x02" + bytes([kind]) + struct.pack("<IQQ", body_len, tag, aux)


def seg(key: bytes, addr: bytes, length: int, offset: int = 0) -> bytes:
    return key + addr + struct.pack("<I", length)


KEY, ADDR = b"KEY!KEY!", b"ADDR!ADR"


def write(tag, segs_and_data):
    table = b"".join(seg(KEY, ADDR, len(d)) for d in segs_and_data)
    data = b"".join(segs_and_data)
    return header(3, len(table) + len(data), tag, len(segs_and_data)) + table + data


def read_req(tag, lengths):
    table = b"".join(seg(KEY, ADDR, n) for n in lengths)
    return header(5, len(table), tag, len(lengths)) + table


def notif(msg: bytes):
    return header(7, len(msg), 0, 0) + msg


def hello(token: int, name: bytes):
    body = token.to_bytes(16, "little") + (7).to_bytes(16, "little") + struct.pack("<H", len(name)) + name
    return header(1, len(body), 0, 0) + body


SEEDS = {
    "wire_region": [
        region(1, 2, 0x1000, 4096),
        region(2**128 - 1, 2**64 - 1, 2**63, 2**63 - 1, 1, 3),
    ],
    "wire_conn_info": [
        conn_info(b"agent-A", [4567], 0x7FFF0000),
        conn_info(b"", [], None),
        conn_info(b"x" * 300, [1, 65535], None),
    ],
    "wire_frame": [
        header(3, 40, 9, 1) + seg(b"\0" * 8, b"\0" * 8, 20),
        b"\x02\x00\x00" + seg(b"k" * 8, b"a" * 8, 7) + seg(b"k" * 8, b"a" * 8, 9),
        (1).to_bytes(16, "little") + (2).to_bytes(16, "little") + struct.pack("<H", 3) + b"abc",
    ],
    "tcp_server": [
        b"\x00" + write(1, [b"0123456789abcdef"]),
        b"\x00" + read_req(2, [64, 4096]),
        b"\x00" + notif(b"hello") + write(3, [b"x" * 100, b"y" * 28]) + read_req(4, [16]),
        b"\x00" + notif(b"n" * 1000),
        b"\x01" + hello(0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321, b"fuzz") + read_req(5, [8]),
        b"\x01" + hello(1, b"wrong-token"),
    ],
}

for target, seeds in SEEDS.items():
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds):
        (d / f"seed-{i}").write_bytes(s)
    print(f"{target}: {len(seeds)} seeds")
