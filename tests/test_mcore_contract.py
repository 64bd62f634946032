"""The megatron-core internals the project relies on (megatron_opcd/compat/mcore.py), one test each.

Every name of `mcore.ASSUMPTIONS` has a test here named after it (a test checks that none is
missing), run against the installed megatron-core on one process (TP=1, PP=1): after an upgrade a
moved internal fails here, by name, instead of deep in a run. What each test checks is what the
project's code does with the internal, compared with megatron's own stock path where one exists.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from megatron_opcd.compat import mcore
from megatron_opcd.config import ModelConfig

S, B, V = 6, 2, 256


@pytest.fixture(scope="module")
def groups():
    from megatron_opcd import parallel

    g = parallel.initialize()
    yield g
    parallel.destroy()


def _build(groups):
    from megatron_opcd.models import build_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=V,
                      tie_embeddings=False)
    return build_model(cfg, "student", groups=groups, seed=3)


@pytest.fixture(scope="module")
def model(groups):
    return _build(groups).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None].expand(B, 1, S, S)
    return ids, pos, mask


def test_every_assumption_has_a_test():
    tests = {name[len("test_"):] for name in dir(sys.modules[__name__]) if name.startswith("test_")}
    assert sorted(set(mcore.ASSUMPTIONS) - tests) == []


def test_gpt_stage_pieces(model):
    for attr in ("embedding", "decoder", "output_layer", "pre_process", "post_process",
                 "share_embeddings_and_output_weights", "shared_embedding_or_output_weight", "set_input_tensor"):
        assert hasattr(model, attr), f"GPTModel.{attr} is gone"
    assert mcore.output_layer(model) is model.output_layer
    model.post_process = False
    try:
        assert mcore.output_layer(model) is None
    finally:
        model.post_process = True


def test_embedding_call(model):
    ids, pos, _ = _inputs()
    with torch.no_grad():
        hidden = mcore.embed(model, ids, pos)
    assert hidden.shape == (S, B, model.config.hidden_size)


def test_decoder_call(model):
    """embed -> decoder -> output layer, with a per-row rotary table, gives GPTModel.forward's logits."""
    ids, pos, mask = _inputs()
    with torch.no_grad():
        stock = model(ids, pos, mask)  # [b, s, v]
        rotary = mcore.rotary_table(model, S)[pos.t()].unsqueeze(2)  # [s, b, 1, d]
        hidden = mcore.run_decoder(model, mcore.embed(model, ids, pos), mask, rotary)
        logits = mcore.output_logits(model, hidden, gather=True)  # [s, b, v]
    assert hidden.shape == (S, B, model.config.hidden_size)
    # Same modules, same order of operations: float32 rounding only (reductions may be ordered differently).
    torch.testing.assert_close(logits.transpose(0, 1), stock, rtol=1e-5, atol=1e-5 * stock.abs().max().item())


def test_output_layer_call(model):
    """GPTModel passes the hidden states positionally and gets (logits, bias) back: hooks through
    the adapter see [S, b, h] and can return fewer positions."""
    ids, pos, mask = _inputs()
    seen = {}

    def hidden(h):
        seen["hidden"] = tuple(h.shape)
        return h[-2:]  # the last two positions only

    def logits(x):
        seen["logits"] = tuple(x.shape)
        return x

    handles = mcore.hook_output_layer(model.output_layer, hidden=hidden, logits=logits)
    try:
        with torch.no_grad():
            out = model(ids, pos, mask)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        full = model(ids, pos, mask)
    assert seen == {"hidden": (S, B, model.config.hidden_size), "logits": (2, B, V)}
    torch.testing.assert_close(out, full[:, -2:], rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_rotary_table(model):
    rope = mcore.rotary_embedding(model)
    assert rope is not None and hasattr(rope, "inv_freq") and callable(getattr(rope, "_apply_scaling", None))
    table = mcore.rotary_table(model, S)
    d = rope.inv_freq.numel() * 2
    assert table.shape == (S, d)
    # Position p's angles are p * inv_freq (twice: megatron's non-interleaved layout).
    expect = torch.arange(S, dtype=torch.float64)[:, None] * rope.inv_freq.double()[None]
    torch.testing.assert_close(table.double(), torch.cat([expect, expect], dim=-1), rtol=1e-6, atol=1e-6 * S)
    # Llama 3 scaling with the defaults GPTModel fixes reproduces its own frequencies.
    saved = rope.inv_freq.clone()
    scaled = rope._apply_scaling(saved.clone(), factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)
    try:
        mcore.rescale_rotary(rope, base=model.config.rotary_base if hasattr(model.config, "rotary_base") else 10000.0,
                             factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)
        torch.testing.assert_close(rope.inv_freq, scaled, rtol=1e-6, atol=0)
    finally:
        rope.inv_freq = saved


def test_layer_anatomy(model):
    """The leaves the layer spec names and the model is built with (the generation kernels), and
    how SelfAttention calls its core attention: recorded on a stock forward, then checked against
    KVCacheAttention's signature."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opcd.models.kernels import KVCacheAttention

    column, row = mcore.local_linear_classes()
    spec, seen = get_gpt_layer_local_spec(), []
    new = mcore.replace_layer_leaves(spec, attention=lambda c: seen.append(c) or KVCacheAttention,
                                     linear=lambda c: seen.append(c) or c)
    assert seen == [DotProductAttention, column, row, column, row]
    assert new.submodules.self_attention.submodules.core_attention is KVCacheAttention
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention  # a copy was changed
    cores = list(mcore.attention_cores(model))
    assert [n for n, _ in cores] == [layer.self_attention.layer_number for layer in model.decoder.layers]
    assert len(cores) == model.config.num_layers and all(isinstance(c, KVCacheAttention) for _, c in cores)
    points = [(layer.self_attention, [(getattr(layer, block), leaf) for block, leaf in mcore.LINEAR_LEAVES])
              for layer in model.decoder.layers]
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append((tuple(a.shape if torch.is_tensor(a) else a for a in args), sorted(kwargs)))
            out = self.inner(*args, **kwargs)
            calls[-1] += (tuple(out.shape),)
            return out

    originals = []
    for attn, linears in points:
        for parent, name in linears:
            assert getattr(parent, name, None) is not None, f"{type(parent).__name__}.{name} is gone"
        if attn is not None:
            assert isinstance(attn.layer_number, int)
            originals.append((attn, attn.core_attention))
            attn.core_attention = Recorder(originals[-1][1])
    ids, pos, mask = _inputs()
    try:
        with torch.no_grad():
            model(ids, pos, mask)
    finally:
        for attn, original in originals:
            attn.core_attention = original
    cfg = model.config
    d = cfg.kv_channels
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {n for n, p in inspect.signature(KVCacheAttention.forward).parameters.items()
                if p.kind in named} - {"self"}
    assert len(calls) == cfg.num_layers
    for shapes, kwargs, out in calls:
        assert shapes[:3] == ((S, B, cfg.num_attention_heads, d), (S, B, cfg.num_query_groups, d),
                              (S, B, cfg.num_query_groups, d))
        assert set(kwargs) <= accepted, f"core_attention now also gets {sorted(set(kwargs) - accepted)}"
        assert out == (S, B, cfg.num_attention_heads * d)



def test_moe_anatomy(groups):
    """The local MoE spec's mlp holds MoESubmodules (replace_layer_leaves leaves it alone), and
    the built MoELayer has a router [experts, hidden] and SequentialMLP experts whose local
    indices map to global ones (models/sharding.py names experts by them)."""
    from megatron_opcd.models import build_model
    from megatron_opcd.models.spec import layer_spec

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64, num_experts=4,
                      moe_router_topk=2, moe_ffn_hidden_size=16)
    spec = layer_spec(cfg, sequence_parallel=False, num_layers_in_stage=1)
    assert mcore.is_moe_submodules(mcore._submodules_of(spec.submodules.mlp))
    model = build_model(cfg, groups=groups, seed=1).eval()
    mlp = model.decoder.layers[0].mlp
    assert tuple(mlp.router.weight.shape) == (4, 32)
    assert [n for n, _ in mcore.moe_routers(model)] == [1]
    hidden = torch.randn(3, 2, 32)
    with torch.no_grad():
        probs, routing_map = mlp.router(hidden)
        logits = mlp.router.gating(hidden)
    assert tuple(routing_map.shape) == (6, 4) and routing_map.dtype == torch.bool
    assert (routing_map.sum(-1) == 2).all() and tuple(logits.view(-1, 4).shape) == (6, 4)
    top = logits.view(-1, 4).topk(2, -1)  # moe_norm_topk_prob: softmax over the top-k logits
    torch.testing.assert_close(probs.gather(-1, top.indices), top.values.softmax(-1))
    assert list(mlp.local_expert_indices) == [groups.ep_rank * 4 + i for i in range(4)]
    for expert in mlp.experts.local_experts:
        assert tuple(expert.linear_fc1.weight.shape) == (32, 32)  # [gate; up] of 16 each
        assert tuple(expert.linear_fc2.weight.shape) == (32, 16)

def test_local_linears(model):
    from megatron_opcd.models.kernels import ForwardOnlyLinear

    column, row = mcore.local_linear_classes()
    attn = model.decoder.layers[0].self_attention
    # megatron's exact classes, under the forward-only mixin the model is built with
    assert type(attn.linear_qkv).__bases__ == (ForwardOnlyLinear, column)
    assert type(attn.linear_proj).__bases__ == (ForwardOnlyLinear, row)
    for lin in (attn.linear_qkv, attn.linear_proj):
        for attr in ("weight", "bias", "skip_bias_add", "tp_group", "sequence_parallel"):
            assert hasattr(lin, attr), f"{type(lin).__name__}.{attr} is gone"
        assert lin.tp_group.size() == 1
    assert hasattr(attn.linear_qkv, "gather_output")


def test_sequence_parallel_switch(model):
    mcore.set_sequence_parallel(model, True)
    try:
        assert model.config.sequence_parallel is True or all(
            getattr(m, "sequence_parallel", True) for m in model.modules() if hasattr(m, "sequence_parallel"))
        flags = [m.sequence_parallel for m in model.modules() if hasattr(m, "sequence_parallel")]
        assert flags and all(flags)
    finally:
        mcore.set_sequence_parallel(model, False)
    assert not any(m.sequence_parallel for m in model.modules() if hasattr(m, "sequence_parallel"))


def test_local_spec_norms():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_opcd.models.spec import SequenceParallelTorchNorm

    spec = get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
    for attr in ("input_layernorm", "pre_mlp_layernorm"):
        assert hasattr(spec.submodules, attr), f"the local layer spec has no {attr}"
    block = mcore.local_spec_with_norm(spec, SequenceParallelTorchNorm, 3)
    assert block.layer_norm is SequenceParallelTorchNorm and len(block.layer_specs) == 3
    assert block.layer_specs[0].submodules.input_layernorm is SequenceParallelTorchNorm
    assert block.layer_specs[0].submodules.pre_mlp_layernorm is SequenceParallelTorchNorm


def test_ddp_grad_buffers(groups):
    """Megatron DDP accumulates into main_grad (equal to autograd's gradient of a bare model with the
    same weights) and zero_grad_buffer clears it."""
    from megatron_opcd.training.engine import wrap_ddp

    bare, wrapped = _build(groups), _build(groups)  # same seed: same weights
    ddp = wrap_ddp(wrapped, groups)
    ids, pos, mask = _inputs()
    bare(ids, pos, mask).float().square().mean().backward()
    ddp(ids, pos, mask).float().square().mean().backward()
    ddp.finish_grad_sync()
    pairs = list(zip(bare.named_parameters(), wrapped.named_parameters()))
    for (name, p), (_, q) in pairs:
        got = mcore.main_grad(q)
        assert getattr(q, "main_grad", None) is not None, f"{name}: DDP left no main_grad"
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6 * (p.grad.abs().max().item() + 1e-30))
    mcore.zero_grad_buffer(ddp)
    assert all(float(mcore.main_grad(q).abs().max()) == 0.0 for _, q in wrapped.named_parameters())
    # A bare module: main_grad falls back to .grad; zero_grad_buffer does nothing.
    mcore.zero_grad_buffer(bare)
    assert mcore.main_grad(pairs[0][0][1]) is pairs[0][0][1].grad


def test_checkpoint_writer_queue():
    """The global exists and megatron's writer reads a queue installed there."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert hasattr(filesystem_async, "_results_queue"), "filesystem_async._results_queue is gone"
    getter = mcore.writer_queue_getter()
    saved = filesystem_async._results_queue
    sentinel = object()
    try:
        filesystem_async._results_queue = None
        assert mcore.writer_queue_unset()
        mcore.set_writer_queue(sentinel)
        assert not mcore.writer_queue_unset()
        assert getter() is sentinel
    finally:
        filesystem_async._results_queue = saved


def test_viewless_tensor():
    """make_viewless_tensor reaches the module-level kernel the compiled decode step wraps, and the
    wrapped kernel still makes an eager view viewless (training's path is megatron's)."""
    from megatron.core import utils

    mcore.make_viewless_traceable()
    assert getattr(utils._kernel_make_viewless_tensor, "opcd_traceable", False)
    base = torch.arange(6.0)
    out = utils.make_viewless_tensor(base[1:4], requires_grad=False, keep_graph=False)
    assert out._base is None and out.tolist() == [1.0, 2.0, 3.0]


def test_mcore_selection_names_existing_modules():
    """`make test-312` runs the modules of conftest.MCORE_MODULES: each must exist (a renamed module
    would silently drop out of the Python 3.12 / megatron-core 0.19 pass)."""
    from pathlib import Path

    from conftest import MCORE_INDEPENDENT, MCORE_MODULES

    here = Path(__file__).parent
    assert Path(__file__).name in MCORE_MODULES
    assert [m for m in MCORE_MODULES if not (here / m).is_file()] == []
    for entry in MCORE_INDEPENDENT:  # each names a test that exists in a listed module
        module, name = entry.split("::")
        assert module in MCORE_MODULES and f"def {name}(" in (here / module).read_text(), entry
