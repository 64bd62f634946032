"""Pure string functions that pull a final answer out of a response and compare it with the gold.

    extract_math_answer("... so \\boxed{\\frac{1}{2}}.")   -> "\\frac{1}{2}"
    math_equal("\\frac{1}{2}", "0.5")                       -> True
    extract_choice("The answer is (C).", "ABCD")             -> "C"
    extract_label("ANSWER: not hate", ["hate", "not hate"])  -> "not hate"

No model, no torch: every rule here is tested on concrete strings (tests/test_evaluation.py).
What is left out, said plainly: no symbolic algebra (\\sqrt{8} and 2\\sqrt{2} differ), no units
conversion; `math_equal` compares numbers (exact fractions, decimals to a relative 1e-6, lists
element by element) and otherwise normalised LaTeX strings.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional, Sequence

# ----------------------------------------------------------------------------------------------
# Math: extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*(?:is)?\s*[:：]\s*([^\n]*)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s+([^\n]*)", re.IGNORECASE)


def _balanced(text: str, start: int) -> Optional[tuple[str, int]]:
    """`text[start] == "{"`: (content of the balanced group, index after its closing brace)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None  # unbalanced: the response was cut off inside the box


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete `\\boxed{...}` (or `\\boxed 5`, `\\fbox{...}`); None if none."""
    found = None
    for m in _BOXED.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            group = _balanced(text, j)
            if group is not None:
                found = group[0]
        elif j < len(text):
            token = re.match(r"[^\s$]+", text[j:])
            if token:
                found = token.group(0)
    return found


def _clean_tail(answer: str) -> str:
    answer = answer.strip()
    # "ANSWER: 42." / "ANSWER: $42$" / "ANSWER: **42**": the sentence's own punctuation and markup.
    answer = answer.strip("*").strip()
    # "ANSWER: 42. Because ..." : the answer ends where the next sentence starts.
    answer = re.split(r"\.\s+(?=[A-Z])", answer, maxsplit=1)[0]
    while answer and answer[-1] in ".。":
        answer = answer[:-1].rstrip()
    return answer


def extract_math_answer(text: str, *, fallback_last_number: bool = False) -> Optional[str]:
    """The final answer of a response: the later of the last `\\boxed{}` and the last
    "ANSWER: ..." line ("Final answer: ...", "the answer is ..." too); a boxed answer inside that
    line wins. With `fallback_last_number`, the last number in the text when neither is present."""
    candidates: list[tuple[int, str]] = []
    boxed = last_boxed(text)
    if boxed is not None:
        candidates.append((text.rfind("\\boxed") if "\\boxed" in text else text.rfind("\\fbox"), boxed))
    for pattern in (_ANSWER_LINE, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            m = matches[-1]
            line = m.group(1)
            inner = last_boxed(line)
            value = inner if inner is not None else _clean_tail(line)
            if value:
                candidates.append((m.start(), value))
    if candidates:
        return max(candidates, key=lambda c: c[0])[1].strip()
    if fallback_last_number:
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?", text)
        if numbers:
            return numbers[-1].rstrip(",")
    return None


# ----------------------------------------------------------------------------------------------
# Math: normalisation and equivalence

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_TAIL = re.compile(r"^(-?[\d.,/]+)\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$", re.IGNORECASE)


def normalize_math(answer: str) -> str:
    """A canonical string for an answer: no math delimiters, spacing macros, \\left/\\right,
    degree signs, dollar or percent signs, trailing units in \\text{}; \\dfrac -> \\frac;
    \\frac12 -> \\frac{1}{2}; `x = 5` -> `5`; `1,000` -> `1000`; no whitespace; lower case."""
    s = answer.strip()
    inner = last_boxed(s)
    if inner is not None and s.lstrip().startswith(("\\boxed", "\\fbox")):
        s = inner
    for a, b in (("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("$", "")):
        s = s.replace(a, b)
    s = s.strip()
    unit = _UNIT_TAIL.match(s)
    if unit:
        s = unit.group(1)
    for macro in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle"):
        s = s.replace(macro, "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("°", "").replace("\\%", "").replace("%", "").replace("\\$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = _TEXT_CMD.sub(r"\1", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt2
    m = re.match(r"^\s*[a-zA-Z]\s*=\s*(.+)$", s)  # "x = 5"
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = re.sub(r"\s+", "", s)
    while s.endswith("."):
        s = s[:-1]
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s.lower()


def parse_number(s: str) -> Optional[Fraction]:
    """A normalised answer as an exact number: integers, decimals (`.5`, `1e-3`), `a/b`,
    `\\frac{a}{b}` (signs outside or inside); None if it is not a plain number."""
    s = s.strip()
    sign = 1
    if s.startswith("-") and s[1:].startswith("\\frac"):
        sign, s = -1, s[1:]
    if _NUMBER.match(s):
        return Fraction(s)
    m = re.match(r"^([+-]?\d+)/([+-]?\d+)$", s)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    m = re.match(r"^\\frac\{([^{}]+)\}\{([^{}]+)\}$", s)
    if m:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        if num is not None and den:
            return sign * num / den
    return None


def _split_top_level(s: str) -> list[str]:
    """Split on commas outside (), [], {}."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _scalar_equal(a: str, b: str, rel_tol: float) -> bool:
    if a == b:
        return True
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    if x == y:
        return True
    return abs(float(x) - float(y)) <= rel_tol * max(1.0, abs(float(y)))


def math_equal(prediction: Optional[str], gold: Optional[str], *, rel_tol: float = 1e-6) -> bool:
    """Whether two final answers are the same: numerically (exact fractions; decimals within a
    relative `rel_tol`), element by element for tuples/intervals (ordered) and bare lists
    (any order), else as normalised strings."""
    if prediction is None or gold is None:
        return False
    a, b = normalize_math(prediction), normalize_math(gold)
    if not a or not b:
        return False
    if _scalar_equal(a, b, rel_tol):
        return True
    brackets = "([{"
    if a[0] in brackets and b[0] in brackets and a[0] == b[0] and a[-1] == b[-1] and len(a) > 1 and len(b) > 1:
        xs, ys = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        return len(xs) == len(ys) > 1 and all(_scalar_equal(x, y, rel_tol) for x, y in zip(xs, ys))
    xs, ys = _split_top_level(a), _split_top_level(b)
    if len(xs) == len(ys) > 1:  # "2, -3" vs "-3, 2": a set of solutions
        left = list(ys)
        for x in xs:
            hit = next((k for k, y in enumerate(left) if _scalar_equal(x, y, rel_tol)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Multiple choice


def choice_letters(num_choices: int) -> str:
    if not 2 <= num_choices <= 26:
        raise ValueError(f"num_choices={num_choices} must be in [2, 26]")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_choices]


def extract_choice(text: str, letters: str = "ABCD") -> Optional[str]:
    """The option letter a response chose, or None. In order of trust: "ANSWER: X" (last one),
    `\\boxed{X}`, "the answer is (X)" / "correct option: X", a response that opens with "X)",
    "(X)", "X." or "X:" or is just the letter, then a single distinct "(X)" in the text.
    Lower-case letters count only after an explicit marker."""
    cls = f"[{letters}]"
    cls_any = f"[{letters}{letters.lower()}]"
    found = re.findall(rf"(?i:answer|correct\s+option)\s*[:：]\s*\**\s*\(?({cls_any})\b\)?", text)
    if found:
        return found[-1].upper()
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(rf"\s*(?:\\text\{{)?\(?({cls_any})\)?\}}?\s*", boxed)
        if m:
            return m.group(1).upper()
    found = re.findall(
        rf"(?i:answer|option|choice)\s+(?i:is|would\s+be)\s*:?\s*(?i:option\s+)?\**\(?({cls})\b", text
    )
    if found:
        return found[-1]
    m = re.match(rf"^\s*\**\s*(?:\(({cls})\)|({cls})\s*[).:](?!\w)|({cls})\s*$)", text)
    if m:
        return next(g for g in m.groups() if g)
    paren = set(re.findall(rf"\(({cls})\)", text))
    if len(paren) == 1:
        return paren.pop()
    return None


def gold_choice(answer: Optional[str], letters: str) -> str:
    """The gold letter of an example ("B", "(B)", "b", "B) text"); a ValueError names the problem."""
    if answer is None:
        raise ValueError("a multiple-choice example has no \"answer\"; give the correct letter, e.g. \"B\"")
    m = re.match(rf"^\s*\(?([{letters}{letters.lower()}])(?:\)|\.|:|\s|$)", answer.strip() + " ")
    if not m:
        raise ValueError(f"multiple-choice answer {answer!r} is not one of the letters {', '.join(letters)}")
    return m.group(1).upper()


# ----------------------------------------------------------------------------------------------
# Labels (safety / classification)

_LABEL_MARKER = re.compile(r"(?:answer|label|classification|verdict)\s*[:：]", re.IGNORECASE)


def _label_hits(text: str, labels: Sequence[str]) -> list[tuple[int, str]]:
    """(position, label) of every whole-word label mention; a longer label hides the shorter ones
    it contains ("not hate" is not also a "hate")."""
    hits: list[tuple[int, str]] = []
    taken = [False] * len(text)
    for label in sorted(labels, key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w-]){re.escape(label)}(?![\w-])", re.IGNORECASE)
        for m in pattern.finditer(text):
            if any(taken[m.start() : m.end()]):
                continue
            for k in range(m.start(), m.end()):
                taken[k] = True
            hits.append((m.start(), label))
    return sorted(hits)


def extract_label(text: str, labels: Sequence[str]) -> Optional[str]:
    """The label a response chose: the first label after the last "ANSWER:"/"Label:" marker;
    without a marker, the only label mentioned, else the last one mentioned. None if none."""
    markers = list(_LABEL_MARKER.finditer(text))
    if markers:
        hits = _label_hits(text[markers[-1].end() :], labels)
        if hits:
            return hits[0][1]
    hits = _label_hits(text, labels)
    if not hits:
        return None
    return hits[-1][1]
