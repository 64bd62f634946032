"""Full tensors <-> this rank's tensor-parallel shard, and global parameter names under PP.

megatron-core marks every TP-split parameter with `tensor_model_parallel`, `partition_dim` and
`partition_stride`. A full tensor in megatron's layout is cut into `stride x tp` chunks along the
partition dim and rank r takes chunks r, r + tp, ... (this is what megatron's own
`_initialize_affine_weight_cpu` does; stride 2 is SwiGLU's fc1, whose full layout is [gate; up]).

Used by layout-invariant initialisation (the same weights at any TP/PP for a seed) and by the
Hugging Face checkpoint converter.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterator

import torch

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
# An expert's parameter: SequentialMLP's `experts.local_experts.<i>.<rest>` (the local spec), or
# TEGroupedMLP's `experts.linear_fc<n>.weight<i>` (TE's grouped GEMM), named in the first form.
_SEQUENTIAL_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_GROUPED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc\d+)\.(weight|bias)(\d+)$")


def partition_of(param: torch.Tensor) -> tuple[bool, int, int]:
    """(is_tensor_parallel, partition_dim, stride) of a megatron parameter."""
    if getattr(param, "tensor_model_parallel", False):
        return True, int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return False, -1, 1


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of `full` along `dim` (megatron's strided split)."""
    if size == 1:
        return full
    if full.shape[dim] % (stride * size):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {stride}x{size} chunks")
    chunks = torch.chunk(full, stride * size, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def unshard(pieces: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's piece, in rank order."""
    size = len(pieces)
    if size == 1:
        return pieces[0]
    per_rank = [torch.chunk(p, stride, dim=dim) for p in pieces]
    # Full order: chunk s of rank r sits at position s * size + r.
    ordered = [per_rank[r][s] for s in range(stride) for r in range(size)]
    return torch.cat(ordered, dim=dim)


def global_named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """`named_parameters()` with pipeline-stage-local layer indices replaced by global ones, and
    expert-parallel-local expert indices by global ones.

    megatron numbers a stage's layers from 0 in the module tree, but each TransformerLayer knows
    its global 1-based `layer_number`. Under EP, a rank holds experts ep_rank * n_local ... as
    `local_experts.0 ...`; its MoELayer lists their global indices (`local_expert_indices`). TE's
    grouped experts (`experts.linear_fc1.weight<i>`) are named as the sequential ones
    (`experts.local_experts.<global i>.linear_fc1.weight`): one name per expert weight whatever the
    implementation.
    """
    layer_numbers, expert_indices = {}, {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layer_numbers[i] = layer.layer_number - 1
            expert_indices[i] = list(getattr(layer.mlp, "local_expert_indices", ()))
    for name, param in model.named_parameters():
        m = _LAYER_RE.match(name)
        if m:
            local = int(m.group(2))
            name = f"{m.group(1)}{layer_numbers[local]}{m.group(3)}"
            e = _SEQUENTIAL_EXPERT_RE.match(name)
            g = _GROUPED_EXPERT_RE.match(name)
            if e:
                name = f"{e.group(1)}{expert_indices[local][int(e.group(2))]}{e.group(3)}"
            elif g:
                index = expert_indices[local][int(g.group(4))]
                name = f"{g.group(1)}local_experts.{index}.{g.group(2)}.{g.group(3)}"
        yield name, param


def is_expert_parameter(name: str) -> bool:
    """A routed expert's parameter (split over the expert TP group, not the TP group), by its name."""
    return ".mlp.experts." in name


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    is_tp, dim, _ = partition_of(param)
    shape = list(param.shape)
    if is_tp:
        shape[dim] *= tp_size
    return tuple(shape)


def _is_output_projection(name: str) -> bool:
    return name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight")


def layout_invariant_init_(model: torch.nn.Module, *, seed: int, std: float, num_layers: int,
                           vocab_size: int, tp_rank: int, tp_size: int, tied_embeddings: bool,
                           expert_tp_rank: int = 0, expert_tp_size: int = 1) -> None:
    """Initialise every parameter from (seed, global name) alone, then take this rank's shard.

    The same seed gives the same model at every TP/PP layout, so runs are reproducible across
    layouts and tests can compare layouts without copying weights. Scheme (as megatron's defaults):
    weights ~ N(0, std), output projections ~ N(0, std / sqrt(2 * num_layers)), norms 1, biases 0;
    embedding/output rows past `vocab_size` (TP padding) are 0. With tied embeddings, the last
    pipeline stage's copy of the word embeddings (`output_layer.weight`) gets the same values as
    the first stage's, which is what megatron's embedding-group all-reduce would make it. Experts
    are named by their global index (`global_named_parameters`) and split over the expert TP group
    (`expert_tp_rank`/`expert_tp_size`), so the experts are the same at any EP and expert TP too.
    """
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            if tied_embeddings and name == "output_layer.weight":
                name = "embedding.word_embeddings.weight"
            rank, size = (expert_tp_rank, expert_tp_size) if is_expert_parameter(name) else (tp_rank, tp_size)
            is_tp, dim, stride = partition_of(param)
            shape = full_shape(param, size)
            if "layernorm" in name or name.endswith("norm.weight"):
                full = torch.ones(shape)
            elif name.endswith("bias"):
                full = torch.zeros(shape)
            else:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()) + seed)
                sigma = std / (2.0 * num_layers) ** 0.5 if _is_output_projection(name) else std
                if "word_embeddings" in name or "output_layer" in name:
                    rows = torch.randn((vocab_size,) + shape[1:], generator=gen) * sigma
                    full = torch.zeros(shape)
                    full[:vocab_size] = rows
                else:
                    full = torch.randn(shape, generator=gen) * sigma
            local = shard(full, dim, stride, rank, size) if is_tp else full
            param.copy_(local.to(param.dtype))
