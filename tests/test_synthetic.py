"""The synthetic fallback task (megatron_opcd/evaluation/synthetic.py), and OPCD on it end to end.

Pre-training must give a model whose context decides its output (copy without it, sort with
it); then `python -m megatron_opcd.train` runs OPCD on it and must move the student toward the
teacher: the eval KL on held-out prompts goes down and the student's greedy outputs (without
the context) agree more with the teacher's (with it). No accuracy ranking is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opcd.data.prompts import Example
from megatron_opcd.evaluation import get_task
from megatron_opcd.evaluation.synthetic import ALPHABET, CONTEXT, make_prompts, train_tokenizer
from megatron_opcd.evaluation.tasks import SEPARATOR, apply_rule, digits_of


def test_rules_and_grader():
    assert digits_of("4213=") == "4213" and digits_of(f"{CONTEXT}{SEPARATOR}4213=") == "4213"
    assert apply_rule("4213", "sort") == "1234" and apply_rule("4213", "copy") == "4213"
    sort, copy = get_task("synthetic"), get_task("synthetic", rule="copy")
    e = Example(prompt="4213=")
    assert sort.grade("1234", e) == 1.0 and sort.grade(" 1234\n", e) == 1.0
    assert sort.grade("4213", e) == 0.0 and copy.grade("4213", e) == 1.0
    assert sort.grade("123", e) == 0.0 and sort.grade("12345", e) == 0.0 and sort.grade("", e) == 0.0
    assert sort.grade("1234", Example(prompt="R:sort|4213=")) == 1.0
    with pytest.raises(ValueError, match="sort or copy"):
        get_task("synthetic", rule="reverse")


def test_prompts_are_distinct_and_held_out():
    train = make_prompts(200, 1)
    held = make_prompts(50, 2, exclude=frozenset(train))
    assert len(set(train)) == 200 and not set(train) & set(held)
    assert make_prompts(200, 1) == train
    assert all(p.endswith("=") and 3 <= len(p) - 1 <= 5 for p in train + held)


def test_char_tokenizer(tmp_path):
    from megatron_opcd.data.tokenizer import load_tokenizer

    tok = load_tokenizer(train_tokenizer(tmp_path))
    assert tok.vocab_size == len(set(ALPHABET)) + 2 and tok.eos_ids == [1]
    a, b = f"{CONTEXT}{SEPARATOR}", "4213=1234"
    assert tok.encode(a) + tok.encode(b) == tok.encode(a + b)   # any split tokenises the same
    assert len(tok.encode(a + b)) == len(a + b) and tok.decode(tok.encode(a + b)) == a + b


def _eval_metrics(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r.get("split") == "eval"}


def test_pretrain_then_opcd_moves_student_toward_teacher(run_ranks, tmp_path):
    from _evaluation_ranks import synthetic_measure, synthetic_pretrain

    before = run_ranks(synthetic_pretrain, 1, str(tmp_path / "syn"), 200, timeout=300)[0]
    paths = before["paths"]
    for key in ("checkpoint", "train_file", "eval_file", "config", "context_file"):
        assert Path(paths[key]).exists(), key
    ckpt = Path(paths["checkpoint"])
    assert (ckpt / "model_config.yaml").is_file() and (ckpt / "model").is_dir()
    assert (ckpt / "tokenizer" / "tokenizer.model").is_file()
    assert Path(paths["context_file"]).read_text().strip() == CONTEXT
    # The context decides the output.
    assert before["teacher_sort"] >= 0.6, before
    assert before["student_copy"] >= 0.4 and before["student_sort"] <= 0.35, before

    run_dir = tmp_path / "opcd"
    steps = 30
    overrides = [f"schedule.steps={steps}", "optimizer.lr=1e-3", f"evaluation.interval={steps}",
                 f"checkpoint.save={run_dir}", f"logging.dir={run_dir}", "checkpoint.save_at_end=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPCD_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_opcd.train", "--config", paths["config"], *overrides],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = _eval_metrics(run_dir / "metrics.jsonl")
    assert set(evals) == {0, steps}
    assert evals[steps]["kl"] < 0.7 * evals[0]["kl"], evals   # KL(student || teacher) on held-out prompts

    final = sorted(run_dir.glob("step_*"))[-1]
    after = run_ranks(synthetic_measure, 1, str(final), paths["tokenizer_dir"], paths["eval_file"],
                      paths["checkpoint"], timeout=300)[0]
    print(f"\nsynthetic OPCD: eval KL {evals[0]['kl']:.3f} -> {evals[steps]['kl']:.3f}; before {before}; after {after}")
    assert after["teacher_sort"] == before["teacher_sort"]      # the frozen teacher did not move
    assert after["char_agreement"] > before["char_agreement"], (before, after)
    assert after["student_copy"] < before["student_copy"], (before, after)   # it stopped just copying
