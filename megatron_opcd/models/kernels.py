"""Forward-only kernels built into every layer of the model, used while it generates or scores.

megatron-core's `TransformerLayer`, `SelfAttention` and `MLP` keep running as they are: their
order of operations, norms, QK-norm, residuals, activation and TP layout stay megatron's. What a
layer spec names as a leaf submodule, the place megatron itself chooses kernels (local
`DotProductAttention` / `ColumnParallelLinear` vs TE's `TEDotProductAttention` /
`TELayerNormColumnParallelLinear`), is chosen here when the model is built (`generation_spec`,
`install_output_layer`, called by models/spec.py and models/builder.py): a subclass of megatron's
own class that behaves exactly as it does (`super().forward`) until `attach(module, cache)` points
it at a KV cache for one `generate`/`score` call:

* `core_attention` -> `KVCacheAttention` over megatron's class: with a cache attached, it rotates
  the new queries/keys (once, by position), writes keys/values to the `KVCache`, and attends with
  one `F.scaled_dot_product_attention` call per layer, the query heads of a KV group folded into
  the query axis so no key is expanded (megatron's local path: `repeat_interleave` + baddbmm +
  masked softmax + bmm). A prefix shared by all rows (`KVCache.load_prefix(shared=True)`) is read
  once for all rows: `cascade_attention`.
* megatron's local `ColumnParallelLinear` / `RowParallelLinear` (exactly those classes: TE's
  fused modules are left alone), in the layers and the output layer -> `ForwardOnlyLinear` over
  them: while attached, a plain matmul on the module's own weight, and megatron's own
  `reduce_from_tensor_model_parallel_region` / `gather_from_tensor_model_parallel_region`. The
  stock forward routes every call through an autograd Function, autocast decorators, offloading
  and gradient-fusion checks: Python overhead that is a sizeable share of a CPU decode step.
  While decoding on the CPU, a step's 2-8 rows go through `native.linear_rows` (a small AVX2
  kernel that reads each weight row once; 1.3x MKL's sgemm at 8 rows), one row (and more than
  8, up to `PREFILL_ROWS`) through an `[in, out]` copy of the weight (see `attach`); a prefill
  through the stock layout.

The subclasses add no parameter, buffer or submodule: state dicts, checkpoints, DDP and the
optimizer see megatron's modules. `attach` changes no module, only what the built ones read.
Measured on the CPU benchmark (docs/generation.md): with the cache, these kernels and running
without the compat layer's per-op redirect, decoding went from 0.49x to 0.96-1.03x transformers'
`generate` for a 28M-parameter Llama (batch 8 / batch 1), where a decode step is bound by
streaming the weights; with the decode kernel, 1.21-1.28x at batch 8.
Everything is forward-only, under `torch.no_grad()`; the student's training forward runs
megatron's own code path through these classes.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from megatron_opcd import native
from megatron_opcd.compat import mcore


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE as megatron's `apply_rotary_pos_emb` computes it (bshd, no mscale): the first
    `rot_dim` channels rotate, the rest pass through. x `[s, b, h, d]`, cos/sin `[s, b, 1, rot_dim]`."""
    rot = cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    if interleaved:  # channel pairs (0, 1), (2, 3), ...
        x1, x2 = head[..., 0::2], head[..., 1::2]
        half = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:  # halves (0, rot/2), ...
        x1, x2 = head.chunk(2, dim=-1)
        half = torch.cat((-x2, x1), dim=-1)
    out = head * cos + half * sin
    return torch.cat((out, tail), dim=-1) if tail.shape[-1] else out


class KVCacheAttention:
    """Mixin over a layer's core attention class (megatron's `DotProductAttention`, TE's
    `TEDotProductAttention`): megatron's forward, or, while `attach` has set `kv_cache`, attention
    on that `generation.cache.KVCache` (same call signature and output).

    Input as megatron's `SelfAttention` hands it over when no rotary table is passed to the block:
    query `[s, b, heads/tp, d]`, key/value `[s, b, groups/tp, d]`, not yet rotated. Output
    `[s, b, heads/tp * d]`, as `DotProductAttention` returns."""

    kv_cache = None  # the attached KVCache (None: megatron's own forward)
    kv_layer = 0  # this layer's key in the cache (SelfAttention.layer_number), set by attach
    kv_scale = 1.0  # softmax scale, set by attach
    kv_interleaved = False  # RoPE on interleaved channel pairs, set by attach
    kv_static = None  # this layer's (keys, values) buffers during a compiled static step (generation/compiled.py)

    def forward(self, query, key, value, attention_mask=None, *args, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        cache = self.kv_cache
        if cache is None:
            return super().forward(query, key, value, attention_mask, *args, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
        if attention_bias is not None or packed_seq_params is not None or args or kwargs:
            raise NotImplementedError("the generation KV cache takes neither attention_bias, packed sequences nor "
                                      f"other arguments (got {len(args)} more positional, {sorted(kwargs)})")
        if cache.cos is not None:
            query = _rotate(query, cache.cos, cache.sin, self.kv_interleaved)
            key = _rotate(key, cache.cos, cache.sin, self.kv_interleaved)
        s, b, h, d = query.shape
        g = key.shape[2]
        if self.kv_static is not None:  # the buffers, not the layer number: no per-layer constant in a traced graph
            k, v = cache.write_static(self.kv_static, key, value)  # [b, g, span, d]
        else:
            k, v = cache.write(self.kv_layer, key, value)  # [b, g, S, d]
        # Query head i reads KV group i // r (megatron's grouping): fold the r heads of a group into
        # the query axis, [s, b, g*r, d] -> [b, g, r*s, d], and every group attends with its own keys.
        q = query.permute(1, 2, 0, 3).reshape(b, g, (h // g) * s, d)
        if cache.shared is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.bias, scale=self.kv_scale)
        else:
            pk, pv = cache.shared[self.kv_layer]  # [1, g, P, d]
            out = cascade_attention(q, pk, pv, k, v, cache.bias, self.kv_scale)
        # reshape, not view: CUDA's SDPA kernels hand back [b, g, r*s, d] as a strided view of [b, r*s, g, d].
        return out.reshape(b, h, s, d).permute(2, 0, 1, 3).reshape(s, b, h * d)  # [s, b, h*d]


def attention_with_lse(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention `[B, G, L, d]` and the log-sum-exp of each query's scaled, biased scores
    `[B, G, L]`. On the CPU, ATen's flash kernel returns both (the kernel that
    `F.scaled_dot_product_attention` runs there; the log-sum-exp in the inputs' dtype); elsewhere
    the same in plain float32 matmuls (a float32 log-sum-exp)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                           scale=scale)
    return _attention_with_lse_matmul(q, k, v, bias, scale)


def _attention_with_lse_matmul(q, k, v, bias, scale: float, max_scores: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` in float32 matmuls, queries in chunks so that no chunk's score tensor
    holds more than `max_scores` elements (256 MB)."""
    B, G, L, _ = q.shape
    chunk = max(1, max_scores // max(1, B * G * k.shape[-2]))
    outs, lses = [], []
    for lo in range(0, L, chunk):
        scores = torch.matmul(q[:, :, lo:lo + chunk].float(), k.float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + (bias if bias.shape[-2] == 1 else bias[..., lo:lo + chunk, :])
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def cascade_attention(q, prefix_k, prefix_v, k, v, bias, scale: float) -> torch.Tensor:
    """Attention of `q` (`[b, g, L, d]`) over a prefix every query sees (`[1, g, P, d]`, one copy
    for all rows) followed by each row's own keys (`[b, g, S, d]`, additive `bias`
    `[b, 1, L or 1, S]`), as one softmax over `P + S` keys.

    The prefix part folds the b rows into the query axis, one `[g, b*L, P]` product that reads the
    prefix once instead of once per row; the two partial softmaxes are merged by their
    log-sum-exps (each query sees at least its own slot, so both are finite)."""
    b, g, L, d = q.shape
    folded = q.transpose(0, 1).reshape(1, g, b * L, d)  # row-major within each group
    o1, lse1 = attention_with_lse(folded, prefix_k, prefix_v, None, scale)
    o1 = o1.reshape(g, b, L, d).transpose(0, 1)  # [b, g, L, d]
    lse1 = lse1.reshape(g, b, L).transpose(0, 1)
    o2, lse2 = attention_with_lse(q, k, v, bias, scale)
    # The merge in float64 (a [b, g, L, d] elementwise step): in float32 it alone moved logits of
    # magnitude ~5 by 1e-6, against the 1e-5 the tests hold scoring to.
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp((lse1 - top).double()), torch.exp((lse2 - top).double())  # [b, g, L]
    out = (o1.double() * w1[..., None] + o2.double() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(q.dtype).contiguous()


PREFILL_ROWS = 64
"""Calls of more rows than this (a prefill) multiply by the stock `[out, in]` weight, never a copy."""


class ForwardOnlyLinear:
    """Mixin over megatron-core's local `ColumnParallelLinear` / `RowParallelLinear` (sequence
    parallelism off, as `stage.inference_mode` guarantees while attached): megatron's forward, or,
    while attached, a forward-only one with megatron's `(output, bias)` / `skip_bias_add` contract.

    Attached with `transposed=False`, it multiplies by the module's weight at every call. With
    `transposed=True` (decode on the CPU, see `attach`) it sends calls of 2 to 8 rows
    (`native.MIN_ROWS`, `native.MAX_ROWS`) to `native.linear_rows` when it can run
    (`native.supports`), and multiplies the others by a contiguous `[in, out]` copy of the weight,
    made at the first such call and dropped at detach: the weights cannot change inside one
    `generate` call."""

    row_parallel = False  # RowParallelLinear: the output is reduced over TP
    forward_only = None  # None: megatron's forward; else (transposed, native kernel usable), set by attach
    _copy = None  # (source weight, its [in, out] copy), while attached

    def _matmul(self, x, weight, transposed: bool, use_native: bool):
        if not transposed:
            return F.linear(x, weight)
        if use_native:
            rows = x.reshape(-1, x.shape[-1])  # [s*b, in]: a view for a decode step's [1, b, in]
            if native.supports(rows, weight):
                return native.linear_rows(rows, weight).view(*x.shape[:-1], weight.shape[0])
        if x.numel() > PREFILL_ROWS * x.shape[-1]:
            # A prefill: compute-bound, MKL is as fast on the stock layout; a copy of every weight
            # here (what a batch-8 decode then never reads again) cost ~0.4 s a call at SmolLM2's shape.
            return F.linear(x, weight)
        if self._copy is None or self._copy[0] is not weight:
            self._copy = (weight, weight.detach().t().contiguous())
        return torch.matmul(x, self._copy[1])

    def forward(self, *args, **kwargs):
        if self.forward_only is None:
            return super().forward(*args, **kwargs)
        return self._forward_only(*args, **kwargs)

    def _forward_only(self, input_, weight=None, runtime_gather_output=None):  # megatron's parameter names
        x = input_
        # skip_bias_add: megatron returns the bias for the caller to add (fused with dropout/residual).
        bias, out_bias = (None, self.bias) if self.skip_bias_add else (self.bias, None)
        tp = self.tp_group.size()  # megatron's mappings are no-ops at 1, but cost an autograd Function call
        out = self._matmul(x, self.weight if weight is None else weight, *self.forward_only)  # [s, b, out(/tp)]
        if self.row_parallel and tp > 1:
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if bias is not None:
            out = out + bias  # after the reduction (row-parallel), as megatron adds it
        if not self.row_parallel:
            gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
            if gather and tp > 1:
                from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

                out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, out_bias


@functools.lru_cache(maxsize=None)
def _subclass(mixin: type, base: type, prefix: str, **attrs) -> type:
    """`class <prefix><Base>(mixin, base)`, made once per pair: every model built in the process
    gets the same class (one type for isinstance)."""
    name = prefix + base.__name__
    return type(name, (mixin, base), dict(attrs, __module__=__name__, __qualname__=name))


def generation_class(cls):
    """The class a layer spec names in place of `cls`: megatron's local linears get the
    forward-only mixin; anything else (TE's fused linears, norms, a ModuleSpec) stays."""
    column, row = mcore.local_linear_classes()
    if cls is column:
        return _subclass(ForwardOnlyLinear, column, "ForwardOnly")
    if cls is row:
        return _subclass(ForwardOnlyLinear, row, "ForwardOnly", row_parallel=True)
    return cls


def cached_attention_class(cls):
    """The core attention a layer spec names in place of `cls` (a class: megatron's or TE's)."""
    if not isinstance(cls, type):
        return cls  # a ModuleSpec: left as it is (`attach` then refuses the model, in one line)
    return _subclass(KVCacheAttention, cls, "KVCache")


def generation_spec(spec):
    """`spec` (a layer's ModuleSpec) with the kernels above as its leaves (a copy: megatron's spec
    functions may hand out shared objects)."""
    return mcore.replace_layer_leaves(spec, attention=cached_attention_class, linear=generation_class)


def install_output_layer(model) -> None:
    """Give the last stage's output layer the forward-only mixin. GPTModel builds it itself (no spec
    entry), so its class is changed in place to the subclass, which adds no state (the way
    `torch.nn.utils.parametrize` gives a module a class of its own); a subclass of megatron's is
    left alone, as `generation_class` does."""
    layer = mcore.output_layer(model)
    if layer is not None:
        layer.__class__ = generation_class(type(layer))


def check_supported(config) -> None:
    """Refuse, in one line, the attention variants `KVCacheAttention` does not implement."""
    if getattr(config, "window_size", None) is not None:
        raise NotImplementedError("sliding-window attention (config.window_size) is not supported by the "
                                  "generation KV cache")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise NotImplementedError(f"softmax_type={config.softmax_type!r} is not supported by the generation KV "
                                  "cache (vanilla softmax only)")
    if getattr(config, "multi_latent_attention", False):
        raise NotImplementedError("multi-latent attention is not supported by the generation KV cache")


@contextmanager
def attach(module, cache, *, decode: bool = False):
    """Point this stage's attention cores at `cache` (a `generation.cache.KVCache`) and put its
    local linears in forward-only mode; megatron's own forward again on exit. No module is replaced:
    the model was built with these kernels (`generation_spec`, `install_output_layer`).

    `decode=True` (the generation loop: many forwards of one token per row) lets the linears use
    the CPU decode kernel (`native.linear_rows`) for 2 to 8 rows with one torch thread, and
    otherwise multiply by `[in, out]` copies of their weights on the CPU: MKL reads them faster
    for a few rows than nn.Linear's `[out, in]` (measured on one core, batch 8: 9% less matmul
    time for a 28M-parameter Llama, 31% for a 5M one; benchmarks/bench_generation.py). The
    copies, one more set of this stage's weights, are made only when used and live until
    detach. GPUs keep the stock layout (cuBLAS reads either at full speed), as does scoring
    (one forward: the copy would cost what it saves). Without the kernel (see
    `native.native_status`), decoding on the CPU says so once."""
    check_supported(module.config)
    if getattr(module.config, "sequence_parallel", False):
        raise RuntimeError("attach needs sequence parallelism off (run inside stage.inference_mode)")
    config = module.config
    cores = list(mcore.attention_cores(module))
    missing = sorted({type(core).__name__ for _, core in cores if not isinstance(core, KVCacheAttention)})
    if missing:
        raise RuntimeError(f"this model's core attention ({', '.join(missing)}) has no KV-cache path: build it with "
                           "megatron_opcd.models.build_model (its layer spec, models.spec.layer_spec, carries the "
                           "generation kernels)")
    transposed = decode and next(module.parameters()).device.type == "cpu"
    if transposed and torch.get_num_threads() == 1:
        native.announce_fallback()  # a no-op when the kernel runs
    mode = (transposed, transposed and native.native_status()[0])
    scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
    linears = [m for m in module.modules() if isinstance(m, ForwardOnlyLinear)]
    try:
        for layer_number, core in cores:
            core.kv_layer, core.kv_scale, core.kv_interleaved = layer_number, scale, bool(config.rotary_interleaved)
            core.kv_cache = cache
        for linear in linears:
            linear.forward_only = mode
        yield cache
    finally:  # back to megatron's forward; drop the [in, out] copies
        for _, core in cores:
            core.kv_cache = None
        for linear in linears:
            linear.forward_only, linear._copy = None, None
