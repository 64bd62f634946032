"""Tests of megatron_opcd.losses against an independent float64, single-process, full-vocabulary
reference (written here with log_softmax / sort / where, sharing no code with the package).

Tolerances. fp32 inputs: the norm-wise relative error of the per-token values (over all tokens of a
case) and of the student gradient (the whole tensor) is <= 1e-6; elementwise, every entry is within
1e-5 of the largest reference entry. bf16 inputs (the reference sees the same bf16 values in
float64): values within 1e-6 norm-wise (the math is fp32, only the gradient is returned in bf16),
gradients within 1e-2 norm-wise (bf16 rounding of the returned gradient, 2**-8 relative).

Every multi-rank check of one world size runs inside a single launch (`_rank_cases`), which
returns the per-rank values and gradient shards to this process for the assertions.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from megatron_opcd.losses import DivergenceLoss, DivergenceSpec, bind_loss_func, masked_sums, vocab_parallel_divergence

S, B, V = 3, 4, 96  # 12 tokens, vocabulary 96 (divisible by TP = 1, 2, 4)
K = 8

# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


def _top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries per row; ties go to the lower index (stable sort)."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, True)


def reference(zs, zt, *, kind="reverse_kl", topk=K, topk_from="student", renormalize=False,
              temperature=1.0, beta=0.5, vocab_size=None, **_):  # fmt: skip
    """Per-token divergence `[s, b]` in float64 over the full (unsharded) vocabulary."""
    zs, zt = zs.double(), zt.double()
    if vocab_size is not None:  # padding columns are not tokens
        zs, zt = zs[..., :vocab_size], zt[..., :vocab_size]
    a, b = zs / temperature, zt / temperature
    ls, lt = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
    if topk is None:
        sel = torch.ones_like(a, dtype=torch.bool)
    else:
        k = min(topk, a.shape[-1])
        sel = torch.zeros_like(a, dtype=torch.bool)
        if topk_from in ("student", "union"):
            sel |= _top_mask(a, k)
        if topk_from in ("teacher", "union"):
            sel |= _top_mask(b, k)
    if renormalize:
        ls = ls - torch.logsumexp(torch.where(sel, ls, -math.inf), dim=-1, keepdim=True)
        lt = lt - torch.logsumexp(torch.where(sel, lt, -math.inf), dim=-1, keepdim=True)
    ls, lt = torch.where(sel, ls, 0.0), torch.where(sel, lt, 0.0)  # finite outside I
    ps, pt = ls.exp(), lt.exp()
    if kind == "jsd" and beta in (0.0, 1.0):  # TRL's convention
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "reverse_kl":
        f = ps * (ls - lt)
    elif kind == "forward_kl":
        f = pt * (lt - ls)
    else:
        m = beta * pt + (1 - beta) * ps
        f = beta * pt * (lt - m.log()) + (1 - beta) * ps * (ls - m.log())
    return torch.where(sel, f, 0.0).sum(dim=-1)


def reference_with_grad(zs, zt, weights, **case):
    """(values [s, b], d(sum weights * values)/d zs [s, b, V]) in float64."""
    x = zs.detach().double().requires_grad_()
    out = reference(x, zt, **case)
    (out * weights.double()).sum().backward()
    return out.detach(), x.grad


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------


def _cases() -> list[dict]:
    cases = []
    for kind, temperature in itertools.product(("reverse_kl", "forward_kl", "jsd"), (1.0, 0.7)):
        cases.append(dict(kind=kind, topk=None, temperature=temperature))
        for topk_from, renorm in itertools.product(("student", "teacher", "union"), (False, True)):
            cases.append(dict(kind=kind, topk=K, topk_from=topk_from, renormalize=renorm, temperature=temperature))
    cases += [
        dict(kind="jsd", topk=None, beta=0.2),
        dict(kind="jsd", topk=K, topk_from="union", beta=0.9),
        dict(kind="jsd", topk=K, beta=0.0),  # = forward KL (TRL)
        dict(kind="jsd", topk=None, beta=1.0),  # = reverse KL (TRL)
        # k larger than a TP=4 shard (24 columns): every rank sends all of its columns.
        dict(kind="reverse_kl", topk=40, topk_from="union", temperature=0.7),
        dict(kind="forward_kl", topk=40, renormalize=True),
        # Padded vocabulary: 90 and 70 real tokens of 96 (at TP=4 the last rank holds no real one).
        dict(kind="reverse_kl", topk=K, vocab_size=90),
        dict(kind="jsd", topk=None, vocab_size=70, temperature=0.7),
        dict(kind="forward_kl", topk=K, topk_from="union", renormalize=True, vocab_size=70),
        dict(kind="reverse_kl", topk=None, vocab_size=90),
        # One chunk holding every token (the default tests use 5-token chunks: 3 chunks).
        dict(kind="reverse_kl", topk=K, chunk_tokens=1024),
        dict(kind="jsd", topk=None, chunk_tokens=1024),
    ]
    for case in cases:
        case.setdefault("chunk_tokens", 5)
    return cases


CASES = _cases()
BF16_CASES = [
    dict(kind="reverse_kl", topk=K, chunk_tokens=5),
    dict(kind="forward_kl", topk=None, temperature=0.7, chunk_tokens=5),
    dict(kind="jsd", topk=K, topk_from="union", renormalize=True, chunk_tokens=5),
]


def _inputs(seed: int, dtype=torch.float32):
    """Full-vocabulary student and teacher logits and output weights, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    zs = (2.0 * torch.randn(S, B, V, generator=g, dtype=torch.float64)).to(dtype)
    zt = (2.0 * torch.randn(S, B, V, generator=g, dtype=torch.float64)).to(dtype)
    w = torch.randn(S, B, generator=g)
    return zs, zt, w


def _run_case(case: dict, seed: int, dtype, rank: int, tp: int, group):
    """This rank's (values, gradient shard) for one case."""
    zs, zt, w = _inputs(seed, dtype)
    vl = V // tp
    shard_s = zs[..., rank * vl : (rank + 1) * vl].clone().requires_grad_()
    shard_t = zt[..., rank * vl : (rank + 1) * vl].clone()
    out = vocab_parallel_divergence(shard_s, shard_t, DivergenceSpec(**case), tp_group=group)
    (out * w).sum().backward()
    return out.detach(), shard_s.grad


def _rank_cases(cases, bf16_cases):
    """Run every case on this rank (one launch per world size); also on a size-1 group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    fp32 = [_run_case(c, 100 + i, torch.float32, rank, tp, dist.group.WORLD) for i, c in enumerate(cases)]
    bf16 = [_run_case(c, 200 + i, torch.bfloat16, rank, tp, dist.group.WORLD) for i, c in enumerate(bf16_cases)]
    return fp32, bf16, _size_one_group_cases(cases[:4])


def _size_one_group_cases(cases):
    """The cases on a size-1 process group of this rank (every rank builds every group)."""
    import torch.distributed as dist

    if not dist.is_initialized():  # TP = 1: a one-rank gloo world of its own
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    return [_run_case(c, 100 + i, torch.float32, 0, 1, singles[rank]) for i, c in enumerate(cases)]


_RESULTS: dict[int, tuple] = {}


@pytest.fixture(params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def results(request, run_ranks):
    """Per world size: a list over ranks of (fp32 results, bf16 results, size-1-group results)."""
    tp = request.param
    if tp not in _RESULTS:
        if tp == 1:
            fp32 = [_run_case(c, 100 + i, torch.float32, 0, 1, None) for i, c in enumerate(CASES)]
            bf16 = [_run_case(c, 200 + i, torch.bfloat16, 0, 1, None) for i, c in enumerate(BF16_CASES)]
            # The size-1 group needs torch.distributed: one spawned rank, not this process.
            (single,) = run_ranks(_size_one_group_cases, 1, CASES[:4], timeout=240)
            _RESULTS[tp] = [(fp32, bf16, single)]
        else:
            _RESULTS[tp] = run_ranks(_rank_cases, tp, CASES, BF16_CASES, timeout=240)
    return _RESULTS[tp]


def _norm_rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def _check(values, grad, case, seed, dtype, tp, what):
    zs, zt, w = _inputs(seed, dtype)
    ref_v, ref_g = reference_with_grad(zs, zt, w, **case)
    full_g = torch.zeros(S, B, V, dtype=torch.float64)
    full_g[..., : ref_g.shape[-1]] = ref_g  # padding columns: zero gradient
    g_tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert values.dtype == torch.float32 and values.shape == (S, B)
    assert _norm_rel(values, ref_v) <= 1e-6, f"{what} tp={tp} {case}: values {_norm_rel(values, ref_v):.2e}"
    assert _norm_rel(grad, full_g) <= g_tol, f"{what} tp={tp} {case}: grad {_norm_rel(grad, full_g):.2e}"
    if dtype == torch.float32:
        assert (values.double() - ref_v).abs().max() <= 1e-5 * ref_v.abs().max()
        assert (grad.double() - full_g).abs().max() <= 1e-5 * full_g.abs().max()
    if case.get("vocab_size"):
        assert (grad[..., case["vocab_size"] :] == 0).all()


# ----------------------------------------------------------------------------------------------
# Against the reference, TP = 1, 2, 4
# ----------------------------------------------------------------------------------------------


def test_values_and_grads_match_reference_fp32(results):
    tp = len(results)
    for i, case in enumerate(CASES):
        values = [r[0][i][0] for r in results]
        grad = torch.cat([r[0][i][1] for r in results], dim=-1)
        for v in values[1:]:
            assert torch.equal(v, values[0]), f"ranks disagree on {case}"
        _check(values[0], grad, case, 100 + i, torch.float32, tp, "fp32")


def test_values_and_grads_match_reference_bf16(results):
    tp = len(results)
    for i, case in enumerate(BF16_CASES):
        values = [r[1][i][0] for r in results]
        grad = torch.cat([r[1][i][1] for r in results], dim=-1)
        assert grad.dtype == torch.bfloat16
        for v in values[1:]:
            assert torch.equal(v, values[0])
        _check(values[0], grad, case, 200 + i, torch.bfloat16, tp, "bf16")


def test_size_one_group_equals_no_group(results):
    """A size-1 process group must behave as tp_group=None: bitwise the same values and gradient."""
    for r in results:
        assert len(r[2]) == 4, "every world size runs the first four cases on a size-1 group"
        for i, (values, grad) in enumerate(r[2]):
            ref_v, ref_g = _run_case(CASES[i], 100 + i, torch.float32, 0, 1, None)
            assert torch.equal(values, ref_v) and torch.equal(grad, ref_g), f"size-1 group {CASES[i]}"
            _check(values, grad, CASES[i], 100 + i, torch.float32, 1, "size-1 group")


# ----------------------------------------------------------------------------------------------
# Properties (single process)
# ----------------------------------------------------------------------------------------------

SETTINGS = [dict(topk=None)] + [
    dict(topk=K, topk_from=f, renormalize=r) for f in ("student", "teacher", "union") for r in (False, True)
]
KINDS = ("reverse_kl", "forward_kl", "jsd")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_distributions(kind):
    zs, _, _ = _inputs(1)
    for setting in SETTINGS:
        x = zs.clone().requires_grad_()
        # Shifting the teacher's logits by a constant per token leaves its distribution unchanged.
        out = vocab_parallel_divergence(x, zs + 3.0, DivergenceSpec(kind=kind, temperature=0.8, **setting))
        out.sum().backward()
        assert out.abs().max() < 1e-6, setting
        if setting["topk"] is None or setting["renormalize"]:
            # A true divergence at its minimum: zero gradient too.
            assert x.grad.abs().max() < 1e-6, setting


@pytest.mark.parametrize("kind", KINDS)
def test_exact_divergences_are_nonnegative(kind):
    for seed in range(5):
        zs, zt, _ = _inputs(seed)
        out = vocab_parallel_divergence(zs * (seed + 1), zt, DivergenceSpec(kind=kind, topk=None, beta=0.3))
        assert (out >= 0).all()
        assert (out > 1e-3).all()  # different random distributions


def test_reverse_and_forward_are_asymmetric_and_swap():
    zs, zt, _ = _inputs(2)
    rev = vocab_parallel_divergence(zs, zt, DivergenceSpec(kind="reverse_kl", topk=None))
    fwd = vocab_parallel_divergence(zs, zt, DivergenceSpec(kind="forward_kl", topk=None))
    assert (rev - fwd).abs().min() > 1e-4  # KL(p_s||p_t) != KL(p_t||p_s)
    # ... and the directions are named right: forward KL is reverse KL with the roles swapped.
    torch.testing.assert_close(vocab_parallel_divergence(zt, zs, DivergenceSpec(kind="forward_kl", topk=None)), rev)
    # jsd is symmetric at beta = 0.5, and beta swaps the roles.
    jsd = vocab_parallel_divergence(zs, zt, DivergenceSpec(kind="jsd", topk=None, beta=0.3))
    torch.testing.assert_close(vocab_parallel_divergence(zt, zs, DivergenceSpec(kind="jsd", topk=None, beta=0.7)), jsd)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_of_the_whole_vocabulary_is_exact(kind):
    zs, zt, w = _inputs(3)
    exact = vocab_parallel_divergence(zs, zt, DivergenceSpec(kind=kind, topk=None, temperature=0.9))
    for topk, f, r in itertools.product((V, V + 10), ("student", "teacher", "union"), (False, True)):
        x = zs.clone().requires_grad_()
        spec = DivergenceSpec(kind=kind, topk=topk, topk_from=f, renormalize=r, temperature=0.9)
        out = vocab_parallel_divergence(x, zt, spec)
        torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6)


def test_chunked_equals_unchunked():
    zs, zt, w = _inputs(4)
    for kind, setting in itertools.product(KINDS, SETTINGS):
        outs, grads = [], []
        for chunk in (1, 5, 7, 1000):
            x = zs.clone().requires_grad_()
            out = vocab_parallel_divergence(x, zt, DivergenceSpec(kind=kind, chunk_tokens=chunk, **setting))
            (out * w).sum().backward()
            outs.append(out)
            grads.append(x.grad)
        for o, g in zip(outs[1:], grads[1:]):
            torch.testing.assert_close(o, outs[0], rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(g, grads[0], rtol=1e-7, atol=1e-9)


def test_teacher_gets_no_gradient_and_inputs_are_untouched():
    zs, zt, _ = _inputs(5)
    x, y = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    for topk in (None, K):
        vocab_parallel_divergence(x, y, DivergenceSpec(topk=topk, temperature=0.5)).sum().backward()
    assert y.grad is None and x.grad is not None
    assert torch.equal(x.detach(), zs) and torch.equal(y.detach(), zt)


def test_topk_ties_break_towards_the_lower_index():
    # Every logit equal: the top-2 must be tokens 0 and 1, whose log-probabilities are log(1/V).
    zs = torch.zeros(1, 1, V)
    zt = torch.zeros(1, 1, V)
    zt[..., 0] = 1.0  # teacher differs only at token 0
    out = vocab_parallel_divergence(zs, zt, DivergenceSpec(topk=2))
    ref = reference(zs, zt, topk=2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


def _stable_topk_columns(x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference rule: a stable descending sort (ties keep ascending columns), first k, in column order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values


def test_local_topk_kernel_and_torch_paths_pick_the_same_columns(monkeypatch):
    """`local_topk` on the C kernel (CPU fp32, one thread) and on torch.topk with its tie repair
    pick exactly the reference set: many ties (bf16-rounded logits, constant rows), -0.0 and
    +0.0, -inf padding, strided rows, n not a multiple of 4, k = 1 and k = n - 1."""
    from megatron_opcd import native
    from megatron_opcd.losses.functional import local_topk

    if not native.native_status()[0]:
        pytest.skip(f"CPU kernels unavailable here: {native.native_status()[1]}")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1003, generator=g)
    rows = [base, base.bfloat16().float(), (base * 3).round(), torch.zeros(64, 1003)]
    x = torch.cat(rows)  # [256, 1003]
    x[5, :40] = -0.0
    x[6, :] = float("-inf")
    x[6, 7] = 1.0
    x[7, ::3] = float("-inf")
    strided = torch.randn(16, 2000, generator=g)[:, :1003]  # rows 2000 floats apart
    calls = []
    real = native.topk_rows
    monkeypatch.setattr(native, "topk_rows", lambda *a: calls.append(1) or real(*a))
    for data in (x, strided):
        for k in (1, 2, 256, 1002):
            want = _stable_topk_columns(data, k)
            vals, idx = local_topk(data, k)
            order = idx.argsort(dim=-1)
            assert torch.equal(idx.gather(-1, order), want), k
            assert torch.equal(vals.gather(-1, order), data.gather(-1, want)), k
            monkeypatch.setattr(native, "topk_supports", lambda *a: False)  # the torch path
            vals_t, idx_t = local_topk(data, k)
            monkeypatch.undo()
            monkeypatch.setattr(native, "topk_rows", lambda *a: calls.append(1) or real(*a))
            assert torch.equal(idx_t.sort(dim=-1).values, want), k
    assert len(calls) == 8  # every kernel-path call above ran the kernel


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="kl"), "kind"),
        (dict(topk=0), "topk"),
        (dict(topk_from="both"), "topk_from"),
        (dict(temperature=0.0), "temperature"),
        (dict(beta=1.5), "beta"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(vocab_size=V + 1), "vocab_size"),
    ],
)
def test_bad_arguments_are_loud(kwargs, message):
    zs, zt, _ = _inputs(0)
    with pytest.raises(ValueError, match=message):
        vocab_parallel_divergence(zs, zt, DivergenceSpec(**kwargs))


def test_shape_mismatch_is_loud():
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_divergence(torch.zeros(2, 1, 8), torch.zeros(2, 1, 7))


# ----------------------------------------------------------------------------------------------
# The vocabulary's TP split and the one vocab-parallel log-softmax (losses/vocab.py)
# ----------------------------------------------------------------------------------------------


def test_padding_columns_and_mask():
    from megatron_opcd.losses import mask_padded_vocab
    from megatron_opcd.losses.vocab import real_columns

    # 70 real tokens of 96 at TP = 4 (24 a shard): 24, 24, 22, 0.
    assert [real_columns(24, r, 70) for r in range(4)] == [24, 24, 22, 0]
    assert real_columns(24, 3, None) == 24
    z = torch.randn(2, 24)
    masked = mask_padded_vocab(z, 2, 70)
    assert torch.equal(masked[:, :22], z[:, :22]) and torch.isneginf(masked[:, 22:]).all()
    unpadded = mask_padded_vocab(z, 0, 70)
    assert torch.equal(unpadded, z) and unpadded is not z  # always a new tensor (megatron's CE works in place)


def _token_logprob_cases(vocab_sizes, distributed: bool):
    """This rank's token log-probs for each vocabulary size, targets over the real tokens."""
    import torch.distributed as dist

    from megatron_opcd.losses import vocab_parallel_token_logprobs

    group, rank, tp = None, 0, 1
    if distributed:
        dist.init_process_group("gloo")
        group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    out = []
    for i, vocab in enumerate(vocab_sizes):
        zs, _, _ = _inputs(300 + i)
        targets = torch.randint(0, vocab or V, (S, B), generator=torch.Generator().manual_seed(i))
        vl = V // tp
        out.append(vocab_parallel_token_logprobs(zs[..., rank * vl : (rank + 1) * vl], targets, group, vocab))
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_token_logprobs_match_the_float64_log_softmax(tp, run_ranks):
    """Every rank the same values, within float32 rounding of the float64 full-vocabulary log-softmax,
    padding (70 and 90 of 96 columns; at TP = 4 the last rank holds no real token) excluded."""
    vocabs = [None, 90, 70]
    if tp == 1:
        ranks = [_token_logprob_cases(vocabs, distributed=False)]
    else:
        ranks = run_ranks(_token_logprob_cases, tp, vocabs, True, timeout=240)
    for i, vocab in enumerate(vocabs):
        for r in ranks[1:]:
            assert torch.equal(r[i], ranks[0][i])
        zs, _, _ = _inputs(300 + i)
        n = vocab or V
        targets = torch.randint(0, n, (S, B), generator=torch.Generator().manual_seed(i))
        ref = torch.log_softmax(zs[..., :n].double(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        got = ranks[0][i]
        assert got.dtype == torch.float32 and got.shape == (S, B)
        # fp32 logits, fp64 arithmetic: only the final rounding to fp32 (relative 6e-8) remains.
        assert (got.double() - ref).abs().max() <= 1e-6 * ref.abs().max(), (tp, vocab)


# ----------------------------------------------------------------------------------------------
# The loss wrapper and megatron-core's contract
# ----------------------------------------------------------------------------------------------


def _mask():
    mask = torch.zeros(S, B, dtype=torch.bool)
    mask[1:, 0] = True  # 2 response tokens
    mask[:, 1] = True  # 3
    mask[2, 2] = True  # 1
    return mask  # sequence 3: no response token


def test_sequence_and_token_averages():
    zs, zt, _ = _inputs(6)
    mask = _mask()
    per_tok = reference(zs, zt, topk=K).float()
    loss, units, metrics = DivergenceLoss(DivergenceSpec(topk=K))(zs, zt, mask)
    expected = sum(per_tok[mask[:, b], b].mean() for b in range(3))  # 1/|y| sum_t, summed over sequences
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert units.item() == 3 and units.dtype == torch.int  # sequence 3 has no response
    loss_t, tokens, _ = DivergenceLoss(DivergenceSpec(topk=K), average="token")(zs, zt, mask)
    torch.testing.assert_close(loss_t, per_tok[mask].sum(), rtol=1e-6, atol=0)
    assert tokens.item() == 6
    assert metrics["distill loss"].tolist() == pytest.approx([loss.item(), 3.0])


def test_masked_positions_are_excluded():
    zs, zt, _ = _inputs(7)
    mask = _mask()
    loss_fn = DivergenceLoss(DivergenceSpec(topk=None, kind="jsd"))
    x = zs.clone().requires_grad_()
    loss, _, _ = loss_fn(x, zt, mask)
    loss.backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask].abs().sum(-1) > 0).all()
    # Extreme logits at masked positions change nothing.
    zs2, zt2 = zs.clone(), zt.clone()
    zs2[~mask] = 1e4
    zt2[~mask] = -1e4
    torch.testing.assert_close(loss_fn(zs2, zt2, mask)[0], loss)


def test_batch_first_layout():
    zs, zt, _ = _inputs(8)
    mask = _mask()
    sb = DivergenceLoss(DivergenceSpec(topk=K))(zs, zt, mask)[0]
    bs = DivergenceLoss(DivergenceSpec(topk=K), batch_first=True)(zs.transpose(0, 1).contiguous(), zt.transpose(0, 1).contiguous(), mask.T)[0]
    torch.testing.assert_close(bs, sb)


def test_masked_sums_checks_its_inputs():
    with pytest.raises(ValueError, match="average"):
        masked_sums(torch.zeros(2, 2), torch.ones(2, 2), "batch", 0)
    with pytest.raises(ValueError, match="shape"):
        masked_sums(torch.zeros(2, 2), torch.ones(2, 3), "token", 0)
    with pytest.raises(ValueError, match="average"):
        DivergenceLoss(average="mean")


@pytest.mark.parametrize("per_token_loss", [False, True])
def test_megatron_schedule_contract(per_token_loss):
    """The bound loss_func through megatron-core's own forward_step_calc_loss."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    zs, zt, _ = _inputs(9)
    mask = _mask()
    loss = DivergenceLoss(DivergenceSpec(topk=K, temperature=0.7))
    loss_func = bind_loss_func(loss, zt, mask)
    config = SimpleNamespace(calculate_per_token_loss=per_token_loss, timers=None, num_moe_experts=None, mtp_num_layers=None)
    store = []
    out, units = forward_step_calc_loss(None, zs.clone().requires_grad_(), loss_func, config, None, False, 2, store,
                                        cp_group_size=1, is_last_stage=True)  # fmt: skip
    per_tok = reference(zs, zt, topk=K, temperature=0.7)
    seq_mean = torch.stack([per_tok[mask[:, b], b].mean() for b in range(3)])
    assert units.item() == 3
    if per_token_loss:  # the sum; finalize_model_grads divides by the global count
        torch.testing.assert_close(out.double(), seq_mean.sum(), rtol=1e-6, atol=0)
    else:  # the schedule divides by the units and by the 2 microbatches
        torch.testing.assert_close(out.double(), seq_mean.mean() / 2, rtol=1e-6, atol=0)
    assert set(store[0]) == {"distill loss", "reverse_kl per token"}


# ----------------------------------------------------------------------------------------------
# The benchmark's quick mode (a smoke test of the script, not a measurement)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_quick_mode_runs():
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_loss.py"), "--quick"],
        capture_output=True, text=True, timeout=600, cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"V", "T", "tp", "memory_ratio", "time_ratio"} <= set(last["results"][0])
