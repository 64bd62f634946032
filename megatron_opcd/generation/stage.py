"""One forward of this rank's pipeline stage, with the generation KV cache (cache.py).

`forward_stage` runs megatron-core's own pieces of the `GPTModel` in the order its `forward` does
(embedding on the first stage, the `TransformerBlock` with its final norm, the output layer on the
last stage), with two differences that make a cache possible:

* RoPE by position, per row. `GPTModel.forward` builds one rotary table for slots 0..s-1 shared by
  every row; we hand the block a `[s, b, 1, d]` table gathered at each row's `position_ids`, so a
  key is rotated with its token's true position wherever its row keeps it in the cache (pads may
  sit between prefix and prompt). Learned absolute embeddings get the same `position_ids`.
* With a `KVCache`, the layers run their forward-only kernels (models/kernels.py, `attach`): the
  cache's attention rotates queries and keys itself (cos/sin computed once per forward, not per
  layer), and the output layer can run on the last position only.

Without a cache the layers run megatron's own core attention (`DotProductAttention`'s forward on
the CPU), which is what the tests compare the cached path against.

Masks are megatron's convention here, `[b, 1, sq, sk]` bool with True = masked; the cache turns
them into SDPA's additive mask once per forward (`KVCache.set_inputs`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.compat import mcore
from megatron_opcd.data.packing import response_rows
from megatron_opcd.generation.cache import KVCache
from megatron_opcd.models.kernels import attach
from megatron_opcd.parallel import ParallelGroups


def model_device(module) -> torch.device:
    return next(module.parameters()).device


def _pp_peer(groups: ParallelGroups, offset: int) -> int:
    return dist.get_global_rank(groups.pp_group, groups.pp_rank + offset)


@contextmanager
def inference_mode(model):
    """Unwrap megatron wrappers, switch to eval without grad, and turn sequence parallelism off
    (a one-token decode step cannot be split along the sequence); restore all of it afterwards.
    On the CPU the block also runs without the compat layer's per-op CUDA redirect (nothing here
    names CUDA; see `compat.cpu.redirect_suspended`)."""
    from megatron_opcd.checkpointing import unwrap
    from megatron_opcd.compat import redirect_suspended

    module = unwrap(model)
    was_training = module.training
    sp = bool(getattr(module.config, "sequence_parallel", False))
    if sp:
        mcore.set_sequence_parallel(module, False)
    module.eval()
    try:
        with torch.no_grad(), redirect_suspended():
            yield module
    finally:
        if sp:
            mcore.set_sequence_parallel(module, True)
        module.train(was_training)
        if module.pre_process is False:
            module.set_input_tensor(None)  # drop the last received activation


class Rope:
    """Rotary angles gathered per row at `position_ids` (None for models without RoPE).

    megatron's `RotaryEmbedding(n)` gives the angles of positions 0..n-1 (`[n, 1, 1, d]`, rope
    scaling and rotary_percent included); one table is built per call of `generate`/`score` and
    indexed every step, so a decode step computes nothing but a gather."""

    def __init__(self, module, max_positions: int):
        kind = getattr(module, "position_embedding_type", "rope")
        if kind not in ("rope", "learned_absolute", "none"):
            raise NotImplementedError(f"position_embedding_type={kind!r} is not supported by generation "
                                      "(rope, learned_absolute and none are)")
        self.table = None
        if kind == "rope":
            self.table = mcore.rotary_table(module, max_positions)  # [n, d]

    def __call__(self, position_ids: torch.Tensor) -> Optional[torch.Tensor]:
        if self.table is None:
            return None
        return self.table[position_ids.t()].unsqueeze(2)  # [b, s] -> [s, b, 1, d]


def forward_stage(
    module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    groups: ParallelGroups,
    rope: Rope,
    cache: Optional[KVCache] = None,
    gather: bool = True,
    last_only: bool = False,
    rows: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Run `tokens` ([b, s], the same on every rank) through this stage; hidden states travel
    stage to stage over `groups.pp_group`. Returns the logits `[b, s, V or V/tp]` (`[b, 1, ...]`
    with `last_only`) on the last stage, full vocabulary if `gather`; None elsewhere. With `rows`
    (`[R, b]` positions, negative ones read position 0) it returns `[R, b, ...]`: row t of column
    i holds the logits of position `rows[t, i]` of sequence i (the response-aligned layout the
    losses read). The output layer sees only the positions it returns.

    `attention_mask` is `[b, 1, s, sk]` bool, True = masked. With `cache` (attached to `module`
    with `models.kernels.attach`), the new keys/values go to slots `[cache.offset, +s)`, the mask covers
    `[0, cache.offset + s)`, and the offset is advanced here."""
    b, s = tokens.shape
    cfg = module.config
    rotary = rope(position_ids)  # [s, b, 1, rot_dim] angles, or None
    if cache is not None:  # what every KVCacheAttention of this forward shares, computed once
        heads_per_group = cfg.num_attention_heads // (cfg.num_query_groups or cfg.num_attention_heads)
        cache.set_inputs(attention_mask, rotary, heads_per_group, cfg.params_dtype)
        rotary = None  # the cache's attention rotates; megatron's layers must not rotate again
    if groups.is_first_stage:
        hidden = mcore.embed(module, tokens, position_ids)  # [s, b, h]
    else:
        hidden = torch.empty(s, b, cfg.hidden_size, dtype=cfg.pipeline_dtype or cfg.params_dtype,
                             device=tokens.device)  # [s, b, h]
        dist.recv(hidden, src=_pp_peer(groups, -1), group=groups.pp_group)
        module.set_input_tensor(hidden)  # the block reads a non-first stage's input from here
    out = mcore.run_decoder(module, hidden, attention_mask, rotary)  # [s, b, h]
    if cache is not None:
        cache.end_forward(s)
    if not groups.is_last_stage:
        dist.send(out.contiguous(), dst=_pp_peer(groups, +1), group=groups.pp_group)  # [s, b, h]
        return None
    if last_only:
        out = out[-1:]
    elif rows is not None:  # gather h numbers a position, not V: [s, b, h] -> [R, b, h]
        out = response_rows(out, rows)
    logits = mcore.output_logits(module, out, gather=gather)  # [s or R, b, V or V/tp]
    return logits if rows is not None else logits.transpose(0, 1).contiguous()  # [R, b, V] or [b, s, V]


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

    A query always sees its own slot, even a pad: a pad query row with every key masked would
    softmax to NaN under SDPA and write NaN into the next layer's cache. Its output is junk but
    finite and never used (real queries never see a pad key)."""
    sk = q_start + q_len
    q_slot = torch.arange(q_start, sk, device=key_valid.device)[:, None]  # [q, 1]
    k_slot = torch.arange(sk, device=key_valid.device)[None, :]  # [1, sk]
    masked = (k_slot > q_slot)[None] | (~key_valid[:, None, :sk] & (k_slot != q_slot)[None])  # [b, q, sk]
    return masked[:, None]  # [b, 1, q, sk]


@dataclass
class PrefixCache:
    """A shared prefix prefilled once (batch 1): its keys (rotated with positions 0..P-1) and values
    per attention layer of this stage and, on the last stage, the logits of its last position.
    Valid for the weights it was computed with; `generate` and `score` accept it in place of the
    prefix token list, so many batches can reuse one teacher context."""

    tokens: list[int]
    kv: dict  # layer_number -> (keys [1, g/tp, P, d], values [1, g/tp, P, d])
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
    cache = KVCache(1, p)
    tokens = torch.tensor([prefix], dtype=torch.long, device=device)  # [1, P]
    positions = torch.arange(p, device=device)[None]
    mask = causal_mask_with_keys(torch.ones(1, p, dtype=torch.bool, device=device), 0, p)
    with attach(module, cache):
        logits = forward_stage(module, tokens, positions, mask, groups=groups, rope=Rope(module, p), cache=cache,
                               last_only=True)
    last = logits[:, -1, :].clone() if logits is not None else None  # [1, V]
    return PrefixCache(tokens=prefix, kv=cache.prefix_kv(p), last_logits=last)
