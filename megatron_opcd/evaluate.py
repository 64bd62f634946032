"""Evaluate a checkpoint on a task, without and with the context: `python -m megatron_opcd.evaluate`.

    python -m megatron_opcd.evaluate --ckpt runs/smollm2/opcd/step_0000008 --task starts_with \
        --task-arg prefix=Ahoy --prompts examples/data/pirate/eval.jsonl \
        --context examples/prompts/pirate_rule.txt --context-placement user_prefix --out samples.jsonl
    torchrun --nproc-per-node 2 -m megatron_opcd.evaluate --tp 2 ...

Prompts: the trainer's JSONL (`{"prompt": ..., "answer"?: ...}`; tasks that grade against an answer
need it on every line). Each prompt is rendered by the trainer's PromptRenderer (the tokenizer's
chat template unless `--chat-template none`; the context placed as `--context-placement` says) and
answered through `megatron_opcd.evaluation.runner.evaluate_task`, the loop the demo and the
experience extraction use. Output: `--out` gets one JSON line per sample (`with_context`,
`index`, `prompt`, `response`, `score`); stdout gets one summary line, e.g.

    starts_with on 16 prompts: 6.2% without the context, 87.5% with it (samples: samples.jsonl)

Ranks beyond TP x PP split the prompts (data parallel). Greedy unless `--temperature` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_opcd.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder (the trainer's step_*/ or a converted one)")
    p.add_argument("--task", required=True, help="task name of megatron_opcd.evaluation (starts_with, language, "
                                                 "math, choice, safety, exact, synthetic)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of the task's grader (repeatable; YAML values), e.g. prefix=Ahoy")
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt": ..., "answer"?: ...} lines')
    p.add_argument("--out", required=True, help="JSONL written with one line per sample")
    p.add_argument("--context", help="a text file holding the context; without it, only the no-context accuracy")
    p.add_argument("--context-placement", choices=["system", "user_prefix"], default="system",
                   help="the context as a system message or at the start of the user turn (context.placement)")
    p.add_argument("--context-separator", default="\n\n", help="between a user_prefix context and the prompt")
    p.add_argument("--chat-template", choices=["auto", "none"], default="auto",
                   help="auto: the tokenizer's chat template when it has one (data.chat_template)")
    p.add_argument("--num-prompts", type=int, default=0, help="evaluate the first N prompts (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per data-parallel rank)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    return p.parse_args(argv)


def task_from_args(name: str, pairs: list[str]):
    """The task `name` with `--task-arg KEY=VALUE` arguments (values parsed as YAML by the
    config's own override parser)."""
    from megatron_opcd.config import parse_override
    from megatron_opcd.errors import ConfigError
    from megatron_opcd.evaluation import get_task

    kwargs = {}
    for pair in pairs:
        if "=" not in pair or pair.startswith("="):
            raise ConfigError(f"--task-arg {pair!r} is not of the form KEY=VALUE")
        path, value = parse_override(pair)
        kwargs[".".join(path)] = value
    return get_task(name, **kwargs)


def run(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights, read_model_config, tokenizer_dir
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.data.prompts import load_contexts, load_examples
    from megatron_opcd.data.render import PromptRenderer
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.errors import ConfigError, DataError
    from megatron_opcd.evaluation import evaluate_task
    from megatron_opcd.generate import check_layout
    from megatron_opcd.generation import SamplingParams
    from megatron_opcd.models import build_model
    from megatron_opcd.training.config import ContextConfig

    # Everything that needs no model first: checkpoint config, split, tokenizer, task, data, sampling.
    ckpt = Path(args.ckpt)
    cfg = read_model_config(ckpt)
    check_layout(cfg, args.tp, args.pp)  # in --tp/--pp, before any rank work
    folder = tokenizer_dir(ckpt)
    if folder is None:
        raise ConfigError(f"{ckpt} has no tokenizer/ folder; evaluation decodes and grades text")
    tokenizer = load_tokenizer(folder)
    task = task_from_args(args.task, args.task_arg)
    examples = load_examples(args.prompts)
    if args.num_prompts < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--num-prompts must be >= 0, --batch-size and --max-new-tokens >= 1")
    if args.num_prompts:
        examples = examples[:args.num_prompts]
    if getattr(task, "needs_answer", True):
        missing = next((e for e in examples if e.answer is None), None)
        if missing is not None:
            raise DataError(f"{args.prompts}:{missing.index + 1}: task {args.task} grades against \"answer\" and "
                            "this line has none")
    context = load_contexts(ContextConfig(file=args.context))[0] if args.context else None
    try:
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.temperature is None,
                                  temperature=args.temperature or 1.0, seed=args.seed,
                                  eos_ids=tuple(tokenizer.eos_ids))
    except ValueError as exc:
        raise ConfigError(str(exc).replace("SamplingParams.", "--").replace("_", "-")) from None
    n_pos = cfg.max_position_embeddings
    renderer = PromptRenderer(tokenizer, use_chat_template=args.chat_template == "auto",
                              placement=args.context_placement, separator=args.context_separator,
                              max_prompt_tokens=n_pos, max_context_tokens=n_pos, max_total_tokens=n_pos,
                              max_new_tokens=args.max_new_tokens, too_long="error")
    for e in examples:  # a prompt (or context) that does not fit is an error here, not after loading
        renderer.pair(task.format_prompt(e), context) if context else renderer.student(task.format_prompt(e))

    from megatron_opcd.compat import enable_cpu

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    try:
        model = build_model(cfg, "teacher", groups=groups, init=False)  # frozen, eval
        load_model_weights(model, ckpt)
        kw = dict(groups=groups, sampling=sampling, vocab_size=cfg.vocab_size, batch_size=args.batch_size)
        start = time.perf_counter()
        results = {"without": evaluate_task(model, tokenizer, renderer, examples, task, contexts=None, **kw)}
        if context is not None:
            results["with"] = evaluate_task(model, tokenizer, renderer, examples, task, contexts=context, **kw)
        elapsed = time.perf_counter() - start
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_samples(Path(args.out), results)
            print(summary_line(args.task, results, args.out), flush=True)
            print(f"evaluated in {elapsed:.1f}s", file=sys.stderr)
    finally:
        parallel.destroy()
    return results


def write_samples(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for key in ("without", "with"):
            for s in results.get(key, {}).get("samples", []):
                fh.write(json.dumps({"with_context": key == "with", **s}, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a complete file or none


def summary_line(task: str, results: dict, out) -> str:
    w = results["without"]
    line = f"{task} on {w['n']} prompts: {100 * w['accuracy']:.1f}% without the context"
    if "with" in results:
        line += f", {100 * results['with']['accuracy']:.1f}% with it"
        if results["with"]["skipped"]:
            line += f" ({results['with']['skipped']} skipped: too long)"
    return line + f" (samples: {out})"


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_opcd.errors import run_cli

    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
