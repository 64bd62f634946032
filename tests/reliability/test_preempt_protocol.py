"""The agreed stop of training/preempt.py on 3 gloo ranks that decode different numbers of steps
(DP replicas finish their rollouts at different decode steps): every rank makes the same sequence
of all-reduces, so they all stop at the same check or all finish, and the next collective pairs up."""

from __future__ import annotations

import pytest

from _preempt_ranks import decode_and_drain


@pytest.mark.timeout(300)
def test_ranks_agree_at_the_same_check(run_ranks):
    # No signal: ranks of 3, 10 and 17 decode steps all finish; the drain matches the checks.
    quiet, stop = zip(*run_ranks(decode_and_drain, 3, [3, 10, 17], [[-1, -1, -1], [-1, -1, 9]], timeout=240))
    assert [r["stopped"] for r in quiet] == [None, None, None]
    assert [r["probe"] for r in quiet] == [6.0] * 3 and not any(r["after"] for r in quiet)
    # Rank 2 (the longest) sees the signal at its step 9: its check at step 12 (the 3rd) stops
    # everyone, the two that finished decoding from inside their drain.
    assert [r["stopped"] for r in stop] == ["the end of the rollout", "the end of the rollout",
                                            "decode step 12 of the rollout"]
    assert [r["probe"] for r in stop] == [6.0] * 3 and all(r["after"] for r in stop)


def test_opcd_torchrun_exits_0_only_when_every_local_worker_stopped_cleanly(tmp_path, monkeypatch):
    """megatron_opcd/torchrun.py: each worker's file after its stop checkpoint; all local ranks with
    the same step -> that step; a rank missing, or ranks at different steps -> None (torchrun's exit 1)."""
    from megatron_opcd import torchrun

    monkeypatch.setenv(torchrun.STOP_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert torchrun.clean_stops(tmp_path) is None
    for rank in (0, 2):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        torchrun.record_clean_stop(7)
    assert torchrun.clean_stops(tmp_path) is None  # local rank 1 did not stop cleanly
    monkeypatch.setenv("LOCAL_RANK", "1")
    torchrun.record_clean_stop(6)
    assert torchrun.clean_stops(tmp_path) is None  # not the same step
    torchrun.record_clean_stop(7)
    assert torchrun.clean_stops(tmp_path) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]  # no temporary left
    monkeypatch.delenv(torchrun.STOP_DIR_ENV)
    (tmp_path / "0").unlink()
    torchrun.record_clean_stop(7)  # under plain torchrun: nothing is written
    assert not (tmp_path / "0").exists()
