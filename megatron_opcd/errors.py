"""One-line errors for command-line entry points.

Expected problems (configuration, data, checkpoints, numerics) end the process with one line on
stderr that names the problem and the fix, and exit code 1; with `debug` the traceback is shown.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional


def _user_errors() -> tuple[type, ...]:
    from megatron_opcd.checkpointing import CheckpointError
    from megatron_opcd.config import ConfigError
    from megatron_opcd.data.prompts import DataError

    from megatron_opcd.data.tokenizer import TokenizerError

    errors: list[type] = [ConfigError, CheckpointError, DataError, TokenizerError]
    try:
        from megatron_opcd.training.trainer import NonFiniteError

        errors.append(NonFiniteError)
    except Exception:  # noqa: BLE001 - the trainer is optional for other CLIs
        pass
    return tuple(errors)


def _prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


# How gloo/NCCL/the TCP store report a peer that died or stopped answering (plain RuntimeErrors
# from gloo, torch.distributed.DistError subclasses from NCCL and the store).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
              "NCCL communicator was aborted", "Socket Timeout", "gloo/transport")


_PEER_DIAGNOSIS: list[Callable[[], Optional[str]]] = []


def on_peer_failure(diagnose: Callable[[], Optional[str]]) -> None:
    """Register `diagnose() -> text or None`, asked which rank was lost when a collective fails
    (the trainer registers one that checks the processes of its peers: training/preempt.py)."""
    _PEER_DIAGNOSIS[:] = [diagnose]


def _diagnosis() -> str:
    for diagnose in _PEER_DIAGNOSIS:
        try:
            text = diagnose()
        except Exception:  # noqa: BLE001 - a diagnosis must never hide the error it explains
            text = None
        if text:
            return f": {text}"
    return ""


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died or stopped answering."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_LOST)


def run_cli(fn: Callable[[], object], *, debug: bool = False) -> int:
    """Run `fn`; return the process exit code."""
    try:
        fn()
        return 0
    except KeyboardInterrupt:
        print(f"{_prefix()}interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())  # one line, whatever the exception held
        print(f"{_prefix()}error: {message}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{_prefix()}error: {exc.strerror or exc}{where}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        if debug:
            traceback.print_exc()
        first = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())[:300]
        print(f"{_prefix()}error: lost contact with another rank{_diagnosis()} ({type(exc).__name__}: {first}); "
              "a rank died or "
              "hung: see the first rank's error above, then rerun to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        return 1
