"""megatron-opcd checkpoint (any TP/PP it was saved at) -> Hugging Face folder.

One process loads the dist_checkpointing folder into a TP=1 / PP=1 model (torch_dist re-shards
on load), then walks the parameters through the architecture's mapping table, writing safetensors
shards of bounded size and freeing each megatron parameter once it is written.

Memory: one copy of the model in its checkpoint dtype (what the load needs), plus at most one
output shard (`max_shard_bytes`, 2 GiB by default) plus the full tensors of one parameter. The
freed parameters make room for the shards as the export proceeds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_opcd.config import ModelConfig, from_dict, to_dict
# By its full name: `from megatron_opcd.convert import hf_files` would depend on the package's __init__,
# which imports this module (an import cycle: docs/architecture.md).
import megatron_opcd.convert.hf_files as hf_files
from megatron_opcd.convert.mappings import (
    ARCHITECTURES,
    architectural_differences,
    architecture,
    architecture_of,
    hf_config_fields,
    hf_names,
    model_config_from_hf,
    rule_for,
    to_hf,
)
from megatron_opcd.errors import ConversionError

_DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp32": (torch.float32, "float32"),
           "fp16": (torch.float16, "float16")}


def _export_rank(ckpt_dir: str, out_dir: str, cfg_dict: dict, model_type: str, dtype: str,
                 max_shard_bytes: int) -> dict:
    """Load the checkpoint at TP=1/PP=1 and write the HF safetensors shards."""
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.models import build_model
    from megatron_opcd.models.sharding import global_named_parameters

    parallel.initialize(ParallelConfig())
    cfg = from_dict(ModelConfig, cfg_dict)
    arch = ARCHITECTURES[model_type]
    model = build_model(cfg, "teacher", init=False)  # teacher: frozen, no grads
    load_model_weights(model, ckpt_dir)
    torch_dtype = _DTYPES[dtype][0]
    writer = hf_files.ShardWriter(out_dir, max_shard_bytes)
    written = []
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            rule, index = rule_for(arch, name)
            for hf_name, tensor in zip(hf_names(rule, index), to_hf(rule, param.detach(), cfg)):
                writer.add(hf_name, tensor.to(torch_dtype))
                written.append(hf_name)
            # The parameter is in the writer's buffer now (or on disk): free the model's copy.
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    files = writer.close()
    return {"written": written, "files": files}


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / hf_files.HF_CONFIG).is_file():
        raise ConversionError(f"{out} exists and is not a Hugging Face model folder; choose a new --out folder")


def megatron_to_hf(ckpt_dir: str | Path, out_path: str | Path, *, arch: Optional[str] = None,
                   dtype: Optional[str] = None, max_shard_bytes: int = 2 * 1024**3,
                   timeout: float = 3600.0) -> Path:
    """Export a megatron-opcd checkpoint to an HF folder that `AutoModelForCausalLM.from_pretrained`
    loads: config.json, safetensors shards (+ index), generation_config.json, tokenizer files.

    `arch`: the expected model_type (llama | qwen2 | qwen3 | qwen3_moe); a checkpoint of another architecture
    is refused. Default: inferred from the checkpoint's ModelConfig (experts: qwen3_moe; QK-norm:
    qwen3; QKV bias: qwen2; neither: llama). A checkpoint saved at any EP loads here at EP=1.
    `dtype`: bf16 | fp32 | fp16, default the checkpoint's. Returns out_path.
    """
    from megatron_opcd.checkpointing import read_model_config, tokenizer_dir
    from megatron_opcd.convert.hf_to_megatron import run_conversion_ranks
    from megatron_opcd.errors import CheckpointError

    ckpt, out = Path(ckpt_dir), Path(out_path)
    if not ckpt.exists():
        raise ConversionError(f"{ckpt} does not exist; pass a megatron-opcd checkpoint folder as --ckpt")
    try:
        cfg = read_model_config(ckpt)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    found = architecture_of(cfg)
    tok_dir = tokenizer_dir(ckpt)
    original = _original_hf_config(tok_dir)
    if original is not None and original.get("model_type") in ARCHITECTURES:
        recorded = architecture(original["model_type"])
        if (recorded.qk_norm, recorded.qkv_bias, recorded.moe) == (found.qk_norm, found.qkv_bias, found.moe):
            found = recorded
    if arch is not None:
        asked = architecture(arch)
        if asked.model_type != found.model_type:
            raise ConversionError(
                f"{ckpt} holds a {found.model_type} model (qk_layernorm={cfg.qk_layernorm}, "
                f"add_qkv_bias={cfg.add_qkv_bias}), not {asked.model_type}; "
                f"drop --arch or pass --arch {found.model_type}"
            )
    dtype = dtype or cfg.params_dtype
    if dtype not in _DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    config = _hf_config(found, cfg, original, dtype)
    _check_out(out)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir(parents=True)
        run_conversion_ranks(_export_rank, 1, (str(ckpt), str(tmp), to_dict(cfg), found.model_type, dtype,
                                               max_shard_bytes), timeout=timeout)
        (tmp / hf_files.HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tok_dir is not None:
            hf_files.copy_side_files(tok_dir, tmp, include_config=False)
        if not (tmp / "generation_config.json").is_file():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if out.exists():
            shutil.rmtree(out)  # an earlier export (checked above): replaced whole
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _original_hf_config(tok_dir: Optional[Path]) -> Optional[dict]:
    if tok_dir is None or not (tok_dir / hf_files.HF_CONFIG).is_file():
        return None
    return json.loads((tok_dir / hf_files.HF_CONFIG).read_text(encoding="utf-8"))


def _hf_config(arch, cfg: ModelConfig, original: Optional[dict], dtype: str) -> dict:
    """config.json: the original HF config's other fields (token ids, ...) when it travelled with the
    checkpoint, with every architectural field taken from the checkpoint's ModelConfig."""
    base = dict(original) if original and original.get("model_type") == arch.model_type else {}
    for stale in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "rope_scaling", "rope_theta",
                  "rope_parameters", "head_dim"):
        base.pop(stale, None)
    base.update(hf_config_fields(arch, cfg))
    base["dtype"] = base["torch_dtype"] = _DTYPES[dtype][1]
    # Self-check: reading the written config back must give the checkpoint's architecture.
    diffs = architectural_differences(model_config_from_hf(base), cfg)
    if diffs:
        raise ConversionError(f"internal error: exported config differs from the checkpoint: {diffs}")
    return base
