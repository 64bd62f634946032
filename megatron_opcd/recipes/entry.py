"""What a NeMo-Run recipe runs on every rank: the trainer, from a config held in the recipe itself.

`train_from_dict` is the target of every recipe's `run.Partial`. It is a plain function (no
nemo_run import), so the recipe's serialised form needs nothing but this package on the nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import yaml


def _master_from_slurm() -> None:
    """Under NeMo-Run's Slurm executor without torchrun (one srun task per GPU), the rendezvous host
    is the first node of the allocation. `scontrol` expands ranges such as `gpu-[01-04]`."""
    if "MASTER_ADDR" in os.environ or "SLURM_JOB_NODELIST" not in os.environ or "RANK" in os.environ:
        return
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               check=True, capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return  # megatron_opcd.train falls back to the node list itself
    if hosts:
        os.environ["MASTER_ADDR"] = hosts[0]


def train_from_dict(config: dict, overrides: Sequence[str] = (), expected_world_size: Optional[int] = None) -> int:
    """Run `python -m megatron_opcd.train --config <config as YAML> overrides...` in this process.

    `expected_world_size` (nodes x GPUs the recipe was built for) is checked against the launch,
    so an executor sized differently from the recipe fails at once with the reason.
    """
    from megatron_opcd import train

    _master_from_slurm()
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
    if expected_world_size is not None and world is not None and int(world) != expected_world_size:
        raise SystemExit(f"this recipe was built for {expected_world_size} processes but {world} were launched; "
                         "build the recipe with the executor's nodes and gpus_per_node")
    # Every rank writes its own copy: no shared file system or rank-0 ordering needed.
    with tempfile.TemporaryDirectory(prefix="opcd-recipe-") as tmp:
        path = Path(tmp) / "config.yaml"
        # A JSON round trip drops YAML anchors (shared sub-dicts) before dumping.
        path.write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False), encoding="utf-8")
        rc = train.main(["--config", str(path), *overrides])
    if rc:
        raise SystemExit(rc)
    return 0
