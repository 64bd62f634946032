"""One OPCD training step against TRL's GKD and SDFT trainers, and the cost of the teacher's shared context.

    pip install -e '.[bench]'                       # trl==1.16.0 (transformers, datasets, accelerate)
    .venv/bin/python benchmarks/bench_step.py        # ~8 minutes on 2 busy cores
    .venv/bin/python benchmarks/bench_step.py --quick

(a) vs_trl: generated response tokens per second of a whole training step (rollout, teacher
    logits, loss, backward, clipped Adam step) of our `Trainer.train_step()` against TRL's
    `GKDTrainer` (trl.experimental.gkd; `lmbda=1.0`: every step on-policy, `beta=1.0`: reverse KL
    over the full vocabulary), run by `GKDTrainer.train()` itself, on the same model, teacher,
    prompts and lengths:
      - a random Llama (4 layers, hidden 256, 4 heads / 2 KV heads, ffn 688, vocab 8192, tied
        embeddings, fp32) built with transformers; TRL trains it, ours gets the same weights
        (megatron_opcd.convert); the frozen teacher is a second random Llama of the same shape,
        in both;
      - 8 prompts per step, every prompt exactly 32 tokens after the chat template (no padding on
        either side), 64 sampled tokens per response at temperature 1 (top-k/top-p off);
      - no EOS on either side, so every response has exactly 64 tokens: HF's generation config has
        no eos_token_id, and our trainer's tokenizer gets `eos_ids = []` (the same as
        min_new_tokens = max_new_tokens for both);
      - (almost) no context: GKD's teacher sees what the student sees; our trainer requires a
        context, so it gets a one-word system message (3 teacher-only tokens, scored through the
        shared-prefix path like any context);
      - ours as a user runs it: reverse KL over the student's top-256 (loss.topk default; the
        headline), and loss.topk=null (exact, full vocabulary: the loss GKD computes) for reference;
        one micro-batch of 8 (TRL does one forward of 8);
      - TRL: fp32 (bf16=False) and gradient_checkpointing=False (TRL's defaults are bf16 and
        checkpointing; checkpointing also turns off the KV cache in GKD's generation), AdamW, lr
        1e-6, max_grad_norm 1.0 (ours: Adam, lr 1e-6, clip 1.0);
      - TRL's SDFTTrainer too (trl.experimental.sdft, Shenfeld et al. 2026: on-policy
        self-distillation whose teacher sees a privileged context; `--no-sdft` skips it), the
        trainer whose algorithm is OPCD's: `distillation_alpha=1.0` (reverse KL) over the
        student's top-256 (`distillation_topk=256`), renormalised over it
        (`distillation_add_tail=False`), one generation per prompt, SDFT's default "base" teacher
        (a frozen copy of the initial student). Its privileged context is the word "w1" before the
        prompt in the user turn (template "{privileged_context}\n\n{prompt}"); ours runs the same
        set-up (`sdft_twin`: `context.placement=user_prefix`, `loss.renormalize=true`, the
        student's initial weights as the frozen teacher), and its EOS is removed like GKD's;
      - `vs_trl` is ours as a user runs it (top-256, the headline above) against the faster of
        GKD and SDFT over all rounds: the issue names both as TRL's closest trainers, and the JSON
        takes the comparison less favourable to us. Ours set up as SDFT (`sdft_twin`) is
        printed against SDFT as a cross-check of the same algorithm;
      - the same torch thread count for both (1 by default: on a busy 2-core box two threads
        oversubscribe and a run's timings swing by 10x either way); TRL runs in a spawned process
        of its own (importing megatron_opcd pushes a CPU shim, a TorchFunctionMode that sees every
        torch call, and sets RANK/WORLD_SIZE, which would make accelerate wrap TRL's model in DDP);
        the two processes take turns, never run at once.
    A step's time: ours, the `train_step()` call (batch selection included); TRL, from one
    `on_step_end` to the next (its collation and logging included); the first step of every
    round is a warm-up and not timed. Rounds alternate ours / TRL, so a burst of load elsewhere
    hits both; the ratio is the median of the per-round ratios, by each process's CPU
    time (default, `--clock cpu`: on a shared machine wall time mostly measures the neighbours) or
    by wall time (`--clock wall`); both are printed, with the time per phase (ours: the trainer's
    time_* metrics; TRL: its generation, timed by a wrapper, and the rest).

(b) context_overhead: `score(teacher, prompts, responses, prefix=context)` with a 2,048-token
    shared context against the same call without it (8 x (32 prompt + 64 response) tokens); the
    context's keys and values are one copy that all rows read (cascade attention). Headline: the
    context's `PrefixCache` prefilled once beforehand and reused, which is what the trainer does
    for a frozen teacher (`TeacherPrefix`, generation/prefix.py: once per run per context; once
    per step for `teacher: self`). For reference: the prefill inside the call (`prefix=ids`), the
    context concatenated into every row (no reuse; (a)'s teacher only, two runs), and the prefill
    alone. Median of interleaved repeats.
    Reuse removes the context's weight matmuls; what no reuse can remove is every response token
    attending to the P context keys, 4 x P x hidden FLOPs per token and layer against roughly
    22 x hidden^2 for the layer's weights: the floor falls with the width. Two teachers are
    measured, each printed with that FLOP floor: (a)'s 5M-parameter teacher (hidden 256: the
    context's attention costs about as much as the whole model, floor ~1.9) and the headline, a
    teacher-shaped random Llama (`--teacher-shape`, default 2 layers of hidden 2048, 16 / 8 heads,
    ffn 5632: the width of a 1B-class model; OPCD's teachers are 3B-8B, hidden 3072-4096, where
    the floor is lower still).

Then (a) again at SmolLM2-135M's shape (30 layers, hidden 576, vocab 49152; batch 8, 64 new
tokens; `--smollm2-rounds` rounds, ~10 minutes; `--no-smollm2` skips it), where the rollout's
decode streams ~540 MB of weights a step and runs the compiled decode step (generation.compile_decode
auto; its compile falls in the untimed warm-up step).

The last line is one JSON object: {"vs_trl": x, "context_overhead": y, "vs_trl_smollm2": z}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench_step_trl import build_hf, checksum, trl_worker  # noqa: E402 - benchmarks/ is the script's folder

SPECIALS = ["<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# One token per word and per role marker: a prompt of W words is W + 3 tokens.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test (numbers mean nothing)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / TRL")
    p.add_argument("--steps", type=int, default=3, help="timed steps per trainer per round")
    p.add_argument("--score-repeats", type=int, default=7)
    p.add_argument("--teacher-shape", type=int, nargs=5, default=[2, 2048, 16, 8, 5632],
                   metavar=("LAYERS", "HIDDEN", "HEADS", "KV_HEADS", "FFN"),
                   help="(b)'s headline teacher: a random megatron Llama of this shape (default: 2 layers of a "
                        "1B-class width, hidden 2048; depth does not change the ratio); 0 0 0 0 0 skips it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process, the same for ours and TRL (1: on a busy 2-core box two threads "
                        "oversubscribe and their timings swing by 10x)")
    p.add_argument("--no-full-vocab", action="store_true", help="skip our loss.topk=null variant")
    p.add_argument("--no-sdft", action="store_true", help="skip the comparison with TRL's SDFTTrainer")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time base of the JSON ratios: each process's CPU time (default: on a shared machine it "
                        "counts the compute a process used, not the time others held the cores; exact with one "
                        "thread) or wall-clock time; both are printed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-smollm2", action="store_true", help="skip the second pass at SmolLM2-135M's shape")
    p.add_argument("--smollm2-rounds", type=int, default=2,
                   help="rounds of the SmolLM2-shaped pass (one timed step each per trainer: ~10 min in all)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.vocab = 2, 64, 4, 2, 128, 512
        args.batch, args.prompt_tokens, args.new_tokens, args.context_tokens = 2, 8, 8, 128
        args.rounds, args.steps, args.score_repeats, args.no_full_vocab = 1, 1, 1, True
        args.teacher_shape = [1, 128, 4, 2, 256]
    if args.prompt_tokens < 4:
        raise SystemExit("--prompt-tokens must be >= 4 (3 chat-template tokens + at least one word)")
    return args


# ----------------------------------------------------------------------------------------------
# inputs built in code: tokenizer, prompts, models


def make_tokenizer(folder: Path, vocab: int):
    """A word-level HF tokenizer of exactly `vocab` tokens (w0, w1, ... plus the specials) with a
    chat template; one token per word, so prompt lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  additional_special_tokens=SPECIALS[3:])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 20
    tok.save_pretrained(str(folder))
    return tok


def make_prompts(n: int, words: int, vocab: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - len(SPECIALS), (n, words), generator=gen)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


# ----------------------------------------------------------------------------------------------
# ours


def build_ours(args, work: Path, name: str, model_dict: dict, prompts_file: Path, tok_dir: Path, topk,
               student_hf, teacher_hf, groups, *, sdft_twin: bool = False):
    """Our Trainer on these weights. `sdft_twin`: the settings of (a)'s SDFT run (`bench_step_trl.build_sdft`): the
    context in the user turn (`placement: user_prefix`, "w1" + separator + prompt, as SDFT's
    template "{privileged_context}\n\n{prompt}" puts it there), the top-k renormalised, and the
    caller passes the student's own initial weights as the frozen teacher (SDFT's "base" teacher)."""
    import yaml

    from megatron_opcd.convert import load_hf_state_into_megatron
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = {
        "model": model_dict,
        "teacher": {"model": model_dict, "seed": 99},  # random init, overwritten with the HF teacher below
        "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "seed": 5},
        "data": {"train": str(prompts_file), "tokenizer": str(tok_dir), "max_prompt_tokens": args.prompt_tokens + 8,
                 "max_context_tokens": args.context_tokens, "seed": 3},
        # OPCD needs a context; GKD has none: a one-word system message (3 teacher-only tokens).
        # SDFT's teacher sees the same word in the user turn (1 teacher-only token).
        "context": {"text": "w1", "placement": "user_prefix" if sdft_twin else "system", "separator": "\n\n"},
        "algorithm": {"name": "opcd"},
        "loss": {"topk": topk, "renormalize": sdft_twin},
        "generation": {"max_new_tokens": args.new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        "optimizer": {"lr": 1e-6, "clip_grad": 1.0},
        "schedule": {"steps": 1_000_000, "global_batch_size": args.batch, "micro_batch_size": args.batch},
        "logging": {"dir": str(work / f"logs_{name}"), "tensorboard": False, "progress": False},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    trainer = Trainer(load_train_config(str(path)), groups)
    mcfg = trainer.model_config
    # fp32 params: megatron's FP32Optimizer steps the parameters themselves, so writing them in
    # place before the first step is the same as starting from these weights.
    load_hf_state_into_megatron(trainer.student, student_hf.state_dict(), mcfg, groups)
    load_hf_state_into_megatron(trainer.teacher, teacher_hf.state_dict(), mcfg, groups)
    trainer.tokenizer.eos_ids = []  # no EOS: every response runs to max_new_tokens, as on the TRL side
    return trainer


def time_ours(trainer, steps: int, batch: int) -> dict:
    """`steps` train_step()s, timed like TRL's (wall and this process's CPU time)."""
    tokens, wall, cpu, phases = 0, 0.0, 0.0, {}
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train_step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        m = result.metrics
        tokens += round(m["response_len"] * batch)
        for k, v in m.items():
            if k.startswith("time_"):
                phases[k[5:]] = phases.get(k[5:], 0.0) + v
    # The trainer's phase times are wall clock; scaled to the CPU time for the CPU-time profile.
    return {"tokens": tokens, "wall": wall, "cpu": cpu,
            "phases": {"wall": phases, "cpu": {k: v * cpu / max(wall, 1e-9) for k, v in phases.items()}}}


# ----------------------------------------------------------------------------------------------
# (b) teacher scoring with and without the shared context


def build_wide_teacher(args, groups):
    """A random megatron Llama of `--teacher-shape` (the teacher OPCD distils from is the large model)."""
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.models import build_model

    layers, hidden, heads, kv_heads, ffn = args.teacher_shape
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=kv_heads,
                      ffn_hidden_size=ffn, vocab_size=args.vocab, max_position_embeddings=4096)
    return cfg, build_model(cfg, groups=groups, seed=args.seed).eval()


def context_floor(cfg, context: int, row: int, vocab: int, scored: int) -> float:
    """1 + (FLOPs of attending to the context) / (FLOPs of the forward without it), per token.

    Per token and layer: the weight matmuls 2 x (q + k + v + o + 3 x ffn) parameters, attention
    over the row's own ~row/2 keys 4 x row/2 x hidden, and with the context 4 x P x hidden more;
    plus the output layer, 2 x vocab x hidden for the `scored` of the row's tokens it runs on
    (score computes the response positions only)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    kv = h * (cfg.num_query_groups or cfg.num_attention_heads) // cfg.num_attention_heads
    ffn = cfg.ffn_hidden_size or 4 * h
    per_layer = 2 * (h * h + 2 * h * kv + h * h + 3 * h * ffn) + 4 * (row / 2) * h
    without = layers * per_layer + 2 * vocab * h * scored / row
    return 1.0 + layers * 4 * context * h / without


def time_scoring(teacher, groups, prompts, responses, context, repeats: int, pad_id: int, concatenated: bool = True):
    """Median wall and CPU seconds of each variant; and max |logits(prefix) - logits(concatenated)|
    (checked on the first two rows only when `concatenated` is off: the no-reuse variant is ~20-50x
    the others and is then not timed)."""
    from megatron_opcd.generation import prefill_prefix, score

    cache = prefill_prefix(teacher, context, groups=groups)
    concat = [context + p for p in prompts]
    calls = {
        "without": lambda: score(teacher, prompts, responses, groups=groups, pad_id=pad_id),
        "with": lambda: score(teacher, prompts, responses, groups=groups, prefix=context, pad_id=pad_id),
        "with_cached": lambda: score(teacher, prompts, responses, groups=groups, prefix=cache, pad_id=pad_id),
        "concatenated": lambda: score(teacher, concat, responses, groups=groups, pad_id=pad_id),
        "prefill": lambda: prefill_prefix(teacher, context, groups=groups),
    }
    # The prefix path computes what the concatenated rows compute (this also warms every path up).
    if concatenated:
        diff = float((calls["with"]().logits - calls["concatenated"]().logits).abs().max())
    else:
        del calls["concatenated"]
        two = score(teacher, concat[:2], responses[:2], groups=groups, pad_id=pad_id).logits
        diff = float((calls["with"]().logits[:, :2] - two).abs().max())
    times = {k: {"wall": [], "cpu": []} for k in calls}
    for r in range(repeats):  # interleaved: a burst of load elsewhere hits every variant
        for k, fn in calls.items():
            if k == "concatenated" and r >= 2:
                continue  # a reference only, and ~50x the others: two runs
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k]["wall"].append(time.perf_counter() - w0)
            times[k]["cpu"].append(time.process_time() - c0)
    return {k: {c: statistics.median(v[c]) for c in v} for k, v in times.items()}, diff


# ----------------------------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


LABELS = {"top256": "ours, reverse KL over the student's top-256 (default)",
          "full": "ours, reverse KL exact (loss.topk=null)",
          "trl": "TRL GKDTrainer (lmbda=1, beta=1: reverse KL, full vocab)",
          "sdft_twin": "ours as SDFT is set up (top-256 renormalised, context in the user turn)",
          "sdft": "TRL SDFTTrainer (alpha=1: reverse KL, top-256 renormalised, base teacher)"}
BASELINE = {"top256": ("trl", "sdft"), "full": ("trl",), "sdft_twin": ("sdft",)}
"""Which TRL runs each of ours is compared with."""
TRL_NAMES = {"trl": "GKD", "sdft": "SDFT"}


def smollm2_args(args):
    """The second pass: SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, ffn 1536,
    vocab 49152), batch 8, 64 new tokens, `--smollm2-rounds` rounds of one timed step, the exact-KL
    variant and the teacher-shaped scoring left out (~10 minutes on one core). Under --quick, the
    quick shape again: a smoke run of the same path."""
    shape = {} if args.quick else dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152, batch=8,
                                       new_tokens=64, rounds=args.smollm2_rounds, steps=1, score_repeats=3)
    return argparse.Namespace(**{**vars(args), **shape, "no_full_vocab": True, "teacher_shape": [0] * 5})


def main(argv=None):
    args = parse_args(argv)
    result = bench(args)
    if not args.no_smollm2:
        sargs = smollm2_args(args)
        print(f"\n=== the same at SmolLM2-135M's shape ({sargs.layers} layers, hidden {sargs.hidden}, vocab "
              f"{sargs.vocab}), {sargs.rounds} round(s) ===", flush=True)
        result["vs_trl_smollm2"] = bench(sargs)["vs_trl"]
    print(json.dumps(result))


def bench(args) -> dict:
    """One whole comparison (ours and TRL in two processes) at the shape of `args`: its JSON fields."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        raise SystemExit("bench_step.py needs TRL: pip install -e '.[bench]'")
    import multiprocessing as mp

    print(f"load average at start (1/5/15 min): {loadavg()}; {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"trl {trl.__version__}, {args.threads} torch thread(s) per process; ours and TRL in two processes that "
          f"take turns (never both at once)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = Path(tmp)
        tok_dir = work / "tok"
        make_tokenizer(tok_dir, args.vocab)
        n_prompts = args.batch * (args.rounds + 1) * (args.steps + 1) * 2
        prompts = make_prompts(n_prompts, args.prompt_tokens - 3, args.vocab, args.seed)
        prompts_file = work / "train.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

        # TRL's process starts first: its imports overlap with our set-up.
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        worker = ctx.Process(target=trl_worker, args=(child_conn, args, str(tok_dir), prompts, str(work)), daemon=True)
        worker.start()
        try:
            result = run(args, work, tok_dir, prompts_file, conn)
        finally:
            try:
                conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    print(f"load average at end: {loadavg()}")
    return result


def run(args, work: Path, tok_dir: Path, prompts_file: Path, conn) -> dict:
    from megatron_opcd import parallel
    from megatron_opcd.compat import enable_cpu
    from megatron_opcd.config import to_dict
    from megatron_opcd.convert import model_config_from_hf

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize()
    student_hf, teacher_hf = build_hf(args, args.seed + 1), build_hf(args, args.seed + 2)
    model_dict = to_dict(model_config_from_hf(student_hf.config))
    n_params = sum(p.numel() for p in student_hf.parameters())
    print(f"model: random Llama, {n_params / 1e6:.2f}M parameters ({args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads, ffn {args.ffn}, vocab {args.vocab}, tied), fp32; teacher: "
          f"a second random Llama of the same shape; {args.batch} prompts x ({args.prompt_tokens} prompt + "
          f"{args.new_tokens} sampled tokens) per step, no EOS; ours: a 3-token context, one micro-batch", flush=True)

    ours = {"top256": build_ours(args, work, "top256", model_dict, prompts_file, tok_dir, 256,
                                 student_hf, teacher_hf, groups)}
    if not args.no_full_vocab:
        ours["full"] = build_ours(args, work, "full", model_dict, prompts_file, tok_dir, None,
                                  student_hf, teacher_hf, groups)
    if not args.no_sdft:  # SDFT's teacher is the initial student: ours gets the student's weights twice
        ours["sdft_twin"] = build_ours(args, work, "sdft_twin", model_dict, prompts_file, tok_dir, 256,
                                       student_hf, student_hf, groups, sdft_twin=True)
    trainer = ours["top256"]
    check = torch.randint(len(SPECIALS), args.vocab, (1, 16))
    with torch.no_grad():
        ref = student_hf(check).logits
        s = check.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
        mine = trainer.student(check, torch.arange(s)[None], causal, runtime_gather_output=True)[..., : args.vocab]
    rendered = len(trainer.renderer.pair(trainer.stream.examples[0].prompt, None).student)

    ready = conn.recv()
    same = ready["checksums"] == (checksum(student_hf), checksum(teacher_hf))
    print(f"same weights: max |logits(megatron) - logits(HF)| = {float((mine - ref).abs().max()):.1e}; TRL's "
          f"student and teacher {'are' if same else 'are NOT'} these models (parameter checksums); TRL: "
          f"{ready['mode']}, {ready['threads']} thread(s)", flush=True)
    if ready["sdft_checksums"] is not None:
        same = ready["sdft_checksums"] == [checksum(student_hf)] * 2
        print(f"SDFT's student and its base teacher {'are' if same else 'are NOT'} the student above", flush=True)
    del student_hf, teacher_hf

    # --- (a) -----------------------------------------------------------------------------------
    for t in ours.values():  # one warm-up step each (TRL's first step of every round is untimed)
        time_ours(t, 1, args.batch)
    rounds = {k: [] for k in (*ours, "trl", *(["sdft"] if "sdft_twin" in ours else []))}
    for r in range(args.rounds):  # ours and TRL take turns, so a burst of load elsewhere hits both
        for name, t in ours.items():
            torch.set_num_threads(args.threads)
            rounds[name].append(time_ours(t, args.steps, args.batch))
        conn.send("round")
        for name, result in conn.recv().items():
            rounds[name].append(result)
        line = ", ".join(f"{k} {v[-1]['tokens'] / v[-1]['wall']:.1f} ({v[-1]['tokens'] / v[-1]['cpu']:.1f})"
                         for k, v in rounds.items())
        print(f"  round {r + 1}/{args.rounds}: tokens per wall (CPU) second: {line}; load {loadavg()}", flush=True)
    expected = args.batch * args.new_tokens * args.steps
    for k, v in rounds.items():
        if any(x["tokens"] != expected for x in v):
            print(f"WARNING: {k} trained on {[x['tokens'] for x in v]} tokens per round, expected {expected}")
    trl_prompt = rounds["trl"][0]["prompt_len"]
    for name in ("trl", "sdft"):
        if name in rounds and rounds[name][0]["prompt_len"] != rendered:
            print(f"WARNING: prompt lengths differ: {name} {rounds[name][0]['prompt_len']}, ours {rendered}")

    def speed(name, clock):
        return sum(x["tokens"] for x in rounds[name]) / sum(x[clock] for x in rounds[name])

    def ratio(name, clock, base):
        return statistics.median((a["tokens"] / a[clock]) / (b["tokens"] / b[clock])
                                 for a, b in zip(rounds[name], rounds[base]))

    def profile(name, clock):
        steps = sum(x["tokens"] for x in rounds[name]) / (args.batch * args.new_tokens)
        total: dict = {}
        for x in rounds[name]:
            for k, v in x["phases"][clock].items():
                total[k] = total.get(k, 0.0) + v
        return ", ".join(f"{k} {1000 * v / steps:.0f} ms" for k, v in total.items())

    print(f"\n(a) one training step, {args.batch} x {args.new_tokens} sampled tokens after {rendered}-token prompts "
          f"(TRL: {trl_prompt}), {args.rounds} rounds x {args.steps} timed steps; ratio = median over rounds")
    for clock in ("wall", "cpu"):
        unit = "wall-clock second" if clock == "wall" else "CPU second of its process"
        print(f"  tokens per {unit}:")
        for k in rounds:
            bases = [b for b in BASELINE.get(k, ()) if b in rounds]
            extra = ", ".join(f"{ratio(k, clock, b):.2f}x {TRL_NAMES[b]}" for b in bases)
            print(f"    {LABELS[k]:<74} {speed(k, clock):8.1f}  {extra}".rstrip())
            print(f"        per step: {profile(k, clock)}")
    # Against the faster of TRL's two trainers over all rounds: the comparison less favourable to us.
    trl_runs = [b for b in TRL_NAMES if b in rounds]
    fastest = max(trl_runs, key=lambda b: speed(b, args.clock))
    vs_trl = ratio("top256", args.clock, fastest)
    print(f"vs_trl = ours (top-256, as a user runs it) / TRL {TRL_NAMES[fastest]} (the faster TRL trainer here, by "
          f"{args.clock} time), median over rounds: {vs_trl:.3f}")

    # --- (b) -----------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(7)
    score_prompts = trainer.select_batch(10**6).student_prompts
    responses = torch.randint(len(SPECIALS), args.vocab, (len(score_prompts), args.new_tokens), generator=gen).tolist()
    context = torch.randint(len(SPECIALS), args.vocab, (args.context_tokens,), generator=gen).tolist()
    torch.set_num_threads(args.threads)
    teachers = [("(a)'s teacher", trainer.teacher, trainer.teacher_config, True)]
    if all(args.teacher_shape):
        wide_cfg, wide = build_wide_teacher(args, groups)
        teachers.append(("teacher-shaped", wide, wide_cfg, False))
    overheads = {}
    for name, model, cfg, concatenated in teachers:
        times, diff = time_scoring(model, groups, score_prompts, responses, context, args.score_repeats,
                                   trainer.tokenizer.pad_id, concatenated=concatenated)
        floor = context_floor(cfg, args.context_tokens, len(score_prompts[0]) + args.new_tokens, args.vocab,
                              args.new_tokens)
        base = times["without"]["wall"]
        print(f"\n(b) {name} model ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
              f"heads / {cfg.num_query_groups or cfg.num_attention_heads} KV heads, ffn {cfg.ffn_hidden_size}): "
              f"teacher scoring of {len(score_prompts)} x ({len(score_prompts[0])} prompt + {args.new_tokens} "
              f"response) tokens, median of {args.score_repeats} interleaved repeats, wall clock (CPU time); prefix "
              f"path vs concatenated rows: max |logit diff| {diff:.1e}")
        rows = [("without", "without context"),
                ("with_cached", f"with a {args.context_tokens}-token shared context, PrefixCache reused"),
                ("with", "same, prefilled inside the call (prefix=ids)"),
                ("concatenated", "context concatenated into every row (no reuse)"),
                ("prefill", "the prefill alone (batch 1)")]
        for key, label in rows:
            if key not in times:
                continue
            w, c = times[key]["wall"], times[key]["cpu"]
            print(f"  {label:<54} {1000 * w:8.1f} ms ({1000 * c:8.1f})  {w / base:5.2f}x "
                  f"({c / times['without']['cpu']:.2f}x)")
        overheads[name] = times["with_cached"][args.clock] / times["without"][args.clock]
        print(f"  with / without by {args.clock} time: {overheads[name]:.3f}; the FLOP floor (the context's "
              f"attention, 4 x P x hidden per token and layer, over the forward's FLOPs): {floor:.2f}")
    headline = "teacher-shaped" if "teacher-shaped" in overheads else "(a)'s teacher"
    overhead = overheads[headline]
    print(f"context_overhead = with / without on the {headline} model, the context's PrefixCache prefilled once and "
          f"reused (what the trainer does for a frozen teacher: TeacherPrefix), by {args.clock} time: "
          f"{overhead:.3f}")
    for t in ours.values():
        t.logger.close()
    parallel.destroy()
    return {"vs_trl": round(vs_trl, 3), "context_overhead": round(overhead, 3)}


if __name__ == "__main__":
    main()
