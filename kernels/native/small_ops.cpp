// Small fused ops for the decode step, where torch's per-op dispatch (a few µs each) costs more
// than the arithmetic: RMSNorm (6 torch ops), RoPE (about 9), the residual add with the norm
// after it, and the gated FFN's act(gate)·up. Each op also pays for re-warming the caches the
// matmul before it streamed its weights through, so fewer, fused calls pay it fewer times
// (figures: docs/kernels.md). Loops over contiguous float32 rows, one thread. Numerics: as
// kernels/small_ops.py's torch forms, with RMSNorm's sum of squares in double (as ggml
// accumulates it); SiLU's
// exponential is a polynomial (relative error < 2e-7; torch's vectorized one is ~1 ulp);
// GELU is llama.cpp's fp16 table (below), which kernels/small_ops.py's fallback reproduces.
#include "common.h"

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              name, ": x must be a contiguous float32 CPU tensor");
}

// Σ x² in double: four lanes of four (AVX2) in a fixed order, whatever the number of rows.
double sum_squares(const float* x, int64_t n) {
  int64_t i = 0;
  double sum = 0.0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d acc = _mm256_setzero_pd();
  for (; i + 4 <= n; i += 4) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
    acc = _mm256_fmadd_pd(v, v, acc);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, acc);
  sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; i < n; ++i) sum += double(x[i]) * double(x[i]);
  return sum;
}

// y = x / sqrt(mean(x²) + eps) · w over the last dimension.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "rms_norm");
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.scalar_type() == torch::kFloat32 &&
              w.is_contiguous(), "rms_norm: w must be contiguous float32 (", D, ",)");
  auto y = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const int64_t rows = D ? x.numel() / D : 0;
  for (int64_t r = 0; r < rows; ++r, px += D, py += D) {
    const double sum = sum_squares(px, D);
    const float scale = float(1.0 / std::sqrt(sum / double(D) + eps));
    for (int64_t i = 0; i < D; ++i) py[i] = px[i] * scale * pw[i];
  }
  return y;
}

// x (T, H, D) rotated by cos/sin (T, 1, D/2): pairs (i, i + D/2) with neox, else (2i, 2i+1).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, bool neox) {
  check_rows(x, "rope");
  TORCH_CHECK(x.dim() == 3, "rope: x must be (T, H, D)");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "rope: D must be even");
  cos = cos.contiguous();
  sin = sin.contiguous();
  TORCH_CHECK(cos.numel() == T * half && sin.numel() == T * half &&
              cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32,
              "rope: cos and sin must be float32 (T, 1, D/2)");
  auto y = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos.data_ptr<float>() + t * half;
    const float* s = sin.data_ptr<float>() + t * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* a = px + (t * H + h) * D;
      float* o = py + (t * H + h) * D;
      if (neox) {
        for (int64_t i = 0; i < half; ++i) {
          o[i] = a[i] * c[i] - a[i + half] * s[i];
          o[i + half] = a[i] * s[i] + a[i + half] * c[i];
        }
      } else {
        for (int64_t i = 0; i < half; ++i) {
          o[2 * i] = a[2 * i] * c[i] - a[2 * i + 1] * s[i];
          o[2 * i + 1] = a[2 * i] * s[i] + a[2 * i + 1] * c[i];
        }
      }
    }
  }
  return y;
}

// x + a and its RMSNorm in one call: the residual add and the next norm of a block (the same
// float operations as the two ops apart, so the same bits). → [x + a, rms_norm(x + a, w)]
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor a, torch::Tensor w,
                                        double eps) {
  check_rows(x, "add_rms_norm");
  check_rows(a, "add_rms_norm");
  TORCH_CHECK(a.sizes() == x.sizes(), "add_rms_norm: x and a must have one shape");
  auto sum = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  const float* pa = a.data_ptr<float>();
  float* ps = sum.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) ps[i] = px[i] + pa[i];
  return {sum, rms_norm(sum, w, eps)};
}


// GELU as llama.cpp's CPU backend computes it (ggml-cpu's GGML_GELU_FP16 path, on by default):
// x ≤ -10 → 0, x ≥ 10 → x, otherwise x rounded to fp16 and looked up in a table of fp16
// gelu(v) = 0.5v(1 + tanh(√(2/π)·v·(1 + 0.044715v²))) over every fp16 value v. Matching it
// rather than the exact function keeps gemma's activations on llama.cpp's values (the table
// rounds to fp16: ~1e-3 relative, the largest numerics difference in a gemma forward).
struct GeluTable {
  uint16_t v[(1 << 16) + 2];  // +2: a 32-bit gather of the last entry stays inside
  GeluTable() {
    constexpr float A = 0.044715f, K = 0.79788456080286535587989211986876f;
    for (uint32_t i = 0; i < (1u << 16); ++i) {
      const float x = float(c10::Half(uint16_t(i), c10::Half::from_bits()));
      const float g = 0.5f * x * (1.0f + std::tanh(K * x * (1.0f + A * x * x)));
      v[i] = c10::Half(g).x;
    }
    v[1 << 16] = v[(1 << 16) + 1] = 0;
  }
};

const GeluTable& gelu_table() {
  static const GeluTable table;  // 128 KiB, built on first use (thread-safe)
  return table;
}

inline float gelu_ggml(float x, const uint16_t* table) {
  if (x <= -10.f) return 0.f;
  if (x >= 10.f) return x;
  return float(c10::Half(table[c10::Half(x).x], c10::Half::from_bits()));
}

// act(gate) · up: SiLU (x / (1 + e^-x)) or GELU (llama.cpp's table, above): the gated FFN's
// middle in one pass.
torch::Tensor act_mul(torch::Tensor gate, torch::Tensor up, bool gelu) {
  check_rows(gate, "act_mul");
  check_rows(up, "act_mul");
  TORCH_CHECK(gate.sizes() == up.sizes(), "act_mul: gate and up must have one shape");
  auto y = torch::empty_like(gate);
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = y.data_ptr<float>();
  const int64_t n = gate.numel();
  const uint16_t* table = gelu ? gelu_table().v : nullptr;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const __m256 one = _mm256_set1_ps(1.f), lo = _mm256_set1_ps(-10.f), hi = _mm256_set1_ps(10.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    __m256 act;
    if (gelu) {  // fp16 bits of x (round to nearest even, as ggml's F16C conversion) → table
      const __m256i idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
      const __m256i word = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), idx, 2);
      const __m256 looked = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(
          _mm256_packus_epi32(_mm256_and_si256(word, _mm256_set1_epi32(0xFFFF)), _mm256_setzero_si256()), 0xD8)));
      act = _mm256_blendv_ps(looked, x, _mm256_cmp_ps(x, hi, _CMP_GE_OQ));
      act = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LE_OQ), act);
    } else {
      act = _mm256_div_ps(x, _mm256_add_ps(one, tq::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    }
    _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float x = g[i];
    o[i] = (gelu ? gelu_ggml(x, table) : x / (1.f + std::exp(-x))) * u[i];
  }
  return y;
}

}  // namespace

void register_small_ops(pybind11::module& m) {
  m.def("add_rms_norm", &add_rms_norm, "[x + a, rms_norm(x + a, w)] in one call",
        py::call_guard<py::gil_scoped_release>());
  m.def("act_mul", &act_mul, "silu(gate) · up, or gelu_tanh(gate) · up",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_qk", [](torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin,
                      bool neox) { return std::vector<torch::Tensor>{rope(q, cos, sin, neox),
                                                                     rope(k, cos, sin, neox)}; },
        "rope of q and of k by the same tables in one call", py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x²) + eps) · w over the last dimension",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope", &rope, "rotary embedding of x (T, H, D) by cos/sin (T, 1, D/2)",
        py::call_guard<py::gil_scoped_release>());
}
