#!/usr/bin/env python
"""Extract experiential knowledge with a teacher model: a pool of contexts, and optionally the best.

    python tools/extract_experience.py --ckpt DIR --problems train.jsonl --task math \\
        [--seeds 4] [--max-items-tokens 1024] [--out pool.json] \\
        [--select --val val.jsonl --out-best best.txt]
    python tools/extract_experience.py --ckpt DIR --game frozen_lake|sokoban [--levels 0:64] \\
        [--select --val-levels 1000000:1000032 --out-best best.txt]
    torchrun --nproc-per-node 8 tools/extract_experience.py --tp 2 --pp 2 ...   (DP = ranks / (TP x PP))

The teacher solves the problems one after another; after each it writes "- EXPERIENCE ITEM:"
lines (prompt: megatron_opcd/prompts/experience_reflect.txt), which accumulate as its context
for the next problem, capped at --max-items-tokens. Each seed (its own problem order) gives one
context of the pool. Outputs: --out (a JSON list of contexts: the trainer's `context.pool`) and
<out>.runs.json (items and trace per seed); with --select, the accuracy of every context on
--val (and of no context), the best context in --out-best (the trainer's `context.file`) and the
scores in <out-best stem>.scores.json. Seeds are split over data-parallel replicas.
With --game, the teacher plays the levels one after another (multi-turn episodes, --max-new-tokens
per turn) and reflects on each transcript; contexts are selected by success rate on --val-levels.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tokenizer(args):
    """The checkpoint's tokenizer (or --tokenizer), with a one-line error."""
    from megatron_opcd.checkpointing import tokenizer_dir
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.errors import ConfigError, TokenizerError

    tok_path = args.tokenizer or tokenizer_dir(args.ckpt)
    if tok_path is None:
        raise ConfigError(f"{args.ckpt} has no tokenizer/ folder; pass --tokenizer")
    try:
        return load_tokenizer(tok_path)
    except TokenizerError as exc:
        raise ConfigError(str(exc)) from None


def _teacher(args, model_cfg, layout, groups):
    """This rank's stage of the checkpoint's model, frozen."""
    from megatron_opcd.checkpointing import load_model_weights
    from megatron_opcd.models import build_model

    model_cfg.check_parallel(layout)
    model = build_model(model_cfg, "teacher", groups=groups, init=False)
    load_model_weights(model, args.ckpt)
    return model

def _check_counts(args) -> None:
    from megatron_opcd.errors import ConfigError

    if args.seeds < 1 or args.max_items_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--seeds, --max-items-tokens and --batch-size must be >= 1")

def _pool_from_seeds(args, runs, groups, seconds, say):
    """Gather every DP replica's seed runs, write the pool (rank 0); (result dict, contexts).
    With --select, a pool without any item is an error."""
    import torch.distributed as dist

    from megatron_opcd.errors import ConfigError
    from megatron_opcd.evaluation.experience import pool_contexts, write_pool

    if groups.dp_size > 1:
        parts: list = [None] * groups.dp_size
        dist.all_gather_object(parts, runs, group=groups.dp_group)
        runs = sorted((r for part in parts for r in part), key=lambda r: r.seed)
    result = {"runs": runs, "seconds": seconds}
    if dist.get_rank() == 0:
        pool_path, runs_path = write_pool(args.out, runs)
        say(f"[experience] wrote {pool_path} ({len(pool_contexts(runs))} of {len(runs)} seeds produced items) "
            f"and {runs_path} in {seconds:.1f}s")
    contexts = pool_contexts(runs)
    if args.select and not contexts:
        raise ConfigError(f"no seed produced an experience item (see {Path(args.out).stem}.runs.json); "
                          "nothing to select: check --reflect-prompt or raise --reflect-max-new-tokens")
    return result, contexts


def _select_and_write(args, contexts, score, result, say, metric: str, about: dict) -> None:
    """--select: `score(context or None)` on validation for no context and every pooled context, keep
    the best; rank 0 writes it to --out-best and the scores (plus `about`) beside it."""
    import torch.distributed as dist

    from megatron_opcd.evaluation.experience import select_best

    baseline = score(None)
    best, scores = select_best(contexts, score)
    result.update(best=best, scores=scores, baseline=baseline)
    if dist.get_rank() != 0:
        return
    out_best = Path(args.out_best)
    out_best.parent.mkdir(parents=True, exist_ok=True)
    out_best.write_text(contexts[best] + "\n", encoding="utf-8")
    scores_path = out_best.with_name(out_best.stem + ".scores.json")
    scores_path.write_text(json.dumps({"best": best, "scores": scores, "no_context": baseline, **about}, indent=1)
                           + "\n", encoding="utf-8")
    say(f"[experience] validation {metric} without context {baseline:.3f}; per context "
        f"{', '.join(f'{s:.3f}' for s in scores)}; best #{best} -> {out_best}")


def _eval_kwargs(args, tok, groups, model_cfg) -> dict:
    """Greedy evaluation settings shared by task and game selection."""
    from megatron_opcd.generation import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens, greedy=True,
                              eos_ids=tuple(tok.eos_ids))
    return dict(groups=groups, sampling=sampling, vocab_size=model_cfg.vocab_size, batch_size=args.batch_size)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="teacher checkpoint folder (model_config.yaml, model/, tokenizer/)")
    p.add_argument("--problems", default=None, help="JSONL of problems to learn from ({prompt, answer}); not with --game")
    p.add_argument("--task", default=None, help="grader: starts_with | language | math | choice | safety | exact | synthetic")
    p.add_argument("--game", default=None, choices=["frozen_lake", "sokoban"],
                   help="learn from playing a text game instead: the teacher plays --levels levels one after another")
    p.add_argument("--levels", default="0:64", help="with --game: level seeds A:B played for experience")
    p.add_argument("--val-levels", default="1000000:1000032", help="with --game --select: validation level seeds A:B")
    p.add_argument("--max-rounds", type=int, default=5, help="with --game: turns per episode")
    p.add_argument("--game-options", default="{}", help="with --game: JSON object of game options")
    p.add_argument("--task-args", default="{}", help='JSON object of task arguments, e.g. \'{"num_choices": 5}\'')
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/file (default: the checkpoint's tokenizer/)")
    p.add_argument("--seeds", type=int, default=3, help="contexts in the pool (one extraction run per seed)")
    p.add_argument("--seed-base", type=int, default=0, help="seeds are seed-base .. seed-base + seeds - 1")
    p.add_argument("--max-items-tokens", type=int, default=1024, help="token cap of one context (all its items)")
    p.add_argument("--cap-policy", choices=["drop_oldest", "stop"], default="drop_oldest",
                   help="when the cap is reached: drop the oldest items, or stop adding")
    p.add_argument("--max-problems", type=int, default=None, help="use only the first N problems of each order")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest solution")
    p.add_argument("--reflect-max-new-tokens", type=int, default=256, help="longest reflection")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (solve and reflect)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (then seeds differ only in problem order)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    p.add_argument("--chat-template", choices=["auto", "none"], default="auto")
    p.add_argument("--placement", choices=["system", "user_prefix"], default="system", help="where the context goes")
    p.add_argument("--separator", default="\n\n", help="between a user_prefix context (or a plain-text context) and the prompt")
    p.add_argument("--solve-prompt", default="experience_solve", help="template file or name in megatron_opcd/prompts")
    p.add_argument("--reflect-prompt", default="experience_reflect", help="template file or name in megatron_opcd/prompts")
    p.add_argument("--out", default="pool.json", help="the pool: a JSON list of contexts")
    p.add_argument("--select", action="store_true", help="score every context on --val and keep the best")
    p.add_argument("--val", default=None, help="JSONL of validation problems for --select")
    p.add_argument("--out-best", default=None, help="file for the best context (plain text) with --select")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: --max-new-tokens")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args) -> dict:
    # Input checks first, before the heavy imports (megatron.core): a typo fails in a second.
    from megatron_opcd.checkpointing import read_model_config
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.data.prompts import load_examples
    from megatron_opcd.errors import ConfigError
    from megatron_opcd.evaluation import get_task
    from megatron_opcd.evaluation.templates import load_prompt

    if args.game:
        return _run_game(args)
    if not args.problems or not args.task:
        raise ConfigError("give --problems (JSONL) and --task (the grader), or --game frozen_lake|sokoban")
    if args.select and (not args.val or not args.out_best):
        raise ConfigError("--select needs --val (validation JSONL) and --out-best (file for the best context)")
    _check_counts(args)
    try:
        task_args = json.loads(args.task_args)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--task-args is not valid JSON ({exc.msg}); e.g. '{{\"num_choices\": 5}}'") from None
    if not isinstance(task_args, dict):
        raise ConfigError("--task-args must be a JSON object, e.g. '{\"prefix\": \"Ahoy\"}'")
    task = get_task(args.task, **task_args)
    problems = load_examples(args.problems)
    val = load_examples(args.val) if args.select else None
    solve_t = load_prompt(args.solve_prompt, required=["problem"])
    reflect_t = load_prompt(args.reflect_prompt, required=["problem", "response", "experience"])
    model_cfg = read_model_config(args.ckpt)
    tok = _tokenizer(args)

    import torch
    import torch.distributed as dist

    from megatron_opcd import parallel
    from megatron_opcd.data.render import PromptRenderer
    from megatron_opcd.evaluation import evaluate_task
    from megatron_opcd.evaluation.experience import ModelCompleter, extract_pool
    from megatron_opcd.generation import SamplingParams

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from megatron_opcd.compat import enable_cpu

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    rank0 = dist.get_rank() == 0
    say = print if rank0 else (lambda *_: None)
    try:
        model = _teacher(args, model_cfg, ParallelConfig(tensor_model_parallel_size=args.tp,
                                                         pipeline_model_parallel_size=args.pp), groups)
        longest = max(args.max_new_tokens, args.reflect_max_new_tokens)
        renderer = PromptRenderer(
            tok, use_chat_template=args.chat_template == "auto", placement=args.placement, separator=args.separator,
            max_prompt_tokens=max(1, model_cfg.max_position_embeddings - longest),
            max_context_tokens=args.max_items_tokens + 64, max_total_tokens=model_cfg.max_position_embeddings,
            max_new_tokens=args.max_new_tokens, too_long="truncate_context",
        )
        common = dict(temperature=args.temperature, top_p=args.top_p, greedy=args.greedy,
                      eos_ids=tuple(tok.eos_ids))
        complete = ModelCompleter(
            model, tok, renderer, groups=groups, vocab_size=model_cfg.vocab_size, batch_size=args.batch_size,
            sampling=SamplingParams(max_new_tokens=args.max_new_tokens, **common),
            reflect_sampling=SamplingParams(max_new_tokens=args.reflect_max_new_tokens, **common),
        )
        seeds = list(range(args.seed_base, args.seed_base + args.seeds))
        mine = seeds[groups.dp_rank::groups.dp_size]  # seeds split over data-parallel replicas
        t0 = time.time()
        runs = extract_pool(complete, problems, task, seeds=mine, count_tokens=lambda s: len(tok.encode(s)),
                            max_items_tokens=args.max_items_tokens, policy=args.cap_policy,
                            solve_template=solve_t, reflect_template=reflect_t, max_problems=args.max_problems,
                            log=say) if mine else []
        result, contexts = _pool_from_seeds(args, runs, groups, time.time() - t0, say)
        if args.select:
            kw = _eval_kwargs(args, tok, groups, model_cfg)
            _select_and_write(args, contexts,
                              lambda c: evaluate_task(model, tok, renderer, val, task, contexts=c, **kw)["accuracy"],
                              result, say, "accuracy", {"val": str(args.val), "n": len(val)})
        return result
    finally:
        parallel.destroy()


def _seed_range(text: str, flag: str) -> list[int]:
    from megatron_opcd.errors import ConfigError

    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"{flag}={text!r} must be A:B (the seeds A .. B-1)") from None
    if b <= a:
        raise ConfigError(f"{flag}={text!r} is empty")
    return list(range(a, b))


def _run_game(args) -> dict:
    """--game: the teacher plays levels (episodes through the shared generation loop), reflects
    after each, and the pool is selected by success rate on validation levels."""
    from megatron_opcd.checkpointing import read_model_config
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.envs.config import GameConfig
    from megatron_opcd.errors import ConfigError
    from megatron_opcd.evaluation.templates import load_prompt

    if args.select and not args.out_best:
        raise ConfigError("--select needs --out-best (file for the best context)")
    _check_counts(args)
    try:
        options = json.loads(args.game_options)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--game-options is not valid JSON ({exc.msg})") from None
    GameConfig(name=args.game, max_rounds=args.max_rounds, options=options)  # validates the options
    levels, val_levels = _seed_range(args.levels, "--levels"), _seed_range(args.val_levels, "--val-levels")
    reflect_t = load_prompt(args.reflect_prompt, required=["problem", "response", "experience"])
    model_cfg = read_model_config(args.ckpt)
    tok = _tokenizer(args)

    import torch
    import torch.distributed as dist

    from megatron_opcd import parallel
    from megatron_opcd.data.render import PromptRenderer
    from megatron_opcd.evaluation.experience import ModelCompleter
    from megatron_opcd.evaluation.games import evaluate_game, extract_game_pool, model_player
    from megatron_opcd.generation import SamplingParams
    from megatron_opcd.generation.episodes import GameSetup

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    layout = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    from megatron_opcd.compat import enable_cpu

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize(layout)
    rank0 = dist.get_rank() == 0
    say = print if rank0 else (lambda *_: None)
    try:
        model = _teacher(args, model_cfg, layout, groups)
        setup = GameSetup(args.game, max_rounds=args.max_rounds, options=options,
                          use_chat_template=args.chat_template == "auto", placement=args.placement,
                          separator=args.separator, max_total_tokens=model_cfg.max_position_embeddings)
        common = dict(temperature=args.temperature, top_p=args.top_p, greedy=args.greedy, eos_ids=tuple(tok.eos_ids))
        play_sampling = SamplingParams(max_new_tokens=args.max_new_tokens, **common)
        renderer = PromptRenderer(
            tok, use_chat_template=args.chat_template == "auto", placement=args.placement, separator=args.separator,
            max_prompt_tokens=max(1, model_cfg.max_position_embeddings - args.reflect_max_new_tokens),
            max_context_tokens=args.max_items_tokens + 64, max_total_tokens=model_cfg.max_position_embeddings,
            max_new_tokens=args.reflect_max_new_tokens, too_long="truncate_context",
        )
        reflect = ModelCompleter(model, tok, renderer, groups=groups, vocab_size=model_cfg.vocab_size,
                                 batch_size=args.batch_size,
                                 sampling=SamplingParams(max_new_tokens=args.reflect_max_new_tokens, **common))
        play = model_player(model, tok, setup, groups=groups, sampling=play_sampling, vocab_size=model_cfg.vocab_size)
        seeds = list(range(args.seed_base, args.seed_base + args.seeds))
        mine = seeds[groups.dp_rank::groups.dp_size]  # seeds split over data-parallel replicas
        t0 = time.time()
        runs = extract_game_pool(play, reflect, setup, levels, seeds=mine, count_tokens=lambda s: len(tok.encode(s)),
                                 reflect_template=reflect_t, max_items_tokens=args.max_items_tokens,
                                 policy=args.cap_policy, max_problems=args.max_problems, log=say) if mine else []
        result, contexts = _pool_from_seeds(args, runs, groups, time.time() - t0, say)
        if args.select:
            kw = _eval_kwargs(args, tok, groups, model_cfg)
            _select_and_write(args, contexts,
                              lambda c: evaluate_game(model, tok, setup, val_levels, context=c, **kw)["success"],
                              result, say, "success", {"game": args.game, "val_levels": args.val_levels})
        return result
    finally:
        parallel.destroy()


def main(argv=None) -> int:
    from megatron_opcd.errors import run_cli

    args = _parser().parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug or os.environ.get("OPCD_DEBUG") == "1")


if __name__ == "__main__":  # dist_checkpointing and the launcher re-import this module: keep the guard
    sys.exit(main())
