"""The trainer's periodic evaluation on held-out prompts.

- `eval_kl`: the student answers greedily without the context; the teacher scores the same
  responses with the context; the exact per-token KL(student || teacher) over the whole vocabulary
  (what OPCD drives down), averaged over response tokens.
- with `evaluation.task`: the task's accuracy of the student's responses without the context
  (the task of `megatron_opcd.evaluation`, built and checked once by training/preflight.py).
- the samples (prompt, response, grade), which the trainer appends to eval_samples.jsonl.

A checkpoint is evaluated with and without the context, with samples, by
`python -m megatron_opcd.evaluate` (on megatron_opcd.evaluation.runner).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opcd.parallel import dp_share


def _eval_examples(trainer):
    """This DP rank's share of the first `evaluation.num_prompts` held-out examples: the same set
    at any DP size (a rank past the end gets none, e.g. 10 prompts at DP = 8)."""
    examples = trainer.eval_examples or trainer.stream.examples
    chosen = examples[:trainer.cfg.evaluation.num_prompts]
    return chosen[dp_share(len(chosen), trainer.groups.dp_rank, trainer.groups.dp_size)]


@torch.no_grad()
def eval_kl(trainer, examples, step: int) -> tuple[float, list[list[int]]]:
    """(exact KL sum, token count) of this rank's examples, summed over the world; a DP replica
    without examples adds zeros but still joins the all-reduce (returning early hung the others)."""
    buf = torch.zeros(2, dtype=torch.float64)  # [KL sum, response tokens]: host floats, gloo reduces them
    responses: list[list[int]] = []
    if examples:
        responses = _kl_sums(trainer, examples, step, buf)
    dist.all_reduce(buf)
    return float(buf[0] / buf[1]) if buf[1] > 0 else float("nan"), responses


def _kl_sums(trainer, examples, step: int, buf: torch.Tensor) -> list[list[int]]:
    from megatron_opcd.data.render import common_prefix
    from megatron_opcd.generation import generate, score
    from megatron_opcd.losses import DivergenceSpec, vocab_parallel_divergence

    contexts = trainer.sampler.for_batch(examples, step)
    pairs = [trainer.renderer.pair(e.prompt, c) for e, c in zip(examples, contexts)]
    student_prompts = [p.student for p in pairs]
    teacher_prompts = [p.teacher for p in pairs]
    params = trainer._sampling(step, greedy=trainer.cfg.evaluation.greedy,
                               max_new_tokens=trainer.cfg.evaluation.max_new_tokens, salt=17)
    out = generate(trainer.student, student_prompts, params, groups=trainer.groups,
                   vocab_size=trainer.model_config.vocab_size, decode=trainer.tokenizer.decode)
    responses = [list(r) if r else [trainer.tokenizer.eos_ids[0]] for r in out.responses]
    prefix = common_prefix(teacher_prompts)
    t = score(trainer.teacher_model, [p[len(prefix):] for p in teacher_prompts], responses, groups=trainer.groups,
              prefix=prefix or None, vocab_size=trainer.model_config.vocab_size, pad_id=trainer.tokenizer.pad_id)
    s = score(trainer.student, student_prompts, responses, groups=trainer.groups,
              vocab_size=trainer.model_config.vocab_size, pad_id=trainer.tokenizer.pad_id)
    if trainer.groups.is_last_stage:
        spec = DivergenceSpec(kind="reverse_kl", topk=None, temperature=trainer.cfg.loss_temperature,
                              vocab_size=trainer.model_config.vocab_size)
        kl = vocab_parallel_divergence(s.logits, t.logits, spec, trainer.groups.tp_group)
        if trainer.groups.tp_rank == 0:
            buf[0] = float((kl.double() * s.mask.double()).sum())
            buf[1] = float(s.mask.double().sum())
    return responses


def evaluate(trainer, step: int) -> tuple[dict, list[dict]]:
    """(metrics, samples): the KL (and the task's accuracy), and per held-out prompt the student's
    greedy response (and its grade), gathered over data-parallel replicas in example order."""
    examples = _eval_examples(trainer)
    was_training = trainer.student.training
    trainer.student.eval()
    try:
        kl, responses = eval_kl(trainer, examples, step)
        metrics = {"kl": kl}
        texts = [trainer.tokenizer.decode(r) for r in responses]
        samples = [{"step": step, "index": e.index, "prompt": e.prompt, "response": t}
                   for e, t in zip(examples, texts)]
        task = getattr(trainer, "eval_task", None)
        if task is None and trainer.cfg.evaluation.task:
            from megatron_opcd.evaluation import get_task

            task = get_task(trainer.cfg.evaluation.task, **trainer.cfg.evaluation.task_args)
        if task is not None:
            grades = [float(task.grade(t, e)) for t, e in zip(texts, examples)]
            for row, g in zip(samples, grades):
                row["score"] = g
            agg = torch.tensor([sum(grades), float(len(grades))], dtype=torch.float64)
            if trainer.groups.dp_size > 1:
                dist.all_reduce(agg, group=trainer.groups.dp_group)
            metrics["accuracy"] = float(agg[0] / max(agg[1], 1))
        if trainer.groups.dp_size > 1:
            parts: list = [None] * trainer.groups.dp_size
            dist.all_gather_object(parts, samples, group=trainer.groups.dp_group)
            samples = [s for part in parts for s in part]  # replica order = example order
    finally:
        trainer.student.train(was_training)
    return metrics, samples
