// Decode attention over the paged KV cache: one query per sequence, its keys and values read
// straight from the f16 slabs through the sequence's block table (no gather, no padding).
// Each (sequence, head) is computed on its own, in one fixed order, so a sequence's output does
// not depend on which other sequences share the step (batch invariance). Scores and the softmax
// in float32: per task of up to SPLIT positions two passes (max, then exp-sum and the weighted
// sum of values), the tasks of a sequence's head then combined in position order. The (sequence,
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
constexpr int64_t SPLIT = 256;  // positions per task (a fixed split: results never depend on it varying)

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

// x[j] = e^(x[j] − top) for j < n; returns their sum (the vectorized exp of common.h).
float exp_shifted(float* x, int64_t n, float top) {
  int64_t j = 0;
  float sum = 0.f;
#if TQ_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = tq::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) sum += v;
#endif
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - top));
  return sum;
}

// s[j] = scale · q·k_j for the L keys (rows of D floats at k): 8 keys at a time share the
// loads of q, and their 8 sums are reduced together (hadd tree) instead of one by one.
void key_scores(const float* q, const float* k, int64_t L, int64_t D, float scale, float* s) {
  int64_t j = 0;
#if PA_AVX2
  if (D % 8 == 0) {
    const __m256 vs = _mm256_set1_ps(scale);
    for (; j + 8 <= L; j += 8) {
      __m256 acc[8];
      for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
      for (int64_t c = 0; c < D; c += 8) {
        const __m256 qc = _mm256_loadu_ps(q + c);
        for (int p = 0; p < 8; ++p)
          acc[p] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + (j + p) * D + c), acc[p]);
      }
      const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                                       _mm256_permute2f128_ps(s0, s1, 0x31));  // key j + p in lane p
      _mm256_storeu_ps(s + j, _mm256_mul_ps(vs, sum));
    }
  }
#endif
  for (; j < L; ++j) s[j] = scale * dot(q, k + j * D, D);
}

// o (Dv) = Σ_j w[j] · v_j over L rows of Dv floats: 64 outputs at a time stay in registers
// across all L rows (one load and fma per 8 of them per row, no load/store of o per row).
void weighted_sum(const float* w, const float* v, int64_t L, int64_t Dv, float* o) {
  int64_t c0 = 0;
#if PA_AVX2
  for (; c0 + 64 <= Dv; c0 += 64) {
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(o + c0 + 8 * c);
    for (int64_t j = 0; j < L; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      for (int c = 0; c < 8; ++c)
        acc[c] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + j * Dv + c0 + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + c0 + 8 * c, acc[c]);
  }
#endif
  if (c0 < Dv)
    for (int64_t j = 0; j < L; ++j)
      for (int64_t i = c0; i < Dv; ++i) o[i] += w[j] * v[j * Dv + i];
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
                                     int64_t window, c10::optional<torch::Tensor> sinks) {
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
  // sinks (H,) f32 (gpt-oss): one more logit per head in the softmax's denominator
  const torch::Tensor sink = sinks.has_value() ? sinks->contiguous() : torch::Tensor();
  TORCH_CHECK(!sink.defined() || (sink.numel() == H && sink.scalar_type() == torch::kFloat32),
              "sinks must be (H,) float32");
  const float* ps = sink.defined() ? sink.data_ptr<float>() : nullptr;
  auto out = torch::zeros({B, H * Dv}, q.options());
  const float* pq = q.data_ptr<float>();
  const at::Half* pk = k_slab.data_ptr<at::Half>();
  const at::Half* pv = v_slab.data_ptr<at::Half>();
  float* po = out.data_ptr<float>();
  // Tasks: (sequence, KV head, SPLIT positions); each gives per query head its max score m,
  // Σ e^(s − m) and Σ e^(s − m)·v, combined afterwards in position order. The split is
  // fixed, so the result depends neither on the threads nor on the batch.
  struct Task { int64_t b, g, first, last; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = len[b], first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t s = first; s < n; s += SPLIT) tasks.push_back({b, g, s, std::min(n, s + SPLIT)});
  }
  const int64_t T = int64_t(tasks.size());
  std::vector<float> part_m(T * group), part_l(T * group), part_o(T * group * Dv, 0.f);
  tq::parallel_chunks(T, [&](int64_t t) {
    thread_local std::vector<float> kf, vf, scores;
    const Task& task = tasks[t];
    const int64_t L = task.last - task.first;
    kf.resize(L * D);
    vf.resize(L * Dv);
    scores.resize(L);
    for (int64_t p = task.first; p < task.last; ++p) {
      const int64_t slot = int64_t(tab[task.b * max_blocks + p / PAGE]) * PAGE + p % PAGE;
      to_float(pk + (slot * Hkv + task.g) * D, kf.data() + (p - task.first) * D, D);
      to_float(pv + (slot * Hkv + task.g) * Dv, vf.data() + (p - task.first) * Dv, Dv);
    }
    for (int64_t hh = 0; hh < group; ++hh) {
      const float* qh = pq + (task.b * H + task.g * group + hh) * D;
      key_scores(qh, kf.data(), L, D, float(scale), scores.data());
      float top = -INFINITY;
      for (int64_t j = 0; j < L; ++j) top = std::max(top, scores[j]);
      const float sum = exp_shifted(scores.data(), L, top);  // scores[j] = e^(s_j − top)
      weighted_sum(scores.data(), vf.data(), L, Dv, part_o.data() + (t * group + hh) * Dv);
      part_m[t * group + hh] = top;
      part_l[t * group + hh] = sum;
    }
  });
  for (int64_t t0 = 0; t0 < T;) {  // the tasks of one (sequence, KV head) are consecutive
    int64_t t1 = t0 + 1;
    while (t1 < T && tasks[t1].b == tasks[t0].b && tasks[t1].g == tasks[t0].g) ++t1;
    for (int64_t hh = 0; hh < group; ++hh) {
      float top = -INFINITY, total = 0.f;
      for (int64_t t = t0; t < t1; ++t) top = std::max(top, part_m[t * group + hh]);
      float* oh = po + tasks[t0].b * H * Dv + (tasks[t0].g * group + hh) * Dv;
      for (int64_t t = t0; t < t1; ++t) {
        const float w = std::exp(part_m[t * group + hh] - top);
        total += w * part_l[t * group + hh];
        axpy(w, part_o.data() + (t * group + hh) * Dv, oh, Dv);
      }
      if (ps) total += std::exp(ps[tasks[t0].g * group + hh] - top);  // e^(sink − top)
      for (int64_t i = 0; i < Dv; ++i) oh[i] /= total;
    }
    t0 = t1;
  }
  return out;
}

// k (T, Hkv, D) f32, v (T, Hkv, Dv) f32 → rows slots[t] of k_slab (slots, Hkv, D) and v_slab
// (slots, Hkv, Dv) f16, rounded to nearest even (torch's .to(float16)); a negative slot skips
// its row. One call for both, where torch's index_copy_ takes a conversion and a scatter each.
void kv_write_f16(torch::Tensor k, torch::Tensor v, torch::Tensor k_slab, torch::Tensor v_slab,
                  torch::Tensor slots) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, "k and v must be (T, Hkv, D) float32");
  TORCH_CHECK(k_slab.scalar_type() == torch::kHalf && v_slab.scalar_type() == torch::kHalf &&
              k_slab.is_contiguous() && v_slab.is_contiguous() && k_slab.dim() == 3 &&
              v_slab.dim() == 3, "k/v slabs must be contiguous float16 (slots, Hkv, D)");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == torch::kInt64, "slots must be (T,) int64");
  k = k.contiguous();
  v = v.contiguous();
  slots = slots.contiguous();
  const int64_t T = k.size(0), kd = k.size(1) * k.size(2), vd = v.size(1) * v.size(2);
  const int64_t rows = k_slab.size(0);
  TORCH_CHECK(v.size(0) == T && slots.size(0) == T, "k, v and slots need the same length");
  TORCH_CHECK(k_slab.size(1) * k_slab.size(2) == kd && v_slab.size(1) * v_slab.size(2) == vd &&
              v_slab.size(0) == rows, "k/v rows do not match the slabs' (Hkv, D)");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(s[t] < rows, "slot ", s[t], " is outside the slab of ", rows, " slots");
  const float* pk = k.data_ptr<float>();
  const float* pv = v.data_ptr<float>();
  at::Half* dk = k_slab.data_ptr<at::Half>();
  at::Half* dv = v_slab.data_ptr<at::Half>();
  for (int64_t t = 0; t < T; ++t) {
    if (s[t] < 0) continue;
    for (int64_t i = 0; i < kd; ++i) dk[s[t] * kd + i] = at::Half(pk[t * kd + i]);
    for (int64_t i = 0; i < vd; ++i) dv[s[t] * vd + i] = at::Half(pv[t * vd + i]);
  }
}

}  // namespace

void register_paged_attention(pybind11::module& m) {
  m.def("kv_write_f16", &kv_write_f16, "k/v rows (float32) into f16 slabs at their slots",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per sequence over its f16 KV pages (block tables), batch-invariant",
        py::arg("q"), py::arg("k_slab"), py::arg("v_slab"), py::arg("tables"), py::arg("lengths"),
        py::arg("scale"), py::arg("window"), py::arg("sinks") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
