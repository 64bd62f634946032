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
  work on two fp32 `[c, v/tp]` buffers and overwrite them in place, so that the KLs never need a
  third vocabulary-sized buffer (jsd's forward needs a transient third; docs/losses.md).

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


def lse_partials(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(m, s)` with `m = max_j x_j` and `s = sum_j exp(x_j - m)` per row of `x` `[c, n]`.

    Destroys `x` (it holds `exp(x - m)` afterwards): the caller's buffer is reused rather than a
    second `[c, n]` one allocated. An empty shard (n = 0, a rank holding only vocabulary padding)
    gives `m = -inf, s = 0`, the neutral element of `merge_lse`.
    """
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf), x.new_zeros(x.shape[:-1])
    m = x.amax(dim=-1)  # [c]
    x.sub_(m.unsqueeze(-1)).exp_()  # in place: x is a scratch buffer the caller gave up
    return m, x.sum(dim=-1)


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over the whole vocabulary from per-shard partials `m, s` `[tp, c]` -> `[c]`.

    The online-softmax merge: `log Z = M + log sum_r s_r exp(m_r - M)` with `M = max_r m_r`;
    shards with `m_r = -inf` (no valid entries) contribute `0 * 0 = 0`.
    """
    big = m.amax(dim=0)  # [c]
    scale = torch.exp(m - big)  # [tp, c]; exp(-inf) = 0 for empty shards
    return big + torch.log((s * scale).sum(dim=0))


# --------------------------------------------------------------------------------------------
# Top-k selection over candidates gathered from all ranks.
# --------------------------------------------------------------------------------------------


def select_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """The global indices of the k largest `values` per row, ties broken by lower global index.

    `values`, `indices`: `[c, n]` candidates (every rank's local top-k, concatenated; the indices
    of one row are distinct). The rule is deterministic and every rank applies it to the same
    gathered candidates, so all ranks select the same set. Returns `[c, k]` int64.
    """
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
# Full-shard chunk kernels (exact path). ls, lt: fp32 [c, n] buffers, overwritten in place.
# --------------------------------------------------------------------------------------------


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`(x * y).sum(-1)` for `[c, n]` without the `[c, n]` product temporary (a batched matmul)."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(x.shape[0])


def exact_chunk_value(
    kind: str, ls: torch.Tensor, lt: torch.Tensor, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum_j f_j, sum_j g_j)` per row over this shard's columns. Destroys `ls` and `lt`.

    `sum g` is only needed by jsd's backward (for the KLs it is known in closed form), so it is
    returned as zeros for the KLs.
    """
    zeros = ls.new_zeros(ls.shape[0])
    if kind == "reverse_kl":
        lt.neg_().add_(ls)  # lt <- ls - lt, in place: no third buffer
        return rowdot(ls.exp_(), lt), zeros
    if kind == "forward_kl":
        ls.neg_().add_(lt)  # ls <- lt - ls
        return rowdot(lt.exp_(), ls), zeros
    if kind == "jsd":
        # Expand f with a = log((1-beta) P_s), b = log(beta P_t), lm = log m = logaddexp(a, b):
        #   f = e^b (b - log beta) + e^a (a - log(1-beta)) - e^lm lm,   g = e^a (a - log(1-beta) - lm).
        # Each exp() below is a transient third [c, n] buffer, freed before the next one.
        la, lb = math.log1p(-beta), math.log(beta)
        ls.add_(la)  # ls <- a, in place
        lt.add_(lb)  # lt <- b, in place
        e = lt.exp()
        part_t = rowdot(e, lt) - lb * e.sum(dim=-1)
        e = ls.exp()
        part_s = rowdot(e, ls) - la * e.sum(dim=-1)
        del e
        torch.logaddexp(ls, lt, out=lt)  # lt <- lm, in place
        part_m = rowdot(lt.exp(), lt)
        lt.neg_().add_(ls).sub_(la)  # lt <- a - log(1-beta) - lm
        g_sum = rowdot(ls.exp_(), lt)
        return part_t + part_s - part_m, g_sum
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def exact_chunk_grad(
    kind: str,
    ls: torch.Tensor,
    lt: torch.Tensor,
    value: torch.Tensor,
    g_sum: torch.Tensor,
    beta: float = 0.5,
) -> torch.Tensor:
    """dL/da over this shard's columns for the exact divergence; returns `ls`'s storage.

    `value` (the full divergence) and `g_sum` (sum of g over the vocabulary) are the per-row
    scalars from the forward. Closed forms (softmax over the whole vocabulary, `G = sum g`):
    reverse `P_s (ls - lt - KL)`, forward `P_s - P_t`, jsd `g - P_s G`.
    """
    if kind == "reverse_kl":
        lt.neg_().add_(ls).sub_(value.unsqueeze(-1))  # lt <- ls - lt - KL
        return ls.exp_().mul_(lt)
    if kind == "forward_kl":
        return ls.exp_().sub_(lt.exp_())
    if kind == "jsd":
        la, lb = math.log1p(-beta), math.log(beta)
        ls.add_(la)  # ls <- a = log((1-beta) P_s)
        lt.add_(lb)
        torch.logaddexp(ls, lt, out=lt)  # lt <- log m
        lt.neg_().add_(ls).sub_(la)  # lt <- ls - log m
        ls.exp_()  # (1-beta) P_s
        lt.mul_(ls)  # g
        return lt.sub_(ls.mul_(g_sum.unsqueeze(-1) / (1 - beta)))
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
