"""Rank function for the agreed-stop protocol (training/preempt.py); module level: pickled by reference."""

from __future__ import annotations


def decode_and_drain(decode_steps: list[int], cases: list[list[int]]) -> list[dict]:
    """`_case` for each list of per-rank signal steps, in one process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = [_case(decode_steps, signal_at) for signal_at in cases]
    dist.destroy_process_group()
    return out


def _case(decode_steps: list[int], signal_at: list[int]) -> dict:
    """Rank r "decodes" decode_steps[r] steps through `decode_check`, then drains; it sees a stop
    signal at its decode step signal_at[r] (-1: never). Returns where it stopped and a probe
    all-reduce after it (a mismatched collective would give the wrong sum or hang)."""
    import signal

    import torch
    import torch.distributed as dist

    from megatron_opcd.training.preempt import Preemption, StepAbandoned

    rank = dist.get_rank()
    p = Preemption(check_every=4)
    stopped = None
    try:
        for step in range(decode_steps[rank]):
            if step == signal_at[rank]:
                p.signum = signal.SIGUSR1
            p.decode_check(step)
        p.drain()
    except StepAbandoned as exc:
        stopped = exc.where
    probe = torch.tensor([float(rank + 1)])
    dist.all_reduce(probe)
    after = p.agreed()
    return {"stopped": stopped, "probe": probe.item(), "after": after}
