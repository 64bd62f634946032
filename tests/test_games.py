"""Text games (issue 10): seeded levels, action parsing, solvable levels, multi-turn transcripts whose
loss mask is exactly the player's tokens, teacher/student alignment on every turn (with and without
a chat template), and one multi-turn OPCD step at TP=2 equal to TP=1."""

from __future__ import annotations

import pytest
import torch

from _games_ranks import VOCAB, game_step, make_game_run, make_game_tokenizer, played_alignment
from _layouts import merge
from megatron_opcd.data.packing import gather_response, pack_segments
from megatron_opcd.envs import GAMES, ScriptedPlayer, get_game, parse_action, shortest_solution
from megatron_opcd.errors import TemplateError
from megatron_opcd.generation.episodes import TurnRenderer, flatten, run_episodes


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_game_tokenizer(tmp_path_factory.mktemp("gametok"))


def _tokenizer(tok_dir, chat: bool):
    from megatron_opcd.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir / "hf" if chat else tok_dir / "tokenizer.model")


# ------------------------------------------------------------------------------------------------
# Environments


@pytest.mark.parametrize("name", sorted(GAMES))
def test_seeded_levels_are_reproducible_and_varied(name):
    a, b = get_game(name), get_game(name)
    first = [a.reset(s) for s in range(20)]
    assert first == [b.reset(s) for s in range(20)]
    assert len(set(first)) >= 15  # seeds are different levels


@pytest.mark.parametrize("name", sorted(GAMES))
def test_scripted_policy_solves_every_generated_level(name):
    game = get_game(name, max_rounds=5)
    for seed in range(100):
        game.reset(seed)
        plan = shortest_solution(game, game.state)
        assert plan is not None and 2 <= len(plan) <= 5, (seed, plan)
        player = ScriptedPlayer(game)
        while not game.done:
            result = game.step(player.reply())
        assert game.success and result.reward == 1.0 and game.rounds == len(plan) and game.invalid == 0


def test_action_parsing_valid_invalid_malformed():
    assert parse_action("I think [left] then... final: [Down]") == ("down", None)
    assert parse_action("<action> right </action>") == ("right", None)
    assert parse_action("[w]") == ("up", None) and parse_action("  Up. ") == ("up", None)
    for text in ("", "go north", "up or down", "[jump]"):
        action, error = parse_action(text)
        assert action is None and "[up], [down], [left] or [right]" in error

    lake = get_game("frozen_lake")
    lake.reset(0)
    (r, c), _, _ = lake.state
    off = "up" if r == 0 else "down" if r == 2 else "left" if c == 0 else "right"
    before = lake.state
    res = lake.step(f"[{off}]")  # illegal: off the lake
    assert not res.info["valid"] and "leave the lake" in res.info["error"] and lake.state == before
    res = lake.step("hmm")  # malformed: the round is spent, nothing moves
    assert not res.info["valid"] and lake.state == before and lake.rounds == 2 and lake.invalid == 2
    assert "Invalid move" in res.observation and "3 moves left" in res.observation

    soko = get_game("sokoban", max_rounds=1)
    soko.reset(3)
    res = soko.step("[up]")
    assert res.done and not soko.success and "Out of moves" in res.observation  # round budget


def test_falling_into_a_hole_ends_the_game():
    lake = get_game("frozen_lake")
    for seed in range(50):
        lake.reset(seed)
        (r, c), _, holes = lake.state
        for move, (dr, dc) in (("up", (-1, 0)), ("down", (1, 0)), ("left", (0, -1)), ("right", (0, 1))):
            if (r + dr, c + dc) in holes:
                res = lake.step(f"[{move}]")
                assert res.done and res.reward == 0.0 and not lake.success and "hole" in res.observation
                return
    pytest.fail("no level with a hole next to the start in 50 seeds")


# ------------------------------------------------------------------------------------------------
# Transcripts (a scripted policy: no model)


def _scripted(tok, replies):
    """A policy that answers round r with `replies[r % len]` (text, then EOS or not)."""

    def policy(seqs, rnd):
        text, eos = replies[rnd % len(replies)]
        ids = tok.encode(text) + ([tok.eos_ids[0]] if eos else [])
        return [list(ids) for _ in seqs], None

    return policy


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_transcript_loss_mask_is_exactly_the_players_tokens(tok_dir, chat):
    tok = _tokenizer(tok_dir, chat)
    assert tok.has_chat_template == chat
    replies = [("I move [down]", True), ("oops", False), ("[right]", True)]
    games = [get_game("frozen_lake", max_rounds=3) for _ in range(3)]
    episodes = run_episodes(_scripted(tok, replies), tok, games, [4, 5, 6], contexts="Holes are deadly.",
                            use_chat_template=True)
    for ep in episodes:
        played = [tok.encode(t) + ([tok.eos_ids[0]] if e else []) for t, e in replies[:ep.rounds]]
        assert ep.response_tokens == [t for r in played for t in r]
        assert [ids for ids, on in ep.segments if on] == played  # one trained segment per turn, as sampled
        assert [ids for ids, on in ep.context_segments if on] == played
        assert ep.invalid >= 1 and ep.rounds >= 2  # "oops" is malformed and spends its round
        for rows in (ep.segments, ep.context_segments):
            p = pack_segments([rows])
            n = int(p.response_mask.sum())
            assert p.response_tokens[:n, 0].tolist() == ep.response_tokens and n == len(ep.response_tokens)
            # Exactly the trained positions are in the mask: everything else is template or environment.
            positions = [pos for pos, on in enumerate(on for ids, on in rows for _ in ids) if on]
            assert (p.response_index[:n, 0] + 1).tolist() == positions


def test_chat_transcript_is_the_templates_rendering(tok_dir):
    """Replies that end their turn with EOS (and re-tokenise to themselves): the concatenated
    segments are the chat template's rendering of the conversation, turn by turn."""
    tok = _tokenizer(tok_dir, True)
    replies = [("I move [down]", True), ("[right]", True)]

    def in_context(text):  # the reply as the template tokenises it after the assistant header, EOS included
        empty = tok.apply_chat_template([{"role": "assistant", "content": ""}], add_generation_prompt=False)
        full = tok.apply_chat_template([{"role": "assistant", "content": text}], add_generation_prompt=False)
        return full[len(empty) - 1:]

    def policy(seqs, rnd):
        return [in_context(replies[rnd % 2][0]) for _ in seqs], None

    games = [get_game("frozen_lake", max_rounds=3) for _ in range(2)]
    episodes = run_episodes(policy, tok, games, [4, 5], contexts="Holes are deadly.")
    for ep in episodes:
        for view, head in (("segments", []), ("context_segments", [{"role": "system", "content": "Holes are deadly."}])):
            msgs = head + [{"role": "user", "content": f"{games[0].instructions}\n\n{ep.observations[0]}"}]
            for k in range(ep.rounds - 1):
                msgs += [{"role": "assistant", "content": replies[k % 2][0]},
                         {"role": "user", "content": ep.observations[k + 1]}]
            rendered = tok.apply_chat_template(msgs)
            flat = flatten(getattr(ep, view))
            assert flat[: len(rendered)] == rendered and ep.rounds >= 2


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_teacher_and_student_views_align_on_every_turn(tok_dir, chat):
    """A one-hot next-token oracle read through gather_response picks exactly the player's tokens
    in both views, row for row, although the teacher's rows are longer by the context."""
    tok = _tokenizer(tok_dir, chat)
    games = [get_game("sokoban", max_rounds=3) for _ in range(2)]
    episodes = run_episodes(_scripted(tok, [("[left]", True), ("[up] ok", False)]), tok, games, [1, 2],
                            contexts="A long context: push boxes from behind, never into corners.")
    for view in ("segments", "context_segments"):
        rows = [getattr(e, view) for e in episodes]
        p = pack_segments(rows)
        oracle = torch.nn.functional.one_hot(torch.roll(p.tokens, -1, dims=1), VOCAB).float()  # [b, S, V]
        picked = gather_response(oracle, p).argmax(-1)  # [R, b]
        for i, e in enumerate(episodes):
            assert picked[: len(e.response_tokens), i].tolist() == e.response_tokens
    s, t = pack_segments([e.segments for e in episodes]), pack_segments([e.context_segments for e in episodes])
    assert torch.equal(s.response_mask, t.response_mask) and torch.equal(s.response_tokens, t.response_tokens)
    assert (t.lengths > s.lengths).all()


class _RewritingTokenizer:
    """A template that drops earlier assistant turns (as some reasoning templates do)."""

    has_chat_template, eos_ids, name = True, [3], "rewriting"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        kept = [m for m in messages if m["role"] != "assistant"]
        return [ord(ch) % 97 for m in kept for ch in m["content"]] + [5]


def test_a_template_that_rewrites_history_is_refused():
    r = TurnRenderer(_RewritingTokenizer(), use_chat_template=True)
    r.start("rules and board")
    with pytest.raises(TemplateError, match="chat_template=none"):
        r.between([7, 3], "next board")


# ------------------------------------------------------------------------------------------------
# With a model


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_played_transcript_is_what_the_model_saw(run_ranks, tok_dir, chat):
    path = str(tok_dir / "hf") if chat else str(tok_dir / "tokenizer.model")
    r = run_ranks(played_alignment, 1, path, chat, timeout=300)[0]
    assert r["tokens"] > 10 and max(r["rounds"]) == 2
    assert r["gen_vs_score"] < 1e-4, r  # sampling log-probs == teacher-forced log-probs on every turn
    assert r["prefix_vs_full"] < 1e-4 and r["masks_equal"], r


@pytest.fixture(scope="module")
def game_steps(run_ranks, tok_dir, tmp_path_factory):
    cfg = str(make_game_run(tmp_path_factory.mktemp("gamerun"), tok_dir, chat=True))
    return {tp: run_ranks(game_step, tp, cfg, [f"parallel.tensor_model_parallel_size={tp}"], timeout=400)
            for tp in (1, 2)}


def test_multi_turn_opcd_step_tp2_equals_tp1(game_steps):
    ref_ranks, ranks = game_steps[1], game_steps[2]
    for r in ranks:
        assert r["responses"] == ref_ranks[0]["responses"] and r["eval"] == ref_ranks[0]["eval"]
    assert max(ref_ranks[0]["rounds"]) == 2  # multi-turn: some episode played two rounds
    ref, got = merge(ref_ranks), merge(ranks)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    for name, w in ref["weights"].items():
        rows = slice(0, VOCAB) if ("word_embeddings" in name or "output_layer" in name) else slice(None)
        torch.testing.assert_close(got["weights"][name][rows], w[rows], atol=1e-5, rtol=1e-5, msg=name)
    m, e = ref_ranks[0]["metrics"], ref_ranks[0]["eval"]
    assert {"success", "rounds", "invalid_per_round", "loss"} <= set(m) and 0.0 <= m["success"] <= 1.0
    assert m["grad_norm"] > 0 and m["loss"] > 0  # the step had something to compare
    assert {"success", "success_with_context"} <= set(e)


def test_game_config_is_loud(tmp_path, tok_dir):
    from megatron_opcd.errors import ConfigError
    from megatron_opcd.training.config import load_train_config

    cfg = make_game_run(tmp_path, tok_dir)
    assert load_train_config(str(cfg)).game.name == "frozen_lake"
    with pytest.raises(ConfigError, match="game.options"):
        load_train_config(str(cfg), ["game.options={num_holes: 9}"])
    with pytest.raises(ConfigError, match="game.name"):
        load_train_config(str(cfg), ["game.name=chess"])


def test_game_experience_accumulates_per_seed_and_selects():
    """extract_game_pool with a scripted player and a fake reflector: each seed plays the levels in
    its own order, sees its own experience so far, and the pool/selection code is the shared one."""
    from megatron_opcd.evaluation.experience import pool_contexts, select_best
    from megatron_opcd.evaluation.games import extract_game_pool
    from megatron_opcd.generation.episodes import GameSetup

    seen = []

    def play(levels, contexts, seed):
        seen.append(list(contexts))
        games = [get_game("frozen_lake") for _ in levels]
        policy = lambda seqs, rnd: ([[1] for _ in seqs], None)  # noqa: E731 - token 1 decodes to nothing useful
        tok = type("T", (), {"decode": staticmethod(lambda ids: "[down]"), "eos_ids": [3],
                             "encode": staticmethod(lambda s: [4] * len(s.split()))})()
        return run_episodes(policy, tok, games, levels, contexts=contexts, act_with_context=True,
                            use_chat_template=False)

    def complete(prompts, contexts, *, seed, phase):
        assert phase == "reflect" and all("OBSERVATION:" in p and "YOUR MOVE 1:" in p for p in prompts)
        return [f"- EXPERIENCE ITEM: lesson {seed} for seed-run {i}" for i in range(len(prompts))]

    runs = extract_game_pool(play, complete, GameSetup("frozen_lake"), list(range(4)), seeds=[0, 1],
                             count_tokens=lambda s: len(s.split()), reflect_template="{problem}\n{response}\n{grade}\n{experience}",
                             max_items_tokens=None)
    assert seen[0] == [None, None] and all(c is not None for c in seen[1])  # its own experience from step 2 on
    assert [len(r.items) for r in runs] == [4, 4]
    assert sorted(s.problem for s in runs[1].steps) == [0, 1, 2, 3]
    contexts = pool_contexts(runs)
    assert select_best(contexts, lambda c: float("seed-run 1" in c))[0] == 1
