"""The whole trainer at the topologies a cluster runs equals one process (issue 17).

Two optimizer steps, fp32, greedy rollouts, one global batch of 4 prompts: a single process
(two micro-batches of 2) against DP=2; DP=2 with the distributed optimizer; DP=2 with two
micro-batches each (gradient accumulation); TP=2 x DP=2 with sequence parallelism; PP=2 x DP=2.
The logged losses and grad norms and every updated weight agree within 1e-5, with Adam and with
SGD (where a gradient divided by DP shows directly in the weights). The evaluation after the
steps has one held-out prompt for two DP ranks: it returns, with the one-process eval KL.
"""

from __future__ import annotations

import pytest
import torch

import sys
from pathlib import Path

from _train_fixtures import make_run
from _train_ranks import cluster_steps

VOCAB = 200
ADAM = ["optimizer.name=adam", "optimizer.lr=1e-3", "optimizer.adam_eps=1e-6"]
SGD = ["optimizer.name=sgd", "optimizer.lr=0.5"]
DP2 = ADAM, SGD, ADAM + ["parallel.use_distributed_optimizer=true"], ADAM + ["schedule.micro_batch_size=1"]
DP2_NAMES = "dp2", "dp2_sgd", "dp2_distopt", "dp2_accumulate"
FOUR = (ADAM + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
        SGD + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
        ADAM + ["parallel.pipeline_model_parallel_size=2"], SGD + ["parallel.pipeline_model_parallel_size=2"])
FOUR_NAMES = "tp2sp_dp2", "tp2sp_dp2_sgd", "pp2_dp2", "pp2_dp2_sgd"


def _merge(ranks: list[dict]) -> dict:
    """One view of a multi-rank case: metrics from rank 0 (every rank logs the same), weights
    from DP rank 0's tensor-parallel rank 0 of every pipeline stage."""
    merged = {k: ranks[0][k] for k in ("loss", "grad_norm", "eval_kl", "logits")}
    merged["weights"] = {}
    for r in ranks:
        if r["tp_rank"] or r["dp_rank"]:
            continue
        for name, w in r["weights"].items():
            if name == "output_layer.weight" and r["tied"]:
                continue  # tied: the last stage's copy of the embedding
            merged["weights"].setdefault(name, w)
    return merged


@pytest.fixture(scope="module")
def runs(run_ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    make_run(root)  # the tokenizer and prompt files
    one = root / "one_eval.jsonl"  # one held-out prompt, two DP ranks: one rank has none
    one.write_text((root / "eval.jsonl").read_text().splitlines()[0] + "\n")
    # clip_grad well above the grad norms: a clipped step would hide a gradient's scale.
    cfg = str(make_run(root, steps=2, extra={
        "generation.greedy": True, "optimizer.clip_grad": 100.0, "checkpoint.save": None, "data.eval": str(one),
        "logging.dir": str(root / "logs"), "evaluation.num_prompts": 4, "evaluation.max_new_tokens": 4}))
    ref = run_ranks(cluster_steps, 1, cfg, [ADAM, SGD], timeout=300)[0]
    out = {"ref": _merge([ref[0]]), "ref_sgd": _merge([ref[1]]), "config": cfg}
    per_rank = run_ranks(cluster_steps, 2, cfg, list(DP2), timeout=400)
    out.update({n: _merge([r[i] for r in per_rank]) for i, n in enumerate(DP2_NAMES)})
    per_rank = run_ranks(cluster_steps, 4, cfg, list(FOUR), timeout=600)
    out.update({n: _merge([r[i] for r in per_rank]) for i, n in enumerate(FOUR_NAMES)})
    return out


@pytest.mark.parametrize("name", DP2_NAMES + FOUR_NAMES)
def test_cluster_topology_equals_one_process(runs, name):
    ref, got = runs["ref_sgd" if name.endswith("_sgd") else "ref"], runs[name]
    # Losses and grad norms are O(1) sums over a few hundred float32 terms: 1e-5 relative bounds
    # their reduction-order error with a wide margin, and a 1/DP gradient (x0.5) is far outside it.
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), "loss"
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), "grad norm"
    assert ref["grad_norm"][0] > 1e-2
    assert got["eval_kl"] == pytest.approx(ref["eval_kl"], rel=1e-5), "eval KL"
    assert sorted(got["weights"]) == sorted(ref["weights"])
    for n, w in ref["weights"].items():
        rows = slice(0, VOCAB) if ("word_embeddings" in n or "output_layer" in n) else slice(None)
        torch.testing.assert_close(got["weights"][n][rows], w[rows], atol=1e-5, rtol=1e-5, msg=n)


def test_sequence_parallel_logits_are_response_only_and_estimated(runs):
    """Under TP + SP the student's output layer computes the response rows only (it computed all
    [S, b, V/tp] and the step copied them twice: SP turned the response-only path off), and
    tools/estimate_memory.py's logits term is that tensor's size within 10%."""
    from megatron_opcd.training.config import load_train_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import estimate_memory

    cfg = load_train_config(runs["config"], FOUR[0])
    largest_shape, largest = max(runs["tp2sp_dp2"]["logits"], key=lambda x: x[1])
    assert largest_shape[0] <= cfg.generation.max_new_tokens  # [R, b, V/tp], R = the longest response
    assert largest_shape[2] == 256 // 2  # the padded vocabulary's TP shard
    est = estimate_memory.estimate(cfg, 4)["bytes"]["logits (student + teacher)"] / 2  # the student's share
    assert abs(largest - est) <= 0.1 * est, (largest, est)
