"""Model building on one process: compat patches, teacher frozen, vocabulary check (issue 2)."""

from __future__ import annotations

import pytest
import torch

from megatron_opcd.config import ModelConfig
from megatron_opcd.errors import ConfigError


@pytest.fixture(scope="module")
def groups():
    from megatron_opcd import parallel

    g = parallel.initialize()
    yield g
    parallel.destroy()


def test_compat_patches_still_apply():
    """Fails loudly if a megatron-core upgrade moved what the CPU patches target, for the installed
    release; the patches are keyed by release (0.19's current_stream is not 0.16's)."""
    from megatron_opcd.compat import check_cpu_patches
    from megatron_opcd.compat import cpu

    assert check_cpu_patches() == []
    assert cpu.installed_version() in cpu.TESTED, "CI runs only the releases compat/cpu.py was measured on"
    names = {v: [p.name for p in cpu.patches_for(v)] for v in cpu.TESTED}
    assert "current_stream" not in names["0.16.1"] and "current_stream" in names["0.19.2"]
    assert set(names["0.16.1"]) < set(names["0.19.2"])
    for patch in cpu.PATCHES:  # every target is a megatron-core name, checked where the patch applies
        assert patch.targets and all(t.startswith("megatron.core.") for t in patch.targets), patch.name


def test_cpu_mode_is_an_explicit_opt_in():
    """Importing the entry points enables nothing (no patch, no TorchFunctionMode); on a host
    without CUDA `parallel.initialize` refuses until `compat.enable_cpu()` is called, then starts."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("CPU mode is for hosts without CUDA")
    code = "\n".join([
        "import torch",
        "import megatron_opcd.train, megatron_opcd.generate, megatron_opcd.evaluate, megatron_opcd.launcher",
        "import megatron_opcd.generation, megatron_opcd.models, megatron_opcd.convert",
        "from megatron_opcd import parallel",
        "from megatron_opcd.compat import cpu, enable_cpu",
        "print('after import:', cpu.is_applied(), torch._C._len_torch_function_stack())",
        "try:",
        "    parallel.initialize()",
        "except RuntimeError as exc:",
        "    print('refused:', exc)",
        "print('enabled:', enable_cpu(), torch._C._len_torch_function_stack())",
        "parallel.initialize()",
        "print('started')",
        "parallel.destroy()",
    ])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after import: False 0" in out.stdout
    assert "refused: this host has no CUDA and CPU mode is off: call megatron_opcd.compat.enable_cpu()" in out.stdout
    assert "enabled: True 1" in out.stdout and "started" in out.stdout


def test_compat_version_range_is_setup_py_and_the_makefile():
    """One range: setup.py's requirement is compat/cpu.py's SUPPORTED, and CI's two environments
    (the Makefile's MCORE_311/MCORE_312) are compat/cpu.py's TESTED releases, the range's ends."""
    import re
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    from megatron_opcd.compat import cpu

    root = Path(__file__).resolve().parents[1]
    setup = (root / "setup.py").read_text()
    assert f'"megatron-core{cpu.SUPPORTED}"' in setup
    assert "==" not in re.search(r'"megatron-core[^"]*"', setup).group(0)
    makefile = (root / "Makefile").read_text()
    pins = tuple(re.search(rf"^MCORE_{py} := (\S+)$", makefile, re.M).group(1) for py in ("311", "312"))
    assert pins == cpu.TESTED
    assert all(v in SpecifierSet(cpu.SUPPORTED) for v in cpu.TESTED)


def test_compat_unknown_release_warns_once_naming_what_was_checked(monkeypatch):
    """A release past the tested ones runs: one warning naming it and the checked targets, no error."""
    from megatron_opcd.compat import cpu

    monkeypatch.setattr(cpu, "_warned", False)
    with pytest.warns(UserWarning, match=r"megatron-core 0\.20\.0 is not a release this package was tested on") as rec:
        cpu.verify("0.20.0")
    text = str(rec[0].message)
    assert "current_stream" in text and "megatron.core.tensor_parallel.random._get_cuda_rng_state" in text
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu.verify("0.20.0")  # once per process
        cpu.verify(cpu.TESTED[0])  # a tested release: silent


def test_compat_missing_target_and_old_release_are_errors(monkeypatch):
    from megatron_opcd.compat import cpu

    gone = cpu.Patch("gone", ">=0.20", ("megatron.core.tensor_parallel.random.no_such_function",), lambda: None)
    monkeypatch.setattr(cpu, "PATCHES", cpu.PATCHES + (gone,))
    assert cpu.check(cpu.TESTED[1]) == []  # keyed by release: not checked where it does not apply
    problems = cpu.check("0.20.1")
    assert len(problems) == 1 and "no_such_function does not exist" in problems[0] and "'gone'" in problems[0]
    with pytest.raises(RuntimeError, match="no_such_function"):
        cpu.verify("0.20.1")
    assert any("older than 0.16.1" in p for p in cpu.check("0.15.0"))


def test_compat_redirects_cuda_only_without_gpu(groups):
    if torch.cuda.is_available():
        pytest.skip("patches are inactive with CUDA")
    from megatron_opcd.compat.cpu import is_applied

    assert is_applied()
    t = torch.zeros(2, device="cuda")
    assert t.device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1, dtype=torch.float32).type() == "torch.cuda.FloatTensor"
    # The "CUDA" RNG tracker really swaps the generator CPU ops draw from.
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    assert not torch.equal(inside, outside)
    torch.testing.assert_close(after, outside)


def test_compat_redirect_suspended_only_inside_the_block(groups):
    """generation's forward runs without the per-op redirect; everything around it keeps it."""
    if torch.cuda.is_available():
        pytest.skip("patches are inactive with CUDA")
    from megatron_opcd.compat import redirect_suspended

    with redirect_suspended():
        assert torch.cuda.current_device() == torch.device("cpu")  # patch 2 still answers
        with pytest.raises((RuntimeError, AssertionError)):  # no redirect: torch itself refuses CUDA
            torch.zeros(1, device="cuda")
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_teacher_is_frozen_and_student_trains(groups):
    from megatron_opcd.models import build_models

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256)
    big = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=8, vocab_size=256)
    student, teacher = build_models(cfg, big, groups=groups)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert student.training and all(p.requires_grad for p in student.parameters())
    ids = torch.randint(0, 256, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)[None, None].expand(2, 1, 6, 6)
    assert teacher(ids, pos, mask).requires_grad is False
    student(ids, pos, mask).sum().backward()
    assert all(p.grad is not None for p in student.parameters())


def test_generation_kernels_are_built_in(groups):
    """A built model already has the generation kernels as its leaves (nothing is swapped in at
    run time), subclasses of megatron's own classes that add no state: the state dict is the one
    of a GPTModel built from megatron's stock local spec, key for key, and so are its outputs."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opcd.compat import mcore
    from megatron_opcd.models import build_model, transformer_config
    from megatron_opcd.models.kernels import ForwardOnlyLinear, KVCacheAttention

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                      tie_embeddings=False)
    model = build_model(cfg, "student", groups=groups, seed=5).eval()
    column, row = mcore.local_linear_classes()
    attn, mlp = model.decoder.layers[0].self_attention, model.decoder.layers[0].mlp
    assert type(attn.core_attention).__bases__ == (KVCacheAttention, DotProductAttention)
    for leaf, base in ((attn.linear_qkv, column), (attn.linear_proj, row), (mlp.linear_fc1, column),
                       (mlp.linear_fc2, row), (model.output_layer, column)):
        assert type(leaf).__bases__ == (ForwardOnlyLinear, base)
    stock = GPTModel(config=transformer_config(cfg, groups), transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=cfg.padded_vocab_size(1), max_sequence_length=cfg.max_position_embeddings,
                     share_embeddings_and_output_weights=False, position_embedding_type="rope",
                     pg_collection=groups.pg_collection).eval()
    assert list(stock.state_dict()) == list(model.state_dict())
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        pos = torch.arange(6)[None].expand(2, 6)
        assert torch.equal(model(ids, pos, mask), stock(ids, pos, mask))  # megatron's forward, bit for bit


def test_vocabulary_must_match(groups):
    from megatron_opcd.models import build_models

    with pytest.raises(ConfigError, match="teacher.vocab_size=300 differs from model.vocab_size=256"):
        build_models(ModelConfig(vocab_size=256), ModelConfig(vocab_size=300), groups=groups)


def test_te_spec_refused_on_cpu(groups):
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    from megatron_opcd.models import build_model

    with pytest.raises(ConfigError, match="cannot run here"):
        build_model(ModelConfig(transformer_impl="transformer_engine"), groups=groups)


def test_bf16_model_keeps_norms_in_bf16(groups):
    """megatron's local spec makes torch norms in float32; the builder casts them like Megatron-LM's
    Float16Module would (float32 weights on bf16 activations take torch's unfused norm kernel)."""
    from megatron_opcd.models import build_model

    model = build_model(ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                    vocab_size=128, qk_layernorm=True, params_dtype="bf16"), groups=groups)
    norms = {n for n, _ in model.named_parameters() if "layernorm" in n}
    assert len(norms) == 5  # input, pre-MLP, q, k, final
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_process_group_backend(monkeypatch):
    """NCCL reduces CUDA tensors only: with it, host tensors (metric sums, stop flags) go over gloo."""
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.parallel import process_group_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_group_backend(ParallelConfig()) == "gloo"
    assert process_group_backend(ParallelConfig(backend="gloo")) == "gloo"
    with pytest.raises(ConfigError, match="needs CUDA"):
        process_group_backend(ParallelConfig(backend="nccl"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_group_backend(ParallelConfig()) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(ParallelConfig(backend="nccl")) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(ParallelConfig(backend="gloo")) == "gloo"


def test_one_rank_per_gpu(monkeypatch):
    """A local rank past the host's GPUs stops with both numbers, before any collective."""
    from megatron_opcd.parallel import local_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_gpu() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_gpu() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"local rank 1 has no GPU of its own: this host has 1 GPU\(s\)"):
        local_gpu()


def test_ranks_spawn_on_cuda_hosts(monkeypatch):
    """A CUDA context does not survive a fork: on a CUDA host the ranks are spawned, on a CPU box
    they fork from a server that has torch and megatron-core imported."""
    from megatron_opcd import launcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launcher._context().get_start_method() == "forkserver"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launcher._context().get_start_method() == "spawn"


def test_bad_role(groups):
    from megatron_opcd.models import build_model

    with pytest.raises(ConfigError, match="role must be"):
        build_model(ModelConfig(), role="critic", groups=groups)


def test_model_matches_float64_reference(groups):
    """The built megatron model equals an independent float64 Llama forward written here."""
    from megatron_opcd.models import build_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=128, make_vocab_size_divisible_by=64, rotary_base=10000)
    model = build_model(cfg, groups=groups, seed=3)
    s = 7
    ids = torch.randint(0, 128, (1, s), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    got = model(ids, torch.arange(s)[None], mask)[0, :, :128].double()
    w = {n: p.detach().double() for n, p in model.named_parameters()}
    nh, ng, hd = 4, 2, 16

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * g

    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [s, heads, hd], rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = w["embedding.word_embeddings.weight"][ids[0]]
    for i in range(2):
        p = f"decoder.layers.{i}."
        y = rms(x, w[p + "input_layernorm.weight"])
        qkv = (y @ w[p + "self_attention.linear_qkv.weight"].t()).view(s, ng, (nh // ng + 2) * hd)
        q = qkv[..., : nh // ng * hd].reshape(s, nh, hd)
        k = qkv[..., nh // ng * hd: (nh // ng + 1) * hd]
        v = qkv[..., (nh // ng + 1) * hd:]
        k = k.repeat_interleave(nh // ng, dim=1)
        v = v.repeat_interleave(nh // ng, dim=1)
        q, k = rope(q), rope(k)
        att = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
        att = att.masked_fill(mask[0], float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(s, nh * hd)
        x = x + o @ w[p + "self_attention.linear_proj.weight"].t()
        y = rms(x, w[p + "pre_mlp_layernorm.weight"])
        gate, up = (y @ w[p + "mlp.linear_fc1.weight"].t()).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].t()
    x = rms(x, w["decoder.final_layernorm.weight"])
    ref = x @ w["embedding.word_embeddings.weight"][:128].t()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gptmodel_deprecation_line_dropped_and_nothing_else(groups, caplog):
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED" per GPTModel built; compat/quiet.py drops that
    record only (0.16.1 never logs it: there the first half checks nothing)."""
    import logging

    from megatron_opcd.models import build_model

    name = "megatron.core.models.gpt.gpt_model"
    with caplog.at_level(logging.WARNING):
        build_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64), "student",
                    groups=groups)
        logging.getLogger(name).warning("another GPTModel warning")
    texts = [r.getMessage() for r in caplog.records if r.name == name]
    assert texts == ["another GPTModel warning"]
