"""The trainer's `game:` section (a YAML with one is trained by the Trainer with `training.games.GameSource`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_opcd.errors import ConfigError


@dataclass
class GameConfig:
    """Multi-turn OPCD on a text game: data.train (and data.eval) are level files
    (`python -m megatron_opcd.envs --game NAME --seeds A:B --out FILE`); generation.max_new_tokens
    is the limit per turn."""

    name: Literal["frozen_lake", "sokoban"] = "frozen_lake"
    """Which game (megatron_opcd.envs)."""

    max_rounds: int = 5
    """Turns per episode (the paper: 5)."""

    options: dict = field(default_factory=dict)
    """Keyword arguments of the game (frozen_lake: size, num_holes, min_moves; sokoban: size,
    min_moves, max_inner_walls)."""

    eval_seed: int = 1_000_000
    """Without data.eval, evaluation plays levels eval_seed .. eval_seed + evaluation.num_prompts - 1."""

    eval_with_context: bool = True
    """Also measure the success rate with the context (the teacher's view) at each evaluation."""

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ConfigError(f"game.max_rounds={self.max_rounds} must be >= 1")
        from megatron_opcd.envs.registry import get_game

        try:
            get_game(self.name, max_rounds=self.max_rounds, **self.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"game.options {self.options}: {exc}") from None
