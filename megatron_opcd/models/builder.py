"""Build the student and the teacher as megatron-core GPTModels from a `ModelConfig`.

One pipeline stage per rank (no virtual pipeline): `build_model` returns this rank's stage.
The teacher is frozen: eval mode, `requires_grad=False`, never given to an optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from megatron_opcd.compat.optional import check_runtime
from megatron_opcd.config import ModelConfig, ParallelConfig
from megatron_opcd.errors import ConfigError
from megatron_opcd.models.kernels import install_output_layer
from megatron_opcd.models.sharding import layout_invariant_init_
from megatron_opcd.models.spec import fp8_kwargs, layer_spec
from megatron_opcd.parallel import ParallelGroups


def _norms_in_model_dtype(model, dtype: torch.dtype) -> None:
    """torch's norm modules of the local spec are created in float32 whatever `params_dtype` says
    (megatron-core's `WrappedTorchNorm` passes no dtype; Megatron-LM's Float16Module casts the
    whole model afterwards). Cast them as it would: a float32 weight on bf16 activations sends
    torch to its unfused norm kernel (a warning says so on CUDA). TE's norms follow params_dtype."""
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            module.to(dtype)


def transformer_config(model: ModelConfig, groups: ParallelGroups, *, perform_initialization: bool = True):
    """megatron-core's TransformerConfig for `model` under this process's layout."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = model.torch_dtype
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=groups.sequence_parallel,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Weights are initialised on the CPU from the full tensor (layout-invariant, see sharding.py)
        # and copied to the device; checkpoints overwrite them.
        use_cpu_initialization=True,
        # Kept on even when a checkpoint will overwrite the weights: megatron-core 0.16 sets the
        # tensor-parallel attributes of its parameters only inside its initialisation.
        perform_initialization=perform_initialization,
        # The fused kernels below need CUDA (and apex/TE); torch implementations otherwise.
        bias_activation_fusion=on_gpu and model.transformer_impl == "transformer_engine",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        attention_backend=AttnBackend.auto if model.transformer_impl == "transformer_engine" else AttnBackend.local,
        # Prompt and response lengths change from batch to batch: let the pipeline send shapes.
        variable_seq_lengths=True,
        # The project's loss contract (engine.wrap_ddp, configure_schedule set it again): set at
        # build time because megatron's MoE router reads it once, in its constructor, to scale
        # the load-balancing loss by the micro-batch's tokens.
        calculate_per_token_loss=True,
        # alltoall: the MoE dispatcher (gloo has all_to_all_single), and the one that accepts
        # variable_seq_lengths; dense models set it only for that check.
        moe_token_dispatcher_type="alltoall",
        **moe_kwargs(model, groups, on_gpu=on_gpu),
        **fp8_kwargs(model),
    )


def moe_kwargs(model: ModelConfig, groups: ParallelGroups, *, on_gpu: bool) -> dict:
    """TransformerConfig's mixture-of-experts options for `model` (empty for a dense model).

    Router as Qwen3-MoE's: softmax scores, top-k, no expert bias; `moe_norm_topk_prob` is
    megatron's softmax *after* top-k (= softmax over all experts renormalised over the top k),
    off it is the softmax *before* top-k without renormalisation. No capacity factor and no
    padding: every routed token reaches its experts, and a decode step of a few rows sends only
    those few tokens through the experts."""
    if not model.is_moe:
        return {}
    return {
        "num_moe_experts": model.num_experts,
        "moe_router_topk": model.moe_router_topk,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
        "moe_router_pre_softmax": not model.moe_norm_topk_prob,
        "moe_router_score_function": "softmax",
        "moe_router_load_balancing_type": "aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        "moe_aux_loss_coeff": model.moe_aux_loss_coeff,
        "moe_expert_capacity_factor": None,
        "moe_pad_expert_input_to_capacity": False,
        # Grouped GEMM is TE's (or the grouped_gemm package's) CUDA kernel: GPU with TE only;
        # the local spec runs the experts one after another (SequentialMLP).
        "moe_grouped_gemm": on_gpu and model.transformer_impl == "transformer_engine",
        "expert_model_parallel_size": groups.ep_size,
        "expert_tensor_parallel_size": groups.expert_tp_size,
    }


def build_model(
    model_config: ModelConfig,
    role: Literal["student", "teacher"] = "student",
    *,
    groups: Optional[ParallelGroups] = None,
    seed: int = 1234,
    init: bool = True,
):
    """This rank's pipeline stage of a megatron-core GPTModel for `model_config`.

    `groups` defaults to the ones of `megatron_opcd.parallel.initialize()` (which must have run).
    With `init`, parameters get the layout-invariant random initialisation for `seed`; a
    checkpoint load overwrites them. The teacher comes back frozen.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_opcd import parallel

    if role not in ("student", "teacher"):
        raise ConfigError(f"role must be 'student' or 'teacher', got {role!r}")
    groups = groups or parallel.groups()
    model_config.check_parallel(
        ParallelConfig(
            tensor_model_parallel_size=groups.tp_size,
            pipeline_model_parallel_size=groups.pp_size,
            sequence_parallel=groups.sequence_parallel,
            expert_model_parallel_size=groups.ep_size,
            expert_tensor_parallel_size=groups.expert_tp_size,
        ),
        role="model" if role == "student" else "teacher",
    )
    check_runtime(model_config, role="model" if role == "student" else "teacher")
    if role == "teacher" and model_config.moe_aux_loss_coeff:
        # A frozen teacher is never trained: no load-balancing loss (its router runs under no_grad
        # anyway; this keeps megatron from even setting one up).
        model_config = dataclasses.replace(model_config, moe_aux_loss_coeff=0.0)
    config = transformer_config(model_config, groups)
    spec = layer_spec(
        model_config,
        sequence_parallel=groups.sequence_parallel,
        num_layers_in_stage=model_config.num_layers // groups.pp_size,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_config.padded_vocab_size(groups.tp_size),
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=model_config.tie_embeddings,
        position_embedding_type=model_config.position_embedding_type,
        rotary_percent=model_config.rotary_percent,
        rotary_base=model_config.rotary_base,
        rope_scaling=model_config.rope_scaling,
        rope_scaling_factor=model_config.rope_scaling_factor,
        pg_collection=groups.pg_collection,
    )
    install_output_layer(model)  # GPTModel builds it itself: the spec cannot name its class
    _apply_rope_scaling_details(model, model_config)
    _norms_in_model_dtype(model, config.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    if init:
        layout_invariant_init_(
            model,
            seed=seed,
            std=model_config.init_method_std,
            num_layers=model_config.num_layers,
            vocab_size=model_config.vocab_size,
            tp_rank=groups.tp_rank,
            tp_size=groups.tp_size,
            tied_embeddings=model_config.tie_embeddings,
            expert_tp_rank=groups.expert_tp_rank,
            expert_tp_size=groups.expert_tp_size,
        )
    if role == "teacher":
        freeze(model)
    return model


def _apply_rope_scaling_details(model, cfg: ModelConfig) -> None:
    """GPTModel exposes only Llama 3's scaling factor; the other three parameters are fixed at
    (1, 4, 8192) there. Recompute the frequencies when a config differs."""
    if not cfg.rope_scaling or (
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_position_embeddings,
    ) == (1.0, 4.0, 8192):
        return
    from megatron_opcd.compat import mcore

    rope = mcore.rotary_embedding(model)
    if rope is None:
        return
    mcore.rescale_rotary(
        rope,
        base=cfg.rotary_base,
        factor=cfg.rope_scaling_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
    )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher mode: no gradients, eval mode (no dropout), never trained."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def check_same_vocabulary(student: ModelConfig, teacher: ModelConfig) -> None:
    """Distillation compares the two models' distributions token by token: same vocabulary."""
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(
            f"teacher.vocab_size={teacher.vocab_size} differs from model.vocab_size={student.vocab_size}; "
            "the teacher and the student must share one tokenizer and vocabulary"
        )


def _pieces(tok) -> Optional[list[str]]:
    """Every id's token string, for the two tokenizer backends of data/tokenizer.py (None: unknown)."""
    sp = getattr(tok, "sp", None)
    if sp is not None:
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    hf = getattr(tok, "tok", None)
    if hf is not None and hasattr(hf, "convert_ids_to_tokens"):
        return list(hf.convert_ids_to_tokens(list(range(len(hf)))))
    return None


def check_same_tokenizer(student_tok, teacher_tok, teacher_where: str) -> None:
    """Same vocabulary size is not enough: every id must be the same token for both models."""
    a, b = _pieces(student_tok), _pieces(teacher_tok)
    first = None if a is None or b is None else next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if student_tok.vocab_size == teacher_tok.vocab_size and first is None:
        return
    detail = (f"; id {first} is {a[first]!r} for the student but {b[first]!r} for the teacher"
              if first is not None else f" ({student_tok.vocab_size} vs {teacher_tok.vocab_size} tokens)")
    raise ConfigError(
        f"the teacher's tokenizer ({teacher_where}) differs from the student's ({student_tok.name}){detail}; "
        "the teacher and the student must share one tokenizer"
    )


def build_models(student_config: ModelConfig, teacher_config: ModelConfig, *, groups=None,
                 seed: int = 1234, teacher_seed: Optional[int] = None, init: bool = True):
    """(student, teacher) for this rank, after checking that they share a vocabulary."""
    check_same_vocabulary(student_config, teacher_config)
    student = build_model(student_config, "student", groups=groups, seed=seed, init=init)
    teacher = build_model(teacher_config, "teacher", groups=groups,
                          seed=seed if teacher_seed is None else teacher_seed, init=init)
    return student, teacher
