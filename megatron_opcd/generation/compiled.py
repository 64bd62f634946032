"""The compiled decode step: megatron-core's own layers, traced once per shape by torch.compile.

A decode step runs every layer of the stage on one token per row. Eager, each layer is ~45 small
ops (norms, RoPE, residual adds, SwiGLU, reshapes) between its four matmuls, each paying Python
and dispatch overhead (kernel launches on a GPU). Compiled, the ops between the matmuls fuse into a
few kernels, and on a GPU the step can be replayed as a CUDA graph.

What is compiled: each `TransformerLayer`'s forward (regional compilation), through one
`torch.compile`d function shared by all layers, so the 30 layers of a model reuse one traced
graph (the weights are graph inputs, not constants) and a compile costs one layer's tracing, not
the stage's. The embedding, the final norm, the output layer and the sampling stay eager (one call
each per step). The layers are megatron-core's modules with their own weights: nothing is copied;
`layers_compiled` points each layer's `_compiled_call_impl` (what `nn.Module.__call__` runs when
set) at the compiled function for the steps, and clears it after.

Static shapes: inside the step, the KV cache writes at a slot *tensor* (`index_copy_` into buffers
preallocated for the whole call, `KVCache.write_static`: inductor writes them in place) and attention reads a fixed `span` of
slots, the slots not yet written masked. A traced graph depends only on the bucket (batch, span, cache
length): the span is the next power of two (at least `MIN_SPAN`) of the slots filled, the cache
length that of the call's prefix + longest prompt + max_new_tokens, the batch the rows still
decoding (compacted to powers of two, see loop.py). A bucket is compiled once per process
(dynamo keeps the graph, inductor also caches it on disk); `compile_seconds` reports what the
first call of each bucket cost.

Where it pays (`SamplingParams.compile_decode`, the trainer's `generation.compile_decode`):
"auto" compiles when the stage's weights are at least `AUTO_MIN_PARAMS` parameters (below that, the
compile, tens of seconds on a loaded CPU, costs more than a run saves; docs/performance.md),
"always" always, "never" never (not on/off: YAML reads those as booleans). A compile that fails (no C++ compiler for inductor, an unsupported op) falls
back to the eager step and says so once.
"""

from __future__ import annotations

import functools
import sys
import time
from contextlib import contextmanager

import torch

from megatron_opcd.compat import mcore

COMPILE_MODES = ("auto", "always", "never")
"""Values of `SamplingParams.compile_decode`."""

AUTO_MIN_PARAMS = 50_000_000
""""auto" compiles stages of at least this many parameters (docs/performance.md: where it pays)."""

MIN_SPAN = 64
"""The smallest attention span: slots are read in buckets of 64, 128, 256, ..."""

_COMPILE_SECONDS: dict = {}  # bucket -> seconds its first compiled call took (this process)
_FAILED: list = []  # the first compile failure of this process (then: eager)


def span_bucket(filled: int, max_seq: int) -> int:
    """Slots the step attends over when `filled` slots are in use: a power of two >= MIN_SPAN,
    capped at the cache's length."""
    span = MIN_SPAN
    while span < filled:
        span *= 2
    return min(span, max_seq)


def batch_bucket(active: int) -> int:
    """The batch a compiled run compacts to when `active` rows still decode: a power of two."""
    b = 1
    while b < active:
        b *= 2
    return b


def wanted(mode: str, module) -> bool:
    """Whether `generate` runs the compiled step for this stage under `mode` (see the module doc)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_decode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "never" or _FAILED:
        return False
    if mode == "always":
        return True
    return sum(p.numel() for p in module.parameters()) >= AUTO_MIN_PARAMS


def _layer_call(layer, *args, **kwargs):
    return layer.forward(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _compiled(device_type: str):
    """The one compiled layer call of this process per device type. On a GPU, mode="reduce-overhead"
    replays each bucket's graph as a CUDA graph."""
    mcore.make_viewless_traceable()
    # Every (batch, span) bucket is one more graph of the same code: allow more than dynamo's 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(_layer_call, dynamic=False, mode=mode)


@contextmanager
def layers_compiled(module):
    """Run this stage's layers through the compiled call inside the block (eager again on exit)."""
    fn = _compiled(next(module.parameters()).device.type)
    layers = list(module.decoder.layers)
    try:
        for layer in layers:
            layer._compiled_call_impl = functools.partial(fn, layer)
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def timed_first_call(key, run):
    """`run()`; the first time `key` (a bucket) is seen in this process, its time is recorded as
    that bucket's compile time. A compile failure is recorded and re-raised."""
    if key in _COMPILE_SECONDS:
        return run(), 0.0
    start = time.perf_counter()
    try:
        out = run()
    except Exception as exc:  # noqa: BLE001 - any compile failure means: eager from now on, said once
        _FAILED.append(exc)
        print(f"[megatron-opcd] the compiled decode step failed ({type(exc).__name__}: {str(exc)[:200]}); "
              "decoding eagerly from now on (generation.compile_decode=never silences this)", file=sys.stderr)
        raise
    seconds = time.perf_counter() - start
    _COMPILE_SECONDS[key] = seconds
    return out, seconds


def compile_seconds() -> dict:
    """bucket -> seconds of its first (compiling) call, in this process."""
    return dict(_COMPILE_SECONDS)
