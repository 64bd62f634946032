"""Tiny inputs for trainer tests, built in code: a sentencepiece tokenizer trained in-process,
prompt JSONL files and a YAML config for a 2-layer model (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

WORDS = ("apple river stone cloud green quick seven paper light music table window garden silver "
         "orange bridge forest winter summer yellow rabbit castle rocket planet ocean mountain").split()


def make_tokenizer(folder: Path, vocab_size: int = 200) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += ["Ahoy! " + line for line in lines[:50]] + ["Question: what is " + w + "?" for w in WORDS]
    text = folder / "corpus.txt"
    text.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
    )
    text.unlink()
    return folder / "tokenizer.model"


def make_prompts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": "Question: what is " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) + "?"}) + "\n")
    return path


def make_run(root: Path, *, tp: int = 1, pp: int = 1, steps: int = 2, algorithm: str = "opcd",
             teacher: str = "frozen", extra: dict | None = None) -> Path:
    """A config file for a tiny run under `root`; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    tok = root / "tok" / "tokenizer.model"
    if not tok.exists():
        make_tokenizer(root / "tok")
    train = make_prompts(root / "train.jsonl", 32)
    evals = make_prompts(root / "eval.jsonl", 8, seed=1)
    model = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 vocab_size=200, make_vocab_size_divisible_by=32, max_position_embeddings=128)
    cfg = {
        "model": model,
        "teacher": "self" if teacher == "self" else {"model": dict(model, hidden_size=96, num_attention_heads=4), "seed": 99},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "seed": 5},
        "data": {"train": str(train), "eval": str(evals), "tokenizer": str(tok), "max_prompt_tokens": 48, "seed": 3},
        "context": {"text": "Always answer with the word apple.", "placement": "user_prefix"},
        "algorithm": {"name": algorithm},
        "loss": {"topk": 16},
        "generation": {"max_new_tokens": 6, "temperature": 1.0},
        "optimizer": {"lr": 1e-3, "clip_grad": 1.0},
        "schedule": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2},
        "checkpoint": {"save": str(root / "ckpt"), "interval": 0, "keep_last": 2},
        "logging": {"tensorboard": False, "progress": False},
    }
    for key, value in (extra or {}).items():
        section, field = key.split(".", 1)
        cfg.setdefault(section, {})[field] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
