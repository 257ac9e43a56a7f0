// The routed feed-forward of a mixture-of-experts layer in one call (runtime/models/moe.py),
// for experts kept in 16-row panels (kernels/experts.py `interleave_experts`). Token t chose
// experts ids[t, j] with weights w[t, j], j < k:
//
//     out[t] = Σ_j w[t,j] · (down_e(act(gate_e(x_t) + bg_e, up_e(x_t) + bu_e)) + bd_e),  e = ids[t,j]
//
// act 0: silu(g)·u (qwen3moe, qwen35moe); act 1: gpt-oss's clamped SwiGLU,
// min(g, 7)·σ(1.702·min(g, 7))·(clamp(u, ±7) + 1). The biases are optional (gpt-oss has them).
//
// The T·k (token, choice) rows are grouped by expert once (common.h group_by_expert). In that
// sorted order: the token rows are gathered and quantized once; gate and up read each chosen
// expert's panels once for all its rows (interleaved.cpp's routed products); the activation
// runs row by row, is quantized once, and down reads its panels once. The weighted sum is
// taken per token over j = 0 … k−1 in order, as llama.cpp adds its k weighted views.
//
// What this replaces is the same arithmetic spread over a dozen torch calls per layer (the
// bias lookups, the activation, the index bookkeeping, the weighted einsum): at decode
// (T = 1, k = 8) their fixed cost was a fifth of a step (docs/kernels.md).
//
// Numerics: the products are those of imoe_matmul_many, bit for bit; silu as x / (1 + e^−x)
// with common.h's exp8 (std::exp for a tail under 8); the weighted sum in float32.
//
// imoe_route, below, is the router in front of it for a float32 router weight at decode.
#include "common.h"

namespace {

using namespace tq;

enum Activation : int64_t { SILU = 0, SWIGLU_OAI = 1 };
constexpr float SWIGLU_ALPHA = 1.702f, SWIGLU_LIMIT = 7.f;

#if TQ_AVX2
// gate row i ← act(gate + bg, up + bu) of expert e, in place; 8 lanes at a time with
// common.h's exp8 (relative error < 2e-7 against std::exp), the tail as scalars.
void activate(float* g, const float* u, const float* bg, const float* bu, int64_t F, int64_t act) {
  int64_t f = 0;
  const __m256 one = _mm256_set1_ps(1.f), limit = _mm256_set1_ps(SWIGLU_LIMIT);
  for (; f + 8 <= F; f += 8) {
    __m256 x = _mm256_loadu_ps(g + f), y = _mm256_loadu_ps(u + f);
    if (bg) x = _mm256_add_ps(x, _mm256_loadu_ps(bg + f));
    if (bu) y = _mm256_add_ps(y, _mm256_loadu_ps(bu + f));
    __m256 e;
    if (act == SWIGLU_OAI) {
      x = _mm256_min_ps(x, limit);
      y = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(y, _mm256_sub_ps(_mm256_setzero_ps(), limit)), limit), one);
      e = exp8(_mm256_mul_ps(x, _mm256_set1_ps(-SWIGLU_ALPHA)));
    } else {
      e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    }
    _mm256_storeu_ps(g + f, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), y));
  }
  for (; f < F; ++f) {
    float x = g[f] + (bg ? bg[f] : 0.f), y = u[f] + (bu ? bu[f] : 0.f);
    if (act == SWIGLU_OAI) {
      x = std::min(x, SWIGLU_LIMIT);
      y = std::min(std::max(y, -SWIGLU_LIMIT), SWIGLU_LIMIT);
      g[f] = x / (1.f + std::exp(-SWIGLU_ALPHA * x)) * (y + 1.f);
    } else {
      g[f] = x / (1.f + std::exp(-x)) * y;
    }
  }
}

const float* bias_ptr(const std::optional<torch::Tensor>& b, int64_t E, int64_t N, const char* name) {
  if (!b) return nullptr;
  TORCH_CHECK(b->is_cpu() && b->scalar_type() == torch::kFloat32 && b->is_contiguous() &&
                  b->dim() == 2 && b->size(0) == E && b->size(1) == N,
              "imoe_ffn: ", name, " bias must be a contiguous (", E, ", ", N, ") float32 CPU tensor");
  return b->data_ptr<float>();
}

void check_panels(const torch::Tensor& w, int64_t E, int64_t N, int64_t type, int64_t K,
                  const char* name) {
  const int64_t pbytes = panel_row_bytes(int(type), K);
  TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.scalar_type() == torch::kUInt8 &&
                  w.size(0) == E * (N / 16) && w.size(1) == pbytes && w.stride(1) == 1,
              "imoe_ffn: ", name, " panels must be (", E, "·", N, "/16, ", pbytes, ") uint8");
}
#endif

torch::Tensor imoe_ffn(torch::Tensor x, torch::Tensor ids, torch::Tensor weights,
                       torch::Tensor gate, torch::Tensor up, torch::Tensor down, int64_t type_gu,
                       int64_t type_down, int64_t act, std::optional<torch::Tensor> bias_gate,
                       std::optional<torch::Tensor> bias_up, std::optional<torch::Tensor> bias_down) {
#if TQ_AVX2
  TORCH_CHECK(panel_block(int(type_gu)) && panel_block(int(type_down)),
              "imoe_ffn: no panel kernel for ggml types ", type_gu, "/", type_down);
  TORCH_CHECK(x.is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat32,
              "imoe_ffn: x must be a (T, K) float32 CPU tensor");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == torch::kInt64 && ids.size(0) == x.size(0),
              "imoe_ffn: ids must be (T, k) int64");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == torch::kFloat32,
              "imoe_ffn: weights must be (T, k) float32, as ids");
  TORCH_CHECK(act == SILU || act == SWIGLU_OAI, "imoe_ffn: activation ", act, " is not 0 or 1");
  x = x.contiguous();
  ids = ids.contiguous();
  weights = weights.contiguous();
  const int64_t T = x.size(0), K = x.size(1), k = ids.size(1), Rows = T * k;
  TORCH_CHECK(K > 0 && K % 16 == 0 && K % panel_block(int(type_gu)) == 0,
              "imoe_ffn: K=", K, " is not whole blocks of the gate/up type");
  const int64_t E = down.size(0) / (K / 16);
  TORCH_CHECK(E > 0 && down.size(0) == E * (K / 16) && gate.size(0) % E == 0,
              "imoe_ffn: down panels (", down.size(0), ") do not hold whole experts of ", K, " rows");
  const int64_t F = gate.size(0) / E * 16;
  TORCH_CHECK(F % panel_block(int(type_down)) == 0,
              "imoe_ffn: F=", F, " is not whole blocks of the down type");
  check_panels(gate, E, F, type_gu, K, "gate");
  check_panels(up, E, F, type_gu, K, "up");
  check_panels(down, E, K, type_down, F, "down");
  const float* bg = bias_ptr(bias_gate, E, F, "gate");
  const float* bu = bias_ptr(bias_up, E, F, "up");
  const float* bd = bias_ptr(bias_down, E, K, "down");
  torch::Tensor out = torch::zeros({T, K}, x.options());
  if (Rows == 0) return out;

  std::vector<int64_t> src(Rows);
  for (int64_t r = 0; r < Rows; ++r) src[r] = r / k;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const ExpertGroups groups = group_by_expert(idp, src.data(), Rows, E, T);

  // Gathered token rows (Rows, K) in sorted order, quantized once for gate and up.
  // (uninitialised buffers: every element is written before it is read)
  const std::unique_ptr<float[]> xs(new float[Rows * K]), gs(new float[Rows * F]),
      us(new float[Rows * F]), ds(new float[Rows * K]);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < Rows; ++i)
    std::memcpy(&xs[i * K], xp + src[groups.order[i]] * K, K * sizeof(float));
  {
    const Act a = quantize_act(xs.get(), Rows, K, panel_act_kind(int(type_gu)));
    std::vector<ExpertRows> parts = expert_rows(groups, gate, F, gs.get());
    const std::vector<ExpertRows> ups = expert_rows(groups, up, F, us.get());
    parts.insert(parts.end(), ups.begin(), ups.end());
    routed_panels(int(type_gu), parts, a);
  }
  parallel_chunks(Rows, [&](int64_t i) {
    const int64_t e = idp[groups.order[i]];
    activate(&gs[i * F], &us[i * F], bg ? bg + e * F : nullptr, bu ? bu + e * F : nullptr, F, act);
  });
  {
    const Act a = quantize_act(gs.get(), Rows, F, panel_act_kind(int(type_down)));
    routed_panels(int(type_down), expert_rows(groups, down, K, ds.get()), a);
  }
  const int64_t pg = panel_row_bytes(int(type_gu), K) * (F / 16);
  moe_counters().add(groups.size() * 3,
                     groups.size() * (2 * pg + panel_row_bytes(int(type_down), F) * (K / 16)));

  // out[t] = Σ_j w[t,j] · (ds[row (t, j)] + bd[e]), j in order.
  std::vector<int64_t> pos(Rows);
  for (int64_t i = 0; i < Rows; ++i) pos[groups.order[i]] = i;
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(T, [&](int64_t t) {
    float* o = op + t * K;
    for (int64_t j = 0; j < k; ++j) {
      const float w = wp[t * k + j];
      const float* d = &ds[pos[t * k + j] * K];
      const float* b = bd ? bd + idp[t * k + j] * K : nullptr;
      for (int64_t c = 0; c < K; ++c) o[c] += w * (b ? d[c] + b[c] : d[c]);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "imoe_ffn: this build has no panel kernels");
  (void)x, (void)ids, (void)weights, (void)gate, (void)up, (void)down, (void)act;
  (void)bias_gate, (void)bias_up, (void)bias_down;
  return {};
#endif
}

// ---------------------------------------------------------------- the router
// logits = h · Wᵀ (+ b) for a float32 router W (n_expert, K); then per token either
// softmax → top-k (qwen3moe's "softmax" gating) or top-k → softmax over the k
// ("softmax_weight", gpt-oss), and with `normalize` the k weights divided by their sum
// (clamped below at 2^-14, as llama.cpp). Top-k keeps the larger value first and, on a tie,
// the lower expert id. Softmax sums its exponentials in double, as ggml_vec_soft_max_f32.

inline float dot_f32(const float* a, const float* b, int64_t K) {
  int64_t i = 0;
  float sum = 0.f;
#if TQ_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= K; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  for (float v : lanes) sum += v;
#endif
  for (; i < K; ++i) sum += a[i] * b[i];
  return sum;
}

void softmax_in_place(float* v, int64_t n) {
  const float mx = *std::max_element(v, v + n);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += (v[i] = std::exp(v[i] - mx));
  const float inv = float(1.0 / total);
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

constexpr int64_t ROUTER_ROWS = 16;  // router rows per job
constexpr float MIN_WEIGHT_SUM = 6.103515625e-5f;

std::vector<torch::Tensor> imoe_route(torch::Tensor h, torch::Tensor w,
                                      std::optional<torch::Tensor> bias, int64_t k,
                                      bool softmax_first, bool normalize) {
  TORCH_CHECK(h.is_cpu() && h.dim() == 2 && h.scalar_type() == torch::kFloat32,
              "imoe_route: h must be a (T, K) float32 CPU tensor");
  TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.scalar_type() == torch::kFloat32 &&
                  w.size(1) == h.size(1),
              "imoe_route: the router must be (n_expert, ", h.size(1), ") float32 on the CPU");
  const int64_t T = h.size(0), K = h.size(1), E = w.size(0);
  TORCH_CHECK(k >= 1 && k <= E, "imoe_route: k=", k, " of ", E, " experts");
  if (bias) TORCH_CHECK(bias->is_cpu() && bias->scalar_type() == torch::kFloat32 &&
                            bias->numel() == E, "imoe_route: the bias must be (", E, ") float32");
  h = h.contiguous();
  w = w.contiguous();
  const torch::Tensor b = bias ? bias->contiguous() : torch::Tensor();
  const float *hp = h.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  std::vector<float> logits(T * E);
  const int64_t blocks = (E + ROUTER_ROWS - 1) / ROUTER_ROWS;
  parallel_chunks(blocks, [&](int64_t job) {  // a router row read once, for every token
    for (int64_t e = job * ROUTER_ROWS; e < std::min(E, (job + 1) * ROUTER_ROWS); ++e)
      for (int64_t t = 0; t < T; ++t)
        logits[t * E + e] = dot_f32(hp + t * K, wp + e * K, K) + (bp ? bp[e] : 0.f);
  });
  torch::Tensor weights = torch::empty({T, k}, h.options());
  torch::Tensor ids = torch::empty({T, k}, h.options().dtype(torch::kInt64));
  float* wo = weights.data_ptr<float>();
  int64_t* io = ids.data_ptr<int64_t>();
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < T; ++t) {
    float* l = &logits[t * E];
    if (softmax_first) softmax_in_place(l, E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [l](int64_t a, int64_t c) {
      return l[a] > l[c] || (l[a] == l[c] && a < c);
    });
    float* wt = wo + t * k;
    for (int64_t j = 0; j < k; ++j) io[t * k + j] = order[j], wt[j] = l[order[j]];
    if (!softmax_first) softmax_in_place(wt, k);
    if (normalize) {
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += wt[j];
      sum = std::max(sum, MIN_WEIGHT_SUM);
      for (int64_t j = 0; j < k; ++j) wt[j] /= sum;
    }
  }
  return {weights, ids};
}

}  // namespace

void register_moe_ffn(pybind11::module& m) {
  m.def("imoe_ffn", &imoe_ffn,
        "a mixture-of-experts feed-forward over panel experts: (T, K) → (T, K)",
        py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("gate"), py::arg("up"),
        py::arg("down"), py::arg("type_gu"), py::arg("type_down"), py::arg("act"),
        py::arg("bias_gate") = py::none(), py::arg("bias_up") = py::none(),
        py::arg("bias_down") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("imoe_route", &imoe_route,
        "a float32 router's top-k: h (T, K) → [weights (T, k) float32, ids (T, k) int64]",
        py::arg("h"), py::arg("w"), py::arg("bias"), py::arg("k"), py::arg("softmax_first"),
        py::arg("normalize"), py::call_guard<py::gil_scoped_release>());
}
