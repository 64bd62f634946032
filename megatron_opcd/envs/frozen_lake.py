"""Frozen Lake as in the paper: a 3x3 lake with 2 holes; walk from the start to the goal.

    P _ H        P  you          G  the goal
    _ H _        H  a hole       _  frozen (safe) ice
    _ _ G

Level `seed`: start, goal and holes drawn with `random.Random(seed)`, redrawn until the BFS
solver reaches the goal in at most `max_rounds` moves (and at least `min_moves`). Stepping into
a hole ends the game (lost); a move off the lake is illegal (the round is spent, nothing moves).
"""

from __future__ import annotations

import random
from typing import Optional

from megatron_opcd.envs.base import ANSWER_FORMAT, MOVES, GridGame
from megatron_opcd.envs.solver import shortest_solution

INSTRUCTIONS = (
    "You are playing Frozen Lake. The lake is a grid: 'P' is you, 'G' is the goal, 'H' is a hole and "
    "'_' is safe frozen ice. Reach the goal without falling into a hole; falling into a hole ends the game. "
    "Each move goes one cell up, down, left or right; you cannot leave the grid. "
    f"Answer each turn with exactly one move written as {ANSWER_FORMAT}."
)


class FrozenLake(GridGame):
    """State: (player, goal, holes) with cells as (row, col)."""

    name = "frozen_lake"
    instructions = INSTRUCTIONS
    lose_message = "You fell into a hole. Game over."

    def __init__(self, size: int = 3, num_holes: int = 2, max_rounds: int = 5, min_moves: Optional[int] = None):
        super().__init__(max_rounds)
        min_moves = min(2, max_rounds) if min_moves is None else min_moves
        if size < 2 or not 0 <= num_holes <= size * size - 3:
            raise ValueError(f"frozen_lake: size={size} needs >= 2 and num_holes={num_holes} in [0, size^2 - 3]")
        if min_moves > max_rounds:
            raise ValueError(f"frozen_lake: min_moves={min_moves} > max_rounds={max_rounds}: no level qualifies")
        self.size, self.num_holes, self.min_moves = size, num_holes, min_moves

    def _generate(self, rng: random.Random):
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        for _ in range(10_000):
            start, goal, *holes = rng.sample(cells, 2 + self.num_holes)
            state = (start, goal, frozenset(holes))
            plan = shortest_solution(self, state, self.max_rounds)
            if plan is not None and len(plan) >= self.min_moves:
                return state
        raise RuntimeError(f"frozen_lake: no level with a {self.min_moves}..{self.max_rounds}-move solution found")

    def transitions(self, state, action: str):
        (r, c), goal, holes = state
        dr, dc = MOVES[action]
        nr, nc = r + dr, c + dc
        if not (0 <= nr < self.size and 0 <= nc < self.size):
            return state, f"moving {action} would leave the lake", "play"
        nxt = ((nr, nc), goal, holes)
        if (nr, nc) in holes:
            return nxt, None, "lose"
        return nxt, None, "win" if (nr, nc) == goal else "play"

    def render(self, state) -> str:
        player, goal, holes = state
        rows = []
        for r in range(self.size):
            row = []
            for c in range(self.size):
                cell = (r, c)
                row.append("P" if cell == player else "H" if cell in holes else "G" if cell == goal else "_")
            rows.append(" ".join(row))
        return "\n".join(rows)

    @property
    def position(self) -> Optional[tuple[int, int]]:
        return None if self.state is None else self.state[0]
