"""Two CPU kernels in C: the decode step's matmuls, and the loss's top-k selection.

`linear_rows`: a few rows of activations times a weight matrix. At 8 rows (a decode step of 8
sequences) MKL's sgemm, whichever layout and packing it is given, streams a 28M-parameter
model's weights at ~6.5 GB/s on one core, a third of what the core reads (docs/generation.md).
`linear_rows` computes `y = x @ w.T` for `x` `[M <= 8, K]` and the weight in its own `[N, K]`
layout: each weight row is read once, contiguously, and dotted with the M activation rows (AVX2
FMA, fp32 accumulation in 8 lanes, then a horizontal sum). Used for 2 to 8 rows (one row is a
matrix-vector product MKL streams as fast). Measured on the 2-core CPU box, one thread: the 33
decode matmuls of the 28M benchmark model 17.7 -> 11.7 ms, the 17 of the 5M model 4.1 -> 2.6 ms
(medians; weights cycled through memory as in a decode step); errors against float64 no larger
than MKL's.

`topk_rows`: the k largest entries of each row, ties at the k-th value to the lower columns (the
rule `losses.functional.local_topk` implements on top of `torch.topk`), as a set in column order. A
radix select on order-preserving 32-bit keys of the floats (the top 11 bits counted in four
interleaved histograms, then the next 11 and the last 10 among the candidates of the chosen
bucket), then one collecting pass. [512, 8192] with k = 256, one thread: 47 -> 12 ms.

The C source below is compiled once with the system C compiler (`$CC`, else `gcc`/`cc`) into a
cache folder (`$OPCD_CACHE_DIR`, else `$XDG_CACHE_HOME/megatron_opcd`, else
`~/.cache/megatron_opcd`; a temporary folder if none is writable; a folder not owned by this user
or writable by others is passed over), named by a hash of the source and flags, written
atomically, and loaded with ctypes. `native_status()` says whether it can run and why not: no
AVX2/FMA, no compiler, a failed build, or `OPCD_CPU_KERNEL=0`. Callers fall back to torch
and `announce_fallback` says so once per process.
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
#include <stdlib.h>
#include <string.h>

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

static inline uint32_t key_of(float v) {
    v += 0.0f; /* -0.0 -> +0.0: torch orders the two zeros as equal */
    uint32_t u;
    memcpy(&u, &v, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* larger float, larger unsigned key */
}

/* The bucket (of nb, counted from the top) that holds the need-th largest key; *need becomes its
   rank inside that bucket. */
static inline uint32_t pick(const uint32_t *hist, uint32_t nb, int64_t *need) {
    uint32_t b = nb;
    int64_t cum = 0;
    while (b > 0) {
        --b;
        if (cum + hist[b] >= *need) break;
        cum += hist[b];
    }
    *need -= cum;
    return b;
}

/* For each of `rows` rows (ld floats apart, n contiguous floats): the columns of the k largest
   values, ties at the k-th value to the lowest columns, in ascending column order into
   idx[r * k ...], their values into val[r * k ...]. 1 <= k <= n. Returns 0, or -1 without memory. */
int opcd_topk_rows(const float *x, int64_t rows, int64_t ld, int64_t n, int64_t k, int64_t *idx, float *val) {
    uint32_t hist[2048], h4[4][2048];
    uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)n * 2);
    if (keys == NULL) return -1;
    uint32_t *cand = keys + n;
    const int64_t n4 = n & ~(int64_t)3;
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * ld;
        int64_t need = k;
        for (int64_t c = 0; c < n; ++c) keys[c] = key_of(xr[c]);
        memset(h4, 0, sizeof(h4));
        for (int64_t c = 0; c < n4; c += 4) { /* four counters: no store-to-load chain on one bucket */
            h4[0][keys[c] >> 21]++;
            h4[1][keys[c + 1] >> 21]++;
            h4[2][keys[c + 2] >> 21]++;
            h4[3][keys[c + 3] >> 21]++;
        }
        for (int64_t c = n4; c < n; ++c) h4[0][keys[c] >> 21]++;
        for (int b = 0; b < 2048; ++b) hist[b] = h4[0][b] + h4[1][b] + h4[2][b] + h4[3][b];
        const uint32_t b1 = pick(hist, 2048, &need);
        int64_t m = 0; /* the keys of bucket b1, branch-free */
        for (int64_t c = 0; c < n; ++c) {
            cand[m] = keys[c];
            m += (keys[c] >> 21) == b1;
        }
        memset(hist, 0, sizeof(hist));
        for (int64_t j = 0; j < m; ++j) hist[(cand[j] >> 10) & 2047]++;
        const uint32_t hi = (b1 << 11) | pick(hist, 2048, &need);
        memset(hist, 0, 1024 * sizeof(uint32_t));
        for (int64_t j = 0; j < m; ++j)
            if ((cand[j] >> 10) == hi) hist[cand[j] & 1023]++;
        const uint32_t t = (hi << 10) | pick(hist, 1024, &need);
        /* t is the k-th largest key: every larger key is taken, and `need` copies of t, lowest
           columns first */
        int64_t out = 0, ties = need;
        int64_t *ir = idx + r * k;
        float *vr = val + r * k;
        for (int64_t c = 0; c < n; ++c) {
            const uint32_t key = keys[c];
            if (key > t || (key == t && ties-- > 0)) {
                ir[out] = c;
                vr[out] = xr[c];
                ++out;
            }
        }
    }
    free(keys);
    return 0;
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
        lib = folder / f"opcd_kernels-{tag}.so"
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
    """(ctypes library, None) or (None, why it cannot run)."""
    if os.environ.get("OPCD_CPU_KERNEL", "1") == "0":
        return None, "disabled by OPCD_CPU_KERNEL=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"this CPU has no AVX2/FMA (torch reports {capability})"
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: fall back, with the reason
        return None, f"the kernels did not build or load ({type(exc).__name__}: {exc})"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.opcd_linear_rows.restype = None
    lib.opcd_linear_rows.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64]
    lib.opcd_topk_rows.restype = ctypes.c_int
    lib.opcd_topk_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
    return lib, None


def native_status() -> tuple[bool, str]:
    """(usable, reason): whether the kernels (`linear_rows`, `topk_rows`) can run in this process."""
    lib, why = _library()
    return lib is not None, why or "ok"


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


def _loaded():
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {why}")
    return lib


def linear_rows(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x2d @ weight.T`, `[M, K] x [N, K] -> [M, N]` fp32 (check `supports` first)."""
    m, k = x2d.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _loaded().opcd_linear_rows(x2d.data_ptr(), m, x2d.stride(0), weight.data_ptr(), n, k, y.data_ptr(), n)
    return y


def topk_supports(x: torch.Tensor, k: int) -> bool:
    """Whether `topk_rows(x, k)` applies: a CPU fp32 `[c, n]` with unit-stride rows, 1 <= k <= n,
    no autograd, one torch thread (torch.topk spreads rows over threads), and the kernels built."""
    return (
        x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(1) == 1
        and 1 <= k <= x.shape[1] and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1 and native_status()[0]
    )


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values `[c, k]` fp32, columns `[c, k]` int64) of the k largest entries of each row, ties at
    the k-th value to the lowest columns, in ascending column order (check `topk_supports`)."""
    c, n = x.shape
    idx = torch.empty(c, k, dtype=torch.int64)
    val = torch.empty(c, k, dtype=torch.float32)
    if c and _loaded().opcd_topk_rows(x.data_ptr(), c, x.stride(0), n, k, idx.data_ptr(), val.data_ptr()) != 0:
        raise MemoryError(f"topk_rows: no memory for the keys of a row of {n}")
    return val, idx


@functools.lru_cache(maxsize=None)
def announce_fallback() -> None:
    """Say once per process (rank 0) that the kernels cannot run, and why: decoding then runs on
    torch matmuls and the loss's top-k on torch.topk."""
    ok, why = native_status()
    if ok or os.environ.get("OPCD_QUIET") == "1":
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(f"[megatron-opcd] CPU kernels not used ({why}); decoding uses torch matmuls and the loss torch.topk",
          file=sys.stderr, flush=True)
