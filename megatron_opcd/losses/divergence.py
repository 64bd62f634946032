"""`vocab_parallel_divergence`: per-token KL / JSD between a student and a teacher whose logits are
sharded over the vocabulary across tensor-parallel ranks, without gathering the vocabulary.

One `torch.autograd.Function` does all the communication in its forward; its backward is local
(STYLE habit 2, after megatron/core/tensor_parallel/cross_entropy.py). Per chunk of tokens:

* exact (`topk=None`): pass 1 reduces each shard to log-sum-exp partials (max, sum exp) and
  all-gathers them (one collective for both models); pass 2 sums the divergence terms over the
  shard and all-gathers the per-row partial sums. The log-sum-exp partials are merged with the
  online-softmax rule rather than megatron's all-reduce MAX then SUM: one pass over the shard
  instead of two, and one collective instead of two.
* top-k: one pass per model gives the log-sum-exp partials and the shard's local top-k; one
  all-gather carries both (k candidates per rank, small); every rank then selects the same global
  top-k (ties: lower global index), and one all-reduce assembles both models' logits at those k
  (or 2k for the union) indices. The divergence itself is then computed on `[c, K]` tensors.

All reductions of gathered data happen locally in rank order, so every rank returns bitwise the
same values. The backward recomputes each chunk from the saved logits and per-token scalars: no
`[T, v/tp]` intermediate is saved, and a chunk needs at most two fp32 `[c, v/tp]` buffers (jsd's
exact forward, three). The math lives in `megatron_opcd.losses.functional`.
"""

from __future__ import annotations

import math as _math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import megatron_opcd.losses.functional as M  # the submodule itself: never the package __init__ (no cycle)
from megatron_opcd.losses.vocab import VocabShard

TOPK_FROM = ("student", "teacher", "union")


@dataclass(frozen=True)
class DivergenceSpec:
    """What to compute, validated on construction: the one declaration of the divergence's
    settings and their defaults. The trainer's `loss:` section builds one
    (`training.config.TrainConfig.divergence`); `DivergenceLoss` and `vocab_parallel_divergence`
    take one."""

    kind: str = "reverse_kl"
    """`reverse_kl` = sum_i p_s (log p_s - log p_t), OPCD's loss; `forward_kl` = sum_i p_t (log p_t
    - log p_s); `jsd` = beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta)
    p_s (TRL's generalised JSD; beta = 0 gives forward KL and beta = 1 reverse KL, as in TRL, since
    the formula itself vanishes there)."""

    topk: Optional[int] = 256
    """None for the exact divergence over the whole vocabulary; k to sum over an index set I of k
    tokens per position chosen over the whole vocabulary (values above the vocabulary size are
    clamped to it). p_s and p_t are still the full-vocabulary softmaxes evaluated at I, so without
    `renormalize` the value is a partial sum (it can be negative)."""

    topk_from: str = "student"
    """I is the student's top-k (`student`, OPCD's default), the teacher's (`teacher`), or their
    union (`union`, 1 to 2k tokens per position). Ties are broken towards the lower global index."""

    renormalize: bool = False
    """Renormalise both distributions over I before the sum (a no-op for exact)."""

    temperature: float = 1.0
    """Both logits are divided by it before the softmax (use the sampling temperature)."""

    beta: float = 0.5
    """jsd only: the teacher's weight in the mixture, in [0, 1]."""

    chunk_tokens: int = 1024
    """Tokens per chunk; bounds the extra memory to a few fp32 `[chunk, v/tp]` buffers in forward
    and backward (docs/losses.md, "Memory model"). The values do not depend on it."""

    vocab_size: Optional[int] = None
    """The true vocabulary size when the sharded vocabulary is padded; columns with global index
    >= vocab_size are excluded (as if their logits were -inf). None: every column is a token."""

    def __post_init__(self):
        if self.kind not in M.KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {M.KINDS}")
        if self.topk is not None and (isinstance(self.topk, bool) or int(self.topk) != self.topk or self.topk < 1):
            raise ValueError(f"topk={self.topk!r}: use a positive integer, or None for the exact divergence")
        if self.topk_from not in TOPK_FROM:
            raise ValueError(f"topk_from={self.topk_from!r}: use one of {TOPK_FROM}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: use a positive number (1.0 = no scaling)")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta!r}: the jsd weight must lie in [0, 1]")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens!r}: use a positive number of tokens per chunk")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size!r}: use the true (unpadded) vocabulary size, or None")

    @property
    def resolved_kind(self) -> str:
        """TRL's convention: the generalised JSD is identically zero at beta = 0 and 1, which name
        forward KL and reverse KL instead."""
        if self.kind == "jsd" and self.beta == 0.0:
            return "forward_kl"
        if self.kind == "jsd" and self.beta == 1.0:
            return "reverse_kl"
        return self.kind


class TopkStats:
    """Where the top-k forward leaves its per-token diagnostics (losses/diagnostics.py), computed
    from what that forward already holds: both log-normalisers, both models' logits at I and the
    teacher's largest logit (from its log-sum-exp partials). No extra pass over the vocabulary,
    no extra collective. Pass one to `vocab_parallel_divergence(..., stats=)`."""

    COLUMNS = ("teacher mass on I", "student mass outside I", "teacher argmax outside I")

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def per_token(self) -> torch.Tensor:
        """`[T, 3]` fp64, the columns of `COLUMNS`, one row per token of the last forward."""
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0, 3, dtype=torch.float64)


class _Scratch:
    """Reusable fp32 `[rows, cols]` buffers, one per slot, allocated once per forward / backward:
    every chunk and both models reuse them instead of allocating (and, on CPU, page-faulting) a
    fresh vocabulary-sized buffer each time. Slot 0 and 1 are the only ones used."""

    def __init__(self, rows: int, cols: int, device):
        self.size, self.device, self.bufs = rows * cols, device, {}

    def get(self, slot: int, rows: int, cols: int) -> torch.Tensor:
        if slot not in self.bufs:
            self.bufs[slot] = torch.empty(self.size, dtype=torch.float32, device=self.device)
        return self.bufs[slot][: rows * cols].view(rows, cols)


def _fp32_copy(z: torch.Tensor, scratch: _Scratch, slot: int = 0) -> torch.Tensor:
    """A contiguous fp32 copy of `z` in a scratch buffer (callers overwrite it in place)."""
    return scratch.get(slot, *z.shape).copy_(z)


def _log_probs_into(x: torch.Tensor, z: torch.Tensor, log_z: torch.Tensor, temperature: float) -> torch.Tensor:
    """`x <- z / T - log Z` (fp32 `[c, n]`), computed as `(z - T log Z) / T`: the shift comes before
    the division so rounding is relative to the (small, for likely tokens) result, not to the raw
    logit. `T log Z` is split into its fp32 value and the fp64 remainder, subtracted last."""
    shift = log_z * temperature  # [c] fp64
    hi = shift.float()
    x.copy_(z).sub_(hi.unsqueeze(-1))  # in place: x is scratch (or the gradient buffer)
    if temperature != 1.0:
        x.div_(temperature)
    return x.sub_(((shift - hi.double()) / temperature).float().unsqueeze(-1))


def _log_ratio(zs, zt, log_zs, log_zt, temperature: float, scratch: _Scratch) -> torch.Tensor:
    """`d = log p_s - log p_t = (z_s - z_t) / T - (log Z_s - log Z_t)`, fp32 `[c, n]`, from the
    logit difference rather than as a difference of two rounded log-probabilities."""
    d = _fp32_copy(zt, scratch, slot=1).neg_().add_(zs)  # in place on the copy: z_s - z_t, one buffer
    if temperature != 1.0:
        d.div_(temperature)
    return d.sub_((log_zs - log_zt).float().unsqueeze(-1))


# ------------------------------------------------------------------------------------------------
# Exact path
# ------------------------------------------------------------------------------------------------


def _lse_both(zs, zt, spec: DivergenceSpec, shard: VocabShard, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-normalisers `[c]` (fp64) of both models' scaled logits."""
    parts = []
    for z in (zs, zt):
        x = _fp32_copy(z[:, : shard.n_valid], scratch)  # [c, n_valid]: the one buffer, both models
        parts += list(M.lse_partials(x, spec.temperature))
    g = shard.all_gather(torch.stack(parts, dim=-1).double())  # [tp, c, 4]
    T = spec.temperature
    return M.merge_lse(g[..., 0], g[..., 1], T), M.merge_lse(g[..., 2], g[..., 3], T)


def _exact_buffers(zs, zt, log_zs, log_zt, spec, shard, scratch, ls=None):
    """`ls = log p_s` (in `ls` or scratch slot 0) and `d = log p_s - log p_t` (slot 1) over this
    shard's valid columns, fp32 `[c, n]`."""
    zs, zt = zs[:, : shard.n_valid], zt[:, : shard.n_valid]
    ls = scratch.get(0, *zs.shape) if ls is None else ls
    T = spec.temperature
    return _log_probs_into(ls, zs, log_zs, T), _log_ratio(zs, zt, log_zs, log_zt, T, scratch)


def _exact_forward_chunk(zs, zt, spec, shard, scratch):
    log_zs, log_zt = _lse_both(zs, zt, spec, shard, scratch)
    ls, d = _exact_buffers(zs, zt, log_zs, log_zt, spec, shard, scratch)
    value, g_sum = M.exact_chunk_value(spec.resolved_kind, ls, d, spec.beta)
    sums = shard.all_gather(torch.stack([value, g_sum], dim=-1).double()).sum(dim=0)  # [c, 2], rank order
    return sums[:, 0], (log_zs, log_zt, sums[:, 0], sums[:, 1])


def _exact_backward_chunk(zs, zt, saved, scale, spec, shard, out, scratch):
    """Writes dL/dz_s for this chunk into `out` `[c, v/tp]` fp32; `scale` `[c]` = grad_out / T."""
    log_zs, log_zt, value, g_sum = saved
    # ls lives in `out` itself: the gradient overwrites it, so only d is an extra buffer.
    ls, d = _exact_buffers(zs, zt, log_zs, log_zt, spec, shard, scratch, ls=out[:, : shard.n_valid])
    M.exact_chunk_grad(spec.resolved_kind, ls, d, value.float(), g_sum.float(), spec.beta)
    ls.mul_(scale.float().unsqueeze(-1))  # in place: ls now holds the gradient
    out[:, shard.n_valid :] = 0  # vocabulary padding: not a token, no gradient


# ------------------------------------------------------------------------------------------------
# Top-k path
# ------------------------------------------------------------------------------------------------


def _topk_index_set(zs, zt, spec, shard, scratch):
    """One pass per model: log-normalisers `[c]` and the global index set I `[c, K]` + valid mask."""
    k = min(spec.topk, shard.vocab_size)  # topk >= V is the exact divergence over I = everything
    kc = min(k, shard.v_local)  # candidates per rank; the same on every rank (all_gather shapes)
    rows = zs.shape[0]
    wants = {"student": (True, False), "teacher": (False, True), "union": (True, True)}[spec.topk_from]
    parts, cands = [], []
    for z, want in zip((zs, zt), wants):
        x = _fp32_copy(z[:, : shard.n_valid], scratch)  # [c, n_valid]: the one buffer, both models
        if want:
            # Selected on the raw logits: dividing by T > 0 keeps the order and adds no rounding.
            n = min(kc, x.shape[-1])
            vals, idx = M.local_topk(x, n)  # [c, n], ties to the lower column
            if n < kc:
                # A shard with fewer real tokens than kc (vocabulary padding): fill with -inf
                # candidates at distinct out-of-vocabulary indices, never selected since k <= V.
                fill = torch.arange(kc - n, device=x.device) + shard.v_local * shard.size + shard.rank * kc
                vals = torch.cat([vals, vals.new_full((rows, kc - n), -_math.inf)], dim=-1)
                idx = torch.cat([idx + shard.start, fill.expand(rows, -1)], dim=-1)
            else:
                idx = idx + shard.start
            cands += [vals.double(), idx.double()]  # indices < 2**53: exact in fp64
        m, s = M.lse_partials(x, spec.temperature)
        parts += [m.double().unsqueeze(-1), s.double().unsqueeze(-1)]
    g = shard.all_gather(torch.cat(parts + cands, dim=-1))  # [tp, c, 4 + 2 kc (x2 for union)]
    T = spec.temperature
    log_zs, log_zt = M.merge_lse(g[..., 0], g[..., 1], T), M.merge_lse(g[..., 2], g[..., 3], T)
    teacher_max = g[..., 2].amax(dim=0)  # [c]: the teacher's largest raw logit over the real vocabulary
    g = g[..., 4:].permute(1, 0, 2)  # [c, tp, 2 kc per wanted model]
    chosen = []
    for i in range(sum(wants)):
        vals = g[..., 2 * i * kc : (2 * i + 1) * kc].reshape(rows, -1)  # [c, tp * kc]
        idx = g[..., (2 * i + 1) * kc : (2 * i + 2) * kc].reshape(rows, -1).long()
        chosen.append(M.select_topk(vals, idx, k))
    if spec.topk_from == "union":
        idx, valid = M.union_indices(*chosen)
    else:
        idx, valid = chosen[0], torch.ones_like(chosen[0], dtype=torch.bool)
    return log_zs, log_zt, idx, valid, teacher_max


def _local_columns(idx, shard):
    """Which entries of `idx` `[c, K]` this rank owns, and their local column (clamped if not)."""
    owned = (idx >= shard.start) & (idx < shard.start + shard.n_valid)
    return owned, (idx - shard.start).clamp(0, shard.v_local - 1)


def _topk_forward_chunk(zs, zt, spec, shard, scratch, stats: Optional[TopkStats] = None):
    log_zs, log_zt, idx, valid, teacher_max = _topk_index_set(zs, zt, spec, shard, scratch)
    owned, col = _local_columns(idx, shard)
    owned &= valid
    # Both models' logits at I, assembled from their owners: [2, c, K] fp64, then scaled in fp64.
    raw = shard.all_reduce_owned(torch.stack([z.gather(-1, col) for z in (zs, zt)]).double().where(owned, 0.0))
    at = raw / spec.temperature
    ls, lt = at[0] - log_zs.unsqueeze(-1), at[1] - log_zt.unsqueeze(-1)  # [c, K] full-vocab log p
    if stats is not None:
        # Full-vocabulary masses at I (before any renormalisation), and whether the teacher's
        # largest logit is attained inside I: raw logits are compared exactly (both are the same
        # fp32/bf16 values widened to fp64), so this is the argmax, ties counted as inside.
        t_in = torch.where(valid, raw[1], -_math.inf).amax(dim=-1)
        stats.chunks.append(torch.stack([
            torch.where(valid, lt.exp(), 0.0).sum(dim=-1),
            1.0 - torch.where(valid, ls.exp(), 0.0).sum(dim=-1),
            (t_in < teacher_max.double()).double(),
        ], dim=-1))
    if spec.renormalize:
        ls, lt = M.masked_log_normalize(ls, valid), M.masked_log_normalize(lt, valid)
    kind = spec.resolved_kind
    value = M.terms(kind, ls, lt, spec.beta).masked_fill(~valid, 0.0).sum(dim=-1)
    coef_i, coef_full = M.logit_grad_coefficients(M.student_grad(kind, ls, lt, spec.beta), ls, valid, spec.renormalize)
    return value, (log_zs, idx, coef_i, coef_full)


def _topk_backward_chunk(zs, saved, scale, spec, shard, out):
    """dL/dz_s = (coef_I scattered on I - coef_full p_s) * grad_out / T, written into `out`."""
    log_zs, idx, coef_i, coef_full = saved
    owned, col = _local_columns(idx, shard)
    if spec.renormalize:
        out.zero_()  # renormalised over I: no gradient outside I
    else:
        # p_s computed in the output buffer itself, as in `_log_probs_into` but with the fp64
        # remainder of T log Z folded into the row factor (one pass fewer over the shard).
        shift = log_zs * spec.temperature
        hi = shift.float()
        x = out[:, : shard.n_valid]
        x.copy_(zs[:, : shard.n_valid]).sub_(hi.unsqueeze(-1))  # in place: x is the gradient buffer
        if spec.temperature != 1.0:
            x.div_(spec.temperature)
        row = -coef_full * scale * torch.exp(-(shift - hi.double()) / spec.temperature)  # [c] fp64
        x.exp_().mul_(row.float().unsqueeze(-1))  # -coef_full * scale * p_s
        out[:, shard.n_valid :] = 0  # vocabulary padding: not a token, no gradient
    src = (coef_i * scale.unsqueeze(-1)).where(owned, 0.0).to(out.dtype)
    out.scatter_add_(-1, col, src)


# ------------------------------------------------------------------------------------------------
# The autograd.Function and the public function
# ------------------------------------------------------------------------------------------------


class _VocabParallelDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, spec: DivergenceSpec, tp_group, stats=None):
        v_local = student_logits.shape[-1]
        shard = VocabShard.of(v_local, tp_group, spec.vocab_size)
        zs = student_logits.detach().reshape(-1, v_local)  # [T, v/tp]; a view for contiguous input
        zt = teacher_logits.detach().reshape(-1, v_local)
        chunk = _exact_forward_chunk if spec.topk is None else _topk_forward_chunk
        values, saved = [], []
        scratch = _Scratch(min(spec.chunk_tokens, zs.shape[0]), v_local, zs.device)
        extra = {} if stats is None else {"stats": stats}  # top-k only (checked by the caller)
        for lo in range(0, zs.shape[0], spec.chunk_tokens):
            hi = lo + spec.chunk_tokens
            value, small = chunk(zs[lo:hi], zt[lo:hi], spec, shard, scratch, **extra)
            values.append(value)
            saved.append(small)
        # Per-token tensors only ([T] or [T, K]); the logits themselves are saved by reference.
        ctx.saved_small = [torch.cat(list(parts)) for parts in zip(*saved)] if saved else []
        ctx.save_for_backward(zs, zt if spec.topk is None else None)
        ctx.spec, ctx.shard, ctx.shape, ctx.dtype = spec, shard, student_logits.shape, student_logits.dtype
        del scratch  # freed now, not when ctx is
        out = torch.cat(values) if values else zs.new_zeros(0, dtype=torch.float64)
        return out.float().view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        zs, zt = ctx.saved_tensors
        spec, shard = ctx.spec, ctx.shard
        scale = grad_output.reshape(-1).double() / spec.temperature  # [T]; d a / d z = 1 / T
        grad = torch.empty(zs.shape, dtype=ctx.dtype, device=zs.device)
        scratch = _Scratch(min(spec.chunk_tokens, zs.shape[0]), shard.v_local, zs.device)
        for lo in range(0, zs.shape[0], spec.chunk_tokens):
            hi = lo + spec.chunk_tokens
            small = [t[lo:hi] for t in ctx.saved_small]
            # fp32 gradients are written straight into `grad`; others go through scratch slot 0.
            fp32 = grad.dtype == torch.float32
            out = grad[lo:hi] if fp32 else scratch.get(0, *grad[lo:hi].shape)
            if spec.topk is None:
                _exact_backward_chunk(zs[lo:hi], zt[lo:hi], small, scale[lo:hi], spec, shard, out, scratch)
            else:
                _topk_backward_chunk(zs[lo:hi], small, scale[lo:hi], spec, shard, out)
            if not fp32:
                grad[lo:hi].copy_(out)  # cast to the input dtype
        return grad.view(ctx.shape), None, None, None, None


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spec: DivergenceSpec = DivergenceSpec(),
    tp_group: Optional[dist.ProcessGroup] = None,
    stats: Optional[TopkStats] = None,
) -> torch.Tensor:
    """Per-token divergence between student and teacher, reduced across tensor-parallel ranks.

    Args:
        student_logits: `[s, b, v/tp]` (any leading dims): this rank's vocabulary shard (global
            columns `rank * v/tp ...`), fp32 or bf16; the math runs in fp32 (fp64 on `[., k]`).
        teacher_logits: same shape; receives no gradient (it is treated as detached).
        spec: what to compute (`DivergenceSpec`'s fields say what each setting means).
        tp_group: the tensor-parallel group over which the vocabulary is sharded; None = no TP.
        stats: top-k only: a `TopkStats` that receives the per-token diagnostics of I (cleared
            first), the same on every rank of `tp_group`.

    Returns:
        `[s, b]` fp32, the same on every rank of `tp_group`, differentiable w.r.t. `student_logits`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape [s, b, v/tp]"
        )
    if stats is not None:
        if spec.topk is None:
            raise ValueError("stats= describes a top-k index set: the spec has topk=None (exact)")
        stats.chunks.clear()
    return _VocabParallelDivergence.apply(student_logits, teacher_logits, spec, tp_group, stats)
