"""Trainer checkpoints: the student (never the teacher), optimizer, LR schedule, RNG, data position.

    RUN/step_0000010/   one checkpoint (checkpointing.save_checkpoint layout) plus
        optimizer/       megatron-core optimizer sharded_state_dict (dist_checkpointing)
        rng/rank_00000.pt  per-rank RNG states (torch CPU/CUDA, megatron's tracker, python)
        opcd_checkpoint.json: step, data position, scheduler state, metrics (written last)

Resume picks the newest complete `step_*` folder; incomplete ones (a crash mid-save leaves only
`step_*.tmp-*`) are ignored and cleaned up. Retention keeps the newest `keep_last`.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.checkpointing import (
    CheckpointError,
    _first_line,
    _io_failures,
    is_checkpoint,
    load_model_weights,
    read_meta,
    save_checkpoint,
    unwrap,
)

_STEP_RE = re.compile(r"^step_(\d{7})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:07d}"


def find_latest(path: str | Path) -> Optional[Path]:
    """The newest complete checkpoint in a run folder, or `path` itself if it is one."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), child)
        for child in path.iterdir()
        if (m := _STEP_RE.match(child.name)) and is_checkpoint(child)
    )
    return found[-1][1] if found else None


def cleanup_incomplete(run_dir: str | Path) -> list[str]:
    """Remove leftovers of interrupted saves (`*.tmp-*`, `*.old-*`); rank 0 only.

    A kill between the two renames of a re-save (`X -> X.old-*`, `X.tmp-* -> X`) leaves only
    `X.old-*`: that complete checkpoint is renamed back to X instead of being removed."""
    removed = []
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (dist.is_initialized() and dist.get_rank() != 0):
        return removed
    for child in sorted(run_dir.iterdir()):
        name, sep, _ = child.name.partition(".old-")
        if sep and not (run_dir / name).exists() and is_checkpoint(child):
            child.rename(run_dir / name)
    for child in run_dir.iterdir():
        if ".tmp-" in child.name or ".old-" in child.name:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def apply_retention(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0 or (dist.is_initialized() and dist.get_rank() != 0):
        return
    steps = sorted(
        (int(m.group(1)), child) for child in Path(run_dir).iterdir() if (m := _STEP_RE.match(child.name))
    )
    for _, child in steps[:-keep_last]:
        shutil.rmtree(child, ignore_errors=True)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_checkpoint(run_dir, step: int, *, model, optimizer, scheduler, model_config,
                             data_position: int, tokenizer_dir=None, extra_meta: Optional[dict] = None) -> Path:
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = unwrap(model)

    def write_optimizer(tmp: Path) -> None:
        target = tmp / "optimizer"
        if rank == 0:
            target.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        sharded = optimizer.sharded_state_dict(module.sharded_state_dict(prefix=""))
        dist_checkpointing.save(sharded, str(target), async_sharded_save=False)

    def write_rng(tmp: Path) -> None:
        folder = tmp / "rng"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), folder / f"rank_{rank:05d}.pt")

    meta = {"step": step, "data_position": data_position, "scheduler": scheduler.state_dict(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1, **(extra_meta or {})}
    path = save_checkpoint(step_dir(run_dir, step), model, model_config, meta=meta,
                           tokenizer_dir=tokenizer_dir, extra_writers=(write_optimizer, write_rng))
    return path


def load_training_checkpoint(path, *, model, optimizer, scheduler) -> dict:
    """Restore everything `save_training_checkpoint` wrote; returns its metadata."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_meta(path)
    load_model_weights(model, path)
    module = unwrap(model)
    if optimizer is not None and (path / "optimizer").is_dir():
        try:
            sharded = optimizer.sharded_state_dict(module.sharded_state_dict(prefix=""), is_loading=True)
            state = dist_checkpointing.load(sharded, str(path / "optimizer"))
            optimizer.load_state_dict(state)
        except _io_failures() as exc:  # torch's CheckpointException is a BaseException
            raise CheckpointError(f"cannot load the optimizer state from {path}/optimizer: {_first_line(exc, 200)}; "
                                  "the checkpoint is corrupted or truncated") from exc
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file() and meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a truncated file raises RuntimeError/EOFError/UnpicklingError
            raise CheckpointError(f"cannot read {rng_file}: {_first_line(exc, 200)}; the checkpoint is corrupted "
                                  "or truncated") from exc
        _set_rng_state(rng)
    return meta
