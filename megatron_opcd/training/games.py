"""Multi-turn OPCD on text games: the Trainer with episodes instead of single responses.

Only the phases that know about prompts change; the update (megatron schedule, injected
objective, optimizer), checkpoints, resume, signals and logging are the Trainer's:

    select_batch   level seeds of this DP rank (streamed from the data.train level file like
                   prompts: shuffled per epoch, position checkpointed) + their contexts
    rollout        the student plays the levels without the context (episodes.play_episodes);
                   baselines (offpolicy_cd, seqkd): the teacher plays with the context
    score_micro_batch  the teacher's logits on the same transcripts with the context in the first
                   turn, aligned to every reply token of every turn (score(segments=...), shared
                   prefix); the Trainer's score_teacher runs it per micro-batch
    GameRollout.pack   the student's transcripts packed with pack_segments: the loss covers exactly
                   the tokens the player generated; template and environment tokens are masked
                   (the Trainer's one micro-batch path calls it and moves the batch to the device)
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

from megatron_opcd.config import ConfigError
from megatron_opcd.data.packing import pack_segments
from megatron_opcd.data.prompts import DataError, Example
from megatron_opcd.data.render import common_prefix
from megatron_opcd.generation.episodes import Episode, GameSetup, drop_prefix, flatten, play_episodes
from megatron_opcd.training.trainer import Trainer


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

    def pack(self, rows: slice, *, pad_id: int, pad_to_multiple: int = 1):
        """The student's transcripts of one micro-batch, on the host (the Trainer moves them)."""
        return pack_segments([e.segments for e in self.episodes[rows]], pad_id=pad_id,
                             pad_to_multiple=pad_to_multiple)


class GameTrainer(Trainer):
    def __init__(self, cfg, groups, *, log_dir: Optional[str] = None):
        from megatron_opcd.envs import read_level_seeds

        if cfg.game is None:
            raise ConfigError("GameTrainer needs a `game:` section")
        super().__init__(cfg, groups, log_dir=log_dir)
        g = cfg.game
        self.level_seeds = read_level_seeds(cfg.data.train, g.name)
        self.eval_seeds = (read_level_seeds(cfg.data.eval, g.name) if cfg.data.eval
                           else list(range(g.eval_seed, g.eval_seed + cfg.evaluation.num_prompts)))
        self.setup = GameSetup(
            name=g.name, max_rounds=g.max_rounds, options=dict(g.options),
            use_chat_template=cfg.data.chat_template == "auto", placement=cfg.context.placement,
            separator=cfg.context.separator,
            max_total_tokens=min(self.model_config.max_position_embeddings, self.teacher_config.max_position_embeddings),
        )
        self._last_episodes: list[Episode] = []

    # ------------------------------------------------------------------------------------------
    # the phases of a step

    def select_batch(self, step: int) -> GameBatch:
        mine = self.examples_for_step()  # level lines stream exactly as prompts do
        return GameBatch(mine, [self.level_seeds[e.index] for e in mine], self.sampler.for_batch(mine, step))

    def rollout(self, batch: GameBatch, step: int) -> GameRollout:
        """(a) opcd: the student plays the levels without the context (its view); baselines: the
        teacher plays them with the context. Both views of every transcript are built."""
        t0 = time.perf_counter()
        student_plays = self.cfg.algorithm.name == "opcd"
        episodes = play_episodes(
            self.student if student_plays else self.teacher_model, self.tokenizer, self.setup.games(len(batch.seeds)),
            batch.seeds, self._sampling(step), groups=self.groups, vocab_size=self.model_config.vocab_size,
            context=batch.contexts, act_with_context=not student_plays, between_steps=self.preempt.decode_check,
            **self.setup.render_kwargs)
        empty = [e.seed for e in episodes if not e.response_tokens]
        if empty:
            raise DataError(f"level {empty[0]}: the first turn (with the context) does not fit in the model's "
                            "positions; shorten the context or lower generation.max_new_tokens")
        self._last_episodes = episodes
        responses = [e.response_tokens for e in episodes]
        return GameRollout(batch, episodes, responses, time.perf_counter() - t0, sum(map(len, responses)))

    def score_micro_batch(self, rollout: GameRollout, rows: slice) -> Optional[torch.Tensor]:
        """(b) the teacher's logits on its view of each transcript of one micro-batch (the context
        in the first turn), aligned to the reply tokens; the common prefix is prefilled once."""
        from megatron_opcd.generation import score

        turns = [e.context_segments for e in rollout.episodes[rows]]
        # The shared prefix stops at the first reply: a cached prefix holds no trained token.
        n = min(len(common_prefix([flatten(r) for r in turns])), *(len(r[0][0]) for r in turns))
        prefix = flatten(turns[0])[:n]
        res = score(self.teacher_model, None, None, segments=[drop_prefix(r, n) for r in turns],
                    groups=self.groups, prefix=prefix or None, vocab_size=self.model_config.vocab_size,
                    pad_id=self.tokenizer.pad_id)
        return res.logits

    def train_step(self):
        result = super().train_step()
        result.metrics.update(self._episode_metrics(self._last_episodes))
        return result

    def _episode_metrics(self, episodes: list[Episode]) -> dict:
        stats = torch.tensor([sum(e.success for e in episodes), len(episodes), sum(e.rounds for e in episodes),
                              sum(e.invalid for e in episodes)], dtype=torch.float64)
        if self.groups.dp_size > 1:
            dist.all_reduce(stats, group=self.groups.dp_group)
        solved, n, rounds, invalid = stats.tolist()
        return {"success": solved / max(n, 1), "rounds": rounds / max(n, 1), "invalid_per_round": invalid / max(rounds, 1)}

    def evaluate(self, step: int) -> dict:
        """Success rate on the fixed evaluation levels: the student without the context, and (with
        game.eval_with_context) the teacher with the first context."""
        from megatron_opcd.evaluation.games import evaluate_game

        e = self.cfg.evaluation
        params = self._sampling(step, greedy=e.greedy, max_new_tokens=e.max_new_tokens, salt=17)
        kw = dict(groups=self.groups, sampling=params, vocab_size=self.model_config.vocab_size)
        was_training = self.student.training
        self.student.eval()
        try:
            r = evaluate_game(self.student, self.tokenizer, self.setup, self.eval_seeds, **kw)
            metrics = {"success": r["success"], "invalid_per_round": r["invalid_per_round"]}
            if self.cfg.game.eval_with_context and self.contexts:
                r = evaluate_game(self.teacher_model, self.tokenizer, self.setup, self.eval_seeds,
                                  context=self.contexts[0], **kw)
                metrics["success_with_context"] = r["success"]
        finally:
            self.student.train(was_training)
        self.logger.log(step, metrics, prefix="eval")
        return metrics
