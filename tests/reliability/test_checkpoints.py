"""Checkpoints: the run folder belongs to one run, nothing damaged loads, resume honours the config.

* ownership: a second run on a live run's folder is refused with one line; a dead run's lock is
  taken over with a message; start-up cleanup leaves a user's folders alone;
* integrity: a flipped byte in a model or optimizer shard, a deleted optimizer/, a missing marker
  field are one line naming the folder and the part (`checkpoint.fallback=previous` resumes from the
  newest checkpoint that verifies); a kill during retention leaves no marked-but-partial folder;
  non-finite weights are never written;
* resume: a changed LR schedule is refused unless checkpoint.use_checkpoint_schedule says which side
  wins (and the chosen LR is the one applied); a changed architecture field is refused before any
  model is built; the checkpoint's own tokenizer/ is used.

The checkpoints come from one tiny 2-step run (cosine decay, a checkpoint per step); each case works
on a copy. Most cases fail before a model is built (well under a second). The timeouts (300 s)
are hang guards that also cover the shared run, paid by whichever case comes first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from _train_fixtures import make_run
from ._helpers import assert_clean_error, assert_no_fake_checkpoint, cli_in_process, train_steps

LR = 1e-3  # make_run's optimizer.lr


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 2-step cosine run with a checkpoint after each step: {"cfg", "ckpt"}."""
    root = tmp_path_factory.mktemp("ckpt_run")
    cfg = make_run(root, steps=2, extra={"checkpoint.interval": 1, "checkpoint.keep_last": 0, "data.eval": None,
                                         "schedule.decay": "cosine", "logging.dir": str(root / "logs")})
    rc, err = cli_in_process(cfg)
    assert rc == 0, err
    return {"cfg": cfg, "ckpt": root / "ckpt"}


def _copy(run, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(run["ckpt"], dst)
    return dst


def _resume(run, folder: Path, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    return cli_in_process(run["cfg"], f"checkpoint.save={folder}", f"logging.dir={tmp_path / 'logs'}", *overrides)


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# ownership


def _hold_lock(folder: Path, pid: int) -> None:
    """The lock file a run with process `pid` on this host writes (RunLock's format)."""
    from megatron_opcd.training.state import LOCK_NAME

    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": time.time(),
                                                "created": psutil.Process(pid).create_time()}))


@pytest.mark.timeout(300)
def test_second_run_on_a_live_runs_folder_is_refused(run, tmp_path):
    """Another live process holds the folder: one line naming it; nothing in the folder is touched
    (today the second run's start-up cleanup deleted the first's save in progress)."""
    folder = _copy(run, tmp_path)
    (folder / "step_0000003.tmp-1-2").mkdir()  # the other run's save in progress
    holder = subprocess.Popen(["sleep", "120"])
    try:
        _hold_lock(folder, holder.pid)
        before = sorted(p.name for p in folder.iterdir())
        rc, err = _resume(run, folder, tmp_path, "schedule.steps=3")
        assert_clean_error(rc, err, f"checkpoint.save={folder} is in use by another run",
                           f"pid {holder.pid} on {socket.gethostname()}", "give this run its own checkpoint.save")
        assert sorted(p.name for p in folder.iterdir()) == before, "the refused run touched the folder"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(60)
def test_stale_lock_is_taken_over(tmp_path, capsys):
    """A lock left by a dead process on this host is taken over with a message, and released."""
    from megatron_opcd.training.state import LOCK_NAME, lock_run_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "created": 0.0}))
    lock = lock_run_dir(tmp_path)
    try:
        assert f"took over the lock {tmp_path / LOCK_NAME} of pid {dead.pid}" in capsys.readouterr().err
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.timeout(30)
def test_cleanup_touches_only_its_own_names(tmp_path):
    """Leftovers of this project's saves, re-saves and retention go; a user's folders stay."""
    from megatron_opcd.training.state import cleanup_incomplete

    mine = ["step_0000003.tmp-12-345", "step_0000002.old-678", "step_0000001.del-9"]
    users = ["results.old-2023", "notes.tmp-draft", "step_0000004.tmp-backup", "old-runs"]
    for name in mine + users:
        (tmp_path / name).mkdir()
    removed = cleanup_incomplete(tmp_path)
    assert sorted(removed) == sorted(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users)


# ------------------------------------------------------------------------------------------------
# integrity


@pytest.mark.timeout(300)
@pytest.mark.parametrize("part", ["model", "optimizer"])
def test_flipped_byte_in_a_shard(run, tmp_path, part):
    folder = _copy(run, tmp_path)
    shard = folder / "step_0000002" / part / "__0_0.distcp"
    _flip_byte(shard)
    rc, err = _resume(run, folder, tmp_path, "schedule.steps=2")
    assert_clean_error(rc, err, f"checkpoint {folder / 'step_0000002'} is damaged: {part}/__0_0.distcp does not match "
                       "its checksum", "set checkpoint.fallback=previous")


@pytest.mark.timeout(300)
def test_deleted_optimizer_folder(run, tmp_path):
    folder = _copy(run, tmp_path)
    shutil.rmtree(folder / "step_0000002" / "optimizer")
    rc, err = _resume(run, folder, tmp_path, "schedule.steps=2")
    assert_clean_error(rc, err, f"checkpoint {folder / 'step_0000002'} is damaged: optimizer/.metadata is missing")


@pytest.mark.timeout(300)
def test_missing_marker_field(run, tmp_path):
    folder = _copy(run, tmp_path)
    marker = folder / "step_0000002" / "opcd_checkpoint.json"
    meta = json.loads(marker.read_text())
    del meta["data_position"]
    marker.write_text(json.dumps(meta))
    rc, err = _resume(run, folder, tmp_path, "schedule.steps=2")
    assert_clean_error(rc, err, f"{marker} has no \"data_position\" field", f"delete {folder / 'step_0000002'}")


@pytest.mark.timeout(300)
def test_fallback_previous_resumes_from_the_newest_that_verifies(run, tmp_path):
    folder = _copy(run, tmp_path)
    _flip_byte(folder / "step_0000002" / "model" / "__0_0.distcp")
    rc, err = _resume(run, folder, tmp_path, "checkpoint.fallback=previous")
    assert rc == 0, err
    assert f"skipping checkpoint {folder / 'step_0000002'} is damaged" in err
    assert f"resumed from {folder / 'step_0000001'} at step 1" in err
    assert [r["step"] for r in train_steps(tmp_path / "logs" / "metrics.jsonl")] == [2]


@pytest.mark.timeout(30)
def test_kill_during_retention_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """The process dies while retention deletes step 1 (after model/ is gone, before the rest):
    no `step_*` folder is left with its marker but without its model."""
    from megatron_opcd.training import state

    for step in (1, 2, 3):
        d = state.step_dir(tmp_path, step)
        for part in ("model", "optimizer"):
            (d / part).mkdir(parents=True)
            (d / part / ".metadata").write_text("x")
        (d / "model_config.yaml").write_text("{}")
        (d / "opcd_checkpoint.json").write_text(json.dumps({"step": step}))

    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        rmtree(Path(path) / "model")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(state.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        state.apply_retention(tmp_path, keep_last=2)
    monkeypatch.undo()
    assert_no_fake_checkpoint(tmp_path)
    state.cleanup_incomplete(tmp_path)  # the next start removes what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]


@pytest.mark.timeout(30)
def test_nonfinite_weights_are_never_written(tmp_path):
    from megatron_opcd.checkpointing import save_checkpoint
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.errors import CheckpointError

    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save .*step_0000001: the weights hold NaN/inf \(weight"):
        save_checkpoint(tmp_path / "step_0000001", model, ModelConfig())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# resume honours the config


@pytest.mark.timeout(300)
def test_changed_schedule_is_refused(run, tmp_path):
    folder = _copy(run, tmp_path)
    rc, err = _resume(run, folder, tmp_path, "schedule.steps=4", "optimizer.lr=0.002")
    assert_clean_error(rc, err, f"resuming from {folder / 'step_0000002'}",
                       "optimizer.lr=0.002 in the config but 0.001 in the checkpoint",
                       "schedule.steps=4 in the config but 2 in the checkpoint",
                       "checkpoint.use_checkpoint_schedule=true", "checkpoint.use_checkpoint_schedule=false")


def _cosine(step: int, horizon: int) -> float:
    return 0.0 if step > horizon else LR * 0.5 * (1 + math.cos(math.pi * step / horizon))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("choice,horizon", [("false", 4), ("true", 2)])
def test_changed_schedule_with_a_choice(run, tmp_path, choice, horizon):
    """Cosine over 2 steps, resumed for 3: `false` decays over the config's 4 steps, `true` keeps
    the checkpoint's 2 (step 3 is past its end: min_lr). The choice is logged. data.tokenizer is
    unset: the checkpoint's own tokenizer/ is used (there is no checkpoint.pretrained to fall back to)."""
    folder = _copy(run, tmp_path)
    rc, err = _resume(run, folder, tmp_path, "schedule.steps=3" if choice == "true" else "schedule.steps=4",
                      f"checkpoint.use_checkpoint_schedule={choice}", "data.tokenizer=null")
    assert rc == 0, err
    assert f"checkpoint.use_checkpoint_schedule={choice}: the {'checkpoint' if choice == 'true' else 'config'}'s " \
           "schedule.steps=" in err
    assert f"the tokenizer is the checkpoint's own {folder / 'step_0000002' / 'tokenizer'}" in err
    rows = train_steps(tmp_path / "logs" / "metrics.jsonl")
    assert rows and rows[0]["step"] == 3
    assert math.isclose(rows[0]["lr"], _cosine(3, horizon), rel_tol=1e-9, abs_tol=1e-15), (rows[0]["lr"], horizon)


@pytest.mark.timeout(300)
def test_changed_architecture_field_is_refused(run, tmp_path):
    """rotary_base changes no shape: megatron loads the weights without a word, into another model."""
    folder = _copy(run, tmp_path)
    rc, err = _resume(run, folder, tmp_path, "schedule.steps=3", "model.rotary_base=500000")
    assert_clean_error(rc, err, f"does not match {folder / 'step_0000002'}/model_config.yaml",
                       "model.rotary_base=500000 but the checkpoint has 10000", "must describe the model being resumed")
