"""Run a function on N local ranks (one process each) and collect what each returns.

Used by the tests, the CPU demo and the benchmarks; clusters use torchrun / srun instead.

Why a `forkserver`: importing megatron.core costs seconds of CPU per process. The fork
server imports torch and megatron.core once and forks every rank from that clean, single-threaded
process (a plain `fork` of a parent that has already run OpenMP kernels can hang in libgomp).

Every rank runs with one torch thread by default (on 2 shared cores, two threads per process
measured 15x slower), under a deadline: a rank that hangs dumps its Python stack with
`faulthandler` and the whole group is killed, so a hang turns into a failure with a traceback.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence

_PRELOAD = ["megatron_opcd.compat.quiet", "torch", "megatron.core"]


class RanksFailed(RuntimeError):
    """One or more ranks raised, died or exceeded the deadline."""


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> mp.context.BaseContext:
    """forkserver with torch and megatron-core imported once (a rank then starts in a fraction of a
    second on a CPU box); on a CUDA host, spawn: the preloaded imports initialise CUDA in the fork
    server there, and a CUDA context does not survive a fork (seen on an H200: every rank failed
    with "Cannot re-initialize CUDA in forked subprocess")."""
    import torch

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(fn, rank, world_size, port, args, kwargs, threads, timeout, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),
    )
    import torch

    torch.set_num_threads(threads)
    from megatron_opcd.compat import enable_cpu

    enable_cpu()  # a rank on a host without CUDA runs megatron-core in CPU mode (a no-op with CUDA)
    # A hang prints every thread's stack shortly before the parent kills the group.
    faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=True)
    try:
        out = fn(*args, **kwargs)
        # Serialise here: a queued tensor would be shared through a file descriptor that dies
        # with this process before the parent reads it.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best-effort teardown of a finished rank
            pass


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 300.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` processes; return the per-rank results in rank order.

    `fn` must be importable (a module-level function). The environment of each rank has the usual
    torchrun variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), so `fn` initialises
    torch.distributed itself (see `megatron_opcd.parallel.initialize`). Raises `RanksFailed` with
    each failing rank's traceback if any rank raises, dies, or runs past `timeout` seconds.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, port, tuple(args), dict(kwargs or {}), threads_per_rank, timeout, results),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    errors: list[str] = []
    while len(got) < world_size:
        try:
            rank, ok, out = results.get(timeout=0.5)
            got[rank] = (ok, out)
            if not ok:
                errors.append(f"rank {rank} raised:\n{out}")
                # Peers of a failed rank usually block in a collective: give them a moment to
                # report their own error, then stop waiting.
                deadline = min(deadline, time.monotonic() + 10)
            continue
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
        if dead:
            # Drain results that raced with the exit before declaring the rank dead.
            time.sleep(0.2)
            while True:
                try:
                    rank, ok, out = results.get_nowait()
                    got[rank] = (ok, out)
                    if not ok:
                        errors.append(f"rank {rank} raised:\n{out}")
                except queue.Empty:
                    break
            for r in dead:
                if r not in got:
                    errors.append(f"rank {r} died with exit code {procs[r].exitcode}")
                    got[r] = (False, None)
            deadline = min(deadline, time.monotonic() + 10)
        if time.monotonic() > deadline:
            missing = [r for r in range(world_size) if r not in got]
            if missing:
                errors.append(f"ranks {missing} did not finish within the deadline (timeout={timeout}s)")
            break
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RanksFailed("\n".join(errors))
    import torch

    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]


if __name__ == "__main__":  # pragma: no cover - manual smoke check
    print(run_on_ranks(os.getpid, int(sys.argv[1]) if len(sys.argv) > 1 else 2))
