"""What the demo's worker processes run: the baselines, then OPCD and off-policy CD with the same budget.

    job_main(plan, progress) -> results     (launched by demo.main, one process per CPU core)

Per method and seed a fresh `Trainer` (student = the converted SmolLM2, teacher = a frozen copy of
it that sees the pirate rule at the start of the user turn) runs its named phases step by step.
The seed is the trainer's `data.seed`: it moves the data order and the rollout samples; the
weights, prompts and budget are the same for every seed. Every `plan.curve_every` steps (and at
the end) a learning-curve point on fixed held-out prompts: the student answers greedily without
the context, graded for the pirate rule, and the trainer's exact held-out KL(student || teacher
with the context) over the whole vocabulary on those answers (what OPCD minimises, not the
training loss on fresh samples); and the French rule given in context (what the student keeps).
The step-0 point is the base model's, the same for every seed and method: measured once.
Evaluations go through `megatron_opcd.evaluation.evaluate_task` and `evaluation.runner.heldout_kl`
(the trainer's held-out KL, `trainer.source.heldout_kl`).

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
    curve_every: int = 4
    """A curve point every N steps (and at step 0 and the last step)."""
    curve_prompts: int = 16
    eval_batch: int = 50
    """Prompts per generation batch in the final evaluations (all 50 at once: fewer decode steps)."""
    seed: int = 1234
    """The first seed; seed i is seed + i. Also megatron's seed (the same for every run)."""
    seeds: int = 3
    """Runs per method, each with its own data order and rollout samples (`data.seed`)."""
    methods: tuple = METHODS

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


def job_share(plan: Plan, job: int) -> tuple[list[str], list[str]]:
    """(methods, baselines) of job `job`: methods round-robin (each with all the seeds); the
    cheap pirate baselines and the step-0 curve point with the first job, the longer French
    baseline with the last, so the jobs take about the same time."""
    methods = list(plan.methods[job::plan.jobs])
    if plan.jobs == 1:
        return methods, list(BASELINES)
    baselines = (["base", "in_context"] if job == 0 else []) + (["ood_base"] if job == plan.jobs - 1 else [])
    return methods, baselines


def train_config(plan: Plan, method: str, seed: Optional[int] = None):
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.training.config import (AlgorithmConfig, CheckpointConfig, ContextConfig, DataConfig,
                                               EvaluationConfig, GenerationConfig, LoggingConfig, LossConfig,
                                               OptimizerConfig, ScheduleConfig, TeacherConfig, TrainConfig)

    seed = plan.seed if seed is None else seed

    return TrainConfig(
        # A frozen copy of the base model is the teacher: it stays fixed while the student learns.
        teacher=TeacherConfig(mode="frozen", checkpoint=plan.ckpt),
        parallel=ParallelConfig(seed=plan.seed),
        data=DataConfig(train=plan.train_file, chat_template="auto", seed=seed),
        context=ContextConfig(text=P.PIRATE_RULE, placement="user_prefix"),
        algorithm=AlgorithmConfig(name=method),
        # OPCD: reverse KL over the student's top-256 on its own samples. Off-policy CD: forward KL
        # over the teacher's top-256 on the teacher's samples. Both renormalised over the top-k.
        loss=LossConfig(topk=plan.topk, topk_from="student" if method == "opcd" else "teacher", renormalize=True),
        generation=GenerationConfig(max_new_tokens=plan.rollout_tokens, temperature=1.0),
        optimizer=OptimizerConfig(name="adam", lr=plan.lr, clip_grad=1.0),
        schedule=ScheduleConfig(steps=plan.steps, global_batch_size=plan.batch, micro_batch_size=plan.batch),
        checkpoint=CheckpointConfig(pretrained=plan.ckpt, save=None, save_at_end=False, resume=False),
        # The curve's held-out KL (demo/run.py calls trainer.source.heldout_kl itself): greedy answers of the graded length.
        evaluation=EvaluationConfig(interval=0, greedy=True, max_new_tokens=plan.eval_tokens),
        # The console shows the parent's bars; this job's own log goes to OUT/<job>.log.
        logging=LoggingConfig(dir=f"{plan.out_dir}/{method}/seed{seed}", tensorboard=False, progress=False),
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


def curve_point(trainer, plan: Plan, examples, pirate, french, step: int, *, ood: bool = True) -> dict:
    """One learning-curve point of `trainer.student` on the fixed held-out `examples`: its greedy
    answers without the context graded for the pirate rule, the exact held-out KL(student ||
    teacher with the context) on those answers, and (with `ood`) the French rule in context."""
    kl, responses = trainer.source.heldout_kl(examples, step)
    texts = [trainer.tokenizer.decode(r) for r in responses]
    point = {"accuracy": sum(pirate.grade(t, e) for t, e in zip(texts, examples)) / max(len(examples), 1),
             "heldout_kl": kl, "ood_accuracy": float("nan")}
    if ood:
        point["ood_accuracy"] = evaluate(trainer, trainer.student, examples, french, context=P.FRENCH_RULE,
                                         tokens=plan.ood_tokens, batch=len(examples))["accuracy"]
    return point


def _train(trainer, plan: Plan, curve_examples, pirate, french, progress: Progress, timer: Timer,
           name: str) -> dict:
    """The steps of one run, with a curve point on `curve_examples` every `curve_every` steps
    (before the last step; the last point is taken after the final evaluation, run_method) and
    the training KL every step."""
    curve = {"step": [], "accuracy": [], "ood_accuracy": [], "heldout_kl": [], "kl_step": [], "kl": [], "loss": []}
    while trainer.step < plan.steps:
        with timer(f"{name}_steps"):
            result = trainer.train_step()
        m = result.metrics
        for k in ("rollout", "teacher", "update"):
            timer.wall[f"{name}_{k}"] = timer.wall.get(f"{name}_{k}", 0.0) + m.get(f"time_{k}", 0.0)
        curve["kl_step"].append(trainer.step)
        curve["kl"].append(m.get("kl", float("nan")))
        curve["loss"].append(m.get("loss", float("nan")))
        postfix = ""
        if trainer.step % plan.curve_every == 0 and trainer.step < plan.steps:
            with timer(f"{name}_curve"):
                add_point(curve, trainer.step,
                          curve_point(trainer, plan, curve_examples, pirate, french, trainer.step))
            m = {**m, "accuracy_no_context": curve["accuracy"][-1], "heldout_kl": curve["heldout_kl"][-1]}
            postfix = (f", pirate rule without context {100 * curve['accuracy'][-1]:.0f}%, "
                       f"French rule in context {100 * curve['ood_accuracy'][-1]:.0f}%")
        trainer.logger.log(trainer.step, m)  # OUT/<method>/seed<seed>/metrics.jsonl
        progress(1, postfix=f"kl {m.get('kl', float('nan')):.3f}{postfix}")
    return curve


def add_point(curve: dict, step: int, point: dict) -> None:
    curve["step"].append(step)
    for k in ("accuracy", "ood_accuracy", "heldout_kl"):
        curve[k].append(point[k])


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
    """One worker: its share of the baselines and of the (method, seed) runs, on a megatron-core
    world of one rank. Returns {"baselines", "curve0" (first job only), "runs", "samples",
    "timings"}; demo.main.aggregate turns the jobs' results into the report."""
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
    from megatron_opcd.compat import enable_cpu
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.data.prompts import Example
    from megatron_opcd.evaluation import get_task
    from megatron_opcd.training.trainer import Trainer

    timer = Timer()
    runs = [(m, s) for m in methods for s in plan.seed_list]
    first = job == 0
    progress = Progress(progress_queue, name,
                        total=len(baselines) + int(first) + len(runs) * (plan.steps + 4))
    pirate = get_task("starts_with", prefix=P.PIRATE_PREFIX)
    french = get_task("language", language="french")
    held_out = [Example(prompt=p, index=i) for i, p in enumerate(P.eval_prompts()[:plan.eval_prompts])]
    # The curve's subset: spread over the held-out set.
    curve_examples = held_out[::max(1, len(held_out) // plan.curve_prompts)][:plan.curve_prompts]
    curve_index = {e.index for e in curve_examples}
    evals = {  # key: (model, context, task, tokens, label)
        "base": ("teacher", None, pirate, plan.eval_tokens, "base model, no context"),
        "in_context": ("teacher", P.PIRATE_RULE, pirate, plan.eval_tokens, "teacher: pirate rule in context"),
        "ood_base": ("teacher", P.FRENCH_RULE, french, plan.ood_tokens, "base model, French rule in context"),
        "{m}": ("student", None, pirate, plan.eval_tokens, "{m} seed {s}, no context"),
        "ood_{m}": ("student", P.FRENCH_RULE, french, plan.ood_tokens, "{m} seed {s}, French rule in context"),
    }
    out: dict = {"baselines": {}, "runs": [], "samples": {}, "n_eval": len(held_out)}

    def run_eval(trainer, key: str, method: str = "", seed: int = 0) -> dict:
        which, ctx, task, tokens, label = evals[key]
        model = trainer.teacher if which == "teacher" else trainer.student
        out_key = key.format(m=method)
        progress(0, phase=f"eval {label.format(m=method, s=seed)}", postfix="")
        with timer(f"eval_{out_key}" + (f"_seed{seed}" if method else "")):
            r = evaluate(trainer, model, held_out, task, context=ctx, tokens=tokens, batch=plan.eval_batch,
                         progress=progress)
        out["samples"][out_key + (f"@{seed}" if method else "")] = r["samples"]
        return r

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize(ParallelConfig(seed=plan.seed))
    try:
        for i, (method, seed) in enumerate(runs):
            run_name = f"{method}_seed{seed}"
            t_run = time.perf_counter()
            progress(0, phase=f"loading the student and the frozen teacher ({method}, seed {seed})")
            with timer(f"{run_name}_build"):
                trainer = Trainer(train_config(plan, method, seed), groups)
            progress(1)
            if i == 0:  # the teacher holds the base weights and never changes; the student is still the base
                for key in baselines:
                    out["baselines"][key] = run_eval(trainer, key)["accuracy"]
                if first:
                    progress(0, phase="curve at step 0 (the base model)", postfix="")
                    with timer("curve0"):
                        out["curve0"] = curve_point(trainer, plan, curve_examples, pirate, french, 0)
                    progress(1)
            progress(0, phase=f"training {method}, seed {seed} ({plan.steps} steps)", postfix="")
            curve = _train(trainer, plan, curve_examples, pirate, french, progress, timer, run_name)
            acc = run_eval(trainer, "{m}", method, seed)
            ood = run_eval(trainer, "ood_{m}", method, seed)
            # The last curve point: the held-out KL and pirate grade of the final student on the
            # curve's prompts, and the French grade from the final evaluation's answers to them.
            with timer(f"{run_name}_curve"):
                last = curve_point(trainer, plan, curve_examples, pirate, french, plan.steps, ood=False)
            kept = [s["score"] for s in ood["samples"] if s["index"] in curve_index]
            last["ood_accuracy"] = sum(kept) / len(kept) if kept else float("nan")
            add_point(curve, plan.steps, last)
            progress(1)
            trainer.logger.close()
            out["runs"].append({"method": method, "seed": seed, "accuracy": acc["accuracy"],
                                "ood_accuracy": ood["accuracy"], "curve": curve,
                                "seconds": round(time.perf_counter() - t_run, 1)})
            trainer = None  # free this run's models before the next one is built
            gc.collect()
        progress(0, phase="done", postfix="")
    finally:
        parallel.destroy()
    out["timings"] = {"wall": timer.wall, "cpu": timer.cpu, "job_cpu": time.process_time(), "job": name}
    return out
