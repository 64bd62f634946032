"""Checkpoint conversion between Hugging Face (Llama 3.x, Qwen2/2.5, Qwen3) and megatron-core.

    model_config_from_hf(hf_config)                      -> ModelConfig
    load_hf_state_into_megatron(model, state, cfg, groups)  this rank's shards into a built stage
    hf_to_megatron(hf_path_or_model, out_dir, tp, pp, dtype)  -> megatron-opcd checkpoint folder
    megatron_to_hf(ckpt_dir, out_path)                    -> HF folder (from_pretrained loads it)

The parameter mapping of each architecture is one table in `mappings.py`. CLI:
`tools/convert_checkpoint.py`; guide: docs/conversion.md.
"""

from megatron_opcd.convert.hf_files import HFReader
from megatron_opcd.convert.hf_to_megatron import hf_to_megatron, load_hf_state_into_megatron
from megatron_opcd.convert.mappings import ARCHITECTURES, architecture_of, model_config_from_hf
from megatron_opcd.convert.megatron_to_hf import megatron_to_hf

__all__ = [
    "ARCHITECTURES",
    "HFReader",
    "architecture_of",
    "hf_to_megatron",
    "load_hf_state_into_megatron",
    "megatron_to_hf",
    "model_config_from_hf",
]
