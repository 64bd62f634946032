"""Load-balance statistics of a mixture-of-experts model's routers, for the trainer's metrics.

`RouterStats(model)` hooks every router of this pipeline stage (megatron-core's `TopKRouter`,
found through `compat.mcore.moe_routers`) and, while the model trains with gradients on (the
student's update; never a rollout, a teacher or an evaluation), adds up per layer: the tokens
routed to each expert (`n_i`, from the routing map), the router's softmax probability mass per
expert (`P_i`, the scores megatron's load-balancing loss uses) and the tokens seen (`T`).
`reduce()` sums them over every rank (each rank routes its own tokens: its data-parallel share,
and under sequence parallelism its slice of the sequence; pipeline stages fill their own layers)
and `load_balance_metrics` turns the sums into the step's metrics:

  moe_aux_loss            mean over layers of E / (k T^2) * sum_i P_i n_i: megatron's
                          `switch_load_balancing_loss_func` without its coefficient (1 when
                          balanced), over the step's tokens on all ranks. megatron applies it per
                          micro-batch and data-parallel rank (the "aux_loss" type); this is the
                          step-level value, the same at every layout.
  moe_expert_share_max    largest share n_i / sum(n) of any expert in any layer (balanced: 1/E)
  moe_expert_share_min    smallest share (0: an expert got no token this step)
  moe_expert_share_cv     mean over layers of the coefficient of variation (std / mean) of n_i

Every position the forward runs counts, padding included (megatron's router sees them too).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.compat import mcore


class RouterStats:
    """Per-layer routing sums of a model stage's routers (see the module docstring)."""

    def __init__(self, model, *, num_layers: int, num_experts: int, topk: int):
        self.num_layers, self.num_experts, self.topk = num_layers, num_experts, topk
        # [layers, 2E + 1]: n_i, P_i, T per global layer (float64: counts stay exact)
        self.sums = torch.zeros(num_layers, 2 * num_experts + 1, dtype=torch.float64)
        self._handles = [router.register_forward_hook(self._hook(layer - 1))
                         for layer, router in mcore.moe_routers(model)]

    def _hook(self, layer: int):
        def record(router, args, output):
            if not (router.training and torch.is_grad_enabled()):
                return  # rollouts, teacher scoring, evaluation: not the update
            hidden = args[0]
            with torch.no_grad():
                logits = router.gating(hidden).float()  # [tokens, E]: the router's own gating again
                scores = torch.softmax(logits.view(-1, self.num_experts), dim=-1)
                routed = output[1].view(-1, self.num_experts)  # [tokens, E] routing map
                row = torch.cat([routed.sum(0).double(), scores.sum(0).double(),
                                 torch.tensor([float(scores.shape[0])], dtype=torch.float64)])
            self.sums[layer] += row.cpu()

        return record

    def reset(self) -> None:
        self.sums.zero_()

    def reduce(self, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """The sums over every rank of `group` (default: the world), [layers, 2E + 1]."""
        total = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(total, group=group)
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def load_balance_metrics(sums: torch.Tensor, *, num_experts: int, topk: int) -> dict:
    """The metrics of the module docstring from reduced sums `[layers, 2E + 1]` (layers with no
    token are left out; an empty dict when none has one)."""
    E = num_experts
    seen = sums[sums[:, -1] > 0]
    if not len(seen):
        return {}
    n, P, T = seen[:, :E], seen[:, E:2 * E], seen[:, -1]
    aux = E / (topk * T ** 2) * (P * n).sum(-1)  # [layers]
    share = n / n.sum(-1, keepdim=True)
    mean = n.mean(-1)
    cv = n.std(-1, unbiased=False) / mean
    return {"moe_aux_loss": float(aux.mean()), "moe_expert_share_max": float(share.max()),
            "moe_expert_share_min": float(share.min()), "moe_expert_share_cv": float(cv.mean())}
