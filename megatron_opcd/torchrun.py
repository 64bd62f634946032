"""`opcd-torchrun ARGS...` (or `python -m megatron_opcd.torchrun ARGS...`): torchrun, exit 0 on a clean preemption.

The same program as `torchrun` (torch.distributed.run's own `main`, in this process, same arguments
and messages), with one difference. On SIGTERM torchrun's agent forwards the signal to its
workers, waits for them (at most `--shutdown-timeout`, then SIGKILL), and exits 1 whatever they
did (torch.distributed.elastic's `SignalException`). The trainer's workers stop at the next safe
point, save the last completed step and exit 0 (training/preempt.py). Here each worker says so in
a file of a folder this launcher hands it (`OPCD_STOP_DIR`); when every local worker did, this
launcher exits 0, so a scheduler, a retry loop or a shell script can tell a clean preemption from a
failure. Any other ending is torchrun's own.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

STOP_DIR_ENV = "OPCD_STOP_DIR"


def record_clean_stop(step: int) -> None:
    """In a worker, after the stop signal's checkpoint: tell the launcher (no-op under plain torchrun)."""
    folder = os.environ.get(STOP_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return
    local_rank = os.environ.get("LOCAL_RANK", "0")
    body = {"step": step, "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1"))}
    tmp = Path(folder) / f".{local_rank}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, Path(folder) / local_rank)


def clean_stops(folder: Path) -> Optional[int]:
    """The step every local worker checkpointed before stopping, or None unless all of them did."""
    found = {}
    for f in folder.iterdir():
        if f.name.isdigit():
            found[int(f.name)] = json.loads(f.read_text())
    if not found:
        return None
    size = next(iter(found.values()))["local_world_size"]
    steps = {v["step"] for v in found.values()}
    if sorted(found) != list(range(size)) or len(steps) != 1:
        return None
    return steps.pop()


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    folder = Path(tempfile.mkdtemp(prefix="opcd-stop-"))
    os.environ[STOP_DIR_ENV] = str(folder)
    try:
        torchrun_main(argv)
        return 0
    except SignalException as exc:
        step = clean_stops(folder)
        if step is None:
            raise
        print(f"[opcd-torchrun] {exc.sigval.name}: every worker stopped after checkpointing step {step}; exit 0",
              file=sys.stderr, flush=True)
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
