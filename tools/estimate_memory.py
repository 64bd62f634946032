#!/usr/bin/env python
"""Per-GPU memory of an OPCD job, from its config, before it is queued.

    python tools/estimate_memory.py examples/opcd_qwen3-8b_math_2n8g_tp2pp1.yaml [key=value ...]
    python tools/estimate_memory.py CONFIG --gpus 16 --gpu-memory-gib 80 --json

Pure arithmetic (no torch, no GPU): the student and teacher `ModelConfig`s (the `model:` section, or
the model_config.yaml of checkpoint.pretrained / teacher.checkpoint when those exist), the TP/PP
layout, and the batch and length settings. The world size comes from `--gpus`, else from the file
name (`..._2n8g_...` = 16 GPUs). Numbers are for the busiest rank: the pipeline stage that holds
the embedding or the output layer, whichever is larger.

What is counted, per GPU (GiB = 2**30 bytes):
  student weights    params/rank x bytes of model.params_dtype
  student grads      params/rank x 4 (megatron DDP reduces gradients in fp32; the buffer is not sharded)
  optimizer state    params/rank x (Adam: 12 bytes with bf16/fp16 params = fp32 master + 2 moments;
                     8 with fp32 params = 2 moments; SGD: 4 or 0), / DP with use_distributed_optimizer
  teacher weights    teacher params/rank x its dtype bytes, at the teacher's own layout with
                     `teacher.parallel` (its busiest stage); `teacher: self`: 0; `teacher.mode: ema`:
                     the student's params/rank x 4 (the average is an fp32 copy in the student's sharding)
  rollout KV cache   2 (K, V) x layers/PP x query_groups/TP x head_dim x bytes x tokens x rows,
                     rows = prompts per DP rank x samples_per_prompt, tokens = prompt + response
                     (opcd: the student samples without the context; the baselines: the teacher with it)
  teacher KV cache   the same for one micro-batch of [context; prompt; response] rows (scoring), at
                     the teacher's layout: with `teacher.parallel` a teacher DP replica scores
                     ceil(micro-batch x student DP / teacher DP) rows
  logits             micro-batch x response tokens x padded vocab/TP x 4 bytes, once for the student
                     and once for the teacher (fp32 while the loss runs); response rows only, with
                     or without sequence parallelism (the output layer computes no prompt position).
                     With `teacher.parallel` the teacher's last stage also holds its own output while
                     it scores (its rows x response x its padded vocab/its TP, model dtype) before the
                     slices go to the student ranks ("teacher logits at its layout")
  held teacher logits  0 at PP = 1 (the teacher scores each micro-batch inside the update's forward
                     step: one micro-batch's logits at a time, counted under logits); at PP > 1 the
                     teacher's response logits (model dtype) of every micro-batch of the step, on the
                     last stage, from scoring to the update
  activations        rough: 34 x s x b x h bytes per layer (Korthikanti et al. 2022, flash attention,
                     no recomputation), / TP with sequence parallelism (else (10 + 24/TP) x s x b x h),
                     for all layers of the first stage x PP micro-batches in flight (1F1B); s =
                     prompt + response, b = micro-batch. A guide, not a measurement.

Left out: CUDA context and NCCL buffers (~1-3 GiB per GPU), allocator fragmentation, Transformer
Engine workspaces and FP8 scaling state, temporary buffers of the loss (bounded by loss.chunk_tokens).
The peak is taken as the larger of the three phases (rollout, teacher scoring, update); the static
part (weights, gradients, optimizer state) is present in all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_opcd.config import ModelConfig  # noqa: E402
from megatron_opcd.errors import ConfigError  # noqa: E402
from megatron_opcd.training.config import TrainConfig, load_train_config  # noqa: E402

GIB = float(2**30)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class StageParams:
    """Parameters one rank holds (after TP) on the first and the last pipeline stage."""

    first: int
    last: int
    total: int
    """The whole model, unsharded (for the header)."""

    @property
    def busiest(self) -> int:
        return max(self.first, self.last)


def moe_mlp_params(m: ModelConfig, tp: int, ep: int = 1, etp: int | None = None, *, active: bool = False) -> int:
    """One MoE layer's MLP parameters on one rank: the router (replicated), its num_experts / EP
    experts each split over the expert TP group (`etp`, default TP), the shared expert split over
    TP. `active`: what one token runs through instead (top-k experts, unsharded)."""
    h, ffn = m.hidden_size, m.moe_ffn_hidden_size
    per_expert = h * (2 if m.activation == "swiglu" else 1) * ffn + ffn * h
    shared = m.moe_shared_expert_intermediate_size or 0
    shared_params = 3 * h * shared + (h if shared else 0)  # SwiGLU + megatron's shared-expert gate [1, h]
    router = m.num_experts * h
    if active:
        return router + m.moe_router_topk * per_expert + shared_params
    return router + (m.num_experts // ep) * per_expert // (etp or tp) + shared_params // tp


def layer_params(m: ModelConfig, tp: int, ep: int = 1, etp: int | None = None) -> int:
    """One transformer layer's parameters on one TP rank (norms are replicated across TP); an MoE
    layer's MLP as `moe_mlp_params` at EP `ep` and expert TP `etp`."""
    h, hd, heads, groups, ffn = m.hidden_size, m.head_dim, m.num_attention_heads, m.query_groups, m.ffn_size
    qkv_out = (heads + 2 * groups) * hd
    attn = h * qkv_out + heads * hd * h  # linear_qkv + linear_proj
    if m.add_qkv_bias or m.add_bias_linear:
        attn += qkv_out
    if m.add_bias_linear:
        attn += h * tp  # the output projection's bias is replicated, not split
    mlp_in = 2 * ffn if m.activation == "swiglu" else ffn
    mlp = 0 if m.is_moe else h * mlp_in + ffn * h
    if m.add_bias_linear:
        mlp += mlp_in + h * tp
    sharded = (attn + mlp) // tp
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    replicated = 2 * norm  # input_layernorm (fused into linear_qkv under TE) + pre_mlp_layernorm
    if m.qk_layernorm:
        replicated += 2 * hd  # q_layernorm + k_layernorm, per head dimension
    if m.is_moe:
        replicated += moe_mlp_params(m, tp, ep, etp)
    return sharded + replicated


def stage_params(m: ModelConfig, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> StageParams:
    vocab = m.padded_vocab_size(tp)
    emb = vocab * m.hidden_size // tp
    pos = m.max_position_embeddings * m.hidden_size if m.position_embedding_type == "learned_absolute" else 0
    final_norm = m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    layers = (m.num_layers // pp) * layer_params(m, tp, ep, etp)
    if pp == 1:
        # One stage; a tied output layer is the embedding itself.
        first = last = layers + emb + pos + final_norm + (0 if m.tie_embeddings else emb)
    else:
        # The last stage holds the output layer: its own matrix, or a copy of the tied embedding.
        first, last = layers + emb + pos, layers + emb + final_norm
    total = m.num_layers * layer_params(m, 1) + vocab * m.hidden_size * (1 if m.tie_embeddings else 2) + pos + final_norm
    return StageParams(first=first, last=last, total=total)


def active_params(m: ModelConfig) -> int:
    """Parameters one token runs through (the whole model for a dense one; an MoE model's top-k
    experts instead of all of them)."""
    total = stage_params(m, 1, 1).total
    if not m.is_moe:
        return total
    return total - m.num_layers * (moe_mlp_params(m, 1) - moe_mlp_params(m, 1, active=True))


def optimizer_bytes_per_param(name: str, params_dtype: str) -> int:
    master = 4 if params_dtype != "fp32" else 0  # fp32 master copy of bf16/fp16 weights
    moments = 8 if name == "adam" else 0
    return master + moments


def kv_bytes(m: ModelConfig, tp: int, pp: int, rows: int, tokens: int) -> int:
    per_token = 2 * (m.num_layers // pp) * (m.query_groups // tp) * m.head_dim * DTYPE_BYTES[m.params_dtype]
    return per_token * rows * tokens


def activation_bytes(m: ModelConfig, tp: int, pp: int, seq: int, micro: int, sequence_parallel: bool,
                     num_micro: int) -> int:
    sbh = seq * micro * m.hidden_size
    per_layer = 34 * sbh / tp if sequence_parallel else (10 + 24 / tp) * sbh
    in_flight = min(pp, num_micro)  # 1F1B: the first stage holds up to PP micro-batches
    return int(per_layer * (m.num_layers // pp) * in_flight)


def world_size_from_name(path: str) -> int | None:
    from megatron_opcd.config import cluster_topology

    topology = cluster_topology(path)
    return topology[0] * topology[1] if topology else None


def _model_from_checkpoint(folder: str | None) -> ModelConfig | None:
    if not folder or not (Path(folder) / "model_config.yaml").is_file():
        return None
    from megatron_opcd.checkpointing import read_model_config

    return read_model_config(folder)


def student_config(cfg: TrainConfig) -> ModelConfig:
    m = cfg.model or _model_from_checkpoint(cfg.checkpoint.pretrained)
    if m is None:
        raise ConfigError(f"the student's architecture is unknown: add a `model:` section, or point "
                          f"checkpoint.pretrained at a converted checkpoint (now {cfg.checkpoint.pretrained!r})")
    return m


def teacher_config(cfg: TrainConfig) -> ModelConfig | None:
    """None for `teacher: self` (no second copy of the weights); `ema`: the student's architecture
    in fp32 (the moving average, training/ema.py)."""
    import dataclasses

    t = cfg.teacher
    if t.mode == "self":
        return None
    if t.mode == "ema":
        return dataclasses.replace(student_config(cfg), params_dtype="fp32")
    m = t.model or _model_from_checkpoint(t.checkpoint)
    if m is None:
        raise ConfigError(f"the teacher's architecture is unknown: add teacher.model, or point teacher.checkpoint "
                          f"at a converted checkpoint (now {t.checkpoint!r})")
    return m


def estimate(cfg: TrainConfig, world_size: int) -> dict:
    """Per-GPU bytes of each component and of each phase's peak, for the busiest rank."""
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    p.check_world_size(world_size)
    dp = world_size // (tp * pp)
    num_micro = cfg.check_batches(dp)
    s = student_config(cfg)
    s.check_parallel(p, "model")
    t = teacher_config(cfg)
    tl = cfg.teacher_parallel  # the teacher's layout: teacher.parallel, else the student's
    ttp, tpp = tl.tensor_model_parallel_size, tl.pipeline_model_parallel_size
    own = (ttp, tpp) != (tp, pp)
    if own:
        tl.check_world_size(world_size)
    tdp = world_size // (ttp * tpp)
    if t is not None:
        t.check_parallel(tl, "teacher", **cfg.teacher_parallel_names)
    teacher_model = t or s

    ep, etp = p.expert_model_parallel_size, p.expert_tp_size  # experts split by EP (MoE models only)
    sp = stage_params(s, tp, pp, ep, etp)
    # A teacher on its own layout is dense (config refuses MoE/EP there): its EP is the student's.
    tparams = stage_params(t, ttp, tpp, ep, etp) if t is not None else None
    sbytes = DTYPE_BYTES[s.params_dtype]
    optim = sp.busiest * optimizer_bytes_per_param(cfg.optimizer.name, s.params_dtype)
    if p.use_distributed_optimizer:
        optim = optim / dp

    mb = cfg.schedule.micro_batch_size
    prompt, context, response = cfg.data.max_prompt_tokens, cfg.data.max_context_tokens, cfg.generation.max_new_tokens
    rows = cfg.schedule.global_batch_size // dp * cfg.schedule.samples_per_prompt
    if cfg.algorithm.name == "opcd":
        rollout_kv = kv_bytes(s, tp, pp, rows, prompt + response)
    else:
        rollout_kv = kv_bytes(teacher_model, tp, pp, rows, context + prompt + response)
    needs_teacher = cfg.algorithm.name != "seqkd"
    teacher_rows = -(-mb * dp // tdp)  # a teacher DP replica's share of one micro-batch (mb when shared)
    teacher_kv = kv_bytes(teacher_model, ttp, tpp, teacher_rows, context + prompt + response) if needs_teacher else 0
    vocab_shard = s.padded_vocab_size(tp) // tp
    logits_one = mb * response * vocab_shard * 4
    own_logits = (teacher_rows * response * teacher_model.padded_vocab_size(ttp) // ttp
                  * DTYPE_BYTES[teacher_model.params_dtype]) if own and needs_teacher else 0
    # At PP = 1 the teacher scores inside the forward step: nothing is held beyond one micro-batch.
    held = (rows // mb) * mb * response * vocab_shard * DTYPE_BYTES[teacher_model.params_dtype] \
        if needs_teacher and pp > 1 else 0
    # The rollout's prefill produces [rows, prompt, V/tp] logits in the model dtype.
    prefill_logits = rows * (prompt + (context if cfg.algorithm.name != "opcd" else 0)) * vocab_shard * sbytes
    act = activation_bytes(s, tp, pp, prompt + response, mb, p.sequence_parallel, num_micro)

    parts = {
        "student weights": sp.busiest * sbytes,
        "student grads (fp32)": sp.busiest * 4,
        "optimizer state": optim,
        "teacher weights": tparams.busiest * DTYPE_BYTES[t.params_dtype] if tparams else 0,
        "rollout KV cache": rollout_kv,
        "rollout prefill logits": prefill_logits,
        "teacher KV cache (scoring)": teacher_kv,
        "held teacher logits (step)": held,
        "teacher logits at its layout": own_logits,
        "logits (student + teacher)": 2 * logits_one if needs_teacher else logits_one,
        "activations (rough)": act,
    }
    static = sum(parts[k] for k in ("student weights", "student grads (fp32)", "optimizer state", "teacher weights"))
    phases = {
        "rollout": static + rollout_kv + prefill_logits,
        "teacher scoring": static + teacher_kv + held + logits_one + own_logits,
        "update": static + held + parts["logits (student + teacher)"] + act,
    }
    return {
        "layout": {"world_size": world_size, "tp": tp, "pp": pp, "dp": dp, "micro_batches": num_micro,
                   "rows_per_dp_rank": rows, "distributed_optimizer": p.use_distributed_optimizer},
        "student_params": sp.total,
        "student_params_per_gpu": sp.busiest,
        "teacher_params": tparams.total if tparams else 0,
        "teacher_params_per_gpu": tparams.busiest if tparams else 0,
        "teacher_layout": {"tp": ttp, "pp": tpp, "dp": tdp, "own_groups": own},
        "student_active_params": active_params(s),
        "teacher_active_params": active_params(t) if t is not None else 0,
        "bytes": {k: int(v) for k, v in parts.items()},
        "phases": {k: int(v) for k, v in phases.items()},
        "peak_bytes": int(max(phases.values())),
    }


def format_table(result: dict, name: str, gpu_memory_gib: float | None) -> str:
    lay = result["layout"]
    tl = result["teacher_layout"]
    lines = [
        f"{name}: {lay['world_size']} GPUs = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, "
        f"{lay['micro_batches']} micro-batch(es) of the step per DP rank, {lay['rows_per_dp_rank']} rollouts per DP rank"
        + (f"; teacher on its own groups: TP {tl['tp']} x PP {tl['pp']} x DP {tl['dp']}" if tl["own_groups"] else ""),
        f"student {result['student_params'] / 1e9:.2f}B params ({result['student_params_per_gpu'] / 1e9:.2f}B per GPU)"
        + (f", teacher {result['teacher_params'] / 1e9:.2f}B ({result['teacher_params_per_gpu'] / 1e9:.2f}B per GPU)"
           if result["teacher_params"] else ", teacher = the student (self)"),
        "",
        f"{'component':<30}{'GiB/GPU':>10}",
        "-" * 40,
    ]
    lines += [f"{k:<30}{v / GIB:>10.2f}" for k, v in result["bytes"].items()]
    lines.append("-" * 40)
    lines += [f"{'peak in ' + k:<30}{v / GIB:>10.2f}" for k, v in result["phases"].items()]
    peak = result["peak_bytes"] / GIB
    lines.append(f"{'estimated peak':<30}{peak:>10.2f}")
    if gpu_memory_gib:
        verdict = "fits" if peak <= 0.9 * gpu_memory_gib else "does NOT fit"
        lines.append(f"{verdict} in {gpu_memory_gib:g} GiB with 10% headroom (CUDA context, NCCL, fragmentation)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a trainer YAML (examples/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as for the trainer")
    ap.add_argument("--gpus", type=int, default=None, help="world size (default: from the file name, e.g. 2n8g = 16)")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        gpus = args.gpus or world_size_from_name(args.config)
        if gpus is None:
            raise ConfigError(f"cannot tell the world size from {args.config}'s name: pass --gpus N")
        result = estimate(cfg, gpus)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result["gpu_memory_gib"] = args.gpu_memory_gib
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, Path(args.config).name, args.gpu_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
