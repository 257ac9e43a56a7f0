// Decode attention over the paged KV cache: one query per sequence, its keys and values read
// straight from the f16 slabs through the sequence's block table (no gather, no padding).
// Each (sequence, head) is computed on its own, in one fixed order, so a sequence's output does
// not depend on which other sequences share the step (batch invariance). Scores and the softmax
// in float32, two passes (max, then exp-sum and the weighted sum of values). The (sequence,
// KV head) tasks run on the matmul kernel's thread pool (common.h): during a forward pass
// torch's own ops get one thread, so at::parallel_for would leave the other cores idle.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PA_AVX2 1
#else
#define PA_AVX2 0
#endif

namespace {

constexpr int64_t PAGE = 16;  // token slots per block (runtime/block_manager.py BLOCK_SIZE)

// n halves → floats
void to_float(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if PA_AVX2
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = float(src[i]);
}

float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if PA_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  sum = _mm_cvtss_f32(s);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy(float w, const float* x, float* y, int64_t n) {  // y += w · x
  int64_t i = 0;
#if PA_AVX2
  const __m256 vw = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

// q (B, H, D) f32; k_slab (slots, Hkv, D) f16; v_slab (slots, Hkv, Dv) f16; tables (B, max_blocks)
// int32; lengths (B,) int64 (the query stands at position length-1); window 0: none, else keys
// at distance ≥ window are masked (ggml's rule) → (B, H·Dv) f32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_slab, torch::Tensor v_slab,
                                     torch::Tensor tables, torch::Tensor lengths, double scale,
                                     int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32, "q must be (B, H, D) float32");
  TORCH_CHECK(k_slab.dim() == 3 && v_slab.dim() == 3 && k_slab.scalar_type() == torch::kHalf &&
              v_slab.scalar_type() == torch::kHalf && k_slab.is_contiguous() && v_slab.is_contiguous(),
              "k/v slabs must be contiguous float16 (slots, Hkv, D)");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == torch::kInt32, "tables must be (B, max_blocks) int32");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == torch::kInt64, "lengths must be (B,) int64");
  q = q.contiguous();
  tables = tables.contiguous();
  lengths = lengths.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t slots = k_slab.size(0), Hkv = k_slab.size(1), Dv = v_slab.size(2);
  TORCH_CHECK(k_slab.size(2) == D && v_slab.size(0) == slots && v_slab.size(1) == Hkv &&
              Hkv > 0 && H % Hkv == 0, "q and the k/v slabs do not match");
  TORCH_CHECK(tables.size(0) == B && lengths.size(0) == B, "tables and lengths need B rows");
  const int64_t group = H / Hkv, max_blocks = tables.size(1);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= max_blocks * PAGE, "length ", len[b], " of sequence ", b,
                " is outside its block table");
  const int32_t* tab = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < tables.numel(); ++i)
    TORCH_CHECK(tab[i] >= 0 && (tab[i] + 1) * PAGE <= slots, "block id ", tab[i], " is outside the slab");
  auto out = torch::zeros({B, H * Dv}, q.options());
  const float* pq = q.data_ptr<float>();
  const at::Half* pk = k_slab.data_ptr<at::Half>();
  const at::Half* pv = v_slab.data_ptr<at::Half>();
  float* po = out.data_ptr<float>();
  // one (sequence, kv head) per task: its keys and values are converted once for the group
  tq::parallel_chunks(B * Hkv, [&](int64_t task) {
    thread_local std::vector<float> kf, vf, scores;
    {
      const int64_t b = task / Hkv, g = task % Hkv, n = len[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0, L = n - first;
      kf.resize(L * D);
      vf.resize(L * Dv);
      scores.resize(L);
      for (int64_t p = first; p < n; ++p) {
        const int64_t slot = int64_t(tab[b * max_blocks + p / PAGE]) * PAGE + p % PAGE;
        to_float(pk + (slot * Hkv + g) * D, kf.data() + (p - first) * D, D);
        to_float(pv + (slot * Hkv + g) * Dv, vf.data() + (p - first) * Dv, Dv);
      }
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const float* qh = pq + (b * H + h) * D;
        float top = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          scores[j] = float(scale) * dot(qh, kf.data() + j * D, D);
          top = std::max(top, scores[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < L; ++j) sum += (scores[j] = std::exp(scores[j] - top));
        float* oh = po + b * H * Dv + h * Dv;
        for (int64_t j = 0; j < L; ++j) axpy(scores[j] / sum, vf.data() + j * Dv, oh, Dv);
      }
    }
  });
  return out;
}

}  // namespace

void register_paged_attention(pybind11::module& m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per sequence over its f16 KV pages (block tables), batch-invariant",
        py::call_guard<py::gil_scoped_release>());
}
