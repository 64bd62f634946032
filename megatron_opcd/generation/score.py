"""Scoring: the logits (or log-probs) a model assigns to given responses, on the generation path.

`score` packs `[prompt; response]` rows with `megatron_opcd.data.packing.pack` (the layout the
trainer and the loss use), runs them through `stage.forward_stage` (the same stage forward, PP
transport and KV cache as `generate`), the output layer on the packing's response positions only
(`response_index`, gathered from the hidden states), so row t of the result is the distribution
that predicts response token t. With a prefix (the teacher's
privileged context), the prefix is prefilled once at batch 1 (`stage.prefill_prefix`), its cache
copied to every row, and the packed batch runs after it at slot offset P.

No gradients: this is the teacher's pass (and evaluation). The student's forward with gradients
runs through megatron's schedule with the same packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_opcd.data.packing import pack, pack_segments
from megatron_opcd.generation.cache import KVCache
from megatron_opcd.generation.stage import PrefixCache, Rope, _prefill_prefix, forward_stage, inference_mode, model_device
from megatron_opcd.losses.vocab import vocab_parallel_token_logprobs
from megatron_opcd.models.kernels import attach
from megatron_opcd.parallel import ParallelGroups


@dataclass
class ScoreOutput:
    logits: Optional[torch.Tensor]
    """[R, b, V/tp] this rank's vocabulary shard, row t predicting response token t; on the last
    pipeline stage only (None elsewhere). Rows past a response's end are junk: use `mask`."""

    logprobs: Optional[torch.Tensor]
    """[R, b] fp32 log p(response token t), normalised over the full (unpadded) vocabulary across
    TP; 0 where masked. Last stage only, and only with `return_logprobs`."""

    mask: torch.Tensor
    """[R, b] float32: 1 for real response tokens (on every rank)."""


def score(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    groups: ParallelGroups,
    prefix=None,
    return_logprobs: bool = False,
    vocab_size: Optional[int] = None,
    pad_id: int = 0,
    segments=None,
) -> ScoreOutput:
    """Logits (and optionally log-probs) at the response positions of `[prefix; prompt; response]`.

    Call on every rank of the model's TP x PP group with the same arguments. `prefix` is token
    ids or a `PrefixCache` (see `prefill_prefix`) shared by every row. `segments` (instead of
    prompts/responses) scores multi-turn rows: the trained segments are the "response". Without a prefix every
    prompt needs at least one token. The model comes back in the train/eval mode it had.
    """
    prefix_cache = prefix if isinstance(prefix, PrefixCache) else None
    prefix_ids = list(prefix_cache.tokens if prefix_cache is not None else (prefix or []))
    p = len(prefix_ids)
    if segments is not None:  # multi-turn rows: (token_ids, trained) segments, see data.packing.pack_segments
        packed = pack_segments(segments, pad_id=pad_id, position_offset=p)
    else:
        packed = pack(prompts, responses, pad_id=pad_id, position_offset=p)
    with inference_mode(model) as module:
        device = model_device(module)
        tokens = packed.tokens.to(device)  # [b, S]
        positions = packed.position_ids.to(device)
        b, s = tokens.shape
        mask = packed.attention_mask.to(device)  # [b, 1, S, S] causal + padding within each row
        cache = KVCache(b, p + s)
        if p:
            if prefix_cache is None:
                prefix_cache = _prefill_prefix(module, prefix_ids, groups)
            cache.load_prefix(prefix_cache.kv, p, shared=True)  # one copy for all rows (cascade attention)
            # Every row sees the whole prefix, then causal + padding within its own row.
            mask = torch.cat([torch.zeros(b, 1, s, p, dtype=torch.bool, device=device), mask], dim=-1)
        index = packed.response_index.to(device)  # [R, b]: the output layer computes only these positions
        with attach(module, cache):
            aligned = forward_stage(module, tokens, positions, mask, groups=groups, rope=Rope(module, p + s),
                                    cache=cache, gather=False, rows=index)  # [R, b, V/tp]
    mask = packed.response_mask.to(device)  # where the logits are
    if aligned is None:
        return ScoreOutput(logits=None, logprobs=None, mask=mask)
    if prefix_cache is not None and bool((index < 0).any()):  # an empty prompt: the prefix's last position
        aligned = torch.where((index < 0)[:, :, None], _shard(prefix_cache.last_logits, groups)[None], aligned)
    logprobs = None
    if return_logprobs:
        logprobs = vocab_parallel_token_logprobs(aligned, packed.response_tokens.to(device), groups.tp_group,
                                                 vocab_size) * mask
    return ScoreOutput(logits=aligned, logprobs=logprobs, mask=mask)


def _shard(full: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[..., V] -> [..., V/tp], this TP rank's slice (megatron's vocab-parallel order)."""
    part = full.shape[-1] // groups.tp_size
    return full[..., groups.tp_rank * part : (groups.tp_rank + 1) * part].contiguous()
