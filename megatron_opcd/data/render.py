"""Teacher and student inputs: the same prompt, with and without the context.

    student: chat([user: prompt])                            or  prompt
    teacher: chat([system: context, user: prompt])           (placement=system)
             chat([user: context + separator + prompt])      (placement=user_prefix)
             context + separator + prompt                     (no chat template)

Both end with the generation prompt of the chat template, so the response tokens that follow are
the same tokens in both, and `data.packing.pack` aligns their positions exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from megatron_opcd.errors import DataError


@dataclass
class RenderedPair:
    student: list[int]
    teacher: list[int]
    truncated_context: bool = False


class PromptRenderer:
    def __init__(self, tokenizer, *, use_chat_template: bool, placement: str = "system", separator: str = "\n\n",
                 max_prompt_tokens: int = 1024, max_context_tokens: int = 4096, max_total_tokens: int = 4096,
                 max_new_tokens: int = 0, too_long: str = "truncate_context"):
        self.tok = tokenizer
        self.chat = use_chat_template and bool(getattr(tokenizer, "has_chat_template", False))
        self.placement = placement
        self.separator = separator
        self.max_prompt_tokens = max_prompt_tokens
        self.max_context_tokens = max_context_tokens
        self.max_total = max_total_tokens
        self.max_new = max_new_tokens
        self.too_long = too_long

    def _ids(self, messages: list[dict], plain: str) -> list[int]:
        if self.chat:
            return list(self.tok.apply_chat_template(messages))
        return list(self.tok.encode(plain))

    def student(self, prompt: str) -> list[int]:
        ids = self._ids([{"role": "user", "content": prompt}], prompt)
        if len(ids) > self.max_prompt_tokens:
            raise DataError(
                f"prompt of {len(ids)} tokens exceeds data.max_prompt_tokens={self.max_prompt_tokens}: "
                f"'{prompt[:60]}...'; raise the limit or shorten the prompt"
            )
        return ids

    def teacher(self, prompt: str, context: Optional[str]) -> list[int]:
        if context is None:
            return self.student(prompt)
        if self.placement == "system":
            messages = [{"role": "system", "content": context}, {"role": "user", "content": prompt}]
        else:
            messages = [{"role": "user", "content": context + self.separator + prompt}]
        return self._ids(messages, context + self.separator + prompt)

    PROBES = ("0", "1")
    """Two prompts that differ in their first character (see `context_prefix`)."""

    def context_prefix(self, context: Optional[str]) -> list[int]:
        """The rendered context: the teacher input's tokens up to the end of the context (the
        chat template's opening, the context, the template between it and the prompt), the same
        for every prompt rendered with this context. Known before any batch: it is the common
        prefix of two renderings whose prompts differ in their first character. A caller reusing
        it checks each row starts with it (a tokenizer may merge across the boundary)."""
        if context is None:
            return []
        return common_prefix([self.teacher(p, context) for p in self.PROBES])

    def pair(self, prompt: str, context: Optional[str]) -> Optional[RenderedPair]:
        """Both inputs, within the length budget; None when the example must be skipped."""
        student = self.student(prompt)
        teacher = self.teacher(prompt, context)
        budget = self.max_total - self.max_new
        context_len = len(teacher) - len(student)
        if len(teacher) <= budget and context_len <= self.max_context_tokens:
            return RenderedPair(student, teacher)
        over_positions = len(teacher) > budget
        what = (f"context + prompt = {len(teacher)} tokens (+ {self.max_new} new) exceeds the model's "
                f"{self.max_total} positions" if over_positions else
                f"context of ~{context_len} tokens exceeds data.max_context_tokens={self.max_context_tokens}")
        if self.too_long == "error":
            # The knob that makes room: fewer new tokens or more positions for the first case,
            # the context limit itself for the second (raising max_new_tokens would only make it worse).
            knob = ("lower generation.max_new_tokens (or raise model.max_position_embeddings if the model allows)"
                    if over_positions else "raise data.max_context_tokens")
            raise DataError(f"{what}; shorten the context, {knob}, or set data.too_long=truncate_context|skip")
        if self.too_long == "skip":
            warnings.warn(f"skipping an example: {what}", stacklevel=2)
            return None
        # truncate_context: shorten the context text until it fits (from the end, keeping its start).
        ctx = context or ""
        lo, hi = 0, len(ctx)
        while lo < hi:  # the longest prefix of the context text that fits
            mid = (lo + hi + 1) // 2
            t = self.teacher(prompt, ctx[:mid])
            if len(t) <= budget and len(t) - len(student) <= self.max_context_tokens:
                lo = mid
            else:
                hi = mid - 1
        teacher = self.teacher(prompt, ctx[:lo])
        if len(teacher) > budget:
            raise DataError(f"{what}, and the prompt alone does not fit; shorten the prompt or raise the limits")
        warnings.warn(f"truncated a context to {lo} of {len(ctx)} characters: {what}", stacklevel=2)
        return RenderedPair(student, teacher, truncated_context=True)


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest token prefix shared by all rows (the teacher's shared context, reused from
    one KV-cache prefill). Leaves at least one token in every row."""
    if not rows:
        return []
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    k = 0
    while k < n and all(r[k] == first[k] for r in rows):
        k += 1
    return list(first[:k])


def shared_prefix(prefix: list[int], rows: list[list[int]]) -> list[int]:
    """The longest start of `prefix` that every row begins with, leaving at least one token in
    every row (a known prefix, e.g. the rendered context, checked against the actual rows)."""
    n = min([len(prefix)] + [len(r) - 1 for r in rows])
    k = 0
    while k < n and all(r[k] == prefix[k] for r in rows):
        k += 1
    return list(prefix[:k])
