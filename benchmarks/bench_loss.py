"""Peak memory and time of OPCD's top-k reverse KL (forward + backward): `vocab_parallel_divergence`
against a naive implementation that gathers the full-vocabulary fp32 logits and uses log_softmax.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loss.py            # V = 32K, 152K; T = 2K; TP = 1, 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loss.py --quick    # tiny sizes: a smoke test

How it measures (CPU). Every (setting, implementation) runs in fresh processes (one per TP rank,
`megatron_opcd.launcher.run_on_ranks`, one torch thread each). A rank creates its inputs (its
vocabulary shard of the student's and the teacher's logits), runs one warm-up step, then resets the
kernel's peak-RSS counter (`/proc/self/clear_refs` = 5) and runs one measured step: its "extra
peak memory" is VmHWM minus the VmRSS at the reset, i.e. everything the step allocates, the
student's gradient included (both implementations return one). Time is the best of `--reps`
steps, as the rank's CPU time (`time.process_time`; wall time is printed too): the development
machines are shared, and the wall time of a one-thread process there measures the neighbours'
load as much as the code. The per-setting figure is the maximum over ranks. The naive version is written the way one
would: the teacher under no_grad, temperature 1 (no extra division buffer).

Output: one line per setting, then as the last line one JSON object
`{"results": [{"V", "T", "tp", "memory_ratio": ours/naive, "time_ratio": ours/naive}, ...]}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPK = 256


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _naive(zs, zt, group, tp):
    """Gather the full vocabulary in fp32, log_softmax, the student's top-k, reverse KL."""
    import torch
    import torch.distributed as dist

    class _Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            parts = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(parts, x.contiguous(), group=group)
            return torch.cat(parts, dim=-1)

        @staticmethod
        def backward(ctx, g):
            return g.chunk(tp, dim=-1)[dist.get_rank(group)].contiguous()

    full_s = (_Gather.apply(zs) if tp > 1 else zs).float()  # [T, V] fp32
    ls = torch.log_softmax(full_s, dim=-1)
    with torch.no_grad():
        lt = torch.log_softmax((_Gather.apply(zt) if tp > 1 else zt).float(), dim=-1)
    idx = ls.detach().topk(TOPK, dim=-1).indices
    ls_i, lt_i = ls.gather(-1, idx), lt.gather(-1, idx)
    return (ls_i.exp() * (ls_i - lt_i)).sum(-1)


def _ours(zs, zt, group, tp):
    from megatron_opcd.losses import DivergenceSpec, vocab_parallel_divergence

    # chunk 512: the setting docs/losses.md's figures were measured at (its memory is per chunk).
    spec = DivergenceSpec(kind="reverse_kl", topk=TOPK, topk_from="student", chunk_tokens=512)
    return vocab_parallel_divergence(zs, zt, spec, tp_group=group if tp > 1 else None)


def _rank(impl: str, vocab: int, tokens: int, reps: int) -> tuple[int, float, float]:
    """On one rank: (extra peak bytes of one forward + backward, best CPU and wall seconds)."""
    import gc

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(1234 + rank)
    zs = (3.0 * torch.randn(tokens, vocab // tp, generator=g)).requires_grad_()  # [T, v/tp] fp32
    zt = 3.0 * torch.randn(tokens, vocab // tp, generator=g)
    fn = _ours if impl == "ours" else _naive

    def step():
        zs.grad = None
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        fn(zs, zt, group, tp).sum().backward()
        return time.process_time() - c0, time.perf_counter() - w0

    step()  # warm-up
    zs.grad = None
    gc.collect()
    base = _reset_peak()
    times = [step()]
    peak = _status_kib("VmHWM") * 1024 - base
    times += [step() for _ in range(reps - 1)]
    return peak, min(c for c, _ in times), min(w for _, w in times)


def run(settings, reps: int) -> list[dict]:
    from megatron_opcd.launcher import run_on_ranks

    results = []
    for vocab, tokens, tp in settings:
        got = {}
        for impl in ("ours", "naive"):
            per_rank = run_on_ranks(_rank, tp, (impl, vocab, tokens, reps), timeout=1800)
            got[impl] = tuple(max(r[i] for r in per_rank) for i in range(3))
        (m_o, t_o, w_o), (m_n, t_n, w_n) = got["ours"], got["naive"]
        row = dict(V=vocab, T=tokens, tp=tp, memory_ratio=round(m_o / m_n, 4), time_ratio=round(t_o / t_n, 4))
        results.append(row)
        target = 1 / (2 * tp)
        print(
            f"V={vocab} T={tokens} tp={tp}: extra peak per rank ours {m_o / 2**20:.0f} MiB vs naive "
            f"{m_n / 2**20:.0f} MiB (ratio {row['memory_ratio']:.3f}, target <= {target:.3f}); "
            f"CPU time ours {t_o:.2f} s vs naive {t_n:.2f} s (ratio {row['time_ratio']:.3f}, target <= 1; "
            f"wall {w_o:.2f} s vs {w_n:.2f} s)",
            flush=True,
        )
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (V = 1024, T = 64): a smoke test")
    parser.add_argument("--reps", type=int, default=2, help="timed steps per setting (best is reported)")
    args = parser.parse_args(argv)
    if args.quick:
        settings = [(1024, 64, 1), (1024, 64, 2)]
    else:
        settings = [(v, 2048, tp) for v in (32_000, 152_064) for tp in (1, 2)]
    print(json.dumps({"results": run(settings, 1 if args.quick else args.reps)}))


if __name__ == "__main__":
    main()
