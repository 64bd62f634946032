"""Multi-turn OPCD on text games: the trainer's rollout source with episodes instead of single responses.

`GameSource` is the second implementation of `training.sources.RolloutSource`; the one Trainer
runs it when the config has a `game:` section. Only what knows about prompts changes; the update
(megatron schedule, injected objective, optimizer), micro-batching, device placement, teacher
scoring with the shared prefix, checkpoints, resume, signals and logging are the Trainer's:

    select         level seeds of this DP rank (streamed from the data.train level file like
                   prompts: shuffled per epoch, position checkpointed) + their contexts
    rollout        the student plays the levels without the context (episodes.play_episodes);
                   baselines (offpolicy_cd, seqkd): the teacher plays with the context
    teacher_rows   the same transcripts with the context in the first turn; the Trainer scores them
                   aligned to every reply token of every turn (score(segments=...)), the shared
                   prefix (within the first turn) prefilled once
    student_rows   the student's transcripts packed with pack_segments: the loss covers exactly
                   the tokens the player generated; template and environment tokens are masked
    evaluate       success rate on fixed levels, without the context (student) and with it (teacher)

generation.max_new_tokens is the limit per turn; game.max_rounds the number of turns. The loss
average `sequence` is per episode: (1/|all reply tokens|) x their sum, then the mean over episodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.data.packing import pack_segments
from megatron_opcd.data.prompts import Example
from megatron_opcd.errors import DataError
from megatron_opcd.generation.episodes import Episode, GameSetup, play_episodes
from megatron_opcd.training.sources import TeacherRows


@dataclass
class GameBatch:
    examples: list[Example]
    """The level file's lines (Example.index = line number among the levels)."""
    seeds: list[int]
    contexts: list[Optional[str]]


@dataclass
class GameRollout:
    batch: GameBatch
    episodes: list[Episode]
    responses: list[list[int]]
    """Per episode, every reply token of every turn (what the Trainer's metrics count)."""
    seconds: float
    new_tokens: int

    def student_rows(self, rows: slice, *, pad_id: int, pad_to_multiple: int = 1):
        """The student's transcripts of one micro-batch, on the host (the Trainer moves them)."""
        return pack_segments([e.segments for e in self.episodes[rows]], pad_id=pad_id,
                             pad_to_multiple=pad_to_multiple)

    def teacher_rows(self, rows: slice) -> TeacherRows:
        """The teacher's view: its shared prefix is taken within the first turn (up to the first
        reply), so a cached prefix holds no trained token."""
        turns = [e.context_segments for e in self.episodes[rows]]
        return TeacherRows([t[0][0] for t in turns], self.batch.contexts[rows], segments=turns)


class GameSource:
    def __init__(self, trainer):
        from megatron_opcd.envs import read_level_seeds

        self.trainer = trainer
        cfg = trainer.cfg
        g = cfg.game
        self.level_seeds = read_level_seeds(cfg.data.train, g.name)
        self.eval_seeds = (read_level_seeds(cfg.data.eval, g.name) if cfg.data.eval
                           else list(range(g.eval_seed, g.eval_seed + cfg.evaluation.num_prompts)))
        self.setup = GameSetup(
            name=g.name, max_rounds=g.max_rounds, options=dict(g.options),
            use_chat_template=cfg.data.chat_template == "auto", placement=cfg.context.placement,
            separator=cfg.context.separator,
            max_total_tokens=min(trainer.model_config.max_position_embeddings,
                                 trainer.teacher_config.max_position_embeddings),
        )

    def select(self, examples: list[Example], contexts: list[Optional[str]]) -> GameBatch:
        return GameBatch(examples, [self.level_seeds[e.index] for e in examples], contexts)

    def rollout(self, batch: GameBatch, step: int) -> GameRollout:
        """(a) opcd: the student plays the levels without the context (its view); baselines: the
        teacher plays them with the context. Both views of every transcript are built."""
        t = self.trainer
        t0 = time.perf_counter()
        student_plays = t.cfg.algorithm.name == "opcd"
        episodes = play_episodes(
            t.student if student_plays else t.teacher_model, t.tokenizer, self.setup.games(len(batch.seeds)),
            batch.seeds, t.sampling(step), groups=t.groups, vocab_size=t.model_config.vocab_size,
            context=batch.contexts, act_with_context=not student_plays, between_steps=t.preempt.decode_check,
            **self.setup.render_kwargs)
        empty = [e.seed for e in episodes if not e.response_tokens]
        if empty:
            raise DataError(f"level {empty[0]}: the first turn (with the context) does not fit in the model's "
                            "positions; shorten the context or lower generation.max_new_tokens")
        responses = [e.response_tokens for e in episodes]
        return GameRollout(batch, episodes, responses, time.perf_counter() - t0, sum(map(len, responses)))

    def metrics(self, rollout: GameRollout) -> dict:
        episodes, groups = rollout.episodes, self.trainer.groups
        stats = torch.tensor([sum(e.success for e in episodes), len(episodes), sum(e.rounds for e in episodes),
                              sum(e.invalid for e in episodes)], dtype=torch.float64)
        if groups.dp_size > 1:
            dist.all_reduce(stats, group=groups.dp_group)
        solved, n, rounds, invalid = stats.tolist()
        return {"success": solved / max(n, 1), "rounds": rounds / max(n, 1),
                "invalid_per_round": invalid / max(rounds, 1)}

    def evaluate(self, step: int) -> tuple[dict, list[dict]]:
        """Success rate on the fixed evaluation levels: the student without the context, and (with
        game.eval_with_context) the teacher with the first context. No samples."""
        from megatron_opcd.evaluation.games import evaluate_game

        t = self.trainer
        e = t.cfg.evaluation
        params = t.sampling(step, greedy=e.greedy, max_new_tokens=e.max_new_tokens, salt=17)
        kw = dict(groups=t.groups, sampling=params, vocab_size=t.model_config.vocab_size)
        r = evaluate_game(t.student, t.tokenizer, self.setup, self.eval_seeds, **kw)
        metrics = {"success": r["success"], "invalid_per_round": r["invalid_per_round"]}
        if t.cfg.game.eval_with_context and t.contexts:
            r = evaluate_game(t.teacher_model, t.tokenizer, self.setup, self.eval_seeds, context=t.contexts[0], **kw)
            metrics["success_with_context"] = r["success"]
        return metrics, []
