"""What the demo's worker processes run: the baselines, then OPCD and off-policy CD with the same budget.

    job_main(plan, progress) -> results     (launched by demo.main, one process per CPU core)

Per method a fresh `Trainer` (student = the converted SmolLM2, teacher = a frozen copy of it that
sees the pirate rule at the start of the user turn) runs its named phases step by step; every
`plan.curve_every` steps the student answers a few held-out prompts greedily without the context
(the learning curve). Evaluations go through `megatron_opcd.evaluation.evaluate_task`.

Why two independent single-rank jobs, one per core, rather than one 2-rank job: SmolLM2-135M has
9 attention heads and 3 query groups, so tensor parallelism over 2 ranks cannot split them, and
data parallelism over 2 ranks spends ~35% of each step on the 0.5 GB gradient all-reduce and on
Adam run twice (measured: 8 s of CPU per rank per step vs 12 s for the whole step on one rank).
Running the two methods side by side, one per core, uses both cores with no communication at all.
The code path is the same megatron-core trainer (DDP, schedule, optimizer) at DP = TP = PP = 1.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from megatron_opcd.demo import prompts as P

METHODS = ("opcd", "offpolicy_cd")
BASELINES = ("base", "in_context", "ood_base")


@dataclass
class Plan:
    """Everything a job needs; picklable."""

    ckpt: str
    train_file: str
    out_dir: str
    jobs: int = 2
    """Worker processes (one per core); the methods and baselines are split between them."""
    steps: int = 8
    batch: int = 8
    lr: float = 5e-5
    topk: int = 256
    rollout_tokens: int = 8
    eval_tokens: int = 6
    """Greedy tokens when grading "starts with Ahoy" ("Ah" "oy" "!": the first word decides)."""
    ood_tokens: int = 24
    """Greedy tokens when grading "written in French" (the detector needs a few function words)."""
    eval_prompts: int = 50
    curve_every: int = 2
    curve_prompts: int = 16
    curve_tokens: int = 4
    curve_ood: bool = True
    """Also grade the French rule in context at every curve point (forgetting over time)."""
    eval_batch: int = 25
    seed: int = 1234
    methods: tuple = METHODS


def job_share(plan: Plan, job: int) -> tuple[list[str], list[str]]:
    """(methods, baselines) of job `job`: methods round-robin; the cheap pirate baselines with the
    first job, the longer French one with the last, so the jobs take about the same time."""
    methods = list(plan.methods[job::plan.jobs])
    if plan.jobs == 1:
        return methods, list(BASELINES)
    baselines = (["base", "in_context"] if job == 0 else []) + (["ood_base"] if job == plan.jobs - 1 else [])
    return methods, baselines


def train_config(plan: Plan, method: str):
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.training.config import (AlgorithmConfig, CheckpointConfig, ContextConfig, DataConfig,
                                               GenerationConfig, LoggingConfig, LossConfig, OptimizerConfig,
                                               ScheduleConfig, TeacherConfig, TrainConfig)

    return TrainConfig(
        # A frozen copy of the base model is the teacher: it stays fixed while the student learns.
        teacher=TeacherConfig(mode="frozen", checkpoint=plan.ckpt),
        parallel=ParallelConfig(seed=plan.seed),
        data=DataConfig(train=plan.train_file, chat_template="auto", seed=plan.seed),
        context=ContextConfig(text=P.PIRATE_RULE, placement="user_prefix"),
        algorithm=AlgorithmConfig(name=method),
        # OPCD: reverse KL over the student's top-256 on its own samples. Off-policy CD: forward KL
        # over the teacher's top-256 on the teacher's samples. Both renormalised over the top-k.
        loss=LossConfig(topk=plan.topk, topk_from="student" if method == "opcd" else "teacher", renormalize=True),
        generation=GenerationConfig(max_new_tokens=plan.rollout_tokens, temperature=1.0),
        optimizer=OptimizerConfig(name="adam", lr=plan.lr, clip_grad=1.0),
        schedule=ScheduleConfig(steps=plan.steps, global_batch_size=plan.batch, micro_batch_size=plan.batch),
        checkpoint=CheckpointConfig(pretrained=plan.ckpt, save=None, save_at_end=False, resume=False),
        # The console shows the parent's bars; this job's own log goes to OUT/<job>.log.
        logging=LoggingConfig(dir=f"{plan.out_dir}/{method}", tensorboard=False, progress=False),
    )


class Progress:
    """Sends (job, units done, units total, phase, postfix) to the parent, which draws the bars.
    Without a queue (tests, one-off use) it does nothing."""

    def __init__(self, queue, job: str, total: float):
        self.queue, self.job, self.total, self.done = queue, job, total, 0.0
        self.phase, self.postfix = "starting", ""

    def __call__(self, advance: float = 0.0, phase: Optional[str] = None, postfix: Optional[str] = None) -> None:
        self.done += advance
        self.phase = phase or self.phase
        self.postfix = self.postfix if postfix is None else postfix
        if self.queue is not None:
            self.queue.put((self.job, self.done, self.total, self.phase, self.postfix))


class Timer:
    """Wall and CPU seconds per named phase (CPU time shows what a machine shared with other
    work would take alone)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                timer.wall[name] = timer.wall.get(name, 0.0) + time.perf_counter() - self.w
                timer.cpu[name] = timer.cpu.get(name, 0.0) + time.process_time() - self.c
                return False

        return _Span()


def evaluate(trainer, model, examples, task, *, context: Optional[str], tokens: int, batch: int,
             progress: Optional[Progress] = None) -> dict:
    """Greedy accuracy of `model` on `examples` (with or without `context`), `batch` prompts at a
    time (each batch advances `progress` by its share of one unit)."""
    from megatron_opcd.evaluation import evaluate_task
    from megatron_opcd.generation import SamplingParams

    sampling = SamplingParams(max_new_tokens=tokens, greedy=True, eos_ids=tuple(trainer.tokenizer.eos_ids))
    samples, skipped = [], 0
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        out = evaluate_task(model, trainer.tokenizer, trainer.renderer, chunk, task, groups=trainer.groups,
                            sampling=sampling, vocab_size=trainer.model_config.vocab_size, contexts=context,
                            batch_size=batch)
        samples += out["samples"]
        skipped += out["skipped"]
        if progress is not None:
            acc = sum(s["score"] for s in samples) / max(len(samples), 1)
            progress(len(chunk) / len(examples), postfix=f"acc {100 * acc:.0f}%")
    n = len(samples)
    return {"accuracy": sum(s["score"] for s in samples) / n if n else float("nan"), "n": n, "skipped": skipped,
            "samples": samples}


def _train(trainer, plan: Plan, curve_examples, pirate, french, progress: Progress, timer: Timer,
           method: str) -> dict:
    """The steps of one method, with the learning curve every `curve_every` steps on
    `curve_examples`: the pirate rule without the context, and the French rule in context (what
    the student keeps); the training KL every step."""
    curve = {"step": [], "accuracy": [], "ood_accuracy": [], "kl_step": [], "kl": [], "loss": []}

    def point(step: int) -> None:
        with timer(f"{method}_curve"):
            r = evaluate(trainer, trainer.student, curve_examples, pirate, context=None, tokens=plan.curve_tokens,
                         batch=len(curve_examples))
            ood = evaluate(trainer, trainer.student, curve_examples, french, context=P.FRENCH_RULE,
                           tokens=plan.ood_tokens, batch=len(curve_examples)) if plan.curve_ood else None
        curve["step"].append(step)
        curve["accuracy"].append(r["accuracy"])
        curve["ood_accuracy"].append(ood["accuracy"] if ood else float("nan"))

    point(0)
    while trainer.step < plan.steps:
        with timer(f"{method}_steps"):
            result = trainer.train_step()
        m = result.metrics
        for k in ("rollout", "teacher", "update"):
            timer.wall[f"{method}_{k}"] = timer.wall.get(f"{method}_{k}", 0.0) + m.get(f"time_{k}", 0.0)
        curve["kl_step"].append(trainer.step)
        curve["kl"].append(m.get("kl", float("nan")))
        curve["loss"].append(m.get("loss", float("nan")))
        if trainer.step % plan.curve_every == 0 or trainer.step == plan.steps:
            point(trainer.step)
            m = {**m, "accuracy_no_context": curve["accuracy"][-1]}
        trainer.logger.log(trainer.step, m)  # OUT/<method>/metrics.jsonl
        progress(1, postfix=f"kl {m.get('kl', float('nan')):.3f}, pirate rule without context "
                            f"{100 * curve['accuracy'][-1]:.0f}%, French rule in context {100 * curve['ood_accuracy'][-1]:.0f}%")
    trainer.logger.close()
    return curve


def _redirect_output(path: str) -> None:
    """This job's stdout/stderr (warnings, the trainer's lines) into a log file: the parent draws
    the console. Tracebacks still reach the parent through the launcher."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def job_main(plan: Plan, progress_queue=None) -> dict:
    """One worker: its share of the baselines and methods, on a megatron-core world of one rank."""
    job = int(os.environ.get("RANK", "0"))
    # A world of its own: without the launcher's variables parallel.initialize() makes a group of
    # one on a free port, so the two jobs never wait for each other.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(k, None)
    methods, baselines = job_share(plan, job)
    name = "+".join(methods) or f"job{job}"
    os.makedirs(plan.out_dir, exist_ok=True)
    _redirect_output(os.path.join(plan.out_dir, f"{name}.log"))

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # dist_checkpointing's torch deprecations

    from megatron_opcd import parallel
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.data.prompts import Example
    from megatron_opcd.evaluation import get_task
    from megatron_opcd.training.trainer import Trainer

    timer = Timer()
    progress = Progress(progress_queue, name, total=len(baselines) + len(methods) * (plan.steps + 2) + len(methods))
    pirate = get_task("starts_with", prefix=P.PIRATE_PREFIX)
    french = get_task("language", language="french")
    held_out = [Example(prompt=p, index=i) for i, p in enumerate(P.eval_prompts()[:plan.eval_prompts])]
    # The curve's subset: spread over the held-out set.
    curve_examples = held_out[::max(1, len(held_out) // plan.curve_prompts)][:plan.curve_prompts]
    evals = {  # key: (model, context, task, tokens, label)
        "base": ("teacher", None, pirate, plan.eval_tokens, "base model, no context"),
        "in_context": ("teacher", P.PIRATE_RULE, pirate, plan.eval_tokens, "teacher: pirate rule in context"),
        "ood_base": ("teacher", P.FRENCH_RULE, french, plan.ood_tokens, "base model, French rule in context"),
        "{m}": ("student", None, pirate, plan.eval_tokens, "trained student, no context"),
        "ood_{m}": ("student", P.FRENCH_RULE, french, plan.ood_tokens, "trained student, French rule in context"),
    }
    results: dict = {"samples": {}, "n_eval": len(held_out)}

    def run_eval(trainer, key: str, method: str = "") -> None:
        which, ctx, task, tokens, label = evals[key]
        model = trainer.teacher if which == "teacher" else trainer.student
        out_key = key.format(m=method)
        progress(0, phase=f"eval {label.format(m=method)}", postfix="")
        with timer(f"eval_{out_key}"):
            r = evaluate(trainer, model, held_out, task, context=ctx, tokens=tokens, batch=plan.eval_batch,
                         progress=progress)
        results[out_key] = r["accuracy"]
        results["samples"][out_key] = r["samples"]

    groups = parallel.initialize(ParallelConfig(seed=plan.seed))
    try:
        for i, method in enumerate(methods):
            progress(0, phase="loading the student and the frozen teacher")
            with timer(f"{method}_build"):
                trainer = Trainer(train_config(plan, method), groups)
            progress(1)
            if i == 0:
                for key in baselines:  # the teacher holds the base weights, and never changes
                    run_eval(trainer, key)
            progress(0, phase=f"training ({plan.steps} steps)", postfix="")
            results[f"curve_{method}"] = _train(trainer, plan, curve_examples, pirate, french, progress, timer, method)
            run_eval(trainer, "{m}", method)
            run_eval(trainer, "ood_{m}", method)
            trainer = None  # free this method's models before the next one is built
            gc.collect()
        progress(0, phase="done", postfix="")
    finally:
        parallel.destroy()
    results["timings"] = {"wall": timer.wall, "cpu": timer.cpu,
                          "job_cpu": time.process_time(), "job": name}
    return results
