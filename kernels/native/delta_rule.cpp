// The gated delta rule of qwen35's linear-attention layers (runtime/models/delta_net.py), on
// the CPU: B sequences of n new tokens each, every head, each sequence's state S (Hv, Dv, Dk)
// updated in place. Per token t and value head h (key head h mod Hk):
//
//     S ← S·e^{g_t};  d = β_t (v_t − S k_t);  S ← S + d k_tᵀ;  o_t = S q_t / √Dk
//
// Two forms:
// - The row form (decode steps, and the tokens of a prefill outside whole chunks). Row j of S
//   (its Dk values, contiguous) meets only v_t[j] and o_t[j]: the rows are independent of
//   each other through the whole recurrence. A job is one block of ROWS rows of one head of
//   one sequence (ROWS × Dk floats, 16 KiB at Dk = 128: it stays in L1), run through its
//   tokens in place, four rows side by side (rows_run): the exact per-token recurrence, the
//   state read and written once per call, one pass over each row per token. Jobs:
//   B × Hv × Dv/ROWS on the pool's threads (common.h).
// - The chunked form (a prefill's whole chunks of CHUNK positions; its own header below): a
//   triangular solve per chunk and register-tiled products with the state, 1.3–1.6× the row
//   form's speed at 512 tokens (docs/kernels.md). Jobs: B × Hv.
// Which tokens take which form depends on their positions only (the chunks are positions
// [32c, 32c + 32)), never on where a call begins.
//
// Numerics: float32 throughout. Rows: dot products summed in 8 lanes, then across them (AVX2
// builds with D % 8 == 0; plain loops otherwise), as ggml_vec_dot_f32 sums in lanes too;
// S k_t as e^{g_t} (S_prev k_t) there; e^g by std::exp once per token and head. Chunks: each
// product's sums run in order over their inner index, whatever the tile.
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
  std::vector<int64_t> starts;         // B: each sequence's position at the call's first token
  float scale;
};

#if TQ_AVX2
// R rows s[r·D …] of one head (D % 8 == 0) through all n tokens, side by side (each row's
// dot products are chains of dependent FMAs: R of them interleaved keep the FMA units busy).
// One pass over a row per token: since the decay is one scalar per token, S k_t is
// e^{g_t} (S_prev k_t), and S_prev k_t is summed in the pass of the token before, beside S q:
//     s ← e^g·s + d·k_t (stored);  Σ s·q_t → o_t;  Σ s·k_{t+1} → the next token's S k
template <int R>
void rows_run(const Problem& p, float* s, int64_t b, int64_t h, int64_t row, int64_t t0,
              int64_t t1) {
  const int64_t D = p.D, hk = h % p.Hk;
  const auto key = [&](const float* base, int64_t t) {  // token t's q or k head
    return base + ((b * p.n + t) * p.Hk + hk) * D;
  };
  __m256 acc[R], accq[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {  // S k_{t0}
    const __m256 kv = _mm256_loadu_ps(key(p.k, t0) + i);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(s + r * D + i), kv, acc[r]);
  }
  float sk[R];
  for (int r = 0; r < R; ++r) sk[r] = hsum8(acc[r]);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t bt = b * p.n + t;
    const float *k = key(p.k, t), *q = key(p.q, t), *next = key(p.k, t + 1 < t1 ? t + 1 : t);
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

// Rows [r0, r1) of head h of sequence b (contiguous in the state), block `block`, through
// tokens [t0, t1) of the call.
void rows_range(const Problem& p, int64_t b, int64_t h, int64_t block, int64_t t0, int64_t t1) {
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
      rows_run<4>(p, s + (r - r0) * D, b, h, r, t0, t1);
    }
    return;
  }
#endif
  for (int64_t t = t0; t < t1; ++t) {
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

// Job j of the row form: one block of rows of one head of one sequence, all n tokens.
void run_job(const Problem& p, int64_t job) {
  const int64_t block = job % p.blocks, h = (job / p.blocks) % p.Hv, b = job / (p.blocks * p.Hv);
  rows_range(p, b, h, block, 0, p.n);
}

// ---------------------------------------------------------------- the chunked form (prefill)
//
// A prefill's whole chunks of CHUNK positions go a chunk at a time, as flash-linear-attention's
// chunked form and llama.cpp's build_delta_net_chunking do, here in register-tiled products
// rather than a row recurrence. Within a chunk of L tokens, with G_i = g_1 + … + g_i and
// S₀ the state before it, the recurrence unrolls (WY form) to
//
//     u_i = β_i (v_i − e^{G_i} S₀ k_i) − Σ_{j<i} β_i e^{G_i−G_j} (k_i·k_j) u_j
//     o_i = e^{G_i} S₀ q_i + Σ_{j≤i} e^{G_i−G_j} (q_i·k_j) u_j           (÷ √Dk)
//     S_L = e^{G_L} S₀ + Σ_j e^{G_L−G_j} u_j k_jᵀ
//
// The first line is a unit lower-triangular solve, (I + A) [Ũ W] = [diag(β) V, diag(β e^G) K]
// with A_ij = β_i e^{G_i−G_j} k_i·k_j (j < i), then u_i = ũ_i − S₀ w_i. Every other term is a
// product of a chunk matrix with S₀ or with U, which `gemm` below runs as register tiles.
// The state is held transposed through the call (ST: Dk rows of Dv), so that S₀ w_i and
// S₀ q_i are rows of [W; Q]·ST and the update is ST += Kᵀ·diag(e^{G_L−G}) U: products whose
// right operand is read along contiguous rows. Per token and head this is 3·D² + 2.5·C·D
// multiply-adds (D² for each product with S₀ and for the update; the triangular products
// over the chunk), against the row recurrence's 4·D² operations, but in tiles that keep
// MR×NV sums in registers and read each loaded vector MR times.
//
// A job is one head of one sequence through all its chunks (jobs: B × Hv). Numerics: float32;
// e^{G_i−G_j} (j ≤ i, so ≤ 1 for decays ≤ 0) from the differences, never as a quotient;
// results differ from the row recurrence by float32 rounding only (tests: both against the
// float64 per-token recurrence, tests/test_delta_rule_kernels.py).

constexpr int64_t CHUNK = 32;  // tokens per chunk (kernels/delta_rule.py CHUNK_ALIGN: the same)

// Floats (common.h) with the register tile of `tile` below: MR rows × NV vectors of sums.
struct Vec : Floats {
  // AVX-512: 32 registers hold 6 × 4 sums, 4 right-hand vectors and a broadcast; AVX2: 16
  // hold 4 × 2, 2 and 1; the scalar build: the same loops over single floats
  static constexpr int MR = N == 16 ? 6 : 4, NV = N == 16 ? 4 : N == 8 ? 2 : 4;
};

// One product's operands: C[m·ldc + c] = keep·C[…] + Σ_{k<K} A[m·lda + k]·B[k·ldb + c], for
// rows m < M and columns c < cols (a multiple of Vec::N); keep = 0 overwrites C. lower:
// row m needs columns c ≤ m only (a lower-triangular result; columns above may hold anything).
struct Gemm {
  const float* A;
  int64_t lda;
  const float* B;
  int64_t ldb;
  float* C;
  int64_t ldc, M, cols, K;
  float keep = 0.f;
  bool lower = false;
};

// Rows [m, m + MR) × vectors [c, c + NV·N) of one product, K terms each (`depth`: its own K,
// for the triangular product whose rows sum over j ≤ m only).
template <int MR, int NV>
void tile(const Gemm& g, int64_t m, int64_t c, int64_t depth) {
  using R = Vec::R;
  R acc[MR][NV];
  const R keep = Vec::set1(g.keep);
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x)
      acc[r][x] = g.keep == 0.f ? Vec::zero() : Vec::mul(keep, Vec::load(g.C + (m + r) * g.ldc + c + x * Vec::N));
  const float* a = g.A + m * g.lda;
  for (int64_t k = 0; k < depth; ++k) {
    R b[NV];
    for (int x = 0; x < NV; ++x) b[x] = Vec::load(g.B + k * g.ldb + c + x * Vec::N);
    for (int r = 0; r < MR; ++r) {
      const R ar = Vec::set1(a[r * g.lda + k]);
      for (int x = 0; x < NV; ++x) acc[r][x] = Vec::fma(ar, b[x], acc[r][x]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x) Vec::store(g.C + (m + r) * g.ldc + c + x * Vec::N, acc[r][x]);
}

// Rows [m, m + MR) at column c: NV vectors while they fit, then one at a time.
template <int MR>
void row_block(const Gemm& g, int64_t m, int64_t c, int64_t c_end, int64_t depth) {
  constexpr int64_t W = int64_t(Vec::NV) * Vec::N;
  for (; c + W <= c_end; c += W) tile<MR, Vec::NV>(g, m, c, depth);
  for (; c < c_end; c += Vec::N) tile<MR, 1>(g, m, c, depth);
}

// The last M mod MR rows, as one block of that many.
static_assert(Vec::MR <= 6, "rest_block covers remainders up to 5 rows");
void rest_block(const Gemm& g, int64_t m, int64_t rows, int64_t c, int64_t c_end, int64_t depth) {
  switch (rows) {  // rows < MR ≤ 6
    case 1: return row_block<1>(g, m, c, c_end, depth);
    case 2: return row_block<2>(g, m, c, c_end, depth);
    case 3: return row_block<3>(g, m, c, c_end, depth);
    case 4: return row_block<4>(g, m, c, c_end, depth);
    default: return row_block<5>(g, m, c, c_end, depth);
  }
}

// The whole product: column panels of NV vectors outermost (the panel of B, K × NV·N floats,
// stays in L1 while the rows pass), MR rows at a time, then the rest as one block.
void gemm(const Gemm& g, bool triangular_depth = false) {
  constexpr int64_t W = int64_t(Vec::NV) * Vec::N;
  for (int64_t c0 = 0; c0 < g.cols; c0 += W) {
    const int64_t c1 = std::min(g.cols, c0 + W);
    // lower: rows below c0 have no column in this panel; MR-aligned so blocks match panels
    const int64_t first = g.lower ? std::min(g.M, c0 / Vec::MR * Vec::MR) : 0;
    int64_t m = first;
    for (; m + Vec::MR <= g.M; m += Vec::MR)
      row_block<Vec::MR>(g, m, c0, c1, triangular_depth ? std::min(g.K, m + Vec::MR) : g.K);
    if (m < g.M) rest_block(g, m, g.M - m, c0, c1, triangular_depth ? std::min(g.K, g.M) : g.K);
  }
}

// e^{x[j]} for j < n, in place (common.h's exp8 where there are 8 lanes).
inline void exp_inplace(float* x, int64_t n) {
  int64_t j = 0;
#if TQ_AVX2
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp8(_mm256_loadu_ps(x + j)));
#endif
  for (; j < n; ++j) x[j] = std::exp(x[j]);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[c·ldd + r] = src[r·lds + c] for r < rows, c < cols, in 16 × 16 blocks (row strides that
// are multiples of 512 bytes put a whole column in a few L1 sets: element by element over the
// full width, a transpose thrashes them).
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  constexpr int64_t B = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B)
      for (int64_t r = r0; r < std::min(rows, r0 + B); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + B); ++c) dst[c * ldd + r] = src[r * lds + c];
}

// A job's buffers (one set per thread, reused across calls; D = head size, C = CHUNK).
struct ChunkScratch {
  std::vector<float> st;   // (D, D): the state transposed, ST[i·D + j] = S[j·D + i]
  std::vector<float> kc;   // (C, D): this chunk's keys, rows contiguous
  std::vector<float> qc;   // (C, D): its queries
  std::vector<float> kt;   // (D, C): its keys transposed, zero past the chunk
  std::vector<float> kk;   // (C, C): k_i·k_j, then −A_ij (j < i)
  std::vector<float> qk;   // (C, C): q_i·k_j, then e^{G_i−G_j}(q_i·k_j)/√D (j ≤ i), 0 above
  std::vector<float> uw;   // (C, 2D): [Ũ W] rows from the solve; then U and the scaled U
  std::vector<float> qg;   // (C, D): e^{G_i} q_i / √D
  std::vector<float> y;    // (C, D): W·ST
  std::vector<float> e;    // (C): scratch exponents
  void size(int64_t D) {
    const auto at_least = [](std::vector<float>& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(n); };
    at_least(st, D * D);
    at_least(kc, CHUNK * D);
    at_least(qc, CHUNK * D);
    at_least(kt, D * CHUNK);
    at_least(kk, CHUNK * CHUNK);
    at_least(qk, CHUNK * CHUNK);
    at_least(uw, CHUNK * 2 * D);
    at_least(qg, CHUNK * D);
    at_least(y, CHUNK * D);
    at_least(e, CHUNK);
  }
};

// Token t's q, k and v rows (of head h) asked for. A chunk's rows are a page or more apart,
// which the hardware prefetchers do not follow: each chunk asks for the next one's, a token
// per row of its own work, to arrive while it runs.
void prefetch_token(const Problem& p, int64_t b, int64_t h, int64_t t) {
  if (t >= p.n) return;
  const int64_t D = p.D, bt = b * p.n + t, hk = h % p.Hk;
  const float* rows[3] = {p.k + (bt * p.Hk + hk) * D, p.q + (bt * p.Hk + hk) * D,
                          p.v + (bt * p.Hv + h) * D};
  for (const float* r : rows)
    for (int64_t x = 0; x < D; x += 16) __builtin_prefetch(r + x);
}

// One chunk of L tokens from token t0 of sequence b, head h; ST (the transposed state)
// advanced in place. G[i]: Σ_{j≤i} g of the chunk's tokens. next: the first token of the
// chunk after (0: none), whose rows this one asks for.
void chunk_step(const Problem& p, ChunkScratch& w, int64_t b, int64_t h, int64_t t0, int64_t L,
                const float* G, int64_t next) {
  const int64_t D = p.D, hk = h % p.Hk, C = CHUNK, Lv = round_up(L, Vec::N);
  const int64_t key_ld = p.Hk * D, val_ld = p.Hv * D;  // token strides of q/k and of v/o
  const float* V = p.v + ((b * p.n + t0) * p.Hv + h) * D;  // row i: token t0 + i
  const float* beta = p.beta + (b * p.n + t0) * p.Hv + h;  // token i: beta[i·Hv]
  float* O = p.o + ((b * p.n + t0) * p.Hv + h) * D;
  float *K = w.kc.data(), *Q = w.qc.data(), *kt = w.kt.data(), *kk = w.kk.data();
  float *qk = w.qk.data(), *uw = w.uw.data(), *qg = w.qg.data(), *y = w.y.data();
  float *e = w.e.data(), *st = w.st.data();

  // the chunk's key and query rows, contiguous (in the batch they are Hk·D floats apart, a
  // stride at which the rows of a chunk all fall in the same few L1 sets)
  const float* k_in = p.k + ((b * p.n + t0) * p.Hk + hk) * D;
  const float* q_in = p.q + ((b * p.n + t0) * p.Hk + hk) * D;
  for (int64_t i = 0; i < L; ++i) {
    std::memcpy(K + i * D, k_in + i * key_ld, D * sizeof(float));
    std::memcpy(Q + i * D, q_in + i * key_ld, D * sizeof(float));
  }
  transpose(K, D, kt, C, L, D);  // Kᵀ, zero past the chunk's L tokens
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = L; j < Lv; ++j) kt[i * C + j] = 0.f;
  // k_i·k_j and q_i·k_j, lower triangles (columns ≤ row, rounded up to whole vectors)
  gemm({K, D, kt, C, kk, C, L, Lv, D, 0.f, true});
  gemm({Q, D, kt, C, qk, C, L, Lv, D, 0.f, true});
  // kk row i → −β_i e^{G_i−G_j} k_i·k_j (j < i); qk row i → e^{G_i−G_j} q_i·k_j / √D (j ≤ i), 0
  // after (the triangular products read columns up to their row block's end)
  for (int64_t i = 0; i < L; ++i) {
    if (next) prefetch_token(p, b, h, next + i);
    for (int64_t j = 0; j <= i; ++j) e[j] = G[i] - G[j];
    exp_inplace(e, i + 1);
    const float bi = beta[i * p.Hv];
    float *a = kk + i * C, *s = qk + i * C;
    for (int64_t j = 0; j < i; ++j) a[j] = -bi * e[j] * a[j];
    for (int64_t j = 0; j <= i; ++j) s[j] = p.scale * e[j] * s[j];
    for (int64_t j = i + 1; j < Lv; ++j) s[j] = 0.f;
  }
  // the solve, row by row: [ũ_i w_i] = [β_i v_i, β_i e^{G_i} k_i] − Σ_{j<i} A_ij [ũ_j w_j]
  for (int64_t i = 0; i < L; ++i) e[i] = G[i];
  exp_inplace(e, L);
  for (int64_t i = 0; i < L; ++i) {
    const float bi = beta[i * p.Hv], bg = bi * e[i];
    float* row = uw + i * 2 * D;
    for (int64_t x = 0; x < D; ++x) {
      row[x] = bi * V[i * val_ld + x];
      row[D + x] = bg * K[i * D + x];
    }
    for (int64_t x = 0; x < D; ++x) qg[i * D + x] = p.scale * e[i] * Q[i * D + x];
  }
  for (int64_t i0 = 0; i0 < L; i0 += Vec::MR) {  // MR rows: first the rows before them, in
    const int64_t rows = std::min<int64_t>(Vec::MR, L - i0);  // tiles, then among themselves
    float* block = uw + i0 * 2 * D;
    if (i0 > 0) gemm({kk + i0 * C, C, uw, 2 * D, block, 2 * D, rows, 2 * D, i0, 1.f});
    for (int64_t i = i0 + 1; i < i0 + rows; ++i)
      gemm({kk + i * C + i0, C, block, 2 * D, uw + i * 2 * D, 2 * D, 1, 2 * D, i - i0, 1.f});
  }
  // S₀ w_i and e^{G_i} S₀ q_i/√D: rows of W·ST and Qg·ST; o starts as the latter, into place
  gemm({uw + D, 2 * D, st, D, y, D, L, D, D});
  gemm({qg, D, st, D, O, val_ld, L, D, D});
  for (int64_t i = 0; i < L; ++i)  // u_i = ũ_i − S₀ w_i (in uw's first half)
    for (int64_t x = 0; x < D; ++x) uw[i * 2 * D + x] -= y[i * D + x];
  // o_i += Σ_{j≤i} P_ij u_j (row block m sums over j < its end only)
  gemm({qk, C, uw, 2 * D, O, val_ld, L, D, L, 1.f}, true);
  // ST ← e^{G_L} ST + Kᵀ · diag(e^{G_L−G_j}) U
  for (int64_t j = 0; j < L; ++j) e[j] = G[L - 1] - G[j];
  exp_inplace(e, L);
  for (int64_t j = 0; j < L; ++j)
    for (int64_t x = 0; x < D; ++x) uw[j * 2 * D + x] *= e[j];
  gemm({kt, C, uw, 2 * D, st, D, D, D, L, std::exp(G[L - 1])});
}

// Job: head h of sequence b through all n tokens. Chunks are whole CHUNKs of the sequence's
// positions (multiples of CHUNK from its first token), so a token's arithmetic depends on
// where its chunk lies, never on where a call begins: a prefill cut into calls at multiples of
// CHUNK gives the one-call result bit for bit (the scheduler cuts recurrent models' prefills
// so). A chunk the call holds whole goes the chunked way; the tokens before the first whole
// chunk and after the last take the row form (all: true puts those in chunks of their own,
// for the tests).
void chunked_job(const Problem& p, int64_t job, bool all) {
  static thread_local ChunkScratch w;
  const int64_t D = p.D, h = job % p.Hv, b = job / p.Hv;
  const int64_t lead = std::min(p.n, (CHUNK - p.starts[b] % CHUNK) % CHUNK);
  const int64_t whole_end = lead + (p.n - lead) / CHUNK * CHUNK;  // end of the whole chunks
  const int64_t first = all ? 0 : lead, last = all ? p.n : whole_end;  // the chunked span
  if (first > 0)
    for (int64_t block = 0; block < p.blocks; ++block) rows_range(p, b, h, block, 0, first);
  if (last > first) {
    w.size(D);
    float* S = p.states[b] + h * D * D;
    float* st = w.st.data();
    transpose(S, D, st, D, D, D);
    for (int64_t t = first; t < std::min(first + CHUNK, last); ++t) prefetch_token(p, b, h, t);
    float G[CHUNK];
    for (int64_t t0 = first; t0 < last;) {
      // all: the lead as a chunk of its own, then whole ones and the rest
      const int64_t L = std::min(t0 == 0 && lead > 0 ? lead : CHUNK, last - t0);
      float sum = 0.f;
      for (int64_t i = 0; i < L; ++i) G[i] = sum += p.g[(b * p.n + t0 + i) * p.Hv + h];
      chunk_step(p, w, b, h, t0, L, G, t0 + L < last ? t0 + L : 0);
      t0 += L;
    }
    transpose(st, D, S, D, D, D);
  }
  if (last < p.n)
    for (int64_t block = 0; block < p.blocks; ++block) rows_range(p, b, h, block, last, p.n);
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
// starts: each sequence's position at its first token here (empty: all 0), which places the
// chunks. form: −1 (the default) whole chunks the chunked way, the rest by rows; 0 all by rows;
// 1 every token in chunks (the lead and the tail as short ones: for the tests). The chunked
// form needs a head size that is a multiple of the vector width; others run by rows.
torch::Tensor delta_rule(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g,
                         torch::Tensor beta, std::vector<torch::Tensor> states, int64_t form,
                         std::vector<int64_t> starts) {
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
  TORCH_CHECK(form >= -1 && form <= 1, "delta_rule: form must be -1, 0 or 1, got ", form);
  TORCH_CHECK(starts.empty() || int64_t(starts.size()) == B, "delta_rule: ", starts.size(),
              " starts for ", B, " sequences");
  p.starts = starts.empty() ? std::vector<int64_t>(B, 0) : starts;
  bool whole = false;  // a whole chunk in some sequence's tokens
  for (const int64_t start : p.starts) {
    TORCH_CHECK(start >= 0, "delta_rule: a start is negative (", start, ")");
    whole = whole || (CHUNK - start % CHUNK) % CHUNK + CHUNK <= n;
  }
  const bool chunked = D % Vec::N == 0 && (form == 1 || (form == -1 && whole));
  if (chunked && n > 0)
    parallel_chunks(B * Hv, [&p, form](int64_t job) { chunked_job(p, job, form == 1); });
  else if (n > 0)
    parallel_chunks(B * Hv * p.blocks, [&p](int64_t job) { run_job(p, job); });
  return o;
}

}  // namespace

void register_delta_rule(pybind11::module& m) {
  m.def("delta_rule", &delta_rule,
        "the gated delta rule over B sequences of n tokens, states updated in place → o",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("beta"),
        py::arg("states"), py::arg("form") = -1, py::arg("starts") = std::vector<int64_t>{},
        py::call_guard<py::gil_scoped_release>());
  m.attr("DELTA_RULE_CHUNK") = CHUNK;
}
