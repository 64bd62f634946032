"""Trainer checkpoints: the student (never a frozen teacher; an EMA teacher's average, which is
training state), optimizer, LR schedule, RNG, data position.

    RUN/opcd_run.lock    the run that owns this folder (host, pid; see RunLock)
    RUN/step_0000010/   one checkpoint (checkpointing.save_checkpoint layout) plus
        optimizer/       megatron-core optimizer sharded_state_dict (dist_checkpointing)
        rng/rank_00000.pt  per-rank RNG states (torch CPU/CUDA, megatron's tracker, python)
        teacher_ema/model/ teacher.mode=ema only: the moving average (dist_checkpointing)
        opcd_checkpoint.json: step, data position, scheduler and optimizer settings, metrics,
                         the checksum of every file (written last)

Names this module writes in RUN, and the only ones start-up cleanup touches (matched exactly):
`step_XXXXXXX`, `step_XXXXXXX.tmp-<pid>-<ns>` (a save in progress), `step_XXXXXXX.old-<ns>`
(the previous copy during a re-save), `step_XXXXXXX.del-<ns>` (retention deleting), `opcd_run.lock`.

Resume (`check_resume`, files only, before any model is built) picks the newest `step_*` folder
that verifies (every part present, every checksum right; `checkpoint.fallback: previous` skips
damaged ones), and refuses a config whose model, optimizer or LR schedule differs from the
checkpoint's unless told which side wins. Retention keeps the newest `keep_last`.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_opcd.checkpointing import (
    MARKER,
    MODEL_PARTS,
    _broadcast_str,
    _first_line,
    _fsync_dir,
    _io_failures,
    check_matches_checkpoint,
    is_checkpoint,
    load_model_weights,
    read_meta,
    save_model_weights,
    read_model_config,
    save_checkpoint,
    tokenizer_dir,
    unwrap,
    verify_checkpoint,
)
from megatron_opcd.errors import CheckpointError, ConfigError

_STEP_RE = re.compile(r"^step_(\d{7})$")
# What an interrupted save, re-save or retention leaves (AtomicCheckpointDir's and apply_retention's names).
_LEFTOVER_RE = re.compile(r"^(step_\d{7})\.(tmp-\d+-\d+|old-\d+|del-\d+)$")
EMA_PART = "teacher_ema"
"""teacher.mode=ema: the moving average's weights (teacher_ema/model/), in the student's format."""
TRAINING_PARTS = MODEL_PARTS + ("optimizer/.metadata", "rng")
"""Required in every trainer checkpoint (a checkpoint without its optimizer/ is not resumable)."""


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(message: str) -> None:
    """A start-up message on rank 0 (before the metrics logger exists)."""
    if _rank0():
        print(f"[megatron-opcd] {message}", file=sys.stderr, flush=True)


def _collective(fn: Callable[[], object]):
    """Run `fn` on rank 0 only; its CheckpointError/ConfigError is raised on every rank (one line each)."""
    error, kind, result = "", "", None
    if _rank0():
        try:
            result = fn()
        except (CheckpointError, ConfigError) as exc:
            error, kind = str(exc), type(exc).__name__
    error = _broadcast_str(f"{kind}:{error}" if error else "")
    if error:
        kind, _, message = error.partition(":")
        raise (ConfigError if kind == "ConfigError" else CheckpointError)(message)
    return result

# How megatron's distributed optimizer lays out its state in a checkpoint (the same on save and load).
# Its default, 'fully_sharded_model_space', writes flattened ShardedTensors that the torch_dist
# strategy of megatron-core 0.16 refuses ("ShardedTensor.flattened_range is not supported"): every
# save at DP > 1 failed. 'dp_reshardable' is Megatron-LM's default: parallel, no gather, and a
# resume may change the data-parallel size (not TP/PP). Other optimizers ignore it.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:07d}"


def step_folders(path: str | Path) -> list[Path]:
    """The complete-looking (`step_XXXXXXX` with a marker) checkpoints of a run folder, newest first."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = sorted(((int(m.group(1)), child) for child in path.iterdir()
                    if (m := _STEP_RE.match(child.name)) and is_checkpoint(child)), reverse=True)
    return [child for _, child in found]


def find_latest(path: str | Path) -> Optional[Path]:
    """The newest complete checkpoint in a run folder, or `path` itself if it is one."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    found = step_folders(path)
    return found[0] if found else None


def cleanup_incomplete(run_dir: str | Path) -> list[str]:
    """Remove leftovers of interrupted saves and retentions; rank 0 only. Only the exact names
    this project writes (`step_XXXXXXX.tmp-<pid>-<ns>`, `.old-<ns>`, `.del-<ns>`) are touched: a
    user's `results.old-2023/` stays.

    A kill between the two renames of a re-save (`X -> X.old-*`, `X.tmp-* -> X`) leaves only
    `X.old-*`: that complete checkpoint is renamed back to X instead of being removed."""
    removed = []
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not _rank0():
        return removed
    for child in sorted(run_dir.iterdir()):  # sorted: X.old-* is put back before X.tmp-* is removed
        m = _LEFTOVER_RE.match(child.name)
        if m is None or not child.is_dir():
            continue
        name, kind = m.group(1), m.group(2)[:3]
        if kind == "old" and not (run_dir / name).exists() and is_checkpoint(child):
            child.rename(run_dir / name)
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child.name)
    return removed


def apply_retention(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints. Each is first renamed to
    `step_X.del-<ns>` (one atomic step), then removed: a kill mid-deletion never leaves a
    `step_X` folder that has its marker but lost its model/."""
    if keep_last <= 0 or not _rank0():
        return
    run_dir = Path(run_dir)
    steps = sorted((int(m.group(1)), child) for child in run_dir.iterdir() if (m := _STEP_RE.match(child.name)))
    for _, child in steps[:-keep_last]:
        doomed = child.with_name(f"{child.name}.del-{time.time_ns()}")
        os.replace(child, doomed)
        _fsync_dir(run_dir)
        shutil.rmtree(doomed, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The run folder belongs to one run


LOCK_NAME = "opcd_run.lock"
LOCK_HEARTBEAT_SECONDS = 30.0
"""How often the holder touches its lock file."""
LOCK_STALE_SECONDS = 300.0
"""A lock not touched for this long is stale even when its holder's host cannot be checked."""


def _holder() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "created": psutil.Process().create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "since": time.time()}


def _gone(held: dict, age: float) -> Optional[str]:
    """Why the holder of a lock is known to be gone (None: it may be alive)."""
    import psutil

    me = _holder()
    if held.get("host") == me["host"]:
        pid = held.get("pid")
        if pid == me["pid"]:
            return "this process (an earlier run in it)"
        if not isinstance(pid, int) or not psutil.pid_exists(pid):
            return f"pid {pid} is no longer running"
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent
                return f"pid {pid} has exited"
            if abs(proc.create_time() - float(held.get("created", 0))) > 1.0:
                return f"pid {pid} is another process now"
        except (psutil.Error, TypeError, ValueError):
            return f"pid {pid} is no longer running"
        return None
    if held.get("slurm_job") and held.get("slurm_job") == me["slurm_job"] \
            and int(held.get("slurm_restart") or 0) < me["slurm_restart"]:
        return f"it is an earlier attempt of SLURM job {me['slurm_job']}"
    if age > LOCK_STALE_SECONDS:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


class RunLock:
    """Ownership of a run folder: `opcd_run.lock` holds the holder's host and pid (written
    atomically with a hard link, so two runs cannot both create it), a heartbeat thread touches it,
    `release()` (also at exit) removes it. A second run is refused with one line; a lock whose
    holder is gone (same host: the pid is dead; a later attempt of the same SLURM job; or no
    heartbeat for LOCK_STALE_SECONDS) is taken over with a message."""

    _held: list["RunLock"] = []

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> tuple[dict, float]:
        try:
            held = json.loads(self.path.read_text(encoding="utf-8"))
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            return {}, time.time() - self.path.stat().st_mtime
        return (held if isinstance(held, dict) else {}), age

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = _holder()
        tmp = self.run_dir / f"{LOCK_NAME}.{me['pid']}-{time.time_ns()}"
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists
                    break
                except FileExistsError:
                    pass
                try:
                    held, age = self._read()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                why = _gone(held, age)
                if why is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
                    raise CheckpointError(
                        f"checkpoint.save={self.run_dir} is in use by another run (pid {held.get('pid')} on "
                        f"{held.get('host')}, since {since}; {self.path}); give this run its own checkpoint.save or "
                        f"stop the other one (a lock whose holder is gone is taken over: at once on the same host, "
                        f"after {LOCK_STALE_SECONDS:.0f} s without its heartbeat from another host)")
                aside = self.run_dir / f"{LOCK_NAME}.stale-{me['pid']}-{time.time_ns()}"
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                try:
                    taken = json.loads(aside.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    taken = {}
                if taken != held:  # another run took it over between our read and our rename: put it back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    aside.unlink()
                    continue
                aside.unlink()
                if held.get("pid") != me["pid"] or held.get("host") != me["host"]:
                    _say(f"took over the lock {self.path} of pid {held.get('pid')} on {held.get('host')}: {why}")
            else:
                raise CheckpointError(f"could not take the lock {self.path} (other runs keep taking it); "
                                      "give this run its own checkpoint.save")
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._heartbeat, name="opcd-run-lock", daemon=True)
        self._thread.start()
        RunLock._held.append(self)
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self in RunLock._held:
            RunLock._held.remove(self)
        try:
            held = json.loads(self.path.read_text(encoding="utf-8"))
            if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def release_locks() -> None:
    """Release every run-folder lock this process holds (at the end of a run; also at exit)."""
    for lock in list(RunLock._held):
        lock.release()


atexit.register(release_locks)


def lock_run_dir(run_dir: Optional[str | Path]) -> Optional[RunLock]:
    """Take ownership of `run_dir` (collective: rank 0 holds the lock, every rank gets its error)."""
    if run_dir is None:
        return None
    return _collective(lambda: RunLock(run_dir).acquire())


# ------------------------------------------------------------------------------------------------
# Resume: which checkpoint, and does it fit the config


_META_FIELDS = {"step": int, "data_position": int, "scheduler": dict, "world_size": int}


def read_training_meta(path: str | Path) -> dict:
    """The marker of a trainer checkpoint, with the fields resume needs checked (one line, never a KeyError)."""
    meta = read_meta(path)
    for name, kind in _META_FIELDS.items():
        value = meta.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "has no" if name not in meta else f"has a malformed ({type(value).__name__})"
            raise CheckpointError(f"{Path(path) / MARKER} {what} \"{name}\" field: not a complete trainer "
                                  f"checkpoint; delete {path} to resume from the previous one")
    return meta


def verify_training_checkpoint(path: str | Path, *, fix: str) -> dict:
    """verify_checkpoint with every part a trainer checkpoint needs; returns the checked marker."""
    verify_checkpoint(path, required=TRAINING_PARTS, fix=fix)
    return read_training_meta(path)


@dataclass
class ResumePlan:
    """What `check_resume` decided, for the Trainer."""

    path: Path
    meta: dict
    use_checkpoint_schedule: Optional[bool]
    """None: config and checkpoint agree; True: the checkpoint's optimizer/schedule; False: the config's."""
    tokenizer: Optional[Path]
    """The checkpoint's own tokenizer/ (None when data.tokenizer is set or there is none)."""
    optimizer: object = None
    """The config's optimizer section (applied over the checkpoint's when use_checkpoint_schedule=False)."""


def _find_resumable(candidate: str, fallback: str) -> Optional[tuple[Path, dict]]:
    folders = [Path(candidate)] if is_checkpoint(candidate) else step_folders(candidate)
    damaged = []
    for folder in folders:
        fix = (f"delete {folder} to resume from the previous checkpoint" if fallback == "previous" else
               f"set checkpoint.fallback=previous to resume from the newest checkpoint that verifies, or delete {folder}")
        try:
            return folder, verify_training_checkpoint(folder, fix=fix)
        except CheckpointError as exc:
            if fallback != "previous":
                raise
            damaged.append(str(exc))
            _say(f"checkpoint.fallback=previous: skipping {exc}")
    if damaged:
        raise CheckpointError(f"no checkpoint in {candidate} verifies ({len(damaged)} damaged); the newest: {damaged[0]}")
    return None


def _schedule_differences(cfg, meta: dict) -> list[tuple[str, object, object]]:
    """(config key, config value, checkpoint value) for each optimizer/schedule setting that
    changes the updates of the remaining steps."""
    sched, o, s = meta["scheduler"], cfg.optimizer, cfg.schedule
    pairs = [("optimizer.lr", o.lr, sched.get("max_lr")), ("optimizer.weight_decay", o.weight_decay, sched.get("start_wd")),
             ("schedule.warmup_steps", s.warmup_steps, sched.get("lr_warmup_steps")),
             ("schedule.decay", s.decay, sched.get("lr_decay_style"))]
    if s.decay != "constant" or sched.get("lr_decay_style") != "constant":  # a constant LR ignores both
        pairs += [("schedule.steps", s.steps, sched.get("lr_decay_steps")), ("optimizer.min_lr", o.min_lr, sched.get("min_lr"))]
    saved = meta.get("optimizer")
    if isinstance(saved, dict):  # written since format 2
        pairs += [(f"optimizer.{k}", getattr(o, k), saved[k]) for k in ("name", "adam_beta1", "adam_beta2", "adam_eps",
                                                                         "clip_grad") if k in saved]
    return [(k, a, b) for k, a, b in pairs if b is not None and a != b]


def _check_schedule(cfg, path: Path, meta: dict) -> Optional[bool]:
    diffs = _schedule_differences(cfg, meta)
    choice = cfg.checkpoint.use_checkpoint_schedule
    if not diffs:
        return None
    listed = ", ".join(f"{k}={a!r} in the config but {b!r} in the checkpoint" for k, a, b in diffs)
    name = next((d for d in diffs if d[0] == "optimizer.name"), None)
    if name is not None:
        raise ConfigError(f"resuming from {path}: {listed}; an optimizer cannot continue another's state: restore "
                          f"optimizer.name={name[2]!r}, or start a new run (another checkpoint.save) with "
                          f"checkpoint.pretrained={path}")
    if choice is None:
        raise ConfigError(f"resuming from {path}: {listed}; choose with checkpoint.use_checkpoint_schedule=true "
                          "(continue the checkpoint's) or checkpoint.use_checkpoint_schedule=false (the config's "
                          "from here on)")
    if choice:
        keep = {k: b for k, _, b in diffs}
        opt = {k.split(".", 1)[1]: v for k, v in keep.items() if k.startswith("optimizer.")}
        sch = {k.split(".", 1)[1]: v for k, v in keep.items() if k in ("schedule.warmup_steps", "schedule.decay")}
        cfg.optimizer = dataclasses.replace(cfg.optimizer, **opt)
        cfg.schedule = dataclasses.replace(cfg.schedule, **sch)  # schedule.steps stays the run's length
        _say("resume: checkpoint.use_checkpoint_schedule=true: the checkpoint's "
             + ", ".join(f"{k}={b!r} (not the config's {a!r})" for k, a, b in diffs))
    else:
        _say("resume: checkpoint.use_checkpoint_schedule=false: the config's "
             + ", ".join(f"{k}={a!r} (not the checkpoint's {b!r})" for k, a, b in diffs))
    return choice


def _same_tokenizer_files(given: Path, saved: Path) -> bool:
    ours = [given] if given.is_file() else sorted(p for p in given.rglob("*") if p.is_file())
    for f in ours:
        other = saved / (f.name if given.is_file() else f.relative_to(given))
        if not other.is_file() or other.read_bytes() != f.read_bytes():
            return False
    return bool(ours)


def check_resume(cfg) -> Optional[ResumePlan]:
    """Where a run resumes from, and whether the config fits that checkpoint: files only, before any
    model is built (collective: every rank calls it; rank 0 cleans up, the verification is shared out,
    every rank reaches the same decision from the same files, messages come from rank 0).

    - The newest checkpoint of checkpoint.load / checkpoint.save that verifies (every part present,
      every checksum right); a damaged one is an error, or skipped with checkpoint.fallback=previous.
    - A `model:` section (or checkpoint.pretrained's model) must match the checkpoint's architecture.
    - An optimizer / LR-schedule setting that differs from the checkpoint's is refused unless
      checkpoint.use_checkpoint_schedule says which side wins (the choice is logged; true replaces
      cfg.optimizer/cfg.schedule's settings with the checkpoint's).
    - The checkpoint's own tokenizer/ is used unless data.tokenizer is set."""
    c = cfg.checkpoint
    if not c.resume:
        return None
    found = None
    for candidate in (c.load, c.save):
        if not candidate:
            continue
        if candidate == c.save:
            _collective(lambda: cleanup_incomplete(candidate))
        # Verification is collective; the choice of folders is made by every rank from the same files.
        found = _find_resumable(candidate, c.fallback)
        if found is not None:
            break
        if candidate == c.load:
            raise CheckpointError(f"checkpoint.load={c.load} holds no complete checkpoint")
    if found is None:
        return None
    path, meta = found

    def compare() -> Optional[bool]:
        saved = read_model_config(path)
        given = cfg.model if cfg.model is not None else (read_model_config(c.pretrained) if c.pretrained else None)
        if given is not None:
            source = "the model section" if cfg.model is not None else f"checkpoint.pretrained={c.pretrained}"
            check_matches_checkpoint(given, saved, path, fix=f"{source} must describe the model being resumed: "
                                     "restore it, or start a new run (another checkpoint.save) from this checkpoint "
                                     f"with checkpoint.pretrained={path}")
        choice = _check_schedule(cfg, path, meta)
        tok = tokenizer_dir(path)
        if tok is not None and cfg.data.tokenizer is None:
            _say(f"resume: the tokenizer is the checkpoint's own {tok}")
        elif tok is not None and not _same_tokenizer_files(Path(cfg.data.tokenizer), tok):
            _say(f"resume: data.tokenizer={cfg.data.tokenizer} is used as set, not the checkpoint's own {tok} "
                 "(their files differ)")
        return choice

    choice = compare()  # on every rank: the same files give the same decision (and error) everywhere
    tok = tokenizer_dir(path) if cfg.data.tokenizer is None else None
    return ResumePlan(path, meta, choice, tok, cfg.optimizer)


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
                             data_position: int, tokenizer_dir=None, extra_meta: Optional[dict] = None,
                             ema_teacher=None) -> Path:
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = unwrap(model)

    def write_optimizer(tmp: Path) -> None:
        target = tmp / "optimizer"
        if rank == 0:
            target.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        sharded = optimizer.sharded_state_dict(module.sharded_state_dict(prefix=""), metadata=OPTIMIZER_SHARDING)
        dist_checkpointing.save(sharded, str(target), async_sharded_save=False)

    def write_rng(tmp: Path) -> None:
        folder = tmp / "rng"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), folder / f"rank_{rank:05d}.pt")

    def write_ema(tmp: Path) -> None:
        save_model_weights(ema_teacher, tmp / EMA_PART)  # the average, sharded as the student's model/

    writers = (write_optimizer, write_rng) + ((write_ema,) if ema_teacher is not None else ())
    meta = {"step": step, "data_position": data_position, "scheduler": scheduler.state_dict(),
            "optimizer": _optimizer_settings(optimizer),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1, **(extra_meta or {})}
    path = save_checkpoint(step_dir(run_dir, step), model, model_config, meta=meta,
                           tokenizer_dir=tokenizer_dir, extra_writers=writers)
    return path


def _prime_distributed_optimizer(optimizer) -> None:
    """Zero Adam states for megatron's DistributedOptimizer before its first step.

    Its `state_dict()` (which `sharded_state_dict(is_loading=True)` calls) asserts, without apex or
    Transformer Engine (the CPU), that every parameter's torch Adam state holds one common `step`;
    before the first step there is none, so a resume failed with a bare AssertionError. The loaded
    state then overwrites these zeros (and `step` comes from the saved param groups)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                 step=torch.zeros((), dtype=torch.float32))


def _optimizer_settings(optimizer) -> dict:
    """The optimizer settings a resume compares (OptimizerConfig's names), from megatron's optimizer config."""
    c = getattr(optimizer, "config", None)
    if c is None:
        return {}
    return {"name": c.optimizer, "adam_beta1": c.adam_beta1, "adam_beta2": c.adam_beta2, "adam_eps": c.adam_eps,
            "clip_grad": c.clip_grad}


def load_training_checkpoint(path, *, model, optimizer, scheduler, plan: Optional[ResumePlan] = None,
                             ema_teacher=None) -> dict:
    """Restore everything `save_training_checkpoint` wrote; returns its metadata. With the `plan`
    of `check_resume` the checkpoint was verified already and its schedule choice is applied;
    without one it is verified here."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if plan is None:
        meta = verify_training_checkpoint(path, fix=f"delete {path} to resume from the previous checkpoint")
    else:
        meta = plan.meta
    load_model_weights(model, path, verify=False)
    if ema_teacher is not None:
        if not (path / EMA_PART / "model").is_dir():
            raise CheckpointError(f"{path} has no {EMA_PART}/: it was not written by a teacher.mode=ema run; "
                                  "resume with the teacher it was trained with")
        load_model_weights(ema_teacher, path / EMA_PART, verify=False)  # the checksums were verified above
    module = unwrap(model)
    if optimizer is not None:
        try:
            _prime_distributed_optimizer(optimizer)
            sharded = optimizer.sharded_state_dict(module.sharded_state_dict(prefix=""), is_loading=True,
                                                   metadata=OPTIMIZER_SHARDING)
            state = dist_checkpointing.load(sharded, str(path / "optimizer"))
            with torch.no_grad():  # megatron's dp_reshardable loader copies into the fp32 params in place
                optimizer.load_state_dict(state)
        except _io_failures() as exc:  # torch's CheckpointException is a BaseException
            raise CheckpointError(f"cannot load the optimizer state from {path}/optimizer: {_first_line(exc, 200)}; "
                                  "the checkpoint is corrupted or truncated") from exc
        if plan is not None and plan.use_checkpoint_schedule is False:
            o = plan.optimizer  # the config's betas/eps over the ones the state restored (lr, wd: the scheduler)
            for group in optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (o.adam_beta1, o.adam_beta2)
                if "eps" in group:
                    group["eps"] = o.adam_eps
    if scheduler is not None:
        # megatron's own switches: override = the config's values, use_checkpoint = the checkpoint's
        from_config = plan is not None and plan.use_checkpoint_schedule is False
        scheduler.override_opt_param_scheduler = from_config
        scheduler.use_checkpoint_opt_param_scheduler = not from_config
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
