"""Configuration mistakes: one `error:` line naming the key and the fix, exit 1, no traceback.

Each case runs the real CLI entry point (`megatron_opcd.train.main`, the same `run_cli` path as
`python -m megatron_opcd.train`) in this process: they fail before or right after start-up, so a
subprocess per case would only add ~6 s of imports each."""

from __future__ import annotations


import pytest

from ._helpers import assert_clean_error, cli_in_process

CASES = {
    # --- keys and types ---------------------------------------------------------------------------
    "unknown key": (["model.hiden_size=64"], ["unknown config key 'model.hiden_size'", "did you mean 'model.hidden_size'"]),
    "unknown section": (["optimiser.lr=1"], ["unknown config section 'optimiser'", "did you mean 'optimizer'"]),
    "wrong type": (["model.num_layers=four"], ["model.num_layers", "expected an integer", "'four'"]),
    "wrong choice": (["data.too_long=cut"], ["data.too_long", "must be one of", "'truncate_context'"]),
    "override syntax": (["schedule.steps"], ["'schedule.steps' is not of the form key=value"]),
    # --- impossible parallel combinations --------------------------------------------------------
    "TP x PP above the world size": (["parallel.tensor_model_parallel_size=2"],
                                     ["world size 1 is not divisible by", "launch a multiple of 2 ranks"]),
    "heads not divisible by TP": (["parallel.tensor_model_parallel_size=3"],
                                  ["model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3",
                                   "TP sizes this model takes: 1, 2"]),
    "query groups not divisible by TP": (["parallel.tensor_model_parallel_size=4"],
                                         ["model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4",
                                          "TP sizes this model takes: 1, 2"]),
    "layers not divisible by PP": (["parallel.pipeline_model_parallel_size=3"],
                                   ["model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3",
                                    "PP sizes this model takes: 1, 2, 4"]),
    "teacher heads not divisible by TP": (["parallel.tensor_model_parallel_size=2", "teacher.model.num_attention_heads=3",
                                           "teacher.model.num_query_groups=null", "teacher.model.kv_channels=32"],
                                          ["teacher.model.num_attention_heads=3 is not divisible"]),
    "sequence parallel without TP": (["parallel.sequence_parallel=true"],
                                     ["sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"]),
    "batch not divisible by micro x DP": (["schedule.micro_batch_size=3"],
                                          ["global_batch_size=4 is not divisible by schedule.micro_batch_size=3"]),
    "GQA groups not dividing heads": (["model.num_query_groups=3"], ["num_query_groups=3 must divide"]),
    "nccl on CPU": (["parallel.backend=nccl"], ["parallel.backend=nccl needs CUDA", "use parallel.backend=gloo"]),
    # --- GPU-only features asked on CPU ----------------------------------------------------------
    "Transformer Engine on CPU": (["model.transformer_impl=transformer_engine"],
                                  ["model.transformer_impl=transformer_engine cannot run here", "set model.transformer_impl=local"]),
    "FP8 on CPU": (["model.transformer_impl=transformer_engine", "model.fp8=e4m3"],
                   ["cannot run here", "model.fp8=null"]),
    "FP8 without TE": (["model.fp8=hybrid"], ["model.fp8='hybrid' needs model.transformer_impl=transformer_engine"]),
    "teacher on TE on CPU": (["teacher.model.transformer_impl=transformer_engine"],
                             ["teacher.transformer_impl=transformer_engine cannot run here"]),
    "fp16 training": (["model.params_dtype=fp16"], ["params_dtype=fp16 cannot be trained", "use bf16"]),
    # --- missing files -----------------------------------------------------------------------------
    "missing prompt file": (["data.train=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl does not exist"]),
    "missing eval file": (["data.eval=/nonexistent/eval.jsonl"], ["/nonexistent/eval.jsonl does not exist"]),
    "missing tokenizer": (["data.tokenizer=/nonexistent/tok"], ["tokenizer path /nonexistent/tok does not exist"]),
    "missing pretrained checkpoint": (["checkpoint.pretrained=/nonexistent/ckpt", "model=null"],
                                      ["/nonexistent/ckpt is not a complete megatron-opcd checkpoint",
                                       "point at a folder written by the trainer"]),
    "missing teacher checkpoint": (["teacher.checkpoint=/nonexistent/teacher", "teacher.model=null"],
                                   ["/nonexistent/teacher is not a complete megatron-opcd checkpoint"]),
    "missing context file": (["context.text=null", "context.file=/nonexistent/system.txt"],
                             ["context file /nonexistent/system.txt does not exist"]),
    "missing context pool": (["context.text=null", "context.pool=/nonexistent/pool.json"],
                             ["context pool file /nonexistent/pool.json does not exist"]),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides,needles", list(CASES.values()), ids=list(CASES))
def test_config_error_is_one_line(tiny, overrides, needles):
    rc, err = cli_in_process(tiny, *overrides)
    assert_clean_error(rc, err, *needles)


@pytest.mark.timeout(60)
def test_missing_config_file(tmp_path):
    rc, err = cli_in_process(tmp_path / "nope.yaml")
    assert_clean_error(rc, err, f"config file {tmp_path / 'nope.yaml'} does not exist", "pass --config")


@pytest.mark.timeout(60)
def test_config_file_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_layers: [2\n")
    rc, err = cli_in_process(bad)
    assert_clean_error(rc, err, f"config file {bad} is not valid YAML")


@pytest.mark.timeout(60)
def test_empty_checkpoint_load_folder(tiny, tmp_path):
    rc, err = cli_in_process(tiny, f"checkpoint.load={tmp_path}")
    assert_clean_error(rc, err, f"checkpoint.load={tmp_path} holds no complete checkpoint")


@pytest.mark.timeout(60)
def test_debug_flag_shows_the_traceback(tiny):
    """The one-line form hides the traceback; logging.debug=true shows it (and still the line)."""
    rc, err = cli_in_process(tiny, "model.hiden_size=64", "logging.debug=true")
    assert rc == 1
    assert "Traceback" in err and "error: unknown config key 'model.hiden_size'" in err


@pytest.mark.timeout(60)
def test_debug_in_the_yaml_shows_the_traceback(tiny, tmp_path):
    """`logging.debug: true` in the file counts as much as on the command line."""
    import yaml

    data = yaml.safe_load(tiny.read_text(encoding="utf-8"))
    data.setdefault("logging", {})["debug"] = True
    config = tmp_path / "debug.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    rc, err = cli_in_process(config, "model.hiden_size=64")
    assert rc == 1
    assert "Traceback" in err and "error: unknown config key 'model.hiden_size'" in err


@pytest.mark.timeout(60)
def test_config_is_a_directory(tmp_path):
    rc, err = cli_in_process(tmp_path)
    assert_clean_error(rc, err, f"config {tmp_path} is a directory, not a file")


@pytest.mark.timeout(30)
def test_override_keeps_a_hash_in_the_value(tiny):
    """A command line has no comments: `key=a #b` is the value `a #b` (YAML alone would cut it at ` #`)."""
    from megatron_opcd.training.config import load_train_config

    cfg = load_train_config(str(tiny), ["context.text=Answer with #1 first", "generation.stop_strings=['x #', '#y']"])
    assert cfg.context.text == "Answer with #1 first"
    assert cfg.generation.stop_strings == ["x #", "#y"]


@pytest.mark.timeout(30)
def test_yaml_alias_bomb(tmp_path):
    """Nine levels of nine aliases name 9**9 values in 300 bytes: refused before anything walks them."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ngeneration: {stop_strings: *a8}\n")
    rc, err = cli_in_process(bomb)
    assert_clean_error(rc, err, f"config file {bomb}: the YAML expands to more than 100000 values")


@pytest.mark.timeout(30)
def test_oversize_yaml(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (5 * 2**20) + "\n")
    rc, err = cli_in_process(big)
    assert_clean_error(rc, err, f"config file {big} is 5 MiB, over the 4 MiB")
