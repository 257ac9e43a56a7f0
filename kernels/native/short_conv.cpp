// The delta net's short causal conv1d (runtime/models/delta_net.py), with what follows it up
// to the delta rule, in one pass per token: for each channel c of the mix,
//
//     y[t, c] = silu(Σ_{j<K} x[t + j, c] · w[j, c])       x: the K-1 held mixes, then the n new
//
// then y split into q (Hk heads of D), k (Hk heads) and v (Hv heads), and q and k
// L2-normalised per head: x / √(Σx² + eps). In torch these are about ten ops over (B, n, C)
// tensors (the unfolded conv alone a (B, n, C, K) product), which cost a prefill layer as much
// as a fifth of its time; here each token's C channels are read K times from L1 and written
// once. Sums over the K taps in order j = 0 … K-1 in float (as ggml's ssm_conv), Σx² in
// double; SiLU's exponential as small_ops.cpp's. Jobs: blocks of TOKENS tokens of one
// sequence, over the pool's threads.
#include "common.h"

namespace {

using namespace tq;

constexpr int64_t TOKENS = 8;  // tokens per job

struct Conv {
  const float *x, *w;  // (B, K-1+n, C), taps (K, C)
  float *q, *k, *v;    // (B, n, Hk, D) ×2, (B, n, Hv, D)
  int64_t B, n, K, C, Hk, Hv, D, blocks;
  double eps;
};

inline float silu(float a) { return a / (1.f + std::exp(-a)); }

// y[0 … C) ← silu(Σ_j x_j · w_j) for one token, x_j its window's row j.
void conv_row(const float* x, const float* w, int64_t K, int64_t C, float* y) {
  int64_t c = 0;
#if TQ_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; c + 8 <= C; c += 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(w + c));
    for (int64_t j = 1; j < K; ++j)
      acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + j * C + c),
                                             _mm256_loadu_ps(w + j * C + c)));
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), acc));
    _mm256_storeu_ps(y + c, _mm256_div_ps(acc, _mm256_add_ps(one, e)));
  }
#endif
  for (; c < C; ++c) {
    float acc = x[c] * w[c];
    for (int64_t j = 1; j < K; ++j) acc += x[j * C + c] * w[j * C + c];
    y[c] = silu(acc);
  }
}

// x (D) ← x / √(Σx² + eps).
void l2_normalize(float* x, int64_t D, double eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < D; ++i) sum += double(x[i]) * double(x[i]);
  const float scale = float(1.0 / std::sqrt(sum + eps));
  for (int64_t i = 0; i < D; ++i) x[i] *= scale;
}

void run_job(const Conv& p, std::vector<float>& y, int64_t job) {
  const int64_t b = job / p.blocks, t0 = (job % p.blocks) * TOKENS;
  const int64_t t1 = std::min(p.n, t0 + TOKENS), key = p.Hk * p.D, value = p.Hv * p.D;
  for (int64_t t = t0; t < t1; ++t) {
    conv_row(p.x + (b * (p.K - 1 + p.n) + t) * p.C, p.w, p.K, p.C, y.data());
    const int64_t bt = b * p.n + t;
    float* q = p.q + bt * key;
    float* k = p.k + bt * key;
    std::memcpy(q, y.data(), sizeof(float) * key);
    std::memcpy(k, y.data() + key, sizeof(float) * key);
    std::memcpy(p.v + bt * value, y.data() + 2 * key, sizeof(float) * value);
    for (int64_t h = 0; h < p.Hk; ++h) {
      l2_normalize(q + h * p.D, p.D, p.eps);
      l2_normalize(k + h * p.D, p.D, p.eps);
    }
  }
}

// x (B, K-1+n, C): each sequence's K-1 held mixes, then its n new ones; w (K, C) the taps
// (ssm_conv1d transposed) → [q, k (B, n, Hk, D) L2-normalised per head, v (B, n, Hv, D)],
// C = 2·Hk·D + Hv·D.
std::vector<torch::Tensor> short_conv(torch::Tensor x, torch::Tensor w, int64_t Hk, int64_t Hv,
                                      int64_t D, double eps) {
  for (const auto* t : {&x, &w})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "short_conv: x and w must be contiguous float32 CPU tensors");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2, "short_conv: x must be (B, K-1+n, C), w (K, C)");
  const int64_t K = w.size(0), C = w.size(1), B = x.size(0), n = x.size(1) - (K - 1);
  TORCH_CHECK(K >= 1 && n >= 0 && x.size(2) == C, "short_conv: x is ", x.sizes(), " for taps ",
              w.sizes());
  TORCH_CHECK(Hk > 0 && Hv > 0 && D > 0 && C == (2 * Hk + Hv) * D, "short_conv: C (", C,
              ") must be 2·Hk·D + Hv·D (", Hk, ", ", Hv, ", ", D, ")");
  auto q = torch::empty({B, n, Hk, D}, x.options());
  auto k = torch::empty({B, n, Hk, D}, x.options());
  auto v = torch::empty({B, n, Hv, D}, x.options());
  Conv p{x.data_ptr<float>(), w.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(),
         v.data_ptr<float>(), B, n, K, C, Hk, Hv, D, (n + TOKENS - 1) / TOKENS, eps};
  if (B * n > 0) {
    parallel_chunks(B * p.blocks, [&p](int64_t job) {
      thread_local std::vector<float> y;  // one token's C channels
      y.resize(size_t(p.C));
      run_job(p, y, job);
    });
  }
  return {q, k, v};
}

}  // namespace

void register_short_conv(pybind11::module& m) {
  m.def("short_conv", &short_conv,
        "the delta net's causal conv1d + silu, split into q, k (L2-normalised per head), v",
        py::call_guard<py::gil_scoped_release>());
}
