"""Vocab-parallel distillation divergences (docs/losses.md).

`vocab_parallel_divergence` computes the per-token reverse KL (OPCD's loss), forward KL or
generalised JSD, exactly or over a top-k index set, with the vocabulary sharded across tensor
parallel ranks; `DivergenceLoss` masks and averages it into megatron-core's loss contract.
`vocab.py` holds the vocabulary's TP split (which columns are padding) and the one vocab-parallel
log-softmax, which the generation path's scoring uses too.
"""

from megatron_opcd.losses.diagnostics import DiagnosticsSpec, topk_diagnostics
from megatron_opcd.losses.divergence import DivergenceSpec, TopkStats, vocab_parallel_divergence
from megatron_opcd.losses.vocab import mask_padded_vocab, vocab_parallel_token_logprobs
from megatron_opcd.losses.wrapper import DistillationLoss, DivergenceLoss, bind_loss_func, masked_sums

__all__ = [
    "DiagnosticsSpec",
    "DistillationLoss",
    "DivergenceLoss",
    "DivergenceSpec",
    "TopkStats",
    "bind_loss_func",
    "mask_padded_vocab",
    "masked_sums",
    "topk_diagnostics",
    "vocab_parallel_divergence",
    "vocab_parallel_token_logprobs",
]
