"""Tasks: how a prompt is posed (optional instruction) and how a response is graded.

    task = get_task("math")
    task.format_prompt(example) -> str        the prompt text the model sees (before the context)
    task.grade(response_text, example) -> float in [0, 1]

    starts_with   the response opens with `prefix` (or the example's answer)        rule following
    language      the response is written in `language` (stop-word detector)        rule following
    math          the final answer (\\boxed{} / "ANSWER:") equals example.answer     math
    choice        the chosen letter (A-D, or A-E with num_choices=5) is example.answer   MedMCQA style
    safety        the chosen label (e.g. safe/unsafe) is example.answer             TweetEval / HateCheck / Ethos style
    exact         the stripped response equals example.answer
    synthetic     the toy sort/copy task (its data and model: megatron_opcd.evaluation.synthetic)

Instructions are off by default (the trainer's periodic evaluation grades the raw prompts of the
data): `instruction="default"` appends the task's file from megatron_opcd/prompts/, any other
string appends that string.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

from megatron_opcd.data.prompts import Example
from megatron_opcd.errors import ConfigError
from megatron_opcd.evaluation.answers import (
    choice_letters,
    extract_choice,
    extract_label,
    extract_math_answer,
    gold_choice,
    math_equal,
)
from megatron_opcd.evaluation.language import canonical_language, detect_language
from megatron_opcd.evaluation.templates import fill, load_prompt


class Task:
    """Base class: a name, an optional instruction appended to every prompt, and a grader."""

    name = "task"
    default_instruction_file: Optional[str] = None
    needs_answer = True

    def __init__(self, instruction: Optional[str] = None, instruction_separator: str = "\n\n"):
        if instruction == "default":
            if self.default_instruction_file is None:
                raise ConfigError(f"task {self.name!r} has no default instruction; pass the text itself")
            instruction = fill(load_prompt(self.default_instruction_file), **self._instruction_values())
        self.instruction = instruction or ""
        self.instruction_separator = instruction_separator

    def _instruction_values(self) -> dict:
        return {}

    def format_prompt(self, example: Example) -> str:
        if not self.instruction:
            return example.prompt
        return example.prompt + self.instruction_separator + self.instruction

    def grade(self, response: str, example: Example) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_gold(self, example: Example) -> None:
        """ValueError where the example's answer is not one this task can grade against (checked
        before training starts, not at the first evaluation); nothing to check by default."""

    def _answer(self, example: Example) -> str:
        if example.answer is None:
            raise ValueError(f"task {self.name!r} grades against \"answer\", but example {example.index} has none; "
                             "add an \"answer\" field to every line of the JSONL")
        return example.answer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class StartsWithTask(Task):
    """The response (after leading whitespace, quotes and markdown emphasis) starts with `prefix`;
    without `prefix`, with the example's answer."""

    name = "starts_with"
    needs_answer = False
    STRIP = " \t\r\n\"'`*_#>“”‘’"

    def __init__(self, prefix: Optional[str] = None, case_insensitive: bool = False, **kw):
        super().__init__(**kw)
        if prefix is not None and not prefix.strip():
            raise ConfigError("task starts_with: prefix must be a non-empty string (or omit it to use each answer)")
        self.prefix = prefix
        self.case_insensitive = case_insensitive

    def grade(self, response: str, example: Example) -> float:
        prefix = self.prefix if self.prefix is not None else self._answer(example)
        text = response.lstrip(self.STRIP)
        prefix = prefix.lstrip(self.STRIP)
        if self.case_insensitive:
            text, prefix = text.casefold(), prefix.casefold()
        return float(text.startswith(prefix))


class LanguageTask(Task):
    """The response is written in `language` (see evaluation/language.py for the detector)."""

    name = "language"
    needs_answer = False

    def __init__(self, language: str = "french", min_hits: float = 2.0, **kw):
        super().__init__(**kw)
        try:
            self.language = canonical_language(language)
        except ValueError as exc:
            raise ConfigError(f"task language: {exc}") from None
        self.min_hits = min_hits

    def grade(self, response: str, example: Example) -> float:
        return float(detect_language(response, min_hits=self.min_hits) == self.language)


class MathTask(Task):
    """The final answer (last \\boxed{} or "ANSWER:" line) equals example.answer numerically or
    as normalised LaTeX (evaluation/answers.py)."""

    name = "math"
    default_instruction_file = "math_instruction"

    def __init__(self, fallback_last_number: bool = False, rel_tol: float = 1e-6, **kw):
        super().__init__(**kw)
        self.fallback_last_number = fallback_last_number
        self.rel_tol = rel_tol

    def extract(self, response: str) -> Optional[str]:
        return extract_math_answer(response, fallback_last_number=self.fallback_last_number)

    def grade(self, response: str, example: Example) -> float:
        gold = extract_math_answer(self._answer(example)) or self._answer(example)
        return float(math_equal(self.extract(response), gold, rel_tol=self.rel_tol))


class ChoiceTask(Task):
    """The chosen option letter equals example.answer (a letter; MedMCQA style A-D, or A-E)."""

    name = "choice"
    default_instruction_file = "choice_instruction"

    def __init__(self, num_choices: int = 4, **kw):
        try:
            self.letters = choice_letters(num_choices)
        except ValueError as exc:
            raise ConfigError(f"task choice: {exc}") from None
        super().__init__(**kw)

    def _instruction_values(self) -> dict:
        return {"letters": ", ".join(self.letters)}

    def extract(self, response: str) -> Optional[str]:
        return extract_choice(response, self.letters)

    def check_gold(self, example: Example) -> None:
        gold_choice(self._answer(example), self.letters)

    def grade(self, response: str, example: Example) -> float:
        gold = gold_choice(self._answer(example), self.letters)
        return float(self.extract(response) == gold)


class SafetyTask(Task):
    """The chosen label equals example.answer. `labels`: the classes (default safe/unsafe;
    e.g. ["hate", "not hate"] for TweetEval/HateCheck, ["hate speech", "not hate speech"] for
    Ethos); `aliases` maps other spellings to a label ({"harmful": "unsafe"})."""

    name = "safety"
    default_instruction_file = "safety_instruction"

    def __init__(self, labels: Sequence[str] = ("safe", "unsafe"), aliases: Optional[dict] = None, **kw):
        labels = [str(x).strip() for x in labels]
        if len(labels) < 2 or len({x.lower() for x in labels}) != len(labels) or not all(labels):
            raise ConfigError(f"task safety: labels must be at least two distinct non-empty strings, got {labels}")
        self.labels = labels
        self.aliases = {str(k).strip().lower(): str(v).strip() for k, v in (aliases or {}).items()}
        bad = [v for v in self.aliases.values() if v.lower() not in {x.lower() for x in labels}]
        if bad:
            raise ConfigError(f"task safety: alias target {bad[0]!r} is not one of the labels {labels}")
        super().__init__(**kw)

    def _instruction_values(self) -> dict:
        return {"labels": ", ".join(self.labels)}

    def _canonical(self, text: Optional[str]) -> Optional[str]:
        if text is None:
            return None
        key = text.strip().lower()
        key = self.aliases.get(key, key).lower()
        return next((x for x in self.labels if x.lower() == key), None)

    def extract(self, response: str) -> Optional[str]:
        vocabulary = list(self.labels) + list(self.aliases)
        return self._canonical(extract_label(response, vocabulary))

    def check_gold(self, example: Example) -> None:
        if self._canonical(self._answer(example)) is None:
            raise ValueError(f"safety answer {example.answer!r} of example {example.index} is not one of the "
                             f"labels {self.labels}; set task_args.labels (or aliases)")

    def grade(self, response: str, example: Example) -> float:
        self.check_gold(example)
        return float(self.extract(response) == self._canonical(self._answer(example)))


class ExactMatchTask(Task):
    """The response, stripped of surrounding whitespace, equals example.answer (also stripped)."""

    name = "exact"

    def __init__(self, case_insensitive: bool = False, **kw):
        super().__init__(**kw)
        self.case_insensitive = case_insensitive

    def grade(self, response: str, example: Example) -> float:
        a, b = response.strip(), self._answer(example).strip()
        if self.case_insensitive:
            a, b = a.casefold(), b.casefold()
        return float(a == b)


# ----------------------------------------------------------------------------------------------
# The grader of the synthetic task. Its data and the tiny model that learns it are
# evaluation/synthetic.py, which builds on this module; the grader is here, with the other tasks.

DIGITS = "123456789"
SEPARATOR = "|"
"""A synthetic prompt is 3-5 DIGITS then "=" ("4213="); the teacher's puts the context and
SEPARATOR before it ("R:sort|4213=")."""


def digits_of(prompt: str) -> str:
    """The digit string of a prompt ("R:sort|4213=" or "4213=" -> "4213")."""
    body = prompt.split(SEPARATOR)[-1]
    return "".join(ch for ch in body if ch in DIGITS)


def apply_rule(digits: str, rule: str) -> str:
    if rule == "sort":
        return "".join(sorted(digits))
    if rule == "copy":
        return digits
    raise ValueError(f"unknown synthetic rule {rule!r}; use sort or copy")


class SyntheticTask(Task):
    """Grade: the stripped response equals the rule applied to the prompt's digits
    (sort: what the context asks for; copy: what the model does without it)."""

    name = "synthetic"
    needs_answer = False

    def __init__(self, rule: str = "sort", **kw):
        super().__init__(**kw)
        if rule not in ("sort", "copy"):
            raise ConfigError(f"task synthetic: rule={rule!r} must be sort or copy")
        self.rule = rule

    def grade(self, response: str, example: Example) -> float:
        return float(response.strip() == apply_rule(digits_of(example.prompt), self.rule))


TASKS = {
    "starts_with": StartsWithTask,
    "language": LanguageTask,
    "math": MathTask,
    "choice": ChoiceTask,
    "safety": SafetyTask,
    "exact": ExactMatchTask,
    "synthetic": SyntheticTask,
}


def get_task(name: str, **kwargs) -> Task:
    """The task called `name`, built with `kwargs` (the config's evaluation.task_args)."""
    if name not in TASKS:
        raise ConfigError(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}")
    task_class = TASKS[name]
    params = {}
    for cls in task_class.__mro__:
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(p.name, p)
        if cls is Task:
            break
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"task {name!r} takes no argument {unknown[0]!r}; its arguments: {', '.join(params)}")
    return task_class(**kwargs)
