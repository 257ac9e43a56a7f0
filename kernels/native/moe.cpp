// Mixture-of-experts matmuls on the CPU: each output row r is x[src[r]] · W_{expert[r]}ᵀ, for
// expert weights W (E, N, row_bytes) kept in packed GGML blocks, expert e's N rows one
// contiguous stream (the GGUF's own layout of a 3-D `ffn_*_exps` tensor).
//
// Rows are grouped by expert (a counting sort) so that every chosen expert's weights are read
// from memory once per call for all the rows that chose it — a decode batch of 16 sequences
// or a prefill chunk alike — and stay in L1 while each of its rows meets every token of the
// group. Threads split over (weight, expert, 32-row chunk) jobs.
//
// Types: MXFP4 (gpt-oss), Q4_0 and Q8_0, all with llama.cpp's vec_dot type Q8_0 (activations
// quantized per 32-block to int8, tq::quantize_act), exact integer block products, scaled
// and summed in float32 (8 lanes, then a horizontal sum: the order differs from ggml's only
// in float summation, as qmatmul.cpp's does). MXFP4's nibbles index the doubled E2M1 values
// {0, 1, 2, 3, 4, 6, 8, 12, 0, −1, …, −12} and its E8M0 scale is taken halved, 2^(e − 128)
// (ggml_vec_dot_mxfp4_q8_0, GGML_E8M0_TO_FP32_HALF).
//
// Counters (moe_stats): calls, expert streams (one per (weight, chosen expert) per call) and
// the weight bytes those streams read; the test of "each chosen expert read once per step"
// reads them.

#include "common.h"

namespace {

using namespace tq;

constexpr int64_t CHUNK = 32;  // output rows per job
const int8_t KVALUES[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

int type_size(int type) {
  switch (type) {
    case MXFP4: return 17;
    case Q4_0: return 18;
    case Q8_0: return 34;
    default: return 0;
  }
}

// 2^(e − 128) as float32, subnormal for e < 2 (ggml_e8m0_to_fp32_half).
inline float e8m0_half(uint8_t e) {
  return bitsf(e < 2 ? uint32_t(0x00200000) << e : uint32_t(e - 1) << 23);
}

inline float block_scale(int type, const uint8_t* b) {
  return type == MXFP4 ? e8m0_half(b[0]) : h2f(rd16(b));
}

#if TQ_AVX2
// 16 bytes of nibbles → 32 bytes: the low nibbles (elements 0..15), then the high ones.
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// The weight block's 32 values as int8.
inline __m256i weights32(int type, const uint8_t* b) {
  if (type == Q8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  const __m256i n = nibbles(b + (type == MXFP4 ? 1 : 2));
  if (type == Q4_0) return _mm256_sub_epi8(n, _mm256_set1_epi8(8));
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(KVALUES));
  return _mm256_shuffle_epi8(_mm256_set_m128i(lut, lut), n);
}

// Σ x·y over 32 int8 pairs, as 8 int32 lane sums converted to float.
inline __m256 dot32(__m256i x, __m256i y) {
  const __m256i ax = _mm256_sign_epi8(x, x), sy = _mm256_sign_epi8(y, x);
  const __m256i pairs = _mm256_maddubs_epi16(ax, sy);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

// One weight row against one token's quantized activations.
template <int TYPE>
float dot_row(const uint8_t* row, const Act& a, int64_t t) {
  constexpr int TS = TYPE == MXFP4 ? 17 : TYPE == Q4_0 ? 18 : 34;
#if TQ_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b, row += TS) {
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs(t, b)));
    const float d = block_scale(TYPE, row) * a.dy(t, b);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), dot32(weights32(TYPE, row), y), acc);
  }
  return hsum8(acc);
#else
  float sum = 0.f;
  for (int64_t b = 0; b < a.nb; ++b, row += TS) {
    const int8_t* y = a.qs(t, b);
    int s = 0;
    for (int j = 0; j < 32; ++j) {
      int w;
      if (TYPE == Q8_0) {
        w = int8_t(row[2 + j]);
      } else {
        const uint8_t* qs = row + (TYPE == MXFP4 ? 1 : 2);
        const int nib = j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4;
        w = TYPE == MXFP4 ? KVALUES[nib] : nib - 8;
      }
      s += w * y[j];
    }
    sum += block_scale(TYPE, row) * a.dy(t, b) * float(s);
  }
  return sum;
#endif
}

using DotFn = float (*)(const uint8_t*, const Act&, int64_t);

DotFn dot_for(int type) {
  switch (type) {
    case MXFP4: return &dot_row<MXFP4>;
    case Q4_0: return &dot_row<Q4_0>;
    case Q8_0: return &dot_row<Q8_0>;
    default: return nullptr;
  }
}

struct Job { int64_t weight, group, first; };

// y_i (R, N_i) = for each row r: x[src[r]] · W_i[expert[r]]ᵀ, every W_i (E, N_i, row_bytes)
// of one type over the same K; src and expert (R,) int64.
std::vector<torch::Tensor> moe_matmul_many(torch::Tensor x, std::vector<torch::Tensor> ws,
                                           int64_t type, torch::Tensor src, torch::Tensor expert) {
  const DotFn dot = dot_for(int(type));
  TORCH_CHECK(dot != nullptr, "moe_matmul: no kernel for ggml type ", type, " (MXFP4, Q4_0, Q8_0)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be (T, K) float32");
  TORCH_CHECK(src.dim() == 1 && expert.dim() == 1 && src.size(0) == expert.size(0) &&
              src.scalar_type() == torch::kInt64 && expert.scalar_type() == torch::kInt64,
              "src and expert must be (R,) int64");
  TORCH_CHECK(!ws.empty(), "moe_matmul: no weights");
  x = x.contiguous();
  src = src.contiguous();
  expert = expert.contiguous();
  const int64_t T = x.size(0), K = x.size(1), R = src.size(0), E = ws[0].size(0);
  TORCH_CHECK(K % 32 == 0, "moe_matmul: K = ", K, " is not a multiple of 32");
  const int64_t row_bytes = K / 32 * type_size(int(type));
  for (auto& w : ws)
    TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kUInt8 && w.is_contiguous() &&
                w.size(0) == E && w.size(2) == row_bytes,
                "each weight must be contiguous (E, N, ", row_bytes, ") uint8 of E = ", E);
  const int64_t* ps = src.data_ptr<int64_t>();
  const ExpertGroups groups = group_by_expert(expert.data_ptr<int64_t>(), ps, R, E, T);
  const std::vector<int64_t>& gexp = groups.expert;
  const std::vector<int64_t>& gstart = groups.start;
  const std::vector<int64_t>& order = groups.order;
  const int64_t G = groups.size();
  const Act a = quantize_act(x.data_ptr<float>(), T, K, A_Q8_0);
  std::vector<torch::Tensor> ys;
  std::vector<Job> jobs;
  int64_t bytes = 0;
  for (int64_t i = 0; i < int64_t(ws.size()); ++i) {
    const int64_t N = ws[i].size(1);
    ys.push_back(torch::empty({R, N}, x.options()));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t n = 0; n < N; n += CHUNK) jobs.push_back({i, g, n});
    bytes += G * N * row_bytes;
  }
  std::vector<const uint8_t*> wp;
  std::vector<float*> yp;
  for (int64_t i = 0; i < int64_t(ws.size()); ++i) {
    wp.push_back(ws[i].data_ptr<uint8_t>());
    yp.push_back(ys[i].data_ptr<float>());
  }
  parallel_chunks(int64_t(jobs.size()), [&](int64_t j) {
    const Job& job = jobs[j];
    const int64_t N = ws[job.weight].size(1), e = gexp[job.group];
    const int64_t last = std::min(N, job.first + CHUNK);
    for (int64_t n = job.first; n < last; ++n) {
      const uint8_t* row = wp[job.weight] + (e * N + n) * row_bytes;
      for (int64_t k = gstart[job.group]; k < gstart[job.group + 1]; ++k) {
        const int64_t r = order[k];
        yp[job.weight][r * N + n] = dot(row, a, ps[r]);
      }
    }
  });
  moe_counters().add(G * int64_t(ws.size()), bytes);
  return ys;
}

std::vector<int64_t> moe_stats(bool reset) {
  MoeCounters& c = moe_counters();
  std::vector<int64_t> out = {c.calls.load(), c.streams.load(), c.bytes.load()};
  if (reset) { c.calls = 0; c.streams = 0; c.bytes = 0; }
  return out;
}

}  // namespace

void register_moe(pybind11::module& m) {
  m.def("moe_matmul_many", &moe_matmul_many,
        "[y_i (R, N_i)]: row r = x[src[r]] · W_i[expert[r]]ᵀ, rows grouped by expert",
        py::call_guard<py::gil_scoped_release>());
  m.def("moe_supports", [](int64_t type) { return dot_for(int(type)) != nullptr; },
        "whether moe_matmul_many has a kernel for the ggml type");
  m.def("moe_stats", &moe_stats, "[calls, expert streams, weight bytes streamed]; reset after",
        py::arg("reset") = false);
}
