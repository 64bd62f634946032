"""One-line errors for command-line entry points.

Expected problems (configuration, data, checkpoints, numerics) end the process with one line on
stderr that names the problem and the fix, and exit code 1; with `debug` the traceback is shown.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable


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
