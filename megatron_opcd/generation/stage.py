"""One forward of this rank's pipeline stage, with megatron-core's static KV cache.

What megatron-core 0.16.1 offers and what this module adds (details: docs/generation.md):

* `StaticInferenceContext(max_batch, max_seq)` is the KV cache. Each attention layer allocates
  `[max_seq, max_batch, groups/tp, head_dim]` key and value buffers on first use, writes the new
  keys/values at `[sequence_len_offset : +s]` and attends over `[: sequence_len_offset + s]`.
  The caller advances `sequence_len_offset`. It runs on the CPU (the dynamic engine does not).
* The cache stores keys *before* RoPE; RoPE is applied to all cached keys at every step, with
  the rotation of the cache *slot*, not of `position_ids` (which only feed learned absolute
  embeddings). Every row shares one slot offset, so a row left-padded by `pad` is rotated as if
  its tokens sat `pad` positions later; RoPE depends on distances only, so that is exact as long
  as the whole row (prefix included) is shifted by the same amount, which is how loop.py lays
  out a batch.
* In inference mode (`inference_context` given, model in eval) the model insists on
  `runtime_gather_output=True` (full-vocabulary logits on every TP rank) and, with the static
  context's default `materialize_only_last_token_logits`, returns the last position only.
* The local `DotProductAttention` ignores `attn_mask_type` and applies the `attention_mask` it
  is given as `masked_fill(mask, -10000)`; when the cache is past offset 0, megatron switches
  the mask type to `no_mask`, which changes nothing for the local path. We always pass an
  explicit boolean mask `[b, 1, sq, sk]` (True = masked) covering the whole cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.parallel import ParallelGroups


def model_device(module) -> torch.device:
    return next(module.parameters()).device


def _pp_peer(groups: ParallelGroups, offset: int) -> int:
    return dist.get_global_rank(groups.pp_group, groups.pp_rank + offset)


@contextmanager
def inference_mode(model):
    """Unwrap megatron wrappers, switch to eval without grad, and turn sequence parallelism off
    (a one-token decode step cannot be split along the sequence); restore all of it afterwards."""
    from megatron_opcd.checkpointing import unwrap

    module = unwrap(model)
    was_training = module.training
    sp = bool(getattr(module.config, "sequence_parallel", False))
    if sp:
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        set_model_to_sequence_parallel(module, False)
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        if sp:
            set_model_to_sequence_parallel(module, True)
        module.train(was_training)
        if module.pre_process is False:
            module.set_input_tensor(None)  # drop the last received activation


def new_context(max_batch: int, max_seq: int, *, last_token_only: bool = True):
    """megatron-core's static KV cache for `max_batch` rows of up to `max_seq` tokens."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ctx = StaticInferenceContext(max_batch, max_seq)
    ctx.materialize_only_last_token_logits = last_token_only
    return ctx


def forward_stage(
    module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    groups: ParallelGroups,
    ctx=None,
    gather: bool = True,
) -> Optional[torch.Tensor]:
    """Run `tokens` ([b, s], the same on every rank) through this stage; hidden states travel
    stage to stage over `groups.pp_group`. Returns the logits `[b, s or 1, V or V/tp]` on the last
    stage (full vocabulary if `gather` or `ctx` is given), None elsewhere.

    With `ctx`, the new keys/values go to cache slots `[ctx.sequence_len_offset : +s]` and the
    mask must cover `[0, offset + s)`; the caller advances the offset."""
    b, s = tokens.shape
    if not groups.is_first_stage:
        cfg = module.config
        hidden = torch.empty(s, b, cfg.hidden_size, dtype=cfg.pipeline_dtype or cfg.params_dtype,
                             device=tokens.device)  # [s, b, h]
        dist.recv(hidden, src=_pp_peer(groups, -1), group=groups.pp_group)
        module.set_input_tensor(hidden)
    out = module(
        tokens,
        position_ids,
        attention_mask,
        inference_context=ctx,
        runtime_gather_output=True if (gather or ctx is not None) else None,
    )
    if not groups.is_last_stage:
        dist.send(out.contiguous(), dst=_pp_peer(groups, +1), group=groups.pp_group)  # [s, b, h]
        return None
    return out


def broadcast_from_last_stage(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Make `t` (meaningful on the last stage) identical on every rank of the model: first from TP
    rank 0 of the last stage to its TP peers (they computed the same thing; this makes it certain),
    then from the last stage down the pipeline."""
    if groups.is_last_stage and groups.tp_size > 1:
        dist.broadcast(t, src=groups.tp_src_global_rank, group=groups.tp_group)
    if groups.pp_size > 1:
        dist.broadcast(t, src=_pp_peer(groups, groups.pp_size - 1 - groups.pp_rank), group=groups.pp_group)
    return t


def causal_mask_with_keys(key_valid: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """[b, 1, q_len, q_start + q_len] bool, True = masked: keys that are padding (`key_valid`
    False, `[b, >= q_start + q_len]`) or in the future of query slot `q_start + j`.

    A query row whose keys are all masked (a pad slot before any real token) softmaxes over
    -10000 everywhere, which stays finite; its output is never used."""
    sk = q_start + q_len
    q_slot = torch.arange(q_start, sk, device=key_valid.device)[:, None]  # [q, 1]
    future = torch.arange(sk, device=key_valid.device)[None, :] > q_slot  # [q, sk]
    return (future[None] | ~key_valid[:, None, :sk])[:, None]  # [b, 1, q, sk]


@dataclass
class PrefixCache:
    """A shared prefix prefilled once (batch 1): its keys/values per attention layer of this
    stage and, on the last stage, the logits of its last position. Valid for the weights it was
    computed with; `generate` and `score` accept it in place of the prefix token list, so many
    batches can reuse one teacher context."""

    tokens: list[int]
    kv: dict  # layer_number -> (keys [P, 1, g/tp, d], values [P, 1, g/tp, d])
    last_logits: Optional[torch.Tensor]  # [1, V_padded] full vocabulary, last stage only

    def __len__(self) -> int:
        return len(self.tokens)


def prefill_prefix(model, prefix: list[int], *, groups: ParallelGroups) -> PrefixCache:
    """Prefill `prefix` once and keep its KV cache (call on every rank of the model)."""
    if not prefix:
        raise ValueError("prefill_prefix needs a non-empty prefix")
    with inference_mode(model) as module:
        return _prefill_prefix(module, list(prefix), groups)


def _prefill_prefix(module, prefix: list[int], groups: ParallelGroups) -> PrefixCache:
    device = model_device(module)
    p = len(prefix)
    ctx = new_context(1, p)
    tokens = torch.tensor([prefix], dtype=torch.long, device=device)  # [1, P]
    positions = torch.arange(p, device=device)[None]
    mask = causal_mask_with_keys(torch.ones(1, p, dtype=torch.bool, device=device), 0, p)
    logits = forward_stage(module, tokens, positions, mask, groups=groups, ctx=ctx)
    kv = {layer: (k[:p].clone(), v[:p].clone()) for layer, (k, v) in ctx.key_value_memory_dict.items()}
    last = logits[:, -1, :].clone() if logits is not None else None  # [1, V]
    return PrefixCache(tokens=prefix, kv=kv, last_logits=last)


def context_with_prefix(prefix: PrefixCache, batch: int, max_seq: int, *, row_offsets=None,
                        last_token_only: bool = True):
    """A fresh static context for `batch` rows with `sequence_len_offset = P`, the prefix's keys and
    values copied in: row i gets prefix tokens [0, P - off_i) at slots [off_i, P) (`row_offsets`,
    default 0: the whole prefix at [0, P)); the rest of a shifted row's prefix lies at or after
    slot P and is computed by the next forward. The buffers are allocated here with the shapes the
    attention layers would allocate ([max_seq, batch, g/tp, d]), zeroed: pad slots are masked, but
    0 x NaN from uninitialised memory would still poison the attention output."""
    ctx = new_context(batch, max_seq, last_token_only=last_token_only)
    p = len(prefix)
    offsets = list(row_offsets) if row_offsets is not None else [0] * batch
    for layer, (k, v) in prefix.kv.items():
        kbuf = k.new_zeros((max_seq, batch) + tuple(k.shape[2:]))
        vbuf = v.new_zeros((max_seq, batch) + tuple(v.shape[2:]))
        if not any(offsets):
            kbuf[:p] = k  # [P, 1, ...] broadcast to every row
            vbuf[:p] = v
        else:
            for i, off in enumerate(offsets):
                n = max(p - off, 0)
                kbuf[off : off + n, i] = k[:n, 0]
                vbuf[off : off + n, i] = v[:n, 0]
        ctx.key_value_memory_dict[layer] = (kbuf, vbuf)
    ctx.sequence_len_offset = p
    return ctx
