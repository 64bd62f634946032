"""Vocab-parallel distillation divergences (docs/losses.md).

`vocab_parallel_divergence` computes the per-token reverse KL (OPCD's loss), forward KL or
generalised JSD, exactly or over a top-k index set, with the vocabulary sharded across tensor
parallel ranks; `DivergenceLoss` masks and averages it into megatron-core's loss contract.
"""

from megatron_opcd.losses.divergence import DivergenceSpec, vocab_parallel_divergence
from megatron_opcd.losses.wrapper import DistillationLoss, DivergenceLoss, bind_loss_func, masked_sums

__all__ = [
    "DistillationLoss",
    "DivergenceLoss",
    "DivergenceSpec",
    "bind_loss_func",
    "masked_sums",
    "vocab_parallel_divergence",
]
