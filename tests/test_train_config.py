"""Trainer configuration and launch helpers, in-process (no ranks)."""

from __future__ import annotations

import pytest

from megatron_opcd.config import ModelConfig
from megatron_opcd.errors import ConfigError
from megatron_opcd.train import first_host
from megatron_opcd.training.config import load_train_config
from megatron_opcd.training.trainer import check_matches_checkpoint


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


BASE = "data:\n  train: x.jsonl\nmodel:\n  num_layers: 2\n"


def test_defaults_follow_the_paper(tmp_path):
    cfg = load_train_config(_write(tmp_path, BASE))
    assert cfg.algorithm.name == "opcd" and cfg.loss_kind == "reverse_kl"
    assert cfg.loss.topk == 256 and cfg.loss_topk_from == "student" and cfg.loss.average == "sequence"
    assert cfg.loss_temperature == cfg.generation.temperature == 1.0
    assert cfg.teacher.mode == "self"
    off = load_train_config(_write(tmp_path, BASE + "algorithm:\n  name: offpolicy_cd\nteacher: self\n"),
                            ["generation.temperature=0.7"])
    assert off.loss_kind == "forward_kl" and off.loss_temperature == 0.7 and off.loss_topk_from == "teacher"


@pytest.mark.parametrize("text,overrides,needle", [
    (BASE + "teachr: self\n", [], "unknown config section 'teachr'; did you mean 'teacher'?"),
    (BASE + "teacher: other\n", [], "teacher: 'other' is not understood"),
    (BASE, ["loss.topk=0"], "loss.topk=0 must be >= 1"),
    (BASE, ["loss.kind=kl"], "loss.kind: expected"),
    (BASE, ["schedule.warmup_steps=99"], "schedule.warmup_steps=99"),
    (BASE, ["generation.temperature=0"], "generation.temperature=0"),
    # Checked by the runtime objects the sections build, at load time.
    (BASE, ["loss.beta=1.5"], "loss.beta=1.5: the jsd weight must lie in [0, 1]"),
    (BASE, ["loss.chunk_tokens=0"], "loss.chunk_tokens=0"),
    (BASE, ["generation.top_k=-1"], "generation.top_k must be >= 0"),
    (BASE, ["generation.stop_strings=['']"], "generation.stop_strings must not contain an empty string"),
    (BASE, ["generation.compile_decode=sometimes"], "generation.compile_decode must be auto, always or never, got 'sometimes'"),
    (BASE, ["teacher.mode=frozen"], "teacher.mode=frozen needs teacher.checkpoint"),
    ("model:\n  num_layers: 2\n", [], "data.train is required"),
    ("data:\n  train: x.jsonl\n", [], "give the student"),
    (BASE, ["context.text=a", "context.pool=b"], "give one of context.text, context.file, context.pool"),
])
def test_bad_configs_fail_in_one_line(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_train_config(_write(tmp_path, text), overrides)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_batch_split(tmp_path):
    cfg = load_train_config(_write(tmp_path, BASE), ["schedule.global_batch_size=8", "schedule.micro_batch_size=2"])
    assert cfg.check_batches(dp_size=2) == 2
    with pytest.raises(ConfigError, match="not divisible by schedule.micro_batch_size=2 x data-parallel size 3"):
        cfg.check_batches(dp_size=3)


def test_model_section_must_match_the_checkpoint():
    saved = ModelConfig(num_layers=2, hidden_size=64)
    check_matches_checkpoint(ModelConfig(num_layers=2, hidden_size=64, params_dtype="bf16"), saved, "/ck")
    with pytest.raises(ConfigError) as exc:
        check_matches_checkpoint(ModelConfig(num_layers=2, hidden_size=64, rotary_base=500000), saved, "/ck")
    assert "model.rotary_base=500000 but the checkpoint has 10000" in str(exc.value)


@pytest.mark.parametrize("nodes,first", [("gpu-a[017-018]", "gpu-a017"), ("gpu-a[017-018,020],gpu-b1", "gpu-a017"),
                                         ("node1,node2", "node1"), ("n[3]", "n3"), ("a1,b[2-3]", "a1")])
def test_first_host_of_slurm_nodelist(nodes, first):
    assert first_host(nodes) == first


def test_offpolicy_cd_sums_over_the_teachers_topk(tmp_path):
    """The baseline's objective, from a config that names only the algorithm, sums its forward KL
    over the teacher's top-k (checked on its values against a float64 reference over each
    support: the student's and the teacher's top-k sets differ on these logits)."""
    import torch

    from test_losses import reference
    from megatron_opcd.training.objectives import build_objective

    cfg = load_train_config(_write(tmp_path, BASE + "algorithm:\n  name: offpolicy_cd\n"), ["loss.topk=4"])
    objective = build_objective(cfg, vocab_size=32, tp_group=None)
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 2, 32, generator=g) * 3, torch.randn(5, 2, 32, generator=g) * 3  # [R, b, V]
    got = objective.loss.per_token(zs, zt).double()
    want = reference(zs, zt, kind="forward_kl", topk=4, topk_from="teacher")
    wrong = reference(zs, zt, kind="forward_kl", topk=4, topk_from="student")
    assert (want - wrong).abs().max() > 1e-2  # the two supports give different sums here
    # float32 divergence of O(1) terms against float64: relative 1e-5 bounds the rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_fp16_training_is_refused_naming_bf16(tmp_path):
    """No loss scaling is wired (megatron's grad_scale_func): fp16 training is refused, one line."""
    with pytest.raises(ConfigError, match="bf16") as err:
        load_train_config(_write(tmp_path, BASE), ["model.params_dtype=fp16"])
    assert "\n" not in str(err.value)
    from megatron_opcd.training.optimizer import build_optimizer  # a student read from a checkpoint

    cfg = load_train_config(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="bf16"):
        build_optimizer(cfg.optimizer, cfg.schedule, ModelConfig(num_layers=2, params_dtype="fp16"), None, None)
