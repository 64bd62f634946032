"""Sample from a megatron-opcd checkpoint: `python -m megatron_opcd.generate`.

    python -m megatron_opcd.generate --ckpt runs/step_100 --prompts prompts.jsonl --out samples.jsonl \
        [--max-new-tokens 256] [--temperature 0.7 | --greedy] [--top-k 0] [--top-p 1.0] \
        [--chat] [--context ctx.txt [--context-placement system|user_prefix]]
    torchrun --nproc-per-node 4 -m megatron_opcd.generate --tp 2 --pp 2 --ckpt ... --prompts ... --out ...

Prompts: one JSON object per line, `{"prompt": "text"}` (needs the checkpoint's tokenizer/) or
`{"prompt_ids": [1, 2, 3]}`. Output: one line per prompt, in input order, with the prompt, the
model's input ids (`prompt_ids`, the context included), the response text (when there is a
tokenizer) and ids, the per-token log-probs and the finish reason.

Text prompts (and a text `--context FILE`) are rendered by the trainer's own PromptRenderer
(megatron_opcd/data/render.py): with `--chat`, the tokenizer's chat template with the context as
a system message (`--context-placement system`) or at the start of the user turn (`user_prefix`),
exactly the teacher's input in training; without it, `context + separator + prompt` as plain text
(the trainer's `data.chat_template=none`). Token ids (`prompt_ids`, a JSON list in the context
file) are used as given, the context ids first. The token prefix shared by all prompts (e.g. the
context) is prefilled once and reused. Ranks beyond TP x PP split the prompts (data parallel).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_opcd.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder written by megatron_opcd (model_config.yaml, model/)")
    p.add_argument("--prompts", required=True, help='JSONL: {"prompt": "..."} or {"prompt_ids": [...]} per line')
    p.add_argument("--out", required=True, help="JSONL written with one result per prompt")
    p.add_argument("--context", help="the context: a text file (rendered as the trainer places it), or a JSON list "
                                     "of token ids (a raw prefix)")
    p.add_argument("--chat", action="store_true",
                   help="render text prompts with the tokenizer's chat template (as the trainer does)")
    p.add_argument("--context-placement", choices=["system", "user_prefix"], default="system",
                   help="with --chat: the context as a system message, or at the start of the user turn "
                        "(the trainer's context.placement)")
    p.add_argument("--context-separator", default="\n\n",
                   help="between a user_prefix (or plain-text) context and the prompt (context.separator)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--temperature", type=float, default=1.0)
    mode.add_argument("--greedy", action="store_true")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; needs a tokenizer)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS ids")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per data-parallel rank)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    return p.parse_args(argv)


def _error(message: str):
    from megatron_opcd.errors import DataError

    return DataError(message)


def read_prompts(path: str | Path, tokenizer, vocab_size: int) -> list[dict]:
    """[{"index", "prompt" (text or None), "prompt_ids" (given ids or None)}] from a JSONL file;
    one-line errors with file:line. Text prompts are rendered later (`render_inputs`)."""
    from megatron_opcd.data.prompts import jsonl_objects

    rows = []
    for where, obj in jsonl_objects(path, "prompts"):
        if "prompt_ids" in obj:
            ids = obj["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise _error(f"{where}: prompt_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise _error(f"{where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
            text = obj.get("prompt") if isinstance(obj.get("prompt"), str) else None
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise _error(f"{where}: prompt must be a string")
            if tokenizer is None:
                raise _error(f'{where}: text prompts need a tokenizer, and the checkpoint has no tokenizer/ folder; '
                             'give {"prompt_ids": [...]} instead')
            text, ids = obj["prompt"], None
        else:
            raise _error(f'{where}: needs a "prompt" (text) or "prompt_ids" (list of token ids) field')
        rows.append({"index": len(rows), "prompt": text, "prompt_ids": ids, "where": where})
    if not rows:
        raise _error(f"prompts file {path} holds no prompts")
    return rows


def read_context(path: Optional[str], tokenizer, vocab_size: int):
    """(text, None) for a text context, (None, ids) for a JSON list of ids, (None, None) without one."""
    if path is None:
        return None, None
    p = Path(path)
    if not p.is_file():
        raise _error(f"context file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = None
    if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise _error(f"{p}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
        return None, (ids or None)
    if tokenizer is None:
        raise _error(f"{p}: a text context needs a tokenizer and the checkpoint has none; give a JSON list of ids")
    text = text.strip()
    if not text:
        raise _error(f"context file {p} is empty")
    return text, None


def make_renderer(args: argparse.Namespace, tokenizer, max_positions: int):
    """The trainer's PromptRenderer with this command's settings (chat template, placement, separator)."""
    from megatron_opcd.data.render import PromptRenderer
    from megatron_opcd.errors import ConfigError

    if tokenizer is None:
        return None
    if args.chat and not tokenizer.has_chat_template:
        raise ConfigError(f"--chat: the checkpoint's tokenizer ({tokenizer.name}) has no chat template; "
                          "drop --chat to render plain text")
    return PromptRenderer(tokenizer, use_chat_template=args.chat, placement=args.context_placement,
                          separator=args.context_separator, max_prompt_tokens=max_positions,
                          max_context_tokens=max_positions, max_total_tokens=max_positions, too_long="error")


def render_inputs(rows: list[dict], renderer, context_text: Optional[str], context_ids: Optional[list[int]],
                  *, chat: bool) -> list[list[int]]:
    """The model's input ids per prompt row: text through `renderer` (the teacher's rendering with
    a text context, the student's without), token ids as given (after the context ids)."""
    out = []
    for row in rows:
        if row["prompt_ids"] is None:  # text
            if context_ids is not None:
                if chat:
                    raise _error("--chat places a text context in the chat template; the --context file holds "
                                 "token ids (give the context as text)")
                out.append(list(context_ids) + renderer.tok.encode(row["prompt"]))
            elif context_text is not None:
                out.append(renderer.teacher(row["prompt"], context_text))
            else:
                out.append(renderer.student(row["prompt"]))
        else:
            if chat:
                raise _error(f'{row["where"]}: --chat renders text prompts with the chat template; give '
                             '{"prompt": "..."} instead of prompt_ids')
            ctx = context_ids if context_ids is not None else (
                renderer.tok.encode(context_text) if context_text is not None else [])
            out.append(list(ctx) + list(row["prompt_ids"]))
    return out


def check_layout(cfg, tp: int, pp: int) -> None:
    """The model's split and the launch's world size against --tp/--pp, in these flags' names,
    before any rank work."""
    import os

    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.errors import ConfigError

    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1, got --tp={tp} --pp={pp}")
    cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                       role="model", tp_name="--tp", pp_name="--pp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} = {tp * pp} ranks, but {world} were launched; launch a multiple "
                          f"of {tp * pp} (torchrun --nproc-per-node {tp * pp} -m ...)")


def _tokenizer(ckpt: Path):
    from megatron_opcd.checkpointing import tokenizer_dir
    from megatron_opcd.data.tokenizer import load_tokenizer

    folder = tokenizer_dir(ckpt)
    return load_tokenizer(folder) if folder is not None else None


def run(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights, read_model_config
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.data.render import common_prefix
    from megatron_opcd.errors import ConfigError
    from megatron_opcd.generation import SamplingParams, generate, prefill_prefix
    from megatron_opcd.models import build_model

    ckpt = Path(args.ckpt)
    cfg = read_model_config(ckpt)  # CheckpointError (one line) if it is not a checkpoint
    check_layout(cfg, args.tp, args.pp)  # before any rank work, in this command's own flags
    tokenizer = _tokenizer(ckpt)
    if args.stop and tokenizer is None:
        raise ConfigError("--stop needs the checkpoint's tokenizer to decode responses; it has no tokenizer/ folder")
    if args.chat and tokenizer is None:
        raise ConfigError("--chat needs the checkpoint's tokenizer (its chat template); it has no tokenizer/ folder")
    prompts = read_prompts(args.prompts, tokenizer, cfg.vocab_size)
    context_text, context_ids = read_context(args.context, tokenizer, cfg.vocab_size)
    renderer = make_renderer(args, tokenizer, cfg.max_position_embeddings)
    for row, ids in zip(prompts, render_inputs(prompts, renderer, context_text, context_ids, chat=args.chat)):
        row["prompt_ids"] = ids
        del row["where"]
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            greedy=args.greedy, seed=args.seed, stop_strings=tuple(args.stop),
            eos_ids=() if args.ignore_eos or tokenizer is None else tuple(tokenizer.eos_ids),
        )
    except ValueError as exc:
        raise ConfigError(str(exc).replace("SamplingParams.", "--").replace("_", "-")) from None
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    longest = max(prompts, key=lambda r: len(r["prompt_ids"]))
    total = len(longest["prompt_ids"]) + params.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ConfigError(
            f"prompt {longest['index']} of {args.prompts} ({len(longest['prompt_ids'])} tokens with the context and "
            f"template) + --max-new-tokens ({params.max_new_tokens}) = {total} exceeds the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}; lower --max-new-tokens or shorten the inputs"
        )

    from megatron_opcd.compat import enable_cpu

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    model = build_model(cfg, "teacher", groups=groups, init=False)  # frozen, eval: nothing here trains
    load_model_weights(model, ckpt)
    decode = tokenizer.decode if tokenizer is not None else None
    mine = prompts[groups.dp_rank :: groups.dp_size]
    # The prefix all of this replica's inputs share (the context, the template's head), prefilled once.
    shared = common_prefix([r["prompt_ids"] for r in mine]) if len(mine) > 1 else []
    prefix = prefill_prefix(model, shared, groups=groups) if shared else None
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    bar = _bar(len(prompts), is_writer and not args.no_progress)
    results, tokens, start = [], 0, time.perf_counter()
    for i in range(0, len(mine), args.batch_size):
        batch = mine[i : i + args.batch_size]
        # One seed per batch: reproducible whatever the batch, different across batches.
        out = generate(model, [r["prompt_ids"][len(shared):] for r in batch], _with_seed(params, args.seed + i),
                       groups=groups,
                       vocab_size=cfg.vocab_size, prefix=prefix, decode=decode,
                       progress=bar is not None and len(mine) <= args.batch_size)  # one batch: a bar per step
        for row, resp, lps, reason in zip(batch, out.responses, out.logprobs, out.finish_reasons):
            results.append({**row, "response": decode(resp) if decode else None, "response_ids": resp,
                            "logprobs": [round(x, 6) for x in lps], "finish_reason": reason})
        tokens += sum(out.lengths)
        if bar is not None:
            bar.update(len(batch) * groups.dp_size)
            bar.set_postfix(tok_s=f"{tokens * groups.dp_size / (time.perf_counter() - start):.1f}")
    if bar is not None:
        bar.close()
    results = _gather(results, groups)
    elapsed = time.perf_counter() - start
    if is_writer:
        results.sort(key=lambda r: r["index"])
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for r in results:
                if r["prompt"] is None:
                    r.pop("prompt")
                if r["response"] is None:
                    r.pop("response")
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(out_path)  # a complete file or none
        total = sum(len(r["response_ids"]) for r in results)
        print(f"wrote {len(results)} responses to {out_path}: {total} tokens in {elapsed:.1f}s "
              f"({total / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    parallel.destroy()


def _with_seed(params, seed: int):
    from dataclasses import replace

    return replace(params, seed=seed)


def _gather(results: list[dict], groups) -> list[dict]:
    """All data-parallel replicas' results on global rank 0 (the replicas of one model agree)."""
    import torch.distributed as dist

    if groups.dp_size == 1:
        return results
    box = [None] * groups.dp_size if groups.dp_rank == 0 else None
    dist.gather_object(results, box, dst=dist.get_global_rank(groups.dp_group, 0), group=groups.dp_group)
    return [r for part in box for r in part] if box is not None else []


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="prompts", unit="prompt", dynamic_ncols=True, file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_opcd.errors import run_cli

    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
