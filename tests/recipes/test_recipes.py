"""NeMo-Run recipes (megatron_opcd/recipes): every factory builds a checked `run.Partial`, and the tiny
CPU recipe trains end to end with NeMo-Run's LocalExecutor (torchrun, 2 gloo ranks).

Runs in its own environment with the `nemo` extra (`make test-recipes`, a separate step of .ci/run):
nemo-run pulls many dependencies that the main test environment does not need. Without nemo_run
these tests skip with that reason.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from pathlib import Path

import pytest

run = pytest.importorskip("nemo_run", reason="nemo_run is not installed here: `make test-recipes` runs these "
                                             "tests in .venv-nemo with the nemo extra")

from megatron_opcd import recipes  # noqa: E402
from megatron_opcd.errors import ConfigError  # noqa: E402
from megatron_opcd.recipes.settings import SETTINGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_recipe_builds_a_checked_partial(name):
    setting = SETTINGS[name]
    recipe = recipes.RECIPES[name](data_root="/lus/data", ckpt_root="/lus/ckpt", runs_root="/lus/runs",
                                   overrides=["schedule.steps=5"])
    assert isinstance(recipe, run.Partial)
    assert recipe.__fn_or_cls__.__name__ == "train_from_dict"
    assert recipe.expected_world_size == setting.nodes * setting.gpus_per_node
    assert recipe.overrides[-1] == "schedule.steps=5"
    assert f"checkpoint.save=/lus/runs/{setting.example}" in recipe.overrides
    assert any(o.startswith("checkpoint.pretrained=/lus/ckpt/") for o in recipe.overrides)
    assert recipe.config["schedule"]["global_batch_size"] == 128
    # The recipe's config is the example YAML, unchanged; the cluster paths travel as overrides.
    import yaml

    assert recipe.config == yaml.safe_load(setting.yaml_path.read_text())


def test_recipe_sized_for_another_job_is_refused_at_build_time():
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        recipes.opcd_qwen3_8b_math(nodes=1, gpus_per_node=3)  # TP 2
    with pytest.raises(ConfigError, match="global_batch_size=128 is not divisible"):
        recipes.opcd_qwen2_5_3b_medical(nodes=3, gpus_per_node=8)  # DP 24


def test_executor_helpers():
    local = recipes.local_executor(ntasks_per_node=2)
    assert isinstance(local, run.LocalExecutor) and local.ntasks_per_node == 2
    slurm = recipes.slurm_executor(account="acct", partition="batch", nodes=2, gpus_per_node=8,
                                   container_image="nvcr.io#nvidia/nemo:25.09", job_dir="/tmp/nemo-jobs")
    assert isinstance(slurm, run.SlurmExecutor)
    assert (slurm.nodes, slurm.ntasks_per_node, slurm.gpus_per_node) == (2, 8, 8)
    assert slurm.signal == "USR1@120" and slurm.env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def _tiny_data(folder: Path) -> tuple[Path, Path]:
    """A 128-piece sentencepiece model trained in-process and 16 prompts."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the a cat dog sat on mat ran far pirate ship sea sail answer question why how what number one two "
             "three four five six seven eight nine ten plus minus equals ahoy matey treasure island gold map").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=128,
                                   model_type="bpe", pad_id=3, minloglevel=2)
    tok = folder / "tok.model"
    tok.write_bytes(buf.getvalue())
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(6))}) + "\n"
                             for _ in range(16)))
    return tok, train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_recipe_trains_with_the_local_executor(tmp_path, monkeypatch):
    tok, train = _tiny_data(tmp_path)
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_home"))
    # NeMo-Run starts `torchrun` by name: the one of this environment.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    save = tmp_path / "run"
    recipe = recipes.tiny_cpu_tp2(str(train), str(tok), save=str(save))
    run.run(recipe, executor=recipes.local_executor(ntasks_per_node=2), name="opcd-tiny", tail_logs=False)
    steps = sorted(p.name for p in save.glob("step_*"))
    assert steps == ["step_0000001", "step_0000002"], list(save.iterdir()) if save.exists() else "no run folder"
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m.get("split") == "train"]
    assert [m["step"] for m in train_rows] == [1, 2], metrics
    assert all(m["skipped"] == 0.0 and 0.0 <= m["reverse_kl"] < 1.0 for m in train_rows), metrics
