"""Sokoban as in the paper: a 6x6 room (walls on the border), one box, one target.

    # # # # # #      P  you           X  the box          O  the target
    # _ _ # _ #      #  wall          _  floor            √  the box on the target
    # _ X _ _ #                                           S  you on the target
    # P _ O _ #
    # _ _ _ _ #
    # # # # # #

Push the box onto the target: walking into the box pushes it one cell if the cell behind it is
free; you cannot pull. Moving into a wall, or pushing the box into a wall, is illegal (the round
is spent, nothing moves). Level `seed`: up to `max_inner_walls` inner walls, the target, the box
and the player drawn with `random.Random(seed)`, redrawn until the BFS solver needs between
`min_moves` and `max_rounds` moves (so every level is solvable within the episode). A box stuck
in a corner is not a loss: the rounds simply run out.
"""

from __future__ import annotations

import random
from typing import Optional

from megatron_opcd.envs.base import ANSWER_FORMAT, MOVES, GridGame
from megatron_opcd.envs.solver import shortest_solution

INSTRUCTIONS = (
    "You are playing Sokoban. The room is a grid: 'P' is you, 'X' is the box, 'O' is the target, "
    "'#' is a wall and '_' is floor ('√' is the box on the target, 'S' is you standing on the target). "
    "Push the box onto the target. Moving into the box pushes it one cell in the same direction if the "
    "cell behind it is free; you cannot pull the box or walk through walls. "
    f"Answer each turn with exactly one move written as {ANSWER_FORMAT}."
)


class Sokoban(GridGame):
    """State: (player, box, target, walls) with cells as (row, col); the border is walls too."""

    name = "sokoban"
    instructions = INSTRUCTIONS

    def __init__(self, size: int = 6, max_rounds: int = 5, min_moves: Optional[int] = None, max_inner_walls: int = 2):
        super().__init__(max_rounds)
        min_moves = min(2, max_rounds) if min_moves is None else min_moves
        if size < 4:
            raise ValueError(f"sokoban: size={size} must be >= 4 (a border wall around at least 2x2 floor)")
        if min_moves > max_rounds:
            raise ValueError(f"sokoban: min_moves={min_moves} > max_rounds={max_rounds}: no level qualifies")
        self.size, self.min_moves, self.max_inner_walls = size, min_moves, max_inner_walls

    def _generate(self, rng: random.Random):
        n = self.size
        inner = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1)]
        border = frozenset((r, c) for r in range(n) for c in range(n) if r in (0, n - 1) or c in (0, n - 1))
        for _ in range(10_000):
            k = rng.randint(0, self.max_inner_walls)
            target, box, player, *walls = rng.sample(inner, 3 + k)
            state = (player, box, target, border | frozenset(walls))
            plan = shortest_solution(self, state, self.max_rounds)
            if plan is not None and len(plan) >= self.min_moves:
                return state
        raise RuntimeError(f"sokoban: no level with a {self.min_moves}..{self.max_rounds}-move solution found")

    def transitions(self, state, action: str):
        player, box, target, walls = state
        dr, dc = MOVES[action]
        step = (player[0] + dr, player[1] + dc)
        if step in walls:
            return state, f"there is a wall {action} of you", "play"
        if step == box:
            behind = (box[0] + dr, box[1] + dc)
            if behind in walls:
                return state, f"the box cannot be pushed {action}: a wall is behind it", "play"
            nxt = (step, behind, target, walls)
            return nxt, None, "win" if behind == target else "play"
        return (step, box, target, walls), None, "play"

    def render(self, state) -> str:
        player, box, target, walls = state
        rows = []
        for r in range(self.size):
            row = []
            for c in range(self.size):
                cell = (r, c)
                if cell in walls:
                    row.append("#")
                elif cell == box:
                    row.append("√" if cell == target else "X")
                elif cell == player:
                    row.append("S" if cell == target else "P")
                else:
                    row.append("O" if cell == target else "_")
            rows.append(" ".join(row))
        return "\n".join(rows)
