"""Experience extraction (megatron_opcd/evaluation/experience.py, tools/extract_experience.py).

A random tiny model writes garbage, so the mechanics are tested with what we control: parsing
on concrete strings, the token cap with a word counter, the pool and its JSON with a scripted
fake teacher, selection with a fake evaluator; then `ModelCompleter` on a tiny random model,
and one end-to-end run of the CLI on a tiny checkpoint trained for seconds to write an item.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opcd.data.prompts import Example, load_pool
from megatron_opcd.evaluation import get_task
from megatron_opcd.evaluation.experience import (
    accumulate,
    extract_pool,
    format_items,
    parse_items,
    pool_contexts,
    select_best,
    write_pool,
)
from megatron_opcd.evaluation.templates import load_prompt

ROOT = Path(__file__).resolve().parents[1]


def words(text: str) -> int:
    return len(text.split())


def test_parse_items():
    text = """Some reasoning first.
- EXPERIENCE ITEM: Check the units before answering.
  * experience item: Re-read the question.
1. **EXPERIENCE ITEM:** Estimate first, then compute.
EXPERIENCE ITEM - Prefer exact fractions.
- EXPERIENCE ITEM:
- EXPERIENCE ITEM: check the units   before answering.
This line mentions an EXPERIENCE ITEM: but not at its start.
- EXPERIENCE ITEMS: a plural header is not an item
"""
    assert parse_items(text) == [
        "Check the units before answering.",
        "Re-read the question.",
        "Estimate first, then compute.",
        "Prefer exact fractions.",
    ]
    assert parse_items("no items at all") == []
    assert format_items(["a", "b"]) == "- EXPERIENCE ITEM: a\n- EXPERIENCE ITEM: b"
    assert parse_items(format_items(["x y", "z"])) == ["x y", "z"]  # format and parse round-trip


def test_accumulate_cap_policies():
    # format_items(["a1 a2"]) = "- EXPERIENCE ITEM: a1 a2" = 5 words; each 1-word item line costs 4.
    items, lost = accumulate([], ["one", "two", "three"], max_tokens=None, count_tokens=words)
    assert items == ["one", "two", "three"] and lost == 0
    items, lost = accumulate(["one", "two"], ["three"], max_tokens=8, count_tokens=words, policy="drop_oldest")
    assert items == ["two", "three"] and lost == 1 and words(format_items(items)) <= 8
    items, lost = accumulate(["one", "two"], ["three", "four"], max_tokens=8, count_tokens=words, policy="stop")
    assert items == ["one", "two"] and lost == 2
    # An item that does not fit even alone is discarded; the others stay.
    items, lost = accumulate(["one"], ["w " * 10], max_tokens=8, count_tokens=words)
    assert items == ["one"] and lost == 1
    # Duplicates (case, spacing) are not added twice and cost nothing.
    items, lost = accumulate(["Check the units"], ["check  the UNITS", "new"], max_tokens=None, count_tokens=words)
    assert items == ["Check the units", "new"] and lost == 0
    # A long run keeps the newest items under the cap.
    items: list[str] = []
    for i in range(20):
        items, _ = accumulate(items, [f"item{i}"], max_tokens=13, count_tokens=words)
    assert items == ["item17", "item18", "item19"]
    with pytest.raises(ValueError, match="drop_oldest or stop"):
        accumulate([], ["a"], max_tokens=4, count_tokens=words, policy="newest")


class ScriptedTeacher:
    """Solves by answering "ANSWER: <the problem's number>" when its context mentions that number,
    else "ANSWER: 0"; reflects with one item naming the problem number."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, contexts, *, seed, phase):
        self.calls.append((phase, list(prompts), list(contexts), seed))
        out = []
        for prompt, ctx in zip(prompts, contexts):
            if phase == "solve":
                n = prompt.split("#")[1].split()[0]
                out.append(f"ANSWER: {n}" if ctx and f"remember {n}" in ctx else "ANSWER: 0")
            else:
                n = prompt.split("#")[1].split()[0]
                out.append(f"Thoughts.\n- EXPERIENCE ITEM: remember {n}\n- EXPERIENCE ITEM: be careful")
        return out


def test_extract_pool_with_a_scripted_teacher(tmp_path):
    problems = [Example(prompt=f"problem #{i} (what is {i}?)", answer=str(i), index=i - 1) for i in range(1, 6)]
    teacher = ScriptedTeacher()
    reflect = load_prompt("experience_reflect")
    runs = extract_pool(teacher, problems, get_task("math"), seeds=[0, 1, 2], count_tokens=words,
                        max_items_tokens=None, reflect_template=reflect)
    # Lock-step: one solve and one reflect call per problem, each over the three seeds.
    assert [c[0] for c in teacher.calls] == ["solve", "reflect"] * 5
    assert all(len(c[1]) == 3 for c in teacher.calls)
    orders = [[s.problem for s in r.steps] for r in runs]
    assert all(sorted(o) == [0, 1, 2, 3, 4] for o in orders) and len({tuple(o) for o in orders}) == 3
    # The first solve has no context; later ones see the items accumulated so far.
    assert teacher.calls[0][2] == [None, None, None]
    second_solve = teacher.calls[2]
    for r, ctx in zip(runs, second_solve[2]):
        first = problems[r.steps[0].problem]
        assert ctx == format_items([f"remember {first.answer}", "be careful"])
    # Reflection prompts carry the problem, the response, the grade and the experience so far.
    first_reflect = teacher.calls[1][1][0]
    assert "ANSWER: 0" in first_reflect and "incorrect (0.0)" in first_reflect and "(none yet)" in first_reflect
    for r in runs:
        assert len(r.items) == 6 and [s.grade for s in r.steps] == [0.0] * 5   # items never name the next problem
        assert r.steps[0].added == [f"remember {problems[r.steps[0].problem].answer}", "be careful"]
        assert r.steps[1].added == [f"remember {problems[r.steps[1].problem].answer}"]   # no duplicate
    # Files: pool.json is what the trainer's context.pool reads; runs beside it.
    pool_path, runs_path = write_pool(tmp_path / "pool.json", runs)
    assert load_pool(pool_path) == [r.context for r in runs]
    detail = json.loads(runs_path.read_text())
    assert [d["seed"] for d in detail] == [0, 1, 2]
    assert set(detail[0]["steps"][0]) == {"problem", "response", "grade", "reflection", "added"}


def test_extract_pool_cap_and_max_problems():
    problems = [Example(prompt=f"problem #{i}", answer=str(i), index=i) for i in range(10)]
    runs = extract_pool(ScriptedTeacher(), problems, get_task("exact"), seeds=[3], count_tokens=words,
                        max_items_tokens=10, reflect_template="{problem} {response} {experience}", max_problems=4)
    (run,) = runs
    # Two 5-word item lines fit in 10 words; drop_oldest keeps the newest two.
    assert len(run.steps) == 4 and words(run.context) <= 10 and run.dropped == 4
    assert run.items == ["be careful", f"remember {problems[run.steps[-1].problem].answer}"]


def test_select_best_picks_the_argmax():
    scores = {"ctx a": 0.2, "ctx b": 0.9, "ctx c": 0.5}
    best, got = select_best(list(scores), scores.get)
    assert best == 1 and got == [0.2, 0.9, 0.5]
    best, _ = select_best(["x", "y", "z"], lambda c: {"x": 0.5, "y": 0.7, "z": 0.7}[c])
    assert best == 1   # ties go to the earliest
    with pytest.raises(ValueError):
        select_best([], lambda c: 0.0)


def test_pool_skips_seeds_without_items(tmp_path):
    from megatron_opcd.evaluation.experience import ExperienceRun

    runs = [ExperienceRun(seed=0), ExperienceRun(seed=1, items=["a"])]
    assert pool_contexts(runs) == ["- EXPERIENCE ITEM: a"]


# ----------------------------------------------------------------------------------------------
# With a model

@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from _evaluation_ranks import train_sp_tokenizer

    return train_sp_tokenizer(tmp_path_factory.mktemp("tok"))


def test_model_completer_mechanics(run_ranks, tok_path):
    from _evaluation_ranks import experience_suite

    problems = [{"prompt": p, "answer": "x"} for p in ("the sea", "a ship")]
    (res,) = run_ranks(experience_suite, 1, tok_path, problems, timeout=240)
    assert [c["phase"] for c in res["calls"]] == ["solve", "reflect"] * 2
    assert all(c["n"] == 3 for c in res["calls"])
    assert res["calls"][0]["contexts"] == [None, None, None]
    assert [len(r[1]) for r in res["runs"]] == [2, 2, 2]


def test_cli_end_to_end(run_ranks, tok_path, tmp_path):
    from _evaluation_ranks import ITEM, write_item_emitter

    ckpt = run_ranks(write_item_emitter, 1, str(tmp_path / "ckpt"), tok_path, timeout=240)[0]
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in ("the sea", "a ship")))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "why", "answer": "7"}) + "\n")
    out, best = tmp_path / "out" / "pool.json", tmp_path / "out" / "best.txt"
    cmd = [sys.executable, str(ROOT / "tools" / "extract_experience.py"), "--ckpt", ckpt, "--problems", str(problems),
           "--task", "math", "--seeds", "2", "--max-new-tokens", "16", "--reflect-max-new-tokens", "16",
           "--max-items-tokens", "64", "--greedy", "--out", str(out),
           "--select", "--val", str(val), "--out-best", str(best)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPCD_QUIET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pool = json.loads(out.read_text())
    assert isinstance(pool, list) and len(pool) == 2 and load_pool(out) == pool
    expected = format_items(parse_items(ITEM))
    assert pool == [expected, expected]     # the emitter writes the same item for every seed
    runs = json.loads((out.parent / "pool.runs.json").read_text())
    assert [r["seed"] for r in runs] == [0, 1] and all(len(r["steps"]) == 2 for r in runs)
    assert best.read_text() == expected + "\n"
    scores = json.loads((out.parent / "best.scores.json").read_text())
    assert scores["best"] == 0 and len(scores["scores"]) == 2 and scores["n"] == 1
    assert 0.0 <= scores["no_context"] <= 1.0

    # Bad input: one line naming the problem, exit code 1.
    bad = subprocess.run(cmd[:2] + ["--ckpt", ckpt, "--problems", str(tmp_path / "missing.jsonl"), "--task", "math"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "missing.jsonl does not exist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_game_select_end_to_end(run_ranks, tok_path, tmp_path):
    """--game --select: the pool from played levels, the best context by validation success, and its
    scores file (the same selection code as for tasks)."""
    from _evaluation_ranks import ITEM, write_item_emitter

    # Game transcripts make long reflection prompts (~800 tokens with this tiny tokenizer).
    ckpt = run_ranks(write_item_emitter, 1, str(tmp_path / "ckpt"), tok_path, 40, 1000, timeout=240)[0]
    out, best = tmp_path / "out" / "pool.json", tmp_path / "out" / "best.txt"
    cmd = [sys.executable, str(ROOT / "tools" / "extract_experience.py"), "--ckpt", ckpt, "--game", "frozen_lake",
           "--levels", "0:2", "--max-rounds", "1", "--seeds", "2", "--max-new-tokens", "8", "--reflect-max-new-tokens", "16",
           "--max-items-tokens", "64", "--greedy", "--out", str(out),
           "--select", "--val-levels", "1000:1002", "--out-best", str(best)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPCD_QUIET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pool = json.loads(out.read_text())
    expected = format_items(parse_items(ITEM))
    assert pool == [expected, expected]  # the emitter reflects the same item after every level
    assert best.read_text() == expected + "\n"
    scores = json.loads((out.parent / "best.scores.json").read_text())
    assert scores["best"] == 0 and len(scores["scores"]) == 2
    assert scores["game"] == "frozen_lake" and scores["val_levels"] == "1000:1002"
    assert all(0.0 <= x <= 1.0 for x in [scores["no_context"], *scores["scores"]])
