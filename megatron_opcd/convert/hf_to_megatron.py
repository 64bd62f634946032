"""Hugging Face Llama / Qwen2 / Qwen3 / Qwen3-MoE -> megatron-core model (in memory) or checkpoint (on disk).

`load_hf_state_into_megatron` copies this rank's shards into an already-built model stage, one
parameter at a time: it reads the HF tensors of that parameter (lazily, through a getter), builds
the full megatron tensor (mappings.to_megatron), cuts this rank's TP slice and copies it in.

`hf_to_megatron` writes a checkpoint: it launches TP x PP local ranks (gloo), each builds its
stage, fills it from the safetensors files and `checkpointing.save_checkpoint` writes the
dist_checkpointing (torch_dist) folder, which loads at any TP/PP. Each rank holds its own shard of
the model plus the full tensors of one parameter at a time, so the ranks together hold one copy.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

from megatron_opcd.config import ModelConfig, ParallelConfig, from_dict, to_dict
# By its full name: `from megatron_opcd.convert import hf_files` would depend on the package's __init__,
# which imports this module (an import cycle: docs/architecture.md).
import megatron_opcd.convert.hf_files as hf_files
from megatron_opcd.convert.mappings import (
    architecture,
    architecture_of,
    hf_names,
    model_config_from_hf,
    rule_for,
    to_megatron,
)
from megatron_opcd.errors import ConfigError, ConversionError

HFState = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]

# HF tensors that carry no weights megatron needs (RoPE buffers are recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _getter(state: HFState) -> Callable[[str], torch.Tensor]:
    if callable(state) and not isinstance(state, Mapping):
        return state

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ConversionError(f"the Hugging Face state has no tensor '{name}' (is it a *ForCausalLM state dict?)")
        return state[name]

    return get


def load_hf_state_into_megatron(model, hf_state: HFState, model_config: ModelConfig, groups=None) -> set[str]:
    """Copy this rank's shards of an HF Llama / Qwen2 / Qwen3 state into a built megatron stage.

    `hf_state` is a dict name -> tensor (e.g. `hf_model.state_dict()`) or a callable name -> tensor
    (e.g. `HFReader(path).get`, which reads safetensors lazily). `model_config` is the one the
    model was built from (`model_config_from_hf(hf_config)`); `groups` defaults to
    `megatron_opcd.parallel.groups()`. Every megatron parameter is written (a parameter without a
    mapping raises); returns the HF names read. With a dict and a single pipeline stage, HF tensors
    that nothing read raise too (they would mean a model built for another architecture).
    """
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import unwrap
    from megatron_opcd.models.sharding import (
        full_shape,
        global_named_parameters,
        is_expert_parameter,
        partition_of,
        shard,
    )

    groups = groups or parallel.groups()
    module = unwrap(model)
    arch = architecture_of(model_config)
    get = _getter(hf_state)
    padded = model_config.padded_vocab_size(groups.tp_size)
    used: set[str] = set()
    with torch.no_grad():
        for name, param in global_named_parameters(module):
            source = name
            if model_config.tie_embeddings and name == "output_layer.weight":
                # Tied embeddings with PP > 1: the last stage's copy of the input embedding.
                source = "embedding.word_embeddings.weight"
            rule, index = rule_for(arch, source)
            names = hf_names(rule, index)
            full = to_megatron(rule, [get(n) for n in names], model_config, padded)
            # An expert's weights split over the expert TP group (its own size under EP), the rest over TP.
            rank, size = ((groups.expert_tp_rank, groups.expert_tp_size) if is_expert_parameter(name)
                          else (groups.tp_rank, groups.tp_size))
            expected = full_shape(param, size)
            if tuple(full.shape) != tuple(expected):
                raise ConversionError(
                    f"{name}: the Hugging Face tensors {names} give shape {tuple(full.shape)}, the megatron model "
                    f"has {tuple(expected)}; the model was built from another config than this checkpoint"
                )
            is_tp, dim, stride = partition_of(param)
            local = shard(full, dim, stride, rank, size) if is_tp else full
            param.copy_(local.to(device=param.device, dtype=param.dtype))
            used.update(names)
            del full, local  # only one parameter's full tensors are alive at a time
    # Only a rank that holds every layer and every expert can tell an unused tensor.
    if isinstance(hf_state, Mapping) and groups.pp_size == 1 and groups.ep_size == 1:
        unused = sorted(n for n in hf_state if n not in used and not _ignorable(n, model_config))
        if unused:
            raise ConversionError(
                f"Hugging Face tensors not used by the {arch.model_type} mapping: {unused[:4]}"
                f"{' ...' if len(unused) > 4 else ''}; the model was built for another architecture"
            )
    return used


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and name == "lm_head.weight")


# ----------------------------------------------------------------------------------------------
# Checkpoint writing


def _dtype_name(hf_cfg: dict, dtype: Optional[str]) -> str:
    if dtype is not None:
        if dtype not in ("bf16", "fp32"):
            raise ConversionError(f"dtype must be bf16 or fp32, got {dtype!r}")
        return dtype
    src = str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")
    return "fp32" if src in ("float32", "torch.float32") else "bf16"


def _check_out_dir(out: Path) -> None:
    from megatron_opcd.checkpointing import is_checkpoint

    if out.exists() and any(out.iterdir()) and not is_checkpoint(out):
        raise ConversionError(f"{out} exists and is not a megatron-opcd checkpoint; choose a new --out folder")


def _convert_rank(hf_dir: str, out_dir: str, cfg_dict: dict, tp: int, pp: int, side_dir: Optional[str],
                  meta: dict, ep: int = 1) -> dict:
    """One rank of `hf_to_megatron`: build this stage, fill it from the HF files, save."""
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import save_checkpoint
    from megatron_opcd.models import build_model

    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                expert_model_parallel_size=ep))
    cfg = from_dict(ModelConfig, cfg_dict)
    # init=False: no layout-invariant init (every parameter is overwritten below). An MoE model is
    # built as a teacher: nothing is trained here, and a student under TP would need SP.
    model = build_model(cfg, "teacher" if cfg.is_moe else "student", groups=groups, init=False)
    with hf_files.HFReader(hf_dir) as reader:
        used = load_hf_state_into_megatron(model, reader.get, cfg, groups)
        available = reader.keys()
    save_checkpoint(out_dir, model, cfg, meta=meta, tokenizer_dir=side_dir)
    return {"used": sorted(used), "available": available}


def hf_to_megatron(hf_path_or_model: Any, out_dir: str | Path, tp: int = 1, pp: int = 1,
                   dtype: Optional[str] = None, *, ep: int = 1, make_vocab_size_divisible_by: int = 128,
                   tokenizer: Any = None, source: Optional[str] = None, timeout: float = 3600.0) -> Path:
    """Convert an HF Llama / Qwen2 / Qwen3 model to a megatron-opcd checkpoint at TP x PP.

    `hf_path_or_model`: an HF folder (config.json + safetensors) or an in-memory
    `*ForCausalLM` (written to a temporary folder shard by shard first: `save_pretrained`
    refuses models loaded from GGUF). `dtype`: bf16 | fp32; default: fp32 if the HF weights are
    fp32, else bf16. `tokenizer`: a folder or an HF tokenizer object, for in-memory models (a
    folder's own tokenizer files are always taken). `source`: what an in-memory model was read
    from (e.g. a GGUF file), recorded as `converted_from`. `ep`: expert-parallel ranks for an MoE
    model (Qwen3-MoE; expert TP = TP). Runs TP x PP x EP local ranks (EP x TP per pipeline stage, as
    megatron-core lays the experts over DP x TP); returns `out_dir`, which loads at any TP/PP/EP.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    with tempfile.TemporaryDirectory(prefix="opcd-convert-") as tmp:
        tmp = Path(tmp)
        if isinstance(hf_path_or_model, (str, Path)):
            hf_dir = Path(hf_path_or_model)
            if tokenizer is not None:
                raise ConversionError("tokenizer= is for in-memory models; an HF folder brings its own tokenizer")
        else:
            if not hasattr(hf_path_or_model, "state_dict") or not hasattr(hf_path_or_model, "config"):
                raise ConversionError(
                    f"expected an HF model folder or a transformers model, got {type(hf_path_or_model).__name__}"
                )
            hf_dir = tmp / "hf"
            architecture(str(hf_path_or_model.config.model_type))  # refuse before writing anything
            hf_files.save_in_memory_model(hf_path_or_model, hf_dir, tokenizer)
        hf_cfg = hf_files.read_hf_config(hf_dir)
        cfg = model_config_from_hf(hf_cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                   params_dtype=_dtype_name(hf_cfg, dtype))
        check_layout(cfg, tp, pp, ep)
        side = tmp / "side"
        copied = hf_files.copy_side_files(hf_dir, side, include_config=True)
        meta = {"converted_from": str(hf_path_or_model) if isinstance(hf_path_or_model, (str, Path))
                else source or "memory",
                "hf_model_type": hf_cfg["model_type"], "tp": tp, "pp": pp, "ep": ep}
        results = run_conversion_ranks(
            _convert_rank, tp * pp * ep,
            (str(hf_dir), str(out), to_dict(cfg), tp, pp, str(side) if copied else None, meta, ep),
            timeout=timeout,
        )
    used = set().union(*(set(r["used"]) for r in results))
    unused = sorted(n for n in results[0]["available"] if n not in used and not _ignorable(n, cfg))
    if unused:
        # The checkpoint is written but incomplete: remove it rather than leave a wrong model.
        shutil.rmtree(out, ignore_errors=True)
        raise ConversionError(
            f"Hugging Face tensors not used by the {hf_cfg['model_type']} mapping: {unused[:4]}"
            f"{' ...' if len(unused) > 4 else ''}; this checkpoint has weights the converter does not know"
        )
    return out


_EXPECTED = re.compile(r"^(?:\w+\.)*(ConversionError|CheckpointError|ConfigError): (.+)$", re.M)


def run_conversion_ranks(fn, world_size: int, args: tuple, timeout: float) -> list:
    """`launcher.run_on_ranks`, with an expected error of a rank (bad tensor shape, missing tensor,
    unreadable checkpoint) turned back into a one-line ConversionError instead of tracebacks."""
    from megatron_opcd.launcher import RanksFailed, run_on_ranks

    try:
        return run_on_ranks(fn, world_size, args, timeout=timeout)
    except RanksFailed as exc:
        m = _EXPECTED.search(str(exc))
        if m is None:
            raise
        raise ConversionError(m.group(2).strip()) from exc


def check_layout(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> None:
    if tp < 1 or pp < 1 or ep < 1:
        raise ConversionError(f"--tp, --pp and --ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
    if ep > 1 and not cfg.is_moe:
        raise ConversionError(f"--ep={ep} is for mixture-of-experts models; this one is dense: drop --ep")
    try:
        cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          expert_model_parallel_size=ep))
    except ConfigError as exc:
        raise ConversionError(str(exc).replace("parallel.tensor_model_parallel_size", "--tp")
                              .replace("parallel.pipeline_model_parallel_size", "--pp")
                              .replace("parallel.expert_model_parallel_size", "--ep")) from None
