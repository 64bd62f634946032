"""The vocabulary as tensor parallelism splits it, and the one vocab-parallel log-softmax.

Rank r of a TP group holds the global columns `[r v/tp, (r + 1) v/tp)` of the padded vocabulary
(megatron's vocab-parallel output layer); the columns at or past the true vocabulary size are
embedding padding, never a token. `VocabShard` is that one rule (`real_columns`), used by the
divergences, by `vocab_parallel_token_logprobs` (the generation path's scoring) and, through
`mask_padded_vocab`, by SeqKD's cross-entropy.

The log-softmax normaliser is the divergences' own: each rank reduces its real columns to
log-sum-exp partials (max, sum exp), one all-gather carries them, and every rank merges them
locally in rank order in fp64 (`functional.lse_partials`, `functional.merge_lse`), so every rank
gets bitwise the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import megatron_opcd.losses.functional as M


def real_columns(v_local: int, tp_rank: int, vocab_size: Optional[int]) -> int:
    """How many of shard `tp_rank`'s `v_local` columns are real tokens (global id < vocab_size):
    the first ones; none on a rank that holds only padding. vocab_size None: all of them."""
    if vocab_size is None:
        return v_local
    return max(0, min(v_local, vocab_size - tp_rank * v_local))


def mask_padded_vocab(logits: torch.Tensor, tp_rank: int, vocab_size: Optional[int]) -> torch.Tensor:
    """`[..., v/tp]` -> a new tensor, the same with the padding columns at -inf, for a consumer
    that needs the full-width shard (the caller's logits stay untouched, even without padding)."""
    n = real_columns(logits.shape[-1], tp_rank, vocab_size)
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= n, float("-inf"))


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the (padded) vocabulary: columns [start, start + v_local) globally,
    of which the first `n_valid` are real tokens (global index < the true vocabulary size)."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    v_local: int
    start: int
    n_valid: int
    vocab_size: int

    @staticmethod
    def of(v_local: int, group, vocab_size: Optional[int]) -> "VocabShard":
        size = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        padded = v_local * size
        true_v = padded if vocab_size is None else vocab_size
        if true_v > padded:
            raise ValueError(f"vocab_size={vocab_size} exceeds the padded vocabulary {size} x {v_local} = {padded}")
        n_valid = real_columns(v_local, rank, true_v)
        return VocabShard(group if size > 1 else None, rank, size, v_local, rank * v_local, n_valid, true_v)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """`[tp, *t.shape]`, every rank's `t` in rank order."""
        if self.group is None:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def all_reduce_owned(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of tensors in which each entry is nonzero on at most one rank: exact in any order."""
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t


@torch.no_grad()
def vocab_parallel_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """log softmax(logits)[target] over the vocabulary split across `tp_group` (no grad).

    logits: `[..., v/tp]` this rank's shard of the padded vocabulary; targets: `[...]` global ids
    (real tokens). Padding columns are excluded from the normaliser. Returns `[...]` fp32, the same
    on every rank (computed in fp64 from fp32 partials)."""
    v_local = logits.shape[-1]
    shard = VocabShard.of(v_local, tp_group, vocab_size)
    z = logits.reshape(-1, v_local)  # [T, v/tp]; a view for contiguous input
    t = targets.reshape(-1)
    # A private fp32 copy of the real columns: lse_partials overwrites its input.
    m, s = M.lse_partials(z[:, : shard.n_valid].to(torch.float32, copy=True))
    g = shard.all_gather(torch.stack([m, s], dim=-1).double())  # [tp, T, 2]
    log_z = M.merge_lse(g[..., 0], g[..., 1])  # [T] fp64
    owned = (t >= shard.start) & (t < shard.start + shard.n_valid)
    col = (t - shard.start).clamp(0, v_local - 1)
    picked = shard.all_reduce_owned(z.gather(-1, col[:, None]).squeeze(-1).double().where(owned, 0.0))
    return (picked - log_z).float().view(targets.shape)
