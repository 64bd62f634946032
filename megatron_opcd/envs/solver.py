"""Breadth-first search over a game's own transition function: the shortest winning move list.

The level generators use it to keep only levels solvable within the round budget, and tests use
`ScriptedPlayer` (replies "[move]" along the BFS plan) to show that generated levels are solved.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Optional

from megatron_opcd.envs.base import ACTIONS


def shortest_solution(game, state: Hashable, max_moves: Optional[int] = None) -> Optional[list[str]]:
    """The shortest list of moves from `state` to a win under `game.transitions` (illegal moves
    and losing moves are never taken); None if there is none within `max_moves`."""
    parent: dict[Hashable, tuple[Hashable, str]] = {}
    seen = {state}
    frontier = deque([(state, 0)])
    while frontier:
        s, depth = frontier.popleft()
        if max_moves is not None and depth >= max_moves:
            continue
        for action in ACTIONS:
            nxt, error, outcome = game.transitions(s, action)
            if error is not None or outcome == "lose" or nxt in seen:
                continue
            parent[nxt] = (s, action)
            if outcome == "win":
                plan = [action]
                while s != state:
                    s, a = parent[s]
                    plan.append(a)
                return plan[::-1]
            seen.add(nxt)
            frontier.append((nxt, depth + 1))
    return None


class ScriptedPlayer:
    """Plays a game by its BFS plan from the current state (re-planned every round)."""

    def __init__(self, game):
        self.game = game

    def reply(self) -> str:
        plan = shortest_solution(self.game, self.game.state)
        return f"I will move [{plan[0]}]" if plan else "[up]"
