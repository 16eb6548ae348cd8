#!/usr/bin/env python3
"""Demo: move data between two NIXL agents through the Mooncake plugin.

Two agents live in this one process.  The initiator WRITEs a buffer of random
bytes into the target's memory with a notification, then READs a second buffer
back from the target; both directions are verified byte for byte.

Usage (after scripts/setup-venv.sh and cargo build --release):

    .venv/bin/python scripts/demo.py                       # Mooncake, 64 MiB
    .venv/bin/python scripts/demo.py --size-mib 256
    .venv/bin/python scripts/demo.py --plugin path/to/libplugin_Mooncake.so
    .venv/bin/python scripts/demo.py --backend UCX         # NIXL's bundled backend

Where NIXL finds the plugin:
  * --plugin PATH: the demo copies PATH as libplugin_<backend>.so into a temporary
    directory and points NIXL_PLUGIN_DIR at it.
  * otherwise, if NIXL_PLUGIN_DIR is set by the caller, NIXL scans that directory
    (and only that one: the wheel's bundled UCX is then not available).
  * otherwise, for --backend Mooncake, <repo>/target/release/libplugin_Mooncake.so
    is used as if given with --plugin, when it exists;
  * otherwise NIXL scans the wheel's own plugins directory (where UCX lives, and
    where a copied libplugin_Mooncake.so is found too).

UCX_MODULES=^efa and UCX_NET_DEVICES=lo are set unless already set (they keep
the wheel's UCX from loading the host's EFA provider, which crashes at exit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
TIMEOUT_S = 60.0


def choose_plugin_dir(args, tmp: Path) -> str:
    """Set NIXL_PLUGIN_DIR (before NIXL is initialised); describe the choice."""
    plugin = args.plugin
    if plugin is None and "NIXL_PLUGIN_DIR" not in os.environ and args.backend == "Mooncake":
        built = REPO / "target" / "release" / "libplugin_Mooncake.so"
        if built.is_file():
            plugin = str(built)
    if plugin is not None:
        if not Path(plugin).is_file():
            sys.exit(f"demo: plugin not found: {plugin}")
        shutil.copyfile(plugin, tmp / f"libplugin_{args.backend}.so")
        os.environ["NIXL_PLUGIN_DIR"] = str(tmp)
        return f"{plugin} (copied into {tmp})"
    if "NIXL_PLUGIN_DIR" in os.environ:
        return f"NIXL_PLUGIN_DIR={os.environ['NIXL_PLUGIN_DIR']}"
    return "the nixl-cu12 wheel's plugins directory"


def wait_done(agent, handle, what: str) -> None:
    """Poll the transfer until it is DONE (bounded)."""
    deadline = time.monotonic() + TIMEOUT_S
    state = agent.check_xfer_state(handle)
    while state == "PROC":
        if time.monotonic() > deadline:
            sys.exit(f"demo: {what} did not complete within {TIMEOUT_S:.0f}s")
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        sys.exit(f"demo: {what} failed (state {state})")


def wait_notif(agent, sender: str, payload: bytes) -> float:
    """Poll the target's notifications until `payload` from `sender` arrives (bounded)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        if payload in agent.get_new_notifs().get(sender, []):
            return time.perf_counter() - t0
        if time.monotonic() > deadline:
            sys.exit(f"demo: notification {payload!r} from {sender} never arrived")
        time.sleep(1e-4)  # polling interval


def main() -> None:
    p = argparse.ArgumentParser(description="NIXL two-agent transfer demo")
    p.add_argument("--backend", default="Mooncake", help="backend/plugin name (default Mooncake)")
    p.add_argument("--plugin", help="path of the plugin .so to load (see the docstring)")
    p.add_argument("--size-mib", type=int, default=64, help="bytes moved each way (default 64 MiB)")
    args = p.parse_args()

    os.environ.setdefault("UCX_MODULES", "^efa")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    with tempfile.TemporaryDirectory(prefix="nixl-demo-") as tmp:
        where = choose_plugin_dir(args, Path(tmp))
        run(args, where)


def run(args, where: str) -> None:
    import numpy as np
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    size = args.size_mib * MiB
    print(f"NIXL demo with backend {args.backend!r}, plugin from {where}")

    def agent(name: str):
        hint = "NIXL_LOG_LEVEL=INFO shows why a plugin fails to load"
        try:
            a = nixl_agent(name, nixl_agent_config(backends=[args.backend]))
        except Exception as e:  # listed, but the plugin failed to load or to create
            sys.exit(f"demo: creating backend {args.backend!r} failed: {type(e).__name__}: {e} ({hint})")
        if args.backend not in a.backends:
            sys.exit(f"demo: no plugin for backend {args.backend!r}; plugins found: "
                     f"{a.get_plugin_list()} (build it, or pass --plugin; {hint})")
        return a

    initiator, target = agent("demo-initiator"), agent("demo-target")
    print(f"  two agents in this process: {initiator.name!r} (initiator), {target.name!r} (target)")

    rng = np.random.default_rng()
    to_send = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8)
    read_back = np.zeros(size, dtype=np.uint8)
    landing = np.zeros(size, dtype=np.uint8)
    to_fetch = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8)

    def regions(*bufs):
        return [(b.ctypes.data, b.nbytes, 0, "") for b in bufs]

    def descs(a, buf):
        return a.get_xfer_descs([(buf.ctypes.data, buf.nbytes, 0)], "DRAM")

    initiator.register_memory(regions(to_send, read_back), "DRAM")
    target.register_memory(regions(landing, to_fetch), "DRAM")
    print(f"  registered 2 x {args.size_mib} MiB of host memory on each agent")
    initiator.add_remote_agent(target.get_agent_metadata())
    print("  initiator loaded the target's metadata")

    ok = True
    for op, local, remote, note in (
        ("WRITE", to_send, landing, b"demo: write finished"),
        ("READ", read_back, to_fetch, b"demo: read finished"),
    ):
        handle = initiator.initialize_xfer(op, descs(initiator, local), descs(target, remote),
                                           target.name, note)
        t0 = time.perf_counter()
        state = initiator.transfer(handle)
        if state not in ("DONE", "PROC"):
            sys.exit(f"demo: posting the {op} failed ({state})")
        wait_done(initiator, handle, op)
        dt = time.perf_counter() - t0
        arrow = "initiator -> target" if op == "WRITE" else "target -> initiator"
        print(f"  {op:5} {args.size_mib} MiB {arrow}: {dt * 1e3:.1f} ms, {size / dt / 1e9:.2f} GB/s")
        extra = wait_notif(target, initiator.name, note)
        print(f"        target got notification {note!r} from {initiator.name!r}"
              f" ({extra * 1e3:.1f} ms after completion was seen)")
        same = bool(np.array_equal(local, remote))
        ok &= same
        print(f"        verification: {'bytes identical' if same else 'DATA MISMATCH'}")
        initiator.release_xfer_handle(handle)

    print("demo OK" if ok else "demo FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
