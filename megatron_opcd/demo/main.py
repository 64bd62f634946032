"""`make demo`: OPCD on SmolLM2-135M-Instruct on 2 CPU cores, in a few minutes.

The context is a rule the model follows only when it sees it ("You are a pirate. Every reply
must start with 'Ahoy!' ..."). The same budget of steps goes to off-policy context distillation
(forward KL on the teacher's samples) and to OPCD (reverse KL over the student's top-256 on the
student's own samples); then the student is graded *without* the context on held-out prompts,
and on another rule given in context (reply in French), before and after, to see what it forgot.

Each method is trained with several seeds (`--seeds`, default 3: the data order and the rollout
samples change; the model, prompts and budget do not); the table gives each row as the mean over
the seeds with the min-max beside it, so one seed's luck cannot pass for the method.

Phases: convert the model (first run only; cached in runs/demo/ckpt) -> two worker processes, one
per core, run the baselines, one method each with all its seeds and their evaluations
(demo/run.py) -> `aggregate` -> table, results.json, PNG.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from megatron_opcd.demo import prompts as P
from megatron_opcd.demo.report import format_table, plot_curves, write_results
from megatron_opcd.demo.run import Plan


def write_train_file(out_dir: Path) -> Path:
    path = out_dir / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in P.train_prompts()), encoding="utf-8")
    return path


def run(out_dir: str = "runs/demo", *, steps: int = 8, seeds: int = 3, jobs: int = 2, timeout: float = 3600.0,
        **plan_overrides) -> dict:
    """The whole demo; returns the results dict (see report.REQUIRED_KEYS)."""
    import multiprocessing as mp

    from megatron_opcd.demo.model import converted_checkpoint
    from megatron_opcd.launcher import run_on_ranks

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print("megatron-opcd demo: On-Policy Context Distillation of an in-context rule into SmolLM2-135M-Instruct")
    print(f"  context (teacher only): \"{P.PIRATE_RULE}\"")
    print(f"  {len(P.train_prompts())} training prompts, {len(P.eval_prompts())} held-out prompts; {steps} steps "
          f"per method and seed, {seeds} seeds; {jobs} worker process(es), 1 torch thread each; logs in {out}/")
    ckpt = converted_checkpoint(out / "ckpt")
    t_model = time.perf_counter() - t0
    plan = Plan(ckpt=str(ckpt), train_file=str(write_train_file(out)), out_dir=str(out), jobs=jobs, steps=steps,
                seeds=seeds, **plan_overrides)
    queue = mp.get_context("forkserver").Queue()  # the launcher's context: the jobs inherit it
    bars = ProgressBars(queue)
    try:
        per_job = run_on_ranks(_job_entry, jobs, (plan, queue), timeout=timeout)
    finally:
        bars.close()
    results = aggregate(per_job, plan)
    seconds = time.perf_counter() - t0
    results.update(
        seconds=round(seconds, 1),
        cpu_seconds=round(sum(j["job_cpu"] for j in results["timings"]["jobs"]) + time.process_time(), 1),
        context=P.PIRATE_RULE, ood_context=P.FRENCH_RULE, model="SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)",
    )
    results["timings"]["model_seconds"] = round(t_model, 1)
    # Samples last: the numbers stay at the top of results.json.
    results["samples"] = results.pop("samples")
    return results


def aggregate(per_job: list[dict], plan: Plan) -> dict:
    """The jobs' results (demo/run.py job_main) -> the report's dict: each accuracy key the mean
    over the seeds, `per_seed` (one dict of the same keys per seed; `seconds` there is the wall
    time of that seed's runs, summed over the methods), `spread` ({key: [min, max]} over the
    seeds), `curves` ({method: one curve per seed, the shared step-0 point first})."""
    from megatron_opcd.demo.report import ACCURACY_KEYS

    baselines: dict = {}
    curve0 = None
    runs: list[dict] = []
    samples: dict = {}
    jobs = []
    n_eval = None
    for r in per_job:
        baselines.update(r["baselines"])
        curve0 = r.get("curve0", curve0)
        runs += r["runs"]
        samples.update(r["samples"])
        jobs.append(r["timings"])
        n_eval = r["n_eval"]
    missing = [k for k in ("base", "in_context", "ood_base") if k not in baselines]
    if missing or curve0 is None:
        raise ValueError(f"the demo's jobs returned no {', '.join(missing) or 'step-0 curve point'}")
    per_seed = []
    for seed in plan.seed_list:
        row: dict = {"seed": seed, **{k: baselines[k] for k in ("base", "in_context", "ood_base")}, "seconds": 0.0}
        for run in (r for r in runs if r["seed"] == seed):
            row[run["method"]] = run["accuracy"]
            row[f"ood_{run['method']}"] = run["ood_accuracy"]
            row["seconds"] = round(row["seconds"] + run["seconds"], 1)
        per_seed.append(row)
    keys = [k for k in ACCURACY_KEYS if all(k in row for row in per_seed)]
    results: dict = {k: sum(row[k] for row in per_seed) / len(per_seed) for k in keys}
    results["spread"] = {k: [min(row[k] for row in per_seed), max(row[k] for row in per_seed)] for k in keys}
    results.update(steps=plan.steps, seeds=plan.seed_list, n_eval=n_eval, per_seed=per_seed)
    curves: dict = {}
    for run in sorted(runs, key=lambda r: (r["method"], r["seed"])):
        c = run["curve"]
        curves.setdefault(run["method"], []).append({
            "seed": run["seed"], "step": [0] + c["step"],
            **{k: [curve0[k]] + c[k] for k in ("accuracy", "ood_accuracy", "heldout_kl")},
            "kl_step": c["kl_step"], "kl": c["kl"], "loss": c["loss"],
        })
    results["curves"] = curves
    results["settings"] = {k: v for k, v in vars(plan).items() if k not in ("ckpt", "train_file", "out_dir")}
    results["timings"] = {"jobs": jobs}
    results["samples"] = samples
    return results


class ProgressBars:
    """One tqdm bar per job in this (parent) process, fed by the jobs through a queue."""

    def __init__(self, queue):
        import threading

        self.queue = queue
        self.bars: dict = {}
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from tqdm import tqdm

        while True:
            item = self.queue.get()
            if item is None:
                return
            job, done, total, phase, postfix = item
            bar = self.bars.get(job)
            if bar is None:
                bar = self.bars[job] = tqdm(total=total, desc=f"{job:>12}", position=len(self.bars), leave=True,
                                            file=sys.stderr, dynamic_ncols=True,
                                            bar_format="{desc} {bar:20} {percentage:3.0f}% {elapsed}{postfix}")
            bar.n = min(done, total)
            bar.set_postfix_str(f"{phase}{': ' + postfix if postfix else ''}", refresh=False)
            bar.refresh()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)
        for bar in self.bars.values():
            bar.close()


def _job_entry(plan: Plan, queue) -> dict:
    # Module-level and importable: the launcher pickles it by reference.
    from megatron_opcd.demo.run import job_main

    return job_main(plan, queue)


def report(results: dict, out_dir: str = "runs/demo") -> None:
    out = Path(out_dir)
    path = write_results(results, out)
    print()
    print(format_table(results))
    print(f"\n  {results['seconds']:.0f} s in all ({results['timings']['model_seconds']:.0f} s of them for the model), "
          f"{results['cpu_seconds']:.0f} s of CPU; results: {path}")
    try:
        png = plot_curves(results, out / "learning_curves.png")
    except Exception as exc:  # noqa: BLE001 - the numbers are written; a plot failure must not lose them
        print(f"  warning: the plot failed ({type(exc).__name__}: {exc}); results.json is written", file=sys.stderr)
        png = None
    if png:
        print(f"  learning curves: {png}")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m megatron_opcd.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the seconds-long 2-rank check of a random tiny model instead")
    p.add_argument("--out", default="runs/demo", help="output folder (the converted model is cached in OUT/ckpt)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per method and seed (default 8)")
    p.add_argument("--seeds", type=int, default=3,
                   help="training runs per method, each with its own data order and samples (default 3)")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="worker processes, one core each: the two methods side by side (default 2)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        p.error("--steps and --seeds must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: 2 shared cores
    if args.tiny:
        from megatron_opcd.demo.tiny import main as tiny

        tiny()
        return 0
    from megatron_opcd.errors import CheckpointError, ConfigError, ConversionError, DemoError
    from megatron_opcd.launcher import RanksFailed

    try:
        results = run(args.out, steps=args.steps, seeds=args.seeds, jobs=args.jobs)
    except (DemoError, ConversionError, CheckpointError, ConfigError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except RanksFailed as exc:
        last = [line for line in str(exc).splitlines() if line.strip()][-1]
        print(f"error: a demo worker failed: {last.strip()} (OPCD_DEBUG=1 shows the tracebacks)", file=sys.stderr)
        if os.environ.get("OPCD_DEBUG") == "1":
            print(exc, file=sys.stderr)
        return 1
    report(results, args.out)
    return 0
