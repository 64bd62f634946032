"""Checkpoints in megatron-core `dist_checkpointing` format, written atomically.

Layout of a checkpoint folder:
    DIR/model/               megatron-core dist_checkpointing (torch_dist) of the model's
                             sharded_state_dict: loads at any TP/PP layout
    DIR/model_config.yaml    the ModelConfig it was built from (nothing to retype)
    DIR/tokenizer/           tokenizer files travelling with the weights (optional)
    DIR/<extra>              what the trainer adds (optimizer, RNG, data position)
    DIR/opcd_checkpoint.json written last: a folder without it is not a checkpoint

Atomicity: everything is written into `DIR.tmp-<nonce>` and renamed to DIR only after every rank
finished and the marker is in place, so a crash mid-save never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from megatron_opcd.config import ConfigError, ModelConfig, from_dict, to_dict

MARKER = "opcd_checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the problem."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "model_config.yaml"
    if not is_checkpoint(path) or not cfg_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete megatron-opcd checkpoint (no {MARKER} / model_config.yaml); "
            "point at a folder written by the trainer or tools/convert_checkpoint.py"
        )
    data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    try:
        return from_dict(ModelConfig, data, "model_config.yaml")
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


class AtomicCheckpointDir:
    """Context manager: yields a temporary folder (same on every rank); on clean exit, renames it
    to `final` (replacing an older one) after a barrier; on error, removes it."""

    def __init__(self, final: str | Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        nonce = _broadcast_str(f"{os.getpid()}-{time.time_ns()}")
        self.tmp = self.final.parent / f"{self.final.name}.tmp-{nonce}"
        if _rank() == 0:
            self.tmp.mkdir(parents=True, exist_ok=False)
        _barrier()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if _rank() == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _barrier()
        if _rank() == 0:
            if self.final.exists():
                old = self.final.parent / f"{self.final.name}.old-{time.time_ns()}"
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
        _barrier()
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_model_weights(model, folder: str | Path) -> None:
    """megatron-core dist_checkpointing save of `model` (one stage per rank) into folder/model."""
    from megatron.core import dist_checkpointing

    target = Path(folder) / "model"
    if _rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    _barrier()
    sharded = unwrap(model).sharded_state_dict(prefix="")
    # Synchronous save: a returned checkpoint is on disk.
    dist_checkpointing.save(sharded, str(target), async_sharded_save=False)


def load_model_weights(model, folder: str | Path, *, strict: bool = True) -> None:
    """Load folder/model into `model` at this process's TP/PP layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    source = Path(folder) / "model"
    if not source.is_dir():
        raise CheckpointError(f"{folder} has no model/ folder: not a megatron-opcd checkpoint")
    module = unwrap(model)
    sharded = module.sharded_state_dict(prefix="")
    try:
        state = dist_checkpointing.load(
            sharded, str(source), strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
        )
    except Exception as exc:  # noqa: BLE001 - megatron raises many types for bad checkpoints
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load model weights from {source}: {type(exc).__name__}: {first[:300]}; "
            "the checkpoint is corrupted, truncated or of another architecture"
        ) from exc
    module.load_state_dict(state, strict=False)


def save_checkpoint(
    path: str | Path,
    model,
    model_config: ModelConfig,
    *,
    meta: Optional[dict] = None,
    tokenizer_dir: Optional[str | Path] = None,
    extra_writers: tuple = (),
) -> Path:
    """Write a complete checkpoint to `path` atomically. `extra_writers` are callables
    `writer(tmp_folder)` run on every rank before the marker is written (optimizer, RNG...)."""
    path = Path(path)
    with AtomicCheckpointDir(path) as tmp:
        save_model_weights(model, tmp)
        for writer in extra_writers:
            writer(tmp)
        if _rank() == 0:
            (tmp / "model_config.yaml").write_text(yaml.safe_dump(to_dict(model_config), sort_keys=False))
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, tmp / "tokenizer", dirs_exist_ok=True)
            elif tokenizer_dir is not None and Path(tokenizer_dir).is_file():  # e.g. a sentencepiece .model
                (tmp / "tokenizer").mkdir(exist_ok=True)
                shutil.copy2(tokenizer_dir, tmp / "tokenizer" / Path(tokenizer_dir).name)
        _barrier()
        if _rank() == 0:
            record = {"format_version": FORMAT_VERSION, "saved_at": time.time(), **(meta or {})}
            marker = tmp / MARKER
            marker.write_text(json.dumps(record, indent=1))
            with open(marker, "rb+") as fh:
                os.fsync(fh.fileno())
    return path


def unwrap(model):
    """The GPTModel inside megatron wrappers (DDP, Float16Module)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def tokenizer_dir(path: str | Path) -> Optional[Path]:
    p = Path(path) / "tokenizer"
    return p if p.is_dir() else None

