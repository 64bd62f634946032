"""The user's path through the command line (issue 26), on the model the project ships.

`test_readme_walk` runs the commands of the README's "Using it" block as written, in a scratch
folder that links the repository's examples/ and tools/, shortened by flags appended to them
(2 steps on 2 ranks, 2 prompts, a few tokens): GGUF -> checkpoint -> OPCD -> plot -> generate
-> evaluate -> Hugging Face. The GGUF is converted once per session (the `walk` fixture) and the
other tests here read what the walk wrote. Cheap tests of the same pieces (no model) come first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "opcd_smollm2-135m_cpu_dp2.yaml"
sys.path.insert(0, str(REPO / "tools"))

import plot_metrics  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Pieces without a model


def test_find_gguf_file_folder_and_mistakes(tmp_path):
    from megatron_opcd.convert.gguf import find_gguf
    from megatron_opcd.errors import ConversionError

    (tmp_path / "one").mkdir()
    f = tmp_path / "one" / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    assert find_gguf(f) == f and find_gguf(tmp_path / "one") == f
    with pytest.raises(ConversionError, match="holds no .gguf file"):
        find_gguf(tmp_path)
    (tmp_path / "one" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConversionError, match="holds 2 .gguf files"):
        find_gguf(tmp_path / "one")
    with pytest.raises(ConversionError, match="does not exist"):
        find_gguf(tmp_path / "nope")
    with pytest.raises(ConversionError, match="is not a .gguf file"):
        find_gguf(REPO / "README.md")


def test_convert_cli_gguf_errors_are_one_line(tmp_path):
    """--gguf and --hf exclude each other; a missing GGUF is one line, exit 2, before any reading."""
    import convert_checkpoint

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = convert_checkpoint.main(["hf-to-megatron", "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")])
    assert rc == 2 and err.getvalue().strip() == f"error: {tmp_path / 'x.gguf'} does not exist; pass a .gguf file " \
                                                 "or a folder holding one"
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        convert_checkpoint.main(["hf-to-megatron", "--gguf", "a", "--hf", "b", "--out", "c"])


def test_metrics_logger_prints_evaluations_under_the_bar_and_keeps_samples(tmp_path, capsys):
    from megatron_opcd.training.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress_total=4, progress=True)
    log.log(0, {"kl": 0.5, "accuracy": 0.25}, prefix="eval")
    log.log(1, {"loss": 1.0, "kl": 0.4})
    log.samples([{"step": 0, "index": 3, "prompt": "p", "response": "r", "score": 1.0}])
    log.close()
    err = capsys.readouterr().err
    assert "[eval step 0] kl=0.5 accuracy=0.25" in err  # printed although the bar is on
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("eval", 0), ("train", 1)]
    assert json.loads((tmp_path / "eval_samples.jsonl").read_text()) == \
        {"step": 0, "index": 3, "prompt": "p", "response": "r", "score": 1.0}


def test_plot_metrics_draws_train_and_eval(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "split": "train", "loss": 1.0 / s, "kl": 0.5 / s, "skipped": False} for s in range(1, 5)]
    rows += [{"step": s, "split": "eval", "kl": 0.6 - 0.1 * s, "accuracy": 0.2 * s} for s in (0, 2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = plot_metrics.read_metrics(tmp_path)
    assert data["eval"]["accuracy"] == [(0, 0.0), (2, 0.4), (4, 0.8)]
    assert "skipped" not in data["train"]  # booleans are not curves
    assert plot_metrics.panels(data, None) == [("train", "loss"), ("train", "kl"), ("eval", "kl"), ("eval", "accuracy")]
    assert plot_metrics.main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics.main([str(tmp_path), "--metrics", "nope"]) == 1
    assert plot_metrics.main([str(tmp_path / "missing")]) == 1


def test_example_config_is_a_2_rank_cpu_run(monkeypatch):
    from megatron_opcd.data.prompts import load_contexts, load_examples
    from megatron_opcd.training.config import load_train_config

    cfg = load_train_config(str(EXAMPLE))
    assert cfg.check_batches(2) == 1 and cfg.parallel.tensor_model_parallel_size == 1
    assert cfg.teacher.checkpoint == cfg.checkpoint.pretrained == "runs/smollm2/base"
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    assert len(load_examples(cfg.data.train)) == 40 and len(load_examples(cfg.data.eval)) == 50
    assert load_contexts(cfg.context)[0].startswith("You are a pirate.")
    assert cfg.evaluation.task == "starts_with" and cfg.evaluation.task_args == {"prefix": "Ahoy"}


# ----------------------------------------------------------------------------------------------
# The README's walk


def readme_commands() -> list[list[str]]:
    """The commands of the first bash block under "## Using it", continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Using it"):]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# Appended to each command (argparse and key=value overrides: the last one wins): the README's run,
# shortened for the suite.
SHORTER = {
    "megatron_opcd.train": ["schedule.steps=2", "schedule.global_batch_size=2", "schedule.micro_batch_size=1",
                            "generation.max_new_tokens=4", "evaluation.interval=2", "evaluation.num_prompts=2",
                            "evaluation.max_new_tokens=4"],
    "megatron_opcd.generate": ["--max-new-tokens", "8", "--prompts", "two_prompts.jsonl"],
    "megatron_opcd.evaluate": ["--num-prompts", "2", "--max-new-tokens", "4"],
}
STEPS = 2


def _program(cmd: list[str]) -> str:
    """`megatron_opcd.train`, `plot_metrics`, `convert_checkpoint hf-to-megatron`, ..."""
    if "-m" in cmd:
        return cmd[cmd.index("-m") + 1]
    name = Path(cmd[1]).stem
    return f"{name} {cmd[2]}" if name == "convert_checkpoint" else name


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("OPCD_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    pytest.importorskip("gguf")
    from megatron_opcd.demo.model import gguf_path
    from megatron_opcd.errors import DemoError

    try:
        gguf = gguf_path()
    except DemoError as exc:
        pytest.skip(str(exc))
    reuse = os.environ.get("OPCD_REUSE_WALK")  # debugging the assertions: a folder a previous walk left
    if reuse:
        work = Path(reuse)
        saved = json.loads((work / "walk.json").read_text())
        logs = {p: subprocess.CompletedProcess([], 0, (work / "logs" / f"{p}.out").read_text(),
                                               (work / "logs" / f"{p}.err").read_text()) for p in saved}
        return {"dir": work, "runs": work / "runs" / "smollm2", "logs": logs, "seconds": saved}
    work = tmp_path_factory.mktemp("walk")
    (work / "logs").mkdir()
    for name in ("examples", "tools"):
        (work / name).symlink_to(REPO / name)
    (work / "two_prompts.jsonl").write_text('{"prompt": "What is the capital of Japan?"}\n'
                                            '{"prompt": "Why is the sky blue?"}\n')
    logs, seconds = {}, {}
    for cmd in readme_commands():
        program = _program(cmd)
        if cmd[0] == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run"] + cmd[1:]
        elif cmd[0] == "python":
            cmd = [sys.executable] + cmd[1:]
        if "--gguf" in cmd:  # the README names the package's folder in the repository's .venv
            i = cmd.index("--gguf") + 1
            assert Path(cmd[i]).name == gguf.parent.name
            cmd[i] = str(gguf.parent)
        cmd = [a.replace("step_0000008", f"step_{STEPS:07d}") for a in cmd]
        cmd += SHORTER.get(program, [])
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=work, env=_environment(), capture_output=True, text=True, timeout=1800)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Wall seconds and CPU seconds (children that were waited for: ranks, writers) per command.
        seconds[program] = (round(time.perf_counter() - start, 1),
                            round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1))
        (work / "logs" / f"{program}.out").write_text(proc.stdout)
        (work / "logs" / f"{program}.err").write_text(proc.stderr)
        assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}"
        logs[program] = proc
    (work / "walk.json").write_text(json.dumps(seconds))
    return {"dir": work, "runs": work / "runs" / "smollm2", "logs": logs, "seconds": seconds}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_readme_walk(walk):
    runs, logs = walk["runs"], walk["logs"]
    print("walk (wall s, CPU s):", walk["seconds"])
    assert set(logs) == {"convert_checkpoint hf-to-megatron", "megatron_opcd.train", "plot_metrics",
                         "megatron_opcd.generate", "megatron_opcd.evaluate", "convert_checkpoint megatron-to-hf"}
    # 1. conversion: from the GGUF, with its tokenizer and chat template
    meta = json.loads((runs / "base" / "opcd_checkpoint.json").read_text())
    assert meta["converted_from"].endswith(".gguf") and meta["hf_model_type"] == "llama"
    assert (runs / "base" / "tokenizer" / "tokenizer.json").is_file()
    # 2. training on 2 ranks: checkpoint, metrics, evaluations on the console (bar on) and kept
    run = runs / "opcd"
    assert (run / f"step_{STEPS:07d}" / "opcd_checkpoint.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and all(0 <= r["accuracy"] <= 1 and r["kl"] >= 0 for r in evals)
    err = logs["megatron_opcd.train"].stderr
    for r in evals:
        assert f"[eval step {r['step']}] kl={r['kl']:.4g} accuracy={r['accuracy']:.4g}" in err
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["index"]) for s in samples] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    for step in (0, 2):  # the kept grades are the logged accuracy
        scores = [s["score"] for s in samples if s["step"] == step]
        assert sum(scores) / len(scores) == pytest.approx(next(r["accuracy"] for r in evals if r["step"] == step))
    assert any((run / "tensorboard").glob("events.out.tfevents.*")), "tensorboard events (logging.tensorboard)"
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 4. evaluate: the summary line agrees with the samples it wrote
    line = logs["megatron_opcd.evaluate"].stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"starts_with on 2 prompts: ([\d.]+)% without the context, ([\d.]+)% with it \(samples: .*\)", line)
    assert m, line
    got = [json.loads(x) for x in (runs / "eval.jsonl").read_text().splitlines()]
    assert [g["with_context"] for g in got] == [False, False, True, True]
    for flag, pct in ((False, m.group(1)), (True, m.group(2))):
        scores = [g["score"] for g in got if g["with_context"] == flag]
        assert float(pct) == pytest.approx(100 * sum(scores) / 2, abs=0.05)
    # 5. export: a Hugging Face folder
    assert (runs / "hf" / "config.json").is_file() and (runs / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_generate_chat_is_the_trainers_rendering_and_hf_greedy(walk):
    """3. generate --chat: its input ids are the trainer's student rendering (the example config's
    PromptRenderer) and HF's own chat template; its greedy tokens and log-probs are those of the
    exported Hugging Face model (megatron-core's KV-cache loop vs a plain HF forward)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.preflight import build_renderer

    runs = walk["runs"]
    lines = [json.loads(x) for x in (runs / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["What is the capital of Japan?", "Why is the sky blue?"]
    renderer = build_renderer(load_train_config(str(EXAMPLE)), load_tokenizer(runs / "base"), 8192)
    hf_tok = AutoTokenizer.from_pretrained(str(runs / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(runs / "hf"), dtype=torch.float64).eval()
    for r in lines:
        assert r["prompt_ids"] == renderer.student(r["prompt"])
        reference = hf_tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                               tokenize=True)
        reference = reference["input_ids"] if hasattr(reference, "keys") else reference
        assert r["prompt_ids"] == list(reference)
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, len(r["prompt_ids"]) - 1:-1], dim=-1)  # [new, vocab]
        chosen = logp.gather(1, torch.tensor(r["response_ids"])[:, None])[:, 0]
        # float32 (ours, 30 layers) against float64 (HF): log-probs of O(1) agree to ~1e-4.
        torch.testing.assert_close(chosen, torch.tensor(r["logprobs"], dtype=torch.float64), atol=2e-3, rtol=1e-3)
        best = logp.max(dim=-1).values
        assert bool(((best - chosen) < 1e-3).all()), "every greedy token is HF's argmax (up to float32 ties)"


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["system", "user_prefix"])
def test_generate_context_placement_equals_the_trainers(walk, tmp_path, monkeypatch, placement):
    """generate --chat --context F --context-placement P gives the token ids the trainer's
    teacher sees with context.placement=P (one PromptRenderer), and HF's chat template of the
    same messages."""
    from transformers import AutoTokenizer

    from megatron_opcd import generate as G
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.preflight import build_renderer

    base = walk["runs"] / "base"
    rule = (REPO / "examples" / "prompts" / "pirate_rule.txt").read_text().strip()
    prompts = ["What is the capital of Japan?", "Why is the sky blue?"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = G.parse_args(["--ckpt", str(base), "--prompts", str(tmp_path / "p.jsonl"), "--out", "x", "--chat",
                         "--context", str(REPO / "examples/prompts/pirate_rule.txt"), "--context-placement", placement])
    tok = load_tokenizer(base)
    rows = G.read_prompts(args.prompts, tok, 49152)
    text, ids = G.read_context(args.context, tok, 49152)
    cli = G.render_inputs(rows, G.make_renderer(args, tok, 8192), text, ids, chat=True)
    monkeypatch.chdir(REPO)
    cfg = load_train_config(str(EXAMPLE), [f"context.placement={placement}"])
    trainer = build_renderer(cfg, tok, 8192)
    assert cli == [trainer.pair(p, rule).teacher for p in prompts]
    hf_tok = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    for p, got in zip(prompts, cli):
        messages = ([{"role": "system", "content": rule}, {"role": "user", "content": p}] if placement == "system"
                    else [{"role": "user", "content": rule + "\n\n" + p}])
        ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert got == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        assert tok.decode(got, skip_special_tokens=False).count(rule) == 1


@pytest.mark.slow
def test_generate_tp_error_names_the_flag_and_the_sizes(walk, tmp_path):
    from megatron_opcd.generate import main

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["--ckpt", str(walk["runs"] / "base"), "--prompts", str(tmp_path / "p.jsonl"), "--out", "x",
                   "--tp", "2"])
    assert rc == 1
    assert err.getvalue().strip() == ("error: model.num_attention_heads=9 is not divisible by --tp=2; "
                                      "TP sizes this model takes: 1, 3")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # a split the model takes, on fewer ranks than it needs
        rc = main(["--ckpt", str(walk["runs"] / "base"), "--prompts", str(tmp_path / "p.jsonl"), "--out", "x",
                   "--tp", "3"])
    assert rc == 1
    assert err.getvalue().strip() == ("error: --tp 3 x --pp 1 = 3 ranks, but 1 were launched; launch a multiple of 3 "
                                      "(torchrun --nproc-per-node 3 -m ...)")
