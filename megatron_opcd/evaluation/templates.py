"""Prompt templates kept in editable text files (megatron_opcd/prompts/*.txt).

Placeholders are `{name}`; `fill` replaces only the names it is given, so the LaTeX braces of a
math problem or of a template (`\\boxed{ANSWER}`) pass through untouched (str.format would choke).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from megatron_opcd.errors import DataError

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"


def load_prompt(name_or_path: str | Path, *, required: Iterable[str] = ()) -> str:
    """A template: a file path, or the name of a file in megatron_opcd/prompts/ (".txt" optional).
    `required` placeholders must appear in it."""
    path = Path(name_or_path)
    if not path.is_file():
        stem = path.name if path.suffix == ".txt" else f"{path.name}.txt"
        path = PROMPTS_DIR / stem
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.txt")))
        raise DataError(f"prompt template {name_or_path} not found (a file path, or one of: {known})")
    text = path.read_text(encoding="utf-8").rstrip("\n")
    missing = [name for name in required if "{" + name + "}" not in text]
    if missing:
        raise DataError(f"prompt template {path} lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return text


def placeholders(template: str) -> set[str]:
    return set(re.findall(r"\{([a-z_]+)\}", template))


def fill(template: str, **values) -> str:
    """Replace `{name}` by `str(values[name])` for the given names only, in one pass (a value that
    itself holds "{response}" is not substituted again)."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        return str(values[name]) if name in values else m.group(0)

    return re.sub(r"\{([a-z_]+)\}", sub, template)
