"""The step's phases at a cluster's settings (issue 17): one micro-batch path for prompts and
games, teacher logits for one micro-batch at a time, the rendered context prefilled once a run."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from _train_fixtures import make_run
from _train_ranks import teacher_accounting


def _fake_trainer(device: str):
    """What the micro-batch path reads of a trainer, with the student's weights on `device`."""
    return SimpleNamespace(groups=SimpleNamespace(tp_size=1, sequence_parallel=False), tokenizer=SimpleNamespace(pad_id=0),
                           student=torch.nn.Linear(2, 2, device=device), _micro_slices=lambda n: [slice(0, 1), slice(1, 2)])


def test_game_and_prompt_rollouts_take_one_micro_batch_path():
    """A game's transcripts and a prompt run's rows go through `Trainer._micro_batches`, the one
    place a packed batch moves to the model's device: with the student on another device ("meta"
    here, on a CPU-only box) every packed tensor is there (the game trainer's own copy left them
    on the host, so a game run crashed on a GPU). There is one trainer: the game is its source."""
    import megatron_opcd.training.games as games
    from megatron_opcd.training.games import GameRollout
    from megatron_opcd.training.sources import PromptBatch, PromptRollout
    from megatron_opcd.training.trainer import Trainer

    assert not hasattr(games, "GameTrainer") and Trainer.__subclasses__() == []
    episodes = [SimpleNamespace(segments=[([5, 6, 7], False), ([8, 9], True), ([10], False), ([11], True)]),
                SimpleNamespace(segments=[([5, 6], False), ([12], True)])]
    game = GameRollout(batch=None, episodes=episodes, responses=[[8, 9, 11], [12]], seconds=0.0, new_tokens=4)
    prompts = PromptRollout(PromptBatch([], [], [[5, 6, 7], [5, 6]], []), responses=[[8, 9], [12]], logprobs=[],
                            seconds=0.0, new_tokens=3)
    for rollout in (game, prompts):
        teacher = [lambda: None, lambda: None]
        micro = Trainer._micro_batches(_fake_trainer("meta"), rollout, teacher)
        assert len(micro) == 2
        for m in micro:
            for name in ("tokens", "position_ids", "attention_mask", "response_index", "response_mask"):
                assert getattr(m.packed, name).device.type == "meta", name
    # On the host the same path packs what pack_segments packs: the game's trained tokens only.
    host = Trainer._micro_batches(_fake_trainer("cpu"), game, [lambda: None, lambda: None])
    assert host[0].packed.response_tokens[:, 0].tolist() == [8, 9, 11]


def test_teacher_logits_live_one_micro_batch_and_context_prefilled_once(run_ranks, tmp_path):
    """micro_batch_size 1, 4 micro-batches, one fixed context, a frozen teacher, two steps: the
    teacher's context is prefilled exactly once in the run (it was prefilled for every
    micro-batch: a one-row micro-batch's common prefix is its whole prompt), and at no time are
    more than one micro-batch's teacher logits alive (they were held for the whole step)."""
    cfg = str(make_run(tmp_path, steps=2, extra={"checkpoint.save": None, "logging.dir": str(tmp_path / "logs"),
                                                 "schedule.micro_batch_size": 1}))
    got = run_ranks(teacher_accounting, 1, cfg, [], timeout=300)[0]
    assert got["num_micro"] == 4 and got["scored"] == 8
    assert got["prefills"] == 1, got
    assert got["peak"] == got["largest"] > 0, got
    assert all(x == x for x in got["losses"])


def test_teacher_prefix_is_the_rendered_context_or_the_common_prefix(monkeypatch):
    """The one shared-prefix helper of rollouts, teacher scoring and the held-out KL: rows with one
    context share its rendered tokens (checked against the rows), rows with different contexts their
    common prefix; each prefix is prefilled once, a few are kept (oldest out first), clear() drops them."""
    import megatron_opcd.generation as generation
    from megatron_opcd.generation.prefix import TeacherPrefix

    prefilled = []
    monkeypatch.setattr(generation, "prefill_prefix", lambda model, ids, groups: prefilled.append(ids) or tuple(ids))
    renderer = SimpleNamespace(context_prefix=lambda ctx: [1, 2, 3])
    prefixes = TeacherPrefix(renderer, groups=None, entries=2)
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    assert prefixes.tokens(rows, ["c", "c"]) == [1, 2, 3]  # the context's, not the longer common [1, 2, 3, 4]
    assert prefixes.tokens([[1, 2, 9], [1, 2, 8]], ["c", "c"]) == [1, 2]  # a row that does not start with it
    assert prefixes.tokens(rows, ["c", "d"]) == [1, 2, 3, 4]
    assert prefixes.tokens([[1, 2]], ["c"]) == [1]  # one token of every row is left
    cache, rest = prefixes.split(None, rows, ["c", "c"])
    assert cache == (1, 2, 3) and rest == [[4, 5], [4, 6]]
    prefixes.split(None, rows, ["c", "c"])
    assert prefilled == [[1, 2, 3]]  # reused
    prefixes.cache(None, [7]), prefixes.cache(None, [8]), prefixes.cache(None, [1, 2, 3])
    assert prefilled == [[1, 2, 3], [7], [8], [1, 2, 3]]  # two kept: [1, 2, 3] was the oldest
    assert prefixes.cache(None, []) is None
    prefixes.clear()
    prefixes.cache(None, [8])
    assert prefilled[-1] == [8]
