"""The architectures the converter knows, and one parameter-mapping table per architecture.

Everything that names a Hugging Face tensor or a Hugging Face config field lives in this file:
`hf_to_megatron.py` and `megatron_to_hf.py` only walk these tables.

A table is a list of `Rule`s. A rule names one megatron-core parameter (the name `named_parameters()`
gives for the local spec, with the *global* layer index), the Hugging Face tensors it is built from,
and the transform between them:

    copy    one tensor, same values
    vocab   one tensor; megatron's copy has extra zero rows (vocabulary padded to a multiple of
            make_vocab_size_divisible_by x TP, see ModelConfig.padded_vocab_size)
    qkv     (q, k, v) -> megatron's fused linear_qkv, interleaved per query group:
            for each group g: the q heads of g, then k of g, then v of g (weight and bias alike)
    fc1     (gate, up) -> megatron's fused linear_fc1 = [gate; up] (full layout; TP shards take
            matching slices of both halves, see models/sharding.py stride 2)

Qwen3-MoE's experts are named `{e}` (the *global* expert index, which models/sharding.py gives a
rank's local experts under EP); each expert is a SwiGLU MLP like the dense one (fc1 = [gate; up],
fc2 = down), split over the expert tensor-parallel group instead of the TP group.

Llama and Qwen use the same "rotate_half" RoPE convention as megatron (rotary_interleaved=False),
so q and k need no permutation (the logits tests in tests/test_convert.py check it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_opcd.config import ModelConfig
from megatron_opcd.errors import ConfigError, ConversionError


Kind = Literal["copy", "vocab", "qkv", "fc1"]


@dataclass(frozen=True)
class Rule:
    megatron: str
    """megatron-core parameter name; `{i}` is the global layer index, `{e}` the global expert index."""
    hf: tuple[str, ...]
    """Hugging Face tensor names it is made of; `{i}` and `{e}` as above."""
    kind: Kind = "copy"


# ----------------------------------------------------------------------------------------------
# The tables. Names are those of `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`.
# `output_layer.weight` exists only with untied embeddings (or as the last pipeline stage's copy of
# the tied embedding, which the converter fills from `model.embed_tokens.weight`).

_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."

LLAMA: list[Rule] = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule(_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",)),
    Rule(
        _LAYER + "self_attention.linear_qkv.weight",
        (_HF_LAYER + "self_attn.q_proj.weight", _HF_LAYER + "self_attn.k_proj.weight",
         _HF_LAYER + "self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule(_LAYER + "self_attention.linear_proj.weight", (_HF_LAYER + "self_attn.o_proj.weight",)),
    Rule(_LAYER + "pre_mlp_layernorm.weight", (_HF_LAYER + "post_attention_layernorm.weight",)),
    Rule(
        _LAYER + "mlp.linear_fc1.weight",
        (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
        "fc1",
    ),
    Rule(_LAYER + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
]

QWEN2: list[Rule] = LLAMA + [
    # Qwen2/2.5: bias on q, k and v (not on o_proj).
    Rule(
        _LAYER + "self_attention.linear_qkv.bias",
        (_HF_LAYER + "self_attn.q_proj.bias", _HF_LAYER + "self_attn.k_proj.bias",
         _HF_LAYER + "self_attn.v_proj.bias"),
        "qkv",
    ),
]

QWEN3: list[Rule] = LLAMA + [
    # Qwen3: RMSNorm over each head's dimensions of q and k, before RoPE (megatron: qk_layernorm).
    Rule(_LAYER + "self_attention.q_layernorm.weight", (_HF_LAYER + "self_attn.q_norm.weight",)),
    Rule(_LAYER + "self_attention.k_layernorm.weight", (_HF_LAYER + "self_attn.k_norm.weight",)),
]

# Qwen3-MoE: Qwen3's attention (QK-norm) and every layer's MLP a mixture of experts: a router
# (`mlp.gate`, no bias) and experts in the hub's per-expert form (`mlp.experts.{e}.gate_proj` ...;
# transformers v5 fuses them into `gate_up_proj` in memory but reads and writes this form).
QWEN3_MOE: list[Rule] = [r for r in QWEN3 if ".mlp." not in r.megatron] + [
    Rule(_LAYER + "mlp.router.weight", (_HF_LAYER + "mlp.gate.weight",)),
    Rule(
        _LAYER + "mlp.experts.local_experts.{e}.linear_fc1.weight",
        (_HF_LAYER + "mlp.experts.{e}.gate_proj.weight", _HF_LAYER + "mlp.experts.{e}.up_proj.weight"),
        "fc1",
    ),
    Rule(_LAYER + "mlp.experts.local_experts.{e}.linear_fc2.weight", (_HF_LAYER + "mlp.experts.{e}.down_proj.weight",)),
]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    """Hugging Face `config.model_type`."""
    hf_class: str
    """The `architectures` entry written to config.json."""
    rules: list[Rule]
    qkv_bias: bool
    qk_norm: bool
    has_head_dim: bool
    """Whether the HF config has a `head_dim` field (Qwen2 derives it as hidden / heads)."""
    moe: bool = False
    """Every layer's MLP is a mixture of experts."""


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA, qkv_bias=False, qk_norm=False, has_head_dim=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", QWEN2, qkv_bias=True, qk_norm=False, has_head_dim=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", QWEN3, qkv_bias=False, qk_norm=True, has_head_dim=True),
    "qwen3_moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE, qkv_bias=False, qk_norm=True,
                              has_head_dim=True, moe=True),
}

SUPPORTED = ", ".join(ARCHITECTURES)


def architecture(model_type: str) -> Architecture:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ConversionError(
            f"model_type '{model_type}' is not supported by the converter; supported: {SUPPORTED} "
            "(Llama 3.x, Qwen2/2.5, Qwen3 dense models, Qwen3-MoE)"
        )
    return arch


# ----------------------------------------------------------------------------------------------
# Matching parameter names to rules.


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{e}"), r"(?P<e>\d+)")
    return re.compile("^" + escaped + "$")


_COMPILED: dict[int, list[tuple[re.Pattern, Rule]]] = {}


def rule_for(arch: Architecture, megatron_name: str) -> tuple[Rule, dict[str, int]]:
    """The rule of a megatron parameter and its indices: {"i": global layer, "e": global expert}
    where the name has them ({} outside layers)."""
    compiled = _COMPILED.setdefault(id(arch.rules), [(_pattern(r.megatron), r) for r in arch.rules])
    for pattern, rule in compiled:
        m = pattern.match(megatron_name)
        if m:
            return rule, {k: int(v) for k, v in m.groupdict().items()}
    raise ConversionError(
        f"megatron parameter '{megatron_name}' has no {arch.model_type} mapping; the model was built with "
        "options this architecture does not have (see docs/conversion.md)"
    )


def hf_names(rule: Rule, index: dict[str, int]) -> list[str]:
    return [n.format(**index) for n in rule.hf]


# ----------------------------------------------------------------------------------------------
# Transforms. Tensors are full (unsharded) here; TP slicing happens in hf_to_megatron.py.


def to_megatron(rule: Rule, tensors: list[torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> torch.Tensor:
    """HF tensors -> the full megatron tensor of `rule`."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "vocab":
        (w,) = tensors
        if w.shape[0] == padded_vocab:
            return w
        out = w.new_zeros((padded_vocab,) + tuple(w.shape[1:]))  # padded rows stay zero
        out[: w.shape[0]] = w
        return out
    if rule.kind == "fc1":
        return torch.cat(tensors, dim=0)  # [2 * ffn, h] = [gate; up]
    if rule.kind == "qkv":
        q, k, v = tensors
        ng, hd = cfg.query_groups, cfg.head_dim
        qpg = cfg.num_attention_heads // ng
        tail = tuple(q.shape[1:])  # (h,) for weights, () for biases
        # [ng, qpg*hd + hd + hd, ...]: each query group's q heads, then its k, then its v
        fused = torch.cat([q.reshape((ng, qpg * hd) + tail), k.reshape((ng, hd) + tail),
                           v.reshape((ng, hd) + tail)], dim=1)
        return fused.reshape((ng * (qpg + 2) * hd,) + tail)
    raise AssertionError(rule.kind)


def to_hf(rule: Rule, full: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The full megatron tensor of `rule` -> its HF tensors (inverse of `to_megatron`)."""
    if rule.kind == "copy":
        return [full]
    if rule.kind == "vocab":
        return [full[: cfg.vocab_size]]  # drop the padding rows
    if rule.kind == "fc1":
        return list(torch.chunk(full, 2, dim=0))
    if rule.kind == "qkv":
        ng, hd = cfg.query_groups, cfg.head_dim
        qpg = cfg.num_attention_heads // ng
        tail = tuple(full.shape[1:])
        grouped = full.reshape((ng, (qpg + 2) * hd) + tail)
        q, k, v = torch.split(grouped, [qpg * hd, hd, hd], dim=1)
        return [q.reshape((ng * qpg * hd,) + tail), k.reshape((ng * hd,) + tail), v.reshape((ng * hd,) + tail)]
    raise AssertionError(rule.kind)


# ----------------------------------------------------------------------------------------------
# Configs: HF config <-> ModelConfig.


def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConversionError(f"expected a Hugging Face config (object or dict), got {type(hf_config).__name__}")


def _rope(d: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict or {}) from a transformers v4 (`rope_theta`, `rope_scaling`) or
    v5 (`rope_parameters`) config."""
    params = d.get("rope_parameters") or {}
    if isinstance(params, dict) and "full_attention" in params:  # v5 per-layer-type form
        params = params["full_attention"]
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type")) not in (None, "default"):
        scaling = params
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    return float(theta), (scaling if rope_type not in (None, "default") else {})


def model_config_from_hf(hf_config: Any, *, make_vocab_size_divisible_by: int = 128,
                         params_dtype: str = "fp32") -> ModelConfig:
    """ModelConfig of a Hugging Face Llama / Qwen2 / Qwen3 config (object or config.json dict).

    Refuses, with a one-line `ConversionError`, anything the megatron model would compute
    differently: other model types, MoE, sliding-window attention, biases other than Qwen2's QKV
    bias, RoPE scaling other than Llama 3's, activations other than SiLU.
    """
    d = _as_dict(hf_config)
    model_type = d.get("model_type")
    arch = architecture(str(model_type))
    name = f"{model_type} config"

    def refuse(what: str) -> ConversionError:
        return ConversionError(f"{name}: {what} is not supported by the converter (supported: {SUPPORTED} "
                               "dense decoders with full attention)")

    if d.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={d.get('hidden_act')!r}")
    if d.get("mlp_bias"):
        raise refuse("mlp_bias=true")
    if d.get("attention_bias") and not arch.qkv_bias:
        raise refuse("attention_bias=true (bias on o_proj has no megatron counterpart here)")
    if d.get("use_sliding_window"):
        raise refuse("use_sliding_window=true")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        raise refuse(f"layer_types other than full_attention ({sorted(set(d['layer_types']))})")
    if (d.get("num_experts") or d.get("num_local_experts")) and not arch.moe:
        raise refuse("mixture of experts")
    theta, scaling = _rope(d)
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if rope_type not in (None, "llama3"):
        raise refuse(f"rope scaling type {rope_type!r} (only Llama 3's 'llama3' scaling)")
    if theta != int(theta):
        raise refuse(f"non-integer rope_theta={theta}")
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim") if arch.has_head_dim else None
    head_dim = int(head_dim) if head_dim else hidden // heads
    kv_heads = int(d.get("num_key_value_heads") or heads)
    kwargs = dict(
        num_layers=int(d["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=int(d["intermediate_size"]),
        kv_channels=head_dim,
        vocab_size=int(d["vocab_size"]),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
        normalization="RMSNorm",
        norm_epsilon=float(d.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=int(theta),
        rotary_percent=1.0,
        add_qkv_bias=arch.qkv_bias,
        add_bias_linear=False,
        qk_layernorm=arch.qk_norm,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        params_dtype=params_dtype,
    )
    if arch.moe:
        kwargs.update(_moe_fields(d, refuse))
    if rope_type == "llama3":
        kwargs.update(
            rope_scaling=True,
            rope_scaling_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    try:
        return ModelConfig(**kwargs)
    except ConfigError as exc:
        raise ConversionError(f"{name}: {exc}") from None


def _moe_fields(d: dict, refuse) -> dict:
    """ModelConfig's MoE fields of a Qwen3-MoE config; refuses layers that are not all MoE."""
    experts = d.get("num_experts") or d.get("num_local_experts")
    if not experts:
        raise refuse("a qwen3_moe config without num_experts")
    if int(d.get("decoder_sparse_step") or 1) != 1:
        raise refuse(f"decoder_sparse_step={d['decoder_sparse_step']} (dense and MoE layers mixed; every layer "
                     "must be MoE: decoder_sparse_step=1)")
    if d.get("mlp_only_layers"):
        raise refuse(f"mlp_only_layers={d['mlp_only_layers']} (dense and MoE layers mixed; every layer must be MoE)")
    if d.get("shared_expert_intermediate_size"):
        raise refuse("a shared expert (Qwen3-MoE has none)")
    return dict(
        num_experts=int(experts),
        moe_router_topk=int(d.get("num_experts_per_tok") or 8),
        moe_ffn_hidden_size=int(d["moe_intermediate_size"]),
        moe_norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        moe_aux_loss_coeff=float(d.get("router_aux_loss_coef") or 0.0),
    )


def architecture_of(cfg: ModelConfig) -> Architecture:
    """The HF architecture a megatron ModelConfig corresponds to; refuses what none expresses."""
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append(f"normalization={cfg.normalization}")
    if cfg.activation != "swiglu":
        problems.append(f"activation={cfg.activation}")
    if cfg.position_embedding_type != "rope" or cfg.rotary_percent != 1.0:
        problems.append("positions other than full RoPE")
    if cfg.add_bias_linear:
        problems.append("add_bias_linear=true")
    if cfg.add_qkv_bias and cfg.qk_layernorm:
        problems.append("both add_qkv_bias and qk_layernorm")
    if cfg.is_moe and not cfg.qk_layernorm:
        problems.append("experts without qk_layernorm")
    if cfg.is_moe and cfg.moe_shared_expert_intermediate_size:
        problems.append("a shared expert")
    if problems:
        raise ConversionError(
            f"a model with {', '.join(problems)} has no Hugging Face counterpart among {SUPPORTED}"
        )
    if cfg.is_moe:
        return ARCHITECTURES["qwen3_moe"]
    if cfg.qk_layernorm:
        return ARCHITECTURES["qwen3"]
    if cfg.add_qkv_bias:
        return ARCHITECTURES["qwen2"]
    return ARCHITECTURES["llama"]


def hf_config_fields(arch: Architecture, cfg: ModelConfig) -> dict:
    """The architectural fields of the HF config.json for `cfg` (the rest comes from the original
    config when one travelled with the checkpoint)."""
    if not arch.has_head_dim and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ConversionError(
            f"{arch.model_type} has no head_dim field but kv_channels={cfg.head_dim} != hidden_size / heads"
        )
    rope: dict = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.rope_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": float(cfg.rotary_base),
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        }
    out = dict(
        model_type=arch.model_type,
        architectures=[arch.hf_class],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        # transformers v4 reads these two; v5 reads rope_parameters (and accepts these).
        rope_theta=float(cfg.rotary_base),
        rope_scaling=None if not cfg.rope_scaling else {k: v for k, v in rope.items() if k != "rope_theta"},
    )
    if arch.has_head_dim:
        out["head_dim"] = cfg.head_dim
    if arch.model_type in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if arch.model_type == "llama":
        out["mlp_bias"] = False
    if arch.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        out["use_sliding_window"] = False
        out["layer_types"] = ["full_attention"] * cfg.num_layers
        out["max_window_layers"] = cfg.num_layers
    if arch.moe:
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
                   moe_intermediate_size=cfg.moe_ffn_hidden_size, norm_topk_prob=cfg.moe_norm_topk_prob,
                   router_aux_loss_coef=cfg.moe_aux_loss_coeff, decoder_sparse_step=1, mlp_only_layers=[])
    return out


# Fields of ModelConfig that decide the architecture; the rest (dtype, padding, dropout, init) does not.
ARCHITECTURAL_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_size", "head_dim", "vocab_size",
    "norm_epsilon", "rotary_base", "rope_scaling", "add_qkv_bias", "qk_layernorm", "tie_embeddings",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob",
)


def architectural_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    diffs = [f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in ARCHITECTURAL_FIELDS
             if getattr(a, f) != getattr(b, f) and not (isinstance(getattr(a, f), float)
                                                         and math.isclose(getattr(a, f), getattr(b, f)))]
    if a.rope_scaling and b.rope_scaling:
        for f in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_position_embeddings"):
            if getattr(a, f) != getattr(b, f):
                diffs.append(f"{f}: {getattr(a, f)} vs {getattr(b, f)}")
    return diffs

