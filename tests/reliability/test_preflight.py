"""Every check that needs no model runs before any model is built (training/preflight.py).

Each case runs the real CLI in this process with `build_model` replaced by a function that fails
the test: the one-line error must come first. (Before preflight, data.eval, the contexts, the
task and the batch arithmetic were checked only after both models were built and loaded.)"""

from __future__ import annotations

import warnings

import pytest

from ._helpers import assert_clean_error, cli_in_process

CASES = {
    "missing prompt file": (["data.train=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl does not exist"]),
    "missing eval file": (["data.eval=/nonexistent/eval.jsonl"], ["/nonexistent/eval.jsonl does not exist"]),
    "missing context file": (["context.text=null", "context.file=/nonexistent/system.txt"],
                             ["context file /nonexistent/system.txt does not exist"]),
    "no context for the teacher": (["context.text=null"], ["example 0 has no context", "context.text/file/pool"]),
    "unknown task": (["evaluation.task=nope"], ["unknown evaluation task 'nope'", "known tasks:"]),
    "task argument": (["evaluation.task=starts_with", "evaluation.task_args={prefixx: A}"],
                      ["task 'starts_with' takes no argument 'prefixx'"]),
    "task without answers": (["evaluation.task=exact"],
                             ['evaluation.task=exact grades against "answer"', "line 1 of", "eval.jsonl has none"]),
    "batch vs micro x DP": (["schedule.micro_batch_size=3"],
                            ["global_batch_size=4 is not divisible by schedule.micro_batch_size=3"]),
    "context over max_context_tokens": (["data.max_context_tokens=2", "data.too_long=error"],
                                        ["exceeds data.max_context_tokens=2", "raise data.max_context_tokens"]),
}


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before a check that needs none")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides,needles", list(CASES.values()), ids=list(CASES))
def test_checked_before_any_model_is_built(tiny, monkeypatch, overrides, needles):
    import megatron_opcd.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", _no_model)
    rc, err = cli_in_process(tiny, *overrides)
    assert_clean_error(rc, err, *needles)


@pytest.mark.timeout(120)
def test_too_long_error_hint_names_the_right_knob(tiny):
    """A context over data.max_context_tokens: the fix is that limit, not generation.max_new_tokens
    (raising it would make a position overflow worse). Models may be built here: this checks the text."""
    rc, err = cli_in_process(tiny, "data.max_context_tokens=2", "data.too_long=error")
    assert rc == 1 and "raise generation.max_new_tokens" not in err and "raise data.max_context_tokens" in err


@pytest.mark.timeout(120)
def test_context_to_be_cut_is_said_at_load_time(tiny, monkeypatch):
    """data.too_long=truncate_context (the default): one loud warning with the numbers before any
    model is built, not only a warning at the first step."""
    import megatron_opcd.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", _no_model)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(AssertionError, match="a model was built"):
        warnings.simplefilter("always")
        cli_in_process(tiny, "data.max_context_tokens=2")  # passes preflight: stopped at the first model
    cut = [str(w.message) for w in seen if "will be CUT" in str(w.message)]
    assert len(cut) == 1, [str(w.message) for w in seen]
    assert "data.max_context_tokens=2" in cut[0] and "of 32 examples" in cut[0] and "data.too_long=error" in cut[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task,needles", [
    (["evaluation.task=choice"], ["evaluation.task=choice: line 2 of", "'not hateful' is not one of the letters A, B, C, D"]),
    (["evaluation.task=safety"], ["evaluation.task=safety: line 2 of", "'not hateful'", "is not one of the labels ['safe', 'unsafe']"]),
], ids=["choice", "safety"])
def test_answers_the_task_cannot_grade_are_refused_before_any_model(tiny, tmp_path, monkeypatch, task, needles):
    """An answer the grader cannot use (the rehearsal of the safety examples found their
    `task: choice` against "hateful"/"not hateful" labels, a traceback at the first evaluation):
    one line naming the line of the file, before any model is built."""
    import json

    import megatron_opcd.training.trainer as trainer

    rows = [json.loads(line) for line in (tiny.parent / "eval.jsonl").read_text().splitlines()]
    answers = ["B", "not hateful"] + ["A"] * (len(rows) - 2) if task == ["evaluation.task=choice"] else \
        ["safe", "not hateful"] + ["unsafe"] * (len(rows) - 2)
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(rows, answers)))
    monkeypatch.setattr(trainer, "build_model", _no_model)
    rc, err = cli_in_process(tiny, f"data.eval={path}", *task)
    assert_clean_error(rc, err, *needles)
    ok = [{**r, "answer": "hateful"} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in ok))
    if task == ["evaluation.task=safety"]:  # the labels the safety examples now name: past preflight
        with pytest.raises(AssertionError, match="a model was built"):
            cli_in_process(tiny, f"data.eval={path}", *task, "evaluation.task_args={labels: [hateful, not hateful]}")
