"""The tiny end-to-end check: a random 2-layer megatron-core model split over 2 tensor-parallel
gloo ranks on the CPU: build it, run a forward pass, greedily generate a few tokens, and verify
that the 2-rank logits equal a 1-rank run of the same weights. Runs in seconds."""

from __future__ import annotations

import time

import torch

from megatron_opcd.launcher import run_on_ranks

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
           vocab_size=256, make_vocab_size_divisible_by=64, max_position_embeddings=128)


def _rank(tp: int, prompt: list[int], new_tokens: int) -> dict:
    from megatron_opcd import parallel
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.data.packing import causal_padding_mask
    from megatron_opcd.models import build_model

    t0 = time.perf_counter()
    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp))
    cfg = ModelConfig(**CFG)
    model = build_model(cfg, "student", groups=groups, seed=11).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tokens = list(prompt)
    first_logits = None
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.tensor([tokens])
            s = ids.shape[1]
            shard = model(ids, torch.arange(s)[None], causal_padding_mask(torch.tensor([s]), s))  # [1, s, v/tp]
            pieces = [torch.empty_like(shard) for _ in range(groups.tp_size)]
            torch.distributed.all_gather(pieces, shard.contiguous(), group=groups.tp_group)
            logits = torch.cat(pieces, dim=-1)[0, -1, : cfg.vocab_size]  # gather the vocab shards
            if first_logits is None:
                first_logits = logits.clone()
            tokens.append(int(logits.argmax()))
    out = {"rank": torch.distributed.get_rank(), "tp_rank": groups.tp_rank, "params_on_rank": n_params,
           "tokens": tokens[len(prompt):], "first_logits": first_logits, "seconds": time.perf_counter() - t0}
    parallel.destroy()
    return out


def main() -> dict:
    prompt = [1, 17, 42, 99, 7]
    print("megatron-opcd tiny demo: a 2-layer megatron-core GPTModel (hidden 64, GQA 4/2 heads, vocab 256)")
    print("  split over 2 tensor-parallel gloo ranks on the CPU, vs the same weights on 1 rank")
    t0 = time.perf_counter()
    two = run_on_ranks(_rank, 2, (2, prompt, 8), timeout=240)
    one = run_on_ranks(_rank, 1, (1, prompt, 8), timeout=240)
    for r in two:
        print(f"  rank {r['rank']} (TP rank {r['tp_rank']}): {r['params_on_rank']:,} parameters, "
              f"greedy tokens {r['tokens']}")
    print(f"  1 rank:                       {one[0]['params_on_rank']:,} parameters, greedy tokens {one[0]['tokens']}")
    diff = float((two[0]["first_logits"] - one[0]["first_logits"]).abs().max())
    same = all(r["tokens"] == one[0]["tokens"] for r in two) and diff < 1e-5
    print(f"  max |logits(TP=2) - logits(TP=1)| = {diff:.2e}; tokens identical: {same}")
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    if not same:
        raise SystemExit("TP=2 and TP=1 disagree: the installation is broken")
    return {"max_logit_diff": diff, "tokens": one[0]["tokens"]}


if __name__ == "__main__":
    main()
