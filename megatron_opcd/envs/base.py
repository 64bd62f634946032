"""What a text game is to the trainer: `reset(seed) -> observation`, `step(action_text) -> StepResult`.

A game is a small deterministic state machine with a text face. The student's whole reply of a
round is handed to `step`; the game finds the action in it (`parse_action`), applies it and
answers with the next observation. Every round counts, whatever the reply held:

    valid action        the move is applied (info["valid"] = True)
    illegal action      a parsed action the rules forbid (into a wall, a box against a wall):
                        the board stays, the observation says why (info["valid"] = False)
    unparseable reply   no action found: the board stays, the observation says how to answer
                        (info["valid"] = False, info["error"] names the problem)

The episode ends on success (reward 1), on a loss (a hole; reward 0) or after `max_rounds`
rounds (reward 0). Levels come from `random.Random(seed)` only, so a seed is a level.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Hashable, Optional, Protocol, runtime_checkable

ACTIONS = ("up", "down", "left", "right")
ALIASES = {"w": "up", "s": "down", "a": "left", "d": "right"}
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ANSWER_FORMAT = "[up], [down], [left] or [right]"

# "[up]", "[ W ]", "<action>left</action>": the last one in the reply is the move (reasoning
# models mention moves before they choose one).
_TAGGED = re.compile(r"\[\s*(up|down|left|right|w|a|s|d)\s*\]|<action>\s*(up|down|left|right|w|a|s|d)\s*</action>",
                     re.IGNORECASE)
_BARE = re.compile(r"^\W*(up|down|left|right)\W*$", re.IGNORECASE)


def parse_action(text: str) -> tuple[Optional[str], Optional[str]]:
    """(action, None) for the last "[dir]" / "<action>dir</action>" in `text`, or a reply that is
    only a direction word; (None, error) otherwise. WASD keys are accepted inside brackets."""
    found = _TAGGED.findall(text)
    if found:
        raw = (found[-1][0] or found[-1][1]).lower()
        return ALIASES.get(raw, raw), None
    bare = _BARE.match(text.strip())
    if bare:
        return bare.group(1).lower(), None
    if not text.strip():
        return None, f"the reply was empty; answer with one of {ANSWER_FORMAT}"
    return None, f"no action found in the reply; answer with one of {ANSWER_FORMAT}"


@dataclass
class StepResult:
    observation: str
    """What the player reads next (the final message when `done`)."""
    reward: float
    """1.0 on the move that solves the level, else 0.0."""
    done: bool
    info: dict = field(default_factory=dict)
    """{"valid": bool, "error": str | None, "action": str | None}."""


@runtime_checkable
class TextGame(Protocol):
    name: str
    max_rounds: int
    instructions: str
    """The rules and the answer format (the start of the first user turn)."""

    def reset(self, seed: int) -> str:
        """Generate level `seed`; returns the first observation."""

    def step(self, action_text: str) -> StepResult:
        """Play one round with the player's whole reply."""

    @property
    def success(self) -> bool: ...

    @property
    def done(self) -> bool: ...


class GridGame:
    """The round bookkeeping shared by the grid games. A subclass defines the level (`_generate`),
    the rules as a transition function (`transitions`), and the board text (`render`). The same
    transition function drives play, the generator's solvability check and the BFS solver."""

    name = "grid"
    instructions = ""

    def __init__(self, max_rounds: int = 5):
        if max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} must be >= 1")
        self.max_rounds = max_rounds
        self.state: Hashable = None
        self.rounds = 0
        self.invalid = 0
        self._done = False
        self._success = False

    # --- what a game defines -------------------------------------------------------------------
    def _generate(self, rng: random.Random) -> Hashable:
        """A random start state (the generator's checks included)."""
        raise NotImplementedError

    def transitions(self, state: Hashable, action: str) -> tuple[Hashable, Optional[str], str]:
        """(next state, error or None if the move is illegal, outcome: "play" | "win" | "lose")."""
        raise NotImplementedError

    def render(self, state: Hashable) -> str:
        raise NotImplementedError

    # --- play ------------------------------------------------------------------------------------
    def reset(self, seed: int) -> str:
        self.seed = int(seed)
        self.state = self._generate(random.Random(self.seed))
        self.rounds, self.invalid, self._done, self._success = 0, 0, False, False
        return f"Current board:\n{self.render(self.state)}\nYou have {self.max_rounds} moves. Your move?"

    @property
    def success(self) -> bool:
        return self._success

    @property
    def done(self) -> bool:
        return self._done

    def step(self, action_text: str) -> StepResult:
        if self._done:
            raise RuntimeError("the episode is over; call reset(seed) first")
        self.rounds += 1
        action, error = parse_action(action_text)
        outcome = "play"
        if action is not None:
            nxt, error, outcome = self.transitions(self.state, action)
            if error is None:
                self.state = nxt
        if error is not None:
            self.invalid += 1
            head = f"Invalid move: {error}. The board is unchanged."
        else:
            head = f"You moved {action}."
        info = {"valid": error is None, "error": error, "action": action}
        board = f"Current board:\n{self.render(self.state)}"
        if outcome == "win":
            self._done = self._success = True
            return StepResult(f"{head}\n{board}\nYou solved the level!", 1.0, True, info)
        if outcome == "lose":
            self._done = True
            return StepResult(f"{head}\n{board}\n{self.lose_message}", 0.0, True, info)
        left = self.max_rounds - self.rounds
        if left <= 0:
            self._done = True
            return StepResult(f"{head}\n{board}\nOut of moves: the level is not solved. Game over.", 0.0, True, info)
        return StepResult(f"{head}\n{board}\nYou have {left} move{'s' if left > 1 else ''} left. Your move?",
                          0.0, False, info)

    lose_message = "Game over."


def first_user_message(game: TextGame, observation: str) -> str:
    """The first user turn of an episode: the rules, then the first board."""
    return f"{game.instructions}\n\n{observation}"
