"""The teacher's shared prefix: the tokens every row of a batch starts with, prefilled once and reused.

The trainer's teacher rollouts (baselines), its teacher scoring (prompts and games) and the
held-out KL split their teacher rows the one way this class does:

    prefix = prefixes.tokens(rows, contexts)    the rendered context when the rows share one, else
                                                their common prefix (checked against the rows)
    cache  = prefixes.cache(model, prefix)      prefilled once at batch 1, a few contexts kept
    generate/score(model, [r[len(prefix):] for r in rows], ..., prefix=cache)

The rendered context (`PromptRenderer.context_prefix`: the template's tokens up to the end of the
context) is known before any batch, so a fixed context is prefilled once per run for a frozen
teacher whatever the micro-batch size; the rows' common prefix would be a whole prompt at
micro-batch size 1, a new cache entry every time. Rows with different contexts share only their
common prefix. A cache holds the keys and values of the weights it was prefilled with: whoever
changes those weights (`teacher: self`, after each optimizer step) calls `clear()`. One instance
serves one model (the trainer's: the teacher, or the student when it is its own teacher).
"""

from __future__ import annotations

from typing import Optional

from megatron_opcd.data.render import common_prefix, shared_prefix


class TeacherPrefix:
    ENTRIES = 4
    """Caches kept at once (each: the prefix's keys/values on every layer); the oldest goes first."""

    def __init__(self, renderer, *, groups, entries: int = ENTRIES):
        self.renderer = renderer
        self.groups = groups
        self.entries = entries
        self._caches: dict = {}
        self._rendered: dict = {}  # context text -> its rendered tokens (rendering costs a tokenizer call)

    def tokens(self, rows: list[list[int]], contexts: list[Optional[str]]) -> list[int]:
        """The prefix of `rows` that is prefilled once: at least one token of every row is left."""
        if len(set(contexts)) == 1 and contexts[0] is not None:
            ctx = contexts[0]
            if ctx not in self._rendered:
                self._rendered[ctx] = self.renderer.context_prefix(ctx)
            return shared_prefix(self._rendered[ctx], rows)
        return common_prefix(rows)

    def cache(self, model, prefix: list[int]):
        """The KV cache of `prefix` on `model` (None for an empty prefix), prefilled on first use."""
        # Looked up on the package at call time: tests count the prefills by replacing it there.
        from megatron_opcd.generation import prefill_prefix

        if not prefix:
            return None
        key = tuple(prefix)
        cache = self._caches.get(key)
        if cache is None:
            cache = prefill_prefix(model, list(prefix), groups=self.groups)
            while len(self._caches) >= self.entries:
                self._caches.pop(next(iter(self._caches)))  # dicts keep insertion order: oldest first
            self._caches[key] = cache
        return cache

    def split(self, model, rows: list[list[int]], contexts: list[Optional[str]]):
        """(cache of the shared prefix or None, the rows without it): what generate/score take."""
        prefix = self.tokens(rows, contexts)
        return self.cache(model, prefix), [r[len(prefix):] for r in rows]

    def clear(self) -> None:
        self._caches.clear()
