// Small fused ops for the decode step, where torch's per-op dispatch (a few µs each) costs more
// than the arithmetic: RMSNorm (6 torch ops) and RoPE (about 9). Loops over contiguous float32
// rows, one thread. Numerics: as kernels/small_ops.py's torch forms, with RMSNorm's sum of
// squares in double (as ggml accumulates it). (A fused silu/gelu·up was tried and dropped:
// scalar expf/tanhf made it slower than torch's vectorized ops at every size.)
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

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

}  // namespace

void register_small_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x²) + eps) · w over the last dimension",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope", &rope, "rotary embedding of x (T, H, D) by cos/sin (T, 1, D/2)",
        py::call_guard<py::gil_scoped_release>());
}
