"""NeMo-Run executors sized for these recipes. nemo_run is imported when a helper is called.

Slurm: one srun task per GPU, no torchrun. `--signal=USR1@120` then reaches the training processes
themselves (torchrun would be killed by SIGUSR1, whose default action is to terminate), and the
trainer checkpoints and exits 0. NeMo-Run does not requeue a job that exits 0: submit the same
recipe again and it resumes from the latest checkpoint in checkpoint.save.
"""

from __future__ import annotations

from typing import Optional, Sequence

# What Megatron wants on H100 nodes (the same as slurm/common.sh).
H100_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
}


def local_executor(ntasks_per_node: int = 1, env_vars: Optional[dict] = None):
    """This machine: torchrun with `ntasks_per_node` processes (gloo on CPU, nccl with GPUs)."""
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher="torchrun",
                             env_vars={"OMP_NUM_THREADS": "1", **(env_vars or {})})


def slurm_executor(*, account: str, partition: Optional[str] = None, nodes: int = 1, gpus_per_node: int = 8,
                   time: str = "04:00:00", container_image: Optional[str] = None,
                   container_mounts: Sequence[str] = (), job_dir: Optional[str] = None, tunnel=None,
                   env_vars: Optional[dict] = None, signal_seconds: int = 120):
    """A Slurm executor: `nodes` x `gpus_per_node` tasks, exclusive nodes, SIGUSR1 `signal_seconds`
    before the time limit. `tunnel` defaults to submitting from this host (`run.LocalTunnel`);
    pass `run.SSHTunnel(...)` to submit from a laptop."""
    import nemo_run as run

    if tunnel is None:
        tunnel = run.LocalTunnel(job_dir=job_dir or "nemo_experiments")
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        exclusive=True,
        time=time,
        signal=f"USR1@{signal_seconds}",
        container_image=container_image,
        container_mounts=list(container_mounts),
        env_vars={**H100_ENV, **(env_vars or {})},
        tunnel=tunnel,
    )
