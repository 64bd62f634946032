"""Generation speed on the CPU: our KV-cache loop vs the same loop without a cache vs Hugging Face.

    .venv/bin/python benchmarks/bench_generation.py            # ~28M-parameter Llama, 128 new tokens

A LlamaForCausalLM with random weights is built with transformers, its weights are copied into a
megatron-core GPTModel (megatron_opcd.convert), the two are checked to compute the same logits,
and greedy decoding of 128 new tokens (no EOS: every row runs the full 128) is timed at batch 1
and batch 8 (prompts of 16-40 tokens, left-padded for HF) for

  ours      megatron_opcd.generation.generate (megatron-core StaticInferenceContext KV cache)
  nocache   the same loop with use_cache=False (the whole sequence recomputed every step)
  hf        transformers' model.generate (DynamicCache, SDPA attention)

The last line is one JSON object with the batch-8 speed-ups (ours / theirs, tokens per second):
{"vs_nocache": x, "vs_hf": y}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the best is kept)")
    p.add_argument("--nocache-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box more threads oversubscribe and run slower)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_hf(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # wider than HF's 0.02 init: peaked distributions, greedy far from ties
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.06)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def build_megatron(hf, groups):
    from megatron_opcd.convert import load_hf_state_into_megatron, model_config_from_hf
    from megatron_opcd.models import build_model

    cfg = model_config_from_hf(hf.config)
    model = build_model(cfg, groups=groups, init=False)
    load_hf_state_into_megatron(model, hf.state_dict(), cfg, groups)
    return model.eval(), cfg


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 41, (batch,), generator=gen).tolist()
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_ours(model, prompts, args, groups, vocab, use_cache=True):
    from megatron_opcd.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=args.new_tokens, greedy=True)
    t0 = time.perf_counter()
    out = generate(model, prompts, params, groups=groups, vocab_size=vocab, use_cache=use_cache)
    dt = time.perf_counter() - t0
    return out.responses, sum(out.lengths) / dt


def run_hf(hf, prompts, args):
    b, longest = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, longest, dtype=torch.long)
    mask = torch.zeros(b, longest, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as HF decoder-only generation expects
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, do_sample=False)
    dt = time.perf_counter() - t0
    new = out[:, longest:]
    return new.tolist(), new.numel() / dt


def best(fn, repeats):
    results = [fn() for _ in range(repeats)]
    return max(results, key=lambda r: r[1])


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of rows whose greedy continuations agree on their first 16 tokens."""
    return sum(x[:16] == y[:16] for x, y in zip(a, b)) / len(a)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from megatron_opcd import parallel

    groups = parallel.initialize()
    hf = build_hf(args)
    model, cfg = build_megatron(hf, groups)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"Llama-style model: {n_params / 1e6:.1f}M parameters ({args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads, ffn {args.ffn}, vocab {args.vocab}), fp32, "
          f"{args.threads} threads, torch {torch.__version__}")

    # The same weights compute the same logits.
    ids = torch.randint(1, args.vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        s = ids.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None].expand(2, 1, s, s)
        ours = model(ids, torch.arange(s)[None].expand(2, s), causal, runtime_gather_output=True)[..., : args.vocab]
    print(f"max |logits(megatron) - logits(HF)| = {float((ours - ref).abs().max()):.2e}")

    # Warm-up (allocator, lazy init) on a short run of each.
    warm = make_prompts(2, args.vocab, 99)
    short = argparse.Namespace(**{**vars(args), "new_tokens": 4})
    run_ours(model, warm, short, groups, cfg.vocab_size)
    run_hf(hf, warm, short)

    rows, speed = [], {}
    for b in args.batches:
        prompts = make_prompts(b, args.vocab, args.seed + b)
        toks, ours = best(lambda: run_ours(model, prompts, args, groups, cfg.vocab_size), args.repeats)
        toks_nc, nocache = best(lambda: run_ours(model, prompts, args, groups, cfg.vocab_size, use_cache=False),
                                args.nocache_repeats)
        toks_hf, hf_speed = best(lambda: run_hf(hf, prompts, args), args.repeats)
        speed[b] = (ours, nocache, hf_speed)
        rows.append((b, ours, nocache, hf_speed, agreement(toks, toks_nc), agreement(toks, toks_hf)))

    print(f"\ngreedy, {args.new_tokens} new tokens, tokens/s (best of {args.repeats}; no-cache best of "
          f"{args.nocache_repeats})")
    print(f"{'batch':>5} {'ours':>9} {'no cache':>9} {'HF':>9} {'vs no cache':>12} {'vs HF':>7} "
          f"{'same as no-cache':>17} {'same as HF':>11}")
    for b, ours, nc, h, a_nc, a_hf in rows:
        print(f"{b:>5} {ours:>9.1f} {nc:>9.1f} {h:>9.1f} {ours / nc:>11.2f}x {ours / h:>6.2f}x "
              f"{a_nc:>17.0%} {a_hf:>11.0%}")
    key = 8 if 8 in speed else max(speed)
    ours, nc, h = speed[key]
    print(json.dumps({"vs_nocache": round(ours / nc, 2), "vs_hf": round(ours / h, 2)}))


if __name__ == "__main__":
    main()
