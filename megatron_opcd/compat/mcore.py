"""The megatron-core internals this project relies on beyond its public API, each in one place.

The public API (GPTModel's constructor and forward, TransformerConfig, parallel_state through
parallel.py, the pipeline schedules, DistributedDataParallel and its config, finalize_model_grads,
get_megatron_optimizer, dist_checkpointing.save/load, the tensor_parallel mappings and RNG tracker)
is used where it is needed. What megatron-core does not promise to keep (the attribute layout of
GPTModel and its layers, how GPTModel calls its output layer, DDP's gradient buffers, a private
module-level queue of dist_checkpointing) is reached only through the functions below. Each
assumption has a name in `ASSUMPTIONS`, and tests/test_mcore_contract.py checks every one of them
against the installed megatron-core by that name: after an upgrade, a moved internal is one failing
test that names it, not a failure deep in a training run.

Measured on megatron-core 0.16.1 and 0.19.2 (CI runs both; docs/compatibility.md): every assumption
holds on both. The one entry that differs between them is `writer_queue_getter` (megatron renamed
its getter of the checkpoint writers' queue; the global the project sets is the same).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

# name -> what the project assumes (the contract test has one case per name).
ASSUMPTIONS = {
    # GPTModel's anatomy (models/common/language_module, models/gpt/gpt_model.py)
    "gpt_stage_pieces": "GPTModel has embedding (first stage), decoder (a TransformerBlock), output_layer (last "
                        "stage), pre_process/post_process, share_embeddings_and_output_weights, "
                        "shared_embedding_or_output_weight() and set_input_tensor()",
    "embedding_call": "GPTModel.embedding(input_ids=[b, s], position_ids=[b, s]) -> [s, b, h]",
    "decoder_call": "GPTModel.decoder(hidden_states=, attention_mask=, rotary_pos_emb=) -> [s, b, h], final norm "
                    "included; rotary_pos_emb [s, b, 1, d] is applied per row",
    "output_layer_call": "GPTModel.output_layer(hidden [s, b, h], weight=, runtime_gather_output=) -> "
                         "(logits [s, b, v], bias); GPTModel hands it the hidden states positionally",
    "rotary_table": "GPTModel.rotary_pos_emb(n) -> [n, 1, 1, d] angles; its inv_freq and _apply_scaling "
                    "(Llama 3 rope scaling) exist",
    "layer_anatomy": "a layer spec (local and TE) names its leaves in submodules.self_attention.submodules."
                     "{core_attention, linear_qkv, linear_proj} and submodules.mlp.submodules.{linear_fc1, "
                     "linear_fc2} (from 0.19 the local spec's mlp is a functools.partial whose submodules= "
                     "keyword holds {linear_fc1, "
                     "linear_fc2}, built as decoder.layers[i].self_attention.{core_attention, linear_qkv, "
                     "linear_proj, layer_number} and .mlp.{linear_fc1, linear_fc2}; core_attention is called "
                     "as (query, key, value, "
                     "attention_mask, attn_mask_type=, attention_bias=, packed_seq_params=) with "
                     "query [s, b, heads/tp, d] and returns [s, b, heads/tp * d]",
    "local_linears": "tensor_parallel.layers.{ColumnParallelLinear, RowParallelLinear} carry weight, bias, "
                     "skip_bias_add, tp_group, sequence_parallel (read per call: the trainer's output "
                     "hook switches it off for one call), and (column) gather_output",
    "sequence_parallel_switch": "transformer.utils.set_model_to_sequence_parallel(module, bool) flips every "
                                "module's sequence_parallel",
    "local_spec_norms": "get_gpt_layer_local_spec().submodules has input_layernorm and pre_mlp_layernorm; "
                        "TransformerBlockSubmodules(layer_specs=, layer_norm=) sets the final norm",
    "moe_anatomy": "get_gpt_layer_local_spec(num_experts=n) gives an mlp whose submodules are MoESubmodules "
                   "(experts, shared_experts) with no linear_fc1; the built MoELayer has router (weight "
                   "[experts, hidden]) and experts.local_experts[i].{linear_fc1, linear_fc2} (SequentialMLP), "
                   "the local expert i being global expert ep_rank * num_local_experts + i; router(hidden) returns "
                   "(probs, routing_map [tokens, experts]) and router.gating(hidden) the logits",
    "viewless_tensor": "megatron.core.utils.make_viewless_tensor makes its viewless tensors through the "
                       "module-level _kernel_make_viewless_tensor(inp, requires_grad) (which sets .data, "
                       "something torch.compile cannot trace)",
    # DistributedDataParallel (distributed/distributed_data_parallel.py, param_and_grad_buffer.py)
    "ddp_grad_buffers": "DistributedDataParallel accumulates gradients into param.main_grad and clears them "
                        "with zero_grad_buffer()",
    # dist_checkpointing (strategies/filesystem_async.py)
    "checkpoint_writer_queue": "dist_checkpointing.strategies.filesystem_async._results_queue is a module global, "
                               "None until the first save creates a Manager queue in it",
}


# --- GPTModel's stage pieces -------------------------------------------------------------------

def embed(module, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The first stage's embedding: tokens [b, s] -> hidden [s, b, h] (assumption embedding_call)."""
    return module.embedding(input_ids=tokens, position_ids=position_ids)


def run_decoder(module, hidden: torch.Tensor, attention_mask, rotary: Optional[torch.Tensor]) -> torch.Tensor:
    """This stage's TransformerBlock, final norm included (assumption decoder_call)."""
    return module.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)


def output_logits(module, hidden: torch.Tensor, *, gather: bool) -> torch.Tensor:
    """The last stage's output layer on hidden [s, b, h] -> logits [s, b, V or V/tp], with the
    tied embedding's weight where GPTModel would pass it (assumption output_layer_call)."""
    weight = module.shared_embedding_or_output_weight() if module.share_embeddings_and_output_weights else None
    logits, _ = module.output_layer(hidden, weight=weight, runtime_gather_output=gather)
    return logits


def rotary_table(module, max_positions: int) -> torch.Tensor:
    """RoPE angles of positions 0..n-1, [n, d] (assumption rotary_table)."""
    return module.rotary_pos_emb(max_positions)[:, 0, 0, :]


def rotary_embedding(module):
    """GPTModel's RotaryEmbedding module, or None without RoPE (assumption rotary_table)."""
    return getattr(module, "rotary_pos_emb", None)


def rescale_rotary(rope, *, base: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> None:
    """Recompute a RotaryEmbedding's frequencies with Llama 3 scaling parameters GPTModel does not
    expose (it fixes three of the four) (assumption rotary_table)."""
    dim = rope.inv_freq.numel() * 2
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    rope.inv_freq = rope._apply_scaling(freqs, factor=factor, low_freq_factor=low_freq_factor,
                                        high_freq_factor=high_freq_factor,
                                        original_max_position_embeddings=original_max_position_embeddings)


# --- The layers' leaves, where the model is built with the generation kernels ------------------

LINEAR_LEAVES = (("self_attention", "linear_qkv"), ("self_attention", "linear_proj"), ("mlp", "linear_fc1"),
                 ("mlp", "linear_fc2"))


def replace_layer_leaves(spec, *, attention: Callable, linear: Callable):
    """A copy of the layer spec `spec` whose core attention class is `attention(cls)` and whose four
    linears are `linear(cls)` (assumption layer_anatomy). A copy: megatron's spec functions may hand
    out module-level objects."""
    import copy

    spec = copy.deepcopy(spec)  # ModuleSpecs and dataclasses; the classes in them are kept, not copied
    attn = _submodules_of(spec.submodules.self_attention)
    attn.core_attention = attention(attn.core_attention)
    for block, leaf in LINEAR_LEAVES:
        holder = _submodules_of(getattr(spec.submodules, block))
        if block == "mlp" and is_moe_submodules(holder):
            continue  # megatron's MoE layer keeps its own expert linears (see is_moe_submodules)
        setattr(holder, leaf, linear(getattr(holder, leaf)))
    return spec


def is_moe_submodules(holder) -> bool:
    """True for the submodules of a mixture-of-experts MLP (megatron's MoESubmodules: experts,
    shared_experts; assumption moe_anatomy). Their linears are left as megatron builds them: the
    experts' row-parallel linears skip the TP reduction (the token dispatcher does it), which the
    forward-only linear would not know."""
    return hasattr(holder, "experts") and not hasattr(holder, "linear_fc1")


def _submodules_of(block):
    """The submodules of one block of a layer spec: a ModuleSpec's `.submodules`; from megatron-core
    0.19 the local spec's MLP is `functools.partial(MLP.as_mlp_submodule, submodules=...)` instead
    (a deep copy of a partial copies its keywords, so the copy is the one edited)."""
    if isinstance(block, functools.partial):
        return block.keywords["submodules"]
    return block.submodules


def attention_cores(module):
    """(layer_number, core_attention module) per layer of this stage (assumption layer_anatomy)."""
    for layer in module.decoder.layers:
        yield layer.self_attention.layer_number, layer.self_attention.core_attention


def moe_routers(module):
    """(layer_number, router) per mixture-of-experts layer of this stage (assumption moe_anatomy:
    `layer.mlp.router`, called as router(hidden) -> (probs, routing_map [tokens, experts]), with
    `router.gating(hidden)` -> logits [tokens, experts])."""
    for layer in module.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None:
            yield layer.layer_number, router
def make_viewless_traceable() -> None:
    """Let torch.compile trace megatron's layers (assumption viewless_tensor): their outputs go
    through `make_viewless_tensor`, which swaps `.data` of a fresh tensor, a graph break in every
    layer. While compiling, the wrapper returns the tensor as it is (a traced graph has no views
    to detach from, and the compiled decode step runs without autograd); eager calls, training's
    included, run megatron's own function. Idempotent."""
    from megatron.core import utils

    original = utils._kernel_make_viewless_tensor
    if getattr(original, "opcd_traceable", False):
        return

    @functools.wraps(original)
    def kernel(inp, requires_grad):
        if torch.compiler.is_compiling():
            return inp
        return original(inp, requires_grad)

    kernel.opcd_traceable = True
    utils._kernel_make_viewless_tensor = kernel


def local_linear_classes() -> tuple[type, type]:
    """(ColumnParallelLinear, RowParallelLinear), the local spec's linears (assumption local_linears)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def set_sequence_parallel(module, enabled: bool) -> None:
    """Switch sequence parallelism on every submodule (assumption sequence_parallel_switch)."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    set_model_to_sequence_parallel(module, enabled)


def local_spec_with_norm(spec, norm, num_layers: int, *, qk_norm: bool = False):
    """The local layer spec with `norm` as every layer's two norms (and, with `qk_norm`, the
    attention's q/k norms) and the block's final norm (assumption local_spec_norms)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if qk_norm:
        attn = spec.submodules.self_attention.submodules
        attn.q_layernorm = norm
        attn.k_layernorm = norm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm)


# --- The output layer, hooked by the trainer -----------------------------------------------------

def output_layer(module):
    """The output layer of a last pipeline stage (None elsewhere) (assumption gpt_stage_pieces)."""
    return getattr(module, "output_layer", None) if getattr(module, "post_process", False) else None


def hook_output_layer(layer, *, hidden: Callable[[torch.Tensor], torch.Tensor],
                      logits: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Forward hooks on GPTModel's output layer: `hidden` maps the hidden states it receives
    ([S, b, h]), `logits` the logits it returns. Returns the handles to remove (assumption
    output_layer_call: the hidden states are the first positional argument, the result is
    (logits, bias))."""

    def pre(_layer, args):
        return (hidden(args[0]), *args[1:])

    def post(_layer, _args, output):
        return (logits(output[0]), *output[1:])

    return [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]


# --- DistributedDataParallel's gradient buffers --------------------------------------------------

def zero_grad_buffer(model) -> None:
    """Zero megatron DDP's contiguous gradient buffers (nothing for a bare module) (assumption
    ddp_grad_buffers)."""
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()


def main_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient megatron accumulated for `param`: DDP's main_grad, else .grad (assumption
    ddp_grad_buffers)."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


# --- dist_checkpointing's writer queue -----------------------------------------------------------

def writer_queue_unset() -> bool:
    """True when dist_checkpointing has not yet created its writers' results queue, so one can be
    installed (assumption checkpoint_writer_queue; False too if the global is gone)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return getattr(filesystem_async, "_results_queue", False) is None


def set_writer_queue(queue) -> None:
    """Install `queue` as the async filesystem writers' results queue (assumption
    checkpoint_writer_queue)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue


def writer_queue_getter():
    """megatron's function that hands the writers that queue: `_get_write_results_queue()` in
    0.16, `get_write_results_queue(mp_mode=)` from 0.17 (the one adapter entry that differs between
    the releases CI runs; only the contract test calls it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    for name in ("get_write_results_queue", "_get_write_results_queue"):
        if hasattr(filesystem_async, name):
            return getattr(filesystem_async, name)
    raise AttributeError("dist_checkpointing.strategies.filesystem_async has no get_write_results_queue")
