"""The real vLLM through our plugin: prefill/decode disaggregation with vLLM's
own NixlConnector, checked token for token against plain generation.

Run by scripts/vllm-check.sh (which builds the plugin and the venv):

    .vllm-venv/bin/python scripts/vllm/check.py --plugin target/release/libplugin_Mooncake.so

Steps:
  1. a tiny random Llama is built locally (scripts/vllm/make_model.py);
  2. one plain vLLM server generates the reference tokens for a few prompts
     (token ids, greedy);
  3. for each configuration a prefill and a decode server run with
     NixlConnector (pull mode: the decoder READs the prefiller's KV blocks,
     KV cache in host memory), and each prompt goes through the toy proxy's
     protocol (prefill with max_tokens=1 and do_remote_decode, then decode
     with the kv_transfer_params the prefiller returned):
       - ucx:          backends ["UCX"] (NIXL's own backend, the reference)
       - mooncake:     backends ["Mooncake"], our plugin with its defaults
       - mooncake-tcp: the same with NIXL_MOONCAKE_PROTOCOL=tcp
       - negative:     like mooncake, but the decoder's READs take the remote
                       blocks in reverse order (scripts/vllm/negative/); the
                       check must notice that the tokens changed.
A configuration passes when the decoder's tokens equal the reference for every
prompt, the decoder's metrics say every prompt token but the last of each
request came from the KV transfer (vllm:prompt_tokens_by_source, source
external_kv_transfer) and no NIXL transfer failed
(vllm:nixl_num_failed_transfers). The negative control passes when its tokens
differ. Exit status 0 only when all pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
START_TIMEOUT_S = 600  # a vLLM server on a loaded 2-core host starts in 1-3 minutes
REQUEST_TIMEOUT_S = 300
BLOCK_SIZE = 32  # vLLM's CPU attention backend wants a multiple of 32
PROMPT_LENGTHS = (97, 160, 255, 300)  # several blocks each, most with a partial last block
MAX_TOKENS = 24


def log(msg: str) -> None:
    print(msg, flush=True)


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        return json.load(resp)


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels`;
    NaN when there is none (a renamed metric then fails every comparison
    instead of reading as zero)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            seen = True
    return total if seen else float("nan")


class Server:
    """One vLLM OpenAI-compatible server process, logging to a file."""

    def __init__(self, name: str, port: int, model: Path, work: Path, env: dict,
                 kv_config: dict | None):
        self.name, self.port = name, port
        self.log_path = work / f"{name}.log"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--port", str(port), "--block-size", str(BLOCK_SIZE), "--max-model-len", "1024",
               "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager",
               "--max-num-seqs", "4", "--seed", "0"]
        if kv_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_config)]
        self.log_file = open(self.log_path, "w")
        # Own process group: stopping the server stops its engine processes too.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                get(self.port, "/health")
                return
            except OSError:
                time.sleep(1)  # polling interval
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if re.search(pattern, line)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # engine processes left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log_file.close()


def prompts() -> list[list[int]]:
    rng = random.Random(2026)
    return [[rng.randrange(3, 2048) for _ in range(n)] for n in PROMPT_LENGTHS]


def completion(port: int, model: Path, prompt: list[int], max_tokens: int,
               kv_params: dict | None = None) -> dict:
    body = {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True}
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    return post(port, "/v1/completions", body)


def generate_plain(model: Path, work: Path, env: dict, port: int) -> list[list[int]]:
    server = Server("plain", port, model, work, env, None)
    try:
        server.wait_ready()
        return [completion(port, model, p, MAX_TOKENS)["choices"][0]["token_ids"] for p in prompts()]
    finally:
        server.stop()


def run_pd(label: str, backend: str, model: Path, work: Path, env: dict, ports: tuple[int, ...],
           decoder_extra_env: dict) -> dict:
    """Prefill + decode servers with NixlConnector over `backend`; every prompt through them."""
    kv = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
          "kv_connector_extra_config": {"backends": [backend]}}
    p_port, d_port, p_side, d_side = ports
    # One core each where there are several: vLLM's CPU workers spin in
    # OpenMP, and two servers sharing every core slow each other down tenfold.
    cores = sorted(os.sched_getaffinity(0))

    def bind(k: int) -> dict:
        return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[k])} if len(cores) > 1 else {}

    prefill = Server(f"{label}-prefill", p_port, model, work,
                     dict(env, VLLM_NIXL_SIDE_CHANNEL_PORT=str(p_side), **bind(0)), kv)
    decode = Server(f"{label}-decode", d_port, model, work,
                    dict(env, VLLM_NIXL_SIDE_CHANNEL_PORT=str(d_side), **bind(-1),
                         **decoder_extra_env), kv)
    try:
        prefill.wait_ready()
        decode.wait_ready()
        outputs = []
        t0 = time.monotonic()
        for p in prompts():
            first = completion(p_port, model, p, 1, {
                "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None})
            params = first.get("kv_transfer_params")
            if not params:
                raise RuntimeError(f"{label}: the prefiller returned no kv_transfer_params: {first}")
            out = completion(d_port, model, p, MAX_TOKENS, params)
            outputs.append(out["choices"][0]["token_ids"])
        elapsed = time.monotonic() - t0
        metrics = get(d_port, "/metrics")
        return {
            "outputs": outputs,
            "seconds": elapsed,
            "prompt_tokens": metric(metrics, "vllm:prompt_tokens_total"),
            "external": metric(metrics, "vllm:prompt_tokens_by_source_total",
                               source="external_kv_transfer"),
            "local": metric(metrics, "vllm:prompt_tokens_by_source_total", source="local_compute"),
            "failed": metric(metrics, "vllm:nixl_num_failed_transfers_total"),
            "plugin": decode.lines(r"Mooncake: agent .* reaches")
            + decode.lines(r"Mooncake: options:"),
            "errors": [line for s in (prefill, decode) for line in s.lines(r"\bERROR\b")],
        }
    except Exception:
        for s in (prefill, decode):
            log(f"--- last lines of {s.log_path}\n{s.tail()}")
        raise
    finally:
        prefill.stop()
        decode.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plugin", required=True, help="libplugin_Mooncake.so to test")
    ap.add_argument("--only", help="comma list of configurations (ucx,mooncake,mooncake-tcp,negative)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    args = ap.parse_args()
    configs = {
        "ucx": ("UCX", {}, {}),
        "mooncake": ("Mooncake", {}, {}),
        "mooncake-tcp": ("Mooncake", {"NIXL_MOONCAKE_PROTOCOL": "tcp"}, {}),
        "negative": ("Mooncake", {}, {"PYTHONPATH": str(HERE / "negative"),
                                      "VLLM_CHECK_REVERSE_READS": "1"}),
    }
    wanted = args.only.split(",") if args.only else list(configs)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    plugin_dir = work / "plugins"
    plugin_dir.mkdir()
    shutil.copyfile(args.plugin, plugin_dir / "libplugin_Mooncake.so")
    model = work / "tiny-llama"
    subprocess.run([sys.executable, str(HERE / "make_model.py"), str(model)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", UCX_MODULES="^efa",
                    PYTHONUNBUFFERED="1")
    base_env.pop("NIXL_PLUGIN_DIR", None)
    log(f"vllm-check: vLLM {vllm_version()} on CPU, tiny random Llama, {len(PROMPT_LENGTHS)} prompts "
        f"of {', '.join(map(str, PROMPT_LENGTHS))} tokens, {MAX_TOKENS} tokens each, block size "
        f"{BLOCK_SIZE}; work directory {work}")
    ok = True
    try:
        t0 = time.monotonic()
        reference = generate_plain(model, work, base_env, 8300)
        log(f"[plain] reference tokens generated ({time.monotonic() - t0:.0f} s)")
        for i, label in enumerate(wanted):
            backend, extra_env, decoder_env = configs[label]
            env = dict(base_env, **extra_env)
            if backend == "Mooncake":
                env["NIXL_PLUGIN_DIR"] = str(plugin_dir)
                env["RUST_LOG"] = "info"
            t0 = time.monotonic()
            ports = tuple(8310 + 10 * i + k for k in range(4))
            r = run_pd(label, backend, model, work, env, ports, decoder_env)
            same = [out == ref for out, ref in zip(r["outputs"], reference)]
            n_req = len(PROMPT_LENGTHS)
            all_through_nixl = r["external"] >= r["prompt_tokens"] - n_req and r["prompt_tokens"] > 0
            if label == "negative":
                good = not all(same)
                verdict = ("caught: tokens differ from the reference for "
                           f"{same.count(False)} of {n_req} prompts" if good
                           else "NOT CAUGHT: blocks read in the wrong order gave the same tokens")
            else:
                good = all(same) and all_through_nixl and r["failed"] == 0
                verdict = (f"tokens equal the reference for {same.count(True)} of {n_req} prompts; "
                           f"decoder prompt tokens {r['prompt_tokens']:.0f}, from the KV transfer "
                           f"{r['external']:.0f}, computed locally {r['local']:.0f}; "
                           f"failed transfers {r['failed']:.0f}")
            ok &= good
            extra = " ".join(f"{k}={v}" for k, v in extra_env.items())
            log(f"[{label}] backends [\"{backend}\"]{' ' + extra if extra else ''}: "
                f"{'PASS' if good else 'FAIL'} ({time.monotonic() - t0:.0f} s; requests "
                f"{r['seconds']:.1f} s)\n    {verdict}")
            for line in r["plugin"]:
                log(f"    decoder's plugin: {line.split('Mooncake: ', 1)[1]}")
            for line in r["errors"][:5]:
                log(f"    server error line: {line}")
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"server logs kept in {work}")
    log(f"vllm-check {'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    sys.exit(0 if ok else 1)


def vllm_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("vllm-cpu")


if __name__ == "__main__":
    main()
