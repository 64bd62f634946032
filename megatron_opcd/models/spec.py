"""Layer specs: Transformer Engine's where it can run and is asked for, megatron-core's local
modules otherwise. Asking for TE or FP8 where it cannot run is a `ConfigError` (raised by
`config.check_runtime` before anything is built), never a silent fallback.

Either spec carries the generation kernels (models/kernels.py) as its leaves: the core attention
with a KV-cache path, the local linears with a forward-only one. Both run megatron's own forward
until `kernels.attach` points them at a cache, so training sees megatron's modules unchanged.
"""

from __future__ import annotations

import torch

from megatron_opcd.config import ModelConfig
from megatron_opcd.models.kernels import generation_spec


class SequenceParallelTorchNorm:
    """torch's LayerNorm/RMSNorm with its parameters marked `sequence_parallel`.

    megatron-core's local spec uses `WrappedTorchNorm`, which asserts `not sequence_parallel`
    (transformer/torch_norm.py). With sequence parallelism each TP rank normalises its own slice of
    the sequence, so the norm's weight gradient is partial on every rank; marking the parameters
    lets `finalize_model_grads` sum them across the TP group, as it does for TE's norms.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def layer_spec(model: ModelConfig, *, sequence_parallel: bool, num_layers_in_stage: int):
    """The spec GPTModel is built from: a ModuleSpec (TE) or TransformerBlockSubmodules (local)."""
    if model.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # TE's fused LayerNormLinear handles sequence parallelism and FP8 itself (and keeps its own
        # forward while generating: only the core attention gets the cache path).
        # MoE: TE's grouped GEMM experts (TEGroupedMLP); needs TE >= 1.11 (megatron checks).
        return generation_spec(get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, moe_grouped_gemm=model.is_moe, qk_layernorm=model.qk_layernorm))

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_opcd.compat import mcore

    # MoE on the local spec: megatron's SequentialMLP (one expert after another, torch matmuls).
    spec = generation_spec(get_gpt_layer_local_spec(num_experts=model.num_experts, moe_grouped_gemm=False,
                                                    qk_layernorm=model.qk_layernorm,
                                                    normalization=model.normalization))
    if not sequence_parallel:
        return spec
    # QK-norm (Qwen3) is the same WrappedTorchNorm and asserts under SP too; it normalises this
    # rank's heads over the whole sequence, and finalize_model_grads sums its gradient over TP by
    # name (`q_layernorm`/`k_layernorm`), marked or not. Found by the rehearsal of the Qwen3 tp2pp1
    # examples (SP on): the model could not be built. The final norm comes from the block's
    # submodules, not the layer spec: passed explicitly there.
    return mcore.local_spec_with_norm(spec, SequenceParallelTorchNorm, num_layers_in_stage,
                                      qk_norm=model.qk_layernorm)


def fp8_kwargs(model: ModelConfig) -> dict:
    """TransformerConfig's FP8 options for `model` (empty when FP8 is off)."""
    if model.fp8 is None:
        return {}
    return {
        "fp8": model.fp8,
        "fp8_recipe": model.fp8_recipe,
        "fp8_amax_history_len": model.fp8_amax_history_len,
        "fp8_amax_compute_algo": model.fp8_amax_compute_algo,
    }
