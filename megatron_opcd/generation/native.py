"""A CPU kernel for the decode step's matmuls: a few rows of activations times a weight matrix.

At 8 rows (a decode step of 8 sequences) MKL's sgemm, whichever layout and packing it is given,
streams a 28M-parameter model's weights at ~6.5 GB/s on one core, a third of what the core reads
(docs/generation.md). `linear_rows` computes `y = x @ w.T` for `x` `[M <= 8, K]` and the weight
in its own `[N, K]` layout: each weight row is read once, contiguously, and dotted with the M
activation rows (AVX2 FMA, fp32 accumulation in 8 lanes, then a horizontal sum). Used for 2 to 8
rows (one row is a matrix-vector product MKL streams as fast). Measured on the 2-core CPU box,
one thread: the 33 decode matmuls of the 28M benchmark model 17.7 -> 11.7 ms, the 17 of the 5M
model 4.1 -> 2.6 ms (medians; weights cycled through memory as in a decode step); errors against
float64 no larger than MKL's.

The C source below is compiled once with the system C compiler (`$CC`, else `gcc`/`cc`) into a
cache folder (`$OPCD_CACHE_DIR`, else `$XDG_CACHE_HOME/megatron_opcd`, else
`~/.cache/megatron_opcd`; a temporary folder if none is writable; a folder not owned by this user
or writable by others is passed over), named by a hash of the source and flags, written
atomically, and loaded with ctypes. `native_status()` says whether it can run and why not: no
AVX2/FMA, no compiler, a failed build, or `OPCD_CPU_KERNEL=0`. Callers fall back to torch
matmuls and `announce_fallback` says so once per process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MAX_ROWS = 8
"""Rows per call: the kernel keeps one 8-lane accumulator per row in AVX2's 16 registers."""
MIN_ROWS = 2
"""One row (batch 1) is a matrix-vector product that MKL streams as fast (7.2 vs 7.4 ms for the
28M model's decode matmuls): it keeps its `[in, out]` copies there (kernels.InferenceLinear)."""

FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

/* y[m, n] = sum_k x[m, k] * w[n, k] for m < M <= 8 and n < N. x: rows ldx floats apart, each
   K contiguous floats; w: [N, K] contiguous; y: rows ldy floats apart. */
void opcd_linear_rows(const float *x, int64_t M, int64_t ldx, const float *w, int64_t N, int64_t K,
                      float *y, int64_t ldy) {
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t n = 0; n < N; ++n) {
        const float *wr = w + n * K;
        __m256 acc[8];
        for (int m = 0; m < 8; ++m) acc[m] = _mm256_setzero_ps();
        if (M == 8) { /* the common case, unrolled: one weight load feeds eight FMAs */
            for (int64_t k = 0; k < K8; k += 8) {
                __m256 wv = _mm256_loadu_ps(wr + k);
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 0 * ldx + k), wv, acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 1 * ldx + k), wv, acc[1]);
                acc[2] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 2 * ldx + k), wv, acc[2]);
                acc[3] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 3 * ldx + k), wv, acc[3]);
                acc[4] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 4 * ldx + k), wv, acc[4]);
                acc[5] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 5 * ldx + k), wv, acc[5]);
                acc[6] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 6 * ldx + k), wv, acc[6]);
                acc[7] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 7 * ldx + k), wv, acc[7]);
            }
        } else {
            for (int64_t k = 0; k < K8; k += 8) {
                __m256 wv = _mm256_loadu_ps(wr + k);
                for (int64_t m = 0; m < M; ++m)
                    acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m]);
            }
        }
        for (int64_t m = 0; m < M; ++m) {
            float s = hsum(acc[m]);
            for (int64_t k = K8; k < K; ++k) s += x[m * ldx + k] * wr[k]; /* K not a multiple of 8 */
            y[m * ldy + n] = s;
        }
    }
}
"""


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("OPCD_CACHE_DIR"):
        dirs.append(Path(os.environ["OPCD_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    dirs += [Path(base) / "megatron_opcd", Path(tempfile.gettempdir()) / f"megatron_opcd-{os.getuid()}"]
    return dirs


def _build(compiler: str) -> Path:
    """The shared library, compiled on first use and reused after (same source and flags)."""
    tag = hashlib.sha256((SOURCE + " ".join(FLAGS) + compiler).encode()).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        lib = folder / f"opcd_linear_rows-{tag}.so"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = folder.stat()
            if info.st_uid != os.getuid() or info.st_mode & 0o022:  # a library loaded from here runs as us
                raise OSError("not owned by this user, or writable by others")
            if lib.exists():
                return lib
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # several ranks may build at once
                src, out = Path(tmp) / "kernel.c", Path(tmp) / "kernel.so"
                src.write_text(SOURCE)
                run = subprocess.run([compiler, *FLAGS, "-o", str(out), str(src)], capture_output=True, text=True,
                                     timeout=120)
                if run.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-300:]}")
                os.replace(out, lib)  # atomic: a reader sees no library or a whole one
            return lib
        except OSError as exc:  # not writable: try the next folder
            errors.append(f"{folder}: {exc}")
    raise RuntimeError("no writable cache folder (" + "; ".join(errors) + ")")


@functools.lru_cache(maxsize=None)
def _library():
    """(ctypes function, None) or (None, why it cannot run)."""
    if os.environ.get("OPCD_CPU_KERNEL", "1") == "0":
        return None, "disabled by OPCD_CPU_KERNEL=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"this CPU has no AVX2/FMA (torch reports {capability})"
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        fn = ctypes.CDLL(str(_build(compiler))).opcd_linear_rows
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: fall back, with the reason
        return None, f"the kernel did not build or load ({type(exc).__name__}: {exc})"
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    return fn, None


def native_status() -> tuple[bool, str]:
    """(usable, reason): whether `linear_rows` can run in this process."""
    fn, why = _library()
    return fn is not None, why or "ok"


def supports(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_rows(x2d, weight)` applies: CPU fp32, MIN_ROWS to MAX_ROWS rows, rows with unit
    stride, a contiguous `[N, K]` weight, and one torch thread (the kernel runs on one core; with
    more threads MKL's parallel sgemm is the better choice)."""
    return (  # the row count first: it alone turns away prefill and batch-1 steps
        x2d.dim() == 2 and MIN_ROWS <= x2d.shape[0] <= MAX_ROWS and x2d.device.type == "cpu"
        and weight.device.type == "cpu" and x2d.dtype == torch.float32 and weight.dtype == torch.float32
        and x2d.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == x2d.shape[1]
        and not torch.is_grad_enabled() and torch.get_num_threads() == 1
    )


def linear_rows(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x2d @ weight.T`, `[M, K] x [N, K] -> [M, N]` fp32 (check `supports` first)."""
    fn, why = _library()
    if fn is None:
        raise RuntimeError(f"the CPU decode kernel is unavailable: {why}")
    m, k = x2d.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    fn(x2d.data_ptr(), m, x2d.stride(0), weight.data_ptr(), n, k, y.data_ptr(), n)
    return y


@functools.lru_cache(maxsize=None)
def announce_fallback() -> None:
    """Say once per process (rank 0) that decoding runs on torch matmuls, and why."""
    ok, why = native_status()
    if ok or os.environ.get("OPCD_QUIET") == "1":
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(f"[megatron-opcd] CPU decode kernel not used ({why}); decoding uses torch matmuls", file=sys.stderr,
          flush=True)
