"""What the student minimises, injected into the trainer (STYLE habit 4).

The trainer calls `objective(student_logits, micro)` on the last pipeline stage, where
`student_logits` is this rank's vocab shard aligned to the response tokens, `[R, b, v/tp]`, and
`micro` carries the teacher's aligned logits, the response tokens and the mask. It returns
megatron-core's `(loss_sum, num_units, metrics)`. A new objective is a new class, never an `if`
in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from megatron_opcd.losses import DivergenceLoss, mask_padded_vocab, masked_sums


@dataclass
class MicroBatch:
    """One micro-batch of the student update, identical on every rank of a DP replica."""

    packed: object
    """data.packing.PackedBatch of the student's [prompt; response] rows."""
    teacher_logits: Optional[torch.Tensor]
    """[R, b, v/tp] teacher logits aligned to the responses (last stage; None for SFT)."""

    @property
    def response_mask(self) -> torch.Tensor:
        return self.packed.response_mask

    @property
    def response_tokens(self) -> torch.Tensor:
        return self.packed.response_tokens


class Objective(Protocol):
    needs_teacher_logits: bool
    metric_names: tuple[str, ...]
    """Keys of the metrics dict it returns, each a tensor([sum, count])."""

    def __call__(self, student_logits: torch.Tensor, micro: MicroBatch): ...


class DistillationObjective:
    """A vocab-parallel divergence between the student and the teacher (OPCD, off-policy CD)."""

    needs_teacher_logits = True

    def __init__(self, loss: DivergenceLoss):
        self.loss = loss
        self.metric_names = loss.metric_names  # with the top-k diagnostics' when they are on

    def __call__(self, student_logits, micro: MicroBatch):
        return self.loss(student_logits, micro.teacher_logits, micro.response_mask)


class SequenceKDObjective:
    """SeqKD: cross-entropy on the teacher's sampled responses (vocab-parallel, megatron's)."""

    needs_teacher_logits = False
    metric_names = ("distill loss", "ce per token")

    def __init__(self, *, average: str = "sequence", vocab_size: Optional[int] = None, tp_group=None):
        self.average = average
        self.vocab_size = vocab_size
        self.tp_group = tp_group

    def __call__(self, student_logits, micro: MicroBatch):
        # megatron-core's own vocab-parallel cross-entropy, not losses/vocab.py's log-softmax:
        # SeqKD is plain next-token training, which the framework's cross-entropy (forward and its
        # own backward) already is; ours is forward-only (scoring), and a second backward for the
        # same loss would be ours to keep right. Only the padding rule is ours.
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        rank = torch.distributed.get_rank(self.tp_group) if self.tp_group is not None else 0
        # Padded vocabulary columns (global id >= vocab_size) must not take probability mass; a new
        # tensor either way, since megatron's cross-entropy works in place on its input.
        logits = mask_padded_vocab(student_logits.float(), rank, self.vocab_size)
        ce = vocab_parallel_cross_entropy(logits, micro.response_tokens.to(logits.device))  # [R, b]
        loss_sum, units = masked_sums(ce, micro.response_mask, self.average, seq_dim=0)
        with torch.no_grad():
            tok_sum, tokens = masked_sums(ce.detach(), micro.response_mask, "token", seq_dim=0)
        metrics = {
            "distill loss": torch.cat([loss_sum.detach().view(1), units.view(1).to(loss_sum.dtype)]),
            "ce per token": torch.cat([tok_sum.view(1), tokens.view(1).to(tok_sum.dtype)]),
        }
        return loss_sum, units, metrics


def build_objective(cfg, *, vocab_size: int, tp_group) -> Objective:
    """The objective a TrainConfig asks for."""
    if cfg.algorithm.name == "seqkd":
        return SequenceKDObjective(average=cfg.loss.average, vocab_size=vocab_size, tp_group=tp_group)
    loss = DivergenceLoss(cfg.divergence(vocab_size), average=cfg.loss.average, batch_first=False, tp_group=tp_group,
                          diagnostics=cfg.loss.build_diagnostics())
    return DistillationObjective(loss)
