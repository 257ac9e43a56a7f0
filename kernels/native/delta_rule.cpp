// The gated delta rule of qwen35's linear-attention layers (runtime/models/delta_net.py), on
// the CPU: B sequences of n new tokens each, every head, each sequence's state S (Hv, Dv, Dk)
// updated in place. Per token t and value head h (key head h mod Hk):
//
//     S ← S·e^{g_t};  d = β_t (v_t − S k_t);  S ← S + d k_tᵀ;  o_t = S q_t / √Dk
//
// Row j of S (its Dk values, contiguous) meets only v_t[j] and o_t[j]: the rows are
// independent of each other through the whole recurrence. A job is one block of ROWS rows of
// one head of one sequence (ROWS × Dk floats, 16 KiB at Dk = 128: it stays in L1), run through
// all n tokens in place, four rows side by side (rows_run). A decode step (n = 1) and a
// prefill (n in the hundreds) are the same loop: the exact per-token recurrence, with the
// state read from and written to memory once per call rather than once per token (the role
// the chunked form's matmuls play on a GPU), and within a call one pass over each row per
// token. Jobs: B × Hv × Dv/ROWS, split over the pool's threads (common.h).
//
// Numerics: float32 throughout; dot products summed in 8 lanes, then across them (AVX2
// builds with D % 8 == 0; plain loops otherwise), as ggml_vec_dot_f32 sums in lanes too;
// S k_t as e^{g_t} (S_prev k_t) there; e^g by std::exp once per token and head.
// Against the float64 per-token recurrence: tests/test_delta_rule_kernels.py.
#include "common.h"

namespace {

using namespace tq;

constexpr int64_t ROWS = 32;  // state rows per job
constexpr int64_t PREFETCH_ROWS = 8;  // state rows requested ahead of the 4 in hand (AVX2)

struct Problem {
  const float *q, *k, *v, *g, *beta;  // (B, n, Hk, Dk) ×2, (B, n, Hv, Dv), (B, n, Hv) ×2
  std::vector<float*> states;          // B × (Hv, Dv, Dk), updated in place
  float* o;                            // (B, n, Hv, Dv)
  int64_t B, n, Hk, Hv, D, blocks;     // D = Dk = Dv; blocks = ceil(Dv / ROWS)
  float scale;
};

#if TQ_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows s[r·D …] of one head (D % 8 == 0) through all n tokens, side by side (each row's
// dot products are chains of dependent FMAs: R of them interleaved keep the FMA units busy).
// One pass over a row per token: since the decay is one scalar per token, S k_t is
// e^{g_t} (S_prev k_t), and S_prev k_t is summed in the pass of the token before, beside S q:
//     s ← e^g·s + d·k_t (stored);  Σ s·q_t → o_t;  Σ s·k_{t+1} → the next token's S k
template <int R>
void rows_run(const Problem& p, float* s, int64_t b, int64_t h, int64_t row) {
  const int64_t D = p.D, hk = h % p.Hk;
  const auto key = [&](const float* base, int64_t t) {  // token t's q or k head
    return base + ((b * p.n + t) * p.Hk + hk) * D;
  };
  __m256 acc[R], accq[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {  // S k_0
    const __m256 kv = _mm256_loadu_ps(key(p.k, 0) + i);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(s + r * D + i), kv, acc[r]);
  }
  float sk[R];
  for (int r = 0; r < R; ++r) sk[r] = hsum8(acc[r]);
  for (int64_t t = 0; t < p.n; ++t) {
    const int64_t bt = b * p.n + t;
    const float *k = key(p.k, t), *q = key(p.q, t), *next = key(p.k, t + 1 < p.n ? t + 1 : t);
    const float* v = p.v + (bt * p.Hv + h) * D + row;
    float* o = p.o + (bt * p.Hv + h) * D + row;
    const float decay = std::exp(p.g[bt * p.Hv + h]), beta = p.beta[bt * p.Hv + h];
    const __m256 e = _mm256_set1_ps(decay);
    __m256 d[R];
    for (int r = 0; r < R; ++r) {
      d[r] = _mm256_set1_ps(beta * (v[r] - decay * sk[r]));
      acc[r] = accq[r] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 kv = _mm256_loadu_ps(k + i), qv = _mm256_loadu_ps(q + i);
      const __m256 nv = _mm256_loadu_ps(next + i);
      for (int r = 0; r < R; ++r) {
        const __m256 decayed = _mm256_mul_ps(e, _mm256_loadu_ps(s + r * D + i));
        const __m256 x = _mm256_fmadd_ps(d[r], kv, decayed);
        _mm256_storeu_ps(s + r * D + i, x);
        accq[r] = _mm256_fmadd_ps(x, qv, accq[r]);
        acc[r] = _mm256_fmadd_ps(x, nv, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      o[r] = hsum8(accq[r]) * p.scale;
      sk[r] = hsum8(acc[r]);
    }
  }
}
#endif

// One row through one token in plain loops (the scalar build, and D % 8 != 0) → its S q.
inline float row_step_scalar(float* s, const float* k, const float* q, float decay,
                             float beta, float v, int64_t D) {
  float sk = 0.f;
  for (int64_t i = 0; i < D; ++i) {
    s[i] *= decay;
    sk += s[i] * k[i];
  }
  const float d = beta * (v - sk);
  float sq = 0.f;
  for (int64_t i = 0; i < D; ++i) {
    s[i] += d * k[i];
    sq += s[i] * q[i];
  }
  return sq;
}

// Job j: rows [r0, r1) of head h of sequence b (contiguous in the state), through all n tokens.
void run_job(const Problem& p, int64_t job) {
  const int64_t block = job % p.blocks, h = (job / p.blocks) % p.Hv, b = job / (p.blocks * p.Hv);
  const int64_t D = p.D, r0 = block * ROWS, r1 = std::min(D, r0 + ROWS), hk = h % p.Hk;
  float* s = p.states[b] + (h * D + r0) * D;  // this block's rows
#if TQ_AVX2
  if (D % 8 == 0) {  // then r1 − r0 is a multiple of 8
    // the 4 rows in hand and the PREFETCH_ROWS after them requested (prefetcht0) first: a
    // decode step streams every state once (1 MiB a layer at qwen35-0.8B), cold
    const float* const end = s + (r1 - r0) * D;
    const float* ahead = s;  // requested below
    for (int64_t r = r0; r < r1; r += 4) {
      const float* upto = std::min<const float*>(end, s + (r - r0 + 4 + PREFETCH_ROWS) * D);
      for (; ahead < upto; ahead += 16) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      rows_run<4>(p, s + (r - r0) * D, b, h, r);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < p.n; ++t) {
    const int64_t bt = b * p.n + t;
    const float* k = p.k + (bt * p.Hk + hk) * D;
    const float* q = p.q + (bt * p.Hk + hk) * D;
    const float* v = p.v + (bt * p.Hv + h) * D;
    float* o = p.o + (bt * p.Hv + h) * D;
    const float decay = std::exp(p.g[bt * p.Hv + h]), beta = p.beta[bt * p.Hv + h];
    for (int64_t r = r0; r < r1; ++r)
      o[r] = p.scale * row_step_scalar(s + (r - r0) * D, k, q, decay, beta, v[r], D);
  }
}

void check(const torch::Tensor& x, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "delta_rule: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(x.sizes() == torch::IntArrayRef(shape), "delta_rule: ", name, " has shape ",
              x.sizes(), ", wanted ", torch::IntArrayRef(shape));
}

// q, k (B, n, Hk, D), v (B, n, Hv, D), g, beta (B, n, Hv), states: B tensors (Hv, D, D),
// updated in place → o (B, n, Hv, D). Hv must be a multiple of Hk (head h reads key head
// h mod Hk, as the tiling of runtime/models/delta_net.py).
torch::Tensor delta_rule(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g,
                         torch::Tensor beta, std::vector<torch::Tensor> states) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "delta_rule: q and v must be (B, n, H, D)");
  const int64_t B = q.size(0), n = q.size(1), Hk = q.size(2), D = q.size(3), Hv = v.size(2);
  TORCH_CHECK(Hk > 0 && Hv % Hk == 0, "delta_rule: Hv (", Hv, ") must be a multiple of Hk (",
              Hk, ")");
  check(q, "q", {B, n, Hk, D});
  check(k, "k", {B, n, Hk, D});
  check(v, "v", {B, n, Hv, D});
  check(g, "g", {B, n, Hv});
  check(beta, "beta", {B, n, Hv});
  TORCH_CHECK(int64_t(states.size()) == B, "delta_rule: ", states.size(), " states for ", B,
              " sequences");
  Problem p;
  for (auto& s : states) {
    check(s, "a state", {Hv, D, D});
    p.states.push_back(s.data_ptr<float>());
  }
  auto o = torch::empty({B, n, Hv, D}, v.options());
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.g = g.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.o = o.data_ptr<float>();
  p.B = B;
  p.n = n;
  p.Hk = Hk;
  p.Hv = Hv;
  p.D = D;
  p.blocks = (D + ROWS - 1) / ROWS;
  p.scale = 1.f / std::sqrt(float(D));
  if (n > 0) parallel_chunks(B * Hv * p.blocks, [&p](int64_t job) { run_job(p, job); });
  return o;
}

}  // namespace

void register_delta_rule(pybind11::module& m) {
  m.def("delta_rule", &delta_rule,
        "the gated delta rule over B sequences of n tokens, states updated in place → o",
        py::call_guard<py::gil_scoped_release>());
}
