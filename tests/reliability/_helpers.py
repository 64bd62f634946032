"""Shared checks of the reliability suite: how an error must look, what a run folder may hold,
and the two ways a case runs the real CLI (in this process, or as a subprocess with a timeout)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
_ERROR_LINE = re.compile(r"^(\[rank (\d+)\] )?error: (.*)$")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict:
    """The environment of a CLI subprocess: one thread, unbuffered, no launcher variables leaked
    from this process, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("OPCD_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", OPCD_QUIET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def train_cmd(config: Path, *overrides: str) -> list[str]:
    return [PYTHON, "-m", "megatron_opcd.train", "--config", str(config), *overrides]


class Job:
    """A CLI subprocess in its own session (process group), output in files, not pipes.

    Own session: `kill()` takes the whole group, as a scheduler does (megatron's checkpoint writer
    starts helper processes that a kill -9 of the main process alone would orphan). Files: an
    orphan holding a pipe open would make reading the output block."""

    def __init__(self, cmd: list[str], log_dir: Path, env: Optional[dict] = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"out-{time.time_ns()}.txt", log_dir / f"err-{time.time_ns()}.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env or subprocess_env(),
                                         start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> int:
        """Exit code; fails the test if the job is still running after `timeout` seconds. Whatever
        is left of its process group afterwards is killed."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end within {timeout}s (a hang):\n{self.stderr[-3000:]}") from None
        finally:
            self.kill_group()
            self.proc.wait()


def run_train(config: Path, *overrides: str, timeout: float, env: Optional[dict] = None) -> Job:
    """The CLI as a subprocess, to its end; a hang fails the test instead of blocking the suite."""
    job = Job(train_cmd(config, *overrides), Path(config).parent / "jobs", env)
    job.wait(timeout)
    return job


@contextlib.contextmanager
def _isolated_process_state():
    """An in-process CLI run initialises torch.distributed (setting RANK, MASTER_PORT, ... in
    os.environ) and installs SIGTERM/SIGUSR1 handlers: undo both afterwards."""
    saved_env = dict(os.environ)
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for k in _LAUNCH_VARS:
        os.environ.pop(k, None)
    os.environ["OPCD_QUIET"] = "1"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in saved_handlers.items():
            signal.signal(s, h)


def cli_in_process(config: Optional[Path], *overrides: str) -> tuple[int, str]:
    """`python -m megatron_opcd.train` in this process (the same run_cli path): (exit code, stderr)."""
    from megatron_opcd.train import main

    args = (["--config", str(config)] if config is not None else []) + list(overrides)
    err = io.StringIO()
    with _isolated_process_state(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    return rc, err.getvalue()


def error_lines(stderr: str) -> list[tuple[Optional[int], str]]:
    """(rank or None, message) of every `error:` / `[rank N] error:` line."""
    out = []
    for line in stderr.splitlines():
        m = _ERROR_LINE.match(line)
        if m:
            out.append((int(m.group(2)) if m.group(2) else None, m.group(3)))
    return out


def assert_clean_error(rc: int, stderr: str, *needles: str, ranks: Optional[list[int]] = None) -> str:
    """Non-zero exit, exactly one error line (per rank), containing every needle, no traceback."""
    assert rc != 0, f"expected a failure, got exit code {rc}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"a traceback leaked:\n{stderr[-4000:]}"
    lines = error_lines(stderr)
    if ranks is None:
        assert len(lines) == 1 and lines[0][0] is None, f"expected one 'error:' line, got {lines}:\n{stderr[-3000:]}"
    else:
        assert sorted(r for r, _ in lines) == sorted(ranks), f"expected one error line per rank {ranks}: {lines}"
    for _, message in lines:
        for needle in needles:
            assert needle in message, f"{needle!r} not in the error line: {message}"
    return lines[0][1]


# ------------------------------------------------------------------------------------------------
# Run folders


def step_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("step_*") if re.fullmatch(r"step_\d{7}", p.name))


def assert_no_fake_checkpoint(run_dir: Path) -> None:
    """Every folder that looks like a checkpoint (`step_XXXXXXX`) is complete; leftovers of an
    interrupted save (`*.tmp-*`, `*.old-*`) are never what resume picks."""
    from megatron_opcd.training.state import find_latest

    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    for d in step_dirs(run_dir):
        for part in ("opcd_checkpoint.json", "model_config.yaml", "model/.metadata", "optimizer/.metadata"):
            assert (d / part).exists(), f"{d} looks like a checkpoint but has no {part}"
    latest = find_latest(run_dir)
    if latest is not None:
        assert re.fullmatch(r"step_\d{7}", latest.name), f"resume would pick {latest}"


def load_weights(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, read with torch.distributed.checkpoint (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"weights-{ckpt.name}-{time.time_ns()}.pt"
    dcp_to_torch_save(str(ckpt / "model"), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def train_steps(metrics: Path) -> list[dict]:
    import json

    if not metrics.exists():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") == "train"]


def wait_for(predicate, timeout: float, job: Optional[Job] = None, what: str = "") -> None:
    """Poll `predicate` until true; fail if `job` ends first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job is not None and job.returncode is not None:
            raise AssertionError(f"the run ended (exit {job.returncode}) before {what}:\n{job.stderr[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
