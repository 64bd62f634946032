"""Rank functions for the layout tests (module level: the launcher pickles them by reference).

Each builds the same tiny model (layout-invariant init from one seed) at some TP/PP layout, runs
megatron-core's own forward-backward schedule with its DDP wrapper, and returns full (TP-gathered,
unsharded) logits, loss and gradients keyed by global parameter name, so the parent can compare
layouts against the single-process TP=1/PP=1 run.
"""

from __future__ import annotations

from functools import partial

import torch

TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=256, make_vocab_size_divisible_by=64, max_position_embeddings=64)
B, S, MICRO = 2, 8, 2


def batch(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (MICRO, B, S + 1), generator=gen)
    loss_mask = (torch.rand(MICRO, B, S, generator=gen) > 0.25).float()
    return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous(), loss_mask


def causal_mask(b: int, s: int) -> torch.Tensor:
    # megatron's convention: True = masked out. [b, 1, s, s]
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None].expand(b, 1, s, s)


def _gather_tp(t: torch.Tensor, groups, dim: int, stride: int = 1) -> torch.Tensor:
    from megatron_opcd.models.sharding import unshard

    if groups.tp_size == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(groups.tp_size)]
    torch.distributed.all_gather(pieces, t.contiguous(), group=groups.tp_group)
    return unshard(pieces, dim, stride)


def _full_grads(model, groups) -> dict:
    from megatron_opcd.models.sharding import global_named_parameters, partition_of
    from megatron_opcd.training.engine import main_grad

    out = {}
    for name, param in global_named_parameters(model):
        grad = main_grad(param)
        is_tp, dim, stride = partition_of(param)
        if is_tp:
            grad = _gather_tp(grad, groups, dim, stride)
        out[name] = grad.detach().clone().float()
    return out


def _full_weights(model, groups) -> dict:
    from megatron_opcd.models.sharding import global_named_parameters, partition_of

    out = {}
    for name, param in global_named_parameters(model):
        is_tp, dim, stride = partition_of(param)
        w = _gather_tp(param.detach(), groups, dim, stride) if is_tp else param.detach()
        out[name] = w.clone().float()
    return out


def _forward_step(groups, data_iterator, model):
    tokens, labels, loss_mask = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = model(tokens, pos, causal_mask(*tokens.shape), labels=labels)
    return out, partial(_loss, loss_mask)


def _loss(loss_mask, per_token_loss):
    total = (per_token_loss.float() * loss_mask).sum()
    n = loss_mask.sum().to(torch.int)
    return total, n, {"loss_sum": total.detach().clone(), "tokens": n.clone()}


def _logits_step(groups, data_iterator, model):
    tokens, _labels, _mask = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, pos, causal_mask(*tokens.shape))

    def collect(output):
        full = _gather_tp(output.detach(), groups, dim=-1)
        return torch.zeros(()), torch.ones((), dtype=torch.int), {"logits": full}

    return logits, collect


def layout_run(tp: int, pp: int, sp: bool = False, model_kwargs: dict | None = None,
               save_dir: str | None = None, load_dir: str | None = None) -> dict:
    """Logits, loss and full gradients of one forward-backward at the given layout."""
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights, save_checkpoint
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.models import build_model
    from megatron_opcd.training.engine import configure_schedule, forward_backward, wrap_ddp

    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                sequence_parallel=sp))
    cfg = ModelConfig(**{**TINY, **(model_kwargs or {})})
    model = build_model(cfg, groups=groups, seed=7)
    if load_dir is not None:
        load_model_weights(model, load_dir)
    if save_dir is not None:
        save_checkpoint(save_dir, model, cfg)
    tokens, labels, mask = batch(cfg.vocab_size)
    micro = [(tokens[i], labels[i], mask[i]) for i in range(MICRO)]
    ddp = wrap_ddp(model, groups)
    configure_schedule([ddp], groups)
    kw = dict(num_microbatches=MICRO, seq_length=S, micro_batch_size=B)
    logits = forward_backward(ddp, partial(_logits_step, groups), micro, forward_only=True, **kw)
    metrics = forward_backward(ddp, partial(_forward_step, groups), micro, **kw)
    result = {"grads": _full_grads(model, groups), "weights": _full_weights(model, groups),
              "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "last": groups.is_last_stage,
              "tied": cfg.tie_embeddings}
    if groups.is_last_stage:
        result["logits"] = torch.stack([m["logits"] for m in logits])
        result["loss"] = sum(float(m["loss_sum"]) for m in metrics) / sum(int(m["tokens"]) for m in metrics)
    # torch.distributed stays up for the next run of a launch; initialize() resets megatron's state.
    return result


def merge(results: list[dict]) -> dict:
    """One view of a multi-rank run: logits/loss from the last stage, grads from all stages."""
    merged = {"grads": {}, "weights": {}}
    for r in results:
        if r["tp_rank"] != 0:
            continue
        if r["last"]:
            merged["logits"], merged["loss"] = r.get("logits"), r["loss"]
        for key in ("grads", "weights"):
            for name, g in r[key].items():
                # Tied embeddings: the last stage's output_layer copy duplicates the embedding.
                if name == "output_layer.weight" and r["tied"]:
                    continue
                merged[key].setdefault(name, g)
    return merged


def many_layouts(runs: list[dict]) -> list[dict]:
    """Several layout runs in one launch (process start-up is the expensive part on 2 cores)."""
    return [layout_run(**kw) for kw in runs]
