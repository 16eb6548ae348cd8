#!/usr/bin/env python3
"""Demo: two processes move KV-cache-shaped data through NIXL, Mooncake beside UCX.

For each configuration the demo starts two processes, a *target* (the prefill
side: it owns a paged KV cache) and an *initiator* (the decode side). They
exchange NIXL agent metadata and prepared descriptor lists through files, as a
framework's side channel would, and then:

  1. vLLM-shaped batch: the initiator READs (pulls) 4096 block descriptors of
     32 KiB each (64 regions, one per layer and K/V, 64 scattered blocks in
     each) with one notification per batch, as vLLM's NixlConnector does;
  2. large blocks: the initiator WRITEs 8 blocks of 16 MiB with a notification.

Every byte is verified: the initiator checks what it READ, the target checks
what was WRITTEN into it as soon as the WRITE's notification arrives (so a
notification sent before its data landed would show up as a mismatch). The
demo prints, per configuration, the transport the plugin chose for the peer
and why (its own log line), then GB/s for both workloads.

Configurations: Mooncake with its defaults (same host: cross-memory attach),
Mooncake with NIXL_MOONCAKE_PROTOCOL=tcp, NIXL's UCX with its defaults, and
UCX restricted to TCP (UCX_TLS=tcp), all in the same run.

Usage (scripts/demo.sh builds the plugin and the venv first):

    .venv/bin/python scripts/demo.py [--plugin target/release/libplugin_Mooncake.so]
    .venv/bin/python scripts/demo.py --only mooncake      # or: mooncake-tcp, ucx, ucx-tcp
    .venv/bin/python scripts/demo.py --iters 10

The plugin is copied into a temporary directory that NIXL_PLUGIN_DIR points to
for the Mooncake runs; the UCX runs use the wheel's own plugin directory.
UCX_MODULES=^efa is set unless already set (it keeps the wheel's UCX from
loading the host's EFA provider, which crashes at exit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KiB, MiB = 1 << 10, 1 << 20
TIMEOUT_S = 60.0

# vLLM-shaped KV cache: one region per (layer, K|V), block-sized descriptors
# (16 tokens x 8 KV heads x 128 dims x 2 bytes = 32 KiB, as for an 8B Llama).
KV_REGIONS = 64
KV_BLOCK = 32 * KiB
KV_BLOCKS_PER_REGION = 128
KV_BLOCKS_PER_BATCH = 64  # blocks of one request, in every region
REGION_SIZE = KV_BLOCK * KV_BLOCKS_PER_REGION
# Large blocks: one WRITE of LARGE_COUNT descriptors of LARGE_BLOCK bytes.
LARGE_BLOCK = 16 * MiB
LARGE_COUNT = 8

CONFIGS = {
    "mooncake": ("Mooncake", {}),
    "mooncake-tcp": ("Mooncake", {"NIXL_MOONCAKE_PROTOCOL": "tcp"}),
    "ucx": ("UCX", {}),
    "ucx-tcp": ("UCX", {"UCX_TLS": "tcp,self"}),
}


def pattern(seed: int, size: int):
    """`size` reproducible random bytes (both processes derive the same)."""
    import numpy as np

    # numpy's own allocation (as a framework's tensors are: large, aligned,
    # transparent huge pages where the host allows them), then filled.
    out = np.empty(size, dtype=np.uint8)
    out[:] = np.frombuffer(np.random.default_rng(seed).bytes(size), dtype=np.uint8)
    return out


def batch_blocks(seed: int):
    """The (remote, local) block numbers of one request, scattered."""
    import numpy as np

    rng = np.random.default_rng(seed)
    remote = rng.choice(KV_BLOCKS_PER_REGION, KV_BLOCKS_PER_BATCH, replace=False)
    local = rng.choice(KV_BLOCKS_PER_REGION, KV_BLOCKS_PER_BATCH, replace=False)
    return remote, local


def block_descs(regions):
    """Every block of every region, as (addr, len, dev) rows: index
    r * KV_BLOCKS_PER_REGION + b is block b of region r."""
    return [(r.ctypes.data + b * KV_BLOCK, KV_BLOCK, 0)
            for r in regions for b in range(KV_BLOCKS_PER_REGION)]


def make_agent(name: str, backend: str):
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(backends=[backend]))
    if backend not in agent.backends:
        sys.exit(f"demo: {name}: no plugin for backend {backend!r} (plugins: {agent.get_plugin_list()})")
    return agent


def timed_transfer(agent, handle, what: str) -> float:
    """Posts `handle`, waits (bounded) until it is DONE, releases it; returns
    the seconds from post to completion."""
    t0 = time.perf_counter()
    state = agent.transfer(handle)
    if state not in ("DONE", "PROC"):
        sys.exit(f"demo: posting {what} failed ({state})")
    deadline = time.monotonic() + TIMEOUT_S
    while state == "PROC":
        if time.monotonic() > deadline:
            sys.exit(f"demo: {what} did not complete within {TIMEOUT_S:.0f}s")
        state = agent.check_xfer_state(handle)
    dt = time.perf_counter() - t0
    if state != "DONE":
        sys.exit(f"demo: {what} failed (state {state})")
    agent.release_xfer_handle(handle)
    return dt


def run_target(args) -> None:
    """The prefill side: owns the KV cache the initiator pulls from and the
    buffer it pushes large blocks into; verifies each WRITE on its
    notification."""
    import numpy as np

    agent = make_agent("demo-target", args.backend)
    kv = [pattern(1000 + r, REGION_SIZE) for r in range(KV_REGIONS)]
    landing = np.zeros(LARGE_BLOCK * LARGE_COUNT, dtype=np.uint8)
    landing[:] = 1  # touched before the transfers, as a live cache is
    agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in (*kv, landing)], "DRAM")
    exchange = Path(args.exchange)
    (exchange / "target.meta").write_bytes(agent.get_agent_metadata())
    (exchange / "target.kv").write_bytes(agent.get_serialized_descs(
        agent.get_xfer_descs(block_descs(kv), "DRAM")))
    (exchange / "target.landing").write_bytes(agent.get_serialized_descs(
        agent.get_xfer_descs([(landing.ctypes.data + i * LARGE_BLOCK, LARGE_BLOCK, 0)
                              for i in range(LARGE_COUNT)], "DRAM")))
    os.replace(exchange / "target.meta", exchange / "target.ready")
    expected = pattern(7, landing.nbytes)
    checked = bad = 0
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        for msgs in agent.get_new_notifs().values():
            for msg in msgs:
                if msg.startswith(b"write"):
                    # The notification comes after the data: check it now.
                    checked += 1
                    bad += int(not np.array_equal(landing, expected))
                    landing[:] = 0  # the next WRITE must land again
                    (exchange / f"ack-{msg.decode().split('-')[1]}").touch()
                    deadline = time.monotonic() + TIMEOUT_S
                elif msg == b"done":
                    print(json.dumps({"writes_checked": checked, "writes_bad": bad}), flush=True)
                    return
        if time.monotonic() > deadline:
            sys.exit("demo target: the initiator never finished")
        time.sleep(1e-4)  # polling interval


def run_initiator(args) -> None:
    """The decode side: pulls vLLM-shaped batches, pushes large blocks."""
    import numpy as np

    agent = make_agent("demo-initiator", args.backend)
    exchange = Path(args.exchange)
    peer = agent.add_remote_agent((exchange / "target.ready").read_bytes())
    kv = [np.zeros(REGION_SIZE, dtype=np.uint8) for _ in range(KV_REGIONS)]
    for r in kv:
        r[:] = 1  # touched, as a live KV cache is
    source = pattern(7, LARGE_BLOCK * LARGE_COUNT)
    agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in (*kv, source)], "DRAM")
    local_kv = agent.prep_xfer_dlist("NIXL_INIT_AGENT", block_descs(kv), "DRAM")
    remote_kv = agent.prep_xfer_dlist(
        peer, agent.deserialize_descs((exchange / "target.kv").read_bytes()))
    # Each region as rows of blocks: what we hold, and what the target holds.
    kv_blocks = [r.reshape(KV_BLOCKS_PER_REGION, KV_BLOCK) for r in kv]
    expected_blocks = [pattern(1000 + r, REGION_SIZE).reshape(KV_BLOCKS_PER_REGION, KV_BLOCK)
                       for r in range(KV_REGIONS)]
    result = {"batch_gbps": [], "large_gbps": [], "read_bad": 0}

    def indices(blocks):
        return np.array([r * KV_BLOCKS_PER_REGION + b for r in range(KV_REGIONS) for b in blocks],
                        dtype=np.int32)

    batch_bytes = KV_REGIONS * KV_BLOCKS_PER_BATCH * KV_BLOCK
    for i in range(args.iters + 1):  # the first round warms up (connections, pins)
        remote_blocks, local_blocks = batch_blocks(i)
        handle = agent.make_prepped_xfer("READ", local_kv, indices(local_blocks), remote_kv,
                                         indices(remote_blocks), f"request-{i}".encode())
        dt = timed_transfer(agent, handle, f"batch {i}")
        if i:
            result["batch_gbps"].append(batch_bytes / dt / 1e9)
        for got, want in zip(kv_blocks, expected_blocks):
            result["read_bad"] += int(not np.array_equal(got[local_blocks], want[remote_blocks]))
            got[local_blocks] = 0  # the next batch must land again

    local_large = agent.get_xfer_descs(
        [(source.ctypes.data + i * LARGE_BLOCK, LARGE_BLOCK, 0) for i in range(LARGE_COUNT)], "DRAM")
    remote_large = agent.deserialize_descs((exchange / "target.landing").read_bytes())
    for i in range(args.iters + 1):
        handle = agent.initialize_xfer("WRITE", local_large, remote_large, peer, f"write-{i}".encode())
        dt = timed_transfer(agent, handle, f"WRITE {i}")
        if i:
            result["large_gbps"].append(source.nbytes / dt / 1e9)
        # Let the target check (and clear) this WRITE before the next one.
        wait_for(exchange, i)
    agent.send_notif(peer, b"done")
    print(json.dumps(result), flush=True)


def wait_for(exchange: Path, i: int) -> None:
    """The target acknowledges WRITE `i` by creating a file (see run())."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (exchange / f"ack-{i}").exists():
        if time.monotonic() > deadline:
            sys.exit(f"demo: the target never checked WRITE {i}")
        time.sleep(1e-3)  # polling interval


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def run_config(label: str, args, plugin_dir: str | None) -> dict:
    backend, extra_env = CONFIGS[label]
    env = dict(os.environ, **extra_env)
    env.setdefault("UCX_MODULES", "^efa")
    if backend == "Mooncake":
        env["NIXL_PLUGIN_DIR"] = plugin_dir
        env.setdefault("RUST_LOG", "info")  # the plugin's own choice of transport
    else:
        env.pop("NIXL_PLUGIN_DIR", None)
    with tempfile.TemporaryDirectory(prefix="nixl-demo-") as exchange:
        common = [sys.executable, __file__, "--backend", backend, "--exchange", exchange,
                  "--iters", str(args.iters)]
        target = subprocess.Popen(common + ["--role", "target"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not Path(exchange, "target.ready").exists():
                if target.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"demo: the {label} target did not start:\n{target.stderr.read()}")
                time.sleep(0.01)  # polling interval
            initiator = subprocess.run(common + ["--role", "initiator"], env=env, capture_output=True,
                                       text=True, timeout=TIMEOUT_S * 2)
            target_out, target_err = target.communicate(timeout=TIMEOUT_S)
        finally:
            if target.poll() is None:
                target.kill()
                target.wait()
    if initiator.returncode != 0 or target.returncode != 0:
        sys.exit(f"demo: {label} failed\ninitiator: {initiator.stderr[-3000:]}\n"
                 f"target: {target_err[-3000:]}")
    result = json.loads(initiator.stdout.strip().splitlines()[-1])
    result.update(json.loads(target_out.strip().splitlines()[-1]))
    result["how"] = [line.split("Mooncake: ", 1)[1] for line in initiator.stderr.splitlines()
                     if re.search(r"Mooncake: (agent .* reaches|options:)", line)]
    return result


def orchestrate(args) -> None:
    plugin = Path(args.plugin or REPO / "target" / "release" / "libplugin_Mooncake.so")
    labels = [args.only] if args.only else list(CONFIGS)
    with tempfile.TemporaryDirectory(prefix="nixl-demo-plugins-") as plugin_dir:
        if any(CONFIGS[label][0] == "Mooncake" for label in labels):
            if not plugin.is_file():
                sys.exit(f"demo: plugin not found: {plugin} (cargo build --release)")
            shutil.copyfile(plugin, Path(plugin_dir) / "libplugin_Mooncake.so")
        batch = KV_REGIONS * KV_BLOCKS_PER_BATCH
        print(f"NIXL demo: two processes (target = prefill, initiator = decode), {args.iters} rounds each")
        print(f"  batch: READ of {batch} blocks of {KV_BLOCK // KiB} KiB ({KV_REGIONS} regions), one "
              f"notification; large: WRITE of {LARGE_COUNT} x {LARGE_BLOCK // MiB} MiB, one notification")
        ok = True
        rows = []
        for label in labels:
            t0 = time.monotonic()
            r = run_config(label, args, plugin_dir)
            extra = CONFIGS[label][1]
            print(f"\n[{label}] backend {CONFIGS[label][0]}"
                  + (f" with {' '.join(f'{k}={v}' for k, v in extra.items())}" if extra else ""))
            for line in r["how"]:
                print(f"  plugin: {line}")
            good = (r["read_bad"] == 0 and r["writes_bad"] == 0
                    and r["writes_checked"] == args.iters + 1)
            ok &= good
            print(f"  verified: {'every byte' if good else 'MISMATCH'} "
                  f"(READ batches with bad blocks: {r['read_bad']}; WRITEs checked on their "
                  f"notification: {r['writes_checked']}, bad: {r['writes_bad']})")
            print(f"  batch READ {median(r['batch_gbps']):6.2f} GB/s   large WRITE "
                  f"{median(r['large_gbps']):6.2f} GB/s   (medians; {time.monotonic() - t0:.1f} s)")
            rows.append((label, median(r["batch_gbps"]), median(r["large_gbps"])))
        print("\nsummary (GB/s, median of rounds)")
        print(f"  {'configuration':14} {'batch READ':>11} {'large WRITE':>12}")
        for label, b, w in rows:
            print(f"  {label:14} {b:11.2f} {w:12.2f}")
        print("demo OK" if ok else "demo FAILED")
        sys.exit(0 if ok else 1)


def main() -> None:
    p = argparse.ArgumentParser(description="NIXL two-process transfer demo")
    p.add_argument("--plugin", help="libplugin_Mooncake.so to load (default: target/release)")
    p.add_argument("--only", choices=list(CONFIGS), help="run one configuration")
    p.add_argument("--iters", type=int, default=5, help="timed rounds per workload (default 5)")
    p.add_argument("--role", choices=["target", "initiator"], help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--exchange", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "target":
        run_target(args)
    elif args.role == "initiator":
        run_initiator(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
