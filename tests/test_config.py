"""Config loading: typed, loud, one-line errors naming the field and the fix (issue 2)."""

from __future__ import annotations

import pytest

from megatron_opcd.compat.optional import check_runtime
from megatron_opcd.config import (
    ModelConfig,
    ParallelConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    peek_setting,
    set_dotted,
)
from megatron_opcd.errors import ConfigError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  norm_epsilon: 1e-6\n")
    data = apply_overrides(load_yaml(path), ["model.num_layers=4", "model.qk_layernorm=true"])
    cfg = from_dict(ModelConfig, data["model"], "model")
    assert cfg.num_layers == 4 and cfg.qk_layernorm is True and cfg.hidden_size == 64
    # PyYAML reads 1e-6 as a string; the typed loader makes it the float it means.
    assert cfg.norm_epsilon == pytest.approx(1e-6)


def test_set_dotted_creates_sections_and_refuses_a_value_on_the_way():
    data = {"loss": None, "model": {"num_layers": 2}}
    set_dotted(data, ["loss", "topk"], None, "here")
    set_dotted(data, ["model", "hidden_size"], 64, "here")
    assert data == {"loss": {"topk": None}, "model": {"num_layers": 2, "hidden_size": 64}}
    with pytest.raises(ConfigError, match="here: 'num_layers' is not a section"):
        set_dotted(data, ["model", "num_layers", "x"], 1, "here")


def test_peek_setting_reads_the_yaml_and_the_overrides_leniently(tmp_path):
    """logging.debug is read before the config is validated: from the file (it once counted only
    as the literal override `logging.debug=true`), overridden on the command line, and still
    answered when the file or another override is broken."""
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n  debug: true\nmodel:\n  hiden_size: 64\n")
    assert peek_setting(path, [], "logging.debug") is True
    assert peek_setting(path, ["logging.debug=false"], "logging.debug") is False
    assert peek_setting(path, ["schedule.steps", "model.hiden_size.x=1"], "logging.debug") is True
    assert peek_setting(tmp_path / "missing.yaml", ["logging.debug = true"], "logging.debug") is True
    assert peek_setting(None, [], "logging.debug") is None


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as exc:
        from_dict(ModelConfig, {"num_layer": 2}, "model")
    msg = _one_line(exc)
    assert "model.num_layer" in msg and "model.num_layers" in msg


@pytest.mark.parametrize("key,value,needle", [
    ("num_layers", "two", "model.num_layers: expected an integer"),
    ("tie_embeddings", "yes", "model.tie_embeddings: expected true or false"),
    ("normalization", "BatchNorm", "model.normalization: must be one of"),
    ("hidden_size", 1.5, "model.hidden_size: expected an integer"),
])
def test_wrong_types(key, value, needle):
    with pytest.raises(ConfigError) as exc:
        from_dict(ModelConfig, {key: value}, "model")
    assert needle in _one_line(exc)


@pytest.mark.parametrize("model,parallel,needle", [
    (dict(num_attention_heads=4), dict(tensor_model_parallel_size=3), "num_attention_heads=4 is not divisible"),
    (dict(num_attention_heads=4, num_query_groups=1), dict(tensor_model_parallel_size=2), "num_query_groups=1 is not divisible"),
    (dict(num_layers=3), dict(pipeline_model_parallel_size=2), "num_layers=3 is not divisible"),
])
def test_impossible_splits(model, parallel, needle):
    with pytest.raises(ConfigError) as exc:
        ModelConfig(**model).check_parallel(ParallelConfig(**parallel))
    assert needle in _one_line(exc)


def test_world_size_and_sequence_parallel():
    with pytest.raises(ConfigError) as exc:
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).check_world_size(6)
    assert "world size 6 is not divisible" in _one_line(exc)
    with pytest.raises(ConfigError) as exc:
        ParallelConfig(sequence_parallel=True)
    assert "sequence_parallel" in _one_line(exc)


def test_model_value_checks():
    with pytest.raises(ConfigError, match="num_query_groups=3 must divide"):
        ModelConfig(num_attention_heads=4, num_query_groups=3)
    with pytest.raises(ConfigError, match="not divisible by model.num_attention_heads"):
        ModelConfig(hidden_size=66, num_attention_heads=4)
    with pytest.raises(ConfigError, match="needs model.transformer_impl=transformer_engine"):
        ModelConfig(fp8="e4m3")


def test_te_and_fp8_refused_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: TE may legitimately run")
    with pytest.raises(ConfigError) as exc:
        check_runtime(ModelConfig(transformer_impl="transformer_engine"))
    msg = _one_line(exc)
    assert "transformer_impl=transformer_engine cannot run here" in msg and "CUDA is not available" in msg
    with pytest.raises(ConfigError) as exc:
        check_runtime(ModelConfig(transformer_impl="transformer_engine", fp8="hybrid"), role="teacher")
    assert "teacher.transformer_impl" in _one_line(exc)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["model.num_layers"])


def test_padded_vocab():
    cfg = ModelConfig(vocab_size=300, make_vocab_size_divisible_by=128)
    assert cfg.padded_vocab_size(1) == 384
    assert cfg.padded_vocab_size(2) == 512
    assert cfg.padded_vocab_size(4) == 512


def test_cluster_topology_from_the_file_name():
    from megatron_opcd.config import cluster_topology

    assert cluster_topology("examples/opcd_qwen3-8b_math_2n8g_tp2pp1.yaml") == (2, 8)
    assert cluster_topology("opcd_llama3.2-3b_medical_1n8g_tp1pp1") == (1, 8)
    assert cluster_topology("run_4n8g.yaml") == (4, 8)
    for cpu in ("tiny_cpu_tp2", "examples/opcd_smollm2-135m_cpu_dp2.yaml", "opcd_qwen3-8b_math.yaml", "x12n8gy"):
        assert cluster_topology(cpu) is None, cpu
