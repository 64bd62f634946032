"""Checkpoints in megatron-core `dist_checkpointing` format, written atomically.

Layout of a checkpoint folder:
    DIR/model/               megatron-core dist_checkpointing (torch_dist) of the model's
                             sharded_state_dict: loads at any TP/PP layout
    DIR/model_config.yaml    the ModelConfig it was built from (nothing to retype)
    DIR/tokenizer/           tokenizer files travelling with the weights (optional)
    DIR/<extra>              what the trainer adds (optimizer, RNG, data position)
    DIR/opcd_checkpoint.json written last: a folder without it is not a checkpoint; it lists every
                             file above with its size and CRC-32 ("files"), checked at load

Integrity: `verify_checkpoint` checks that every required part is there and that every listed
file has its recorded size and checksum (the hashing is shared out over the ranks), so a flipped
byte, a truncated shard or a deleted folder is one `CheckpointError` naming the folder and the
part, never a silently different model.

Atomicity: everything is written into `DIR.tmp-<nonce>` and renamed to DIR only after every rank
finished and the marker is in place, so a crash mid-save never leaves a folder that looks complete.
A save that fails (disk full, I/O error) removes its temporary folder and raises `CheckpointError`;
the previous checkpoint is never touched before the new one is complete.

Fault-injection hook for tests (docs/reliability.md), inert unless set:
    OPCD_TEST_SLOW_SAVE_SECONDS=S   sleep S seconds on rank 0 after the marker is written and
                                    before the rename, so a test can kill the job mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from megatron_opcd.config import ModelConfig, from_dict, to_dict
from megatron_opcd.errors import CheckpointError, ConfigError, is_peer_failure

MARKER = "opcd_checkpoint.json"
FORMAT_VERSION = 2
"""2: the marker lists every file with its size and CRC-32. 1 (no checksums) still loads, unverified."""

MODEL_PARTS = ("model_config.yaml", "model/.metadata")
"""What every checkpoint holds besides the marker (the trainer's add optimizer/ and rng/)."""

# Fields that change the weights' shapes or the function they compute; the others (dtype, TE/FP8,
# dropout, init) may legitimately differ between a config and the checkpoint it loads.
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "vocab_size", "normalization", "norm_epsilon", "activation", "position_embedding_type", "rotary_base",
    "rotary_percent", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_position_embeddings", "add_qkv_bias", "add_bias_linear", "qk_layernorm", "tie_embeddings",
)


def check_matches_checkpoint(given: ModelConfig, saved: ModelConfig, path, role: str = "model",
                             fix: str = "fix the section or omit it to use the checkpoint's") -> None:
    """A model section given next to a checkpoint must describe the checkpoint's architecture."""
    diffs = [f"{role}.{f}={getattr(given, f)!r} but the checkpoint has {getattr(saved, f)!r}"
             for f in ARCHITECTURE_FIELDS if getattr(given, f) != getattr(saved, f)]
    if diffs:
        raise ConfigError(f"the {role} section does not match {path}/model_config.yaml: {'; '.join(diffs[:4])}"
                          f"{' ...' if len(diffs) > 4 else ''}; {fix}")


def _io_failures() -> tuple[type, ...]:
    """What a failed checkpoint read/write raises: torch.distributed.checkpoint's
    CheckpointException derives from BaseException (not Exception), so name it explicitly."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _write_failures() -> tuple[type, ...]:
    """What a failed save raises (I/O, torch's writers, megatron's checks); a bug (TypeError...)
    keeps its traceback."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, RuntimeError, CheckpointException, CheckpointingException)


def _root(exc: BaseException) -> BaseException:
    """The rank-level error inside torch's CheckpointException (whose str() is a traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return _root(inner[0] if isinstance(inner, tuple) else inner)
    return exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    exc = _root(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: " + (text.splitlines()[0] if text else "")[:limit]


def _disk_full(exc: BaseException, folder: Path) -> Optional[str]:
    """'no space left ...' when `exc` (or its cause) is ENOSPC/EDQUOT or the file system is
    (nearly) full; None otherwise. torch's writers report ENOSPC as an opaque 'unexpected pos'."""
    import errno

    seen, cur = set(), exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(cur):
            break
        cur = _root(cur) if _root(cur) is not cur else (cur.__cause__ or cur.__context__)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if cur is None and (free is None or free > 64 * 2**20):
        return None
    where = f" ({free / 2**20:.1f} MiB free at {folder})" if free is not None else ""
    return f"no space left on the device{where}"


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast_obj(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_lists(local: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


_CHUNK = 16 * 2**20  # bytes hashed per read: bounded memory whatever the shard size


def file_crc32(path: str | Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksum_files(folder: str | Path) -> dict[str, list[int]]:
    """{path relative to folder: [size, crc32]} of every file under `folder` but the marker.
    Collective: rank 0 lists the files, each rank hashes every world_size-th one."""
    folder = Path(folder)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER) \
        if _rank() == 0 else None
    names = _broadcast_obj(names)
    mine = [(n, [(folder / n).stat().st_size, file_crc32(folder / n)]) for n in names[_rank()::_world()]]
    return dict(sorted(_gather_lists(mine)))


def _file_problem(folder: Path, name: str, expected) -> Optional[str]:
    f = folder / name
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as exc:
        return f"{name} cannot be read ({_first_line(exc, 120)})"
    if not (isinstance(expected, list) and len(expected) == 2):
        return f"the marker's entry for {name} is malformed"
    if size != expected[0]:
        return f"{name} has {size} bytes but {expected[0]} were written (truncated or overwritten)"
    try:
        crc = file_crc32(f)
    except OSError as exc:
        return f"{name} cannot be read ({_first_line(exc, 120)})"
    if crc != expected[1]:
        return f"{name} does not match its checksum (crc32 {crc:08x}, written {expected[1]:08x}): flipped bytes"
    return None


def verify_checkpoint(path: str | Path, *, required: tuple[str, ...] = MODEL_PARTS,
                      parts: Optional[tuple[str, ...]] = None, fix: str = "re-save or re-convert it") -> dict:
    """Check that `path` is complete and undamaged; returns its marker. Collective when
    torch.distributed is initialised (every rank must call it): the hashing is shared out.

    required: files or folders that must exist (e.g. "optimizer/.metadata"). parts: verify only
    the listed files under these top-level names (None: all). A checkpoint of format 1 has no
    checksums: only the required parts are checked. A problem is one CheckpointError naming the
    folder and the part, the same on every rank."""
    path = Path(path)
    meta = read_meta(path)
    problems = [f"{part} is missing" for part in required if not (path / part).exists()]
    files = meta.get("files")
    version = meta.get("format_version")
    if not problems and version != 1:
        if not isinstance(files, dict):
            problems.append(f"{MARKER} has no \"files\" list (format_version {version!r})")
        else:
            names = sorted(n for n in files if parts is None or n.split("/", 1)[0] in parts)
            problems = [p for n in names[_rank()::_world()] if (p := _file_problem(path, n, files[n]))]
    problems = sorted(set(_gather_lists(problems)))  # a missing part is seen by every rank: once
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {problems[0]}{more}; {fix}")
    return meta


def check_finite(model, path: str | Path) -> None:
    """Refuse to save non-finite weights (collective): a NaN/inf weight is never written."""
    bad = next((name for name, p in unwrap(model).named_parameters() if not bool(torch.isfinite(p).all())), None)
    flag = torch.tensor([0.0 if bad is None else 1.0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        where = f" ({bad} on rank {_rank()})" if bad is not None else " (on another rank)"
        raise CheckpointError(f"refusing to save {path}: the weights hold NaN/inf{where}; nothing was written and "
                              "the previous checkpoint is intact; lower optimizer.lr or check the data")


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
    try:
        data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid YAML ({_first_line(exc, 120)}): the checkpoint is "
                              "corrupted; re-convert or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_file} does not hold a mapping of model fields: the checkpoint is corrupted")
    try:
        return from_dict(ModelConfig, data, "model_config.yaml")
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def read_meta(path: str | Path) -> dict:
    marker = Path(path) / MARKER
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker} is unreadable ({_first_line(exc, 120)}): the checkpoint is corrupted; "
                              f"delete {path} to resume from the previous one") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{marker} does not hold a JSON object: the checkpoint is corrupted; delete {path}")
    return meta


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
            failed = isinstance(exc, _write_failures()) and not isinstance(exc, CheckpointError)
            full = _disk_full(exc, self.tmp.parent) if failed else None  # measured before the cleanup frees space
            if _rank() == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            if failed:
                if is_peer_failure(_root(exc)):  # the save's collectives met a dead rank: not a storage problem
                    why, fix = f"lost contact with another rank ({_first_line(exc, 200)})", "see that rank's error"
                else:
                    why, fix = full or _first_line(exc), "free space (or fix the error)"
                raise CheckpointError(
                    f"could not save the checkpoint {self.final}: {why}; nothing was written in its place and "
                    f"the previous checkpoint is intact; {fix} and rerun to resume"
                ) from exc
            return False
        _barrier()
        if _rank() == 0:
            slow = float(os.environ.get("OPCD_TEST_SLOW_SAVE_SECONDS", "0") or 0)
            if slow > 0:  # fault injection for tests only: a window in which to kill the job mid-save
                time.sleep(slow)
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


_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def set_parent_death_signal(sig: int) -> bool:
    """Linux: the kernel sends `sig` to this process when the thread that started it ends
    (`prctl(PR_SET_PDEATHSIG)`); kept across exec. False where it is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG (linux/prctl.h)
    except (OSError, AttributeError):
        return False


def _ignore_stop_signals() -> None:
    """The writer manager's initializer: immune to the job's stop signals (the rank handles them),
    and killed with its rank however the rank ends (a SIGKILLed rank left it running forever)."""
    import signal

    for name in _STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)


_WRITER_MANAGER = None


class _ImmuneSpawnProcess(SpawnProcess):
    """A `spawn` process that starts with the stop signals ignored: SIG_IGN survives exec (a
    handler would not), so the child is immune through its seconds-long start-up. In the parent
    the signals are blocked across the fork (Linux keeps a blocked signal pending even while its
    action is SIG_IGN), then the handlers and the mask are restored and nothing is lost."""

    def start(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return super().start()  # signal handlers can only be changed from the main thread
        stop = [getattr(signal, name) for name in _STOP_SIGNALS]
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stop}
        try:
            super().start()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _ImmuneSpawnContext(SpawnContext):
    Process = _ImmuneSpawnProcess


def prepare_writer() -> None:
    """Start megatron's checkpoint-writer results queue in a manager process that ignores
    SIGTERM/SIGINT/SIGUSR1.

    megatron-core (0.16) creates that queue lazily in a `spawn` Manager process that inherits the
    default handlers: a scheduler's preemption signal sent to the whole process group (SLURM
    does) kills it, and the checkpoint the trainer then writes on SIGTERM fails with "Connection
    reset by peer". The trainer handles those signals itself; its helpers must outlive them."""
    global _WRITER_MANAGER
    from multiprocessing.managers import SyncManager

    from megatron_opcd.compat import mcore

    if _WRITER_MANAGER is not None or not mcore.writer_queue_unset():
        return  # ours already runs, or megatron's layout changed (then it makes its own)
    manager = SyncManager(ctx=_ImmuneSpawnContext())
    manager.start(initializer=_ignore_stop_signals)
    _WRITER_MANAGER = manager
    mcore.set_writer_queue(manager.Queue())


def save_model_weights(model, folder: str | Path) -> None:
    """megatron-core dist_checkpointing save of `model` (one stage per rank) into folder/model."""
    from megatron.core import dist_checkpointing

    prepare_writer()

    target = Path(folder) / "model"
    if _rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    _barrier()
    sharded = unwrap(model).sharded_state_dict(prefix="")
    # Synchronous save: a returned checkpoint is on disk.
    dist_checkpointing.save(sharded, str(target), async_sharded_save=False)


def load_model_weights(model, folder: str | Path, *, strict: bool = True, verify: bool = True,
                       groups=None) -> None:
    """Load folder/model into `model` at this process's TP/PP layout (collective). A complete
    checkpoint (with its marker) is verified first (`verify_checkpoint` of model/). `groups`: the
    model's own ParallelGroups where they are not megatron's global ones (a teacher on its own
    layout): its DP group then names the shards' replicas (megatron reads the global one otherwise,
    and two TP shards of the teacher would both look like replicas of one)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    source = Path(folder) / "model"
    if not Path(folder).exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; check the path")
    if verify and is_checkpoint(folder):
        verify_checkpoint(folder, parts=("model", "model_config.yaml"))
    if not source.is_dir():
        raise CheckpointError(f"{folder} has no model/ folder: not a megatron-opcd checkpoint; point at a folder "
                              "written by the trainer or tools/convert_checkpoint.py")
    module = unwrap(model)
    metadata = {"dp_cp_group": groups.pg_collection.dp_cp} if groups is not None else None
    sharded = module.sharded_state_dict(prefix="", metadata=metadata)
    try:
        state = dist_checkpointing.load(
            sharded, str(source), strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
        )
    except _io_failures() as exc:  # megatron and torch raise many types for bad checkpoints
        raise CheckpointError(
            f"cannot load model weights from {source}: {_first_line(exc)}; "
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
    check_finite(model, path)
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
        files = checksum_files(tmp)  # after every rank's and rank 0's writes (the barrier above)
        if _rank() == 0:
            record = {"format_version": FORMAT_VERSION, "saved_at": time.time(), **(meta or {}), "files": files}
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

