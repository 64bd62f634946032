"""Games by name, and level files (the trainer's data.train for games).

A level file is JSONL, one level per line: {"game": "frozen_lake", "seed": 17, "prompt": <the
first user turn>}. The trainer streams its lines like prompts (shuffled per epoch, resumable)
and plays level `seed`; "prompt" is there for reading and for the length check of the first turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from megatron_opcd.envs.base import first_user_message
from megatron_opcd.envs.frozen_lake import FrozenLake
from megatron_opcd.envs.sokoban import Sokoban
from megatron_opcd.errors import DataError

GAMES = {"frozen_lake": FrozenLake, "sokoban": Sokoban}


def get_game(name: str, **kwargs):
    """A new game instance: `get_game("sokoban", max_rounds=5)`."""
    if name not in GAMES:
        raise ValueError(f"unknown game {name!r}; games are: {', '.join(sorted(GAMES))}")
    return GAMES[name](**kwargs)


def level_lines(name: str, seeds: Sequence[int], **kwargs) -> list[dict]:
    game = get_game(name, **kwargs)
    return [{"game": name, "seed": int(s), "prompt": first_user_message(game, game.reset(int(s)))} for s in seeds]


def write_levels(path: str | Path, name: str, seeds: Sequence[int], **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in level_lines(name, seeds, **kwargs)),
                    encoding="utf-8")
    return path


def read_level_seeds(path: str | Path, name: str) -> list[int]:
    """The seeds of a level file in line order (blank lines skipped, as `load_examples` does)."""
    seeds = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("seed"), int):
            raise DataError(f"{path}:{lineno}: a level line needs an integer \"seed\"; write level files with "
                            "`python -m megatron_opcd.envs`")
        if row.get("game", name) != name:
            raise DataError(f"{path}:{lineno}: a {row['game']!r} level, but game.name={name!r}")
        seeds.append(row["seed"])
    return seeds
