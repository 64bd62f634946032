"""What a training step rolls out, behind one small protocol: prompts here, text games in games.py.

The one `Trainer` owns the loop, the data stream (this DP rank's examples and their contexts),
micro-batching, device placement, teacher scoring with the shared prefix, the update, skipping,
checkpoints and signals. A source owns only what differs between prompts and games:

    source.select(examples, contexts)   -> batch      what this DP rank plays this step
    source.rollout(batch, step)         -> Rollout    (a) the student plays without the context
                                                      (opcd); the teacher with it (baselines)
    rollout.student_rows(rows, ...)     -> Packed     the student's view of rows, on the host
    rollout.teacher_rows(rows)          -> TeacherRows the teacher's view of the same rows
    source.metrics(rollout)             -> dict       extra step metrics (reduced over DP)
    source.evaluate(step)               -> (metrics, samples)

A source reads the trainer's models, tokenizer, renderer and sampling parameters (given at
construction); it never runs the loop. The loss covers exactly the tokens the player generated,
aligned between the two views: prompts pack [prompt; response], games every reply of every turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Protocol

from megatron_opcd.data.packing import pack
from megatron_opcd.data.prompts import Example


@dataclass
class TeacherRows:
    """The teacher's view of some rows: what `generation.score` scores, and the untrained start of
    each row that its shared prefix is taken from (`generation.prefix.TeacherPrefix`)."""

    starts: list[list[int]]
    """Prompts: the teacher prompts; games: the first turn of each transcript (up to the first reply)."""
    contexts: list[Optional[str]]
    prompts: Optional[list[list[int]]] = None
    responses: Optional[list[list[int]]] = None
    segments: Optional[list] = None
    """Games: each transcript's (token ids, trained) segments, the context in the first turn."""

    def without_prefix(self, n: int) -> dict:
        """`score`'s row arguments with the first `n` tokens of every row dropped (a cached prefix)."""
        if self.segments is not None:
            from megatron_opcd.generation.episodes import drop_prefix

            return dict(prompts=None, responses=None, segments=[drop_prefix(s, n) for s in self.segments])
        return dict(prompts=[p[n:] for p in self.prompts], responses=self.responses)


class Rollout(Protocol):
    responses: list[list[int]]
    """Per row, every token the player generated (what the step's metrics count)."""
    seconds: float
    new_tokens: int

    def student_rows(self, rows: slice, *, pad_id: int, pad_to_multiple: int = 1): ...

    def teacher_rows(self, rows: slice) -> TeacherRows: ...


class RolloutSource(Protocol):
    def select(self, examples: list[Example], contexts: list[Optional[str]]): ...

    def rollout(self, batch, step: int) -> Rollout: ...

    def metrics(self, rollout: Rollout) -> dict: ...

    def evaluate(self, step: int) -> tuple[dict, list[dict]]: ...


# ----------------------------------------------------------------------------------------------
# prompts


@dataclass
class PromptBatch:
    examples: list[Example]
    contexts: list[Optional[str]]
    student_prompts: list[list[int]]
    teacher_prompts: list[list[int]]


@dataclass
class PromptRollout:
    batch: PromptBatch
    responses: list[list[int]]
    logprobs: list[list[float]]
    seconds: float
    new_tokens: int

    def student_rows(self, rows: slice, *, pad_id: int, pad_to_multiple: int = 1):
        """The student's [prompt; response] rows, on the host (the trainer moves them)."""
        return pack(self.batch.student_prompts[rows], self.responses[rows], pad_id=pad_id,
                    pad_to_multiple=pad_to_multiple)

    def teacher_rows(self, rows: slice) -> TeacherRows:
        prompts = self.batch.teacher_prompts[rows]
        return TeacherRows(prompts, self.batch.contexts[rows], prompts=prompts, responses=self.responses[rows])


class PromptSource:
    """Single-turn prompts: the student answers without the context, the teacher scores with it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def select(self, examples: list[Example], contexts: list[Optional[str]]) -> PromptBatch:
        pairs = [self.trainer.renderer.pair(e.prompt, c) for e, c in zip(examples, contexts)]
        return PromptBatch(examples, contexts, [p.student for p in pairs], [p.teacher for p in pairs])

    def rollout(self, batch: PromptBatch, step: int) -> PromptRollout:
        """(a) opcd: the student samples from prompts without the context. Baselines: the teacher
        samples with the context (one prefill of the shared context prefix)."""
        from megatron_opcd.generation import generate

        t = self.trainer
        t0 = time.perf_counter()
        kw = dict(groups=t.groups, vocab_size=t.model_config.vocab_size, decode=t.tokenizer.decode,
                  between_steps=t.preempt.decode_check)
        if t.cfg.algorithm.name == "opcd":
            out = generate(t.student, batch.student_prompts, t.sampling(step), **kw)
        else:
            cache, rows = t.prefixes.split(t.teacher_model, batch.teacher_prompts, batch.contexts)
            out = generate(t.teacher_model, rows, t.sampling(step), prefix=cache, **kw)
        responses = [list(r) if r else [t.tokenizer.eos_ids[0]] for r in out.responses]
        return PromptRollout(batch, responses, out.logprobs, time.perf_counter() - t0, sum(len(r) for r in responses))

    def metrics(self, rollout: PromptRollout) -> dict:
        return {}

    def _eval_inputs(self, examples: list[Example], step: int) -> dict:
        t = self.trainer
        e = t.cfg.evaluation
        return dict(student=t.student, teacher=t.teacher_model, tokenizer=t.tokenizer, renderer=t.renderer,
                    examples=examples, contexts=t.sampler.for_batch(examples, step), groups=t.groups,
                    sampling=t.sampling(step, greedy=e.greedy, max_new_tokens=e.max_new_tokens, salt=17),
                    vocab_size=t.model_config.vocab_size, temperature=t.cfg.loss_temperature, prefixes=t.prefixes,
                    teacher_scorer=t.score_teacher_rows if t.routed is not None else None)

    def heldout_kl(self, examples: list[Example], step: int) -> tuple[float, list[list[int]]]:
        """(exact KL(student || teacher with the context) per response token, this rank's greedy
        responses) on `examples`, this DP rank's share (every rank of the world calls it; the demo's
        learning curve measures through it)."""
        from megatron_opcd.evaluation.runner import heldout_kl

        return heldout_kl(**self._eval_inputs(examples, step))

    def evaluate(self, step: int) -> tuple[dict, list[dict]]:
        """The held-out KL, the task's accuracy (evaluation.task) and the samples
        (`evaluation.runner.evaluate_heldout`) on the first `evaluation.num_prompts` held-out examples."""
        from megatron_opcd.evaluation.runner import evaluate_heldout
        from megatron_opcd.parallel import dp_share

        t = self.trainer
        chosen = (t.eval_examples or t.stream.examples)[:t.cfg.evaluation.num_prompts]
        mine = chosen[dp_share(len(chosen), t.groups.dp_rank, t.groups.dp_size)]  # a rank past the end gets none (10 prompts at DP = 8)
        loss = getattr(t.objective, "loss", None)  # a DivergenceLoss; SeqKD has none
        diag = getattr(loss, "diagnostics", None)  # top-k losses only
        extra = {} if diag is None else {"topk_spec": loss.spec, "diagnostics": diag}
        return evaluate_heldout(**self._eval_inputs(mine, step), task=t.eval_task, step=step, **extra)
