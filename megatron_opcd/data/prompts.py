"""Prompts (JSONL) and contexts (system prompts, experience pools), read loudly.

Every error names the file (and line) and what to fix: a malformed JSON line, a missing "prompt",
non-UTF-8 text, an empty file. Every prompt and context is checked when it is loaded
(`check_text`): not empty once invisible characters are removed (zero-width spaces, BOMs, control
and format characters...), valid Unicode (no lone surrogates from JSON `\\ud800` escapes). Files
are read line by line, a line at most MAX_LINE_BYTES long (a longer one is an error naming the
line, read without holding it in memory); whole-file formats (a context file, a JSON-list pool)
at most MAX_FILE_BYTES. Token limits are checked with the tokenizer by the trainer
(`Example.where` names the line).
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_opcd.errors import ConfigError, DataError


MAX_LINE_BYTES = 16 * 2**20
"""Longest line of a prompt file or line-per-context pool (a prompt of 16 MiB is far past any model)."""
MAX_FILE_BYTES = 64 * 2**20
"""Largest context file or JSON-list pool (read whole)."""

# Characters that print as nothing but are not in the Unicode categories below (Hangul fillers,
# the braille blank, the combining grapheme joiner).
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: Optional[str] = None
    context: Optional[str] = None
    index: int = 0
    where: str = ""
    """`file:line` it was read from (named by later errors, e.g. a prompt over the token limit)."""


def check_text(text: str, where: str, what: str) -> str:
    """`text` unchanged if it is valid Unicode and shows something; else a one-line DataError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: {what} is not valid Unicode (a lone surrogate U+{ord(text[exc.start]):04X} at "
                        f"character {exc.start}, e.g. from a JSON \\u escape); fix the text") from None
    visible = unicodedata.normalize("NFKC", text)
    if not any(ch not in _BLANK_GLYPHS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in visible):
        shown = "".join(f"\\u{ord(c):04x}" if not c.isprintable() or c in _BLANK_GLYPHS else c for c in text[:12])
        raise DataError(f"{where}: {what} is empty once invisible characters are removed ({shown!r}); "
                        "remove the line or give it text")
    return text


def _open(path: str | Path, what: str):
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} file {path} is a directory; give a file")
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    return open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte {exc.start} of the line); re-encode the file as UTF-8") from None


def text_lines(path: str | Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, one line in memory at a time; a line longer than
    MAX_LINE_BYTES is an error (it is skipped over in chunks, never held whole)."""
    with _open(path, what) as fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{path}:{lineno}: the line is longer than {MAX_LINE_BYTES // 2**20} MiB; a {what} "
                                "line must be one prompt or context, far shorter")
            yield lineno, _decode(raw, f"{path}:{lineno}").rstrip("\r\n")


def _read_text(path: str | Path, what: str) -> str:
    with _open(path, what) as fh:
        raw = fh.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise DataError(f"{path}: the {what} file is larger than {MAX_FILE_BYTES // 2**20} MiB; use one context per "
                        "line (a pool file) or a shorter context")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None


def jsonl_objects(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for every non-blank line of a JSONL file. A missing file, bytes that
    are not UTF-8, an over-long or malformed line or a line that is not an object end in a
    one-line DataError."""
    for lineno, line in text_lines(path, what):
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
        check_text(prompt, where, "the \"prompt\"")
        context = row.get("context")
        if context is not None and not isinstance(context, str):
            raise DataError(f"{where}: \"context\" must be a string")
        if context is not None:
            check_text(context, where, "the \"context\"")
        answer = row.get("answer")
        examples.append(Example(prompt=prompt, answer=None if answer is None else str(answer),
                                context=context, index=len(examples), where=where))
    if not examples:
        raise DataError(f"{path}: no prompts (the file is empty); add lines like {{\"prompt\": \"...\"}}")
    return examples


def load_pool(path: str | Path) -> list[str]:
    """An experience pool: a JSON list of strings, or one context per non-empty line."""
    with _open(path, "context pool") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):
        text = _read_text(path, "context pool")
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON list ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
            raise DataError(f"{path}: the JSON list must hold non-empty strings")
        return [check_text(item, f"{path}: item {i}", "the context") for i, item in enumerate(items)]
    items = [check_text(line, f"{path}:{n}", "the context") for n, line in text_lines(path, "context pool")
             if line.strip()]
    if not items:
        raise DataError(f"{path}: the context pool is empty")
    return items


def load_contexts(context_cfg) -> list[str]:
    """The contexts of a `ContextConfig` (empty list: no shared context)."""
    if context_cfg.text:
        return [check_text(context_cfg.text, "context.text", "the context")]
    if context_cfg.file:
        text = _read_text(context_cfg.file, "context").strip()
        if not text:
            raise DataError(f"{context_cfg.file}: the context file is empty")
        return [check_text(text, str(context_cfg.file), "the context")]
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
