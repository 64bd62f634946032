"""The KV-cache generation loop and scoring (issue 4).

Three launches: one process (TP=1/PP=1, compared with plain full-sequence forwards of one unpadded
sequence at a time: no cache, no padding, no generation code), and two ranks running TP=2,
TP=2 with sequence parallelism and PP=2, each compared with the single-process run.
Plus pure-function tests of the sampling filters.
"""

from __future__ import annotations

import re

import pytest
import torch

from _numerics import assert_f32_close
from _generation_ranks import N, PROMPTS, RESPONSES, single_process_with_cli, suites_then_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("generation"))


@pytest.fixture(scope="module")
def single(run_ranks, workdir):
    # 600 s: the compiled step's checks compile (30-100 s on a loaded 2-core box, docs/generation.md).
    return run_ranks(single_process_with_cli, 1, workdir, timeout=600)[0]


@pytest.fixture(scope="module")
def two_ranks(run_ranks, workdir, single):  # `single` wrote the checkpoint the CLI run loads
    runs = [dict(tp=2, pp=1), dict(tp=2, pp=1, sp=True), dict(tp=1, pp=2)]
    per_rank = run_ranks(suites_then_cli, 2, runs, workdir, 2, 1, timeout=600)
    out = {name: [r["suites"][i] for r in per_rank] for i, name in enumerate(["tp2", "tp2_sp", "pp2"])}
    out["cli"] = per_rank[0]["cli"]
    return out


# ----------------------------------------------------------------------------------------------
# One process against independent recomputation


def test_greedy_cache_equals_full_recomputation(single):
    expect = [toks for toks, _ in single["naive"]]
    assert single["suite"]["greedy"]["responses"] == expect
    # The same loop without the cache, too.
    assert single["nocache"] == expect
    # Greedy log-probs are at temperature 1.
    for got, (_, lps) in zip(single["suite"]["greedy"]["logprobs"], single["naive"]):
        assert_f32_close(torch.tensor(got), torch.tensor(lps))


def test_batched_equals_one_by_one(single):
    assert single["one_by_one"] == single["suite"]["greedy"]["responses"]
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS), "prompts of different lengths"


def test_prefix_generation_equals_recomputation(single):
    assert single["suite"]["greedy_prefix"]["responses"] == [toks for toks, _ in single["naive_prefix"]]
    assert single["empty_prompt"] == single["naive_empty_prompt"]
    assert single["short_prefix"] == single["naive_short_prefix"]


def test_prefix_score_equals_recomputation(single):
    """Prefix prefilled once, cache copied to every row: the logits of full recomputation (1e-5)."""
    for key, naive in (("score_prefix", "naive_score_prefix"), ("score", "naive_score")):
        out = single["suite"][key]
        for i, (ref, r) in enumerate(zip(single[naive], RESPONSES)):
            assert out["mask"][:, i].sum() == len(r)
            if not r:
                continue
            assert_f32_close(out["logits"][: len(r), i], ref)
            ref_lp = torch.log_softmax(ref[:, :250].float(), -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert_f32_close(out["logprobs"][: len(r), i], ref_lp)
        assert (out["logprobs"] * (1 - out["mask"])).abs().max() == 0
    for i, ref in enumerate(single["naive_score_empty_prompt"]):
        assert_f32_close(single["score_empty_prompt"][: len(ref), i], ref)


def test_learned_absolute_positions(single):
    """Left padding and a cached prefix do not shift learned position embeddings."""
    assert single["learned"] == single["learned_naive"]
    assert single["learned_score_err"] < 1e-5


@pytest.mark.parametrize("variant", ["qwen_bias", "partial_rope"])
def test_architecture_options_through_the_kernels(single, variant):
    v = single["variants"][variant]
    assert v["greedy"] == v["naive"]
    assert v["score_err"] < 1e-5


def test_megatron_modules_restored_after_generation(single):
    assert single["modules_after"] == ["DotProductAttention", "ColumnParallelLinear", "RowParallelLinear",
                                       "ColumnParallelLinear"]
    assert single["same_modules"]  # no module swapped: the model was built with its kernels
    assert single["stock_forward"] == [True] * 4  # detached: megatron's forward, no weight copies kept


def test_cpu_decode_kernel_used_and_equal_to_torch_matmuls(single):
    info = single["native"]
    ok, why = info["status"]
    if not ok:
        pytest.skip(f"CPU decode kernel unavailable here: {why}")
    # Decode steps of 8 and 4 rows went through the kernel (prefill's many rows did not) ...
    assert info["rows_per_call"] == [4, 8], info["rows_per_call"]
    # ... and gave the tokens and log-probs of torch's matmuls.
    assert info["same_tokens"] == [True, True]
    assert info["logprob_err"] < 1e-5, info["logprob_err"]


@pytest.mark.parametrize("rows,k,n", [(8, 64, 96), (8, 13, 5), (5, 1408, 40), (2, 7, 3), (3, 256, 1), (8, 1, 8)])
def test_cpu_decode_kernel_matches_float64(rows, k, n):
    from megatron_opcd import native

    ok, why = native.native_status()
    if not ok:
        pytest.skip(f"CPU decode kernel unavailable here: {why}")
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k + 5, generator=gen)[:, 2 : 2 + k]  # rows k + 5 apart: a strided view
    w = torch.randn(n, k, generator=gen)
    with torch.no_grad():
        assert native.supports(x, w)
        y = native.linear_rows(x, w)
    ref = x.double() @ w.double().T
    # fp32 summation of k products: error <= k * 2^-24 * sum |x||w| (a dropped or doubled term is
    # about |x_k w_k|, far above it).
    bound = k * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() / bound).max())


def test_cpu_decode_kernel_applies_only_where_it_is_right():
    from megatron_opcd import native

    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with torch.no_grad():
        assert native.supports(x, w)
        assert not native.supports(torch.randn(9, 16), w)  # more rows than accumulators
        assert not native.supports(torch.randn(1, 16), w)  # one row: MKL's matrix-vector product
        assert not native.supports(x.double(), w.double())  # fp32 only
        assert not native.supports(x, torch.randn(16, 4).T)  # the weight must be a contiguous [N, K]
        assert not native.supports(torch.randn(16, 8).T, w)  # rows need unit stride
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert not native.supports(x, w)  # more threads: MKL's parallel sgemm
        finally:
            torch.set_num_threads(threads)
    assert not native.supports(x, w)  # autograd on: never (the kernel has no backward)


def test_cpu_decode_kernel_off_says_why(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import torch; from megatron_opcd import native; "
            "print(native.native_status()); native.announce_fallback()")
    env = {**os.environ, "OPCD_CPU_KERNEL": "0", "OPCD_QUIET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(False, 'disabled by OPCD_CPU_KERNEL=0')" in out.stdout
    assert ("CPU kernels not used (disabled by OPCD_CPU_KERNEL=0); decoding uses torch matmuls and the loss "
            "torch.topk") in out.stderr
    env = {**os.environ, "OPCD_CPU_KERNEL": "1", "CXX": str(tmp_path / "no-such-compiler"),
           "OPCD_CACHE_DIR": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    if "no AVX2" not in out.stdout:  # on an AVX2 machine the build itself fails, with the reason
        assert "did not build or load" in out.stdout and "no-such-compiler" in out.stdout


def test_cpu_decode_kernel_ops_check_their_arguments():
    """The custom ops refuse, with a message naming the argument, every input their loops would
    read wrongly: another dtype, a 1-D or 3-D tensor, rows with a stride, a strided weight,
    mismatched K, too many rows, k out of range, a tensor that requires grad."""
    from megatron_opcd import native

    ok, why = native.native_status()
    if not ok:
        pytest.skip(f"CPU kernels unavailable here: {why}")
    op_lin, op_topk = torch.ops.opcd.linear_rows, torch.ops.opcd.topk_rows
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    bad_linear = [
        ((x.double(), w), "x must be float32"),
        ((x, w.half()), "weight must be float32"),
        ((x[0], w), "x must be 2-D"),
        ((x[None], w), "x must be 2-D"),
        ((torch.randn(16, 4).T, w), "x's rows must be contiguous"),
        ((x, torch.randn(32, 16)[::2]), "weight must be a contiguous [N, K]"),
        ((x, torch.randn(8, 15)), "the same K"),
        ((torch.randn(9, 16), w), "1 to 8 rows"),
        ((torch.randn(0, 16), w), "1 to 8 rows"),
        ((x.clone().requires_grad_(), w), "forward-only"),
    ]
    for args, message in bad_linear:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op_lin(*args)
    with torch.no_grad():  # grad mode off: an input that requires grad is fine
        assert torch.allclose(op_lin(x.clone().requires_grad_(), w), x @ w.T, atol=1e-5)
    for args, message in [((torch.randn(3, 10), 0), "k must be in [1, 10]"), ((torch.randn(3, 10), 11), "k must be"),
                          ((torch.randn(3, 10).long(), 2), "x must be float32"), ((torch.randn(10), 2), "2-D")]:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op_topk(*args)


def test_cpu_decode_kernel_is_never_loaded_from_a_folder_others_can_write(tmp_path):
    import os
    import subprocess
    import sys

    shared, own = tmp_path / "shared", tmp_path / "xdg"
    shared.mkdir()
    shared.chmod(0o777)
    # The folder the build goes to and the library is loaded from (native._library builds and loads
    # in _build_folder()); asked without building, which takes tens of seconds on a fresh folder.
    code = "from megatron_opcd import native; print(native._build_folder())"
    env = {**os.environ, "OPCD_CPU_KERNEL": "1", "OPCD_CACHE_DIR": str(shared), "XDG_CACHE_HOME": str(own)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    chosen = out.stdout.strip().splitlines()[-1]
    assert list(shared.iterdir()) == []  # passed over: anyone could have put a library there
    assert [p.name.startswith("opcd_kernels-") for p in (own / "megatron_opcd").iterdir()] == [True]
    assert chosen == str(next((own / "megatron_opcd").iterdir())), chosen


def test_rotation_matches_megatron():
    """kernels._rotate (applied once, when a key enters the cache) = megatron's apply_rotary_pos_emb,
    for half-split and interleaved channel pairs and for partial rotary dims, per-row angles."""
    from megatron_opcd.models.kernels import _rotate  # first: megatron_opcd quiets megatron's import warnings
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd  # noqa: I001

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 16, generator=gen, dtype=torch.float64)  # [s, b, h, d]
    for rot in (16, 8):
        freqs = torch.rand(5, 3, 1, rot, generator=gen, dtype=torch.float64) * 10  # per-row angles
        for interleaved in (False, True):
            ref = _apply_rotary_pos_emb_bshd(x, freqs, rotary_interleaved=interleaved)
            ours = _rotate(x, torch.cos(freqs), torch.sin(freqs), interleaved)
            assert torch.allclose(ours, ref, atol=1e-12), (rot, interleaved)


def test_cascade_attention_equals_one_softmax_over_all_keys():
    """A shared prefix read once for all rows, merged with each row's own keys by log-sum-exp, is
    the attention over [prefix; own keys] (float64 reference, prefix copied into every row); the
    log-sum-exp helpers (the CPU's flash kernel and the plain-matmul path other devices take)
    against logsumexp of the scores."""
    from functools import partial

    import torch.nn.functional as F

    from megatron_opcd.models.kernels import _attention_with_lse_matmul, attention_with_lse, cascade_attention

    gen = torch.Generator().manual_seed(0)
    b, g, L, d, P, S = 3, 2, 5, 8, 11, 7
    q = torch.randn(b, g, L, d, generator=gen, dtype=torch.float64)
    pk, pv = (torch.randn(1, g, P, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, g, S, d, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.zeros(b, 1, L, S, dtype=torch.float64)
    bias[0, :, :, 4:] = torch.finfo(torch.float64).min  # row 0 sees 4 own keys, row 1 all but one
    bias[1, :, :, 2] = torch.finfo(torch.float64).min
    scale = 0.37
    full_k, full_v = torch.cat([pk.expand(b, -1, -1, -1), k], 2), torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    full_bias = torch.cat([torch.zeros(b, 1, L, P, dtype=torch.float64), bias], -1)
    ref = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_bias, scale=scale)
    got = cascade_attention(q, pk, pv, k, v, bias, scale)
    assert got.shape == ref.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    ref_lse = torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * scale + bias, -1)
    chunked = partial(_attention_with_lse_matmul, max_scores=2 * b * g * S)  # two queries per chunk
    for fn in (attention_with_lse, _attention_with_lse_matmul, chunked):
        out, lse = fn(q.float(), k.float(), v.float(), bias.float(), scale)
        assert_f32_close(lse, ref_lse)
        assert_f32_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))


def test_shared_prefix_cache_keeps_one_copy_and_refuses_a_masked_prefix():
    from megatron_opcd.generation.cache import KVCache

    pk = torch.randn(1, 2, 4, 8)
    cache = KVCache(3, 10)
    cache.load_prefix({1: (pk, pk.clone())}, 4, shared=True)
    k, _ = cache.write(1, torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))  # slots 4, 5 of 3 rows
    assert cache.shared[1][0] is pk and k.shape == (3, 2, 2, 8)  # the rows hold their own slots only
    cache.end_forward(2)
    visible = torch.zeros(3, 1, 1, 7, dtype=torch.bool)
    cache.set_inputs(visible, None, 1, torch.float32)
    assert cache.bias.shape == (3, 1, 1, 3)  # own slots 4..6
    visible[1, ..., 2] = True
    with pytest.raises(RuntimeError, match="shared prefix"):
        cache.set_inputs(visible, None, 1, torch.float32)


def test_unsupported_attention_is_refused_in_one_line():
    from types import SimpleNamespace

    from megatron_opcd.models.kernels import check_supported

    with pytest.raises(NotImplementedError, match="sliding-window"):
        check_supported(SimpleNamespace(window_size=(128, 0), softmax_type="vanilla"))
    with pytest.raises(NotImplementedError, match="softmax_type"):
        check_supported(SimpleNamespace(window_size=None, softmax_type="learnable"))


def test_ddp_wrapped_model(single):
    assert single["ddp"] == single["suite"]["greedy"]["responses"]


def test_model_mode_restored(single):
    assert single["suite"]["training_after"] is True


def test_sampling_reproducible_and_seeded(single):
    a, b, c = single["seed_runs"]
    assert a == b
    assert a != c
    # A near-uniform distribution (temperature 50) over 250 tokens padded to 256: the 6 padded ids
    # would turn up ~5 times in these 192 draws if they were not masked.
    drawn = [t for run in single["seed_runs"] for row in run for t in row]
    assert max(drawn) < 250 and len(set(drawn)) > 100
    # top_k=1 is greedy whatever the temperature.
    assert single["top_k1"] == single["suite"]["greedy"]["responses"]


def test_sampled_logprobs_at_temperature(single):
    got = single["sampled_t07"]
    assert got["responses"] != single["suite"]["greedy"]["responses"]
    for lp, ref in zip(got["logprobs"], single["naive_lp_t07"]):
        assert_f32_close(torch.tensor(lp), torch.tensor(ref))


def test_eos_stop_string_and_length(single):
    eos = single["eos"]
    assert eos["responses"][0] == single["eos_expect"]
    assert eos["reasons"][0] == "eos"
    assert eos["responses"] == single["eos_naive"]
    eos_tok = single["eos_expect"][-1]
    for resp, reason, lps in zip(eos["responses"], eos["reasons"], eos["logprobs"]):
        assert len(lps) == len(resp)
        if eos_tok in resp:  # nothing after the EOS token
            assert resp.index(eos_tok) == len(resp) - 1 and reason == "eos"
        else:
            assert reason == "length" and len(resp) == N
    stop = single["stop"]
    assert stop["reasons"][0] == "stop"
    assert stop["responses"][0] == single["naive"][0][0][:4]  # ends with the token that completed it
    assert single["length3"]["reasons"] == ["length"] * len(PROMPTS)
    assert [len(r) for r in single["length3"]["responses"]] == [3] * len(PROMPTS)


# ----------------------------------------------------------------------------------------------
# The compiled decode step, finished rows leaving the batch, incremental stop strings


def test_compiled_step_decodes_like_the_eager_one(single):
    """Greedy tokens equal, sampled (prefix, rows ending on EOS at different steps: the batch
    compacts) tokens equal and log-probs within float32 tolerance; a second call compiles nothing."""
    _compiled_like_eager([single["suite"]], "one process")


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_layouts_compiled_step_decodes_like_the_eager_one(two_ranks, layout):
    _compiled_like_eager(two_ranks[layout], layout)


def _compiled_like_eager(ranks: list, layout: str) -> None:
    for r in ranks:
        c = r["compiled"]
        assert c["greedy"]["responses"] == c["eager_greedy"]["responses"] == r["greedy"]["responses"]
        assert c["sampled_eos"]["responses"] == c["eager_sampled_eos"]["responses"]
        assert c["sampled_eos"]["reasons"] == c["eager_sampled_eos"]["reasons"]
        assert c["sampled_eos"]["reasons"].count("eos") >= 2, c["sampled_eos"]["reasons"]
        for key in ("greedy", "sampled_eos"):
            # The compiled layers fuse and reorder float32 sums: ~1e-6 relative, as any reordering.
            assert_f32_close(torch.tensor(sum(c[key]["logprobs"], [])),
                             torch.tensor(sum(c["eager_" + key]["logprobs"], [])))
        assert c["again"]["responses"] == c["sampled_eos"]["responses"]
        assert c["again"]["compile_seconds"] == 0.0
    first = ranks[0]["compiled"]
    print(f"\n{layout}: compile {first['greedy']['compile_seconds'] + first['sampled_eos']['compile_seconds']:.1f} s "
          f"of {first['seconds']:.1f} s for 4 compiled + eager calls")


@pytest.mark.gpu
def test_compiled_step_with_cuda_graphs_decodes_like_the_eager_one(run_ranks):
    """On a GPU the compiled step runs with mode="reduce-overhead" (CUDA graphs): greedy tokens of
    the eager step, log-probs within float32 tolerance, and a second call compiles nothing."""
    from _generation_ranks import cuda_graph_check

    r = run_ranks(cuda_graph_check, 1, timeout=600)[0]
    eager, (first, again) = r["never"][0], r["always"]
    assert first["responses"] == again["responses"] == eager["responses"]
    assert_f32_close(torch.tensor(sum(first["logprobs"], [])), torch.tensor(sum(eager["logprobs"], [])))
    assert again["compile_seconds"] == 0.0
    print(f"\neager {eager['seconds']:.3f} s, compiled {again['seconds']:.3f} s (compile {first['compile_seconds']:.1f} s)")


def test_finished_rows_leave_the_batch_with_the_same_tokens(single):
    """Compaction (rows ending on EOS leave the batch) against the loop that decodes every row to
    the end: the same tokens, reasons and (within float32 tolerance) log-probs."""
    c = single["suite"]["compiled"]
    full, compact = c["uncompacted_sampled_eos"], c["eager_sampled_eos"]
    assert compact["responses"] == full["responses"]
    assert compact["reasons"] == full["reasons"]
    assert_f32_close(torch.tensor(sum(compact["logprobs"], [])), torch.tensor(sum(full["logprobs"], [])))
    assert len({len(r) for r in full["responses"]}) >= 2, "rows end at different steps"


def test_stop_strings_are_checked_on_the_tail_only():
    """`stop_in_tail` after every token stops where decoding the whole response does, with a
    decoder whose tokens have empty, one-character and long texts and drop the first token's
    leading space (as sentencepiece does), and reads a bounded tail."""
    import random

    from megatron_opcd.generation.loop import stop_in_tail

    # Many empty texts (special tokens, parts of a multi-byte character): a stop string can span
    # more tokens than it has characters.
    pieces = ["", "", "", "", "", "a", "b", " a", " ab", "ba", "\n", "xyzxyz", "<", "/", ">", " </", "b>"]
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return "".join(pieces[i] for i in ids).removeprefix(" ")

    rng = random.Random(0)
    stops_sets = [("ab",), (" a",), ("</b>", "\n\n"), ("bab",), ("zx",)]
    tails = []
    for trial in range(400):
        stops = stops_sets[trial % len(stops_sets)]
        resp = [rng.randrange(len(pieces)) for _ in range(40)]
        full = next((n for n in range(1, 41) if any(s in decode(resp[:n]) for s in stops)), None)
        decoded.clear()
        tail = next((n for n in range(1, 41) if stop_in_tail(resp[:n], stops, decode, max(map(len, stops)))), None)
        assert tail == full, (stops, resp, tail, full)
        tails += decoded[20:]  # the calls at responses of more than ~15 tokens
    assert sum(tails) / len(tails) < 10  # a tail of a few tokens, not the response


# ----------------------------------------------------------------------------------------------
# TP=2, TP=2 + SP, PP=2 equal TP=1/PP=1


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2"])
def test_layouts_generate_like_one_process(single, two_ranks, layout):
    ref = single["suite"]
    ranks = two_ranks[layout]
    for key in ("greedy", "greedy_prefix", "sampled", "sampled_prefix"):
        for r in ranks:  # every rank returns the same result
            assert r[key]["responses"] == ref[key]["responses"], f"{layout} {key} rank {r['tp_rank']},{r['pp_rank']}"
            assert r[key]["logprobs"] == ranks[0][key]["logprobs"]
            torch.testing.assert_close(torch.tensor(sum(r[key]["logprobs"], [])),
                                       torch.tensor(sum(ref[key]["logprobs"], [])), atol=1e-5, rtol=1e-5)
        assert r["training_after"] is True
    assert all(r["sp_after"] == (layout == "tp2_sp") for r in ranks)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_layouts_score_like_one_process(single, two_ranks, layout):
    ref = single["suite"]
    last = [r for r in two_ranks[layout] if r["last"]]
    assert len(last) == (2 if layout == "tp2" else 1)
    for r in last:
        for key in ("score", "score_prefix"):
            assert r[key]["shard"] == 256 // (2 if layout == "tp2" else 1)
            m = ref[key]["mask"].bool()
            torch.testing.assert_close(r[key]["logits"][m], ref[key]["logits"][m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r[key]["logprobs"], ref[key]["logprobs"], atol=1e-5, rtol=1e-5)
    assert all("logits" not in r["score"] for r in two_ranks[layout] if not r["last"])


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_writes_one_line_per_prompt(single, two_ranks):
    lines = single["cli"]
    assert [r["index"] for r in lines] == list(range(len(PROMPTS)))
    assert [r["prompt_ids"] for r in lines] == PROMPTS
    assert [r["response_ids"] for r in lines] == single["suite"]["greedy"]["responses"]
    assert all(r["finish_reason"] == "length" and len(r["logprobs"]) == N for r in lines)
    assert "response" not in lines[0]  # no tokenizer in this checkpoint: ids only
    # Under TP=2 (two ranks, rank 0 writes): the same tokens, log-probs to fp32 noise.
    tp2 = two_ranks["cli"]
    assert [{k: v for k, v in r.items() if k != "logprobs"} for r in tp2] == \
        [{k: v for k, v in r.items() if k != "logprobs"} for r in lines]
    torch.testing.assert_close(torch.tensor([r["logprobs"] for r in tp2]),
                               torch.tensor([r["logprobs"] for r in lines]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("malformed", "bad.jsonl:2: malformed JSON"),
    ("text_without_tokenizer", "text.jsonl:1: text prompts need a tokenizer"),
    ("out_of_vocab", "oov.jsonl:1: token id 999 is outside"),
    ("not_a_checkpoint", "not a complete megatron-opcd checkpoint"),
])
def test_cli_bad_input_is_one_line(single, case, needle):
    rc, err = single["cli_errors"][case]
    assert rc == 1
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# Sampling math (pure functions)


def test_top_k_and_top_p_filters():
    from megatron_opcd.generation import filter_top_k, filter_top_p

    z = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_top_k(z, 2)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_top_p(z, 0.65)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_top_p(z, 0.75)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_top_p(z, 0.01)).sum() == 1  # always at least one
    shuffled = z[:, [3, 0, 4, 2, 1]]
    assert torch.isfinite(filter_top_p(shuffled, 0.65)).tolist() == [[False, True, False, False, True]]


def test_draw_categorical_matches_the_distribution():
    """200,000 draws (one call, a row each) against the probabilities: every frequency within 5
    standard errors, zero-probability ids (first, middle, last) never drawn, and a seed repeats."""
    from megatron_opcd.generation.sampling import draw_categorical

    p = torch.tensor([0.0, 0.4, 0.25, 0.0, 0.2, 0.1, 0.05, 0.0], dtype=torch.float64)
    n = 200_000
    probs = (p * 3.0).float().expand(n, -1)  # unnormalised rows are fine
    draws = draw_categorical(probs, torch.Generator().manual_seed(1))
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=len(p)).double() / n
    stderr = (p * (1 - p) / n).sqrt()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * stderr + 1e-12).all(), (freq, p)
    assert ((freq - p).abs()[p > 0] > 0).any()  # a real draw, not the expected counts
    again = draw_categorical(probs[:1000], torch.Generator().manual_seed(1))
    assert torch.equal(again, draw_categorical(probs[:1000], torch.Generator().manual_seed(1)))
    assert not torch.equal(again, draw_categorical(probs[:1000], torch.Generator().manual_seed(2)))
    # One-hot rows, including the last id: exactly that id (the rounding guard keeps it in range).
    onehot = torch.zeros(3, 5)
    onehot[0, 0] = onehot[1, 4] = 1.0
    onehot[2, 2] = 1e-30
    assert draw_categorical(onehot, None).tolist() == [0, 4, 2]


def test_sampling_params_validation():
    from megatron_opcd.generation import SamplingParams

    with pytest.raises(ValueError, match="greedy=True"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    assert SamplingParams(temperature=0.0, greedy=True).greedy
