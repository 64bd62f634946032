"""NaN/inf: skip the step or stop, by numerics.on_nonfinite; a non-finite update is never applied
or saved. The trigger is real, not injected: optimizer.lr=1e30 makes Adam's first update ~1e30 per
weight (still finite), so from step 2 on the logits overflow and the loss and gradients are NaN."""

from __future__ import annotations

import torch
import pytest

from ._helpers import assert_clean_error, assert_no_fake_checkpoint, cli_in_process, load_weights, step_dirs, train_steps

EXPLODE = ("optimizer.lr=1e30", "checkpoint.interval=1", "checkpoint.keep_last=0", "data.eval=null")


def _all_finite(weights: dict) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in weights.values())


@pytest.mark.timeout(180)
def test_nonfinite_stop(tiny, tmp_path):
    run = tmp_path / "run"
    rc, err = cli_in_process(tiny, *EXPLODE, "schedule.steps=3", "numerics.on_nonfinite=stop",
                             f"checkpoint.save={run}", f"logging.dir={run}")
    assert_clean_error(rc, err, "step 2: non-finite loss or gradients", "numerics.on_nonfinite=stop",
                       "Lower optimizer.lr")
    assert [d.name for d in step_dirs(run)] == ["step_0000001"], "only the last finite step may be saved"
    assert_no_fake_checkpoint(run)
    assert _all_finite(load_weights(step_dirs(run)[0], tmp_path))


@pytest.mark.timeout(180)
def test_nonfinite_skip(tiny, tmp_path):
    """Steps 2 and 3 are skipped (logged as such); every checkpoint holds the finite step-1 weights."""
    run = tmp_path / "run"
    rc, err = cli_in_process(tiny, *EXPLODE, "schedule.steps=3", "numerics.on_nonfinite=skip",
                             f"checkpoint.save={run}", f"logging.dir={run}")
    assert rc == 0, err
    assert "step 2 skipped: non-finite loss or gradients" in err
    rows = train_steps(run / "metrics.jsonl")
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert [d.name for d in step_dirs(run)] == ["step_0000001", "step_0000002", "step_0000003"]
    assert_no_fake_checkpoint(run)
    first, last = (load_weights(d, tmp_path) for d in (step_dirs(run)[0], step_dirs(run)[-1]))
    assert _all_finite(last)
    for name, w in first.items():  # a skipped step changes nothing
        assert torch.equal(w, last[name]), name


@pytest.mark.timeout(180)
def test_too_many_skips_stop(tiny, tmp_path):
    rc, err = cli_in_process(tiny, *EXPLODE, "schedule.steps=5", "numerics.on_nonfinite=skip",
                             "numerics.max_consecutive_skips=1", "checkpoint.save=null", f"logging.dir={tmp_path}")
    assert_clean_error(rc, err, "step 3: non-finite loss or gradients", "2 skipped in a row")
