"""Preemption within seconds: stop at the next safe point inside a step, agreed by every rank.

On SIGTERM or SIGUSR1 the handler only records the signal. Every rank then leaves the step at the
next *safe point*, where all ranks of the job are known to stand at the same place:

    rollout       every `CHECK_EVERY` decode steps (`decode_check`, the generation loop's
                  `between_steps` callback), then once more when the rollout ends (`drain`)
    teacher       between teacher micro-batches (`check`)
    update        before megatron's schedule, and between its micro-batches at PP=1 (`check`)
    end of step   after the optimizer step (the step is complete: it is kept)

At each safe point the ranks agree through one all-reduce (MAX) of a 2-element CPU tensor
`[stop, still_decoding]` on the world group (gloo on CPU; on GPUs the world group is
`cpu:gloo,cuda:nccl`, so this stays a host-side collective). If any rank has seen a signal, every
rank raises `StepAbandoned` from the same all-reduce: the step in flight is dropped before its
optimizer step (no partial update), the trainer puts back the state the step had consumed
(`StepState`) and saves the last completed step, then exits 0.

Why the rollout needs `drain`: the DP replicas decode different prompts and stop at different
decode steps (all rows of a replica finished), so a replica that is done keeps answering the
others' checks with `still_decoding=0` until no rank decodes any more; the ranks of one replica
(its TP x PP group) decode in lockstep. Multi-turn games call the generation loop several times
per rollout, a different number of times per replica: the drain is at the end of the whole
rollout phase, not of each call.

PP>1: megatron's 1F1B schedule interleaves point-to-point sends and receives between stages, in
an order that differs per stage (warm-up, steady state, cool-down); a world collective inside it
would pair up differently on each stage, and an exception half-way leaves the other stages
blocked in a receive. At PP>1 the update's safe points are therefore only its start and its end;
the decode steps (every stage runs every decode step) and the teacher micro-batches (each scored
through all stages before the next starts) stay safe points.

Under bare torchrun (what its agent does with each signal, see docs/reliability.md): SIGTERM is
forwarded to every worker, which stops as above; the agent SIGKILLs workers that are still alive
after its `--shutdown-timeout` (30 s by default). SIGUSR1 is not handled by the agent: it dies at
once and its workers would be orphaned, training on. `bind_to_launcher` therefore asks the kernel
to send each worker SIGTERM when its parent dies (`PR_SET_PDEATHSIG`), and every helper process a
rank starts (megatron's checkpoint writers) is bound to the rank the same way, with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_opcd.checkpointing import set_parent_death_signal
from megatron_opcd.errors import on_peer_failure

CHECK_EVERY = 8
"""Decode steps between two agreed checks of the rollout. One check is one tiny host all-reduce
(tens of microseconds on gloo at 8 ranks); a decode step of an 8B model is tens of milliseconds,
so a signal is acted on within ~1 s of decoding, at <1% cost."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Test-only fault injection (inert unless set): "STEP:SECONDS" sleeps SECONDS at every decode step
# of the rollouts of steps >= STEP, making a step as long as a real 4k-token rollout of a big model
# without burning the CI's CPU. Read once, when the trainer starts.
_SLOW_DECODE_ENV = "OPCD_TEST_SLOW_DECODE"


class StepAbandoned(Exception):
    """Every rank agreed to stop inside a step; the step is dropped (nothing of it applied)."""

    def __init__(self, where: str, signum: Optional[int]):
        super().__init__(f"step abandoned at {where}")
        self.where = where
        self.signum = signum


_FORK_HOOKED = False
_FORKING_FROM_MAIN = threading.local()


def bind_helpers_to_rank() -> None:
    """Every process this rank forks from its main thread (megatron's checkpoint writers) gets
    SIGKILL when the rank ends, however it ends: no helper outlives its rank. (A fork from another
    thread is left alone: the death signal follows the forking *thread*, which may end first.)
    The `spawn` writer manager binds itself (`checkpointing._ignore_stop_signals`)."""
    global _FORK_HOOKED
    if _FORK_HOOKED:
        return

    def before():
        _FORKING_FROM_MAIN.value = threading.current_thread() is threading.main_thread()

    def child():
        if getattr(_FORKING_FROM_MAIN, "value", False):
            set_parent_death_signal(signal.SIGKILL)

    os.register_at_fork(before=before, after_in_child=child)
    _FORK_HOOKED = True


@dataclass
class StepState:
    """What a step consumes before its optimizer step, put back when it is abandoned: the data
    position and the RNG states (dropout and megatron's tracker advance in the update). Weights,
    optimizer and LR schedule only change in the optimizer step, which is never interrupted."""

    data_position: int
    rng: dict


class Preemption:
    """The stop request of this rank and the agreed checks of all ranks (see the module docstring)."""

    def __init__(self, check_every: int = CHECK_EVERY):
        self.check_every = check_every
        self.signum: Optional[int] = None
        self.signalled_at: Optional[float] = None  # time.monotonic() of the first stop signal
        self._parent: Optional[int] = None
        self._slow_from, self._slow_seconds = _read_slow_decode()
        self.step = 0  # the step in flight (for the test hook)

    # -- set-up -------------------------------------------------------------------------------

    def install(self) -> None:
        """Handlers for SIGTERM/SIGUSR1 (main thread only), and, under torchrun, SIGTERM when the
        agent dies (bare torchrun dies of SIGUSR1 at once)."""
        if threading.current_thread() is not threading.main_thread():
            return  # embedded use: signals are the embedding program's business
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            self._parent = os.getppid()
            set_parent_death_signal(signal.SIGTERM)
        bind_helpers_to_rank()
        self._record_peers()

    def _record_peers(self) -> None:
        """(pid, host) of every rank, so that a survivor can name the rank it lost (one all-gather)."""
        if not dist.is_initialized():
            return
        me = torch.tensor([os.getpid(), _host_id()], dtype=torch.int64)
        everyone = [torch.zeros(2, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, me)
        self._peers = [(int(t[0]), int(t[1])) for t in everyone]
        self._rank = dist.get_rank()
        on_peer_failure(self.lost_ranks)

    def lost_ranks(self) -> Optional[str]:
        """Which ranks of this host have ended (their processes are gone), for the one-line error."""
        peers = getattr(self, "_peers", None)
        if not peers:
            return None
        host = _host_id()
        here = [r for r, (_, h) in enumerate(peers) if h == host and r != self._rank]
        dead = [r for r in here if not _alive(peers[r][0])]
        if dead:
            names = ", ".join(f"rank {r} (process {peers[r][0]})" for r in dead)
            return f"{names} on this host ended"
        elsewhere = len(peers) - len(here) - 1
        if elsewhere:
            return f"the ranks of this host are alive; one of the {elsewhere} ranks on other hosts was lost"
        return None

    def _handler(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum, self.signalled_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        """This rank saw a stop signal (or, under torchrun, lost its agent)."""
        if self.signum is None and self._parent is not None and os.getppid() != self._parent:
            self.signum, self.signalled_at = signal.SIGTERM, time.monotonic()  # the agent is gone, its death signal missed
        return self.signum is not None

    # -- the agreed checks --------------------------------------------------------------------

    def _poll(self, decoding: bool) -> tuple[bool, bool]:
        """(anyone asked to stop, anyone still decoding): one all-reduce over every rank."""
        flags = torch.tensor([1.0 if self.requested else 0.0, 1.0 if decoding else 0.0])  # [2] float32, CPU
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def agreed(self) -> bool:
        """Whether any rank asked to stop (every rank calls this at the same point)."""
        return self._poll(False)[0]

    def check(self, where: str) -> None:
        """A safe point between two pieces of a step: raise StepAbandoned on every rank at once."""
        if self._poll(False)[0]:
            raise StepAbandoned(where, self.signum)

    def decode_check(self, decode_step: int) -> None:
        """The generation loop's `between_steps` callback: every `check_every` decode steps."""
        if self._slow_seconds and self.step >= self._slow_from:
            time.sleep(self._slow_seconds)
        if (decode_step + 1) % self.check_every == 0 and self._poll(True)[0]:
            raise StepAbandoned(f"decode step {decode_step + 1} of the rollout", self.signum)

    def drain(self) -> None:
        """End of a rollout: answer the checks of ranks still decoding until none is."""
        while True:
            stop, decoding = self._poll(False)
            if stop:
                raise StepAbandoned("the end of the rollout", self.signum)
            if not decoding:
                return

    # -- what an abandoned step gives back ----------------------------------------------------

    @staticmethod
    def snapshot(data_position: int) -> StepState:
        from megatron_opcd.training.state import _rng_state

        return StepState(data_position, _rng_state())

    @staticmethod
    def restore(state: StepState) -> None:
        from megatron_opcd.training.state import _set_rng_state

        _set_rng_state(state.rng)


def _host_id() -> int:
    import hashlib
    import socket

    return int.from_bytes(hashlib.sha1(socket.gethostname().encode()).digest()[:7], "big")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_slow_decode() -> tuple[int, float]:
    raw = os.environ.get(_SLOW_DECODE_ENV)
    if not raw:
        return 0, 0.0
    step, _, seconds = raw.partition(":")
    return int(step), float(seconds)


def signal_name(signum: Optional[int]) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "from another rank"
    except ValueError:
        return str(signum)


Callback = Callable[[int], None]
