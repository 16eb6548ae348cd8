"""Negative control of scripts/vllm/check.py: corrupt the decoder's KV reads.

On PYTHONPATH with VLLM_CHECK_REVERSE_READS=1, every process (vLLM's engine
processes included) wraps NIXL's `nixl_agent.make_prepped_xfer` so that a
READ takes its remote descriptors in reverse order: each block lands where
another one belongs. The transport still moves every byte correctly; the
check must then see different tokens, or it could not see a wrong transfer.
The wrapper is installed when `nixl_cu12._api` is first imported.
"""

import importlib.abc
import importlib.util
import os
import sys


def _patch(module) -> None:
    original = module.nixl_agent.make_prepped_xfer

    def reversed_reads(self, operation, local_side, local_indices, remote_side, remote_indices,
                       *args, **kwargs):
        if operation == "READ" and len(remote_indices) > 1:
            remote_indices = list(remote_indices)[::-1]
        return original(self, operation, local_side, local_indices, remote_side,
                        remote_indices, *args, **kwargs)

    module.nixl_agent.make_prepped_xfer = reversed_reads


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "nixl_cu12._api":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("VLLM_CHECK_REVERSE_READS") == "1":
    sys.meta_path.insert(0, _Hook())
