"""The top-k diagnostics (megatron_opcd/losses/diagnostics.py) against a float64, single-process,
full-vocabulary reference written here (log_softmax / sort / argmax, no code shared with the
package), at TP = 1 and TP = 2 (gloo ranks), with a padded vocabulary (90 real tokens of 96: at
TP = 2 the second shard holds 42 real columns and 6 padding ones).

Tolerances: the masses and KLs are sums of at most 12 per-token values computed in fp64 from fp32
logits, so they sit within 1e-6 of the float64 reference relative to max(1, |reference|) (the
fp32 rounding of the logits is shared: the reference sees the same fp32 values); the argmax count
is an integer and must be equal.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opcd.losses import DiagnosticsSpec, DivergenceLoss, DivergenceSpec
from megatron_opcd.losses.diagnostics import NAMES, sample_positions, warning_line

S, B, V, VOCAB, K = 3, 4, 96, 90, 8
CASES = [
    dict(topk=K, temperature=1.0, renormalize=False, chunk_tokens=5),
    dict(topk=K, temperature=0.7, renormalize=True, chunk_tokens=12),
]
SAMPLE = 5


def _inputs(seed: int):
    """Student and teacher logits `[S, B, V]` fp32: the teacher close to the student on half the
    rows (its argmax then mostly inside the student's top-k) and independent on the others; the
    padding columns hold large logits, which must not count anywhere."""
    g = torch.Generator().manual_seed(seed)
    zs = 2.0 * torch.randn(S, B, V, generator=g, dtype=torch.float64)
    noise = 2.0 * torch.randn(S, B, V, generator=g, dtype=torch.float64)
    near = (torch.arange(B) % 2 == 0).view(1, B, 1)
    zt = torch.where(near, zs + 0.3 * noise, noise)
    zs[..., VOCAB:], zt[..., VOCAB:] = 9.0, 9.0
    mask = torch.ones(S, B, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[1, 2] = False  # 9 response positions of 12
    return zs.float(), zt.float(), mask


def reference(zs, zt, mask, *, topk, temperature, renormalize, **_):
    """{name: (sum, count)} in float64 over the real vocabulary."""
    zs, zt = zs.double()[..., :VOCAB], zt.double()[..., :VOCAB]
    ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    order = torch.sort(zs, dim=-1, descending=True, stable=True).indices[..., :topk]
    top = torch.zeros_like(zs, dtype=torch.bool).scatter(-1, order, True)
    teacher_mass = torch.where(top, lt.exp(), 0.0).sum(-1)
    student_out = 1.0 - torch.where(top, ls.exp(), 0.0).sum(-1)
    argmax_out = (~top.gather(-1, zt.argmax(-1, keepdim=True)).squeeze(-1)).double()
    qs, qt = ls, lt
    if renormalize:
        qs = ls - torch.logsumexp(torch.where(top, ls, -math.inf), -1, keepdim=True)
        qt = lt - torch.logsumexp(torch.where(top, lt, -math.inf), -1, keepdim=True)
    topk_kl = torch.where(top, qs.exp() * (qs - qt), 0.0).sum(-1)
    exact_kl = (ls.exp() * (ls - lt)).sum(-1)
    flat = mask.reshape(-1)
    n = int(flat.sum())
    picked = flat.nonzero().squeeze(-1)[[i * n // SAMPLE for i in range(SAMPLE)]]  # the documented stride
    out = {}
    for name, per_token in zip(NAMES[:3], (teacher_mass, student_out, argmax_out)):
        out[name] = (float(per_token.reshape(-1)[flat].sum()), n)
    out["sampled topk kl"] = (float(topk_kl.reshape(-1)[picked].sum()), SAMPLE)
    out["sampled exact kl"] = (float(exact_kl.reshape(-1)[picked].sum()), SAMPLE)
    return out


def _diagnose(rank: int, tp: int, group):
    out = []
    for i, case in enumerate(CASES):
        zs, zt, mask = _inputs(10 + i)
        vl = V // tp
        loss = DivergenceLoss(DivergenceSpec(vocab_size=VOCAB, **case), average="token", tp_group=group,
                              diagnostics=DiagnosticsSpec(sample_tokens=SAMPLE))
        shard_s = zs[..., rank * vl:(rank + 1) * vl].clone().requires_grad_()
        _, _, metrics = loss(shard_s, zt[..., rank * vl:(rank + 1) * vl].clone(), mask)
        out.append({k: v.tolist() for k, v in metrics.items()})
    return out


def _diagnose_ranks():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return _diagnose(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


@pytest.mark.parametrize("tp", [1, 2])
def test_diagnostics_match_the_float64_reference(tp, run_ranks):
    ranks = [_diagnose(0, 1, None)] if tp == 1 else run_ranks(_diagnose_ranks, tp, timeout=240)
    for r in ranks[1:]:
        assert r == ranks[0]  # bitwise the same on every TP rank
    for i, case in enumerate(CASES):
        zs, zt, mask = _inputs(10 + i)
        ref = reference(zs, zt, mask, **case)
        got = ranks[0][i]
        for name in NAMES:
            (s, c), (rs, rc) = got[name], ref[name]
            assert c == rc, (tp, i, name)
            tol = 1e-6 * max(1.0, abs(rs))
            assert abs(s - rs) <= tol, (tp, i, name, s, rs)
        # The argmax share is a count: exact. And the inputs make it neither 0 nor all.
        assert got["teacher argmax outside topk"][0] == ref["teacher argmax outside topk"][0]
        assert 0 < ref["teacher argmax outside topk"][0] < ref["teacher argmax outside topk"][1]


def test_full_topk_has_all_the_mass_and_the_exact_kl():
    """k = the vocabulary: I is everything, so the teacher's mass is 1, nothing is outside, and
    the sampled top-k value is the exact divergence."""
    zs, zt, mask = _inputs(3)
    loss = DivergenceLoss(DivergenceSpec(topk=VOCAB, vocab_size=VOCAB), diagnostics=DiagnosticsSpec(sample_tokens=4))
    _, _, m = loss(zs, zt, mask)
    n = float(mask.sum())
    # The normalisers sum exp in fp32 (the loss's own partials): relative 1e-7 per token.
    assert abs(m["topk teacher mass"][0] - n) < 1e-6 * n and abs(m["topk student mass outside"][0]) < 1e-6 * n
    assert m["teacher argmax outside topk"][0] == 0
    assert abs(m["sampled topk kl"][0] - m["sampled exact kl"][0]) < 1e-5 * max(1.0, abs(float(m["sampled exact kl"][0])))


def test_without_diagnostics_the_metrics_are_unchanged():
    zs, zt, mask = _inputs(4)
    plain = DivergenceLoss(DivergenceSpec(topk=K, vocab_size=VOCAB))
    _, _, m = plain(zs, zt, mask)
    assert set(m) == {"distill loss", "reverse_kl per token"} and plain.metric_names == tuple(m)
    diag = DivergenceLoss(DivergenceSpec(topk=K, vocab_size=VOCAB), diagnostics=DiagnosticsSpec())
    a, _, m2 = diag(zs, zt, mask)
    assert diag.metric_names == tuple(m2) and torch.equal(m2["distill loss"], m["distill loss"])
    with pytest.raises(ValueError, match="topk=None"):
        DivergenceLoss(DivergenceSpec(topk=None), diagnostics=DiagnosticsSpec())


def test_sample_positions_are_strided_over_the_mask():
    mask = torch.tensor([True, False, True, True, False, True, True])  # true at 0 2 3 5 6
    assert sample_positions(mask, 2).tolist() == [0, 3]
    assert sample_positions(mask, 9).tolist() == [0, 2, 3, 5, 6]
    assert sample_positions(mask, 0).tolist() == []


def test_warning_line_and_threshold():
    spec = DiagnosticsSpec(warn_teacher_mass=0.5)
    assert warning_line({"topk_teacher_mass": 0.6}, spec, "step 1") is None
    assert warning_line({"topk_teacher_mass": float("nan")}, spec, "step 1") is None
    line = warning_line({"topk_teacher_mass": 0.3}, spec, "step 2")
    assert "step 2" in line and "0.300 < loss.warn_teacher_mass=0.5" in line
    assert warning_line({"topk_teacher_mass": 0.3}, DiagnosticsSpec(warn_teacher_mass=0.0), "s") is None
    with pytest.raises(ValueError, match="warn_teacher_mass"):
        DiagnosticsSpec(warn_teacher_mass=1.5)


def test_trainer_logs_the_diagnostics_every_step_and_in_evaluation(run_ranks, tmp_path):
    """Through the trainer's metrics path at TP = 2: every train line and every eval line of
    metrics.jsonl carries the five diagnostics (the existing names unchanged). A threshold of 1 is
    crossed every step, so the warning path runs too (its line goes to the ranks' stderr, which
    this test does not read; `test_warning_line_and_threshold` checks the line itself)."""
    import json

    from _train_fixtures import make_run
    from _train_ranks import train_run

    cfg = str(make_run(tmp_path, tp=2, steps=2, extra={
        "checkpoint.save": None, "logging.dir": str(tmp_path / "logs"), "evaluation.interval": 2,
        "evaluation.num_prompts": 2, "evaluation.max_new_tokens": 4, "loss.warn_teacher_mass": 1.0,
    }))
    run_ranks(train_run, 2, cfg, [], timeout=400)
    lines = [json.loads(x) for x in open(tmp_path / "logs" / "metrics.jsonl")]
    names = [n.replace(" ", "_") for n in NAMES]
    train = [x for x in lines if x["split"] == "train"]
    evals = [x for x in lines if x["split"] == "eval"]
    assert len(train) == 2 and [e["step"] for e in evals] == [0, 2]
    for x in train + evals:
        assert all(0.0 <= x[n] <= 1.0 for n in names[:3]), x
        assert all(math.isfinite(x[n]) for n in names), x
    assert all({"loss", "kl", "reverse_kl", "grad_norm"} <= set(x) for x in train)
    assert "kl" in evals[0]


def test_the_trainer_warns_once_per_fall_not_every_step():
    """The warning line is said when the mass falls below the threshold, not again while it stays
    there (the metric is logged every step), and again after a recovery; training and evaluation
    each keep their own state."""
    from types import SimpleNamespace

    from megatron_opcd.training.trainer import Trainer

    said = []
    fake = SimpleNamespace(objective=SimpleNamespace(loss=SimpleNamespace(diagnostics=DiagnosticsSpec(sample_tokens=0, warn_teacher_mass=0.5))),
                           logger=SimpleNamespace(info=said.append), _topk_low={})
    for step, mass in enumerate([0.6, 0.3, 0.2, 0.4, 0.7, 0.1], start=1):
        Trainer._warn_topk(fake, {"topk_teacher_mass": mass}, f"step {step}")
    Trainer._warn_topk(fake, {"topk_teacher_mass": 0.2}, "evaluation at step 6")
    assert [line.split(": ")[1] for line in said] == ["step 2", "step 6", "evaluation at step 6"]
