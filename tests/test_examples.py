"""examples/: every paper setting's YAML loads and agrees with its file name; the data preparation
turns small local copies of each dataset format into the trainer's JSONL; tools/estimate_memory.py
matches hand-computed numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opcd.config import cluster_topology
from megatron_opcd.data.prompts import load_examples
from megatron_opcd.training.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "examples"))

import estimate_memory  # noqa: E402
import prepare_data  # noqa: E402


def test_there_is_one_yaml_per_paper_setting():
    names = {p.stem for p in EXAMPLES}
    assert "tiny_cpu_tp2" in names
    for model in ("llama3.1-8b", "llama3.2-3b", "qwen2.5-7b", "qwen2.5-3b"):
        for task in ("medical", "safety"):
            assert any(n.startswith(f"opcd_{model}_{task}_") for n in names), (model, task)
    for prefix in ("opcd_qwen3-8b_math_2n8g", "opcd_qwen3-1.7b_math_teacher-qwen3-8b", "opcd_qwen3-4b_math_teacher-qwen3-8b",
                   "opcd_qwen3-1.7b_frozenlake", "opcd_qwen3-4b-instruct_sokoban"):
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_matches_its_name(path):
    cfg = load_train_config(str(path))
    m = re.search(r"_(\d+)n(\d+)g_tp(\d+)pp(\d+)$", path.stem)
    if path.stem == "tiny_cpu_tp2":
        assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.model.params_dtype == "fp32"
        return
    if path.stem == "opcd_smollm2-135m_cpu_dp2":  # the shipped model on 2 CPU ranks (tests/test_user_path.py)
        assert cfg.parallel.tensor_model_parallel_size == cfg.parallel.pipeline_model_parallel_size == 1
        cfg.check_batches(2)
        return
    assert m, f"{path.name}: the file name must state the topology (..._<N>n<G>g_tp<T>pp<P>)"
    nodes, gpus, tp, pp = map(int, m.groups())
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (tp, pp)
    dp = nodes * gpus // (tp * pp)
    cfg.check_batches(dp)  # global batch divides over micro-batch x DP
    cfg.model.check_parallel(cfg.parallel)
    if cfg.teacher.model is not None:
        cfg.teacher.model.check_parallel(cfg.teacher_parallel, "teacher")
        assert cfg.teacher.model.vocab_size == cfg.model.vocab_size
    # A teacher on its own layout says so in the name (`_teacher-qwen3-8b-tp2_`), and only then.
    own = re.search(r"_teacher-[^_]+-tp(\d+)_", path.stem)
    assert cfg.teacher.own_layout(cfg.parallel) == bool(own), path.name
    if own:
        assert cfg.teacher_parallel.tensor_model_parallel_size == int(own.group(1))
    # The paper's hyperparameters.
    assert cfg.schedule.steps == 50 and cfg.schedule.global_batch_size == 128
    assert cfg.optimizer.lr in (1e-6, 5e-6)
    assert cfg.loss.topk == 256 and cfg.loss_topk_from == "student" and cfg.loss_kind == "reverse_kl"
    # The off-policy baseline from the same file: forward KL on the teacher's samples, over the teacher's top-k.
    # (A teacher on its own layout generates on the student's ranks there: back to the student's layout.)
    shared = ["teacher.parallel.tensor_model_parallel_size=" + str(cfg.parallel.tensor_model_parallel_size)] * bool(own)
    off = load_train_config(str(path), ["algorithm.name=offpolicy_cd", *shared])
    assert off.loss_kind == "forward_kl" and off.loss_topk_from == "teacher"
    assert cfg.generation.temperature == 1.0 and cfg.loss_temperature == 1.0
    assert cfg.model.params_dtype == "bf16" and cfg.model.transformer_impl == "transformer_engine"
    # Cluster paths are placeholders that the sbatch scripts and recipes override.
    assert cfg.data.train.startswith("/path/to/") and cfg.checkpoint.pretrained.startswith("/path/to/")


def _run_prepare(*args) -> None:
    assert prepare_data.main(list(args)) == 0


def test_prepare_dapo_math_from_jsonl_dedupes_and_splits(tmp_path):
    src = tmp_path / "dapo.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}], "reward_model": {"ground_truth": str(2 * i)}}
            for i in range(30)]
    src.write_text("\n".join(json.dumps(r) for r in rows + rows[:5]) + "\n")  # duplicates, as in the parquet
    _run_prepare("dapo-math", "--input", str(src), "--out", str(tmp_path / "data"), "--eval-size", "3")
    train = load_examples(tmp_path / "data/dapo-math-17k/train.jsonl")
    held = load_examples(tmp_path / "data/dapo-math-17k/eval.jsonl")
    assert len(train) == 27 and len(held) == 3
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    e = next(x for x in train + held if x.prompt == "What is 7+7?")
    assert e.answer == "14"


def test_prepare_medmcqa_skips_unlabeled_rows(tmp_path):
    src, val = tmp_path / "train.json", tmp_path / "validation.jsonl"
    row = {"question": "Which vitamin?", "opa": "A", "opb": "B12", "opc": "C", "opd": "D", "cop": 1}
    src.write_text(json.dumps([row, {**row, "question": "Unlabeled?", "cop": -1}]))
    val.write_text(json.dumps({**row, "question": "Held out?", "cop": 3}) + "\n")
    _run_prepare("medmcqa", "--input", str(src), "--eval-input", str(val), "--out", str(tmp_path))
    train = load_examples(tmp_path / "medmcqa/train.jsonl")
    assert len(train) == 1 and train[0].answer == "B" and "B. B12" in train[0].prompt
    assert load_examples(tmp_path / "medmcqa/eval.jsonl")[0].answer == "D"


def test_prepare_safety_merges_three_formats(tmp_path):
    (tmp_path / "tweeteval.jsonl").write_text(
        "\n".join(json.dumps({"text": f"tweet {i}", "label": i % 2}) for i in range(10)) + "\n")
    (tmp_path / "hatecheck.csv").write_text("test_case,label_gold\nI hate group X,hateful\nI love cats,non-hateful\n")
    (tmp_path / "ethos.csv").write_text("comment;isHate\nsome hateful comment;0.9\na kind comment;0.1\n")
    _run_prepare("safety", "--tweeteval", str(tmp_path / "tweeteval.jsonl"), "--hatecheck", str(tmp_path / "hatecheck.csv"),
                 "--ethos", str(tmp_path / "ethos.csv"), "--out", str(tmp_path / "d"), "--eval-size", "1")
    rows = [json.loads(line) for f in ("train", "eval") for line in (tmp_path / f"d/safety/{f}.jsonl").read_text().splitlines()]
    assert len(rows) == 14
    answers = {r["prompt"].split("\n")[0]: r["answer"] for r in rows}
    assert answers["Text: I hate group X"] == "hateful" and answers["Text: I love cats"] == "not hateful"
    assert answers["Text: some hateful comment"] == "hateful" and answers["Text: tweet 3"] == "hateful"


def test_prepare_prompts_and_experience_feed_the_context_loader(tmp_path):
    from megatron_opcd.data.prompts import load_contexts
    from megatron_opcd.training.config import ContextConfig

    _run_prepare("prompts", "--out", str(tmp_path))
    assert load_contexts(ContextConfig(file=str(tmp_path / "prompts/medical_system_prompt.txt")))[0].startswith("You are")
    (tmp_path / "exp.txt").write_text("Check units.\n\nSimplify before expanding.\n")
    _run_prepare("experience", "--input", str(tmp_path / "exp.txt"), "--out", str(tmp_path / "pool"))
    assert load_contexts(ContextConfig(pool=str(tmp_path / "pool/experience.json"))) == [
        "Check units.", "Simplify before expanding."]


def test_prepare_names_a_missing_file(tmp_path, capsys):
    assert prepare_data.main(["medmcqa", "--input", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# tools/estimate_memory.py


SMALL = """
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2, ffn_hidden_size: 128,
        vocab_size: 128, make_vocab_size_divisible_by: 64, tie_embeddings: true, params_dtype: bf16}
teacher: self
parallel: {tensor_model_parallel_size: 2, use_distributed_optimizer: true}
data: {train: /x.jsonl, max_prompt_tokens: 16, max_context_tokens: 8}
generation: {max_new_tokens: 8}
schedule: {global_batch_size: 8, micro_batch_size: 2}
"""


def test_estimate_memory_matches_hand_computed_numbers(tmp_path):
    path = tmp_path / "small_1n4g.yaml"
    path.write_text(SMALL)
    r = estimate_memory.estimate(load_train_config(str(path)), 4)  # TP 2 x DP 2
    # One layer per TP rank: QKV 64 x (4 + 2 x 2) x 16 = 8192, proj 64 x 64 = 4096, SwiGLU 64 x 256 + 128 x 64
    # = 24576, halved by TP = 18432, plus 2 RMSNorms of 64 = 18560. Two layers 37120, + embedding
    # 128 x 64 / 2 = 4096 (tied: no output matrix) + final norm 64 = 41280.
    assert r["student_params_per_gpu"] == 41280
    b = r["bytes"]
    assert b["student weights"] == 41280 * 2
    assert b["student grads (fp32)"] == 41280 * 4
    assert b["optimizer state"] == 41280 * 12 // 2  # fp32 master + 2 moments, over DP 2
    assert b["teacher weights"] == 0  # teacher: self
    # KV per token: 2 (K, V) x 2 layers x 1 group per TP rank x 16 x 2 bytes = 128.
    assert b["rollout KV cache"] == 128 * 4 * (16 + 8)  # 8 prompts / DP 2 = 4 rows; prompt + response
    assert b["teacher KV cache (scoring)"] == 128 * 2 * (8 + 16 + 8)  # one micro-batch with the context
    assert b["logits (student + teacher)"] == 2 * (2 * 8 * 64 * 4)  # micro x response x V/tp x fp32, twice
    assert b["held teacher logits (step)"] == 0  # PP = 1: scored per micro-batch in the forward step
    assert b["rollout prefill logits"] == 4 * 16 * 64 * 2
    assert b["activations (rough)"] == (10 + 24 // 2) * (16 + 8) * 2 * 64 * 2  # no SP; 2 layers, 1 in flight
    static = 41280 * (2 + 4 + 6)
    assert r["phases"]["update"] == static + 8192 + 135168
    assert r["peak_bytes"] == max(r["phases"].values())


def test_estimate_memory_pp_puts_the_output_layer_on_the_last_stage(tmp_path):
    path = tmp_path / "pp_1n2g.yaml"
    path.write_text(SMALL.replace("tensor_model_parallel_size: 2", "pipeline_model_parallel_size: 2"))
    r = estimate_memory.estimate(load_train_config(str(path)), 2)
    layer = (8192 + 4096 + 24576) + 128
    assert r["student_params_per_gpu"] == layer + 128 * 64 + 64  # last stage: 1 layer, tied copy, final norm
    # PP > 1: the step's teacher logits are held on the last stage (8 rows / DP 1, response 8, V 128, bf16).
    assert r["bytes"]["held teacher logits (step)"] == 8 * 8 * 128 * 2


def test_estimate_memory_counts_the_teacher_at_its_own_layout(tmp_path):
    """teacher.parallel: the teacher's weights, scoring KV cache and output at its layout (TP 2 x
    DP 2), the student's at its own (TP 1 x DP 4), on 4 GPUs."""
    model = SMALL.split("model: ", 1)[1].split("\nteacher:", 1)[0]
    path = tmp_path / "own_1n4g.yaml"
    path.write_text(SMALL.replace("teacher: self", f"teacher: {{model: {model}, parallel: {{tensor_model_parallel_size: 2}}}}")
                    .replace("tensor_model_parallel_size: 2, use", "tensor_model_parallel_size: 1, use"))
    r = estimate_memory.estimate(load_train_config(str(path)), 4)
    assert r["layout"]["tp"] == 1 and r["teacher_layout"] == {"tp": 2, "pp": 1, "dp": 2, "own_groups": True}
    # Student at TP 1: 2 layers x (8192 + 4096 + 24576 + 128) + embedding 128 x 64 (tied) + final norm 64.
    assert r["student_params_per_gpu"] == 2 * 36992 + 8192 + 64
    assert r["teacher_params_per_gpu"] == 41280  # the same model at TP 2 (the hand count above)
    b = r["bytes"]
    assert b["teacher weights"] == 41280 * 2
    # A teacher replica scores the micro-batches of 2 student replicas: 2 x 4 / 2 = 4 rows, at TP 2
    # (128 bytes of KV per token, as above), [context; prompt; response] = 8 + 16 + 8 tokens.
    assert b["teacher KV cache (scoring)"] == 128 * 4 * (8 + 16 + 8)
    assert b["teacher logits at its layout"] == 4 * 8 * (128 // 2) * 2  # rows x response x V/TP_t x bf16
    assert b["logits (student + teacher)"] == 2 * (2 * 8 * 128 * 4)  # the student's sharding (TP 1), fp32


def test_estimate_memory_counts_the_ema_teachers_fp32_copy(tmp_path):
    path = tmp_path / "ema_1n4g.yaml"
    path.write_text(SMALL.replace("teacher: self", "teacher: {mode: ema, ema_decay: 0.9}"))
    r = estimate_memory.estimate(load_train_config(str(path)), 4)  # TP 2 x DP 2, as SMALL
    assert r["teacher_params_per_gpu"] == 41280 and r["bytes"]["teacher weights"] == 41280 * 4  # fp32, student sharding
    assert r["teacher_layout"] == {"tp": 2, "pp": 1, "dp": 2, "own_groups": False}


def test_estimate_memory_cli_reads_world_size_from_the_file_name():
    out = subprocess.run([sys.executable, str(ROOT / "tools/estimate_memory.py"),
                          str(ROOT / "examples/opcd_qwen3-8b_math_2n8g_tp2pp1.yaml"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["layout"] == {"world_size": 16, "tp": 2, "pp": 1, "dp": 8, "micro_batches": 16,
                           "rows_per_dp_rank": 16, "distributed_optimizer": True}
    assert 8.1e9 < r["student_params"] < 8.3e9  # Qwen3-8B: 8.19B parameters
    assert r["peak_bytes"] < 0.9 * 80 * 2**30


@pytest.mark.parametrize("path", [p for p in EXAMPLES if cluster_topology(p) is not None], ids=lambda p: p.stem)
def test_every_paper_setting_fits_an_h100_by_the_estimate(path):
    r = estimate_memory.estimate(load_train_config(str(path)), estimate_memory.world_size_from_name(str(path)))
    assert r["peak_bytes"] < 0.9 * 80 * 2**30


def test_estimate_memory_counts_moe_parameters_of_the_built_model():
    """An MoE model's count = the parameters of the tiny Qwen3-MoE transformers builds (8 experts,
    top-2); under EP each rank holds its share of the experts (router and attention replicated),
    and the active count is the model with only top-k experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_opcd.config import ModelConfig
    from megatron_opcd.convert import model_config_from_hf

    hf_cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(hf_cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    m = model_config_from_hf(hf_cfg, make_vocab_size_divisible_by=64)  # 256 rows: no padding
    assert estimate_memory.stage_params(m, 1, 1).total == total
    assert estimate_memory.stage_params(m, 1, 1, ep=2).busiest == total - experts // 2
    # TP2 x EP2 with expert TP 1: attention and embeddings halve, each rank keeps 4 whole experts.
    per_rank = estimate_memory.stage_params(m, 2, 1, ep=2, etp=1).busiest
    dense = ModelConfig(**{**{k: getattr(m, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                        "num_query_groups", "kv_channels", "vocab_size",
                                                        "make_vocab_size_divisible_by", "qk_layernorm", "tie_embeddings")},
                           "ffn_hidden_size": 1})
    no_mlp = estimate_memory.stage_params(dense, 2, 1).busiest - 2 * (3 * 32 * 1) // 2
    assert per_rank == no_mlp + 2 * (8 * 32) + experts // 2
    assert estimate_memory.active_params(m) == total - experts + experts // 8 * 2
