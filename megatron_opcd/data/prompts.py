"""Prompts (JSONL) and contexts (system prompts, experience pools), read loudly.

Every error names the file (and line) and what to fix: a malformed JSON line, a missing "prompt",
non-UTF-8 text, an empty file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_opcd.config import ConfigError


class DataError(ValueError):
    """Input data that cannot be used. One line: the file, the line, the problem, the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: Optional[str] = None
    context: Optional[str] = None
    index: int = 0


def _read_text(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None


def jsonl_objects(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for every non-blank line of a JSONL file. A missing file, bytes that
    are not UTF-8, a malformed line or a line that is not an object end in a one-line DataError."""
    text = _read_text(path, what)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(row).__name__}")
        yield where, row


def load_examples(path: str | Path) -> list[Example]:
    """`{"prompt": str, "answer"?: str|number, "context"?: str}` per line; blank lines are skipped."""
    examples = []
    for where, row in jsonl_objects(path, "prompt"):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: missing or empty \"prompt\" string")
        context = row.get("context")
        if context is not None and not isinstance(context, str):
            raise DataError(f"{where}: \"context\" must be a string")
        answer = row.get("answer")
        examples.append(Example(prompt=prompt, answer=None if answer is None else str(answer),
                                context=context, index=len(examples)))
    if not examples:
        raise DataError(f"{path}: no prompts (the file is empty); add lines like {{\"prompt\": \"...\"}}")
    return examples


def load_pool(path: str | Path) -> list[str]:
    """An experience pool: a JSON list of strings, or one context per non-empty line."""
    text = _read_text(path, "context pool").strip()
    if not text:
        raise DataError(f"{path}: the context pool is empty")
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON list ({exc.msg} at line {exc.lineno})") from None
        if not all(isinstance(i, str) and i.strip() for i in items) or not items:
            raise DataError(f"{path}: the JSON list must hold non-empty strings")
        return items
    return [line for line in text.splitlines() if line.strip()]


def load_contexts(context_cfg) -> list[str]:
    """The contexts of a `ContextConfig` (empty list: no shared context)."""
    if context_cfg.text:
        return [context_cfg.text]
    if context_cfg.file:
        text = _read_text(context_cfg.file, "context").strip()
        if not text:
            raise DataError(f"{context_cfg.file}: the context file is empty")
        return [text]
    if context_cfg.pool:
        return load_pool(context_cfg.pool)
    return []


class ContextSampler:
    """Chooses the teacher's context for each example of a batch, reproducibly."""

    def __init__(self, contexts: Sequence[str], selection: str, seed: int):
        self.contexts = list(contexts)
        self.selection = selection
        self.seed = seed
        if selection == "random" and not self.contexts:
            raise ConfigError("context.selection=random needs context.pool (or text/file) with at least one context")

    def for_batch(self, examples: Sequence[Example], step: int) -> list[Optional[str]]:
        if self.selection == "per_example":
            fallback = self.contexts[0] if self.contexts else None
            out = [e.context if e.context is not None else fallback for e in examples]
        elif self.selection == "random":
            rng = random.Random(self.seed * 1_000_003 + step)
            chosen = self.contexts[rng.randrange(len(self.contexts))]
            out = [chosen] * len(examples)
        else:
            out = [self.contexts[0] if self.contexts else None] * len(examples)
        if any(c is None for c in out):
            missing = next(e for e, c in zip(examples, out) if c is None)
            raise DataError(
                f"example {missing.index} has no context: give context.text/file/pool or a \"context\" field per line"
            )
        return out


class PromptStream:
    """Deterministic order over the examples, epoch by epoch; `position` (consumed examples) is
    what a checkpoint stores, so a resumed run continues with exactly the next example."""

    def __init__(self, examples: Sequence[Example], *, shuffle: bool, seed: int, position: int = 0):
        if not examples:
            raise DataError("no training prompts")
        self.examples = list(examples)
        self.shuffle = shuffle
        self.seed = seed
        self.position = position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed + 7919 * epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            epoch, offset = divmod(self.position, len(self.examples))
            out.append(self.examples[self._order(epoch)[offset]])
            self.position += 1
        return out
