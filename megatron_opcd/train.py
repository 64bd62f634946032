"""`torchrun --nproc-per-node N -m megatron_opcd.train --config FILE [key=value ...]`

Also under `srun` (SLURM's variables are mapped to torchrun's). Errors in the configuration or the
data end the job with one line naming the problem and the fix, and a non-zero exit, on every rank;
`logging.debug: true` in the config or `logging.debug=true` on the command line (or OPCD_DEBUG=1)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys


def _srun_env() -> None:
    """Map SLURM's per-task variables to torchrun's when launched by `srun` without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu-a[017-018,020],gpu-b1` -> `gpu-a017`.

    (The sbatch scripts use `scontrol show hostnames`; this covers `srun` without them.)"""
    head = nodelist.strip()
    bracket = head.find("[")
    comma = head.find(",")
    if bracket == -1 or (comma != -1 and comma < bracket):
        return head.split(",")[0]
    prefix, ranges = head[:bracket], head[bracket + 1:head.index("]", bracket)]
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_opcd.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. schedule.steps=10")
    return p.parse_args(argv)


def run(config_path, overrides) -> dict:
    import torch

    from megatron_opcd import parallel
    from megatron_opcd.compat import enable_cpu
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    enable_cpu()  # no CUDA here: megatron-core's CUDA assumptions patched (a no-op with CUDA)
    groups = parallel.initialize(cfg.parallel)
    try:
        # One trainer; a `game:` section makes its rollout source text games (training/games.py).
        return Trainer(cfg, groups).train()
    finally:
        from megatron_opcd.training.state import release_locks

        release_locks()  # this run's checkpoint.save lock (also released at exit)
        parallel.destroy()


def main(argv=None) -> int:
    from megatron_opcd.errors import run_cli

    args = parse_args(argv)
    _srun_env()
    from megatron_opcd.config import peek_setting

    # From the YAML and the overrides alike (the same parser as the config's), before the config
    # is validated: it decides how that validation's own errors are shown.
    debug = os.environ.get("OPCD_DEBUG") == "1" or peek_setting(args.config, args.overrides, "logging.debug") is True
    outcome: dict = {}
    rc = run_cli(lambda: outcome.update(run(args.config, args.overrides)), debug=debug)
    if rc == 0 and (outcome.get("last") or {}).get("stopped_by_signal"):
        from megatron_opcd.torchrun import record_clean_stop

        record_clean_stop(outcome["step"])  # opcd-torchrun then exits 0 too (plain torchrun exits 1)
        exit_now(0)
    return rc


def exit_now(rc: int) -> None:
    """End the process at once, after a stop signal's checkpoint.

    By then the checkpoint is written and verified, the metrics file closed, the run's lock released
    and the process groups destroyed. What the interpreter's teardown would still do (collecting
    torch's and megatron-core's modules, joining the checkpoint writer's helper at exit) takes from
    one to tens of seconds on a loaded host: time a preempted job does not have (torchrun SIGKILLs
    its workers 30 s after forwarding SIGTERM; SLURM kills at the time limit). The helper process
    is bound to this one (PR_SET_PDEATHSIG) and ends with it."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
