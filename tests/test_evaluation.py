"""Tasks, graders and evaluate_task (megatron_opcd/evaluation).

Graders are checked on many concrete strings, tricky ones included. evaluate_task runs a tiny
random model: its batched, prefix-sharing responses must equal one-prompt-at-a-time `generate`
calls, its accuracy must be the exact fraction the answers were built to give, and a 2-rank
data-parallel run must return what the single process returns.
"""

from __future__ import annotations

import pytest

from megatron_opcd.data.prompts import Example
from megatron_opcd.errors import ConfigError
from megatron_opcd.evaluation import (
    detect_language,
    extract_choice,
    extract_label,
    extract_math_answer,
    get_task,
    math_equal,
)
from megatron_opcd.evaluation.templates import fill, load_prompt


def ex(prompt="q", answer=None, index=0):
    return Example(prompt=prompt, answer=answer, index=index)


# ----------------------------------------------------------------------------------------------
# math

@pytest.mark.parametrize("response, gold, expected", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "1/2", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\frac{-3}{4}}", "-\\frac{3}{4}", 1.0),
    ("ANSWER: 42.", "42", 1.0),
    ("ANSWER: 42. Because 6 times 7 is 42.", "42", 1.0),
    ("answer: **42**", "42", 1.0),
    ("Final answer: 12", "12", 1.0),
    ("The answer is $1,000$.", "1000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{10^\\circ}", "10", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{(2, 1)}", "(1,2)", 0.0),          # a tuple is ordered
    ("\\boxed{2, -3}", "-3, 2", 1.0),           # a bare list of solutions is not
    ("\\boxed{\\left( 1, \\frac{1}{2} \\right)}", "(1, 0.5)", 1.0),
    ("\\boxed{0.333}", "\\frac13", 0.0),        # not within 1e-6
    ("\\boxed{0.3333333333}", "\\frac13", 1.0),
    ("\\boxed{3} wait, no. ANSWER: 4", "4", 1.0),   # the later answer wins
    ("ANSWER: 4 ... actually \\boxed{3}", "4", 0.0),
    ("ANSWER: \\boxed{9}", "9", 1.0),
    ("\\boxed{\\frac{1}{2}", "0.5", 0.0),        # cut off inside the box: no answer
    ("I think it is 7", "7", 0.0),              # no final-answer marker
    ("\\boxed{7}", "\\boxed{7}", 1.0),          # a boxed gold is unboxed
    ("\\boxed{\\text{Monday}}", "monday", 1.0),
    ("\\boxed{43}", "42", 0.0),
    ("\\boxed{}", "0", 0.0),
    ("", "0", 0.0),
])
def test_math_grader(response, gold, expected):
    assert get_task("math").grade(response, ex(answer=gold)) == expected


def test_math_extraction_details():
    assert extract_math_answer("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"
    assert extract_math_answer("\\boxed 5 dollars") == "5"
    assert extract_math_answer("nothing here") is None
    assert extract_math_answer("it is 3, then 17", fallback_last_number=True) == "17"
    assert get_task("math", fallback_last_number=True).grade("so 7", ex(answer="7")) == 1.0
    assert math_equal("1e-3", "0.001") and math_equal("1,234.5", "1234.5")
    assert not math_equal(None, "1") and not math_equal("1", None)
    with pytest.raises(ValueError, match="has none"):
        get_task("math").grade("\\boxed{1}", ex(answer=None))


# ----------------------------------------------------------------------------------------------
# multiple choice

@pytest.mark.parametrize("response, letter", [
    ("ANSWER: C", "C"),
    ("Reasoning... ANSWER: (b)", "B"),          # lower case after an explicit marker
    ("First ANSWER: A, no wait, ANSWER: D", "D"),
    ("The answer is (B).", "B"),
    ("The correct option is C because", "C"),
    ("B) Hypertension", "B"),
    ("(D)", "D"),
    ("D.", "D"),
    ("A", "A"),
    ("\\boxed{E}", "E"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("Between (A) and (B) I pick... ", None),   # two candidates, no marker
    ("A patient presents with fever", None),    # an article, not an option
    ("the answer is a bit unclear", None),      # lower-case "a" without a marker
    ("ANSWER: F", None),                        # outside A-E
    ("", None),
])
def test_choice_extraction(response, letter):
    assert extract_choice(response, "ABCDE") == letter


def test_choice_grader_and_gold_formats():
    task = get_task("choice")
    assert task.grade("ANSWER: B", ex(answer="B")) == 1.0
    assert task.grade("ANSWER: B", ex(answer="(b)")) == 1.0
    assert task.grade("ANSWER: B", ex(answer="B) Aspirin")) == 1.0
    assert task.grade("ANSWER: C", ex(answer="B")) == 0.0
    assert task.grade("ANSWER: E", ex(answer="A")) == 0.0   # E is not an option of a 4-choice task
    assert get_task("choice", num_choices=5).grade("ANSWER: E", ex(answer="E")) == 1.0
    with pytest.raises(ValueError, match="not one of the letters"):
        task.grade("ANSWER: A", ex(answer="3"))
    assert "A, B, C, D" in get_task("choice", instruction="default").instruction


# ----------------------------------------------------------------------------------------------
# safety labels

@pytest.mark.parametrize("response, label", [
    ("ANSWER: not hate", "not hate"),
    ("ANSWER: hate", "hate"),
    ("This tweet is hateful? Label: not hate", "not hate"),
    ("It is not hate.", "not hate"),             # the longer label hides "hate" inside it
    ("hate", "hate"),
    ("This could look like hate, but overall: not hate", "not hate"),  # the last mention wins
    ("I cannot tell.", None),
])
def test_label_extraction(response, label):
    assert extract_label(response, ["hate", "not hate"]) == label


def test_safety_grader():
    task = get_task("safety")
    assert task.grade("ANSWER: unsafe", ex(answer="unsafe")) == 1.0
    assert task.grade("ANSWER: safe", ex(answer="unsafe")) == 0.0
    assert task.grade("This is UNSAFE.", ex(answer="Unsafe")) == 1.0
    assert task.grade("The request is safe to answer", ex(answer="safe")) == 1.0
    hate = get_task("safety", labels=["hate", "non-hate"], aliases={"offensive": "hate"})
    assert hate.grade("ANSWER: non-hate", ex(answer="non-hate")) == 1.0
    assert hate.grade("ANSWER: non-hate", ex(answer="hate")) == 0.0
    assert hate.grade("Label: offensive", ex(answer="hate")) == 1.0
    with pytest.raises(ValueError, match="not one of the labels"):
        task.grade("ANSWER: safe", ex(answer="maybe"))
    with pytest.raises(ConfigError, match="at least two distinct"):
        get_task("safety", labels=["hate"])
    assert "safe, unsafe" in get_task("safety", instruction="default").instruction


# ----------------------------------------------------------------------------------------------
# rule following

def test_starts_with():
    task = get_task("starts_with", prefix="Ahoy")
    assert task.grade("Ahoy, matey!", ex()) == 1.0
    assert task.grade("  \n**Ahoy** there", ex()) == 1.0      # markdown and whitespace
    assert task.grade('"Ahoy!" said he', ex()) == 1.0
    assert task.grade("ahoy, matey", ex()) == 0.0             # case matters by default
    assert get_task("starts_with", prefix="Ahoy", case_insensitive=True).grade("ahoy", ex()) == 1.0
    assert task.grade("Well, Ahoy", ex()) == 0.0
    assert task.grade("", ex()) == 0.0
    per_example = get_task("starts_with")
    assert per_example.grade("Dear Sir, ...", ex(answer="Dear Sir")) == 1.0
    assert per_example.grade("Hi", ex(answer="Dear Sir")) == 0.0


@pytest.mark.parametrize("text, language", [
    ("Je pense que c'est une bonne idée, et nous allons le faire.", "french"),
    ("Le chat est sur la table.", "french"),
    ("I think that this is a good idea and we will do it.", "english"),
    ("The cat is on the table.", "english"),
    ("Creo que es una buena idea y lo vamos a hacer.", "spanish"),
    ("Ich denke, dass das eine gute Idee ist.", "german"),
    ("Penso che sia una buona idea e lo faremo.", "italian"),
    ("Eu acho que é uma boa ideia e vamos fazer isso.", "portuguese"),
    ("Ik denk dat het een goed idee is en we gaan het doen.", "dutch"),
    ("Привет, как у тебя дела сегодня?", "russian"),
    ("これは日本語の文章です", "japanese"),
    ("这是一个中文句子", "chinese"),
    ("Bonjour !", None),            # too short to decide
    ("42 + 17 = 59", None),
])
def test_language_detector(text, language):
    assert detect_language(text) == language


def test_language_task():
    task = get_task("language", language="French")
    assert task.grade("Bien sûr ! Je vais vous expliquer comment cela fonctionne.", ex()) == 1.0
    assert task.grade("Sure! I will explain how this works for you.", ex()) == 0.0
    assert get_task("language", language="de").grade("Das ist eine sehr gute Frage.", ex()) == 1.0
    with pytest.raises(ConfigError, match="unknown language 'klingon'; known: english"):
        get_task("language", language="klingon")


# ----------------------------------------------------------------------------------------------
# registry, prompts, templates

def test_get_task_errors_are_one_line():
    with pytest.raises(ConfigError) as e:
        get_task("maths")
    msg = str(e.value)
    assert "\n" not in msg and "known tasks: starts_with, language, math, choice, safety" in msg
    with pytest.raises(ConfigError, match="task 'math' takes no argument 'prefix'; its arguments: .*rel_tol"):
        get_task("math", prefix="x")
    with pytest.raises(ConfigError, match="no default instruction"):
        get_task("starts_with", prefix="A", instruction="default")


def test_format_prompt_and_templates():
    assert get_task("math").format_prompt(ex("1+1?")) == "1+1?"          # instructions are off by default
    math = get_task("math", instruction="default")
    assert math.format_prompt(ex("1+1?")).startswith("1+1?\n\n") and "\\boxed{" in math.format_prompt(ex("1+1?"))
    assert get_task("exact", instruction="Be brief.").format_prompt(ex("q")) == "q\n\nBe brief."
    # One pass, only the given names: LaTeX braces and a value holding a placeholder survive.
    assert fill("{problem} | {response} | \\frac{1}{2}", problem="x {response}", response="y") == \
        "x {response} | y | \\frac{1}{2}"
    reflect = load_prompt("experience_reflect", required=["problem", "response", "grade", "experience"])
    assert "- EXPERIENCE ITEM:" in reflect
    from megatron_opcd.errors import DataError
    with pytest.raises(DataError, match="not found .*experience_reflect"):
        load_prompt("no_such_prompt")
    with pytest.raises(DataError, match="lacks the placeholder"):
        load_prompt("experience_solve", required=["experience"])


# ----------------------------------------------------------------------------------------------
# evaluate_task on a tiny random model

@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from _evaluation_ranks import train_sp_tokenizer

    return train_sp_tokenizer(tmp_path_factory.mktemp("tok"))


def _check_single(res):
    n = len(res["ref_plain"])
    for key, ref in (("plain", res["ref_plain"]), ("ctx", res["ref_ctx"])):
        out = res[key]
        # Batched (4 rows), shared-prefix generation gives what one prompt at a time gives.
        assert [s["response"] for s in out["samples"]] == ref
        assert [s["index"] for s in out["samples"]] == list(range(n))
        assert [s["score"] for s in out["samples"]] == [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
        assert out["accuracy"] == pytest.approx(0.5) and out["n"] == n and out["skipped"] == 0
    assert res["ctx"]["with_context"] and not res["plain"]["with_context"]
    # The context reached the model: the responses with it differ from those without.
    assert res["ref_ctx"] != res["ref_plain"]
    mixed = [s["response"] for s in res["ctx_list"]["samples"]]
    assert mixed[:3] == res["ref_ctx"][:3] and mixed[3:] == res["ref_plain"][3:]
    assert res["sampled_a"]["samples"] == res["sampled_b"]["samples"]   # seeded sampling is reproducible


def test_evaluate_task_single_and_data_parallel(run_ranks, tok_path):
    from _evaluation_ranks import evaluate_suite

    (one,) = run_ranks(evaluate_suite, 1, tok_path, timeout=240)
    _check_single(one)
    two = run_ranks(evaluate_suite, 2, tok_path, timeout=240)
    for r in two:
        assert r["dp_size"] == 2
        for key in ("plain", "ctx", "ctx_list"):
            # Every rank returns the whole result: counts all-reduced, samples gathered in order.
            assert r[key]["accuracy"] == one[key]["accuracy"] and r[key]["n"] == one[key]["n"]
            assert r[key]["samples"] == one[key]["samples"]
    assert two[0]["sampled_a"] == two[1]["sampled_a"]


def test_dp_share_splits_in_rank_order_and_covers_every_item_once():
    """The one DP slicer (evaluation, game evaluation, the trainer's batches): contiguous ceil(n/dp)
    shares, the last replicas with fewer or none (10 prompts at DP = 8: 2,2,2,2,2,0,0,0)."""
    from megatron_opcd.parallel import dp_share

    for n, dp in [(10, 8), (8, 2), (7, 3), (0, 4), (5, 1), (3, 5)]:
        shares = [list(range(n))[dp_share(n, r, dp)] for r in range(dp)]
        assert sum(shares, []) == list(range(n)), (n, dp)
        per = -(-n // dp)
        assert [len(s) for s in shares] == [min(per, max(0, n - r * per)) for r in range(dp)], (n, dp)
    assert [len(range(10)[dp_share(10, r, 8)]) for r in range(8)] == [2, 2, 2, 2, 2, 0, 0, 0]
