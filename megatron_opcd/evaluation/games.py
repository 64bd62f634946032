"""Text games: success rate with and without the context, and experience from played episodes.

    evaluate_game(model, tokenizer, setup, seeds, groups=..., sampling=..., vocab_size=..., context=None)
        -> {"success", "n", "invalid_per_round", "rounds"}        (levels split over DP replicas)
    extract_game_pool(play, complete, setup, levels, seeds=..., ...) -> [ExperienceRun per seed]

Experience for games follows `evaluation.experience` (the same items, cap, pool and selection):
for each seed, the teacher plays the levels one after another with its experience so far as the
context; after each episode it reads the transcript and the outcome and writes "- EXPERIENCE
ITEM:" lines (megatron_opcd/prompts/experience_reflect.txt, {problem} = the rules and the first
board, {response} = the transcript). The seeds run in lock-step: one batched episode per step.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_opcd.evaluation.experience import ExperienceRun, ExperienceStep, NO_EXPERIENCE, _key, accumulate, parse_items
from megatron_opcd.generation.episodes import Episode, GameSetup, play_episodes
from megatron_opcd.parallel import dp_share



@torch.no_grad()
def evaluate_game(model, tokenizer, setup: GameSetup, seeds: Sequence[int], *, groups, sampling, vocab_size: int,
                  context: Optional[str] = None, batch_size: int = 64, return_episodes: bool = False) -> dict:
    """Success rate of `model` on levels `seeds`, playing without the context, or with `context`
    (the teacher's view). Each DP replica plays its share; every rank gets the totals."""
    seeds = list(seeds)[dp_share(len(seeds), groups.dp_rank, groups.dp_size)]
    episodes: list[Episode] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        params = dataclasses.replace(sampling, seed=sampling.seed + 1_000_003 * groups.dp_rank + start)
        episodes += play_episodes(model, tokenizer, setup.games(len(chunk)), chunk, params, groups=groups,
                                  vocab_size=vocab_size, context=context, act_with_context=context is not None,
                                  **setup.render_kwargs)
    counts = torch.tensor([sum(e.success for e in episodes), len(episodes), sum(e.invalid for e in episodes),
                           sum(e.rounds for e in episodes)], dtype=torch.float64)
    if groups.dp_size > 1:
        dist.all_reduce(counts, group=groups.dp_group)
    solved, n, invalid, rounds = counts.tolist()
    out = {"success": solved / n if n else float("nan"), "n": int(n),
           "invalid_per_round": invalid / rounds if rounds else float("nan"), "rounds": rounds / n if n else 0.0}
    if return_episodes:
        out["episodes"] = episodes
    return out


PlayFn = Callable[[list[int], list[Optional[str]], int], list[Episode]]
"""play(level seeds, contexts (None: none), seed) -> one episode per level, the player seeing its context."""


def model_player(model, tokenizer, setup: GameSetup, *, groups, sampling, vocab_size: int) -> PlayFn:
    def play(levels, contexts, seed):
        params = dataclasses.replace(sampling, seed=sampling.seed + seed)
        return play_episodes(model, tokenizer, setup.games(len(levels)), levels, params, groups=groups,
                             vocab_size=vocab_size, context=contexts, act_with_context=True, **setup.render_kwargs)

    return play


def extract_game_pool(play: PlayFn, complete, setup: GameSetup, levels: Sequence[int], *, seeds: Sequence[int],
                      count_tokens: Callable[[str], int], reflect_template: str,
                      max_items_tokens: Optional[int] = 1024, policy: str = "drop_oldest",
                      max_problems: Optional[int] = None,
                      log: Optional[Callable[[str], None]] = None) -> list[ExperienceRun]:
    """One `ExperienceRun` per seed: seed s plays `levels` in the order of `random.Random(s).shuffle`
    (see the module docstring). `complete(prompts, contexts, seed=, phase="reflect")` writes the
    reflections (an `evaluation.experience.ModelCompleter`)."""
    from megatron_opcd.envs import first_user_message, get_game
    from megatron_opcd.evaluation.templates import fill

    if not levels:
        raise ValueError("no levels to extract experience from")
    if not seeds:
        raise ValueError("extract_game_pool needs at least one seed")
    game = get_game(setup.name, max_rounds=setup.max_rounds, **setup.options)
    runs = [ExperienceRun(seed=int(s)) for s in seeds]
    orders = []
    for s in seeds:
        order = list(levels)
        random.Random(int(s)).shuffle(order)
        orders.append(order[:max_problems] if max_problems else order)
    for t in range(len(orders[0])):
        batch = [o[t] for o in orders]
        episodes = play(batch, [r.context or None for r in runs], 1000 * t)
        reflect = [
            fill(reflect_template, problem=first_user_message(game, game.reset(lvl)), response=ep.transcript(),
                 grade="solved (1.0)" if ep.success else "not solved (0.0)", experience=r.context or NO_EXPERIENCE)
            for lvl, ep, r in zip(batch, episodes, runs)
        ]
        texts = complete(reflect, [None] * len(runs), seed=1000 * t + 1, phase="reflect")
        for r, lvl, ep, text in zip(runs, batch, episodes, texts):
            before = set(map(_key, r.items))
            r.items, lost = accumulate(r.items, parse_items(text), max_tokens=max_items_tokens,
                                       count_tokens=count_tokens, policy=policy)
            r.dropped += lost
            r.steps.append(ExperienceStep(int(lvl), ep.transcript(), float(ep.success), text,
                                          [i for i in r.items if _key(i) not in before]))
        if log is not None:
            log(f"[experience] level {t + 1}/{len(orders[0])}: solved {sum(e.success for e in episodes)}/"
                f"{len(episodes)}, items per seed {[len(r.items) for r in runs]}")
    return runs
