#!/usr/bin/env python
"""Rehearse the paper's example configs end to end on CPU ranks (`make rehearsal`).

    python tools/rehearse.py [--work DIR] [--only NAME ...] [--keep]

For each `examples/opcd_*.yaml`, as a user has it, through its own `slurm/<name>.sbatch` (with a stub
`srun` that runs its command line and a stub `scontrol`), changing only what a CPU needs:

* the model made tiny, same family and options (GQA, QK-norm, biases, tied or not, rope scaling;
  the teacher larger than the student where the example's is), fp32, local layers, gloo;
* the topology scaled down keeping its shape (tp2pp1: 4 ranks, TP=2 x DP=2 with its sequence
  parallelism and distributed optimizer; tp1pp1: 2 ranks, DP=2; a teacher with its own layout keeps
  it, e.g. TP=2 on those 2 ranks), batch 4, 8 new tokens per turn;
* its data made by examples/prepare_data.py from the small files in tests/fixtures/rehearsal (the
  real sets' formats: parquet, CSV, JSONL), its context (system prompt file or experience pool)
  and evaluation task on, and "converted checkpoints" written as the trainer writes them.

One example: launch 1 trains steps 1-2 with an evaluation and a checkpoint at step 2, then step 3 is
made slow (OPCD_TEST_SLOW_DECODE) and SIGUSR1 goes to the batch shell as `--signal=B:USR1@N` sends
it: the job must exit 0 with step 2 saved and ask for a requeue. Launch 2 (the requeued job)
resumes and finishes step 3. Its checkpoint is exported with megatron-to-hf and loaded by
transformers (one export per model family unless --export-all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout: the package beside it
from megatron_opcd.config import cluster_topology as _cluster_topology  # noqa: E402
FIXTURES = REPO / "tests" / "fixtures" / "rehearsal"
# The cluster settings: a topology in the name (`_1n8g_`); the CPU example of the shipped model
# (opcd_smollm2-135m_cpu_dp2) has its own end-to-end test, tests/test_user_path.py.
EXAMPLES = sorted(p for p in (REPO / "examples").glob("opcd_*.yaml") if _cluster_topology(p) is not None)
RANKS = 4  # a TP or PP example: TP x PP x DP = 4 (tp2pp1: TP = 2 x DP = 2)
RANKS_DP = 2  # a tp1pp1 example: DP = 2 (half the processes to start: ~6 CPU-s of imports each)
SLOW = "3:0.4"  # step 3's 8 decode steps take 0.4 s each: the signal (0.5 s in) lands inside its rollout
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TINY_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings",
               "params_dtype", "transformer_impl", "fp8")
MOE_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size")  # an MoE model's, shrunk too

STUB_SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command line (bash slurm/task.sh ...) in its place.
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --*=*) shift ;; --*) shift 2 ;; *) shift ;; esac
done
exec "$@"
"""
STUB_SCONTROL = """#!/bin/bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "stub scontrol: requeue $2" ;;
esac
"""


class RehearsalError(AssertionError):
    pass


def _check(cond: bool, what: str, log: str = "") -> None:
    if not cond:
        raise RehearsalError(what + (f"\n--- log tail ---\n{log[-4000:]}" if log else ""))


# ------------------------------------------------------------------------------------------------
# the world: data, tokenizer, tiny checkpoints


def ranks_of(name: str) -> int:
    """The rehearsal's world size for an example: 4 where it has TP or PP, else 2 (DP only)."""
    from megatron_opcd.training.config import load_train_config

    p = load_train_config(str(REPO / "examples" / f"{name}.yaml")).parallel
    return RANKS if p.tensor_model_parallel_size * p.pipeline_model_parallel_size > 1 else RANKS_DP


def stub_slurm(folder: Path, *, job_name: str, job_id: str = "4242", ranks: int = RANKS) -> dict:
    """Environment of a fake one-node allocation: stub srun/scontrol first on PATH."""
    from megatron_opcd.launcher import free_port

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    bin_dir = Path(sys.executable).parent  # torchrun of this environment
    return {"PATH": f"{folder}:{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": job_name,
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "OPCD_GPUS_PER_NODE": str(ranks), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}


def _py(*args: str, cwd: Path = REPO) -> None:
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    _check(res.returncode == 0, f"{' '.join(args)} failed ({res.returncode})", res.stdout + res.stderr)


def prepare_data(data: Path) -> None:
    """examples/prepare_data.py on the fixtures, and the game level files, as examples/README.md says."""
    f = FIXTURES
    prep = str(REPO / "examples" / "prepare_data.py")
    _py(prep, "dapo-math", "--input", str(f / "dapo-math-17k.parquet"), "--out", str(data), "--eval-size", "4")
    _py(prep, "medmcqa", "--input", str(f / "medmcqa-train.parquet"), "--eval-input", str(f / "medmcqa-validation.parquet"),
        "--out", str(data))
    _py(prep, "safety", "--tweeteval", str(f / "tweeteval-hate-train.parquet"), "--hatecheck", str(f / "hatecheck.csv"),
        "--ethos", str(f / "ethos.csv"), "--out", str(data), "--eval-size", "4")
    _py(prep, "prompts", "--out", str(data))
    for folder, game in (("dapo-math-17k", None), ("frozenlake", "frozen_lake"), ("sokoban", "sokoban")):
        _py(prep, "experience", "--input", str(f / "experience.txt"), "--out", str(data / folder))
        if game:
            _py("-m", "megatron_opcd.envs", "--game", game, "--seeds", "0:16", "--out", str(data / folder / "train.jsonl"))
            _py("-m", "megatron_opcd.envs", "--game", game, "--seeds", "1000:1004", "--out", str(data / folder / "eval.jsonl"))


def make_tokenizer(folder: Path) -> Path:
    """A 250-piece sentencepiece BPE saved as a Hugging Face tokenizer with a chat template."""
    import random

    import sentencepiece as spm
    from transformers import AutoTokenizer

    rnd = random.Random(0)
    words = ("what is the answer question option heart liver lung kidney text hateful apple river stone cloud "
             "green seven paper light music table window garden silver box move left right up down goal hole").split()
    words += ["".join(rnd.choice("bcdfghklmnprstvz") + rnd.choice("aeiou") for _ in range(rnd.randint(2, 4)))
              for _ in range(150)]
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(400)] + ["0 1 2 3 4 5 6 7 8 9 + = ? . , A B C D"]
    raw = folder / "sp"
    raw.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(raw / "tokenizer"), vocab_size=250,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   )
    tok = AutoTokenizer.from_pretrained(str(raw))
    tok.chat_template = CHAT_TEMPLATE
    out = folder / "tokenizer"
    tok.save_pretrained(str(out))
    shutil.copy(raw / "tokenizer.model", out / "tokenizer.model")
    return out


def _sbatch_paths(name: str) -> dict[str, str]:
    """The key=value overrides the example's sbatch script passes (with ${OPCD_*} unexpanded)."""
    text = (REPO / "slurm" / f"{name}.sbatch").read_text()
    return dict(re.findall(r'"([a-z_.]+)=(\$\{OPCD_[A-Z]+\}/[^"]+)"', text))


def tiny(model, *, big: bool):
    """The same architecture, tiny: 2 layers x 64 (teachers 3 x 96), 4 heads, GQA kept, 256 vocab."""
    hidden = 96 if big else 64
    groups = 2 if model.num_query_groups and model.num_query_groups < model.num_attention_heads else 4
    if model.is_moe:  # 8 experts, top-2, expert FFN 32 (Qwen3-MoE's shape in miniature)
        model = dataclasses.replace(model, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)
    return dataclasses.replace(
        model, num_layers=3 if big else 2, hidden_size=hidden, num_attention_heads=4, num_query_groups=groups,
        ffn_hidden_size=2 * hidden, kv_channels=None if model.kv_channels is None else hidden // 4, vocab_size=256,
        make_vocab_size_divisible_by=64, max_position_embeddings=2048, params_dtype="fp32",
        transformer_impl="local", fp8=None)


def tiny_models(name: str) -> tuple:
    """(student ModelConfig, teacher ModelConfig or None, {checkpoint name: ModelConfig}) of an example."""
    from megatron_opcd.training.config import load_train_config

    cfg = load_train_config(str(REPO / "examples" / f"{name}.yaml"))
    paths = _sbatch_paths(name)
    student_ckpt = paths["checkpoint.pretrained"].rsplit("/", 1)[1]
    teacher_ckpt = paths.get("teacher.checkpoint", "").rsplit("/", 1)[-1] or None
    # The teacher is larger than the student where the example's is; a same-size teacher stays the same.
    bigger = cfg.teacher.model is not None and cfg.teacher.model.hidden_size > cfg.model.hidden_size
    student = tiny(cfg.model, big=not bigger and _is_big(student_ckpt))
    teacher = tiny(cfg.teacher.model, big=bigger or _is_big(teacher_ckpt)) if cfg.teacher.model is not None else None
    ckpts = {student_ckpt: student}
    if teacher is not None and teacher_ckpt:
        ckpts[teacher_ckpt] = teacher
    return student, teacher, ckpts


def _is_big(ckpt_name: Optional[str]) -> bool:
    return bool(ckpt_name) and re.search(r"(?<![\d.])[78]b", ckpt_name) is not None  # 7b/8b, not 1.7b


def _write_checkpoints(ckpt_root: str, tokenizer: str, todo_json: str) -> list:
    """In one single-rank process: a random tiny model per name, saved as a converted checkpoint."""
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import save_checkpoint
    from megatron_opcd.compat import enable_cpu
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.models import build_model

    enable_cpu()  # a host without CUDA: megatron-core in CPU mode (a no-op with CUDA)
    groups = parallel.initialize()
    done = []
    for i, (name, fields) in enumerate(json.loads(todo_json).items()):
        cfg = ModelConfig(**fields)
        model = build_model(cfg, "student", groups=groups, seed=100 + i)
        save_checkpoint(Path(ckpt_root) / name, model, cfg, tokenizer_dir=tokenizer)
        done.append(name)
    parallel.destroy()
    return done


def build_world(work: Path, names: list[str]) -> dict:
    """Data, tokenizer and every tiny checkpoint the given examples need."""
    data, ckpt = work / "data", work / "ckpt"
    if not (data / "safety" / "train.jsonl").is_file():
        prepare_data(data)
    tok = work / "tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        make_tokenizer(work)
    todo: dict = {}
    for name in names:
        for ck, model in tiny_models(name)[2].items():
            previous = todo.get(ck)
            _check(previous is None or previous == model, f"{ck}: two examples want different architectures")
            todo[ck] = model
    missing = {k: dataclasses.asdict(v) for k, v in todo.items() if not (ckpt / k / "opcd_checkpoint.json").is_file()}
    if missing:
        code = ("import sys; sys.path.insert(0, %r); from rehearse import _write_checkpoints; "
                "print(_write_checkpoints(%r, %r, %r))" % (str(REPO / "tools"), str(ckpt), str(tok), json.dumps(missing)))
        _py("-c", code)
    return {"data": data, "ckpt": ckpt, "tokenizer": tok}


# ------------------------------------------------------------------------------------------------
# one example


def overrides(name: str) -> list[str]:
    """What the rehearsal changes on the sbatch command line (everything else is the example's)."""
    from megatron_opcd.training.config import load_train_config

    student, teacher, _ = tiny_models(name)
    cfg = load_train_config(str(REPO / "examples" / f"{name}.yaml"))
    out = [f"model.{f}={_yaml(getattr(student, f))}" for f in TINY_FIELDS]
    if teacher is not None:
        out += [f"teacher.model.{f}={_yaml(getattr(teacher, f))}" for f in TINY_FIELDS]
        out += [f"teacher.model.{f}={_yaml(getattr(teacher, f))}" for f in MOE_FIELDS if teacher.is_moe]
    dp = ranks_of(name) // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    if cfg.parallel.expert_model_parallel_size > 1:  # EP over the rehearsal's ranks of a stage
        out.append(f"parallel.expert_model_parallel_size={min(cfg.parallel.expert_model_parallel_size, dp)}")
    out += ["parallel.backend=gloo", "schedule.steps=3", "schedule.global_batch_size=4",
            f"schedule.micro_batch_size={max(1, 4 // (dp * 2))}", "generation.max_new_tokens=8",
            "evaluation.interval=2", "evaluation.num_prompts=4", "evaluation.max_new_tokens=8",
            "checkpoint.interval=2", "checkpoint.keep_last=0", "data.max_prompt_tokens=256",
            "data.max_context_tokens=512", "logging.tensorboard=false"]
    if cfg.game is not None:  # a game's prompt (rules and board) is ~320 tokens of the tiny tokenizer
        out += ["game.max_rounds=2", "data.max_prompt_tokens=512"]
    return out


def _yaml(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _rows(metrics: Path, split: str) -> list[dict]:
    if not metrics.is_file():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") == split]


class _Job:
    def __init__(self, cmd, env, log: Path):
        self.log = log
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RehearsalError(f"the job did not end within {timeout}s\n{self.text()[-4000:]}") from None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.fh.close()


def rehearse(name: str, world: dict, work: Path, *, export: bool = True, timeout: float = 600) -> dict:
    """Train 2 steps (eval + checkpoint), preempt step 3 with SIGUSR1, resume, export: see the module doc."""
    run_root, logs = work / "runs", work / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    run = run_root / name
    if run.exists():
        shutil.rmtree(run)
    metrics = run / "metrics.jsonl"  # logging.dir defaults to checkpoint.save
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(stub_slurm(work / "stubs" / name, job_name=name, ranks=ranks_of(name)), OPCD_DATA=str(world["data"]), OPCD_CKPT=str(world["ckpt"]),
               OPCD_RUNS=str(run_root), OPCD_LOGS=str(logs), OPCD_QUIET="1", PYTHONUNBUFFERED="1")
    cmd = ["bash", str(REPO / "slurm" / f"{name}.sbatch"), *overrides(name)]
    out: dict = {"name": name}
    t0 = time.monotonic()

    # Launch 1: steps 1-2, the evaluation and checkpoint at step 2, then SIGUSR1 inside step 3.
    job = _Job(cmd, {**env, "OPCD_TEST_SLOW_DECODE": SLOW}, logs / "launch1.txt")
    deadline = time.monotonic() + timeout
    while not (run / "step_0000002" / "opcd_checkpoint.json").is_file():
        if job.proc.poll() is not None or time.monotonic() > deadline:
            job.wait(1)
            raise RehearsalError(f"{name}: launch 1 ended (exit {job.proc.returncode}) before step 2's checkpoint\n"
                                 f"{job.text()[-5000:]}")
        time.sleep(0.2)
    time.sleep(0.5)  # step 3 (slow) is under way
    sent = time.monotonic()
    job.proc.send_signal(signal.SIGUSR1)  # the batch shell, as --signal=B:USR1@N does
    rc = job.wait(120)
    out["signal_to_exit_s"] = round(time.monotonic() - sent, 1)
    text = job.text()
    _check(rc == 0, f"{name}: launch 1 exited {rc} after SIGUSR1", text)
    _check("stub scontrol: requeue" in text, f"{name}: the batch script did not requeue", text)
    _check("step 3 abandoned at" in text and "checkpointed at step 2" in text,
           f"{name}: step 3 was not abandoned at a safe point", text)
    _check([r["step"] for r in _rows(metrics, "train")] == [1, 2], f"{name}: steps logged {_rows(metrics, 'train')}")
    evals = _rows(metrics, "eval")
    _check(any(r["step"] == 2 for r in evals), f"{name}: no evaluation at step 2 ({evals})", text)
    steps = sorted(p.name for p in run.glob("step_*"))
    _check(steps == ["step_0000002"], f"{name}: checkpoints after the preemption: {steps}")

    # Launch 2: the requeued job resumes and runs step 3.
    job = _Job(cmd, env, logs / "launch2.txt")
    rc = job.wait(timeout)
    text = job.text()
    _check(rc == 0, f"{name}: the resumed launch exited {rc}", text)
    _check(f"resumed from {run / 'step_0000002'} at step 2" in text, f"{name}: did not resume from step 2", text)
    _check([r["step"] for r in _rows(metrics, "train")] == [1, 2, 3], f"{name}: {_rows(metrics, 'train')}")
    final = run / "step_0000003"
    _check((final / "opcd_checkpoint.json").is_file(), f"{name}: no checkpoint of step 3")
    out["losses"] = [r["loss"] for r in _rows(metrics, "train")]
    out["eval"] = {k: v for k, v in evals[-1].items() if k not in ("split", "step")}
    if export:
        out["hf"] = export_and_load(final, work / "hf" / name)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def export_and_load(ckpt: Path, hf: Path) -> dict:
    """megatron-to-hf, then transformers loads the folder and scores a chat prompt (in this process:
    a second one would import torch and transformers again, ~8 CPU-s, for each export)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if hf.exists():
        shutil.rmtree(hf)
    _py(str(REPO / "tools" / "convert_checkpoint.py"), "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(hf))
    try:
        m = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
        t = AutoTokenizer.from_pretrained(str(hf))
        ids = t.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = m(ids).logits
    except Exception as exc:  # noqa: BLE001 - any refusal of transformers' is the rehearsal's failure
        raise RehearsalError(f"transformers could not load {hf}: {type(exc).__name__}: {exc}") from exc
    _check(bool(torch.isfinite(logits).all()), f"{hf}: the exported model's logits are not finite")
    return {"arch": m.config.architectures[0], "vocab": logits.shape[-1], "tokens": ids.shape[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "rehearsal"), help="scratch folder (data, checkpoints, runs)")
    p.add_argument("--only", nargs="*", help="example names (file stems); default: all 13")
    p.add_argument("--export-all", action="store_true", help="export every example (default: one per family)")
    args = p.parse_args(argv)
    names = args.only or [e.stem for e in EXAMPLES]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = build_world(work, names)
    families: set = set()
    failed = []
    for name in names:
        family = name.split("_")[1].split("-")[0]
        try:
            res = rehearse(name, world, work, export=args.export_all or family not in families)
            families.add(family)
            print(json.dumps(res), flush=True)
        except RehearsalError as exc:
            failed.append(name)
            print(f"FAILED {name}: {exc}", flush=True)
    print(f"{len(names) - len(failed)} of {len(names)} examples rehearsed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
