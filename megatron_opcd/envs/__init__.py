"""Text games for multi-turn OPCD: Frozen Lake (3x3, 2 holes) and Sokoban (6x6, one box).

    game = get_game("frozen_lake", max_rounds=5)
    observation = game.reset(seed)                 a seed is a level
    result = game.step(reply_text)                 StepResult(observation, reward, done, info)

Written here rather than taken from TextArena or gymnasium: see docs/games.md.
"""

from megatron_opcd.envs.base import ACTIONS, StepResult, TextGame, first_user_message, parse_action
from megatron_opcd.envs.frozen_lake import FrozenLake
from megatron_opcd.envs.registry import GAMES, get_game, read_level_seeds, write_levels
from megatron_opcd.envs.sokoban import Sokoban
from megatron_opcd.envs.solver import ScriptedPlayer, shortest_solution

__all__ = ["ACTIONS", "GAMES", "FrozenLake", "ScriptedPlayer", "Sokoban", "StepResult", "TextGame",
           "first_user_message", "get_game", "parse_action", "read_level_seeds", "shortest_solution", "write_levels"]
