"""Preemption inside a step, under real torchrun with 2 ranks (training/preempt.py).

Steps from step 2 on are made to last over 60 s (`OPCD_TEST_SLOW_DECODE=2:0.5`: 0.5 s per
decode step, up to 128 decode steps per rollout), as a 4k-token rollout of an 8B model does. The signal
lands in the middle of step 2's rollout:

* SIGTERM to the torchrun agent: the agent forwards it, both workers stop at the next agreed
  check, save step 1 (the last completed step) and exit 0 well before the agent's 30 s SIGKILL;
  the resumed run's losses are those of an uninterrupted run, to the bit;
* SIGUSR1 to a bare torchrun agent (it dies of it at once): the workers are told by the kernel
  (parent-death signal) and stop the same way instead of training on orphaned;
* SIGUSR1 as the sbatch scripts deliver it (batch shell -> srun -> slurm/task.sh -> workers,
  torchrun ignoring it), with a stub `srun` that runs its command line: exit 0 and a requeue;
* a rank SIGKILLed mid-step: the other exits non-zero within seconds with one line naming the
  lost rank; step 1's checkpoint is intact; no helper process of the killed rank lives on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from _train_fixtures import make_run
from ._helpers import (
    REPO, TORCHRUN, Job, assert_no_fake_checkpoint, error_lines, step_dirs, subprocess_env, train_steps, wait_for,
)

pytestmark = pytest.mark.slow
SLOW = "2:0.5"  # OPCD_TEST_SLOW_DECODE: from step 2, 0.5 s per decode step (128 steps: a 64 s rollout)
STOP_WITHIN = 20.0  # seconds from the signal to "checkpointed ..., exiting" (stopped and saved)
END_WITHIN = 20.0  # seconds from the signal to the end of the job (the bound), well inside
#                   torchrun's --shutdown-timeout of 30 s, after which it SIGKILLs its workers (SLURM's
#                   KillWait is 30 s too). A worker exits at once after its checkpoint (train.exit_now):
#                   2-3 s from the signal on an idle 2-core box.


def _config(root: Path) -> Path:
    cfg = make_run(root, steps=3, extra={"checkpoint.interval": 0, "checkpoint.keep_last": 0, "data.eval": None,
                                         "generation.max_new_tokens": 128, "parallel.distributed_timeout_minutes": 1})
    doc = yaml.safe_load(cfg.read_text())
    for model in (doc["model"], doc["teacher"]["model"]):
        model["max_position_embeddings"] = 192  # 48-token prompts + 128 new tokens
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def _torchrun(cfg: Path, run: str, *, slow: bool, tag: str = "", overrides=(), launch: str = "first",
              opcd: bool = False) -> Job:
    """torchrun (`opcd`: opcd-torchrun), 2 ranks, run folder root/run; each rank's output in
    root/run/tr-<launch>/*/attempt_0/RANK/."""
    root = cfg.parent
    agent = [sys.executable, "-m", "megatron_opcd.torchrun"] if opcd else [TORCHRUN]
    cmd = [*agent, "--standalone", "--nproc-per-node", "2", "--redirects", "3", "--log-dir",
           str(root / run / f"tr-{launch}"),
           "-m", "megatron_opcd.train", "--config", str(cfg), f"checkpoint.save={root / run / 'ckpt'}",
           f"logging.dir={root / run / 'logs'}", *overrides]
    env = subprocess_env(**({"OPCD_TEST_SLOW_DECODE": SLOW} if slow else {}), OPCD_TEST_TAG=tag or uuid.uuid4().hex)
    return Job(cmd, root / run / "jobs", env)


def _rank_stderr(root: Path, run: str, launch: str = "first") -> dict[int, str]:
    return {int(p.parent.name): p.read_text() for p in (root / run / f"tr-{launch}").glob("*/attempt_0/*/stderr.log")}


def _losses(root: Path, run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_steps(root / run / "logs" / "metrics.jsonl")}


def _tagged(tag: str) -> list[psutil.Process]:
    """Every live process started for one job (they inherit OPCD_TEST_TAG)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("OPCD_TEST_TAG") == tag:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _logged(files, needle: str, since: float, timeout: float) -> float:
    """Seconds from `since` until `needle` appears in one of `files()` (inf after `timeout`)."""
    while time.monotonic() - since < timeout:
        for f in files():
            if needle in f.read_text(errors="replace"):
                return time.monotonic() - since
        time.sleep(0.1)
    return float("inf")


def _rank_logs(root: Path, run: str, launch: str = "first"):
    return lambda: list((root / run / f"tr-{launch}").glob("*/attempt_0/0/stderr.log"))


def _in_step_2(root: Path, run: str, job: Job, *, saved: bool = False) -> None:
    """Wait until step 1 is logged (and, with `saved`, checkpointed), then 3 s more: step 2's
    rollout is under way (its decode steps take 0.5 s each)."""
    done = (lambda: (root / run / "ckpt" / "step_0000001" / "opcd_checkpoint.json").is_file()) if saved else (
        lambda: 1 in _losses(root, run))
    wait_for(done, 300, job, "step 1")
    time.sleep(3)


def _assert_stopped_cleanly(root: Path, run: str, signal_name: str, steps=None, losses=None) -> None:
    """`steps`, `losses`: the run's checkpoint folders and logged losses as they were at the job's
    end, before a resumption (default: now)."""
    per_rank = _rank_stderr(root, run)
    assert sorted(per_rank) == [0, 1], per_rank
    for rank, err in per_rank.items():
        assert "Traceback" not in err and not error_lines(err), f"rank {rank}:\n{err[-3000:]}"
    assert f"signal {signal_name}: step 2 abandoned at decode step" in per_rank[0], per_rank[0][-3000:]
    assert re.search(r"checkpointed at step 1 \(stopped [0-9.]+s after the signal, saved in [0-9.]+s\), exiting",
                     per_rank[0]), per_rank[0][-3000:]
    ckpt = root / run / "ckpt"
    assert (steps if steps is not None else [d.name for d in step_dirs(ckpt)]) == ["step_0000001"]
    assert json.loads((ckpt / "step_0000001" / "opcd_checkpoint.json").read_text())["step"] == 1
    assert_no_fake_checkpoint(ckpt)
    assert sorted(losses if losses is not None else _losses(root, run)) == [1], "the abandoned step was logged"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted reference run, one SIGTERM run and its resumption."""
    root = tmp_path_factory.mktemp("preempt")
    cfg = _config(root)
    seen: dict = {"root": root}
    ref = _torchrun(cfg, "ref", slow=False)
    seen["ref_rc"] = ref.wait(300)
    seen["ref_err"] = ref.stderr

    job = _torchrun(cfg, "term", slow=True, opcd=True)
    try:
        _in_step_2(root, "term", job)
        sent = time.monotonic()
        job.signal(signal.SIGTERM)  # the agent only, as `kill <torchrun pid>` does
        seen["term_saved"] = _logged(_rank_logs(root, "term"), "exiting", sent, 60)
        seen["term_rc"] = job.wait(60)
        seen["term_took"] = time.monotonic() - sent
    finally:
        job.kill_group()
    seen["term_agent"] = job.stderr
    seen["term_losses"] = _losses(root, "term")
    seen["term_steps"] = [d.name for d in step_dirs(root / "term" / "ckpt")]  # before the resumption adds 2, 3

    resumed = _torchrun(cfg, "term", slow=False, launch="resume")
    seen["resume_rc"] = resumed.wait(300)
    seen["resume_err"] = _rank_stderr(root, "term", "resume")
    return seen


@pytest.mark.timeout(900)
def test_sigterm_to_torchrun_agent_stops_within_seconds(runs):
    """torchrun's agent (opcd-torchrun: torch.distributed.run's own main) forwards SIGTERM to its
    workers; both stop inside step 2's 64 s rollout, save step 1 and exit 0 -- well before the
    agent's 30 s deadline, after which it would SIGKILL them -- and the job exits 0 (plain torchrun
    exits 1 after a SIGTERM whatever its workers did: torch's SignalException)."""
    root = runs["root"]
    print(f"SIGTERM to opcd-torchrun: stopped and saved in {runs['term_saved']:.1f}s, job ended in {runs['term_took']:.1f}s")
    assert runs["ref_rc"] == 0, runs["ref_err"][-3000:]
    assert runs["term_saved"] < STOP_WITHIN, f"{runs['term_saved']:.1f}s from SIGTERM to stopped and saved"
    assert runs["term_took"] < END_WITHIN, f"{runs['term_took']:.1f}s from SIGTERM to the end of the job"
    assert runs["term_rc"] == 0, runs["term_agent"][-2000:]
    assert "Received 15 death signal" in runs["term_agent"], runs["term_agent"][-2000:]
    assert "SIGTERM: every worker stopped after checkpointing step 1; exit 0" in runs["term_agent"]
    assert "forcefully exiting" not in runs["term_agent"], "a worker had to be SIGKILLed"
    _assert_stopped_cleanly(root, "term", "SIGTERM", steps=runs["term_steps"], losses=runs["term_losses"])


@pytest.mark.timeout(900)
def test_resume_after_preemption_equals_uninterrupted(runs):
    """The abandoned step 2 is redone: steps 2 and 3 have the uninterrupted run's losses exactly."""
    assert runs["resume_rc"] == 0, runs["resume_err"]
    ref = _losses(runs["root"], "ref")
    got = _losses(runs["root"], "term")
    assert sorted(ref) == [1, 2, 3] and sorted(got) == [1, 2, 3], (ref, got)
    assert got == ref
    assert "resumed from" in runs["resume_err"][0] and "at step 1" in runs["resume_err"][0]


@pytest.mark.timeout(600)
def test_sigusr1_to_bare_torchrun_agent(tmp_path):
    """The agent dies of SIGUSR1 at once (it handles SIGTERM, SIGINT, SIGHUP, SIGQUIT only);
    its workers get SIGTERM from the kernel (parent-death signal) and stop as above. On a
    trainer without it they trained on, orphaned, and wrote no checkpoint."""
    cfg = _config(tmp_path)
    tag = uuid.uuid4().hex
    job = _torchrun(cfg, "usr1", slow=True, tag=tag)
    try:
        _in_step_2(tmp_path, "usr1", job)
        sent = time.monotonic()
        job.signal(signal.SIGUSR1)
        assert job.proc.wait(30) == -signal.SIGUSR1
        saved = _logged(_rank_logs(tmp_path, "usr1"), "exiting", sent, 60)
        deadline = sent + END_WITHIN
        while _tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _tagged(tag)
        took = time.monotonic() - sent
    finally:
        for p in _tagged(tag):
            p.kill()
        job.kill_group()
    print(f"SIGUSR1 to bare torchrun: stopped and saved in {saved:.1f}s, every process gone in {took:.1f}s")
    assert not left, f"{len(left)} process(es) of the job still running {took:.0f}s after SIGUSR1: {left}"
    assert saved < STOP_WITHIN, f"{saved:.1f}s from SIGUSR1 to stopped and saved"
    _assert_stopped_cleanly(tmp_path, "usr1", "SIGTERM")


_STUB_SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command line (bash slurm/task.sh ...) in its place.
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --*=*) shift ;; --kill-on-bad-exit*) shift ;; --*) shift 2 ;; *) shift ;; esac
done
exec "$@"
"""
_STUB_SCONTROL = """#!/bin/bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "stub scontrol: requeue $2" ;;
esac
"""


def _stub_slurm(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", _STUB_SRUN), ("scontrol", _STUB_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    bin_dir = Path(TORCHRUN).parent
    return {"PATH": f"{folder}:{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rehearse",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "OPCD_GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


@pytest.mark.timeout(600)
def test_sigusr1_as_the_sbatch_script_delivers_it(tmp_path):
    """`#SBATCH --signal=B:USR1@N` signals the batch shell: it passes SIGUSR1 to srun, whose task
    (slurm/task.sh) hands it to the workers (torchrun ignores it); they stop, the job exits 0 and
    is requeued."""
    cfg = _config(tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f"OPCD_ROOT={REPO}\nsource \"$OPCD_ROOT/slurm/common.sh\"\nopcd_defaults\n"
        f"opcd_run {os.path.relpath(cfg, REPO)} logging.dir={tmp_path / 'sb' / 'logs'} -- \"$@\"\n")
    from megatron_opcd.launcher import free_port

    env = subprocess_env(OPCD_TEST_SLOW_DECODE=SLOW, MASTER_PORT=str(free_port()), OPCD_RUNS=str(tmp_path / "runs"), OPCD_LOGS=str(tmp_path / "sl"),
                         **_stub_slurm(tmp_path / "stubs"))
    job = Job(["bash", str(script)], tmp_path / "jobs", env)
    try:
        wait_for(lambda: 1 in _losses(tmp_path, "sb"), 300, job, "step 1")
        time.sleep(3)
        sent = time.monotonic()
        job.signal(signal.SIGUSR1)  # the batch shell only, as SLURM's B: prefix does
        saved = _logged(lambda: [job.out_path, job.err_path], "exiting", sent, 60)
        rc = job.wait(60)
        took = time.monotonic() - sent
    finally:
        job.kill_group()
    print(f"SIGUSR1 as sbatch delivers it: stopped and saved in {saved:.1f}s, job ended in {took:.1f}s")
    assert rc == 0, job.stderr[-3000:] + job.stdout[-3000:]
    assert saved < STOP_WITHIN, f"{saved:.1f}s from SIGUSR1 to stopped and saved"
    assert took < END_WITHIN, f"{took:.1f}s from SIGUSR1 to the end of the job"
    assert "SIGUSR1: asking the trainer to checkpoint and stop" in job.stdout
    assert "stub scontrol: requeue 4242" in job.stdout, job.stdout[-2000:]
    out = job.stdout + job.stderr
    assert "signal SIGUSR1: step 2 abandoned at decode step" in out, out[-3000:]
    ckpt = tmp_path / "runs" / "rehearse"
    assert [d.name for d in step_dirs(ckpt)] == ["step_0000001"]
    assert_no_fake_checkpoint(ckpt)


@pytest.mark.timeout(600)
def test_rank_killed_mid_step(tmp_path):
    """Rank 1 is SIGKILLed in the middle of step 2 (step 1 saved: its checkpoint writer's helper
    process exists). Rank 0 fails its next agreed check and ends with one line naming rank 1;
    the job ends within seconds; step 1's checkpoint is intact; nothing of rank 1 lives on."""
    cfg = _config(tmp_path)
    tag = uuid.uuid4().hex
    job = _torchrun(cfg, "kill", slow=True, tag=tag, overrides=["checkpoint.interval=1"])
    try:
        _in_step_2(tmp_path, "kill", job, saved=True)
        # Rank 1's trainer (its helpers inherit RANK=1 too, but run multiprocessing's spawn code).
        victim = next(p for p in _tagged(tag) if p.environ().get("RANK") == "1"
                      and "megatron_opcd.train" in p.cmdline())
        helpers = [c.pid for c in victim.children(recursive=True)]
        victim.kill()
        killed = time.monotonic()
        rc = job.wait(120)
        took = time.monotonic() - killed
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in helpers) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in helpers if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in _tagged(tag):
            p.kill()
        job.kill_group()
    print(f"rank 1 SIGKILLed: the job ended in {took:.1f}s")
    assert helpers, "rank 1 had no helper process: the case does not test what it says"
    assert not left, f"helper process(es) {left} of the killed rank 1 outlived it"
    assert rc != 0
    assert took < 60, f"the job took {took:.0f}s to end after rank 1 died"
    rank0 = _rank_stderr(tmp_path, "kill")[0]
    assert "Traceback" not in rank0, rank0[-3000:]
    lines = error_lines(rank0)
    assert len(lines) == 1 and lines[0][0] == 0, rank0[-3000:]
    assert "lost contact with another rank: rank 1 (process" in lines[0][1] and "resume" in lines[0][1], lines[0][1]
    ckpt = tmp_path / "kill" / "ckpt"
    assert [d.name for d in step_dirs(ckpt)] == ["step_0000001"]
    assert_no_fake_checkpoint(ckpt)
