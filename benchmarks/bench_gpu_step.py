"""Tokens/s and MFU of a student training step on one GPU: a ~1B Llama-3.2-1B-shaped model, bf16 or FP8.

    python benchmarks/bench_gpu_step.py                                  # bf16
    python benchmarks/bench_gpu_step.py --fp8 hybrid --fp8-recipe delayed
    python benchmarks/bench_gpu_step.py --fp8 hybrid --fp8-recipe tensorwise --json-out result.json
    python benchmarks/bench_gpu_step.py --transformer-impl local --seq 2048   # megatron's local spec, bf16

The "student step" is the update phase of OPCD: forward and backward of the student over packed
[prompt; response] rows through megatron-core (Transformer Engine layers, or with
`--transformer-impl local` megatron's local spec: torch norms and its unfused attention, which
keeps a [b, heads, s, s] score tensor per layer, hence the shorter sequence) and an Adam step (torch's
fused Adam on the bf16 weights; megatron's optimizer wrapper adds the fp32 master copy, not measured
here). Rollout generation and teacher scoring are not included. Random weights and tokens; the
loss is cross-entropy on the full vocabulary (the top-k KL's cost is small next to the model).

FLOPs per token: 6 x N (N = all parameters: the tied embedding counts once, as the output layer)
+ 12 x L x s x h (attention scores and values, forward and backward, the causal half counted in full). MFU divides the achieved
FLOP/s by the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s), for FP8 runs too, so the two are
comparable; the FP8 dense peak is twice that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Llama-3.2-1B's shape (1.24B parameters with tied embeddings).
ARCH = dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=8192,
            kv_channels=64, vocab_size=128256, max_position_embeddings=8192, rotary_base=500000, tie_embeddings=True,
            params_dtype="bf16")
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine")
    ap.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None)
    ap.add_argument("--fp8-recipe", choices=["delayed", "tensorwise"], default="delayed")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    import torch

    from megatron_opcd import parallel
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.data.packing import causal_padding_mask
    from megatron_opcd.models import build_model

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_step.py needs a CUDA GPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    parallel.initialize(ParallelConfig())
    cfg = ModelConfig(**ARCH, transformer_impl=args.transformer_impl, fp8=args.fp8, fp8_recipe=args.fp8_recipe)
    model = build_model(cfg, "student", seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6, fused=True)
    b, s = args.micro_batch, args.seq
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), device="cuda")
    pos = torch.arange(s, device="cuda")[None].expand(b, s)
    mask = causal_padding_mask(torch.full((b,), s), s).cuda()

    def step():
        logits = model(tokens[:, :-1], pos, mask)  # [b, s, V] (TP = 1: the whole vocabulary)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps

    n_params = sum(p.numel() for p in model.parameters())
    # Tied embeddings: the one matrix costs FLOPs as the output layer (the lookup is free), so N = all parameters.
    flops_per_token = 6 * n_params + 12 * cfg.num_layers * s * cfg.num_attention_heads * cfg.head_dim
    tokens_per_s = b * s / seconds
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    result = {
        "gpu": name, "precision": f"fp8 {args.fp8} {args.fp8_recipe}" if args.fp8 else "bf16",
        "transformer_impl": args.transformer_impl,
        "params": n_params, "micro_batch": b, "seq": s, "step_seconds": seconds, "tokens_per_s": tokens_per_s,
        "tflops_per_s": flops_per_token * tokens_per_s / 1e12,
        "mfu_vs_bf16_peak": flops_per_token * tokens_per_s / 1e12 / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": float(loss.detach()),
        "torch": torch.__version__,
    }
    try:
        import transformer_engine

        result["transformer_engine"] = transformer_engine.__version__
    except Exception:  # noqa: BLE001 - the version is informative only
        pass
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    parallel.destroy()
    return result


if __name__ == "__main__":
    main()
