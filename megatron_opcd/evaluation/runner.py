"""Evaluation through the shared generation loop: a task with or without the context (the
`megatron_opcd.evaluate` CLI, the demo, experience extraction), and the trainer's periodic
evaluation (the held-out KL, the task's accuracy, the samples), on the same rendering, grading
and gathering.

    evaluate_task(model, tokenizer, renderer, examples, task, groups=..., sampling=..., vocab_size=...,
                  contexts=None | "one context" | [context per example])
        -> {"accuracy", "n", "skipped", "with_context", "samples": [{"index", "prompt", "response", "score"}]}
    evaluate_heldout(student=..., teacher=..., tokenizer=..., renderer=..., examples=..., contexts=..., task=...,
                     step=..., groups=..., sampling=..., vocab_size=..., temperature=..., prefixes=...)
        -> ({"kl"(, "accuracy")}, samples)      the trainer's, through training.sources.PromptSource

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



def grade(task, texts: Sequence[str], examples: Sequence[Example], prompts: Sequence[str]) -> list[dict]:
    """One sample per response: {"index", "prompt", "response", "score"} with the task's grade in [0, 1]."""
    samples = []
    for text, e, prompt in zip(texts, examples, prompts):
        score = float(task.grade(text, e))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"task {task!r} returned the grade {score}, outside [0, 1]")
        samples.append({"index": e.index, "prompt": prompt, "response": text, "score": score})
    return samples


def gather(samples: list[dict], counts: list[float], groups) -> tuple[list[dict], list[float]]:
    """`counts` summed and `samples` concatenated over data-parallel replicas (replica order =
    example order, as each replica holds a contiguous share): every rank gets the same."""
    totals = torch.tensor(counts, dtype=torch.float64)
    if groups.dp_size > 1:
        if counts:
            dist.all_reduce(totals, group=groups.dp_group)
        parts: list = [None] * groups.dp_size
        dist.all_gather_object(parts, samples, group=groups.dp_group)
        samples = [s for part in parts for s in part]
    return samples, totals.tolist()


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
    samples = grade(task, texts, [mine[i] for i in kept], [prompts[i] for i in kept])
    samples, (total, n, skipped) = gather(
        samples, [sum(s["score"] for s in samples), float(len(samples)), float(len(rows) - len(kept))], groups)
    return {
        "accuracy": total / n if n else float("nan"),
        "n": int(n),
        "skipped": int(skipped),
        "with_context": any(c is not None for c in ctx_all),
        "samples": samples,
    }


# ----------------------------------------------------------------------------------------------
# the trainer's evaluation: the same rendering, grading and gathering, plus the held-out KL


@torch.no_grad()
def heldout_kl(student, teacher, tokenizer, renderer, examples: Sequence[Example], contexts: list[Optional[str]], *,
               groups, sampling, vocab_size: int, temperature: float, prefixes,
               teacher_scorer=None) -> tuple[float, list[list[int]]]:
    """The student answers `examples` (this DP rank's share) without the context; the teacher
    scores the same responses with `contexts` (its shared prefix from `prefixes`, a
    `generation.prefix.TeacherPrefix` of the teacher); the exact per-token KL(student || teacher)
    over the whole vocabulary, averaged over the response tokens of the world. Returns (that KL,
    this rank's responses). A DP replica without examples adds zeros but still joins the
    all-reduce (returning early hung the others)."""
    kl, _, responses = _heldout(student, teacher, tokenizer, renderer, examples, contexts, groups=groups,
                                sampling=sampling, vocab_size=vocab_size, temperature=temperature, prefixes=prefixes,
                                teacher_scorer=teacher_scorer)
    return kl, responses


def _heldout(student, teacher, tokenizer, renderer, examples, contexts, *, topk_spec=None, diagnostics=None,
             **kw) -> tuple[float, dict, list[list[int]]]:
    """(exact KL, the top-k diagnostics `{name: mean}` of `topk_spec`'s loss when `diagnostics` is
    given (else {}), this rank's responses), reduced over the world as `heldout_kl` says.
    `teacher_scorer` in `kw` (a teacher on its own layout, training/teacher_route.py) scores the
    teacher rows instead of `teacher`: (teacher prompts, contexts, responses) -> this rank's
    `[R, b, V/tp]`, called on every rank, by a replica without examples too."""
    from megatron_opcd.losses.diagnostics import NAMES

    names = NAMES if diagnostics is not None else ()
    # [KL sum, response tokens] then [sum, count] per diagnostic: host floats, gloo reduces them.
    buf = torch.zeros(1 + len(names), 2, dtype=torch.float64)
    responses: list[list[int]] = []
    if examples:
        responses = _kl_sums(student, teacher, tokenizer, renderer, examples, contexts, buf, topk_spec=topk_spec,
                             diagnostics=diagnostics, **kw)
    elif kw.get("teacher_scorer") is not None:
        kw["teacher_scorer"]([], [], [])  # its collectives span the world: join them with no rows
    dist.all_reduce(buf)
    means = [float(s / c) if c > 0 else float("nan") for s, c in buf.tolist()]
    return means[0], {n.replace(" ", "_"): v for n, v in zip(names, means[1:])}, responses


def _kl_sums(student, teacher, tokenizer, renderer, examples, contexts, buf: torch.Tensor, *, groups, sampling,
             vocab_size: int, temperature: float, prefixes, topk_spec=None, diagnostics=None,
             teacher_scorer=None) -> list[list[int]]:
    from megatron_opcd.generation import generate, score
    from megatron_opcd.losses import DivergenceSpec, TopkStats, topk_diagnostics, vocab_parallel_divergence

    pairs = [renderer.pair(e.prompt, c) for e, c in zip(examples, contexts)]
    student_prompts = [p.student for p in pairs]
    out = generate(student, student_prompts, sampling, groups=groups, vocab_size=vocab_size, decode=tokenizer.decode)
    responses = [list(r) if r else [tokenizer.eos_ids[0]] for r in out.responses]
    if teacher_scorer is not None:
        t = teacher_scorer([p.teacher for p in pairs], list(contexts), responses)
    else:
        cache, rows = prefixes.split(teacher, [p.teacher for p in pairs], contexts)
        t = score(teacher, rows, responses, groups=groups, prefix=cache, vocab_size=vocab_size,
                  pad_id=tokenizer.pad_id).logits
    s = score(student, student_prompts, responses, groups=groups, vocab_size=vocab_size, pad_id=tokenizer.pad_id)
    if groups.is_last_stage:
        spec = DivergenceSpec(kind="reverse_kl", topk=None, temperature=temperature, vocab_size=vocab_size)
        kl = vocab_parallel_divergence(s.logits, t, spec, groups.tp_group)
        diag = {}
        if diagnostics is not None:  # the training loss's top-k, on the same logits (every TP rank)
            stats = TopkStats()
            d = vocab_parallel_divergence(s.logits, t, topk_spec, groups.tp_group, stats=stats)
            diag = topk_diagnostics(s.logits, t, d, stats, s.mask.bool(), topk_spec, diagnostics,
                                    groups.tp_group)
        if groups.tp_rank == 0:
            buf[0, 0] = float((kl.double() * s.mask.double()).sum())
            buf[0, 1] = float(s.mask.double().sum())
            for i, pair in enumerate(diag.values()):
                buf[1 + i] = pair.cpu()
    return responses


def evaluate_heldout(*, student, teacher, tokenizer, renderer, examples: Sequence[Example], contexts, task=None,
                     step: int, **kl_kwargs) -> tuple[dict, list[dict]]:
    """(metrics, samples) of the trainer's periodic evaluation on `examples` (this DP rank's share
    of the held-out prompts): {"kl"} from `heldout_kl`; with `topk_spec` (the training loss) and
    `diagnostics` (a `losses.DiagnosticsSpec`) in `kl_kwargs`, that loss's top-k diagnostics
    (topk_teacher_mass, ...) on the same responses; and with a `task` {"accuracy"} of the
    student's responses without the context; the samples {"step", "index", "prompt", "response"
    (, "score")} of every replica, in example order. The model modes are the caller's."""
    kl, diag, responses = _heldout(student, teacher, tokenizer, renderer, examples, contexts, **kl_kwargs)
    texts = [tokenizer.decode(r) for r in responses]
    metrics = {"kl": kl}
    if task is not None:
        graded = grade(task, texts, examples, [e.prompt for e in examples])
        samples = [{"step": step, **s} for s in graded]
        samples, (total, n) = gather(samples, [sum(s["score"] for s in graded), float(len(graded))],
                                     kl_kwargs["groups"])
        metrics["accuracy"] = float(total / max(n, 1))
    else:
        samples = [{"step": step, "index": e.index, "prompt": e.prompt, "response": t} for e, t in zip(examples, texts)]
        samples, _ = gather(samples, [], kl_kwargs["groups"])
    metrics.update(diag)  # after kl and accuracy: the console's eval line keeps its order
    return metrics, samples
