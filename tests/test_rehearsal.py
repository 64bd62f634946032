"""The paper's example configs rehearsed end to end on CPU ranks (tools/rehearse.py).

Each case: the example's own sbatch script (stub `srun`/`scontrol`), its YAML with only the model
made tiny and the topology scaled down (TP=2 x DP=2 for a tp2pp1 example, DP=2 for tp1pp1), data from tests/fixtures/rehearsal through
examples/prepare_data.py; 2 steps with an evaluation and a checkpoint, SIGUSR1 inside step 3 (exit 0,
requeue), the resumed job finishing step 3, megatron-to-hf and transformers loading the export.

`make test` rehearses all 14 (spread over the pytest-xdist workers, one group per example);
`OPCD_REHEARSAL=ci` only four that between them cover every option the 14 use but the MoE
teacher's expert parallelism (TP=2 with sequence parallelism and the distributed optimizer, a
larger frozen teacher on its own TP layout, an experience pool, Qwen3 QK-norm, Llama 3 rope scaling
with tied embeddings and a system prompt file, the math and choice graders, a multi-turn game with
`teacher: self`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import rehearse  # noqa: E402

CI = ("opcd_qwen3-1.7b_math_teacher-qwen3-8b-tp2_1n8g_tp1pp1", "opcd_qwen3-8b_math_2n8g_tp2pp1",
      "opcd_llama3.2-3b_medical_1n8g_tp1pp1", "opcd_qwen3-1.7b_frozenlake_1n8g_tp1pp1")
ALL = [e.stem for e in rehearse.EXAMPLES]
# Every example by default (`make test`, `make rehearsal`); OPCD_REHEARSAL=ci rehearses the four
# above only (a quicker check while working on the trainer), =none none.
_CHOICE = os.environ.get("OPCD_REHEARSAL", "all")
if _CHOICE not in ("all", "ci", "none"):
    raise ValueError(f"OPCD_REHEARSAL={_CHOICE!r}: use all, ci or none")
NAMES = ALL if _CHOICE == "all" else list(CI) if _CHOICE == "ci" else []
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, tokenizer and tiny checkpoints, built once per run: under pytest-xdist the workers share
    the folder (the base temp's parent), the first builds it under a lock, the others find it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    work = shared / "rehearsal-world"
    work.mkdir(exist_ok=True)
    with open(shared / "rehearsal-world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = rehearse.build_world(work, NAMES)
    return work, built


def test_every_example_has_a_rehearsal():
    """The CI subset is a subset of the 14, and every example can be set up (its tiny models and
    overrides derive from its YAML and sbatch script)."""
    from megatron_opcd.training.config import load_train_config

    assert len(ALL) == 14 and set(CI) <= set(ALL)
    for name in ALL:
        real = load_train_config(str(REPO / "examples" / f"{name}.yaml"))
        student, teacher, ckpts = rehearse.tiny_models(name)
        assert ckpts and student.num_query_groups < student.num_attention_heads  # GQA kept
        for f in ("qk_layernorm", "add_qkv_bias", "tie_embeddings", "rope_scaling", "normalization", "activation"):
            assert getattr(student, f) == getattr(real.model, f), (name, f)
        if real.teacher.model is not None and real.teacher.model.hidden_size > real.model.hidden_size:
            assert teacher.hidden_size > student.hidden_size and teacher.num_layers > student.num_layers, name
        assert any(o.startswith("model.num_layers=") for o in rehearse.overrides(name))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", NAMES)
def test_rehearse_example(world, name):
    work, w = world
    family = name.split("_")[1].split("-")[0]
    first_of_family = NAMES.index(next(n for n in NAMES if n.split("_")[1].split("-")[0] == family)) == NAMES.index(name)
    res = rehearse.rehearse(name, w, work, export=first_of_family)
    assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"]), res
    assert res["eval"], res
    if first_of_family:
        assert res["hf"]["vocab"] >= 250 and res["hf"]["tokens"] > 3, res
