// y = x · Wᵀ for W kept in packed GGML blocks, with llama.cpp's CPU numerics (ggml-cpu).
//
// Activations x (M, K) float32 are first quantized per block to the weight type's "vec_dot
// type" (Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for Q4_1/Q5_1, Q8_K for Q2_K..Q6_K and IQ4_XS),
// then each
// weight block meets each activation block in an exact integer dot product, which is scaled
// and accumulated in float32, as ggml's vec_dot kernels do. Only the float summation order
// differs from ggml's (per-lane partial sums, as its AVX2 kernels also have).
//
// Block layouts are ggml-common.h's; formulas follow ggml-quants.c (quantize_row_q8_K_ref)
// and ggml-cpu's quants.c (the AVX2 quantize_row_q8_0/q8_1: id = 127/amax, round to
// nearest even; the *_generic dot products for the K-quant scale/min handling).
//
// Two builds from this one file, chosen by the compiler flags: AVX2+FMA+F16C (maddubs int8
// products per block) and portable scalar. Threads: chunks of output rows, claimed from an
// atomic counter by a small pool of workers and the calling thread (see Pool).

#include "common.h"

namespace tq {

// quantize_row_q8_0 / q8_1 of ggml-cpu's AVX2 build: amax, d = amax/127 (stored fp16),
// id = 127/amax, q = round-half-even(x·id); Q8_1 adds s = fp16(d·Σq) with the unrounded d.
void quant_q8_01(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* sums) {
  for (int64_t ib = 0; ib < K / 32; ++ib, x += 32, q += 32) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float dd = amax / 127.f;
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int v = int(std::nearbyint(x[j] * id));
      q[j] = int8_t(v);
      sum += v;
    }
    d[ib] = round_h(dd);
    if (s) s[ib] = round_h(dd * float(sum));
    if (sums) sums[ib] = sum;
  }
}

// quantize_row_q8_K_ref: max = the first element of largest |x|, iscale = -127/max,
// q = min(127, nearest(iscale·x)), d = 1/iscale (float32), bsums per 16.
void quant_q8_k(const float* x, int64_t K, int8_t* q, float* d, int16_t* bsums) {
  for (int64_t ib = 0; ib < K / 256; ++ib, x += 256, q += 256, bsums += 16) {
    float amax = 0.f, mx = 0.f;
    for (int j = 0; j < 256; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; mx = x[j]; }
    }
    if (amax == 0.f) {
      d[ib] = 0.f;
      std::memset(q, 0, 256);
      std::memset(bsums, 0, 16 * sizeof(int16_t));
      continue;
    }
    const float iscale = -127.f / mx;
    for (int j = 0; j < 256; ++j) q[j] = int8_t(std::min(127, int(std::nearbyint(iscale * x[j]))));
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += q[16 * j + l];
      bsums[j] = int16_t(sum);
    }
    d[ib] = 1.f / iscale;
  }
}

Act quantize_act(const float* x, int64_t M, int64_t K, int kind) {
  Act a;
  a.M = M; a.K = K; a.bs = kind == A_Q8_K ? 256 : 32; a.nb = K / a.bs;
  a.q = raw_array<int8_t>(M * K);
  a.d = raw_array<float>(M * a.nb);
  if (kind == A_Q8_1) a.s = raw_array<float>(M * a.nb);
  if (kind == A_Q8_0) a.sums = raw_array<int32_t>(M * a.nb);
  if (kind == A_Q8_K) a.bsums = raw_array<int16_t>(M * K / 16);
  const int64_t per_chunk = std::max<int64_t>(1, 16384 / K);  // tokens
  parallel_chunks((M + per_chunk - 1) / per_chunk, [&](int64_t c) {
    for (int64_t t = c * per_chunk; t < std::min(M, (c + 1) * per_chunk); ++t) {
      if (kind == A_Q8_K) {
        quant_q8_k(x + t * K, K, a.q.get() + t * K, a.d.get() + t * a.nb,
                   a.bsums.get() + t * K / 16);
      } else {
        quant_q8_01(x + t * K, K, a.q.get() + t * K, a.d.get() + t * a.nb,
                    kind == A_Q8_1 ? a.s.get() + t * a.nb : nullptr,
                    kind == A_Q8_0 ? a.sums.get() + t * a.nb : nullptr);
      }
    }
  });
  return a;
}

}  // namespace tq

namespace {

using namespace tq;

// Q4_K/Q5_K: 8 six-bit scales and mins from the 12 packed bytes (get_scale_min_k4).
inline void k4_scales(const uint8_t* s, int16_t* sc, int16_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// ---------------------------------------------------------------- scalar dot products
// One weight row · one token, the *_generic formulas of ggml-cpu/quants.c.

// Q4_0 / Q5_0 / Q8_0: signed values; Q4_1 / Q5_1: unsigned values plus a min term.
inline void block_values(int type, const uint8_t* b, int* v) {
  switch (type) {
    case Q4_0: for (int j = 0; j < 16; ++j) { v[j] = (b[2 + j] & 0xF) - 8; v[j + 16] = (b[2 + j] >> 4) - 8; } break;
    case Q4_1: for (int j = 0; j < 16; ++j) { v[j] = b[4 + j] & 0xF; v[j + 16] = b[4 + j] >> 4; } break;
    case Q5_0: {
      const uint32_t qh = rd32(b + 2);
      for (int j = 0; j < 16; ++j) {
        v[j] = ((b[6 + j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
        v[j + 16] = ((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
      }
      break;
    }
    case Q5_1: {
      const uint32_t qh = rd32(b + 4);
      for (int j = 0; j < 16; ++j) {
        v[j] = (b[8 + j] & 0xF) | (((qh >> j) & 1) << 4);
        v[j + 16] = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      break;
    }
    default: for (int j = 0; j < 32; ++j) v[j] = int8_t(b[2 + j]); break;  // Q8_0
  }
}

template <int TYPE, int TS>
[[maybe_unused]] float dot32_scalar(const uint8_t* row, const Act& a, int64_t t) {
  float sumf = 0.f;
  int v[32];
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * TS;
    const int8_t* y = a.qs(t, ib);
    block_values(TYPE, b, v);
    int sumi = 0;
    for (int j = 0; j < 32; ++j) sumi += v[j] * y[j];
    const float dd = h2f(rd16(b)) * a.dy(t, ib);
    if (TYPE == Q4_1 || TYPE == Q5_1) {
      sumf += dd * float(sumi) + h2f(rd16(b + 2)) * a.s[t * a.nb + ib];
    } else {
      sumf += float(sumi) * dd;
    }
  }
  return sumf;
}

template <bool Q5>
[[maybe_unused]] float dot_q45k_scalar(const uint8_t* row, const Act& a, int64_t t) {
  constexpr int TS = Q5 ? 176 : 144;
  float sumf = 0.f;
  int8_t v[256];
  int16_t sc[8], mn[8];
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * TS;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (Q5 ? 48 : 16);
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        v[64 * c + l] = int8_t(qs[32 * c + l] & 0xF);
        v[64 * c + 32 + l] = int8_t(qs[32 * c + l] >> 4);
        if (Q5) {
          v[64 * c + l] += ((qh[l] >> (2 * c)) & 1) << 4;
          v[64 * c + 32 + l] += ((qh[l] >> (2 * c + 1)) & 1) << 4;
        }
      }
    }
    k4_scales(b + 4, sc, mn);
    const int8_t* y = a.qs(t, ib);
    const int16_t* bsum = a.bsums.get() + t * (a.K / 16) + ib * 16;
    int summ = 0, sumi = 0;
    for (int j = 0; j < 16; ++j) summ += bsum[j] * mn[j / 2];
    for (int j = 0; j < 8; ++j) {
      int s = 0;
      for (int l = 0; l < 32; ++l) s += v[32 * j + l] * y[32 * j + l];
      sumi += sc[j] * s;
    }
    const float dy = a.dy(t, ib);
    sumf += h2f(rd16(b)) * dy * float(sumi);
    sumf -= h2f(rd16(b + 2)) * dy * float(summ);
  }
  return sumf;
}

[[maybe_unused]] float dot_q6k_scalar(const uint8_t* row, const Act& a, int64_t t) {
  float sumf = 0.f;
  int8_t v[256];
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * 210;
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = b + 64 * h;
      const uint8_t* qh = b + 128 + 32 * h;
      int8_t* o = v + 128 * h;
      for (int l = 0; l < 32; ++l) {
        o[l] = int8_t(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
        o[l + 32] = int8_t(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
        o[l + 64] = int8_t(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        o[l + 96] = int8_t(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
    }
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const int8_t* y = a.qs(t, ib);
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int l = 0; l < 16; ++l) s += v[16 * j + l] * y[16 * j + l];
      sumi += sc[j] * s;
    }
    sumf += h2f(rd16(b + 208)) * a.dy(t, ib) * float(sumi);
  }
  return sumf;
}

// Q2_K: 16 sub-blocks of 16, values 0..3 (element 128h + 32k + l is bits 2k of qs[32h + l]),
// a 4-bit scale and min per sub-block (ggml_vec_dot_q2_K_q8_K_generic): exact integers
// Σ_j sc_j·(Σ q·y)_j and Σ_j m_j·bsum_j, then d·dy and dmin·dy in float.
[[maybe_unused]] float dot_q2k_scalar(const uint8_t* row, const Act& a, int64_t t) {
  float sumf = 0.f;
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * 84;
    const int8_t* y = a.qs(t, ib);
    const int16_t* bsum = a.bsums.get() + t * (a.K / 16) + ib * 16;
    int isum = 0, summ = 0;
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int l = 0; l < 16; ++l) {
        const int e = 16 * j + l;
        s += y[e] * ((b[16 + 32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3);
      }
      isum += (b[j] & 0xF) * s;
      summ += (b[j] >> 4) * bsum[j];
    }
    const float dy = a.dy(t, ib);
    sumf += dy * h2f(rd16(b + 80)) * float(isum) - dy * h2f(rd16(b + 82)) * float(summ);
  }
  return sumf;
}

// Q3_K: 16 sub-blocks of 16 with signed 6-bit scales; element 32i + l (i = 4h + k) is bits 2k
// of qs[32h + l], minus 4 where bit i of hmask[l] is clear. Exact Σ_j sc_j·(Σ q·y)_j per block.
[[maybe_unused]] float dot_q3k_scalar(const uint8_t* row, const Act& a, int64_t t) {
  float sumf = 0.f;
  int8_t sc[16];
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * 110;
    const int8_t* y = a.qs(t, ib);
    q3k_scales(b + 96, sc);
    int isum = 0;
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int l = 0; l < 16; ++l) {
        const int e = 16 * j + l, i = e >> 5, k = i & 3, hh = i >> 2;
        const int q = ((b[32 + 32 * hh + (e & 31)] >> (2 * k)) & 3) - ((b[e & 31] >> i) & 1 ? 0 : 4);
        s += y[e] * q;
      }
      isum += sc[j] * s;
    }
    sumf += h2f(rd16(b + 108)) * a.dy(t, ib) * float(isum);
  }
  return sumf;
}

// IQ4_XS: 8 sub-blocks of 32 with signed 6-bit scales; nibbles (Q4_0's order per sub-block)
// index IQ4_LEVELS. Exact Σ_j sc_j·(Σ L[q]·y)_j per block, then d·dy in float.
[[maybe_unused]] float dot_iq4xs_scalar(const uint8_t* row, const Act& a, int64_t t) {
  float sumf = 0.f;
  int8_t sc[8];
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * 136;
    const int8_t* y = a.qs(t, ib);
    iq4xs_scales(b + 2, sc);
    int isum = 0;
    for (int j = 0; j < 8; ++j) {
      const uint8_t* qs = b + 8 + 16 * j;
      int s = 0;
      for (int l = 0; l < 16; ++l)
        s += y[32 * j + l] * IQ4_LEVELS[qs[l] & 0xF] + y[32 * j + 16 + l] * IQ4_LEVELS[qs[l] >> 4];
      isum += sc[j] * s;
    }
    sumf += h2f(rd16(b)) * a.dy(t, ib) * float(isum);
  }
  return sumf;
}

// IQ4_NL: blocks of 32, d f16 | qs[16] indexing IQ4_LEVELS, against Q8_0 activations.
[[maybe_unused]] float dot_iq4nl_scalar(const uint8_t* row, const Act& a, int64_t t) {
  float sumf = 0.f;
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * 18;
    const int8_t* y = a.qs(t, ib);
    int s = 0;
    for (int l = 0; l < 16; ++l)
      s += y[l] * IQ4_LEVELS[b[2 + l] & 0xF] + y[16 + l] * IQ4_LEVELS[b[2 + l] >> 4];
    sumf += h2f(rd16(b)) * a.dy(t, ib) * float(s);
  }
  return sumf;
}

#if TQ_AVX2
// ---------------------------------------------------------------- AVX2 dot products
// Each kernel computes one weight row against NT ≤ 4 tokens: a weight block is unpacked
// once into int8 lanes, then meets every token's activation block.

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 16 packed bytes → 32 bytes: low nibbles (elements 0..15), then high nibbles (16..31).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(r, 4), r), _mm256_set1_epi8(0xF));
}

// bit i of v → byte i: 0xFF where set, 0 where clear.
inline __m256i bits_to_bytes(uint32_t v) {
  const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                          0x0303030303030303LL);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(int(v)), shuf);
  return _mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Σ of unsigned u × signed s, as 8 int32 lanes (pairs never saturate: |u| ≤ 128 here).
inline __m256i dot_us(__m256i u, __m256i s) {
#if TQ_VNNI  // one vpdpbusd: the same four-product sums per lane (maddubs' int16 pair sums
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);  // never saturate for these operands)
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// fp16 fields at p, p + STRIDE, ..., p + 7·STRIDE → 8 floats. Gathered with scalar loads
// and shifts (integer ports), converted with one vcvtph2ps: far cheaper per block than a
// conversion and a broadcast each.
template <int STRIDE>
inline __m256 halves8(const uint8_t* p) {
  uint64_t lo = 0, hi = 0;
  for (int i = 0; i < 4; ++i) {
    lo |= uint64_t(rd16(p + i * STRIDE)) << (16 * i);
    hi |= uint64_t(rd16(p + (i + 4) * STRIDE)) << (16 * i);
  }
  return _mm256_cvtph_ps(_mm_set_epi64x(int64_t(hi), int64_t(lo)));
}

// The 32 values of a weight block as bytes: Q8_0 signed; the others unsigned (0..15 or
// 0..31), their offset (Q4_0: 8, Q5_0: 16) applied through the activation sums.
template <int TYPE>
inline __m256i block_bytes(const uint8_t* b) {
  const __m256i m10 = _mm256_set1_epi8(0x10);
  switch (TYPE) {
    case Q4_0: return nibbles(b + 2);
    case Q4_1: return nibbles(b + 4);
    case Q5_0: return _mm256_or_si256(nibbles(b + 6), _mm256_and_si256(bits_to_bytes(rd32(b + 2)), m10));
    case Q5_1: return _mm256_or_si256(nibbles(b + 8), _mm256_and_si256(bits_to_bytes(rd32(b + 4)), m10));
    default: return load256(b + 2);
  }
}

// One block's Σ w·y as 8 int32 lanes whose sum is exact. Q8_0: |w| · sign(w)·y (maddubs
// wants one unsigned operand). Q4_0/Q5_0: Σ (u − c)·y = Σ u·y − c·Σy, the c·Σy spread as
// (c/8)·Σy over the 8 lanes, so the block's integer total is exact before any float.
template <int TYPE>
inline __m256i block_dot(__m256i w, __m256i aw, const int8_t* y, const int32_t* ysum) {
  if (TYPE == Q8_0) return dot_us(aw, _mm256_sign_epi8(load256(y), w));
  __m256i p = dot_us(w, load256(y));
  if (TYPE == Q4_0) p = _mm256_sub_epi32(p, _mm256_set1_epi32(*ysum));
  if (TYPE == Q5_0) p = _mm256_sub_epi32(p, _mm256_slli_epi32(_mm256_set1_epi32(*ysum), 1));
  return p;
}

// 32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): Σ_b d_w·d_y · (Σ w·y)_b, plus for Q4_1
// and Q5_1 Σ_b m_w·s_y. Eight blocks at a time share one scale conversion; each block's
// scale is then picked out of the 8 with one permute.
template <int TYPE, int TS, int NT>
void dot32(const uint8_t* row, const Act& a, int64_t t0, float* out) {
  constexpr bool MIN = TYPE == Q4_1 || TYPE == Q5_1;
  // Two accumulators in flight (blocks alternate between them), for every NT: a token's sum
  // is then formed in the same order whatever the tile, so a row of the output does not
  // depend on how many other tokens share the call (batch invariance).
  constexpr int U = 2;
  const int64_t nb = a.nb;
  const int8_t* y[NT];
  const float* dy[NT];
  const float* sy[NT];
  const int32_t* ys[NT];
  __m256 acc[U][NT];
  float tail[NT];
  for (int t = 0; t < NT; ++t) {
    y[t] = a.q.get() + (t0 + t) * a.K;
    dy[t] = a.d.get() + (t0 + t) * nb;
    sy[t] = MIN ? a.s.get() + (t0 + t) * nb : nullptr;
    ys[t] = TYPE == Q4_0 || TYPE == Q5_0 ? a.sums.get() + (t0 + t) * nb : nullptr;
    tail[t] = 0.f;
    for (int u = 0; u < U; ++u) acc[u][t] = _mm256_setzero_ps();
  }
  int64_t ib = 0;
  for (; ib + 8 <= nb; ib += 8) {
    const uint8_t* b = row + ib * TS;
    const __m256 dw = halves8<TS>(b);
    __m256 scale[NT];
    for (int t = 0; t < NT; ++t) scale[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(dy[t] + ib));
    if (MIN) {
      const __m256 mw = halves8<TS>(b + 2);
      for (int t = 0; t < NT; ++t)
        acc[U - 1][t] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(sy[t] + ib), acc[U - 1][t]);
    }
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      const __m256i w = block_bytes<TYPE>(b + u * TS);
      const __m256i aw = TYPE == Q8_0 ? _mm256_sign_epi8(w, w) : w;
      const __m256i lane = _mm256_set1_epi32(u);
      for (int t = 0; t < NT; ++t) {
        const __m256i p = block_dot<TYPE>(w, aw, y[t] + (ib + u) * 32, ys[t] + ib + u);
        acc[u % U][t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scale[t], lane),
                                        _mm256_cvtepi32_ps(p), acc[u % U][t]);
      }
    }
  }
  for (; ib < nb; ++ib) {  // the last nb % 8 blocks, one at a time
    const uint8_t* b = row + ib * TS;
    const float dw = h2f(rd16(b));
    const __m256i w = block_bytes<TYPE>(b);
    const __m256i aw = TYPE == Q8_0 ? _mm256_sign_epi8(w, w) : w;
    for (int t = 0; t < NT; ++t) {
      const __m256i p = block_dot<TYPE>(w, aw, y[t] + ib * 32, ys[t] + ib);
      acc[0][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dy[t][ib]), _mm256_cvtepi32_ps(p), acc[0][t]);
      if (MIN) tail[t] += h2f(rd16(b + 2)) * sy[t][ib];
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m256 s = acc[0][t];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][t]);
    out[t] = hsum8(s) + tail[t];
  }
}

// Q4_K/Q5_K: the 12 packed bytes at s → 16 bytes: 8 six-bit scales, then 8 mins
// (get_scale_min_k4, on 32-bit words u0..u2: scales 0-3 = u0 & 0x3F, mins 0-3 = u1 & 0x3F,
// scales 4-7 = (u2 & 0x0F) | (u0 >> 2 & 0x30), mins 4-7 = (u2 >> 4 & 0x0F) | (u1 >> 2 & 0x30)).
// Reads 16 bytes; the 4 after the scales are the block's own.
inline __m128i k4_scales_mins(const uint8_t* s) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  const __m128i a = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0));  // u0 u2 u1 u2
  const __m128i b = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0));  // u0 u0 u1 u1
  const __m128i lo = _mm_and_si128(a, _mm_set1_epi8(0x3F));
  const __m128i hi = _mm_or_si128(
      _mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)), _mm_set1_epi8(0x0F)),
      _mm_and_si128(_mm_srli_epi32(b, 2), _mm_set1_epi8(0x30)));
  return _mm_blend_epi32(lo, hi, 0xA);
}

// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; per block the exact integers
// Σ_j sc_j·(Σ q·y)_j and Σ_j m_j·(Σy)_j (from bsums), then d·dy and dmin·dy in float.
template <bool Q5, int NT>
void dot_q45k(const uint8_t* row, const Act& a, int64_t t0, float* out) {
  constexpr int TS = Q5 ? 176 : 144;
  const __m256i m4 = _mm256_set1_epi8(0xF), m10 = _mm256_set1_epi8(0x10);
  // int16 word j of each 128-bit lane, repeated over the lane
  alignas(32) static const int8_t kPick[8][32] = {
#define TQ_W(j) {2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, \
                 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1,    \
                 2*j, 2*j+1, 2*j, 2*j+1}
      TQ_W(0), TQ_W(1), TQ_W(2), TQ_W(3), TQ_W(4), TQ_W(5), TQ_W(6), TQ_W(7)};
#undef TQ_W
  float acc[NT], accm[NT];
  for (int t = 0; t < NT; ++t) acc[t] = accm[t] = 0.f;
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * TS;
    const float dw = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
    const __m256i sm = _mm256_cvtepu8_epi16(k4_scales_mins(b + 4));  // scales | mins, int16
    const __m256i sc = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm));
    const __m128i mn = _mm256_extracti128_si256(sm, 1);
    const __m256i mn2 = _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn));
    const uint8_t* qs = b + (Q5 ? 48 : 16);
    const __m256i qh = Q5 ? load256(b + 16) : _mm256_setzero_si256();
    __m256i isum[NT];
    for (int t = 0; t < NT; ++t) isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = load256(qs + 32 * c);
      __m256i lo = _mm256_and_si256(raw, m4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
      if (Q5) {  // bit 2c / 2c+1 of each qh byte → 0x10
        const __m256i h = _mm256_srli_epi16(qh, 2 * c);
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), m10));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), m10));
      }
      const __m256i slo = _mm256_shuffle_epi8(sc, load256(kPick[2 * c]));
      const __m256i shi = _mm256_shuffle_epi8(sc, load256(kPick[2 * c + 1]));
      for (int t = 0; t < NT; ++t) {
        const int8_t* y = a.qs(t0 + t, ib) + 64 * c;
        const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(y)), slo);
        const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(y + 32)), shi);
        isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(plo, phi));
      }
    }
    for (int t = 0; t < NT; ++t) {
      const float dy = a.dy(t0 + t, ib);
      const __m256i bs = load256(a.bsums.get() + (t0 + t) * (a.K / 16) + ib * 16);
      const int summ = hsum_i32(_mm256_madd_epi16(mn2, bs));  // Σ_j m_j·(bs_2j + bs_2j+1)
      acc[t] += dw * dy * float(hsum_i32(isum[t]));  // the block's exact integer sums
      accm[t] += dmin * dy * float(summ);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t] - accm[t];
}

// Q6_K: 16 sub-blocks of 16, values 0..63 − 32, int8 scales. Σ sc·(q−32)·y is computed as
// Σ sc·q·y − 32·Σ sc·bsum in int32 lanes, summed across lanes exactly before the one int →
// float conversion per block (as the generic kernel's, so the offset cancels exactly).
template <int NT>
void dot_q6k(const uint8_t* row, const Act& a, int64_t t0, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0xF), m30 = _mm256_set1_epi8(0x30);
  // word 2k of a 128-bit lane in the low half, word 2k+1 in the high half
  const __m256i pick[4] = {
      _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3),
      _mm256_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7),
      _mm256_setr_epi8(8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11),
      _mm256_setr_epi8(12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15)};
  float acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  for (int64_t ib = 0; ib < a.nb; ++ib) {
    const uint8_t* b = row + ib * 210;
    const float dw = h2f(rd16(b + 208));
    const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
    // scales 0..7 (first half) and 8..15 (second half) as int16 in both 128-bit lanes
    const __m256i sc_lo = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sc16));
    const __m256i sc_hi = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(sc16, 1));
    __m256i isum[NT];
    for (int t = 0; t < NT; ++t) {
      const __m256i bs = load256(a.bsums.get() + (t0 + t) * (a.K / 16) + ib * 16);
      isum[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i q0 = load256(b + 64 * h), q1 = load256(b + 64 * h + 32);
      const __m256i qh = load256(b + 128 + 32 * h);
      const __m256i v[4] = {
          _mm256_or_si256(_mm256_and_si256(q0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
          _mm256_or_si256(_mm256_and_si256(q1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q0, 4), m4), _mm256_and_si256(qh, m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q1, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30))};
      for (int k = 0; k < 4; ++k) {
        const __m256i s = _mm256_shuffle_epi8(h == 0 ? sc_lo : sc_hi, pick[k]);
        for (int t = 0; t < NT; ++t) {
          const __m256i y = load256(a.qs(t0 + t, ib) + 128 * h + 32 * k);
          isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(v[k], y), s));
        }
      }
    }
    for (int t = 0; t < NT; ++t) acc[t] += dw * a.dy(t0 + t, ib) * float(hsum_i32(isum[t]));
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}
#endif  // TQ_AVX2

// ---------------------------------------------------------------- dispatch and driver

// Kern<TYPE>::dot<NT>(row, act, t0, out): one weight row against tokens t0..t0+NT-1.
template <int TYPE> struct Kern;
#define TQ_SCALAR_DOT(fn)                                                              \
  template <int NT> static void dot(const uint8_t* r, const Act& a, int64_t t0, float* o) { \
    for (int t = 0; t < NT; ++t) o[t] = fn(r, a, t0 + t);                                 \
  }
#if TQ_AVX2
#define TQ_DOT(scalar_fn, avx_call)                                                        \
  template <int NT> static void dot(const uint8_t* r, const Act& a, int64_t t0, float* o) { \
    avx_call;                                                                               \
  }
#else
#define TQ_DOT(scalar_fn, avx_call) TQ_SCALAR_DOT(scalar_fn)
#endif
template <> struct Kern<Q4_0> { static constexpr int BS = 32, TS = 18, ACT = A_Q8_0;
  TQ_DOT((dot32_scalar<Q4_0, 18>), (dot32<Q4_0, 18, NT>(r, a, t0, o))) };
template <> struct Kern<Q5_0> { static constexpr int BS = 32, TS = 22, ACT = A_Q8_0;
  TQ_DOT((dot32_scalar<Q5_0, 22>), (dot32<Q5_0, 22, NT>(r, a, t0, o))) };
template <> struct Kern<Q8_0> { static constexpr int BS = 32, TS = 34, ACT = A_Q8_0;
  TQ_DOT((dot32_scalar<Q8_0, 34>), (dot32<Q8_0, 34, NT>(r, a, t0, o))) };
template <> struct Kern<Q4_1> { static constexpr int BS = 32, TS = 20, ACT = A_Q8_1;
  TQ_DOT((dot32_scalar<Q4_1, 20>), (dot32<Q4_1, 20, NT>(r, a, t0, o))) };
template <> struct Kern<Q5_1> { static constexpr int BS = 32, TS = 24, ACT = A_Q8_1;
  TQ_DOT((dot32_scalar<Q5_1, 24>), (dot32<Q5_1, 24, NT>(r, a, t0, o))) };
template <> struct Kern<Q4_K> { static constexpr int BS = 256, TS = 144, ACT = A_Q8_K;
  TQ_DOT(dot_q45k_scalar<false>, (dot_q45k<false, NT>(r, a, t0, o))) };
template <> struct Kern<Q5_K> { static constexpr int BS = 256, TS = 176, ACT = A_Q8_K;
  TQ_DOT(dot_q45k_scalar<true>, (dot_q45k<true, NT>(r, a, t0, o))) };
template <> struct Kern<Q6_K> { static constexpr int BS = 256, TS = 210, ACT = A_Q8_K;
  TQ_DOT(dot_q6k_scalar, (dot_q6k<NT>(r, a, t0, o))) };
// Row kernels of the types added later: scalar dot products in every build (the AVX2 and
// AVX-512 builds run Q3_K and IQ4_XS in panels, interleaved.cpp; Q2_K and IQ4_NL here).
template <> struct Kern<Q2_K> { static constexpr int BS = 256, TS = 84, ACT = A_Q8_K;
  TQ_SCALAR_DOT(dot_q2k_scalar) };
template <> struct Kern<Q3_K> { static constexpr int BS = 256, TS = 110, ACT = A_Q8_K;
  TQ_SCALAR_DOT(dot_q3k_scalar) };
template <> struct Kern<IQ4_XS> { static constexpr int BS = 256, TS = 136, ACT = A_Q8_K;
  TQ_SCALAR_DOT(dot_iq4xs_scalar) };
template <> struct Kern<IQ4_NL> { static constexpr int BS = 32, TS = 18, ACT = A_Q8_0;
  TQ_SCALAR_DOT(dot_iq4nl_scalar) };

constexpr int64_t TOKENS = 4;                // tokens per weight-row pass (register tile)
constexpr int64_t TILE_BYTES = 96 << 10;     // M > 1: weight rows per chunk, kept in L2
constexpr int64_t MIN_CHUNK_BYTES = 16 << 10;
constexpr int64_t MAX_CHUNK_BYTES = 1 << 20;

// One weight matrix of a call and its output: y (M, N) = x · Wᵀ.
struct Part {
  const uint8_t* w;
  int64_t wstride, N;
  float* y;
};

// y[t, r] = row r · token t for every part (weights sharing one input and type: q/k/v, or
// gate/up). Rows are cut into chunks (about 8 per thread over all parts, so a slow thread
// leaves little behind); within a chunk each row is read from memory once, for the first
// group of TOKENS tokens, and from cache for the other groups. A row's result does not depend
// on the chunking, the other parts or the other tokens (the same dot, in the same order).
template <int TYPE>
void run(const std::vector<Part>& parts, const Act& a) {
  using KT = Kern<TYPE>;
  const int64_t M = a.M, row_bytes = a.K / KT::BS * KT::TS;
  const int64_t threads = kernel_threads();
  const int64_t max_bytes = M == 1 ? MAX_CHUNK_BYTES : TILE_BYTES;
  int64_t total = 0;
  for (const Part& p : parts) total += p.N;
  int64_t rows = (total + threads * 8 - 1) / (threads * 8);
  rows = std::min(rows, std::max<int64_t>(1, max_bytes / row_bytes));
  rows = std::max(rows, MIN_CHUNK_BYTES / (row_bytes * std::min<int64_t>(M, TOKENS)));
  rows = std::max<int64_t>(rows, 1);
  std::vector<std::pair<int, int64_t>> chunks;  // (part, first row)
  for (int i = 0; i < int(parts.size()); ++i)
    for (int64_t r0 = 0; r0 < parts[i].N; r0 += rows) chunks.emplace_back(i, r0);
  parallel_chunks(int64_t(chunks.size()), [&](int64_t c) {
    float o[TOKENS];
    const Part& p = parts[chunks[c].first];
    const int64_t r0 = chunks[c].second, r1 = std::min(p.N, r0 + rows);
    for (int64_t t0 = 0; t0 < M; t0 += TOKENS) {
      const int64_t nt = std::min(TOKENS, M - t0);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = p.w + r * p.wstride;
        switch (nt) {
          case 4: KT::template dot<4>(row, a, t0, o); break;
          case 3: KT::template dot<3>(row, a, t0, o); break;
          case 2: KT::template dot<2>(row, a, t0, o); break;
          default: KT::template dot<1>(row, a, t0, o); break;
        }
        for (int64_t t = 0; t < nt; ++t) p.y[(t0 + t) * p.N + r] = o[t];
      }
    }
  });
}

struct TypeInfo { int bs, ts, act; void (*fn)(const std::vector<Part>&, const Act&); };

bool type_info(int type, TypeInfo* ti) {
  switch (type) {
#define TQ_CASE(T) case T: *ti = {Kern<T>::BS, Kern<T>::TS, Kern<T>::ACT, &run<T>}; return true;
    TQ_CASE(Q4_0) TQ_CASE(Q4_1) TQ_CASE(Q5_0) TQ_CASE(Q5_1) TQ_CASE(Q8_0)
    TQ_CASE(Q4_K) TQ_CASE(Q5_K) TQ_CASE(Q6_K)
    TQ_CASE(Q2_K) TQ_CASE(Q3_K) TQ_CASE(IQ4_XS) TQ_CASE(IQ4_NL)
#undef TQ_CASE
    default: return false;
  }
}

// ---------------------------------------------------------------- Python entry points

// x (M, K) against several packed weights of one type → one (M, N_i) output each; the
// activations are quantized once and one parallel job covers every weight's rows.
std::vector<torch::Tensor> qmatmul_many(torch::Tensor x, std::vector<torch::Tensor> ws,
                                        int64_t ggml_type) {
  TypeInfo ti;
  TORCH_CHECK(type_info(int(ggml_type), &ti), "qmatmul: unsupported ggml type ", ggml_type);
  TORCH_CHECK(x.device().is_cpu(), "qmatmul: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "qmatmul: x must be (M, K) float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % ti.bs == 0, "qmatmul: K=", K, " is not a whole number of ", ti.bs, "-element blocks");
  std::vector<torch::Tensor> ys;
  std::vector<Part> parts;
  for (auto& w : ws) {
    TORCH_CHECK(w.device().is_cpu(), "qmatmul: CPU tensors only");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8, "qmatmul: w must be (N, row_bytes) uint8");
    TORCH_CHECK(w.size(1) == K / ti.bs * ti.ts, "qmatmul: w rows hold ", w.size(1), " bytes, K=", K,
                " needs ", K / ti.bs * ti.ts);
    if (w.size(1) > 0 && w.stride(1) != 1) w = w.contiguous();
    ys.push_back(torch::empty({M, w.size(0)}, x.options()));
    if (K == 0) ys.back().zero_();
    if (w.size(0) > 0) parts.push_back({w.data_ptr<uint8_t>(), w.stride(0), w.size(0),
                                        ys.back().data_ptr<float>()});
  }
  if (M == 0 || K == 0 || parts.empty()) return ys;
  x = x.contiguous();
  const Act a = quantize_act(x.data_ptr<float>(), M, K, ti.act);
  ti.fn(parts, a);
  return ys;
}

torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t ggml_type) {
  return qmatmul_many(x, {w}, ggml_type)[0];
}

// The quantized activations themselves, for tests: (q int8 (M, K), d (M, nb), s (M, nb) or
// empty, bsums int16 (M, K/16) or empty) for vec_dot kind 0 = Q8_0, 1 = Q8_1, 2 = Q8_K.
std::vector<torch::Tensor> quantize_activations(torch::Tensor x, int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (Q8_0), 1 (Q8_1) or 2 (Q8_K)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be (M, K) float32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), bs = kind == A_Q8_K ? 256 : 32;
  TORCH_CHECK(K % bs == 0, "K must be a multiple of ", bs);
  const Act a = quantize_act(x.data_ptr<float>(), M, K, int(kind));
  auto q = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, a.nb}, torch::kFloat32);
  auto s = torch::empty({kind == A_Q8_1 ? M : 0, a.nb}, torch::kFloat32);
  auto bsums = torch::empty({kind == A_Q8_K ? M : 0, K / 16}, torch::kInt16);
  std::memcpy(q.data_ptr<int8_t>(), a.q.get(), M * K);
  std::memcpy(d.data_ptr<float>(), a.d.get(), M * a.nb * sizeof(float));
  if (kind == A_Q8_1) std::memcpy(s.data_ptr<float>(), a.s.get(), M * a.nb * sizeof(float));
  if (kind == A_Q8_K) std::memcpy(bsums.data_ptr<int16_t>(), a.bsums.get(), M * (K / 16) * 2);
  return {q, d, s, bsums};
}

bool supports(int64_t ggml_type) { TypeInfo ti; return type_info(int(ggml_type), &ti); }

}  // namespace

void register_small_ops(pybind11::module& m);  // small_ops.cpp
void register_paged_attention(pybind11::module& m);  // paged_attention.cpp
void register_interleaved(pybind11::module& m);  // interleaved.cpp
void register_moe(pybind11::module& m);  // moe.cpp
void register_delta_rule(pybind11::module& m);  // delta_rule.cpp
void register_moe_ffn(pybind11::module& m);  // moe_ffn.cpp
void register_short_conv(pybind11::module& m);  // short_conv.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_small_ops(m);
  register_paged_attention(m);
  register_interleaved(m);
  register_moe_ffn(m);
  register_moe(m);
  register_delta_rule(m);
  register_short_conv(m);
  m.def("qmatmul", &qmatmul, "y (M, N) = x (M, K) float32 · Wᵀ, W packed GGML rows (N, row_bytes)",
        py::call_guard<py::gil_scoped_release>());
  m.def("qmatmul_many", &qmatmul_many, "[x · W_iᵀ] for weights of one type sharing the input x",
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_activations", &quantize_activations, "x quantized as llama.cpp's vec_dot type",
        py::call_guard<py::gil_scoped_release>());
  m.def("supports", &supports, "whether a ggml type number has a kernel");
  m.def("set_num_threads", &set_num_threads, "threads for the kernel (0: follow torch's count)");
  m.def("get_num_threads", &get_num_threads, "threads the kernel uses now");
  m.attr("ISA") = TQ_VNNI ? "avx512vnni" : TQ_AVX2 ? "avx2" : "scalar";
}
