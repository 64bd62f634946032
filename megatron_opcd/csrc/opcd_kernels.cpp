// Two forward-only CPU kernels, registered as torch custom ops (torch.ops.opcd.*); built on first
// use by megatron_opcd/native.py through torch.utils.cpp_extension.load (docs/generation.md).
//
// linear_rows(x [M, K], weight [N, K]) -> x @ weight.T [M, N], for 1 <= M <= 8 rows (a decode
//   step's batch). Each weight row is read once, contiguously, and dotted with the M activation
//   rows: AVX2 FMA, fp32 accumulation in 8 lanes per row, then a horizontal sum. At 8 rows MKL's
//   sgemm streams the weights at about a third of what one core reads.
// topk_rows(x [C, N], k) -> (values [C, k], columns [C, k]): the k largest entries of each row,
//   ties at the k-th value to the lower columns, in ascending column order. A radix select on
//   order-preserving 32-bit keys of the floats (top 11 bits, next 11, last 10), then one
//   collecting pass.
//
// The ops check what the raw loops below assume (CPU, fp32, 2-D, unit-stride rows, a contiguous
// weight, matching shapes, row and k ranges) and fail with a message naming the argument; the
// Python side (native.supports / topk_supports) decides when they are worth calling.

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

constexpr int64_t kMaxRows = 8;  // one 8-lane accumulator per row fits AVX2's 16 registers

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// y[m, n] = sum_k x[m, k] * w[n, k] for m < M <= 8 and n < N. x: rows ldx floats apart, each K
// contiguous floats; w: [N, K] contiguous; y: rows ldy floats apart. noinline: inlined into the op
// (its tensor checks around it), GCC 12 vectorised the loops worse and the kernel ran up to 2x slower
// at 2-4 rows (measured against the same loops compiled alone).
__attribute__((noinline)) void linear_rows_kernel(const float* x, int64_t M, int64_t ldx, const float* w, int64_t N, int64_t K, float* y,
                        int64_t ldy) {
  const int64_t K8 = K & ~static_cast<int64_t>(7);
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = w + n * K;
    __m256 acc[kMaxRows];
    for (int m = 0; m < kMaxRows; ++m) acc[m] = _mm256_setzero_ps();
    if (M == 8) {  // the common case, unrolled: one weight load feeds eight FMAs
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
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = hsum(acc[m]);
      for (int64_t k = K8; k < K; ++k) s += x[m * ldx + k] * wr[k];  // K not a multiple of 8
      y[m * ldy + n] = s;
    }
  }
}

inline uint32_t key_of(float v) {
  v += 0.0f;  // -0.0 -> +0.0: torch orders the two zeros as equal
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // larger float, larger unsigned key
}

// The bucket (of nb, counted from the top) that holds the need-th largest key; *need becomes its
// rank inside that bucket.
inline uint32_t pick(const uint32_t* hist, uint32_t nb, int64_t* need) {
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

// For each of `rows` rows (ld floats apart, n contiguous floats): the columns of the k largest
// values, ties at the k-th value to the lowest columns, in ascending column order into
// idx[r * k ...], their values into val[r * k ...]. 1 <= k <= n. noinline: as linear_rows_kernel.
__attribute__((noinline)) void topk_rows_kernel(const float* x, int64_t rows, int64_t ld, int64_t n, int64_t k, int64_t* idx, float* val) {
  uint32_t hist[2048], h4[4][2048];
  std::vector<uint32_t> buffer(static_cast<size_t>(n) * 2);  // throws std::bad_alloc, which torch reports
  uint32_t* keys = buffer.data();
  uint32_t* cand = keys + n;
  const int64_t n4 = n & ~static_cast<int64_t>(3);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    int64_t need = k;
    for (int64_t c = 0; c < n; ++c) keys[c] = key_of(xr[c]);
    std::memset(h4, 0, sizeof(h4));
    for (int64_t c = 0; c < n4; c += 4) {  // four counters: no store-to-load chain on one bucket
      h4[0][keys[c] >> 21]++;
      h4[1][keys[c + 1] >> 21]++;
      h4[2][keys[c + 2] >> 21]++;
      h4[3][keys[c + 3] >> 21]++;
    }
    for (int64_t c = n4; c < n; ++c) h4[0][keys[c] >> 21]++;
    for (int b = 0; b < 2048; ++b) hist[b] = h4[0][b] + h4[1][b] + h4[2][b] + h4[3][b];
    const uint32_t b1 = pick(hist, 2048, &need);
    int64_t m = 0;  // the keys of bucket b1, branch-free
    for (int64_t c = 0; c < n; ++c) {
      cand[m] = keys[c];
      m += (keys[c] >> 21) == b1;
    }
    std::memset(hist, 0, sizeof(hist));
    for (int64_t j = 0; j < m; ++j) hist[(cand[j] >> 10) & 2047]++;
    const uint32_t hi = (b1 << 11) | pick(hist, 2048, &need);
    std::memset(hist, 0, 1024 * sizeof(uint32_t));
    for (int64_t j = 0; j < m; ++j)
      if ((cand[j] >> 10) == hi) hist[cand[j] & 1023]++;
    const uint32_t t = (hi << 10) | pick(hist, 1024, &need);
    // t is the k-th largest key: every larger key is taken, and `need` copies of t, lowest columns first
    int64_t out = 0, ties = need;
    int64_t* ir = idx + r * k;
    float* vr = val + r * k;
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t key = keys[c];
      if (key > t || (key == t && ties-- > 0)) {
        ir[out] = c;
        vr[out] = xr[c];
        ++out;
      }
    }
  }
}

// What both loops read: a CPU fp32 matrix whose rows are contiguous (any row stride), no autograd.
void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, "'s rows must be contiguous (stride 1 along ",
              "dim 1), got strides ", t.strides());
  TORCH_CHECK(!(at::GradMode::is_enabled() && t.requires_grad()), op, ": ", name,
              " requires grad: the kernel is forward-only (call it under torch.no_grad())");
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "opcd::linear_rows", "x");
  check_rows(weight, "opcd::linear_rows", "weight");
  TORCH_CHECK(weight.is_contiguous(), "opcd::linear_rows: weight must be a contiguous [N, K], got strides ",
              weight.strides());
  TORCH_CHECK(x.size(1) == weight.size(1), "opcd::linear_rows: x is [M, K] and weight [N, K] with the same K, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "opcd::linear_rows: x needs 1 to ", kMaxRows,
              " rows, got ", x.size(0));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  linear_rows_kernel(x.const_data_ptr<float>(), m, x.stride(0), weight.const_data_ptr<float>(), n, k,
                     y.mutable_data_ptr<float>(), n);
  return y;
}

std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k) {
  check_rows(x, "opcd::topk_rows", "x");
  const int64_t c = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "opcd::topk_rows: k must be in [1, ", n, "] (the row length), got ", k);
  at::Tensor val = at::empty({c, k}, x.options());
  at::Tensor idx = at::empty({c, k}, x.options().dtype(at::kLong));
  if (c > 0)
    topk_rows_kernel(x.const_data_ptr<float>(), c, x.stride(0), n, k, idx.mutable_data_ptr<int64_t>(),
                     val.mutable_data_ptr<float>());
  return {val, idx};
}

}  // namespace

TORCH_LIBRARY(opcd, m) {
  m.def("linear_rows(Tensor x, Tensor weight) -> Tensor");
  m.def("topk_rows(Tensor x, int k) -> (Tensor, Tensor)");
}

// CompositeExplicitAutograd: one kernel for every backend, so a CUDA tensor reaches the checks
// above and gets their message (not the dispatcher's); no autograd formula (forward-only).
TORCH_LIBRARY_IMPL(opcd, CompositeExplicitAutograd, m) {
  m.impl("linear_rows", &linear_rows);
  m.impl("topk_rows", &topk_rows);
}
