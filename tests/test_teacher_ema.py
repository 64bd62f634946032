"""`teacher.mode: ema` (megatron_opcd/training/ema.py): the teacher is the moving average of the
student, kept in the student's sharding, saved in the checkpoint, resumed bit for bit.

Tolerance of the float64 comparison: the average is three fp32 axpys `t <- d t + (1 - d) s` of
fp32 weights, each rounding once or twice at fp32's 2**-24 relative; 1e-6 of the largest weight of
a shard bounds that with room, and the test also checks that the teacher is neither the live
student nor its start (so an EMA that did not move, or copied the student, fails)."""

from __future__ import annotations

import pytest
import yaml

from _train_fixtures import make_run
from _train_ranks import ema_steps, ema_train
from megatron_opcd.errors import ConfigError
from megatron_opcd.training.config import load_train_config

DECAY = 0.6


def _cfg(root, steps, extra=None, tp=1):
    path = make_run(root, tp=tp, steps=steps, teacher="self", extra={
        "optimizer.lr": 1e-2, "logging.dir": str(root / "logs"), **(extra or {})})
    cfg = yaml.safe_load(path.read_text())
    cfg["teacher"] = {"mode": "ema", "ema_decay": DECAY}  # make_run writes `teacher: self`
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("layout", ["tp2", "dp2_distopt"])
def test_ema_teacher_equals_the_float64_average_after_three_steps(run_ranks, tmp_path, layout):
    extra = {"checkpoint.save": None}
    if layout == "dp2_distopt":
        extra["parallel.use_distributed_optimizer"] = True
    cfg = _cfg(tmp_path, 3, extra, tp=2 if layout == "tp2" else 1)
    for got in run_ranks(ema_steps, 2, cfg, [], timeout=400):
        assert got["skipped"] == [False] * 3 and got["dtype"] == "torch.float32"
        students = got["students"]
        for name, s0 in students[0].items():
            assert (got["first_teacher"][name] == s0).all()  # the average starts at the student
            ref = s0.clone()
            for s in students[1:]:
                ref = DECAY * ref + (1 - DECAY) * s[name]  # float64
            t = got["teacher"][name]
            scale = max(1.0, float(ref.abs().max()))
            assert float((t - ref).abs().max()) <= 1e-6 * scale, name
        moved = [n for n in students[0] if float((students[-1][n] - students[0][n]).abs().max()) > 1e-4]
        assert moved, "the student did not move: the test would prove nothing"
        for n in moved:
            assert float((got["teacher"][n] - students[-1][n]).abs().max()) > 1e-5  # not the live student
            assert float((got["teacher"][n] - students[0][n]).abs().max()) > 1e-5  # not its start


def test_resumed_run_keeps_the_ema_teacher_bit_for_bit(run_ranks, tmp_path):
    """4 steps straight vs 2 steps, stop, resume to 4 (TP = 2): the resumed teacher is bitwise the
    one saved at step 2, and the final teacher and losses equal the uninterrupted run's."""
    straight = run_ranks(ema_train, 2, _cfg(tmp_path / "full", 4, tp=2), [], timeout=400)
    split = _cfg(tmp_path / "split", 4, {"checkpoint.interval": 2}, tp=2)
    first = run_ranks(ema_train, 2, split, ["schedule.steps=2"], timeout=400)
    step2 = tmp_path / "split" / "ckpt" / "step_0000002"
    assert (step2 / "teacher_ema" / "model" / ".metadata").is_file()
    second = run_ranks(ema_train, 2, split, [], timeout=400)
    assert len(second[0]["history"]) == 2, "the second run must resume at step 2"
    for r in range(2):
        for name, t in first[r]["end"].items():
            assert (second[r]["start"][name] == t).all(), f"rank {r}: {name} not restored bit for bit"
            assert (second[r]["end"][name] == straight[r]["end"][name]).all(), f"rank {r}: {name} after resume"
    got = [h["loss"] for h in first[0]["history"] + second[0]["history"]]
    assert got == [h["loss"] for h in straight[0]["history"]]


@pytest.mark.parametrize("overrides,needle", [
    (["teacher.mode=ema"], "teacher.mode=ema needs teacher.ema_decay"),
    (["teacher.mode=ema", "teacher.ema_decay=1.0"], "teacher.ema_decay=1.0 must be in [0, 1)"),
    (["teacher.mode=self", "teacher.ema_decay=0.9"], "teacher.ema_decay is for teacher.mode=ema"),
])
def test_ema_config_is_loud(tmp_path, overrides, needle):
    cfg = make_run(tmp_path, teacher="self")
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        load_train_config(str(cfg), overrides)
