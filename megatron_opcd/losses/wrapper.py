"""The distillation loss as megatron-core's pipeline schedule expects it.

The trainer takes any `DistillationLoss` (STYLE habit 4): a callable from (student logits, teacher
logits, response mask) to megatron-core's 3-tuple `(loss_sum, num_units, reporting dict)`.
`bind_loss_func` turns one into the `loss_func(output_tensor)` that a `forward_step_func` returns.

megatron-core 0.16.1's contract (pipeline_parallel/schedules.py, `forward_step_calc_loss`): with a
3-tuple, the schedule divides `loss_sum` by `num_units` and by the number of microbatches unless
`config.calculate_per_token_loss` is set; with it set, the schedule leaves the sum alone and
`finalize_model_grads` divides the gradients by the number of units summed over microbatches and
data-parallel ranks. This module never divides by either itself (STYLE habit 3). The "unit" is
what the loss averages over: a response token (`average="token"`), or a sequence
(`average="sequence"`, the paper's 1/|y| sum_t per sequence, then the mean over sequences; a
sequence contributes `1/|y| sum_t d_t` to `loss_sum` and 1 to `num_units`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_opcd.losses.diagnostics import NAMES as DIAGNOSTIC_NAMES
from megatron_opcd.losses.diagnostics import DiagnosticsSpec, topk_diagnostics
from megatron_opcd.losses.divergence import DivergenceSpec, TopkStats, vocab_parallel_divergence

AVERAGES = ("sequence", "token")

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class DistillationLoss(Protocol):
    """A distillation loss in megatron-core's per-unit form.

    `student_logits`, `teacher_logits`: this rank's vocabulary shard, `[s, b, v/tp]` (or
    `[b, s, v/tp]` where the implementation says so); `response_mask`: `[s, b]` (resp. `[b, s]`),
    true on the positions whose divergence counts (response tokens; never prompt, context or
    padding). Returns `(loss_sum, num_units, metrics)`: a scalar fp32 loss summed over units, the
    int number of units, and `{name: tensor([sum, count])}` for logging.
    """

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_mask: torch.Tensor
    ) -> LossOutput: ...


def masked_sums(per_token: torch.Tensor, mask: torch.Tensor, average: str, seq_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss_sum, num_units)` of `per_token` `[s, b]` over the positions where `mask` is true.

    `average="token"`: the sum over masked tokens and their count. `average="sequence"`: the sum
    over sequences of each sequence's masked mean (`seq_dim` is the position axis), and the number
    of sequences with at least one masked position (an empty response adds nothing to either).
    """
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}: use one of {AVERAGES}")
    if per_token.shape != mask.shape:
        raise ValueError(f"response mask {tuple(mask.shape)} must have the per-token shape {tuple(per_token.shape)}")
    maskf = mask.to(per_token.dtype)
    # where, not multiply: a masked-out position's value never reaches the sum, even if non-finite.
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if average == "token":
        return masked.sum(), maskf.sum().to(torch.int)
    lengths = maskf.sum(dim=seq_dim)  # [b]: |y| per sequence
    per_seq = masked.sum(dim=seq_dim) / lengths.clamp(min=1)
    return per_seq.sum(), (lengths > 0).sum().to(torch.int)


@dataclass
class DivergenceLoss:
    """`DistillationLoss` from `vocab_parallel_divergence`, OPCD's default (top-256 reverse KL over
    the student's top-k, per-sequence average)."""

    spec: DivergenceSpec = DivergenceSpec()
    """What divergence to compute (its fields and defaults are declared there, once)."""
    average: str = "sequence"
    """sequence: 1/|y| sum_t per sequence, then the mean over sequences (the paper); token: the mean over tokens."""
    batch_first: bool = False
    """False: logits `[s, b, v/tp]`, mask `[s, b]`; True: `[b, s, v/tp]` (GPTModel's output), mask `[b, s]`."""
    tp_group: Optional[dist.ProcessGroup] = None
    """The tensor-parallel group; None = no tensor parallelism."""
    diagnostics: Optional[DiagnosticsSpec] = None
    """Top-k only: also report the top-k diagnostics (losses/diagnostics.py) in the metrics; None: off."""

    def __post_init__(self):
        if self.average not in AVERAGES:
            raise ValueError(f"average={self.average!r}: use one of {AVERAGES}")
        if self.diagnostics is not None and self.spec.topk is None:
            raise ValueError("diagnostics describe a top-k loss: the spec has topk=None (exact)")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys of the metrics dict `__call__` returns."""
        extra = DIAGNOSTIC_NAMES if self.diagnostics is not None else ()
        return ("distill loss", f"{self.kind} per token", *extra)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The divergence per position, `[s, b]` (or `[b, s]`), before masking."""
        return vocab_parallel_divergence(student_logits, teacher_logits, self.spec, self.tp_group)

    def __call__(self, student_logits, teacher_logits, response_mask) -> LossOutput:
        stats = TopkStats() if self.diagnostics is not None else None
        d = vocab_parallel_divergence(student_logits, teacher_logits, self.spec, self.tp_group, stats=stats)
        loss_sum, units = masked_sums(d, response_mask, self.average, seq_dim=1 if self.batch_first else 0)
        with torch.no_grad():
            tok_sum, tokens = masked_sums(d.detach(), response_mask, "token", seq_dim=0)
        metrics = {
            # megatron's reporting convention (pretrain_gpt.py): [sum, count], all-reduced over DP
            # by the training loop and divided there.
            "distill loss": torch.cat([loss_sum.detach().view(1), units.view(1).to(loss_sum.dtype)]),
            f"{self.kind} per token": torch.cat([tok_sum.view(1), tokens.view(1).to(tok_sum.dtype)]),
        }
        if stats is not None:
            metrics.update(topk_diagnostics(student_logits, teacher_logits, d, stats, response_mask, self.spec,
                                            self.diagnostics, self.tp_group))
        return loss_sum, units, metrics


def bind_loss_func(
    loss: DistillationLoss, teacher_logits: torch.Tensor, response_mask: torch.Tensor
) -> Callable[[torch.Tensor], LossOutput]:
    """The `loss_func(output_tensor)` for a `forward_step_func`'s return value: the student's
    logits arrive as the schedule's `output_tensor`; the teacher's and the mask are bound here."""

    def loss_func(output_tensor: torch.Tensor) -> LossOutput:
        return loss(output_tensor, teacher_logits, response_mask)

    return loss_func
