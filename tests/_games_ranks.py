"""Fixtures and rank functions for the text-game tests (module level: pickled by reference into each rank)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import yaml

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VOCAB = 256


def make_game_tokenizer(folder: Path) -> Path:
    """A sentencepiece BPE trained on game text (rules, boards, moves), saved twice: tokenizer.model
    (plain, no chat template) and hf/ (an HF tokenizer with a small chat template)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_opcd.envs import ACTIONS, first_user_message, get_game

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = ["<|system|> <|user|> <|assistant|>"] * 20
    for name in ("frozen_lake", "sokoban"):
        game = get_game(name)
        for seed in range(30):
            lines.append(first_user_message(game, game.reset(seed)))
            while not game.done:
                move = rng.choice(ACTIONS)
                lines.append(f"I will move [{move}]")
                lines.append(game.step(f"[{move}]").observation)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2, hard_vocab_limit=False,
        split_by_whitespace=True,
    )
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder / "hf"))
    shutil.copy(folder / "tokenizer.model", folder / "hf" / "tokenizer.model")
    return folder


def model_section(hidden: int = 64) -> dict:
    return dict(num_layers=2, hidden_size=hidden, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                vocab_size=VOCAB, make_vocab_size_divisible_by=32, max_position_embeddings=512)


def make_game_run(root: Path, tok: Path, *, game: str = "frozen_lake", chat: bool = False) -> Path:
    """A tiny game-training config: 2-layer student, 2-layer frozen teacher (wider), 2 rounds of 4 tokens."""
    from megatron_opcd.envs import write_levels

    root.mkdir(parents=True, exist_ok=True)
    write_levels(root / "levels.jsonl", game, range(16))
    write_levels(root / "eval_levels.jsonl", game, range(1000, 1002))
    cfg = {
        "model": model_section(),
        "teacher": {"model": model_section(96), "seed": 99},
        "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "seed": 5},
        "data": {"train": str(root / "levels.jsonl"), "eval": str(root / "eval_levels.jsonl"),
                 "tokenizer": str(tok / "hf") if chat else str(tok / "tokenizer.model"),
                 "max_prompt_tokens": 400, "seed": 3},
        "context": {"text": "Experience: holes are deadly; plan the path first.", "placement": "system"},
        "game": {"name": game, "max_rounds": 2},
        "loss": {"topk": 16},
        "generation": {"max_new_tokens": 4, "temperature": 1.0},
        "optimizer": {"name": "sgd", "lr": 0.5, "clip_grad": 0.0},
        "schedule": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 2},
        "evaluation": {"max_new_tokens": 4, "num_prompts": 2},
        "checkpoint": {"save": None},
        "logging": {"tensorboard": False, "progress": False, "dir": str(root / "logs")},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def game_step(config_path: str, overrides: list[str]) -> dict:
    """One multi-turn OPCD step of the Trainer (its game source) at the config's layout, then one evaluation."""
    from _layouts import _full_weights
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.games import GameSource
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    trainer = Trainer(cfg, groups)
    assert isinstance(trainer.source, GameSource)  # chosen from the config's game: section
    result = trainer.train_step()
    episodes = trainer.last_rollout.episodes
    evaluation = trainer.evaluate(1)
    out = {"loss": result.metrics["loss"], "metrics": result.metrics, "eval": evaluation,
           "responses": [e.response_tokens for e in episodes], "rounds": [e.rounds for e in episodes],
           "weights": _full_weights(trainer.student, groups), "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank,
           "last": groups.is_last_stage, "tied": trainer.model_config.tie_embeddings, "grads": {}}
    trainer.logger.close()
    parallel.destroy()
    return out


def played_alignment(tok_path: str, chat: bool) -> dict:
    """A real tiny model plays 3 Sokoban episodes (2 rounds) with a context in the teacher view.
    Returns the largest differences of:
      gen_vs_score   the player's sampling log-probs vs the same model teacher-forced on the whole
                     multi-turn transcript (the transcript is exactly what it saw, every turn)
      prefix_vs_full the teacher's logits with the shared prefix cached (the trainer's path) vs
                     without any cache, on every reply token"""
    import torch

    from megatron_opcd import parallel
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.data.render import common_prefix
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.generation import SamplingParams, score
    from megatron_opcd.models import build_model
    from megatron_opcd.generation.episodes import GameSetup, drop_prefix, flatten, play_episodes

    groups = parallel.initialize(ParallelConfig())
    tok = load_tokenizer(tok_path)
    student = build_model(ModelConfig(**model_section()), "student", groups=groups, seed=1)
    teacher = build_model(ModelConfig(**model_section(96)), "teacher", groups=groups, seed=2)
    setup = GameSetup("sokoban", max_rounds=2, use_chat_template=chat, max_total_tokens=512)
    params = SamplingParams(max_new_tokens=5, temperature=1.0, eos_ids=tuple(tok.eos_ids), seed=11)
    episodes = play_episodes(student, tok, setup.games(3), [0, 1, 2], params, groups=groups, vocab_size=VOCAB,
                             context="Push from behind; never into a corner.", **setup.render_kwargs)
    s = score(student, None, None, segments=[e.segments for e in episodes], groups=groups, vocab_size=VOCAB,
              return_logprobs=True, pad_id=tok.pad_id)
    gen = torch.zeros_like(s.logprobs)
    for i, e in enumerate(episodes):
        gen[: len(e.logprobs), i] = torch.tensor(e.logprobs)
    rows = [e.context_segments for e in episodes]
    n = min(len(common_prefix([flatten(r) for r in rows])), *(len(r[0][0]) for r in rows))
    cached = score(teacher, None, None, segments=[drop_prefix(r, n) for r in rows], prefix=flatten(rows[0])[:n],
                   groups=groups, vocab_size=VOCAB, pad_id=tok.pad_id)
    full = score(teacher, None, None, segments=rows, groups=groups, vocab_size=VOCAB, pad_id=tok.pad_id)
    m = full.mask.bool()
    out = {"gen_vs_score": float(((gen - s.logprobs) * s.mask).abs().max()),
           "prefix_vs_full": float((cached.logits[m] - full.logits[m]).abs().max()),
           "masks_equal": bool(torch.equal(cached.mask, s.mask)),
           "tokens": int(s.mask.sum()), "rounds": [e.rounds for e in episodes],
           "episodes": [json.loads(json.dumps({"segments": e.segments, "context_segments": e.context_segments}))
                        for e in episodes]}
    parallel.destroy()
    return out
