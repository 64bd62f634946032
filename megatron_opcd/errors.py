"""The user-facing errors, and the one-line ending of command-line entry points.

Expected problems (configuration, data, checkpoints, numerics) are `OPCDError`s: `run_cli` ends
the process with one line on stderr that names the problem and the fix, and exit code 1; with
`debug` the traceback is shown. Anything else is a bug and keeps its traceback.

Each class also derives from the built-in error it always was (ValueError for a bad input,
RuntimeError for a state found at run time), so `except ValueError` around a config or a data
file still catches it. This module is the bottom layer: it imports nothing of the package, so any
module can raise these (docs/architecture.md).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional


class OPCDError(Exception):
    """An expected problem the user can fix; the message is one line naming it and the fix."""


class ConfigError(OPCDError, ValueError):
    """A configuration that cannot run. The message is one line naming the field and the fix."""


class DataError(OPCDError, ValueError):
    """Input data that cannot be used. One line: the file, the line, the problem, the fix."""


class TokenizerError(OPCDError, ValueError):
    """A path that holds no usable tokenizer, or a request the tokenizer cannot serve."""


class TemplateError(OPCDError, ValueError):
    """A chat template whose rendering of a conversation is not a prefix of the rendering of its
    continuation: multi-turn transcripts cannot be built by appending turns."""


class ConversionError(OPCDError, ValueError):
    """A model or checkpoint the converter cannot handle; the message is one line with the fix."""


class CheckpointError(OPCDError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the problem."""


class NonFiniteError(OPCDError, RuntimeError):
    """The loss or the gradients are NaN/inf and numerics.on_nonfinite=stop (or too many skips)."""


class DemoError(OPCDError, RuntimeError):
    """Something the demo needs is missing; the message says what to install or remove."""


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
    except OPCDError as exc:
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
