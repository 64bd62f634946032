"""Faults, with the real CLI in subprocesses (every wait has a deadline):

* kill -9 in the middle of a checkpoint save: the previous checkpoint stays complete, the rerun
  resumes from it and recomputes the interrupted step exactly;
* SIGTERM in the middle of a step: the step finishes, a checkpoint is written, exit 0, resume;
* the disk fills up while saving (a real 4 MiB tmpfs): one clear line, previous checkpoint intact;
* a rank dies (SIGKILL under torchrun): the survivor ends with one line instead of hanging;
* a configuration error under torchrun: one `[rank N] error:` line per rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from _train_fixtures import make_run
from ._helpers import (
    TORCHRUN, Job, assert_clean_error, assert_no_fake_checkpoint, error_lines, load_weights, run_train, step_dirs,
    subprocess_env, train_cmd, train_steps, wait_for,
)

pytestmark = pytest.mark.slow
SLOW_SAVE = "3"  # OPCD_TEST_SLOW_SAVE_SECONDS: the window between the marker and the rename


def _config(root: Path, **extra) -> Path:
    return make_run(root, steps=200, extra={"checkpoint.interval": 1, "checkpoint.keep_last": 0, "data.eval": None,
                                            "logging.dir": str(root / "logs"), **extra})


# ------------------------------------------------------------------------------------------------
# kill -9 mid-save, SIGTERM mid-step, resume: one run folder, three processes


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    cfg = _config(root)
    ckpt, metrics = root / "ckpt", root / "logs" / "metrics.jsonl"
    seen: dict = {"root": root, "ckpt": ckpt}

    # 1. kill -9 (the whole process group, as a node failure or scheduler does) while step 2 is
    #    being saved: its marker is written, the rename has not happened.
    job = Job(train_cmd(cfg), root / "jobs", subprocess_env(OPCD_TEST_SLOW_SAVE_SECONDS=SLOW_SAVE))

    def saving_step2():
        return (ckpt / "step_0000001" / "opcd_checkpoint.json").is_file() and any(
            (t / "opcd_checkpoint.json").is_file() for t in ckpt.glob("step_0000002.tmp-*"))

    try:
        wait_for(saving_step2, 300, job, "the save of step 2")
    finally:
        job.kill_group()
        seen["killed_rc"] = job.wait(60)
    seen["after_kill"] = sorted(p.name for p in ckpt.iterdir())
    try:
        assert_no_fake_checkpoint(ckpt)
        seen["fake_check_after_kill"] = None
    except AssertionError as exc:
        seen["fake_check_after_kill"] = str(exc)
    seen["rows_before"] = train_steps(metrics)

    # 2. Rerun: resumes from step 1; SIGTERM to the whole process group (SLURM preemption) once
    #    it has logged two steps.
    job = Job(train_cmd(cfg), root / "jobs")
    try:
        wait_for(lambda: len(train_steps(metrics)) >= len(seen["rows_before"]) + 2, 300, job, "two resumed steps")
        os.killpg(job.proc.pid, signal.SIGTERM)
        seen["term_rc"] = job.wait(240)
    finally:
        job.kill_group()
    seen["term_out"] = job.stderr + job.stdout
    seen["rows_term"] = train_steps(metrics)

    # 3. Resume to one step past the SIGTERM checkpoint.
    seen["term_step"] = json.loads((step_dirs(ckpt)[-1] / "opcd_checkpoint.json").read_text())["step"]
    seen["final"] = run_train(cfg, f"schedule.steps={seen['term_step'] + 1}", timeout=300)
    seen["rows_final"] = train_steps(metrics)
    return seen


@pytest.mark.timeout(900)
def test_kill9_mid_save_leaves_previous_checkpoint(preempted):
    assert preempted["killed_rc"] == -signal.SIGKILL
    names = preempted["after_kill"]
    assert "step_0000001" in names and "step_0000002" not in names, names
    assert any(n.startswith("step_0000002.tmp-") for n in names), f"the kill did not land mid-save: {names}"
    assert preempted["fake_check_after_kill"] is None, preempted["fake_check_after_kill"]


@pytest.mark.timeout(900)
def test_resume_after_kill9_is_exact(preempted):
    """Step 2 was computed (and logged) before the kill; the rerun recomputes it from step 1's
    checkpoint (weights, optimizer, RNG, data position): the same loss to the last bit."""
    before = {r["step"]: r for r in preempted["rows_before"]}
    redone = preempted["rows_term"][len(preempted["rows_before"]):]
    assert 2 in before, "the killed run had not logged step 2"
    assert redone and redone[0]["step"] == 2, [r["step"] for r in redone]
    assert redone[0]["loss"] == before[2]["loss"]
    assert f"resumed from {preempted['ckpt'] / 'step_0000001'} at step 1" in preempted["term_out"]


@pytest.mark.timeout(900)
def test_sigterm_mid_step_saves_and_exits_0(preempted):
    """SIGTERM reaches every process of the job (megatron's checkpoint-writer helpers too): the
    step finishes, a complete checkpoint of it is written, exit 0."""
    out = preempted["term_out"]
    assert preempted["term_rc"] == 0, out[-3000:]
    assert "Traceback" not in out and not error_lines(out), out[-3000:]
    step = preempted["term_step"]
    assert f"checkpointed at step {step}" in out
    assert step == preempted["rows_term"][-1]["step"], "the checkpoint is not of the last finished step"
    assert_no_fake_checkpoint(preempted["ckpt"])
    assert not list(preempted["ckpt"].glob("*.tmp-*")), "leftovers of the killed save were not cleaned up"


@pytest.mark.timeout(900)
def test_resume_after_sigterm(preempted):
    final = preempted["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    step = preempted["term_step"]
    assert f"at step {step}" in final.stderr
    assert [r["step"] for r in preempted["rows_final"][len(preempted["rows_term"]):]] == [step + 1]
    assert_no_fake_checkpoint(preempted["ckpt"])


# ------------------------------------------------------------------------------------------------
# the disk fills up


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(400)
def test_disk_full_while_saving(tmp_path, small_disk):
    """A checkpoint takes ~2.4 MiB: step 1 fits on the 4 MiB disk, step 2 does not."""
    cfg = _config(tmp_path, **{"checkpoint.save": str(small_disk / "ckpt")})
    res = run_train(cfg, "schedule.steps=3", timeout=300)
    run = small_disk / "ckpt"
    assert_clean_error(res.returncode, res.stderr, f"could not save the checkpoint {run / 'step_0000002'}",
                       "no space left on the device", "the previous checkpoint is intact")
    assert [d.name for d in step_dirs(run)] == ["step_0000001"]
    assert not list(run.glob("*.tmp-*")), "the partial save was not removed"
    assert_no_fake_checkpoint(run)
    weights = load_weights(run / "step_0000001", tmp_path)
    assert weights and all(bool(torch.isfinite(w.float()).all()) for w in weights.values())


# ------------------------------------------------------------------------------------------------
# torchrun: a rank dies; a configuration error on every rank


def _torchrun(cfg: Path, logs: Path, *overrides: str) -> Job:
    """torchrun with each rank's stdout/stderr in its own file (logs/*/attempt_0/RANK/stderr.log)."""
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--redirects", "3", "--log-dir", str(logs),
           "-m", "megatron_opcd.train", "--config", str(cfg), *overrides]
    return Job(cmd, cfg.parent / "jobs")


def _rank_stderr(logs: Path) -> dict[int, str]:
    return {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}


def _rank_process(job: Job, rank: int) -> psutil.Process:
    for child in psutil.Process(job.proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process with RANK={rank} under torchrun")


@pytest.mark.timeout(400)
def test_rank_dies(tmp_path):
    """Rank 1 is killed after the first step; rank 0 notices at its next collective and ends with
    one line within the configured timeout (1 minute) instead of waiting forever."""
    cfg = _config(tmp_path, **{"parallel.distributed_timeout_minutes": 1})
    logs = tmp_path / "torchrun"
    job = _torchrun(cfg, logs)
    try:
        wait_for(lambda: len(train_steps(tmp_path / "logs" / "metrics.jsonl")) >= 1, 300, job, "step 1")
        _rank_process(job, 1).kill()
        killed = time.monotonic()
        rc = job.wait(90)
        took = time.monotonic() - killed
    finally:
        job.kill_group()
    assert rc != 0
    assert took < 60, f"the job took {took:.0f}s to end after a rank died"
    rank0 = _rank_stderr(logs)[0]
    assert "Traceback" not in rank0, rank0[-3000:]
    lines = error_lines(rank0)
    assert len(lines) == 1 and lines[0][0] == 0, rank0[-3000:]
    # In a collective of the step, or of the checkpoint save it was in: the same cause either way.
    assert "lost contact with another rank" in lines[0][1] and "resume" in lines[0][1], lines[0][1]
    assert_no_fake_checkpoint(tmp_path / "ckpt")


@pytest.mark.timeout(300)
def test_config_error_one_line_per_rank(tmp_path):
    cfg = _config(tmp_path)
    logs = tmp_path / "torchrun"
    job = _torchrun(cfg, logs, "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    assert job.wait(240) != 0
    per_rank = _rank_stderr(logs)
    assert sorted(per_rank) == [0, 1]
    for rank, err in per_rank.items():
        assert_clean_error(1, err, "world size 2 is not divisible by", "launch a multiple of 4 ranks", ranks=[rank])
