"""The GPU path: Transformer Engine layer spec and FP8, selected by `model.transformer_impl` / `model.fp8`.

GPU-marked (skipped on CPU with the reason, see conftest.py); `benchmarks/gpu_check.sh` runs them.
  - the TE spec computes what the local spec computes, in bf16, with the same weights;
  - a training step in FP8 (delayed and current/tensorwise scaling) runs and its loss stays close to
    bf16's, before and after the optimizer step;
  - the whole trainer on the GPU gives the losses of the same run on the CPU (no TE needed).
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


def _loss(model, tokens, targets, pos, mask, vocab=ARCH["vocab_size"]):
    logits = model(tokens, pos, mask).float()  # [b, s, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1)[:, :vocab], targets.flatten())


def _two_steps(fp8, recipe, _rank=0):
    """Losses of Adam steps from the same weights, in bf16 and in FP8."""
    return _train_variants({"bf16": {}, "fp8": {"fp8": fp8, "fp8_recipe": recipe}})


def _train_variants(variants: dict, impl: str = "transformer_engine", arch: dict | None = None, _rank=0) -> dict:
    """{label: losses of three Adam steps} for each label's model options, every model starting
    from the same weights (a reference model's, copied parameter by parameter)."""
    from megatron_opcd import parallel
    from megatron_opcd.config import ParallelConfig

    parallel.initialize(ParallelConfig())
    try:
        arch = arch or {}
        ref = _build(transformer_impl=impl, **arch)
        out = {}
        for label, kw in variants.items():
            model = _build(transformer_impl=impl, **arch, **kw)
            with torch.no_grad():  # the same weights; FP8 scaling state (TE's _extra_state) starts fresh
                ref_params = dict(ref.named_parameters())
                for param_name, p in model.named_parameters():  # not `label`: the result is keyed by it
                    p.copy_(ref_params[param_name])
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            losses = []
            for step in range(3):
                tokens, targets, pos, mask = _batch(s=arch.get("max_position_embeddings", 512) // 4,
                                                    vocab=arch.get("vocab_size", ARCH["vocab_size"]), seed=step % 2)
                loss = _loss(model, tokens, targets, pos, mask, vocab=arch.get("vocab_size", ARCH["vocab_size"]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
            out[label] = losses
        return out
    finally:
        parallel.destroy()


def test_variant_losses_are_keyed_by_variant(run_ranks):
    """The FP8 test's helper on the CPU (local spec, a tiny fp32 model, two identical variants):
    its result is keyed by the variant labels (a reused loop variable keyed it by the last
    parameter's name, so the GPU test raised KeyError on r["bf16"]), and the same weights give
    the same losses."""
    tiny = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                vocab_size=256, make_vocab_size_divisible_by=64, max_position_embeddings=64, params_dtype="fp32")
    r = run_ranks(_train_variants, 1, {"bf16": {}, "again": {}}, "local", tiny, timeout=300)[0]
    assert sorted(r) == ["again", "bf16"]
    assert len(r["bf16"]) == 3 and all(x == x and x > 1.0 for x in r["bf16"])
    assert r["again"] == r["bf16"]


@pytest.mark.gpu
def test_te_spec_equals_local_spec_in_bf16(run_ranks):
    from megatron_opcd.compat.optional import transformer_engine_status

    ok, why = transformer_engine_status()
    if not ok:
        pytest.skip(why)
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


def _train(config, logs, env):
    """`python -m megatron_opcd.train` as a user runs it; the metrics of each train and eval line."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "megatron_opcd.train", "--config", str(config), f"logging.dir={logs}",
                          f"checkpoint.save={logs / 'ckpt'}"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    return run.stderr + run.stdout, lines


@pytest.mark.gpu
def test_opcd_training_on_gpu_equals_cpu(tmp_path):
    """The whole trainer on the GPU (NCCL + gloo groups, KV-cache generation, teacher scoring with a
    shared context prefix, megatron's schedule, the loss, SGD, evaluation, a dist_checkpointing
    save) gives the losses of the same run on the CPU. Greedy rollouts and SGD in float32: the
    two runs differ only by floating-point summation order (cuBLAS vs MKL)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _train_fixtures import make_run

    cfg = make_run(tmp_path / "run", steps=3, extra={"optimizer.name": "sgd", "optimizer.lr": 0.5,
                                                     "generation.greedy": True, "evaluation.interval": 3,
                                                     "evaluation.max_new_tokens": 8})
    env = dict(os.environ, OMP_NUM_THREADS="4", PYTHONUNBUFFERED="1")
    gpu_log, gpu = _train(cfg, tmp_path / "gpu", env)
    cpu_log, cpu = _train(cfg, tmp_path / "cpu", dict(env, CUDA_VISIBLE_DEVICES=""))
    assert "backend cpu:gloo,cuda:nccl" in gpu_log and "CUDA:" in gpu_log, gpu_log[-2000:]
    assert "backend gloo" in cpu_log, cpu_log[-2000:]
    for split in ("train", "eval"):
        g = [m for m in gpu if m["split"] == split]
        c = [m for m in cpu if m["split"] == split]
        assert len(g) == len(c) > 0, (split, g, c)
        for a, b in zip(g, c):
            key = "loss" if split == "train" else "kl"
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), (split, a, b)
            if split == "train":
                assert a["response_len"] == b["response_len"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4)
    assert (tmp_path / "gpu" / "ckpt" / "step_0000003" / "opcd_checkpoint.json").is_file()
    train = [m["loss"] for m in cpu if m["split"] == "train"]
    assert len(set(train)) == len(train), "the steps must change the loss, or equal losses would prove little"


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_conversion_and_generate_cli_on_gpu(tmp_path, arch):
    """On the GPU, as a user runs them: `tools/convert_checkpoint.py hf-to-megatron`, then
    `python -m megatron_opcd.generate --greedy` (KV cache) gives the greedy tokens of HF's own
    `generate` (computed on the CPU, float32), and `megatron-to-hf` writes back the original tensors
    bit for bit."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_opcd.convert import HFReader
    from test_convert import NEW, P, VOCAB, _hf_generate, _make_hf, _make_tokenizer

    repo = Path(__file__).resolve().parents[1]
    hf = _make_hf(arch, tmp_path / "hf", _make_tokenizer(tmp_path))
    prompts = torch.randint(3, VOCAB, (2, P), generator=torch.Generator().manual_seed(11))
    ref = _hf_generate(AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval(), prompts)

    def cli(*args):
        out = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return out

    ck, back = tmp_path / "ck", tmp_path / "back"
    cli("tools/convert_checkpoint.py", "hf-to-megatron", "--hf", str(hf), "--out", str(ck), "--dtype", "fp32",
        "--make-vocab-size-divisible-by", "64")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_ids": p.tolist()}) + "\n" for p in prompts))
    run = cli("-m", "megatron_opcd.generate", "--ckpt", str(ck), "--prompts", str(tmp_path / "p.jsonl"), "--out",
              str(tmp_path / "o.jsonl"), "--greedy", "--max-new-tokens", str(NEW), "--ignore-eos", "--no-progress")
    assert "CUDA:" in run.stdout + run.stderr, "the generation ran on the CPU"
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    got = torch.tensor([p.tolist() + r["response_ids"] for p, r in zip(prompts, rows)])
    assert torch.equal(got, ref), f"{got} vs HF {ref}"
    cli("tools/convert_checkpoint.py", "megatron-to-hf", "--ckpt", str(ck), "--out", str(back))
    original = load_file(str(hf / "model.safetensors"))
    with HFReader(back) as exported:
        assert sorted(exported.keys()) == sorted(original)
        for name, t in original.items():
            assert torch.equal(exported.get(name), t), name
