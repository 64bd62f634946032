"""Mixture-of-experts models (issue 23): megatron-core's MoE layer built from `ModelConfig`, at
every layout, against a float64 reference written here from the raw weights.

One 2-rank launch runs EP2, TP2 x EP2 (expert TP 1, sequence parallel), PP2 and a reload of the EP2 checkpoint at
EP2; one single-process launch runs EP1 and a load of the EP2 checkpoint at EP1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _moe_ranks import PROMPTS, TINY_MOE, merge, moe_suite
from _numerics import assert_f32_close
from megatron_opcd.config import ModelConfig, ParallelConfig
from megatron_opcd.errors import ConfigError


@pytest.fixture(scope="module")
def layouts(run_ranks, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("moe_ckpt") / "ep2")
    two = run_ranks(moe_suite, 2, [
        dict(ep=2, save_dir=ckpt),
        dict(tp=2, ep=2, etp=1, sp=True),  # megatron's MoE layer trains under TP only with SP
        dict(pp=2),
        dict(ep=2, load_dir=ckpt),
    ], [dict(ep=2, empty_rank=1), dict(tp=2)], timeout=400)
    one = run_ranks(moe_suite, 1, [dict(), dict(load_dir=ckpt)], [dict()], timeout=300)
    gen = {"ep2": two[0]["generation"][0], "ep2_empty": two[1]["generation"][0], "ep1": one[0]["generation"][0],
           "tp2": two[0]["generation"][1]}
    two, one = [r["layouts"] for r in two], [r["layouts"] for r in one]
    return {"generation": gen,
        "ep2": merge([r[0] for r in two]),
        "tp2ep2": merge([r[1] for r in two]),
        "pp2": merge([r[2] for r in two]),
        "ep2_resumed": merge([r[3] for r in two]),
        "ep1": merge([r[0] for r in one]),
        "ep1_from_ep2": merge([r[1] for r in one]),
    }


def reference_logits(w: dict, tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Float64 forward of the tiny MoE model from its full weights (global names): RMSNorm, GQA
    attention with QK-norm and rotate-half RoPE, and per layer a router (softmax over the top-k
    logits, i.e. softmax over all experts renormalised over the top k) and SwiGLU experts.
    tokens [b, s] -> logits [b, s, vocab]."""
    w = {n: t.double() for n, t in w.items()}
    nh, ng, hd, k = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim, cfg.moe_router_topk
    b, s = tokens.shape

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * g

    inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [b, s, heads, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    x = w["embedding.word_embeddings.weight"][tokens]  # [b, s, h]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        y = rms(x, w[p + "input_layernorm.weight"])
        qkv = (y @ w[p + "self_attention.linear_qkv.weight"].t()).view(b, s, ng, (nh // ng + 2) * hd)
        q = qkv[..., : nh // ng * hd].reshape(b, s, nh, hd)
        kk = qkv[..., nh // ng * hd: (nh // ng + 1) * hd]
        v = qkv[..., (nh // ng + 1) * hd:]
        q = rms(q, w[p + "self_attention.q_layernorm.weight"])
        kk = rms(kk, w[p + "self_attention.k_layernorm.weight"])
        q, kk = rope(q), rope(kk)
        kk, v = kk.repeat_interleave(nh // ng, dim=2), v.repeat_interleave(nh // ng, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, kk) / hd ** 0.5
        att = att.masked_fill(causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, nh * hd)
        x = x + o @ w[p + "self_attention.linear_proj.weight"].t()
        y = rms(x, w[p + "pre_mlp_layernorm.weight"]).reshape(b * s, -1)
        router_logits = y @ w[p + "mlp.router.weight"].t()  # [tokens, experts]
        top, idx = router_logits.topk(k, dim=-1)
        gates = top.softmax(-1)
        out = torch.zeros_like(y)
        for t in range(b * s):
            for j in range(k):
                e = f"{p}mlp.experts.local_experts.{int(idx[t, j])}."
                gate, up = (y[t] @ w[e + "linear_fc1.weight"].t()).chunk(2, -1)
                out[t] += gates[t, j] * ((F.silu(gate) * up) @ w[e + "linear_fc2.weight"].t())
        x = x + out.view(b, s, -1)
    x = rms(x, w["decoder.final_layernorm.weight"])
    return x @ w["output_layer.weight"][: cfg.vocab_size].t()


def test_ep1_matches_float64_reference(layouts):
    """The megatron MoE model (router, top-k, sequential experts, all-to-all dispatcher) computes
    the reference's logits; float32 against float64 over two layers."""
    cfg = ModelConfig(**TINY_MOE)
    ref_run = layouts["ep1"]
    for m in range(ref_run["tokens"].shape[0]):
        ref = reference_logits(ref_run["weights"], ref_run["tokens"][m], cfg)  # [b, s, v]
        got = ref_run["logits"][m][..., : cfg.vocab_size]  # [b, s, v]
        assert_f32_close(got, ref, rel=1e-5)


@pytest.mark.parametrize("layout", ["ep2", "tp2ep2", "pp2"])
def test_moe_layout_matches_single_process(layouts, layout):
    """EP2, TP2 x EP2 and PP2 give EP1's logits, loss and gradients (every expert's included)."""
    run, ref = layouts[layout], layouts["ep1"]
    assert_f32_close(run["logits"], ref["logits"])
    assert run["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert set(run["grads"]) == set(ref["grads"])
    experts = [n for n in ref["grads"] if ".local_experts." in n]
    assert len(experts) == 2 * 8 * 2  # fc1 and fc2 of 8 experts in 2 layers, all present
    trained = [n for n in experts if ref["grads"][n].abs().max() > 0]
    assert len(trained) >= len(experts) - 4, "most experts must receive tokens, or the test proves little"
    for name, g in ref["grads"].items():
        assert_f32_close(run["grads"][name], g, rel=1e-4, msg=f"gradient of {name}")


def test_moe_layout_invariant_init(layouts):
    """The same seed gives the same full weights (experts by global index) at EP1/EP2/TP2xEP2/PP2."""
    ref = layouts["ep1"]["weights"]
    for layout in ("ep2", "tp2ep2", "pp2"):
        assert set(layouts[layout]["weights"]) == set(ref)
        for name, w in ref.items():
            torch.testing.assert_close(layouts[layout]["weights"][name], w, atol=0, rtol=0)
    e0, e5 = ref["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"], \
        ref["decoder.layers.0.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert not torch.equal(e0, e5)  # each expert its own draw


def test_moe_checkpoint_ep2_resumes_and_loads_at_ep1(layouts):
    """dist_checkpointing: an EP2 save loads back at EP2 and at EP1 into a model of another seed,
    bit for bit."""
    saved = layouts["ep2"]["weights"]
    for layout in ("ep2_resumed", "ep1_from_ep2"):
        assert set(layouts[layout]["weights"]) == set(saved)
        for name, w in saved.items():
            torch.testing.assert_close(layouts[layout]["weights"][name], w, atol=0, rtol=0)
    assert_f32_close(layouts["ep1_from_ep2"]["logits"], layouts["ep1"]["logits"])


def test_moe_config_is_checked():
    """One-line ConfigErrors naming the fix."""
    base = {k: v for k, v in TINY_MOE.items()}
    with pytest.raises(ConfigError, match="moe_router_topk=9 must be in"):
        ModelConfig(**{**base, "moe_router_topk": 9})
    with pytest.raises(ConfigError, match="set model.moe_ffn_hidden_size"):
        ModelConfig(**{**base, "moe_ffn_hidden_size": None})
    with pytest.raises(ConfigError, match="num_experts must be positive"):
        ModelConfig(**{**base, "num_experts": 0})
    cfg = ModelConfig(**base)
    with pytest.raises(ConfigError, match="num_experts=8 is not divisible by parallel.expert_model_parallel_size=3"):
        cfg.check_parallel(ParallelConfig(expert_model_parallel_size=3))
    with pytest.raises(ConfigError, match="moe_ffn_hidden_size=16 is not divisible by the expert tensor-parallel"):
        cfg.check_parallel(ParallelConfig(expert_model_parallel_size=2, expert_tensor_parallel_size=32))
    ModelConfig(num_layers=2).check_parallel(ParallelConfig(expert_model_parallel_size=2))  # dense: untouched
    with pytest.raises(ConfigError, match="set parallel.sequence_parallel=true"):
        cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=2), trained=True)
    cfg.check_parallel(ParallelConfig(tensor_model_parallel_size=2))  # not trained (a teacher, generation): fine
    with pytest.raises(ConfigError, match="does not divide the 2 ranks of a pipeline stage"):
        ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2).check_world_size(2)
    ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                   expert_tensor_parallel_size=1).check_world_size(2)


def test_moe_kv_cache_greedy_equals_full_recompute(layouts):
    """Greedy decoding through the KV-cache loop gives the tokens of full recomputation, with
    log-probs within float32 rounding, at EP1, at TP2 and at EP2 (where the other EP rank has no prompts
    and decodes a throw-away row in lockstep: without it the experts' all-to-all would hang)."""
    gen = layouts["generation"]
    for run in (gen["ep1"], gen["ep2"], gen["tp2"]):
        (cached, cached_lp), (full, full_lp) = run["cached"], run["full"]
        assert len(cached) == len(PROMPTS) and all(len(r) == 6 for r in cached)
        assert cached == full
        for a, b in zip(cached_lp, full_lp):
            assert_f32_close(torch.tensor(a), torch.tensor(b), rel=1e-5)
    assert gen["ep2"]["cached"][0] == gen["ep1"]["cached"][0]  # the same model at EP2
    assert gen["tp2"]["cached"][0] == gen["ep1"]["cached"][0]  # and at TP2 (expert TP 2) without SP
    for a, b in zip(gen["tp2"]["cached"][1], gen["ep1"]["cached"][1]):
        assert_f32_close(torch.tensor(a), torch.tensor(b), rel=1e-5)
    assert gen["ep2_empty"]["cached"] == ([], [])


def test_moe_decode_routes_only_the_rows_it_has(layouts):
    """Each decode step sends rows x top-k tokens through a layer's experts (3 x 2 = 6), not a
    capacity's worth: no capacity factor, no padding."""
    rows = layouts["generation"]["ep1"]["rows"]
    layers, k = TINY_MOE["num_layers"], TINY_MOE["moe_router_topk"]
    prefill, decode = rows[:layers], rows[layers:]
    assert prefill[0] == len(PROMPTS) * max(map(len, PROMPTS)) * k  # the padded prompt block
    assert len(decode) == layers * 5 and set(decode) == {len(PROMPTS) * k}  # 5 decode forwards after the prefill
