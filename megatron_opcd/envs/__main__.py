"""`python -m megatron_opcd.envs --game frozen_lake --seeds 0:1024 --out train.jsonl [--show]`

Writes a level file (the trainer's data.train / data.eval for games); --show prints the first level."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from megatron_opcd.envs.registry import GAMES, level_lines, write_levels

    p = argparse.ArgumentParser(prog="python -m megatron_opcd.envs", description=__doc__)
    p.add_argument("--game", required=True, choices=sorted(GAMES))
    p.add_argument("--seeds", default="0:1024", help="A:B, the seeds A .. B-1 (a seed is a level)")
    p.add_argument("--max-rounds", type=int, default=5)
    p.add_argument("--options", default="{}", help="JSON object of game options, e.g. '{\"num_holes\": 2}'")
    p.add_argument("--out", default=None, help="the level file (JSONL); without it, print the first level")
    args = p.parse_args(argv)
    a, b = (int(x) for x in args.seeds.split(":"))
    kw = dict(json.loads(args.options), max_rounds=args.max_rounds)
    if args.out:
        print(f"wrote {write_levels(args.out, args.game, range(a, b), **kw)} ({b - a} levels)")
    else:
        print(level_lines(args.game, [a], **kw)[0]["prompt"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
