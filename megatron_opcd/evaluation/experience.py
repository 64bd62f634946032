"""Experience extraction, the paper's procedure for building experiential-knowledge contexts.

    for each seed (its own order of the problems):
        experience = []
        for each problem:
            response = teacher(problem, context = experience)          solve
            grade    = task.grade(response, problem)
            text     = teacher(reflect prompt: problem, response, grade, experience)
            experience += parse_items(text)      "- EXPERIENCE ITEM: ..." lines, capped in tokens
    pool   = [experience of each seed]            -> pool.json (a JSON list: the trainer's context.pool)
    select = argmax over the pool of the accuracy on validation problems with that context

The seeds run in lock-step, so each solve (and each reflect) step is one batched `generate` call
over the seeds. Everything that needs a model goes through a `complete(prompts, contexts, seed=, phase=)`
callable (`ModelCompleter` below wraps the shared generation loop), so the mechanics (parsing,
caps, pool, selection) are tested with a fake one. Prompts are editable files:
megatron_opcd/prompts/experience_solve.txt ({problem}) and experience_reflect.txt ({problem}
{response} {grade} {experience}).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from megatron_opcd.data.prompts import Example
from megatron_opcd.errors import DataError

MARKER = "- EXPERIENCE ITEM:"
NO_EXPERIENCE = "(none yet)"

# "- EXPERIENCE ITEM: x", "* Experience item: x", "1. **EXPERIENCE ITEM:** x", "EXPERIENCE ITEM - x".
_ITEM = re.compile(
    r"^[ \t>]*(?:[-*•+][ \t]*|\d+[.)][ \t]*)?\**[ \t]*EXPERIENCE[ \t]+ITEM[ \t]*\**[ \t]*[:：-][ \t]*\**[ \t]*(.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


def parse_items(text: str) -> list[str]:
    """The experience items written in `text`, in order: the rest of every line that starts with
    "EXPERIENCE ITEM:" (after an optional bullet, number or bold), without empty ones or
    repeats within the text."""
    items: list[str] = []
    seen: set[str] = set()
    for m in _ITEM.finditer(text):
        item = m.group(1).strip().strip("*").strip()
        key = _key(item)
        if item and key not in seen:
            seen.add(key)
            items.append(item)
    return items


def _key(item: str) -> str:
    return " ".join(item.lower().split())


def format_items(items: Sequence[str]) -> str:
    """The context text of a list of items: one "- EXPERIENCE ITEM: ..." line each."""
    return "\n".join(f"{MARKER} {item}" for item in items)


def accumulate(items: Sequence[str], new: Sequence[str], *, max_tokens: Optional[int],
               count_tokens: Callable[[str], int], policy: str = "drop_oldest") -> tuple[list[str], int]:
    """`items` + the `new` items that are not already there (case and spacing ignored), within a
    cap of `max_tokens` tokens for `format_items(result)`.

    policy "drop_oldest": a new item is added and the oldest items are dropped until the text
    fits (an item that does not fit even alone is discarded). policy "stop": once an item does
    not fit, nothing more is added. Returns (items, number of items dropped or refused)."""
    if policy not in ("drop_oldest", "stop"):
        raise ValueError(f"experience cap policy {policy!r} must be drop_oldest or stop")
    out = list(items)
    known = {_key(i) for i in out}
    lost = 0
    for item in new:
        if _key(item) in known:
            continue
        candidate = out + [item]
        if max_tokens is None or count_tokens(format_items(candidate)) <= max_tokens:
            out = candidate
            known.add(_key(item))
            continue
        if policy == "stop":
            lost += 1
            continue
        if count_tokens(format_items([item])) > max_tokens:
            lost += 1
            continue
        while count_tokens(format_items(candidate)) > max_tokens:
            known.discard(_key(candidate.pop(0)))
            lost += 1
        out = candidate
        known.add(_key(item))
    return out, lost


class Completer(Protocol):
    def __call__(self, prompts: list[str], contexts: list[Optional[str]], *, seed: int, phase: str) -> list[str]:
        """One response per prompt; `contexts[i]` (None: none) is placed as the teacher's context;
        `phase` is "solve" or "reflect"."""


@dataclass
class ExperienceStep:
    problem: int
    response: str
    grade: float
    reflection: str
    added: list[str]


@dataclass
class ExperienceRun:
    seed: int
    items: list[str] = field(default_factory=list)
    steps: list[ExperienceStep] = field(default_factory=list)
    dropped: int = 0

    @property
    def context(self) -> str:
        return format_items(self.items)


def extract_pool(complete: Completer, problems: Sequence[Example], task, *, seeds: Sequence[int],
                 count_tokens: Callable[[str], int], max_items_tokens: Optional[int] = 1024,
                 policy: str = "drop_oldest", solve_template: str = "{problem}",
                 reflect_template: str, max_problems: Optional[int] = None,
                 log: Optional[Callable[[str], None]] = None) -> list[ExperienceRun]:
    """One `ExperienceRun` per seed (see the module docstring). Seed s visits the problems in the
    order of `random.Random(s).shuffle`; the generation seed of step t is `1000 * t` plus the
    phase, so runs are reproducible."""
    from megatron_opcd.evaluation.templates import fill

    if not problems:
        raise DataError("no problems to extract experience from")
    if not seeds:
        raise ValueError("extract_pool needs at least one seed")
    runs = [ExperienceRun(seed=int(s)) for s in seeds]
    orders = []
    for s in seeds:
        order = list(range(len(problems)))
        random.Random(int(s)).shuffle(order)
        orders.append(order[:max_problems] if max_problems else order)
    for t in range(len(orders[0])):
        batch = [problems[o[t]] for o in orders]
        prompts = [fill(solve_template, problem=task.format_prompt(e)) for e in batch]
        contexts = [r.context or None for r in runs]
        responses = complete(prompts, contexts, seed=1000 * t, phase="solve")
        grades = [float(task.grade(resp, e)) for resp, e in zip(responses, batch)]
        reflect = [
            fill(reflect_template, problem=task.format_prompt(e), response=resp, grade=_grade_text(g),
                 experience=r.context or NO_EXPERIENCE)
            for e, resp, g, r in zip(batch, responses, grades, runs)
        ]
        texts = complete(reflect, [None] * len(runs), seed=1000 * t + 1, phase="reflect")
        for r, e, resp, g, text in zip(runs, batch, responses, grades, texts):
            before = set(map(_key, r.items))
            r.items, lost = accumulate(r.items, parse_items(text), max_tokens=max_items_tokens,
                                       count_tokens=count_tokens, policy=policy)
            r.dropped += lost
            r.steps.append(ExperienceStep(e.index, resp, g, text, [i for i in r.items if _key(i) not in before]))
        if log is not None:
            log(f"[experience] step {t + 1}/{len(orders[0])}: mean grade {sum(grades) / len(grades):.3f}, "
                f"items per seed {[len(r.items) for r in runs]}")
    return runs


def _grade_text(grade: float) -> str:
    if grade >= 1.0:
        return "correct (1.0)"
    if grade <= 0.0:
        return "incorrect (0.0)"
    return f"partially correct ({grade:.2f})"


def select_best(contexts: Sequence[str], evaluate: Callable[[str], float]) -> tuple[int, list[float]]:
    """(index of the context with the highest `evaluate(context)`, all scores); ties go to the
    earliest context."""
    if not contexts:
        raise ValueError("select_best needs at least one context")
    scores = [float(evaluate(c)) for c in contexts]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best, scores


# ----------------------------------------------------------------------------------------------
# Files


def pool_contexts(runs: Sequence[ExperienceRun]) -> list[str]:
    """The non-empty contexts of the runs, in seed order (a run without items has no context)."""
    return [r.context for r in runs if r.items]


def write_pool(path: str | Path, runs: Sequence[ExperienceRun]) -> tuple[Path, Path]:
    """pool.json: a JSON list of context strings (what `context.pool` of the trainer reads);
    beside it pool.runs.json: per seed the items and the trace (problem, response, grade, added)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pool_contexts(runs), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    runs_path = path.with_name(path.stem + ".runs.json")
    runs_path.write_text(json.dumps([asdict(r) for r in runs], indent=1, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    return path, runs_path


# ----------------------------------------------------------------------------------------------
# The model side


class ModelCompleter:
    """`complete(prompts, contexts, seed=, phase=)` on a megatron model through the shared generation loop
    (`evaluation.runner.generate_texts`): rendering with the context as the teacher's, batches,
    decoding. Call on every rank of the model with the same arguments."""

    def __init__(self, model, tokenizer, renderer, *, groups, sampling, vocab_size: int, batch_size: int = 16,
                 reflect_sampling=None):
        self.model, self.tokenizer, self.renderer = model, tokenizer, renderer
        self.groups, self.sampling, self.vocab_size, self.batch_size = groups, sampling, vocab_size, batch_size
        self.reflect_sampling = reflect_sampling or sampling

    def __call__(self, prompts: list[str], contexts: list[Optional[str]], *, seed: int, phase: str) -> list[str]:
        import dataclasses
        import warnings

        from megatron_opcd.evaluation.runner import generate_texts, render

        params = self.reflect_sampling if phase == "reflect" else self.sampling
        params = dataclasses.replace(params, seed=params.seed + seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an experience longer than the budget is cut, not fatal
            rows = render(self.renderer, prompts, contexts)
        keep = [i for i, r in enumerate(rows) if r is not None]
        texts = generate_texts(self.model, self.tokenizer, [rows[i] for i in keep], groups=self.groups,
                               sampling=params, vocab_size=self.vocab_size, batch_size=self.batch_size)
        out = [""] * len(prompts)
        for i, t in zip(keep, texts):
            out[i] = t
        return out
