// Decode attention over the paged KV cache: one query per sequence, its keys and values read
// straight from the f16 slabs through the sequence's block table (no gather, no padding).
// Each (sequence, head) is computed on its own, in one fixed order, so a sequence's output does
// not depend on which other sequences share the step (batch invariance). Scores and the softmax
// in float32: per task of up to SPLIT positions two passes (the scores and their max, then
// exp-sum and the weighted sum of values), the tasks of a sequence's head then combined in
// position order. A task reads each f16 key and value row once for all the query heads of its
// KV head (GQA), converting in registers (no float copy of the rows). The (sequence,
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
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
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

void axpy(float w, const float* x, float* y, int64_t n) {  // y += w · x
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// What one task computes, for `nh` query heads of one KV head over L positions: the scaled
// scores s (nh rows of L) and, once s holds the softmax weights, o (nh rows of Dv) = Σ_j s_j·v_j.
// keys[j] and values[j] point at position j's f16 row for this KV head.

// The portable form: the task's rows converted to float first, then one head at a time.
void scores_plain(const float* q, const at::Half* const* keys, int64_t L, int64_t D, int64_t nh,
                  float scale, float* s, float* row) {
  for (int64_t j = 0; j < L; ++j) {
    to_float(keys[j], row, D);
    for (int64_t h = 0; h < nh; ++h) {
      float sum = 0.f;
      for (int64_t c = 0; c < D; ++c) sum += q[h * D + c] * row[c];
      s[h * L + j] = scale * sum;
    }
  }
}

void values_plain(const float* w, const at::Half* const* values, int64_t L, int64_t Dv, int64_t nh,
                  float* o, float* row) {
  std::fill(o, o + nh * Dv, 0.f);
  for (int64_t j = 0; j < L; ++j) {
    to_float(values[j], row, Dv);
    for (int64_t h = 0; h < nh; ++h) axpy(w[h * L + j], row, o + h * Dv, Dv);
  }
}

#if PA_AVX2
// The vector forms read each f16 key and value row once for the whole GQA group of query heads
// (converted in registers), in register tiles of HEADS heads × 4 keys (scores) and HEADS heads ×
// 4 vectors of columns (values). Lanes: 16 floats in the avx512vnni build, else 8.
struct Lanes : tq::Floats {  // AVX2: 16 registers hold 8 sums, 4 rows, a query, a spare
  static constexpr int HEADS = N == 16 ? 4 : 2;
};
using R = Lanes::R;

// s[h·L + j + x] for NH heads and NK keys from j: each key's lanes loaded once per NH heads.
// `next` (NK rows ahead, or -1): the key and value rows asked for while this tile runs, a line
// of each every 64 bytes of its keys it reads (a steady lead, not a burst per tile).
template <int NH, int NK>
void score_tile(const float* q, const at::Half* const* keys, const at::Half* const* values,
                int64_t j, int64_t next, int64_t L, int64_t D, int64_t Dv, float scale, float* s) {
  R acc[NH][NK];
  for (int h = 0; h < NH; ++h)
    for (int x = 0; x < NK; ++x) acc[h][x] = Lanes::zero();
  for (int64_t c = 0; c < D; c += Lanes::N) {
    if (next >= 0 && c % 32 == 0)
      for (int x = 0; x < NK; ++x) {
        _mm_prefetch(reinterpret_cast<const char*>(keys[next + x] + c), _MM_HINT_T0);
        if (c < Dv) _mm_prefetch(reinterpret_cast<const char*>(values[next + x] + c), _MM_HINT_T0);
      }
    R k[NK];
    for (int x = 0; x < NK; ++x) k[x] = Lanes::half(keys[j + x] + c);
    for (int h = 0; h < NH; ++h) {
      const R qh = Lanes::load(q + h * D + c);
      for (int x = 0; x < NK; ++x) acc[h][x] = Lanes::fma(qh, k[x], acc[h][x]);
    }
  }
  if (next >= 0)
    for (int64_t c = D; c < Dv; c += 32)  // value rows longer than key rows
      for (int x = 0; x < NK; ++x)
        _mm_prefetch(reinterpret_cast<const char*>(values[next + x] + c), _MM_HINT_T0);
  for (int h = 0; h < NH; ++h)
    for (int x = 0; x < NK; ++x) s[h * L + j + x] = scale * Lanes::sum(acc[h][x]);
}

// Keys (with their values) asked for ahead of the tile being computed: about 8 KiB, a multiple
// of the tile (2–32 KiB measured alike; none at all: 40% slower from RAM).
int64_t keys_ahead(int64_t D, int64_t Dv) {
  constexpr int64_t LEAD = 8192;
  return std::max<int64_t>(4, LEAD / (2 * (D + Dv)) / 4 * 4);
}

template <int NH>
void scores_tiled(const float* q, const at::Half* const* keys, const at::Half* const* values,
                  int64_t L, int64_t D, int64_t Dv, float scale, float* s) {
  const int64_t ahead = keys_ahead(D, Dv);
  for (int64_t a = 0; a < std::min(L, ahead); ++a)  // the first keys, before the lead is steady
    for (int64_t c = 0; c < D; c += 32) _mm_prefetch(reinterpret_cast<const char*>(keys[a] + c), _MM_HINT_T0);
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) {
    const int64_t next = j + ahead + 4 <= L ? j + ahead : -1;
    score_tile<NH, 4>(q, keys, values, j, next, L, D, Dv, scale, s);
  }
  for (; j < L; ++j) score_tile<NH, 1>(q, keys, values, j, -1, L, D, Dv, scale, s);
}

// o[h·Dv + c0 …] for NH heads and NC vectors of columns from c0, over all L positions.
template <int NH, int NC>
void value_tile(const float* w, const at::Half* const* values, int64_t L, int64_t Dv, int64_t c0,
                float* o) {
  R acc[NH][NC];
  for (int h = 0; h < NH; ++h)
    for (int x = 0; x < NC; ++x) acc[h][x] = Lanes::zero();
  for (int64_t j = 0; j < L; ++j) {
    R v[NC];
    for (int x = 0; x < NC; ++x) v[x] = Lanes::half(values[j] + c0 + x * Lanes::N);
    for (int h = 0; h < NH; ++h) {
      const R wh = Lanes::set1(w[h * L + j]);
      for (int x = 0; x < NC; ++x) acc[h][x] = Lanes::fma(wh, v[x], acc[h][x]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int x = 0; x < NC; ++x) Lanes::store(o + h * Dv + c0 + x * Lanes::N, acc[h][x]);
}

template <int NH>
void values_tiled(const float* w, const at::Half* const* values, int64_t L, int64_t Dv, float* o) {
  constexpr int64_t BLOCK = 4 * Lanes::N;
  int64_t c0 = 0;
  for (; c0 + BLOCK <= Dv; c0 += BLOCK) value_tile<NH, 4>(w, values, L, Dv, c0, o);
  for (; c0 < Dv; c0 += Lanes::N) value_tile<NH, 1>(w, values, L, Dv, c0, o);
}

// nh (≤ HEADS) heads: the tile templates by count.
void scores_vec(const float* q, const at::Half* const* keys, const at::Half* const* values,
                int64_t L, int64_t D, int64_t Dv, int64_t nh, float scale, float* s) {
  switch (nh) {
    case 1: return scores_tiled<1>(q, keys, values, L, D, Dv, scale, s);
    case 2: return scores_tiled<2>(q, keys, values, L, D, Dv, scale, s);
#if TQ_AVX512
    case 3: return scores_tiled<3>(q, keys, values, L, D, Dv, scale, s);
    case 4: return scores_tiled<4>(q, keys, values, L, D, Dv, scale, s);
#endif
  }
}

void values_vec(const float* w, const at::Half* const* values, int64_t L, int64_t Dv, int64_t nh,
                float* o) {
  switch (nh) {
    case 1: return values_tiled<1>(w, values, L, Dv, o);
    case 2: return values_tiled<2>(w, values, L, Dv, o);
#if TQ_AVX512
    case 3: return values_tiled<3>(w, values, L, Dv, o);
    case 4: return values_tiled<4>(w, values, L, Dv, o);
#endif
  }
}
constexpr int64_t LANES = Lanes::N, HEAD_TILE = Lanes::HEADS;
#else
constexpr int64_t LANES = 0, HEAD_TILE = 4;
#endif

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
  std::vector<float> part_m(T * group), part_l(T * group), part_o(T * group * Dv);
  // the vector tiles where the head sizes fill whole vectors, else the portable form
  const bool vec = LANES > 0 && D % LANES == 0 && Dv % LANES == 0;
  tq::parallel_chunks(T, [&](int64_t t) {
    thread_local std::vector<const at::Half*> keys, values;
    thread_local std::vector<float> scores, row;
    const Task& task = tasks[t];
    const int64_t L = task.last - task.first;
    keys.resize(L);
    values.resize(L);
    scores.resize(HEAD_TILE * L);
    row.resize(std::max(D, Dv));
    for (int64_t p = task.first; p < task.last; ++p) {
      const int64_t slot = int64_t(tab[task.b * max_blocks + p / PAGE]) * PAGE + p % PAGE;
      keys[p - task.first] = pk + (slot * Hkv + task.g) * D;
      values[p - task.first] = pv + (slot * Hkv + task.g) * Dv;
    }
    for (int64_t h0 = 0; h0 < group; h0 += HEAD_TILE) {  // a tile of query heads at a time
      const int64_t nh = std::min(HEAD_TILE, group - h0);
      const float* qh = pq + (task.b * H + task.g * group + h0) * D;
      float* oh = part_o.data() + (t * group + h0) * Dv;
#if PA_AVX2
      if (vec) scores_vec(qh, keys.data(), values.data(), L, D, Dv, nh, float(scale), scores.data());
      else
#endif
        scores_plain(qh, keys.data(), L, D, nh, float(scale), scores.data(), row.data());
      for (int64_t h = 0; h < nh; ++h) {  // the softmax's numerators, per head
        float* sh = scores.data() + h * L;
        const float top = *std::max_element(sh, sh + L);
        part_l[t * group + h0 + h] = exp_shifted(sh, L, top);  // sh[j] = e^(s_j − top)
        part_m[t * group + h0 + h] = top;
      }
#if PA_AVX2
      if (vec) values_vec(scores.data(), values.data(), L, Dv, nh, oh);
      else
#endif
        values_plain(scores.data(), values.data(), L, Dv, nh, oh, row.data());
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
