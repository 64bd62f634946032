"""Diagnostics of a top-k divergence: does the index set I still carry the distributions?

Per response token, with I the loss's index set (the student's top-k for OPCD) and p_s, p_t the
full-vocabulary softmaxes of the temperature-scaled logits:

    topk teacher mass            sum_{i in I} p_t(i)                 the teacher's mass on I
    topk student mass outside    1 - sum_{i in I} p_s(i)             the student's mass outside I
    teacher argmax outside topk  [max_{i in I} z_t(i) < max_j z_t(j)]  the teacher's top token is not in I
    sampled topk kl              the loss's own value on a strided sample of response positions
    sampled exact kl             the same divergence over the whole vocabulary on those positions

The first three come from the loss's own forward (`TopkStats`: the logits at I, both normalisers
and the teacher's maximum are already there), with no extra pass over the vocabulary and no extra
collective. The sampled pair runs the exact path on `sample_tokens` rows gathered from this
rank's shard (`[n, v/tp]`, small): its own two collectives, nothing gathered across the
vocabulary. Everything is under no_grad and identical on every TP rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.losses.divergence import DivergenceSpec, TopkStats, vocab_parallel_divergence

NAMES = ("topk teacher mass", "topk student mass outside", "teacher argmax outside topk",
         "sampled topk kl", "sampled exact kl")
"""The reporting names (the trainer logs them with `_` for spaces: topk_teacher_mass, ...)."""


@dataclass(frozen=True)
class DiagnosticsSpec:
    """What the diagnostics sample and when they warn: the one declaration of these settings (the
    trainer's `loss.diagnostic_tokens` and `loss.warn_teacher_mass` refer to these defaults)."""

    sample_tokens: int = 32
    """Response positions per micro-batch (evenly strided over the masked ones) on which the top-k
    value is compared with the exact divergence; 0: no sample (the other three still run)."""

    warn_teacher_mass: float = 0.5
    """A warning is logged when the mean teacher mass on I falls below this: the top-k loss then
    ignores most of what the teacher says (0: never warn)."""

    def __post_init__(self):
        if isinstance(self.sample_tokens, bool) or self.sample_tokens < 0:
            raise ValueError(f"diagnostic_tokens={self.sample_tokens!r}: use a number of positions >= 0")
        if not 0.0 <= self.warn_teacher_mass <= 1.0:
            raise ValueError(f"warn_teacher_mass={self.warn_teacher_mass!r}: a probability mass lies in [0, 1]")


def sample_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Up to `n` flat indices of true entries of `mask`, evenly strided (deterministic, so every TP
    rank picks the same rows with no communication)."""
    where = mask.reshape(-1).nonzero().squeeze(-1)
    n = min(n, where.numel())
    return where[(torch.arange(n, device=where.device) * where.numel()) // max(n, 1)]


def _pair(total: torch.Tensor, count) -> torch.Tensor:
    return torch.stack([total.double().reshape(()), torch.as_tensor(count, dtype=torch.float64).reshape(())])


@torch.no_grad()
def topk_diagnostics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    per_token: torch.Tensor,
    stats: TopkStats,
    mask: torch.Tensor,
    spec: DivergenceSpec,
    diagnostics: DiagnosticsSpec = DiagnosticsSpec(),
    tp_group: Optional[dist.ProcessGroup] = None,
) -> dict[str, torch.Tensor]:
    """`{name: tensor([sum, count])}` (fp64) over the positions where `mask` is true.

    `per_token` and `stats` are what `vocab_parallel_divergence(student_logits, teacher_logits,
    spec, tp_group, stats=stats)` returned and filled (top-k spec); `mask` has `per_token`'s shape.
    Call on every rank of `tp_group` (the sampled exact divergence has collectives)."""
    m = mask.reshape(-1).bool()
    cols = stats.per_token()  # [T, 3]
    n_tok = int(m.sum())
    out = {name: _pair(cols[:, i].to(m.device)[m].sum(), n_tok) for i, name in enumerate(NAMES[:3])}
    pick = sample_positions(m, diagnostics.sample_tokens)
    v_local = student_logits.shape[-1]
    exact = torch.zeros(0, dtype=torch.float64)
    if pick.numel():
        rows = [z.detach().reshape(-1, v_local).index_select(0, pick) for z in (student_logits, teacher_logits)]
        exact = vocab_parallel_divergence(*rows, dataclasses.replace(spec, topk=None), tp_group).double()
    out["sampled topk kl"] = _pair(per_token.detach().reshape(-1).index_select(0, pick).double().sum(), pick.numel())
    out["sampled exact kl"] = _pair(exact.sum(), pick.numel())
    return out


def warning_line(metrics: dict, diagnostics: DiagnosticsSpec, where: str) -> Optional[str]:
    """The warning to log when the reduced `topk_teacher_mass` is below the threshold, else None."""
    mass = metrics.get("topk_teacher_mass")
    if mass is None or not mass < diagnostics.warn_teacher_mass:  # nan (no tokens) never warns
        return None
    return (f"[megatron-opcd] warning: {where}: the teacher's mass on the student's top-k is {mass:.3f} < "
            f"loss.warn_teacher_mass={diagnostics.warn_teacher_mass} (student mass outside its top-k "
            f"{metrics.get('topk_student_mass_outside', float('nan')):.3f}, teacher argmax outside "
            f"{metrics.get('teacher_argmax_outside_topk', float('nan')):.3f}); the top-k loss misses most of "
            "the teacher: raise loss.topk or use loss.topk_from=union")
