"""The only module that touches megatron.core.parallel_state.

`initialize()` starts torch.distributed (NCCL with CUDA, gloo without), megatron's parallel state
for TP / PP / DP / EP (and sequence parallelism, which is a model option), seeds the model-parallel
RNG states, and returns a `ParallelGroups`: the explicit process groups and ranks that the rest
of the code takes as arguments (STYLE habit 1). `destroy()` tears it all down. On a host without
CUDA the caller opts into CPU mode first (`megatron_opcd.compat.enable_cpu()`); `initialize` says
so if it did not.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opcd.config import ParallelConfig
from megatron_opcd.errors import ConfigError


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and ranks of this process. A group is None where its size is 1 and no
    process group exists (single-process use without torch.distributed)."""

    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    sequence_parallel: bool
    pp_last_global_rank: int
    pg_collection: object = None
    """megatron.core.process_groups_config.ProcessGroupCollection of the same groups."""
    ep_group: Optional[dist.ProcessGroup] = None
    """Expert-parallel group: the ranks that split the experts of an MoE layer (None: no EP)."""
    ep_rank: int = 0
    ep_size: int = 1
    expert_tp_group: Optional[dist.ProcessGroup] = None
    """Expert tensor-parallel group: the ranks that split each expert's weights."""
    expert_tp_rank: int = 0
    expert_tp_size: int = 1
    expert_dp_group: Optional[dist.ProcessGroup] = None
    """Expert data-parallel group: the replicas of this rank's experts (their gradients are reduced over it)."""
    expert_dp_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def tp_src_global_rank(self) -> int:
        """Global rank of TP rank 0 of this rank's TP group (for broadcasts of decisions)."""
        if self.tp_group is None:
            return dist.get_rank() if dist.is_initialized() else 0
        return dist.get_global_rank(self.tp_group, 0)


_GROUPS: Optional[ParallelGroups] = None


def initialize(parallel: ParallelConfig | None = None, *, seed: Optional[int] = None) -> ParallelGroups:
    """Initialise torch.distributed and megatron's parallel state from the launcher's environment
    (torchrun / srun / `megatron_opcd.launcher` set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Without those variables, a single process group of size 1 is created on a free local port, so
    single-process tools and tests use the same code path as multi-rank runs.
    """
    global _GROUPS
    from megatron.core import parallel_state, tensor_parallel

    from megatron_opcd.compat import cpu

    parallel = parallel or ParallelConfig()
    if not torch.cuda.is_available() and not cpu.is_applied():
        raise RuntimeError("this host has no CUDA and CPU mode is off: call megatron_opcd.compat.enable_cpu() once "
                           "before megatron_opcd.parallel.initialize() (the CLIs, the launcher's ranks and the "
                           "tests do)")
    device = local_gpu()  # before any collective: a rank without a GPU says so instead of hanging its peers
    if not dist.is_initialized():
        _init_process_group(parallel)
    world = dist.get_world_size()
    parallel.check_world_size(world)
    if device is not None:
        torch.cuda.set_device(device)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
        # gloo groups are only needed by the distributed optimizer's CPU-side checkpointing.
        create_gloo_process_groups=parallel.use_distributed_optimizer,
    )
    base_seed = parallel.seed if seed is None else seed
    tensor_parallel.model_parallel_cuda_manual_seed(base_seed, force_reset_rng=True)
    _GROUPS = _collect(parallel)
    if dist.get_rank() == 0 and not _announced():
        print(f"[megatron-opcd] {dist.get_world_size()} rank(s), backend {dist.get_backend()}, "
              f"TP={_GROUPS.tp_size} PP={_GROUPS.pp_size} DP={_GROUPS.dp_size}"
              f"{f' EP={_GROUPS.ep_size}' if _GROUPS.ep_size > 1 else ''}; megatron-core {_mcore_version()}; "
              f"{_implementations()}", flush=True)
    return _GROUPS


def local_gpu() -> Optional[int]:
    """This rank's GPU (`LOCAL_RANK`: one rank per GPU, as torchrun and srun start them), or None
    without CUDA. A local rank past the host's GPUs is a ConfigError naming both numbers (NCCL
    refuses two ranks on one GPU)."""
    if not torch.cuda.is_available():
        return None
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise ConfigError(f"local rank {local} has no GPU of its own: this host has {count} GPU(s), one rank "
                          f"per GPU; start at most {count} rank(s) per node (e.g. --nproc-per-node {count})")
    return local


_ANNOUNCED = False


def _announced() -> bool:
    global _ANNOUNCED
    seen, _ANNOUNCED = _ANNOUNCED, True
    return seen or os.environ.get("OPCD_QUIET") == "1"


def _mcore_version() -> str:
    from megatron_opcd.compat.cpu import installed_version

    return installed_version()


def _implementations() -> str:
    from megatron_opcd.compat.optional import apex_status, transformer_engine_status

    if not torch.cuda.is_available():
        return "CPU: megatron-core local layer spec, torch norms and optimizers (no Transformer Engine/apex/FP8)"
    te, _ = transformer_engine_status()
    apex, _ = apex_status()
    return f"CUDA: Transformer Engine {'available' if te else 'missing'}, apex {'available' if apex else 'missing'}"


def process_group_backend(parallel: ParallelConfig) -> str:
    """torch.distributed's backend string for `parallel.backend`.

    With NCCL (the default with CUDA), host tensors still take part in collectives: the trainer's
    metric sums, stop flags and evaluation counts are small CPU tensors. NCCL reduces only CUDA
    tensors, so the process groups get gloo for the CPU beside NCCL for the GPU
    (`cpu:gloo,cuda:nccl`); megatron's groups, created without a backend, inherit both."""
    backend = parallel.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA; use parallel.backend=gloo (or null) on CPU")
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def _init_process_group(parallel: ParallelConfig) -> None:
    backend = process_group_backend(parallel)
    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    if "RANK" not in os.environ:
        # A single process without a launcher: a group of one, on a free local port. The
        # environment stays untouched (child processes must not inherit a stale MASTER_PORT).
        from megatron_opcd.launcher import free_port

        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend=backend, timeout=timeout)


def _collect(parallel: ParallelConfig) -> ParallelGroups:
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        sequence_parallel=parallel.sequence_parallel,
        pp_last_global_rank=ps.get_pipeline_model_parallel_last_rank(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        ep_group=ps.get_expert_model_parallel_group(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        expert_tp_group=ps.get_expert_tensor_parallel_group(),
        expert_tp_rank=ps.get_expert_tensor_parallel_rank(),
        expert_tp_size=ps.get_expert_tensor_parallel_world_size(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        expert_dp_size=ps.get_expert_data_parallel_world_size(),
    )


def teacher_groups(tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> ParallelGroups:
    """A frozen teacher's own layout in the same world (`teacher.parallel`): new torch.distributed
    groups for TP x PP x DP over all ranks, in megatron's rank order (TP fastest, then DP, then PP:
    global rank = tp + TP * (dp + DP * pp)), with their own ProcessGroupCollection for GPTModel's
    `pg_collection`. Call on every rank, after `initialize()`, in the same order (group creation is
    collective). Context parallelism stays 1 (the student's singleton CP group is reused); the
    teacher never trains, so no gradient or optimizer groups beyond DP exist."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    world, me = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ConfigError(f"the teacher's layout TP x PP = {tp} x {pp} does not divide the world of {world} ranks; "
                          f"set teacher.parallel sizes whose product divides {world}")
    dp = world // (tp * pp)

    def rank(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    def make(lists: list[list[int]]):
        """Every rank creates every group (collective); this rank keeps the one it is in."""
        mine = None
        for ranks in lists:
            g = dist.new_group(ranks)
            if me in ranks:
                mine = g
        return mine

    tp_g = make([[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)])
    pp_lists = [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    pp_g = make(pp_lists)
    dp_g = make([[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)])
    mp_g = make([[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])
    # The tied embedding's group (first and last stage) and the position embedding's (first stage);
    # megatron's finalize_model_grads reads them, GPTModel's constructor stores them.
    embd_g = make([sorted({r[0], r[-1]}) for r in pp_lists])
    pos_g = make([[r[0]] for r in pp_lists])
    t_rank, d_rank, p_rank = me % tp, (me // tp) % dp, me // (tp * dp)
    pgs = ProcessGroupCollection()
    pgs.tp, pgs.pp, pgs.mp, pgs.dp, pgs.embd, pgs.pos_embd = tp_g, pp_g, mp_g, dp_g, embd_g, pos_g
    pgs.cp = ps.get_context_parallel_group()  # CP = 1: this rank alone, the same for both models
    pgs.tp_cp, pgs.dp_cp, pgs.tp_dp_cp = tp_g, dp_g, make([list(range(world))])
    return ParallelGroups(
        tp_group=tp_g, pp_group=pp_g, dp_group=dp_g, tp_rank=t_rank, tp_size=tp, pp_rank=p_rank, pp_size=pp,
        dp_rank=d_rank, dp_size=dp, sequence_parallel=False, pp_last_global_rank=rank(t_rank, d_rank, pp - 1),
        pg_collection=pgs,
    )


def groups() -> ParallelGroups:
    """The groups of the current `initialize()`."""
    if _GROUPS is None:
        raise RuntimeError("megatron_opcd.parallel.initialize() has not been called in this process")
    return _GROUPS


def dp_share(n: int, dp_rank: int, dp_size: int) -> slice:
    """This data-parallel replica's contiguous share of `n` items (examples, prompts, levels):
    ceil(n / dp_size) each in rank order, so the last replicas may get fewer, or none (a replica
    with none must still join the collectives that follow)."""
    per = -(-n // dp_size)  # ceil
    return slice(min(n, dp_rank * per), min(n, (dp_rank + 1) * per))


def is_initialized() -> bool:
    return _GROUPS is not None


def destroy() -> None:
    """Tear down megatron's parallel state and torch.distributed."""
    global _GROUPS
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUPS = None

