"""Everything about a training run that can be checked without a model, checked before any model
is built (at 8B, building and loading the two models takes minutes; a typo in a file name must
not wait for them).

    checked = preflight(cfg, groups, model_config=..., tokenizer=...)     at the top of Trainer.__init__

In order, each failure one line (ConfigError / DataError / TokenizerError) naming the setting:
  1. batch arithmetic against the data-parallel size (global = k x micro x DP)
  2. the teacher's model config (read from its checkpoint: no weights), its TP/PP split and vocabulary
  3. the contexts (context.text/file/pool), the prompt files (data.train, data.eval), and a
     context for every training example (context.selection)
  4. the evaluation task (evaluation.task + task_args) and, when it grades against answers, that
     every evaluated example has one
  5. the length budget of every training example with its longest context (data.too_long):
     an error, skipped examples, or contexts that will be cut, said once here, loudly
Resume compatibility (the checkpoint's model, optimizer, schedule and tokenizer against this
config) is `training.state.check_resume`, which runs just before, at the top of Trainer.__init__.

`Checked` hands what was read to the trainer, so nothing is read twice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from megatron_opcd.config import ModelConfig
from megatron_opcd.data.prompts import ContextSampler, Example, load_contexts, load_examples
from megatron_opcd.data.render import PromptRenderer
from megatron_opcd.errors import ConfigError


@dataclass
class Checked:
    num_micro: int
    """Micro-batches per step on one data-parallel rank."""
    teacher_config: ModelConfig
    contexts: list[str]
    renderer: PromptRenderer
    examples: list[Example]
    """The training examples that fit the length budget."""
    eval_examples: Optional[list[Example]]
    task: object = None
    """The evaluation task (megatron_opcd.evaluation.Task) or None."""


def build_renderer(cfg, tokenizer, max_total_tokens: int) -> PromptRenderer:
    """The trainer's PromptRenderer from its config (data.*, context.*, generation.max_new_tokens);
    `python -m megatron_opcd.generate --chat` and `evaluate` render through the same class."""
    return PromptRenderer(
        tokenizer, use_chat_template=cfg.data.chat_template == "auto", placement=cfg.context.placement,
        separator=cfg.context.separator, max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_context_tokens=cfg.data.max_context_tokens, max_total_tokens=max_total_tokens,
        max_new_tokens=cfg.generation.max_new_tokens, too_long=cfg.data.too_long,
    )


def teacher_config(cfg, model_config: ModelConfig, tokenizer=None) -> ModelConfig:
    """The frozen teacher's architecture (its model_config.yaml; no weights read), or the student's;
    its vocabulary, split and (when it travelled with the checkpoint) tokenizer checked."""
    from megatron_opcd.checkpointing import check_matches_checkpoint, read_model_config, tokenizer_dir
    from megatron_opcd.models import check_same_vocabulary
    from megatron_opcd.models.builder import check_same_tokenizer

    t = cfg.teacher
    if t.mode in ("self", "ema"):  # the student's architecture (ema: its moving average)
        return model_config
    tc = t.model or read_model_config(t.checkpoint)
    if t.model is not None and t.checkpoint:  # the architecture first: a wrong one explains the rest
        check_matches_checkpoint(t.model, read_model_config(t.checkpoint), t.checkpoint, role="teacher.model")
    check_same_vocabulary(model_config, tc)
    tc.check_parallel(cfg.teacher_parallel, role="teacher", **cfg.teacher_parallel_names)
    if tokenizer is not None and t.checkpoint and tokenizer_dir(t.checkpoint) is not None:
        from megatron_opcd.data.tokenizer import load_tokenizer

        check_same_tokenizer(tokenizer, load_tokenizer(tokenizer_dir(t.checkpoint)), f"{t.checkpoint}/tokenizer")
    return tc


def check_task(evaluation, examples: list[Example], where: str):
    """The evaluation task, built once; ConfigError for an unknown task, bad arguments, or
    examples without the "answer" its grader needs or with one it cannot grade against (a label
    that is not one of a safety task's labels, a multiple-choice answer that is not a letter)."""
    if not evaluation.task:
        return None
    from megatron_opcd.evaluation import get_task

    try:
        task = get_task(evaluation.task, **evaluation.task_args)
    except TypeError as exc:  # an argument the task does not take
        raise ConfigError(f"evaluation.task_args for task {evaluation.task!r}: {exc}") from None
    if getattr(task, "needs_answer", True):
        missing = [e for e in examples[:evaluation.num_prompts] if e.answer is None]
        if missing:
            raise ConfigError(
                f"evaluation.task={evaluation.task} grades against \"answer\", but line {missing[0].index + 1} of "
                f"{where} has none; add an \"answer\" to every line or choose a task that needs none"
            )
        for e in examples[:evaluation.num_prompts]:
            try:
                task.check_gold(e)
            except ValueError as exc:
                raise ConfigError(f"evaluation.task={evaluation.task}: line {e.index + 1} of {where}: {exc}") from None
    return task


def fit_examples(examples: list[Example], renderer: PromptRenderer, contexts: list[str], selection: str,
                 *, too_long: str, rank: int = 0) -> list[Example]:
    """The examples that fit the length budget with their longest possible context. Contexts
    that will be cut (data.too_long=truncate_context) or examples that will be skipped (skip)
    are reported here, once, with the numbers; data.too_long=error raises on the first."""
    from megatron_opcd.errors import DataError

    longest = max(contexts, key=len) if contexts else None
    kept, skipped, cut = [], 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one summary below instead of one warning per example
        for e in examples:
            ctx = e.context if (selection == "per_example" and e.context) else longest
            try:
                pair = renderer.pair(e.prompt, ctx)
            except DataError as exc:  # over a token limit: name the line it came from
                raise DataError(f"{e.where}: {exc}" if getattr(e, "where", "") else str(exc)) from None
            if pair is None:
                skipped += 1
                continue
            kept.append(e)
            if pair.truncated_context:
                full = renderer.teacher(e.prompt, ctx)
                cut.append(len(full) - len(pair.student))
    if rank == 0 and skipped:
        warnings.warn(f"data.too_long=skip: {skipped} of {len(examples)} examples do not fit and are skipped",
                      stacklevel=2)
    if rank == 0 and cut:
        warnings.warn(
            f"data.too_long=truncate_context: the context of {len(cut)} of {len(examples)} examples (up to "
            f"~{max(cut)} tokens) does not fit data.max_context_tokens={renderer.max_context_tokens} or the model's "
            f"{renderer.max_total} positions (with generation.max_new_tokens={renderer.max_new}) and will be CUT from "
            "its end; raise data.max_context_tokens, shorten the context, or set data.too_long=error to stop instead",
            stacklevel=2,
        )
    if not kept:
        raise DataError("no training example fits the length budget; raise model.max_position_embeddings, "
                        "lower generation.max_new_tokens, or shorten the prompts/contexts")
    return kept


def check_expert_lockstep(cfg, *, dp_size: int, ep_size: int, moe: bool, num_eval: int) -> None:
    """Under expert parallelism an MoE model's every forward is an all-to-all over the EP group,
    whose ranks are data-parallel replicas: they must make the same model calls. The training
    step does (equal micro-batches; the decode loop runs in lockstep, generation/loop.py); what
    would not is refused here in one line: contexts that differ per row (the teacher prefills
    each new one: a different number of forwards per rank), text games (episodes of different
    lengths) and an evaluation whose prompts do not split evenly over the DP replicas."""
    if not moe or ep_size == 1:
        return
    where = f"an MoE model with parallel.expert_model_parallel_size={ep_size}"
    if cfg.context.selection != "fixed":
        raise ConfigError(f"{where} needs context.selection=fixed (each rank would prefill a different number of "
                          "contexts, and the experts' all-to-all would wait); set it, or "
                          "parallel.expert_model_parallel_size=1")
    if cfg.game is not None:
        raise ConfigError(f"{where} cannot train on a game (episodes of different lengths per rank); "
                          "set parallel.expert_model_parallel_size=1")
    if cfg.evaluation.interval and num_eval % dp_size:
        raise ConfigError(f"{where}: the evaluation's {num_eval} prompts do not split evenly over {dp_size} "
                          f"data-parallel ranks; set evaluation.num_prompts to a multiple of {dp_size}")


def preflight(cfg, groups, *, model_config: ModelConfig, tokenizer, rank: int = 0) -> Checked:
    """Run the checks of the module docstring; returns what they read. Call on every rank before
    any model is built (every rank reads the same files and raises the same error)."""
    num_micro = cfg.check_batches(groups.dp_size)
    tc = teacher_config(cfg, model_config, tokenizer)
    contexts = load_contexts(cfg.context)
    train = load_examples(cfg.data.train)
    # Every example has a context to give the teacher (the sampler raises otherwise, at step 1).
    ContextSampler(contexts, cfg.context.selection, cfg.data.seed).for_batch(train, 0)
    eval_examples = load_examples(cfg.data.eval) if cfg.data.eval else None
    task = check_task(cfg.evaluation, eval_examples or train, cfg.data.eval or cfg.data.train)
    check_expert_lockstep(cfg, dp_size=groups.dp_size, ep_size=groups.ep_size, moe=model_config.is_moe or tc.is_moe,
                          num_eval=min(cfg.evaluation.num_prompts, len(eval_examples or train)))
    max_total = min(model_config.max_position_embeddings, tc.max_position_embeddings)
    renderer = build_renderer(cfg, tokenizer, max_total)
    examples = fit_examples(train, renderer, contexts, cfg.context.selection, too_long=cfg.data.too_long, rank=rank)
    return Checked(num_micro=num_micro, teacher_config=tc, contexts=contexts, renderer=renderer, examples=examples,
                   eval_examples=eval_examples, task=task)
