"""The divergence math as pure tensor functions: no process groups, no autograd.Function.

Notation, per token (a row): `ls = log p_s`, `lt = log p_t` (log-probabilities, already divided by
the temperature and normalised), `P_s = exp(ls)`, `P_t = exp(lt)`. A divergence is a sum over an
index set I of elementwise terms f(ls_i, lt_i); its gradient with respect to the student's
log-probabilities is the elementwise g(ls_i, lt_i) = df/dls_i:

    reverse_kl   f = P_s (ls - lt)                                  g = P_s (ls - lt + 1)
    forward_kl   f = P_t (lt - ls)                                  g = -P_t
    jsd (beta)   m = beta P_t + (1 - beta) P_s                       g = (1 - beta) P_s (ls - log m)
                 f = beta P_t (lt - log m) + (1 - beta) P_s (ls - log m)

The chain rule back to the (temperature-scaled) student logits `a` then depends only on how `ls`
was normalised (`logit_grad_coefficients`). Two families of functions live here:

* small-tensor functions (`terms`, `student_grad`, ...) for the top-k path, which works on
  `[c, K]` tensors gathered at the selected indices (K = k or 2k);
* full-shard "chunk kernels" (`exact_chunk_value`, `exact_chunk_grad`) for the exact path. They
  work on two fp32 `[c, v/tp]` buffers, `ls` and `d = ls - lt`, and overwrite them in place, so
  that only jsd's forward needs a third vocabulary-sized buffer (docs/losses.md).

The jsd convention is TRL's `generalized_jsd_loss` (GKD, Agarwal et al. 2024): beta weighs the
teacher in the mixture; the formula is identically zero at beta = 0 and 1, where TRL (and this
package, see `divergence.py`) switch to forward KL and reverse KL respectively.
"""

from __future__ import annotations

import math

import torch

KINDS = ("reverse_kl", "forward_kl", "jsd")


# --------------------------------------------------------------------------------------------
# Log-sum-exp partials: each rank reduces its own vocabulary shard to (max, sum exp(x - max)).
# --------------------------------------------------------------------------------------------


def lse_partials(z: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(m, s)` with `m = max_j z_j` and `s = sum_j exp((z_j - m) / T)` per row of `z` `[c, n]`.

    `z` is an fp32 scratch copy of the raw logits and is destroyed (it holds the exponentials
    afterwards), so no second `[c, n]` buffer is needed. The maximum is subtracted before the
    division by T: `z - m` is small for the tokens that matter, so rounding stays relative to it.
    An empty shard (n = 0: a rank holding only vocabulary padding) gives `m = -inf, s = 0`, the
    neutral element of `merge_lse`.
    """
    if z.shape[-1] == 0:
        return z.new_full(z.shape[:-1], -math.inf), z.new_zeros(z.shape[:-1])
    m = z.amax(dim=-1)  # [c]
    z.sub_(m.unsqueeze(-1))  # in place: z is the caller's scratch buffer
    if temperature != 1.0:
        z.div_(temperature)
    return m, z.exp_().sum(dim=-1)


def merge_lse(m: torch.Tensor, s: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-sum-exp of `z / T` over the whole vocabulary from per-shard partials `m, s` `[tp, c]`.

    The online-softmax merge, in fp64: `log Z = M / T + log sum_r s_r exp((m_r - M) / T)` with
    `M = max_r m_r`; shards with `m_r = -inf` (no valid entries) contribute `0 * 0 = 0`.
    """
    m, s = m.double(), s.double()
    big = m.amax(dim=0)  # [c]
    scale = torch.exp((m - big) / temperature)  # [tp, c]; exp(-inf) = 0 for empty shards
    return big / temperature + torch.log((s * scale).sum(dim=0))


# --------------------------------------------------------------------------------------------
# Top-k selection over candidates gathered from all ranks.
# --------------------------------------------------------------------------------------------


TIE_BLOCK_ROWS = 64
"""Rows per block when `local_topk` repairs a tie at the k-th value (bounds its temporaries)."""


def local_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k)` per row of `[c, n]`, with ties at the k-th value going to the lower column.

    `torch.topk` picks arbitrarily among entries equal to the k-th value (the CPU kernel does;
    bf16 logits tie often). Taking k + 1 values shows which rows have such a tie across the
    boundary; only those are repaired, a block of rows at a time: every entry above the k-th
    value stays, and the remaining slots go to the lowest columns equal to it.

    On the CPU in fp32 with one thread, the C++ kernel `native.topk_rows` (a custom op) applies the same rule in one
    pass (4x faster at [512, 8192], k = 256); it returns the entries in column order, this function
    in no promised order (callers treat the result as a set).
    """
    if x.device.type == "cpu" and 0 < k < x.shape[-1]:
        from megatron_opcd import native

        if native.topk_supports(x, k):
            return native.topk_rows(x, k)
        native.announce_fallback()  # says once why, when the kernels cannot run here
    if k == 0 or k == x.shape[-1]:
        return x.topk(k, dim=-1, sorted=False)
    vals, idx = x.topk(k + 1, dim=-1)  # [c, k + 1], sorted: the k-th and (k+1)-th are adjacent
    bad = (vals[:, k - 1] == vals[:, k]).nonzero().squeeze(-1)
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    kth = vals[:, k - 1 :]  # [c, 1]
    for lo in range(0, bad.numel(), TIE_BLOCK_ROWS):
        rows = bad[lo : lo + TIE_BLOCK_ROWS]
        xr, kr, vr, ir = x[rows], kth[rows], vals[rows], idx[rows]
        above = vr > kr  # [r, k]: these stay
        n_above = above.sum(dim=-1, keepdim=True)
        # Above-threshold entries first (stable: keep their order), then the tied slots.
        order = (~above).to(torch.int8).argsort(dim=-1, stable=True)
        ir = ir.gather(-1, order)
        # The k lowest columns equal to the k-th value: largest of (n - col) where tied, 0 elsewhere.
        cols = torch.arange(x.shape[-1], 0, -1, device=x.device)
        lowest = torch.where(xr == kr, cols, 0).topk(k, dim=-1).indices  # sorted: lowest col first
        slot = torch.arange(k, device=x.device).expand_as(ir)
        tied = lowest.gather(-1, (slot - n_above).clamp(min=0))
        ir = torch.where(slot < n_above, ir, tied)
        idx[rows], vals[rows] = ir, xr.gather(-1, ir)
    return vals, idx


def select_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """The global indices of the k largest `values` per row, ties broken by lower global index.

    `values`, `indices`: `[c, n]` candidates (every rank's local top-k, concatenated; the indices
    of one row are distinct). The rule is deterministic and every rank applies it to the same
    gathered candidates, so all ranks select the same set. Returns `[c, k]` int64 (the candidates
    as they are when there are exactly k: one rank's top-k, already chosen by the same rule).
    """
    if indices.shape[-1] == k:
        return indices
    by_index = indices.argsort(dim=-1)  # indices are distinct: no ties, any sort is exact
    indices = indices.gather(-1, by_index)
    values = values.gather(-1, by_index)
    # A stable descending sort keeps equal values in ascending index order.
    order = values.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return indices.gather(-1, order)


def union_indices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of two index sets per row as a `[c, ka + kb]` list plus a `valid` mask.

    Sizes of the union vary per row, so duplicates stay in the list and are masked out: after
    sorting, an entry equal to its left neighbour is a duplicate.
    """
    idx = torch.cat([a, b], dim=-1).sort(dim=-1).values
    valid = torch.ones_like(idx, dtype=torch.bool)
    valid[:, 1:] = idx[:, 1:] != idx[:, :-1]
    return idx, valid


def masked_log_normalize(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`x - logsumexp(x over valid entries)`: log-probabilities renormalised over the index set."""
    lse = torch.logsumexp(x.masked_fill(~valid, -math.inf), dim=-1, keepdim=True)
    return x - lse


# --------------------------------------------------------------------------------------------
# Elementwise terms on small [c, K] tensors (top-k path). fp64 in practice.
# --------------------------------------------------------------------------------------------


def _log_mixture(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """`log(beta P_t + (1 - beta) P_s)`, computed in log space; 0 < beta < 1."""
    return torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))


def terms(kind: str, ls: torch.Tensor, lt: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The elementwise divergence terms f (see the module docstring); sum them over I."""
    if kind == "reverse_kl":
        return ls.exp() * (ls - lt)
    if kind == "forward_kl":
        return lt.exp() * (lt - ls)
    if kind == "jsd":
        lm = _log_mixture(ls, lt, beta)
        return beta * lt.exp() * (lt - lm) + (1 - beta) * ls.exp() * (ls - lm)
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def student_grad(kind: str, ls: torch.Tensor, lt: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """g = d f / d ls, elementwise (see the module docstring)."""
    if kind == "reverse_kl":
        return ls.exp() * (ls - lt + 1)
    if kind == "forward_kl":
        return -lt.exp()
    if kind == "jsd":
        return (1 - beta) * ls.exp() * (ls - _log_mixture(ls, lt, beta))
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def logit_grad_coefficients(
    g: torch.Tensor, ls: torch.Tensor, valid: torch.Tensor, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rule from d/d ls_i (i in I) to the student's scaled logits a_j, for every j.

    With `ls_i = a_i - logZ` (full-vocabulary softmax), `dL/da_j = g_j [j in I] - p_s(j) G`,
    `G = sum_I g`: a sparse part on I plus `-G` times the full softmax. Renormalised over I,
    `ls_i = a_i - logsumexp_I a`, so `dL/da_j = [j in I] (g_j - q_s(j) G)` and nothing outside I.
    Returns `(coef_I [c, K], coef_full [c])` with `dL/da_j = coef_I[j] - coef_full p_s(j)`.
    """
    g = g.masked_fill(~valid, 0.0)
    total = g.sum(dim=-1)  # [c]
    if renormalize:
        coef = (g - ls.exp() * total.unsqueeze(-1)).masked_fill(~valid, 0.0)
        return coef, torch.zeros_like(total)
    return g, total


# --------------------------------------------------------------------------------------------
# Full-shard chunk kernels (exact path). ls, d: fp32 [c, n] buffers, overwritten in place.
# --------------------------------------------------------------------------------------------


ROWDOT_BLOCK = 4096
"""Columns per block in `rowdot`: its fp64 temporaries are `[c, ROWDOT_BLOCK]`, a fraction of a
vocabulary shard."""


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`(x * y).sum(-1)` in fp64 `[c]` for fp32 `[c, n]`, a block of columns at a time.

    fp32 x fp32 products are exact in fp64 and the sum is accumulated in fp64, so the only rounding
    left is that of the fp32 factors; temporaries are `[c, ROWDOT_BLOCK]`, never `[c, n]`.
    """
    out = x.new_zeros(x.shape[0], dtype=torch.float64)
    for lo in range(0, x.shape[-1], ROWDOT_BLOCK):
        hi = lo + ROWDOT_BLOCK
        out += (x[:, lo:hi].double() * y[:, lo:hi].double()).sum(dim=-1)
    return out


def exact_chunk_value(
    kind: str, ls: torch.Tensor, d: torch.Tensor, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum_j f_j, sum_j g_j)` per row over this shard's columns. Destroys `ls` and `d`.

    `ls = log p_s` and `d = ls - lt` (computed from `z_s - z_t`, not as a difference of two
    rounded log-probabilities). `sum g` is only needed by jsd's backward (for the KLs the
    gradient has a closed form), so it is zeros for the KLs. jsd needs a third `[c, n]` buffer.
    """
    zeros = ls.new_zeros(ls.shape[0], dtype=torch.float64)
    if kind == "reverse_kl":
        return rowdot(ls.exp_(), d), zeros  # sum P_s (ls - lt)
    if kind == "forward_kl":
        return -rowdot(ls.sub_(d).exp_(), d), zeros  # ls <- P_t in place; -sum P_t (ls - lt)
    if kind == "jsd":
        # With u = ls - log m = -logaddexp(log(1-beta), log(beta) - d) and lt - log m = u - d:
        #   f = beta P_t (u - d) + (1-beta) P_s u,   g = (1-beta) P_s u.
        # Never factor P_s out of the teacher's term: P_s underflows where P_t does not.
        pt = torch.sub(ls, d).exp_()  # the third buffer
        pt_d = rowdot(pt, d)
        _u_in_place(d, beta)
        pt_u = rowdot(pt, d)
        del pt
        ps_u = rowdot(ls.exp_(), d)
        return beta * (pt_u - pt_d) + (1 - beta) * ps_u, (1 - beta) * ps_u
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def _u_in_place(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d <- u = ls - log m = -logaddexp(log(1-beta), log(beta) - d), in place (a scratch buffer)."""
    d.neg_().add_(math.log(beta))
    torch.logaddexp(d, d.new_tensor(math.log1p(-beta)), out=d)
    return d.neg_()


def exact_chunk_grad(
    kind: str,
    ls: torch.Tensor,
    d: torch.Tensor,
    value: torch.Tensor,
    g_sum: torch.Tensor,
    beta: float = 0.5,
) -> torch.Tensor:
    """dL/da over this shard's columns for the exact divergence, in `ls`'s storage.

    `ls = log p_s`, `d = ls - lt` (both destroyed); `value` (the divergence) and `g_sum` (sum of g
    over the vocabulary) are the per-row scalars of the forward. Closed forms with the softmax over
    the whole vocabulary: reverse `P_s (d - KL)`, forward `P_s - P_t`, jsd `P_s ((1-beta) u - G)`.
    """
    if kind == "reverse_kl":
        return ls.exp_().mul_(d.sub_(value.unsqueeze(-1)))
    if kind == "forward_kl":
        d.neg_().add_(ls).exp_()  # d <- P_t = exp(ls - d), in place
        return ls.exp_().sub_(d)
    if kind == "jsd":
        _u_in_place(d, beta).mul_(1 - beta).sub_(g_sum.unsqueeze(-1))
        return ls.exp_().mul_(d)
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
