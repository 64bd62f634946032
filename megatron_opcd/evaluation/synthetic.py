"""A toy task where a context line decides the output, and a tiny model pre-trained on it in
seconds: a fallback for tests and CI that need a model that *does something* with its context,
without downloading one.

    prompt   "4213="           (3-5 digits, then "=")
    no context       -> "4213"  (copy)
    context "R:sort" -> "1234"  (sort); the teacher sees "R:sort|4213=" (context, separator "|", prompt)

The student (no context) copies; the teacher (with the context) sorts. On-policy context
distillation should move the student toward sorting without the context: its KL to the teacher
on held-out prompts goes down and its agreement with the teacher goes up.

    art = pretrain_synthetic_model("runs/synthetic")   # tens of seconds on one CPU core
    art.checkpoint      runs/synthetic/checkpoint      model_config.yaml + model/ + tokenizer/
    art.train_file      runs/synthetic/train.jsonl     {"prompt": "4213=", "answer": "1234"}
    art.eval_file       runs/synthetic/eval.jsonl      held-out prompts (not in train.jsonl)
    art.context         "R:sort"                       (also in context.txt)
    art.config          runs/synthetic/opcd.yaml       `python -m megatron_opcd.train --config` it

    python -m megatron_opcd.evaluation.synthetic --out runs/synthetic

The tokenizer is a character-level sentencepiece model (so any split of a string into pieces
tokenises the same way), trained in-process on the alphabet. Pre-training is a plain
single-process loop (torch.optim.AdamW) on the megatron-core GPTModel of
`megatron_opcd.models.build_model`; it needs a single-rank layout (TP = PP = DP = 1).
Caveat measured on the prototype: OPCD is learning-rate sensitive on this toy and off-policy
distillation can beat it on such a deterministic task; nothing here promises a ranking.
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_opcd.config import set_dotted
from megatron_opcd.errors import ConfigError
from megatron_opcd.evaluation.tasks import DIGITS, SEPARATOR, apply_rule, digits_of

CONTEXT = "R:sort"
PROMPT_END = "="
ALPHABET = DIGITS + CONTEXT + SEPARATOR + PROMPT_END
MIN_LEN, MAX_LEN = 3, 5

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
             make_vocab_size_divisible_by=8, max_position_embeddings=64, init_method_std=0.02)


def random_digits(rng: random.Random) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_prompts(n: int, seed: int, exclude: frozenset = frozenset()) -> list[str]:
    """`n` distinct prompts ("4213=") not in `exclude`, reproducibly."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        p = random_digits(rng) + PROMPT_END
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(folder: str | Path) -> Path:
    """A character-level sentencepiece model over ALPHABET in `folder`/tokenizer.model
    (<unk>=0, </s>=1, no BOS, no pad: pad falls back to EOS)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ALPHABET] * 8), model_writer=buf, model_type="char",
        vocab_size=len(set(ALPHABET)) + 2, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------
# Pre-training


@dataclass
class SyntheticArtifacts:
    root: Path
    checkpoint: Path
    tokenizer_dir: Path
    train_file: Path
    eval_file: Path
    context_file: Path
    config: Path
    context: str = CONTEXT
    separator: str = SEPARATOR
    metrics: dict = field(default_factory=dict)


def synthetic_batch(rng: random.Random, tok, size: int, sort_fraction: float = 0.5) -> list[tuple[list[int], int]]:
    """`size` rows (token ids of [context|]prompt + response + EOS, index where the response starts)."""
    rows = []
    for _ in range(size):
        digits = random_digits(rng)
        with_context = rng.random() < sort_fraction
        prompt = (CONTEXT + SEPARATOR if with_context else "") + digits + PROMPT_END
        response = apply_rule(digits, "sort" if with_context else "copy")
        p, r = tok.encode(prompt), tok.encode(response) + [tok.eos_ids[0]]
        rows.append((p + r, len(p)))
    return rows


def train_responses(model, vocab_size: int, make_batch: Callable[[random.Random], list[tuple[list[int], int]]], *,
                    steps: int, lr: float, seed: int, log: Optional[Callable[[str], None]] = None) -> dict:
    """Teacher-forced cross-entropy on the response tokens of `make_batch(rng)` rows (see
    `synthetic_batch`), AdamW with a short warmup and linear decay; single process."""
    import torch
    import torch.nn.functional as F

    from megatron_opcd.data.packing import causal_padding_mask

    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    t0, loss_value = time.perf_counter(), float("nan")
    for step in range(steps):
        rows = make_batch(rng)
        batch_size = len(rows)
        length = max(len(r) for r, _ in rows)
        tokens = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)  # -100: not a response token
        for i, (ids, start) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
            labels[i, start - 1 : len(ids) - 1] = torch.tensor(ids[start:])  # position t predicts t+1
        lengths = torch.tensor([len(r) for r, _ in rows])
        positions = torch.arange(length)[None].expand(batch_size, length)
        logits = model(tokens, positions, causal_padding_mask(lengths, length))  # [b, s, v_padded]
        loss = F.cross_entropy(logits[..., :vocab_size].float().reshape(-1, vocab_size), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"[synthetic] step {step:4d}  loss {loss_value:.4f}  {time.perf_counter() - t0:.1f}s")
    model.eval()
    return {"final_loss": loss_value, "pretrain_seconds": time.perf_counter() - t0, "steps": steps}


def opcd_config(art: SyntheticArtifacts, **overrides) -> dict:
    """A trainer config (as a dict) for OPCD on the synthetic task: student and frozen teacher from
    the pre-trained checkpoint, the rule as the teacher's context, exact KL over the tiny vocab."""
    cfg = {
        "teacher": {"mode": "frozen", "checkpoint": str(art.checkpoint)},
        "data": {"train": str(art.train_file), "eval": str(art.eval_file), "chat_template": "none",
                 "max_prompt_tokens": 16, "max_context_tokens": 16},
        "context": {"text": art.context, "separator": art.separator},
        "algorithm": {"name": "opcd"},
        "loss": {"topk": None},
        "generation": {"max_new_tokens": 8, "temperature": 1.0},
        "optimizer": {"lr": 3e-4, "clip_grad": 1.0},
        "schedule": {"steps": 20, "global_batch_size": 16, "micro_batch_size": 16},
        "checkpoint": {"pretrained": str(art.checkpoint), "save": str(art.root / "opcd"), "save_at_end": False},
        "logging": {"dir": str(art.root / "opcd"), "tensorboard": False, "progress": False},
        "evaluation": {"interval": 20, "task": "synthetic", "task_args": {"rule": "sort"}, "num_prompts": 32,
                       "max_new_tokens": 8, "greedy": True},
    }
    for dotted, value in overrides.items():
        set_dotted(cfg, dotted.split("."), value, f"opcd_config({dotted}=...)")
    return cfg


def pretrain_synthetic_model(out_dir: str | Path, *, steps: int = 250, batch_size: int = 48, lr: float = 3e-3,
                             seed: int = 0, n_train: int = 256, n_eval: int = 64, sort_fraction: float = 0.5,
                             model_overrides: Optional[dict] = None,
                             log: Optional[Callable[[str], None]] = print) -> SyntheticArtifacts:
    """Pre-train the toy model and write everything OPCD needs into `out_dir` (see the module
    docstring). Uses the current `megatron_opcd.parallel` groups, or creates a single-process
    group for the duration of the call."""
    import torch
    import yaml

    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import save_checkpoint
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.models import build_model

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    own_groups = not parallel.is_initialized()
    groups = parallel.initialize() if own_groups else parallel.groups()
    try:
        if (groups.tp_size, groups.pp_size, groups.dp_size) != (1, 1, 1):
            raise ConfigError(f"pretrain_synthetic_model runs on one rank; got TP={groups.tp_size} "
                              f"PP={groups.pp_size} DP={groups.dp_size}")
        tok_dir = root / "tokenizer"
        train_tokenizer(tok_dir)
        tok = load_tokenizer(tok_dir)
        cfg = ModelConfig(**{**MODEL, **(model_overrides or {}), "vocab_size": tok.vocab_size})
        torch.manual_seed(seed)
        model = build_model(cfg, "student", groups=groups, seed=seed)
        metrics = train_responses(model, cfg.vocab_size,
                                  lambda rng: synthetic_batch(rng, tok, batch_size, sort_fraction),
                                  steps=steps, lr=lr, seed=seed, log=log)
        ckpt = save_checkpoint(root / "checkpoint", model, cfg, tokenizer_dir=tok_dir,
                               meta={"synthetic": {"context": CONTEXT, "separator": SEPARATOR, **metrics}})
    finally:
        if own_groups:
            parallel.destroy()
    train_prompts = make_prompts(n_train, seed + 1)
    eval_prompts = make_prompts(n_eval, seed + 2, exclude=frozenset(train_prompts))
    for name, prompts in (("train.jsonl", train_prompts), ("eval.jsonl", eval_prompts)):
        with open(root / name, "w", encoding="utf-8") as fh:
            for p in prompts:
                fh.write(json.dumps({"prompt": p, "answer": apply_rule(digits_of(p), "sort")}) + "\n")
    (root / "context.txt").write_text(CONTEXT + "\n", encoding="utf-8")
    art = SyntheticArtifacts(root=root, checkpoint=ckpt, tokenizer_dir=tok_dir, train_file=root / "train.jsonl",
                             eval_file=root / "eval.jsonl", context_file=root / "context.txt",
                             config=root / "opcd.yaml", metrics=metrics)
    (root / "opcd.yaml").write_text(yaml.safe_dump(opcd_config(art), sort_keys=False), encoding="utf-8")
    return art


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m megatron_opcd.evaluation.synthetic",
                                description="Pre-train the synthetic sort/copy model and write OPCD inputs.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from megatron_opcd.compat import enable_cpu

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    art = pretrain_synthetic_model(args.out, steps=args.steps, seed=args.seed)
    print(f"checkpoint {art.checkpoint}\ntrain {art.train_file}\neval {art.eval_file}\ncontext {art.context!r}\n"
          f"run OPCD: python -m megatron_opcd.train --config {art.config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
