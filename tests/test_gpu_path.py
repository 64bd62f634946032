"""The GPU path: Transformer Engine layer spec and FP8, selected by `model.transformer_impl` / `model.fp8`.

GPU-marked (skipped on CPU with the reason, see conftest.py); `benchmarks/gpu_check.sh` runs them.
  - the TE spec computes what the local spec computes, in bf16, with the same weights;
  - a training step in FP8 (delayed and current/tensorwise scaling) runs and its loss stays close to
    bf16's, before and after the optimizer step.
One process (TP = PP = 1) each: what these check is the layer implementation, not the layout.
"""

from __future__ import annotations

import pytest
import torch

# Big enough for FP8 GEMMs (dimensions multiple of 16), small enough for seconds on one GPU.
ARCH = dict(num_layers=2, hidden_size=512, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=1024,
            vocab_size=2048, make_vocab_size_divisible_by=128, max_position_embeddings=512, qk_layernorm=True,
            tie_embeddings=False, params_dtype="bf16")
# TE fuses the pre-attention and pre-MLP norms into the following linear layers.
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _te_name(local_name: str) -> str:
    for old, new in TE_NAMES.items():
        if local_name.endswith(old):
            return local_name[: -len(old)] + new
    return local_name


def _copy_local_to_te(local, te) -> None:
    te_params = dict(te.named_parameters())
    with torch.no_grad():
        for name, p in local.named_parameters():
            te_params[_te_name(name)].copy_(p)


def _batch(b=4, s=128, vocab=2048, seed=0):
    from megatron_opcd.data.packing import causal_padding_mask

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    mask = causal_padding_mask(torch.full((b,), s), s)
    return tokens[:, :-1].cuda(), tokens[:, 1:].cuda(), torch.arange(s)[None].expand(b, s).cuda(), mask.cuda()


def _build(**overrides):
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.models import build_model

    return build_model(ModelConfig(**{**ARCH, **overrides}), "student", seed=7)


def _te_vs_local(_rank=0):
    from megatron_opcd import parallel
    from megatron_opcd.config import ParallelConfig

    parallel.initialize(ParallelConfig())
    try:
        local = _build(transformer_impl="local").eval()
        te = _build(transformer_impl="transformer_engine").eval()
        _copy_local_to_te(local, te)
        tokens, _, pos, mask = _batch()
        with torch.no_grad():
            a = torch.log_softmax(local(tokens, pos, mask).float(), -1)
            b = torch.log_softmax(te(tokens, pos, mask).float(), -1)
        return {"max": float((a - b).abs().max()), "mean": float((a - b).abs().mean()),
                "kl": float((a.exp() * (a - b)).sum(-1).mean())}
    finally:
        parallel.destroy()


def _loss(model, tokens, targets, pos, mask):
    logits = model(tokens, pos, mask).float()  # [b, s, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1)[:, :ARCH["vocab_size"]], targets.flatten())


def _two_steps(fp8, recipe, _rank=0):
    """Losses of two Adam steps from the same weights, in bf16 and in FP8."""
    from megatron_opcd import parallel
    from megatron_opcd.config import ParallelConfig

    parallel.initialize(ParallelConfig())
    try:
        ref = _build(transformer_impl="transformer_engine")
        out = {}
        for name, kw in (("bf16", {}), ("fp8", {"fp8": fp8, "fp8_recipe": recipe})):
            model = _build(transformer_impl="transformer_engine", **kw)
            with torch.no_grad():  # the same weights; FP8 scaling state (TE's _extra_state) starts fresh
                ref_params = dict(ref.named_parameters())
                for name, p in model.named_parameters():
                    p.copy_(ref_params[name])
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            losses = []
            for step in range(3):
                tokens, targets, pos, mask = _batch(seed=step % 2)
                loss = _loss(model, tokens, targets, pos, mask)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
            out[name] = losses
        return out
    finally:
        parallel.destroy()


@pytest.mark.gpu
def test_te_spec_equals_local_spec_in_bf16(run_ranks):
    r = run_ranks(_te_vs_local, 1, timeout=300)[0]
    # bf16 with different kernels (fused norm+linear, flash/cuDNN attention): log-probs agree to
    # bf16 precision, the distributions to a KL of ~1e-4 nats.
    assert r["mean"] < 1e-2 and r["max"] < 0.15 and r["kl"] < 1e-3, r


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,recipe", [("hybrid", "delayed"), ("e4m3", "delayed"), ("hybrid", "tensorwise")])
def test_fp8_step_runs_and_loss_stays_close_to_bf16(run_ranks, fp8, recipe):
    from megatron_opcd.compat.optional import fp8_status

    ok, why = fp8_status()
    if not ok:
        pytest.skip(why)
    if recipe == "tensorwise":
        import transformer_engine.common.recipe as te_recipe

        if not hasattr(te_recipe, "Float8CurrentScaling"):
            pytest.skip("this Transformer Engine has no current (tensorwise) scaling; it needs TE >= 2.2")
    r = run_ranks(_two_steps, 1, fp8, recipe, timeout=300)[0]
    for bf16, f8 in zip(r["bf16"], r["fp8"]):
        assert torch.isfinite(torch.tensor(f8)), r
        assert abs(f8 - bf16) / bf16 < 0.02, r  # cross-entropy ~ log(2048) = 7.6: within 2%
