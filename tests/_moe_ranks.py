"""Rank functions for the mixture-of-experts tests (module level: the launcher pickles them).

`moe_layout_run` builds one tiny MoE model (layout-invariant init from one seed) at a TP/PP/EP
layout, runs megatron-core's schedule with its DDP wrapper, and returns full logits, loss,
gradients and weights keyed by global parameter name (experts by their global index), so the
parent can compare layouts with each other and with a float64 reference.
"""

from __future__ import annotations

from functools import partial

import torch

from _layouts import MICRO, B, S, _forward_step, _logits_step, batch

# 8 experts, top-2, hidden 32: Qwen3-MoE's shape in miniature (QK-norm, untied embeddings, every
# layer MoE, normalised top-k weights, no shared expert).
TINY_MOE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                vocab_size=128, make_vocab_size_divisible_by=64, max_position_embeddings=64, qk_layernorm=True,
                tie_embeddings=False, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16)


def _gather(t: torch.Tensor, group, size: int, dim: int, stride: int) -> torch.Tensor:
    from megatron_opcd.models.sharding import unshard

    if size == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(pieces, t.contiguous(), group=group)
    return unshard(pieces, dim, stride)


def full_tensors(model, groups, *, grads: bool) -> dict:
    """Full (TP- or expert-TP-gathered) weights or gradients of this rank's parameters, by global
    name. Each EP rank returns its own experts; `merge` joins them."""
    from megatron_opcd.models.sharding import global_named_parameters, is_expert_parameter, partition_of
    from megatron_opcd.training.engine import main_grad

    out = {}
    for name, param in global_named_parameters(model):
        t = main_grad(param) if grads else param.detach()
        is_tp, dim, stride = partition_of(param)
        if is_tp:
            expert = is_expert_parameter(name)
            group = groups.expert_tp_group if expert else groups.tp_group
            size = groups.expert_tp_size if expert else groups.tp_size
            t = _gather(t, group, size, dim, stride)
        out[name] = t.detach().clone().float()
    return out


def moe_layout_run(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, sp: bool = False, model_kwargs: dict | None = None,
                   seed: int = 7, save_dir: str | None = None, load_dir: str | None = None) -> dict:
    """Logits (before any update), loss and full gradients of one forward-backward at a layout;
    with `load_dir`, the model is built from another seed and then loaded from that checkpoint."""
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights, save_checkpoint
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.models import build_model
    from megatron_opcd.training.engine import configure_schedule, forward_backward, wrap_ddp

    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                                sequence_parallel=sp))
    cfg = ModelConfig(**{**TINY_MOE, **(model_kwargs or {})})
    model = build_model(cfg, groups=groups, seed=seed if load_dir is None else seed + 1)
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
    result = {"grads": full_tensors(model, groups, grads=True), "weights": full_tensors(model, groups, grads=False),
              "tp_rank": groups.tp_rank, "expert_tp_rank": groups.expert_tp_rank, "last": groups.is_last_stage,
              "ep_size": groups.ep_size, "tokens": tokens}
    if groups.is_last_stage:
        result["logits"] = torch.stack([m["logits"] for m in logits])
        result["loss"] = sum(float(m["loss_sum"]) for m in metrics) / sum(int(m["tokens"]) for m in metrics)
    return result


def merge(results: list[dict]) -> dict:
    """One view of a multi-rank run: logits/loss from a last stage, every parameter once (dense
    ones from TP rank 0, experts from expert-TP rank 0 of every EP rank)."""
    from megatron_opcd.models.sharding import is_expert_parameter

    merged = {"grads": {}, "weights": {}, "tokens": results[0]["tokens"]}
    for r in results:
        if r["last"] and r["tp_rank"] == 0:
            merged["logits"], merged["loss"] = r["logits"], r["loss"]
        for key in ("grads", "weights"):
            for name, t in r[key].items():
                mine = r["expert_tp_rank"] == 0 if is_expert_parameter(name) else r["tp_rank"] == 0
                if mine:
                    merged[key].setdefault(name, t)
    return merged


def many_moe_layouts(runs: list[dict]) -> list[dict]:
    """Several layout runs in one launch (process start-up is the expensive part on 2 cores)."""
    return [moe_layout_run(**kw) for kw in runs]


PROMPTS = [[5, 17, 33, 2, 70], [9, 8], [44, 45, 46, 47]]


def moe_generation(ep: int = 1, tp: int = 1, empty_rank: int | None = None, max_new_tokens: int = 6) -> dict:
    """Greedy generation with the KV cache and with full recomputation (use_cache=False) of the
    tiny MoE model at EP `ep` and TP `tp` (no SP: a model that only generates, e.g. a teacher); the DP rank `empty_rank` has no prompts (it must still take part
    in the experts' all-to-alls). Also the rows each decode step sent through the experts, summed
    over the EP group: few rows, few tokens, no padding to a capacity."""
    from megatron_opcd import parallel
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.generation import SamplingParams, generate
    from megatron_opcd.models import build_model

    groups = parallel.initialize(ParallelConfig(expert_model_parallel_size=ep, tensor_model_parallel_size=tp))
    cfg = ModelConfig(**TINY_MOE)
    model = build_model(cfg, groups=groups, seed=7)
    prompts = [] if groups.dp_rank == empty_rank else PROMPTS
    rows = []  # per experts call (one per MoE layer and forward): rows this rank's experts got

    def count(_module, args, _output):
        rows.append(int(args[0].shape[0]))

    hooks = [layer.mlp.experts.register_forward_hook(count) for layer in model.decoder.layers]
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    cached = generate(model, prompts, params, groups=groups, vocab_size=cfg.vocab_size)
    cached_rows = list(rows)
    full = generate(model, prompts, params, groups=groups, vocab_size=cfg.vocab_size, use_cache=False)
    for h in hooks:
        h.remove()
    return {"cached": (cached.responses, cached.logprobs), "full": (full.responses, full.logprobs),
            "rows": cached_rows, "dp_rank": groups.dp_rank}


def moe_suite(layouts: list[dict], generation: list[dict] = ()) -> dict:
    """Layout runs and generation runs in one launch."""
    return {"layouts": many_moe_layouts(layouts), "generation": [moe_generation(**kw) for kw in generation]}


def moe_train_steps(cases: list[tuple], steps: int = 1) -> list[dict]:
    """Whole-trainer steps for several cases (config file, overrides[, steps]) in one launch: per
    case the logged metrics of each step and this rank's share of one copy of the student's full
    weights after them (`join_weights` joins the ranks'). A case with checkpoint.save set saves
    after its steps."""
    from megatron_opcd import parallel
    from megatron_opcd.models.sharding import is_expert_parameter
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    out = []
    for config_path, overrides, *case_steps in cases:
        cfg = load_train_config(config_path, overrides)
        groups = parallel.initialize(cfg.parallel)
        trainer = Trainer(cfg, groups)
        teacher_aux = trainer.teacher.config.moe_aux_loss_coeff if trainer.teacher is not None else None
        history = [trainer.train_step().metrics for _ in range(case_steps[0] if case_steps else steps)]
        if trainer.run_dir is not None:
            trainer.save()
            if trainer.run_lock is not None:  # rank 0 holds it
                trainer.run_lock.release()  # the next case may resume from it
        weights = full_tensors(trainer.student, groups, grads=False)
        # One copy of each: dense weights from DP rank 0's TP rank 0; experts (each EP rank holds
        # its own) from expert-TP rank 0 of the first expert-data-parallel replica.
        edp_rank = torch.distributed.get_rank(groups.expert_dp_group) if groups.expert_dp_group is not None else 0
        mine = {n: w for n, w in weights.items()
                if (is_expert_parameter(n) and groups.expert_tp_rank == 0 and edp_rank == 0)
                or (not is_expert_parameter(n) and groups.tp_rank == 0 and groups.dp_rank == 0)}
        out.append({"metrics": history, "weights": mine, "teacher_aux": teacher_aux,
                    "student_aux": trainer.student.config.moe_aux_loss_coeff})
        trainer.logger.close()
    parallel.destroy()
    return out


def join_weights(ranks: list[dict]) -> dict:
    weights = {}
    for r in ranks:
        for name, w in r["weights"].items():
            weights.setdefault(name, w)
    return weights
