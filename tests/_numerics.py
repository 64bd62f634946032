"""Float32 comparisons with tolerances that follow the arithmetic (STYLE: tolerances are arithmetic).

Two float32 computations of one quantity in different summation orders (a KV cache against full
recomputation, AVX2 against AVX-512 kernels, a chunked against a whole reduction) differ by a
few units in the last place of the *largest* terms they summed, not of the result: a fixed
`atol` is machine-dependent (log-probs near -4.4 differed by 1.05e-5 on an AVX-512/AMX CPU).
"""

from __future__ import annotations

import torch


def assert_f32_close(got, ref, *, rel: float = 1e-5, msg=None) -> None:
    """|got - ref| <= rel x (|ref| + max |ref|): relative to each value and to the magnitude of the
    values compared (the scale their rounding errors come from). 1e-5 is ~80 float32 ulps: room
    for a few layers of reordered sums, far below what a wrong index or mask changes."""
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * scale, msg=msg)
