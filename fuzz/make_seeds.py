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


def zigzag(n: int) -> bytes:
    return varint((n << 1) ^ (n >> 63) if n < 0 else n << 1)


def qp_address(qpn: int, psn: int, lid: int, gid: bytes, mtu: int, rd_atomic: int = 16) -> bytes:
    return varint(qpn) + varint(psn) + varint(lid) + gid + zigzag(mtu) + bytes([rd_atomic])


GID = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])


def connect_request(generation: int, qps) -> bytes:
    body = varint(generation) + bytes([0, 1]) + varint(len(qps)) + b"".join(qps)
    return b"MCrc\x01" + body


def connect_reply(generation: int, qps) -> bytes:
    return b"MCrr\x01" + varint(generation) + varint(len(qps)) + b"".join(qps)


def notif_part(ident: int, parts: int, chunk: int, chunks: int, data: bytes) -> bytes:
    return struct.pack("<QHHIII", ident, parts, 0, chunk, chunks, len(data)) + data


def region_rdma(owner, key, addr, length, piece_len, nics) -> bytes:
    body = region(owner, key, addr, length)[5:]
    body += varint(piece_len) + varint(len(nics))
    for keys in nics:
        body += varint(len(keys)) + b"".join(varint(k) for k in keys)
    return b"MCrg\x03" + body


def conn_info_rdma(agent: bytes, ports, nics) -> bytes:
    body = conn_info(agent, ports, None)[5:] + varint(len(nics))
    for ib, lid, gid, mtu, numa in nics:
        body += bytes([ib]) + varint(lid) + gid + zigzag(mtu) + zigzag(numa)
    return b"MCci\x02" + body


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
        region_rdma(1, 2, 0x1000, 4096 * 3, 4096, [[7, 8, 9], [17, 18, 19]]),
    ],
    "wire_conn_info": [
        conn_info(b"agent-A", [4567], 0x7FFF0000),
        conn_info(b"", [], None),
        conn_info(b"x" * 300, [1, 65535], None),
        conn_info_rdma(b"agent-R", [4567], [(0, 0, GID, 5, 0), (1, 7, bytes(16), 4, -1)]),
    ],
    "wire_rdma": [
        connect_request(9, [qp_address(0x1001, 0x123456, 0, GID, 5),
                            qp_address(0x1002, 7, 0, GID, 5)]),
        connect_reply(9, [qp_address(0xFFFFFF, 0, 3, GID, 1)]),
        notif_part(5, 2, 0, 1, b"hello"),
        notif_part(5, 2, 0, 0, b""),
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
