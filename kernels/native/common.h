// What the CPU kernels share (qmatmul.cpp: GGML rows; interleaved.cpp: row panels): GGML type
// numbers, fp16 conversions, the thread pool, and activations quantized to a vec_dot type.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TQ_AVX2 1
#include <immintrin.h>
#else
#define TQ_AVX2 0
#endif
// The "avx512vnni" build: the AVX2 code with u8·s8 dot products as AVX512-VNNI's vpdpbusd on
// 256-bit registers (AVX512VL). Integer sums are exact either way, so results are identical.
#if TQ_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TQ_VNNI 1
#else
#define TQ_VNNI 0
#endif
// 512-bit kernels (interleaved.cpp): AVX512F/BW with VNNI, in the same "avx512vnni" build.
#if TQ_VNNI && defined(__AVX512F__) && defined(__AVX512BW__)
#define TQ_AVX512 1
#else
#define TQ_AVX512 0
#endif

namespace tq {

enum GgmlType : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11,
                      Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23,
                      MXFP4 = 39 };
enum ActKind : int { A_Q8_0 = 0, A_Q8_1 = 1, A_Q8_K = 2 };

// The 16 non-linear levels that IQ4_NL and IQ4_XS nibbles index (kvalues_iq4nl, ggml-common.h).
inline constexpr int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};

// Q3_K's 16 six-bit scales from its 12 packed bytes, minus 32: -32..31.
inline void q3k_scales(const uint8_t* s, int8_t* sc) {
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    sc[j] = int8_t((low | (high << 4)) - 32);
  }
}

// IQ4_XS's 8 six-bit scales (scales_h u16 at s, scales_l[4] at s + 2), minus 32: -32..31.
inline void iq4xs_scales(const uint8_t* s, int8_t* sc) {
  const int h = s[0] | (s[1] << 8);
  for (int j = 0; j < 8; ++j)
    sc[j] = int8_t((((s[2 + j / 2] >> (4 * (j % 2))) & 0xF) | (((h >> (2 * j)) & 3) << 4)) - 32);
}

// ---------------------------------------------------------------- fp16, small helpers

inline uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t rd32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint32_t fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bitsf(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half → float, exact (the scalar build; F16C's vcvtph2ps gives the same values).
inline float h2f_soft(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = float(man) * 5.9604644775390625e-08f;
    return bitsf(fbits(v) | sign);
  }
  if (exp == 31) return bitsf(sign | 0x7F800000u | (man << 13));
  return bitsf(sign | ((exp + 112) << 23) | (man << 13));
}

// float → IEEE half, round to nearest even (what F16C's vcvtps2ph with imm 0 does).
inline uint16_t f2h_soft(float f) {
  uint32_t x = fbits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | (x > 0x7F800000u ? 0x7E00 : 0x7C00);  // NaN, inf
  if (x >= 0x477FF000u) return sign | 0x7C00;  // ≥ 65520 rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, man = RNE(|f| * 2^24) ≤ 1024
    return sign | uint16_t(std::nearbyint(bitsf(x) * 16777216.0f));
  }
  x += 0xFFFu + ((x >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return sign | uint16_t((x - 0x38000000u) >> 13);
}

#if TQ_AVX2
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
inline float round_h(float f) { return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }
#else
inline float h2f(uint16_t h) { return h2f_soft(h); }
inline float round_h(float f) { return h2f_soft(f2h_soft(f)); }
#endif

template <class T> inline std::unique_ptr<T[]> raw_array(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ---------------------------------------------------------------- threads

#if defined(__x86_64__) || defined(_M_X64)
inline void cpu_relax() { _mm_pause(); }
#else
inline void cpu_relax() { std::this_thread::yield(); }
#endif

// Runs fn(ctx, i) for i in [0, n) on up to `threads` threads: the caller and pool workers
// claim chunk indices from one atomic counter, and the caller returns once every claimed
// chunk is done. A worker the OS has not scheduled yet (a busy shared machine) never holds
// a call up: it claims nothing and the caller does its share. That is the difference from
// an OpenMP region (what at::parallel_for is), whose closing barrier waits for every thread:
// on a loaded machine that costs milliseconds per call (docs/kernels.md).
// Workers spin ~SPIN_US after a job (calls come in bursts), then sleep on a futex.
class Pool {
 public:
  using Fn = void (*)(const void*, int64_t);

  static Pool& instance() {
    static Pool* pool = [] {  // never destroyed: workers sleep until process exit
      pthread_atfork(nullptr, nullptr, [] { forked_.store(true, std::memory_order_relaxed); });
      return new Pool();
    }();
    // A forked child has no workers: it starts a pool of its own. (Not getpid() per call: a
    // system call, ~2 µs on the project's VM, on every matmul.)
    if (forked_.load(std::memory_order_relaxed)) [[unlikely]] {
      forked_.store(false, std::memory_order_relaxed);
      pool = new Pool();
    }
    return *pool;
  }

  void run(int64_t n, int threads, Fn fn, const void* ctx) {
    if (threads <= 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);  // one job at a time: a
    if (!lock.owns_lock()) {                                     // concurrent caller runs
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);                // its job on its own
      return;
    }
    try {
      while (int(workers_.size()) < threads - 1) {
        const int id = int(workers_.size());
        workers_.emplace_back([this, id] { loop(id); });
        workers_.back().detach();
      }
    } catch (const std::system_error&) {  // no more threads to be had: use those there are
    }
    active_.store(std::min(threads - 1, int(workers_.size())), std::memory_order_relaxed);
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    claim_.store(uint64_t(n) << 32, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
    work();
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) cpu_relax(); else std::this_thread::yield();
    }
  }

 private:
  static constexpr int64_t SPIN_US = 200;

  Pool() = default;

  void work() {  // claim and run chunks until none is left
    for (;;) {
      const uint64_t c = claim_.fetch_add(1, std::memory_order_acq_rel);
      if (uint32_t(c) >= uint32_t(c >> 32)) return;  // index ≥ count: the job is all claimed
      fn_(ctx_, int64_t(uint32_t(c)));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop(int id) {
    uint32_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 1; gen_.load(std::memory_order_acquire) == seen; ++spins) {
        cpu_relax();
        if (spins % 256 == 0) {
          const auto us = std::chrono::duration_cast<std::chrono::microseconds>(
              std::chrono::steady_clock::now() - start).count();
          if (us > SPIN_US) {
            gen_.wait(seen, std::memory_order_acquire);
            start = std::chrono::steady_clock::now();
          } else if (us > SPIN_US / 4) {
            std::this_thread::yield();
          }
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (id < active_.load(std::memory_order_relaxed)) work();
    }
  }

  static inline std::atomic<bool> forked_{false};  // set in a forked child (pthread_atfork)
  std::mutex mu_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> claim_{0};  // chunk count << 32 | next index
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> gen_{0};    // bumped per job; idle workers wait on it
  std::atomic<int> active_{0};
  Fn fn_ = nullptr;                 // written before claim_ is published, read after a claim
  const void* ctx_ = nullptr;
};

// Threads the kernel uses: set_num_threads(n) fixes it (so torch's own small ops can run on
// one thread while matmuls use the pool: an OpenMP team and spinning pool workers contend for
// the same cores otherwise); 0, the default, follows torch's intra-op thread count.
inline std::atomic<int> g_threads{0};

inline int kernel_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return std::max(1, n > 0 ? n : at::get_num_threads());
}

inline void set_num_threads(int64_t n) {
  TORCH_CHECK(n >= 0 && n <= 1024, "set_num_threads: n must be 0 (follow torch) to 1024, got ", n);
  g_threads.store(int(n), std::memory_order_relaxed);
}

inline int64_t get_num_threads() { return kernel_threads(); }

// Routed-expert counters, shared by moe.cpp's row kernel and interleaved.cpp's panel one:
// calls, expert streams (one per weight and chosen expert per call) and the weight bytes
// those streams read. One instance per module (a function-local static of an inline function).
struct MoeCounters {
  std::atomic<int64_t> calls{0}, streams{0}, bytes{0};
  void add(int64_t s, int64_t b) {
    calls.fetch_add(1, std::memory_order_relaxed);
    streams.fetch_add(s, std::memory_order_relaxed);
    bytes.fetch_add(b, std::memory_order_relaxed);
  }
};
inline MoeCounters& moe_counters() {
  static MoeCounters counters;
  return counters;
}

// Rows grouped by expert (a counting sort): group g is expert `expert[g]`, its rows
// `order[start[g] .. start[g+1])` (row indices into the caller's (R,) src/expert arrays).
struct ExpertGroups {
  std::vector<int64_t> expert, start, order;
  int64_t size() const { return int64_t(expert.size()); }
};

inline ExpertGroups group_by_expert(const int64_t* ids, const int64_t* src, int64_t R, int64_t E,
                                    int64_t T) {
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(ids[r] >= 0 && ids[r] < E, "expert id ", ids[r], " is outside 0..", E - 1);
    TORCH_CHECK(src[r] >= 0 && src[r] < T, "source row ", src[r], " is outside 0..", T - 1);
    ++count[ids[r] + 1];
  }
  ExpertGroups g;
  for (int64_t e = 0; e < E; ++e) {
    if (count[e + 1]) { g.expert.push_back(e); g.start.push_back(count[e]); }
    count[e + 1] += count[e];
  }
  g.start.push_back(R);
  g.order.resize(R);
  for (int64_t r = 0; r < R; ++r) g.order[count[ids[r]]++] = r;
  return g;
}

template <class F>
void parallel_chunks(int64_t n, const F& f) {
  Pool::instance().run(n, kernel_threads(),
                       [](const void* c, int64_t i) { (*static_cast<const F*>(c))(i); }, &f);
}

// ---------------------------------------------------------------- activation quantization

// x (M, K) quantized for one vec_dot type. Per token t: q[t*K ..] int8; d[t*nb ..] the block
// scale as float (Q8_0/Q8_1: already rounded through fp16, as the block stores it; Q8_K:
// float32); s[t*nb ..] (Q8_1) fp16(d·Σq) as float; sums[t*nb ..] (Q8_0) Σq as int;
// bsums[t*K/16 ..] (Q8_K) per-16 sums of q.
struct Act {
  int64_t M = 0, K = 0, nb = 0, bs = 32;
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, s;
  std::unique_ptr<int32_t[]> sums;  // Q8_0: Σq per block (Q4_0/Q5_0 fold their offset in)
  std::unique_ptr<int16_t[]> bsums;
  const int8_t* qs(int64_t t, int64_t b) const { return q.get() + t * K + b * bs; }
  float dy(int64_t t, int64_t b) const { return d[t * nb + b]; }
};

// e^x for 8 floats: x = n·ln2 + r (|r| ≤ ln2/2, ln2 in two parts), e^r by its degree-6
// Taylor polynomial (relative error < 2e-7 over the range), 2^n by exponent bits; inputs
// clamped to [-88, 88] (e^x then under/overflows as float32 would anyway).
#if TQ_AVX2
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// ---------------------------------------------------------------- float vectors

#if TQ_AVX2
// The sum of 8 floats: halves added, then pairs, then the last two.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Floats in the build's widest vectors: 16 lanes (avx512vnni), 8 (avx2) or 1 (scalar), for
// kernels written once over Floats::R (paged_attention.cpp, delta_rule.cpp's chunked form).
#if TQ_AVX512
struct Floats {
  using R = __m512;
  static constexpr int N = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R half(const at::Half* p) {  // N fp16 values
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, R r) { _mm512_storeu_ps(p, r); }
  static float sum(R r) { return _mm512_reduce_add_ps(r); }
};
#elif TQ_AVX2
struct Floats {
  using R = __m256;
  static constexpr int N = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R half(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, R r) { _mm256_storeu_ps(p, r); }
  static float sum(R r) { return hsum8(r); }
};
#else
struct Floats {
  using R = float;
  static constexpr int N = 1;
  static R zero() { return 0.f; }
  static R load(const float* p) { return *p; }
  static R half(const at::Half* p) { return float(*p); }
  static R set1(float x) { return x; }
  static R mul(R a, R b) { return a * b; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static void store(float* p, R r) { *p = r; }
  static float sum(R r) { return r; }
};
#endif

// x (M, K) float32 quantized per token to the vec_dot type `kind` (qmatmul.cpp).
Act quantize_act(const float* x, int64_t M, int64_t K, int kind);

// ---------------------------------------------------------------- routed panel products
// (interleaved.cpp; AVX2 and AVX-512 builds only, where interleaved_supports(type))

// One expert's panels against its rows: y[begin..end) (rows of N floats, in the Act's sorted
// order) = Act rows [begin, end) · the expert's N weight rows, panels w, w + pstride, ….
struct ExpertRows {
  const uint8_t* w;
  int64_t pstride, N;
  float* y;
  int64_t begin, end;
};
#if TQ_AVX2
void routed_panels(int type, const std::vector<ExpertRows>& rows, const Act& a);
// One weight's parts for grouped rows: group g's rows [start[g], start[g+1]) of y (rows of N)
// against expert groups.expert[g]'s panels in `panels` (E·N/16, panel_bytes).
std::vector<ExpertRows> expert_rows(const ExpertGroups& groups, const torch::Tensor& panels,
                                    int64_t N, float* y);
int panel_act_kind(int type);                      // the vec_dot type a panel type's Act takes
int64_t panel_row_bytes(int type, int64_t K);      // bytes of one 16-row panel over K
int64_t panel_block(int type);  // elements per GGML block of a panel type; 0: no panel kernel
#endif

}  // namespace tq
