"""Evaluate a task with or without the context, through the shared generation loop.

    evaluate_task(model, tokenizer, renderer, examples, task, groups=..., sampling=..., vocab_size=...,
                  contexts=None | "one context" | [context per example])
        -> {"accuracy", "n", "skipped", "with_context", "samples": [{"index", "prompt", "response", "score"}]}

Phases: render (student rendering without a context, the teacher's with one) -> generate in
batches (the token prefix shared by every row, e.g. one system prompt, is prefilled once and its
KV cache reused by every batch) -> decode -> grade -> reduce over data-parallel replicas.

Call on every rank with the same arguments. Data parallelism: each DP replica takes a contiguous
share of the examples and the counts and samples are gathered over `groups.dp_group`, so every
rank returns the same dict. Within a replica every TP/PP rank runs `generate`, which returns the
same tokens on all of them.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_opcd.data.prompts import Example
from megatron_opcd.data.render import common_prefix
from megatron_opcd.parallel import dp_share

Contexts = Union[None, str, Sequence[Optional[str]]]


def _per_example(contexts: Contexts, n: int) -> list[Optional[str]]:
    if contexts is None or isinstance(contexts, str):
        return [contexts] * n
    contexts = list(contexts)
    if len(contexts) != n:
        raise ValueError(f"contexts has {len(contexts)} entries for {n} examples; give one per example, or one string")
    return contexts


def render(renderer, prompts: Sequence[str], contexts: Sequence[Optional[str]]) -> list[Optional[list[int]]]:
    """Token ids per prompt: `renderer.student(prompt)` without a context, the teacher's rendering
    (context placed as configured, cut or skipped when too long) with one; None = skipped."""
    out: list[Optional[list[int]]] = []
    for prompt, ctx in zip(prompts, contexts):
        if ctx is None:
            out.append(renderer.student(prompt))
        else:
            pair = renderer.pair(prompt, ctx)
            out.append(None if pair is None else pair.teacher)
    return out


def _strip_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(int(t))
    return out


def generate_texts(model, tokenizer, rows: list[list[int]], *, groups, sampling, vocab_size: int,
                   batch_size: int = 16, seed_offset: int = 0) -> list[str]:
    """Generate for token-id rows in batches; decoded responses without the EOS token.

    The longest prefix shared by *all* rows is prefilled once (`prefill_prefix`) and reused by
    every batch. Batch k samples with seed `sampling.seed + seed_offset + k` (greedy ignores it).
    """
    from megatron_opcd.generation import generate, prefill_prefix

    if not rows:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not sampling.eos_ids:
        sampling = dataclasses.replace(sampling, eos_ids=tuple(tokenizer.eos_ids))
    eos = set(sampling.eos_ids)
    shared = common_prefix(rows) if len(rows) > 1 else []
    cache = prefill_prefix(model, shared, groups=groups) if shared else None
    texts: list[str] = []
    for k, start in enumerate(range(0, len(rows), batch_size)):
        batch = [r[len(shared):] for r in rows[start:start + batch_size]]
        params = dataclasses.replace(sampling, seed=(sampling.seed + seed_offset + k) % (2**63))
        out = generate(model, batch, params, groups=groups, vocab_size=vocab_size, prefix=cache,
                       decode=tokenizer.decode)
        texts.extend(tokenizer.decode(_strip_eos(r, eos)) for r in out.responses)
    return texts


def evaluate_task(model, tokenizer, renderer, examples: Sequence[Example], task, *, groups, sampling,
                  vocab_size: int, contexts: Contexts = None, batch_size: int = 16) -> dict:
    """Accuracy of `model` on `examples` under `task`, without the context (`contexts=None`) or
    with it (one string for all, or one per example). See the module docstring."""
    examples = list(examples)
    ctx_all = _per_example(contexts, len(examples))
    share = dp_share(len(examples), groups.dp_rank, groups.dp_size)
    mine, my_ctx = examples[share], ctx_all[share]
    prompts = [task.format_prompt(e) for e in mine]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cut context is reported as part of `skipped` below
        rows = render(renderer, prompts, my_ctx)
    kept = [i for i, r in enumerate(rows) if r is not None]
    texts = generate_texts(model, tokenizer, [rows[i] for i in kept], groups=groups, sampling=sampling,
                           vocab_size=vocab_size, batch_size=batch_size, seed_offset=1_000_003 * groups.dp_rank)
    samples = []
    for i, text in zip(kept, texts):
        score = float(task.grade(text, mine[i]))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"task {task!r} returned the grade {score}, outside [0, 1]")
        samples.append({"index": mine[i].index, "prompt": prompts[i], "response": text, "score": score})
    counts = torch.tensor([sum(s["score"] for s in samples), float(len(samples)), float(len(rows) - len(kept))],
                          dtype=torch.float64)
    if groups.dp_size > 1:
        dist.all_reduce(counts, group=groups.dp_group)
        gathered: list = [None] * groups.dp_size
        dist.all_gather_object(gathered, samples, group=groups.dp_group)
        samples = [s for part in gathered for s in part]  # replica order = example order
    total, n, skipped = counts.tolist()
    return {
        "accuracy": total / n if n else float("nan"),
        "n": int(n),
        "skipped": int(skipped),
        "with_context": any(c is not None for c in ctx_all),
        "samples": samples,
    }


def evaluate_with_and_without(model, tokenizer, renderer, examples, task, *, context: Contexts, **kwargs) -> dict:
    """{"without": evaluate_task(... no context), "with": evaluate_task(... context)}: the gap
    that context distillation is meant to close."""
    return {
        "without": evaluate_task(model, tokenizer, renderer, examples, task, contexts=None, **kwargs),
        "with": evaluate_task(model, tokenizer, renderer, examples, task, contexts=context, **kwargs),
    }
