"""compat/lazy_jit.py: megatron-core's torch.compile decorations run at first call, not at import."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from megatron_opcd.compat.lazy_jit import lazy_compile

# torch.compile replaced by a counter before anything else imports: how many times megatron-core's
# import decorates a function with it, and what its `jit_fuser` and fused functions are then.
PROBE = """
import json
import torch
calls = []
def counting_compile(fn=None, **options):
    calls.append(getattr(fn, "__name__", fn))
    return fn if fn is not None else (lambda f: f)
torch.compile = counting_compile
import megatron_opcd
from megatron_opcd.compat import enable_cpu
enable_cpu()
import megatron.core.jit, megatron.core.fusions.fused_bias_gelu as fbg, megatron.core.models.gpt  # noqa
print(json.dumps([calls, megatron.core.jit.jit_fuser.__name__, fbg.bias_gelu.__name__, hasattr(fbg.bias_gelu, "__wrapped__")]))
"""
# megatron-core 0.19's MoE router decorates one function with torch.compile itself, not through
# jit_fuser: left as it is (the hook changes jit_fuser only).
DIRECT = {"_compiled_topk_routing"}


def test_megatron_import_compiles_nothing_until_a_fused_function_is_called():
    """Importing megatron-core after megatron_opcd calls torch.compile for none of its fused
    functions (each call imported torch._dynamo and torch._inductor: ~3 CPU-s a process); they are
    wrapped, with their names, to compile at their first call."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    calls, fuser, name, wrapped = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(calls) <= DIRECT, calls  # megatron-core 0.16.1: 35 calls before, none now
    assert (fuser, name, wrapped) == ("lazy_compile", "bias_gelu", True), out.stdout


def test_lazy_compile_compiles_once_at_the_first_call_with_the_options(monkeypatch):
    seen = []

    def fake_compile(fn, **options):
        seen.append(options)
        return lambda *a, **k: fn(*a, **k) * 2  # a "compiled" function told apart by its result

    monkeypatch.setattr(torch, "compile", fake_compile)

    def f(x, y=1):
        return x + y

    plain, with_options = lazy_compile(f), lazy_compile(mode="max-autotune")(f)
    assert seen == [] and plain.__name__ == "f" and plain.__wrapped__ is f
    assert plain(3, y=2) == 10 and plain(1) == 4 and seen == [{}]  # compiled once, then reused
    assert with_options(1) == 4 and seen == [{}, {"mode": "max-autotune"}]
