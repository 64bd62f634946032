"""Hugging Face model folders on disk: lazy tensor reading, bounded-size shard writing, and the
side files (config, generation config, tokenizer) that travel with a checkpoint.

Reading never loads a whole file: `HFReader.get(name)` reads one tensor through safetensors'
`safe_open` (memory-mapped). Writing keeps at most one shard (`max_shard_bytes`) in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_opcd.errors import ConversionError

# Files copied between an HF folder and a megatron checkpoint's tokenizer/ folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
HF_CONFIG = "config.json"
"""The original HF config.json also travels in tokenizer/ (non-architectural fields such as token
ids are restored from it on export; AutoTokenizer also reads it to pick a tokenizer class)."""


def read_hf_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise ConversionError(f"{folder} does not exist; pass a Hugging Face model folder")
    cfg = folder / HF_CONFIG
    if not cfg.is_file():
        raise ConversionError(f"{folder} has no config.json: not a Hugging Face model folder")
    return json.loads(cfg.read_text(encoding="utf-8"))


def copy_side_files(src: str | Path, dest: str | Path, *, include_config: bool) -> list[str]:
    """Copy tokenizer / generation-config files (and config.json if asked) from src to dest."""
    src, dest = Path(src), Path(dest)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    names += sorted(p.name for p in src.glob("*.jinja") if p.name not in names)
    if include_config and (src / HF_CONFIG).is_file():
        names.append(HF_CONFIG)
    if names:
        dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dest / name)
    return names


class HFReader:
    """name -> tensor for the weights of an HF folder (safetensors, sharded or not; .bin fallback)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._bin: dict[str, torch.Tensor] = {}
        index = self.folder / "model.safetensors.index.json"
        files = sorted(self.folder.glob("*.safetensors"))
        if index.is_file():
            self._where = dict(json.loads(index.read_text())["weight_map"])
        elif files:
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self._where.update({k: f.name for k in h.keys()})
        else:
            bins = sorted(self.folder.glob("pytorch_model*.bin"))
            if not bins:
                raise ConversionError(f"{self.folder} has no *.safetensors or pytorch_model*.bin weights")
            for f in bins:
                # mmap: tensors are paged in when read, not all at once.
                self._bin.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            self._where = {k: "" for k in self._bin}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._where:
            raise ConversionError(f"{self.folder} has no tensor '{name}' (is it a *ForCausalLM checkpoint?)")
        if self._bin:
            return self._bin[name]
        fname = self._where[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.folder / fname), framework="pt")
        return self._handles[fname].get_tensor(name)

    __call__ = get

    def close(self) -> None:
        self._handles.clear()
        self._bin.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ShardWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes`
    (a single tensor larger than that gets a shard of its own) plus the index; a model that fits
    in one shard is written as `model.safetensors`. Holds at most one shard in memory."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max = int(max_shard_bytes)
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buf or any(name in names for _, names in self._parts):
            raise ConversionError(f"tensor '{name}' written twice")
        # A fresh contiguous CPU copy: safetensors refuses views that share storage (q/k/v of one qkv).
        tensor = tensor.detach().to("cpu").contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max:
            self._flush()
        self._buf[name] = tensor
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        part = f"part-{len(self._parts):05d}.safetensors.tmp"
        save_file(self._buf, str(self.folder / part), metadata={"format": "pt"})
        self._parts.append((part, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0  # free the shard before building the next

    def close(self) -> list[str]:
        """Flush, name the shards, write the index; returns the file names."""
        self._flush()
        n = len(self._parts)
        if n == 1:
            os.replace(self.folder / self._parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for k, (part, tensors) in enumerate(self._parts):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / part, self.folder / final)
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def write_state_dict(named_tensors: Iterable[tuple[str, torch.Tensor]], folder: str | Path,
                     max_shard_bytes: int = 2 * 1024**3) -> list[str]:
    writer = ShardWriter(folder, max_shard_bytes)
    for name, tensor in named_tensors:
        writer.add(name, tensor)
    return writer.close()


def save_in_memory_model(model, folder: Path, tokenizer=None, max_shard_bytes: int = 2 * 1024**3) -> None:
    """An in-memory HF model (e.g. loaded from GGUF, which `save_pretrained` refuses) written as a
    plain HF folder, one bounded shard at a time. Tied `lm_head.weight` is left out, as HF does."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HF_CONFIG).write_text(json.dumps(config.to_dict(), indent=2, default=str))
    write_state_dict(
        ((n, t) for n, t in model.state_dict().items()
         if not (tied and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq")),
        folder, max_shard_bytes,
    )
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception:  # noqa: BLE001 - a generation config is a convenience, not required
            pass
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            copy_side_files(tokenizer, folder, include_config=False)
        else:
            tokenizer.save_pretrained(folder)


def tokenizer_source(folder: Path) -> Optional[Path]:
    """folder itself if it holds tokenizer files, else None."""
    return folder if any((folder / n).is_file() for n in TOKENIZER_FILES if n != "generation_config.json") else None
