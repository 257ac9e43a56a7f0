// Weights in row panels: y = x · Wᵀ with W re-laid out once at load so that one SIMD
// instruction serves 16 (AVX-512) or 8 (AVX2) output rows.
//
// A GGML tensor stores each row's blocks one after another, so a dot product ends every
// 32-element block with a horizontal sum and a scale per row. Here rows go in panels of
// R = 16: for each block index, the panel holds the 16 rows' scales side by side, then the
// quantized values in "groups" of 64 bytes, 4 bytes of each row in turn. One vpdpbusd of a
// group against 4 activation bytes broadcast to every lane adds 4 products to each row's
// own int32 lane: no horizontal sums, no shuffles, one scale vector per block for 16 rows.
// The bytes per row are the GGML type's own (Q4_K: +2.8%, its 6-bit scales kept as bytes),
// and the rows are the same numbers: `deinterleave` gives the GGML blocks back exactly.
//
// Panel layout, per type: planes of per-block records, each plane contiguous in the panel
// (so the quantized values stay 64-byte aligned when the panel is):
//   D  fp16 scales, 16 rows (Q4_1: then 16 mins; Q4_K, Q5_K: then 16 dmins; MXFP4: the 16
//      rows' E8M0 bytes instead, turned into float scales 2^(e − 128) in the kernel)
//   S  (K-quants, IQ4_XS) sub-block scales as bytes, [sub-block][row] (Q4_K, Q5_K: then the
//      mins; Q3_K, IQ4_XS: signed, the 6-bit value − 32)
//   H  high bits as 64-bit masks, bit 4·r + i = byte i of row r in a group (Q5_0, Q5_K: bit
//      4; Q6_K: bits 4 and 5). Q3_K: its high bits in nibbles instead, see below.
//   Q  nibbles: per 32 elements ("chunk") 16 bytes per row, low nibble element i, high
//      nibble element 16 + i (Q4_0's own order), in 4 groups of 4 bytes; Q8_0: value + 128
//      as bytes, 8 groups; IQ4_XS, MXFP4: the nibbles index the non-linear levels (MXFP4:
//      the doubled E2M1 values, GGML's own 16 bytes of a block).
// Q3_K: per 128 elements ("half" hh) 8 groups of 4 bytes per row; byte i of row r in group g
// (lane 4·r + i) holds the 3-bit values v_k of elements 128·hh + 32·k + 4·g + i, k = 0..3
// (GGML's qs byte 32·hh + 4·g + i, crumb k, and hmask byte 4·g + i, bit 4·hh + k): its Q
// byte is v0 | v1 << 3 | (v2 & 3) << 6, and a nibble of its group's 32 H bytes is
// v3 | (v2 >> 2) << 3 (the low nibble of byte j = lane j for rows 0-7, the high nibble of
// byte j − 32 for rows 8-15). A value is one to three shifts and masks away.
// Values are unsigned (Q4_0 0..15, Q5_0 0..31, Q8_0 0..255, Q6_K 0..63, Q3_K 0..7, IQ4_XS
// level + 128, MXFP4 value + 12); the offset (8, 16, 128, 32, 4, 128, 12) comes off through
// the activation block sums, exactly, in the integer domain.
//
// Numerics: llama.cpp's (the same activation quantization and exact integer block sums as
// qmatmul.cpp); per token and row, blocks are summed in order in float32, so a row of the
// output depends neither on the other tokens of the call nor on the threads.
//
// Kernels: the "avx512vnni" build (AVX512F/BW/VNNI, 16 rows per vpdpbusd) and the "avx2" one
// (8 rows per maddubs + madd, the panel in two halves), bit-identical results; none in the
// portable build. `interleave`/`deinterleave` are portable and in every build.

#include "common.h"

#include <sys/mman.h>

#include <cstdlib>
#include <type_traits>

namespace {

using namespace tq;

constexpr int R = 16;  // rows per panel

// Bytes per block index per panel in each plane.
struct Layout {
  int bs, ts;          // GGML block: elements, bytes
  int64_t d, s, h, q;  // planes D, S, H, Q
  constexpr int64_t block() const { return d + s + h + q; }
};

constexpr Layout layout_of(int type) {
  switch (type) {
    case Q4_0: return {32, 18, 32, 0, 0, 256};
    case Q4_1: return {32, 20, 64, 0, 0, 256};
    case Q5_0: return {32, 22, 32, 0, 64, 256};
    case Q8_0: return {32, 34, 32, 0, 0, 512};
    case Q4_K: return {256, 144, 64, 256, 0, 2048};
    case Q5_K: return {256, 176, 64, 256, 512, 2048};
    case Q6_K: return {256, 210, 32, 256, 1024, 2048};
    case Q3_K: return {256, 110, 32, 256, 512, 1024};
    case IQ4_XS: return {256, 136, 32, 128, 0, 2048};
    case MXFP4: return {32, 17, 16, 0, 0, 256};
    default: return {0, 0, 0, 0, 0, 0};
  }
}

bool has_layout(int type) { return layout_of(type).bs != 0; }

int64_t panel_bytes(int type, int64_t K) {
  const Layout L = layout_of(type);
  return K / L.bs * L.block();
}

// ---------------------------------------------------------------- one GGML block, unpacked

// A block's numbers: raw fp16 scale bits, sub-block scales, unsigned values in element order.
struct Canon {
  uint16_t d = 0, m = 0;  // d; Q4_1 min, Q4_K/Q5_K dmin
  uint8_t sc[16] = {}, mn[8] = {};  // Q3_K, IQ4_XS: the signed scales' bytes
  uint8_t q[256] = {};
};

inline void wr16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

void to_canon(int type, const uint8_t* b, Canon& c) {
  switch (type) {
    case Q4_0: case Q4_1: {
      const uint8_t* qs = b + (type == Q4_0 ? 2 : 4);
      c.d = rd16(b);
      if (type == Q4_1) c.m = rd16(b + 2);
      for (int j = 0; j < 16; ++j) { c.q[j] = qs[j] & 0xF; c.q[j + 16] = qs[j] >> 4; }
      break;
    }
    case Q5_0: {
      const uint32_t qh = rd32(b + 2);
      c.d = rd16(b);
      for (int j = 0; j < 16; ++j) {
        c.q[j] = (b[6 + j] & 0xF) | (((qh >> j) & 1) << 4);
        c.q[j + 16] = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      break;
    }
    case Q8_0:
      c.d = rd16(b);
      for (int j = 0; j < 32; ++j) c.q[j] = uint8_t(b[2 + j] ^ 0x80);  // int8 + 128
      break;
    case Q4_K: {
      c.d = rd16(b);
      c.m = rd16(b + 2);
      const uint8_t* s = b + 4;
      for (int j = 0; j < 4; ++j) {
        c.sc[j] = s[j] & 63;
        c.mn[j] = s[j + 4] & 63;
        c.sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        c.mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
      }
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 32; ++l) {
          c.q[64 * k + l] = b[16 + 32 * k + l] & 0xF;
          c.q[64 * k + 32 + l] = b[16 + 32 * k + l] >> 4;
        }
      break;
    }
    case Q6_K:
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b + 64 * h;
        const uint8_t* qh = b + 128 + 32 * h;
        uint8_t* o = c.q + 128 * h;
        for (int l = 0; l < 32; ++l) {
          o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
          o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
          o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
          o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
      }
      std::memcpy(c.sc, b + 192, 16);
      c.d = rd16(b + 208);
      break;
  }
}

void from_canon(int type, const Canon& c, uint8_t* b) {
  switch (type) {
    case Q4_0: case Q4_1: {
      uint8_t* qs = b + (type == Q4_0 ? 2 : 4);
      wr16(b, c.d);
      if (type == Q4_1) wr16(b + 2, c.m);
      for (int j = 0; j < 16; ++j) qs[j] = uint8_t(c.q[j] | (c.q[j + 16] << 4));
      break;
    }
    case Q5_0: {
      uint32_t qh = 0;
      wr16(b, c.d);
      for (int j = 0; j < 16; ++j) {
        b[6 + j] = uint8_t((c.q[j] & 0xF) | ((c.q[j + 16] & 0xF) << 4));
        qh |= uint32_t(c.q[j] >> 4) << j | uint32_t(c.q[j + 16] >> 4) << (j + 16);
      }
      std::memcpy(b + 2, &qh, 4);
      break;
    }
    case Q8_0:
      wr16(b, c.d);
      for (int j = 0; j < 32; ++j) b[2 + j] = uint8_t(c.q[j] ^ 0x80);
      break;
    case MXFP4:  // d: the E8M0 byte
      b[0] = uint8_t(c.d);
      for (int j = 0; j < 16; ++j) b[1 + j] = uint8_t(c.q[j] | (c.q[j + 16] << 4));
      break;
    case Q4_K: {
      wr16(b, c.d);
      wr16(b + 2, c.m);
      uint8_t* s = b + 4;
      for (int j = 0; j < 4; ++j) {
        s[j] = uint8_t((c.sc[j] & 63) | ((c.sc[j + 4] >> 4) << 6));
        s[j + 4] = uint8_t((c.mn[j] & 63) | ((c.mn[j + 4] >> 4) << 6));
        s[j + 8] = uint8_t((c.sc[j + 4] & 0xF) | ((c.mn[j + 4] & 0xF) << 4));
      }
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 32; ++l)
          b[16 + 32 * k + l] = uint8_t(c.q[64 * k + l] | (c.q[64 * k + 32 + l] << 4));
      break;
    }
    case Q5_K: {
      wr16(b, c.d);
      wr16(b + 2, c.m);
      uint8_t* s = b + 4;
      for (int j = 0; j < 4; ++j) {
        s[j] = uint8_t((c.sc[j] & 63) | ((c.sc[j + 4] >> 4) << 6));
        s[j + 4] = uint8_t((c.mn[j] & 63) | ((c.mn[j + 4] >> 4) << 6));
        s[j + 8] = uint8_t((c.sc[j + 4] & 0xF) | ((c.mn[j + 4] & 0xF) << 4));
      }
      uint8_t* qh = b + 16;
      std::memset(qh, 0, 32);
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = c.q[64 * k + l], hi = c.q[64 * k + 32 + l];
          b[48 + 32 * k + l] = uint8_t((lo & 0xF) | ((hi & 0xF) << 4));
          qh[l] |= uint8_t((lo >> 4) << (2 * k) | (hi >> 4) << (2 * k + 1));
        }
      break;
    }
    case Q3_K: {
      std::memset(b, 0, 108);
      for (int e = 0; e < 256; ++e) {
        const int i = e >> 5, l = e & 31;
        b[32 + 32 * (i >> 2) + l] |= uint8_t((c.q[e] & 3) << (2 * (i & 3)));
        b[l] |= uint8_t((c.q[e] >> 2) << i);
      }
      for (int j = 0; j < 16; ++j) {
        const int u = int(int8_t(c.sc[j])) + 32;  // 0..63
        b[96 + j % 8] |= uint8_t((u & 0xF) << (j < 8 ? 0 : 4));
        b[104 + j % 4] |= uint8_t((u >> 4) << (2 * (j / 4)));
      }
      wr16(b + 108, c.d);
      break;
    }
    case IQ4_XS: {
      wr16(b, c.d);
      uint16_t h = 0;
      std::memset(b + 4, 0, 4);
      for (int j = 0; j < 8; ++j) {
        const int u = int(int8_t(c.sc[j])) + 32;
        b[4 + j / 2] |= uint8_t((u & 0xF) << (4 * (j % 2)));
        h |= uint16_t((u >> 4) << (2 * j));
      }
      wr16(b + 2, h);
      for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 16; ++l)
          b[8 + 16 * j + l] = uint8_t(c.q[32 * j + l] | (c.q[32 * j + 16 + l] << 4));
      break;
    }
    case Q6_K:
      for (int h = 0; h < 2; ++h) {
        uint8_t* ql = b + 64 * h;
        uint8_t* qh = b + 128 + 32 * h;
        const uint8_t* o = c.q + 128 * h;
        for (int l = 0; l < 32; ++l) {
          ql[l] = uint8_t((o[l] & 0xF) | ((o[l + 64] & 0xF) << 4));
          ql[l + 32] = uint8_t((o[l + 32] & 0xF) | ((o[l + 96] & 0xF) << 4));
          qh[l] = uint8_t((o[l] >> 4) | ((o[l + 32] >> 4) << 2) | ((o[l + 64] >> 4) << 4) |
                          ((o[l + 96] >> 4) << 6));
        }
      }
      std::memcpy(b + 192, c.sc, 16);
      wr16(b + 208, c.d);
      break;
  }
}

// ---------------------------------------------------------------- panel records
// Where row r's numbers of one block go in (and come back from) the block's record.

struct Record {  // pointers to one block index's slice of each plane
  uint8_t *d, *s, *h, *q;
};

inline Record record(uint8_t* panel, const Layout& L, int64_t nb, int64_t b) {
  uint8_t* d = panel + b * L.d;
  uint8_t* s = panel + nb * L.d + b * L.s;
  uint8_t* h = panel + nb * (L.d + L.s) + b * L.h;
  uint8_t* q = panel + nb * (L.d + L.s + L.h) + b * L.q;
  return {d, s, h, q};
}

// Byte of element e (within a 32-element chunk) of row r, in the chunk's 256 nibble bytes:
// which byte, and whether it is the high nibble.
inline int nibble_pos(int r, int e, bool* high) {
  *high = e >= 16;
  const int i = e & 15;
  return (i >> 2) * 64 + r * 4 + (i & 3);
}

// Bit 4·r + (i & 3) of the group's mask for element e of a chunk: (mask index, bit).
inline int mask_bit(int r, int e, int* index) {
  const int i = e & 15;
  *index = (i >> 2) * 2 + (e >= 16);  // group-major: lo mask, hi mask
  return 4 * r + (i & 3);
}

inline bool get_bit(const uint8_t* masks, int index, int bit) {
  return (masks[index * 8 + bit / 8] >> (bit % 8)) & 1;
}

inline void or_mask(uint8_t* m, int r, uint32_t nib) {  // bits 4r..4r+3 of a 64-bit mask
  uint64_t v;
  std::memcpy(&v, m, 8);
  v |= uint64_t(nib) << (4 * r);
  std::memcpy(m, &v, 8);
}
inline uint32_t bit_of4(const uint8_t* q, int shift) {  // bit `shift` of q[0..3] as 4 bits
  return ((q[0] >> shift) & 1) | ((q[1] >> shift) & 1) << 1 | ((q[2] >> shift) & 1) << 2 |
         ((q[3] >> shift) & 1) << 3;
}

// Q6_K's numbers of row r into a block's record: its 6-bit values are split anew into
// nibbles and two high-bit masks per group (bit 4 lo, hi; bit 5 lo, hi), so it goes through
// Canon; every other type takes put_direct.
void put_q6k(const Canon& c, Record rec, int r) {
  wr16(rec.d + 2 * r, c.d);
  for (int j = 0; j < 16; ++j) rec.s[16 * j + r] = c.sc[j];
  for (int chunk = 0; chunk < 8; ++chunk) {
    const uint8_t* q = c.q + 32 * chunk;
    for (int g = 0; g < 4; ++g) {
      const uint8_t* lo = q + 4 * g;
      const uint8_t* hi = q + 16 + 4 * g;
      uint8_t* dst = rec.q + 256 * chunk + g * 64 + r * 4;
      for (int i = 0; i < 4; ++i) dst[i] = uint8_t((lo[i] & 0xF) | ((hi[i] & 0xF) << 4));
      uint8_t* m = rec.h + 128 * chunk + 32 * g;
      or_mask(m, r, bit_of4(lo, 4));
      or_mask(m + 8, r, bit_of4(hi, 4));
      or_mask(m + 16, r, bit_of4(lo, 5));
      or_mask(m + 24, r, bit_of4(hi, 5));
    }
  }
}

// A GGML block of row r straight into its record, for the types whose values already sit in
// nibbles or bytes (loading a 1.1B Q4_0 model spends its time here). False for Q6_K.
bool put_direct(int type, const uint8_t* b, Record rec, int r) {
  switch (type) {
    case Q4_0: case Q4_1: case Q5_0: {
      const int qoff = type == Q4_0 ? 2 : type == Q4_1 ? 4 : 6;
      std::memcpy(rec.d + 2 * r, b, 2);
      if (type == Q4_1) std::memcpy(rec.d + 32 + 2 * r, b + 2, 2);
      for (int g = 0; g < 4; ++g) std::memcpy(rec.q + 64 * g + 4 * r, b + qoff + 4 * g, 4);
      if (type == Q5_0) {
        const uint32_t qh = rd32(b + 2);
        for (int g = 0; g < 4; ++g) {
          or_mask(rec.h + 16 * g, r, (qh >> (4 * g)) & 0xF);
          or_mask(rec.h + 16 * g + 8, r, (qh >> (16 + 4 * g)) & 0xF);
        }
      }
      return true;
    }
    case MXFP4:  // the E8M0 byte, then Q4_0's nibble order
      rec.d[r] = b[0];
      for (int g = 0; g < 4; ++g) std::memcpy(rec.q + 64 * g + 4 * r, b + 1 + 4 * g, 4);
      return true;
    case Q8_0:
      std::memcpy(rec.d + 2 * r, b, 2);
      for (int g = 0; g < 8; ++g)
        for (int i = 0; i < 4; ++i) rec.q[64 * g + 4 * r + i] = uint8_t(b[2 + 4 * g + i] ^ 0x80);
      return true;
    case Q4_K: case Q5_K: {
      std::memcpy(rec.d + 2 * r, b, 2);
      std::memcpy(rec.d + 32 + 2 * r, b + 2, 2);
      const uint8_t* s = b + 4;
      const uint8_t* qs = b + (type == Q5_K ? 48 : 16);
      for (int j = 0; j < 4; ++j) {
        rec.s[16 * j + r] = s[j] & 63;
        rec.s[128 + 16 * j + r] = s[j + 4] & 63;
        rec.s[16 * (j + 4) + r] = uint8_t((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        rec.s[128 + 16 * (j + 4) + r] = uint8_t((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
      }
      for (int k = 0; k < 4; ++k) {  // 64 elements: sub-block 2k low nibbles, 2k + 1 high
        const uint8_t* src = qs + 32 * k;
        uint8_t* lo = rec.q + 256 * (2 * k) + 4 * r;
        uint8_t* hi = rec.q + 256 * (2 * k + 1) + 4 * r;
        for (int i = 0; i < 16; ++i) {
          lo[64 * (i >> 2) + (i & 3)] = uint8_t((src[i] & 0xF) | ((src[16 + i] & 0xF) << 4));
          hi[64 * (i >> 2) + (i & 3)] = uint8_t((src[i] >> 4) | (src[16 + i] & 0xF0));
        }
      }
      if (type == Q5_K) {  // bit j of qh[l] is element 32j + l's bit 4: chunk j's masks
        const uint8_t* qh = b + 16;
        for (int j = 0; j < 8; ++j)
          for (int g = 0; g < 4; ++g) {
            or_mask(rec.h + 64 * j + 16 * g, r, bit_of4(qh + 4 * g, j));
            or_mask(rec.h + 64 * j + 16 * g + 8, r, bit_of4(qh + 16 + 4 * g, j));
          }
      }
      return true;
    }
    case Q3_K: {
      std::memcpy(rec.d + 2 * r, b + 108, 2);
      int8_t sc[16];
      q3k_scales(b + 96, sc);
      for (int j = 0; j < 16; ++j) rec.s[16 * j + r] = uint8_t(sc[j]);
      for (int hh = 0; hh < 2; ++hh)
        for (int g = 0; g < 8; ++g)
          for (int i = 0; i < 4; ++i) {
            const int qs = b[32 + 32 * hh + 4 * g + i], hm = b[4 * g + i] >> (4 * hh);
            int v[4];
            for (int k = 0; k < 4; ++k) v[k] = ((qs >> (2 * k)) & 3) | ((hm >> k) & 1) << 2;
            rec.q[512 * hh + 64 * g + 4 * r + i] = uint8_t(v[0] | v[1] << 3 | (v[2] & 3) << 6);
            rec.h[256 * hh + 32 * g + 4 * (r & 7) + i] |=
                uint8_t((v[3] | (v[2] >> 2) << 3) << (r < 8 ? 0 : 4));
          }
      return true;
    }
    case IQ4_XS: {
      std::memcpy(rec.d + 2 * r, b, 2);
      int8_t sc[8];
      iq4xs_scales(b + 2, sc);
      for (int j = 0; j < 8; ++j) {
        rec.s[16 * j + r] = uint8_t(sc[j]);
        for (int g = 0; g < 4; ++g) std::memcpy(rec.q + 256 * j + 64 * g + 4 * r, b + 8 + 16 * j + 4 * g, 4);
      }
      return true;
    }
    default:
      return false;
  }
}

void get(int type, const Layout& L, Record rec, int r, Canon& c) {
  c.d = type == MXFP4 ? rec.d[r] : rd16(rec.d + 2 * r);
  if (type == Q4_1 || type == Q4_K || type == Q5_K) c.m = rd16(rec.d + 32 + 2 * r);
  if (type == Q4_K || type == Q5_K) {
    for (int j = 0; j < 8; ++j) { c.sc[j] = rec.s[16 * j + r]; c.mn[j] = rec.s[128 + 16 * j + r]; }
  }
  if (type == Q6_K || type == Q3_K) for (int j = 0; j < 16; ++j) c.sc[j] = rec.s[16 * j + r];
  if (type == IQ4_XS) for (int j = 0; j < 8; ++j) c.sc[j] = rec.s[16 * j + r];
  if (type == Q3_K) {
    for (int e = 0; e < 256; ++e) {
      const int hh = e >> 7, k = (e >> 5) & 3, l = e & 31, g = l >> 2, i = l & 3;
      const int qb = rec.q[512 * hh + 64 * g + 4 * r + i];
      const int nib = (rec.h[256 * hh + 32 * g + 4 * (r & 7) + i] >> (r < 8 ? 0 : 4)) & 0xF;
      c.q[e] = uint8_t(k == 0 ? qb & 7 : k == 1 ? (qb >> 3) & 7 : k == 2 ? qb >> 6 | (nib >> 3) << 2 : nib & 7);
    }
    return;
  }
  if (type == Q8_0) {
    for (int e = 0; e < 32; ++e) c.q[e] = rec.q[(e >> 2) * 64 + r * 4 + (e & 3)];
    return;
  }
  for (int e = 0; e < L.bs; ++e) {
    const int chunk = e / 32, ce = e % 32;
    bool high;
    const uint8_t byte = rec.q[chunk * 256 + nibble_pos(r, ce, &high)];
    uint8_t v = high ? byte >> 4 : byte & 0xF;
    int index;
    const int bit = mask_bit(r, ce, &index);
    if (type == Q5_0 || type == Q5_K) v |= uint8_t(get_bit(rec.h + 64 * chunk, index, bit) << 4);
    if (type == Q6_K) {
      const uint8_t* m = rec.h + chunk * 128 + (index / 2) * 32;
      v |= uint8_t(get_bit(m, index % 2, bit) << 4 | get_bit(m, 2 + index % 2, bit) << 5);
    }
    c.q[e] = v;
  }
}

// ---------------------------------------------------------------- repacking entry points

void check_type(int64_t type) {
  TORCH_CHECK(has_layout(int(type)), "interleave: no panel layout for ggml type ", type,
              " (Q4_0, Q4_1, Q5_0, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, MXFP4 have one)");
}

// Panel memory: slabs of 2 MiB-aligned memory that the kernel is asked to back with
// transparent huge pages (MADV_HUGEPAGE; where THP is "madvise" only, as on this project's
// VMs, nothing else gets them). The kernels stream whole tensors, and on 4 KiB pages each
// page costs a page walk and restarts the hardware prefetcher's stream (figures:
// docs/kernels.md). Small tensors share slabs (most of a small model's are under 2 MiB); a
// slab is freed with the last tensor carved from it, and only the bytes handed out are ever
// touched.
class Slabs {
 public:
  static Slabs& instance() {
    static Slabs* slabs = new Slabs();  // never destroyed: tensors may outlive static teardown
    return *slabs;
  }

  // A zeroed (rows, cols) uint8 tensor, 64-byte aligned.
  torch::Tensor zeros(int64_t rows, int64_t cols) {
    const size_t bytes = (size_t(std::max<int64_t>(rows * cols, 1)) + 63) / 64 * 64;
    Slab* slab;
    uint8_t* at;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > SLAB / 4) {
        slab = make(bytes);  // a slab of its own
      } else {
        if (current_ == nullptr || current_->used + bytes > current_->size) {
          if (current_ != nullptr) drop(current_);  // the allocator's own reference
          current_ = make(SLAB);
        }
        slab = current_;
      }
      at = slab->mem + slab->used;
      slab->used += bytes;
      slab->refs.fetch_add(1, std::memory_order_relaxed);
      if (slab != current_) drop(slab);  // a slab of its own: only the tensor holds it
    }
    std::memset(at, 0, bytes);
    return torch::from_blob(at, {rows, cols}, [slab](void*) { drop(slab); },
                            torch::TensorOptions().dtype(torch::kUInt8));
  }

 private:
  static constexpr size_t HUGE = size_t(2) << 20, SLAB = size_t(32) << 20;
  struct Slab {
    uint8_t* mem;
    size_t size, used;
    std::atomic<int64_t> refs;
  };

  static Slab* make(size_t bytes) {
    const size_t size = (bytes + HUGE - 1) / HUGE * HUGE;
    void* mem = std::aligned_alloc(HUGE, size);
    TORCH_CHECK(mem != nullptr, "interleave: cannot allocate ", size, " bytes for panels");
#ifdef MADV_HUGEPAGE
    madvise(mem, size, MADV_HUGEPAGE);  // advice only: without THP the pages are ordinary
#endif
    return new Slab{static_cast<uint8_t*>(mem), size, 0, {1}};
  }

  static void drop(Slab* slab) {
    if (slab->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::free(slab->mem);
      delete slab;
    }
  }

  std::mutex mu_;
  Slab* current_ = nullptr;  // the slab small tensors are carved from (holds one reference)
};

// w (N, row_bytes) GGML rows → (ceil(N/16), panel_bytes) panels; rows past N are zeros.
torch::Tensor interleave(torch::Tensor w, int64_t type) {
  check_type(type);
  const Layout L = layout_of(int(type));
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == torch::kUInt8,
              "interleave: w must be a (N, row_bytes) uint8 CPU tensor");
  TORCH_CHECK(w.size(1) % L.ts == 0, "interleave: rows of ", w.size(1), " bytes are not whole ",
              L.ts, "-byte blocks");
  w = w.contiguous();
  const int64_t N = w.size(0), nb = w.size(1) / L.ts, P = (N + R - 1) / R;
  auto out = Slabs::instance().zeros(P, nb * L.block());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t pb = out.size(1);
  parallel_chunks(P, [&](int64_t p) {
    Canon c;
    for (int r = 0; r < R && p * R + r < N; ++r) {
      const uint8_t* row = src + (p * R + r) * w.size(1);
      for (int64_t b = 0; b < nb; ++b) {
        const Record rec = record(dst + p * pb, L, nb, b);
        if (put_direct(int(type), row + b * L.ts, rec, r)) continue;
        to_canon(int(type), row + b * L.ts, c);  // Q6_K
        put_q6k(c, rec, r);
      }
    }
  });
  return out;
}

// The GGML rows `ids` (int64, each in [0, N)) of N rows in panels, as (len(ids), row_bytes).
torch::Tensor deinterleave(torch::Tensor panels, torch::Tensor ids, int64_t type, int64_t K,
                           int64_t N) {
  check_type(type);
  const Layout L = layout_of(int(type));
  TORCH_CHECK(K > 0 && K % L.bs == 0, "deinterleave: K=", K, " is not whole ", L.bs, "-element blocks");
  const int64_t nb = K / L.bs;
  TORCH_CHECK(panels.dim() == 2 && panels.scalar_type() == torch::kUInt8 && panels.is_contiguous()
              && panels.size(1) == nb * L.block(), "deinterleave: panels must be (P, ",
              nb * L.block(), ") contiguous uint8");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kInt64, "deinterleave: ids must be 1-D int64");
  ids = ids.contiguous();
  TORCH_CHECK(N >= 0 && N <= panels.size(0) * R, "deinterleave: ", panels.size(0),
              " panels do not hold N=", N, " rows");
  const int64_t n = ids.size(0), rows = N;
  auto out = torch::empty({n, nb * L.ts}, torch::kUInt8);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "deinterleave: row ", id[i], " is out of range [0, ", rows, ")");
  uint8_t* base = panels.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    Canon c;
    uint8_t* panel = base + (id[i] / R) * panels.size(1);
    for (int64_t b = 0; b < nb; ++b) {
      get(int(type), L, record(panel, L, nb, b), int(id[i] % R), c);
      from_canon(int(type), c, dst + i * nb * L.ts + b * L.ts);
    }
  }
  return out;
}

#if TQ_AVX2
// ---------------------------------------------------------------- panel kernels
// Written once over V, a vector of W int32 or float lanes, one lane per panel row: Zmm
// (AVX-512, W = 16: a whole panel per pass) or Ymm (AVX2, W = 8: a panel in two halves; a
// half's bytes are contiguous in every plane: the first or second 32 bytes of a group, 16
// bytes of fp16 scales, 8 of byte scales, 32 bits of each mask). Both give the same bits:
// the same exact integer sums, then the same float operations per row.

inline int32_t rd4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

#if TQ_AVX512
struct Zmm {
  using I = __m512i;
  using F = __m512;
  static constexpr int W = 16;
  static constexpr bool EXACT_U8 = true;  // vpdpbusd: u8·s8 products summed without saturation
  static constexpr int CHAINS = 2;        // independent integer sums per token (latency)
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I zero() { return _mm512_setzero_si512(); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I lo_nib(I raw) { return _mm512_and_si512(raw, _mm512_set1_epi8(0x0F)); }
  static I hi_nib(I raw) { return _mm512_and_si512(_mm512_srli_epi16(raw, 4), _mm512_set1_epi8(0x0F)); }
  static I add_bits(I v, const uint8_t* m, char value) {  // + value where the mask's bit is set
    uint64_t b;
    std::memcpy(&b, m, 8);
    return _mm512_mask_add_epi8(v, _cvtu64_mask64(b), v, _mm512_set1_epi8(value));
  }
  static I dot(I acc, I u, const int8_t* y) { return _mm512_dpbusd_epi32(acc, u, set1(rd4(y))); }
  static I dot_s8(I acc, I, const int8_t*) { return acc; }  // unused: EXACT_U8
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I q3v(I raw, I nib, int k) {  // Q3_K's v_k of every lane from its Q byte and nibble
    const I m7 = _mm512_set1_epi8(7);
    if (k == 0) return _mm512_and_si512(raw, m7);
    if (k == 1) return _mm512_and_si512(_mm512_srli_epi16(raw, 3), m7);
    if (k == 3) return _mm512_and_si512(nib, m7);
    const I lo = _mm512_and_si512(_mm512_srli_epi16(raw, 6), _mm512_set1_epi8(3));
    return _mm512_ternarylogic_epi32(lo, _mm512_srli_epi16(nib, 1), _mm512_set1_epi8(4), 0xF8);
  }
  // Q3_K's 32 H bytes → the 64 lanes' nibbles in bits 0-3 (bits 4-7: other data, which
  // q3v masks off; its shifts keep every byte's bits 0-2 within the byte)
  static I hnib(const uint8_t* h, int) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
    return _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
  }
  static I table16(const uint8_t* t) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
  }
  static I lut(I table, I idx) { return _mm512_shuffle_epi8(table, idx); }
  static I u8x(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I s8x(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F halves(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F fset1(float v) { return _mm512_set1_ps(v); }
  static F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static void store(float* dst, F v, int rows) {
    _mm512_mask_storeu_ps(dst, rows >= W ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1), v);
  }
};
#endif

struct Ymm {
  using I = __m256i;
  using F = __m256;
  static constexpr int W = 8;
  static constexpr bool EXACT_U8 = TQ_VNNI;  // maddubs saturates pairs past 32767 (Q8_0's
  static constexpr int CHAINS = 1;           // 0..255 values take dot_s8 instead)
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I lo_nib(I raw) { return _mm256_and_si256(raw, _mm256_set1_epi8(0x0F)); }
  static I hi_nib(I raw) { return _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F)); }
  static I add_bits(I v, const uint8_t* m, char value) {  // the half's 32 mask bits
    uint32_t b;
    std::memcpy(&b, m, 4);
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                            0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32(int(b)), shuf);
    const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit);  // 0xFF where set
    return _mm256_add_epi8(v, _mm256_and_si256(on, _mm256_set1_epi8(value)));
  }
  static I dot(I acc, I u, const int8_t* y) {
#if TQ_VNNI
    return _mm256_dpbusd_epi32(acc, u, set1(rd4(y)));
#else
    const __m256i p = _mm256_maddubs_epi16(u, set1(rd4(y)));  // |pair| ≤ 2·63·128: exact
    return add(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
  }
  // Σ (u − 128)·y for bytes u = w + 128 (Q8_0, |w| ≤ 127) as |w|·sign(y, w): pairs ≤ 32512.
  static I dot_s8(I acc, I u, const int8_t* y) {
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(char(0x80)));
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(set1(rd4(y)), w));
    return add(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I q3v(I raw, I nib, int k) {  // as Zmm's
    const I m7 = _mm256_set1_epi8(7);
    if (k == 0) return _mm256_and_si256(raw, m7);
    if (k == 1) return _mm256_and_si256(_mm256_srli_epi16(raw, 3), m7);
    if (k == 3) return _mm256_and_si256(nib, m7);
    const I lo = _mm256_and_si256(_mm256_srli_epi16(raw, 6), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_and_si256(_mm256_srli_epi16(nib, 1), _mm256_set1_epi8(4)));
  }
  // Q3_K's 32 H bytes → this half's nibbles in bits 0-3 (bits 4-7 unmasked, as Zmm's)
  static I hnib(const uint8_t* h, int half) {
    const I v = load(h);
    return half ? _mm256_srli_epi16(v, 4) : v;
  }
  static I table16(const uint8_t* t) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
  }
  static I lut(I table, I idx) { return _mm256_shuffle_epi8(table, idx); }
  static I u8x(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I s8x(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static F halves(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fset1(float v) { return _mm256_set1_ps(v); }
  static F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static void store(float* dst, F v, int rows) {
    if (rows >= W) { _mm256_storeu_ps(dst, v); return; }
    alignas(32) float tmp[W];
    _mm256_store_ps(tmp, v);
    std::memcpy(dst, tmp, sizeof(float) * rows);
  }
};

#if TQ_AVX512
using Vec = Zmm;
#else
using Vec = Ymm;
#endif

// A decode pass's software prefetch, spread over its blocks: each block a kernel visits asks
// for `step` more bytes at `ahead` (up to `end`), the bytes of about one block, so that the
// requests stay a fixed lead ahead of the reads. (Asking for a whole panel at its start, as
// before, came in bursts of 10-80 KiB that stalled the loads behind them; measured in
// docs/kernels.md.) Off (ahead == end, the default): nothing.
struct Prefetch {
  const char* ahead = nullptr;
  const char* end = nullptr;
  int64_t step = 0;
  inline void block() {
    const char* upto = std::min(end, ahead + step);
    for (; ahead < upto; ahead += 64) _mm_prefetch(ahead, _MM_HINT_T0);
  }
};

// The lanes of one token's activations the kernels read.
struct TokenAct {
  const int8_t* y;
  const float* d;
  const float* s;      // Q8_1 block sums (Q4_1)
  const int32_t* sum;  // Q8_0 block sums (Q4_0, Q5_0, Q8_0 offsets)
  const int16_t* bsum; // Q8_K per-16 sums
};

template <int NT>
inline void token_acts(const Act& a, int64_t t0, TokenAct* ta) {
  for (int t = 0; t < NT; ++t) {
    const int64_t tok = t0 + t;
    ta[t].y = a.q.get() + tok * a.K;
    ta[t].d = a.d.get() + tok * a.nb;
    ta[t].s = a.s ? a.s.get() + tok * a.nb : nullptr;
    ta[t].sum = a.sums ? a.sums.get() + tok * a.nb : nullptr;
    ta[t].bsum = a.bsums ? a.bsums.get() + tok * (a.K / 16) : nullptr;
  }
}

// Where rows [half·W, half·W + W) of a panel start in each plane (nb blocks).
template <class V>
struct Planes {
  const uint8_t *D, *S, *H, *Q;
  Planes(const uint8_t* p, const Layout& L, int64_t nb, int half)
      : D(p + half * V::W * 2), S(p + nb * L.d + half * V::W),
        H(p + nb * (L.d + L.s) + half * V::W / 2), Q(p + nb * (L.d + L.s + L.h) + half * V::W * 4) {}
  void next(const Layout& L) { D += L.d; S += L.s; H += L.h; Q += L.q; }
};

// Independent int32 sums per token and block: the dot instructions' latency chain is split
// over U sums. A decode tile (NT ≤ 2) has the registers for 4 on AVX-512, which halves the
// chain per block; the sums are exact integers, so the result is the same bits for any U.
template <class V, int NT>
constexpr int chains() {
  return V::W == 16 && NT <= 2 ? 4 : V::CHAINS;
}

// 32-element blocks: per block, exact int32 Σ u·y − offset·Σy per row, then acc += that ·
// d_w·d_y (Q4_1: + m_w·s_y), in float32, block after block.
template <class V, int TYPE, int NT>
void panel32(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr Layout L = layout_of(TYPE);
  constexpr bool SIGNED = TYPE == Q8_0 && !V::EXACT_U8;  // Q8_0 through dot_s8: no offset
  constexpr int SHIFT = TYPE == Q4_0 ? 3 : TYPE == Q5_0 ? 4 : 7;  // offset 1 << SHIFT
  constexpr int U = chains<V, NT>();
  Planes<V> pl(p, L, a.nb, half);
  TokenAct ta[NT];
  token_acts<NT>(a, t0, ta);
  F acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::fzero();
  for (int64_t b = 0; b < a.nb; ++b, pl.next(L), pf.block()) {
    I s[U][NT];  // U chains per token: lo/hi nibbles (Q8_0: even/odd groups)
    for (int t = 0; t < NT; ++t) {
      s[0][t] = TYPE == Q4_1 || SIGNED ? V::zero() : V::set1(-(ta[t].sum[b] << SHIFT));
      for (int u = 1; u < U; ++u) s[u][t] = V::zero();
    }
    if (TYPE == Q8_0) {
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const I w = V::load(pl.Q + 64 * g);
        for (int t = 0; t < NT; ++t) {
          const int8_t* y = ta[t].y + 32 * b + 4 * g;
          s[g % U][t] = SIGNED ? V::dot_s8(s[g % U][t], w, y) : V::dot(s[g % U][t], w, y);
        }
      }
    } else {
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const I raw = V::load(pl.Q + 64 * g);
        I lo = V::lo_nib(raw), hi = V::hi_nib(raw);
        if (TYPE == Q5_0) {
          lo = V::add_bits(lo, pl.H + 16 * g, 0x10);
          hi = V::add_bits(hi, pl.H + 16 * g + 8, 0x10);
        }
        for (int t = 0; t < NT; ++t) {
          s[2 * g % U][t] = V::dot(s[2 * g % U][t], lo, ta[t].y + 32 * b + 4 * g);
          s[(2 * g + 1) % U][t] = V::dot(s[(2 * g + 1) % U][t], hi, ta[t].y + 32 * b + 16 + 4 * g);
        }
      }
    }
    const F dw = V::halves(pl.D);
    for (int t = 0; t < NT; ++t) {
      I isum = s[0][t];
      for (int u = 1; u < U; ++u) isum = V::add(isum, s[u][t]);
      acc[t] = V::fmadd(V::cvt(isum), V::fmul(dw, V::fset1(ta[t].d[b])), acc[t]);
    }
    if (TYPE == Q4_1) {
      const F mw = V::halves(pl.D + 32);
      for (int t = 0; t < NT; ++t) acc[t] = V::fmadd(mw, V::fset1(ta[t].s[b]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

// Q4_K, Q5_K: per super-block the exact Σ_j sc_j·(Σ q·y)_j and Σ_j m_j·(Σy)_j per row
// (int32), then acc += d·d_y·first − dmin·d_y·second. Q5_K adds bit 4 from its masks.
// AVX2 without VNNI: maddubs' pair sums added up over a chunk's 4 groups in int16 (a pair is
// ≤ 2·31·128, four of them < 2^15: exact), then one madd by the scale in both int16 halves.
template <class V, int NT, bool Q5 = false>
void panel_q4k(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr Layout L = layout_of(Q5 ? Q5_K : Q4_K);
  Planes<V> pl(p, L, a.nb, half);
  TokenAct ta[NT];
  token_acts<NT>(a, t0, ta);
  F acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::fzero();
  for (int64_t b = 0; b < a.nb; ++b, pl.next(L), pf.block()) {
    I isc[NT], imn[NT];
    for (int t = 0; t < NT; ++t) isc[t] = imn[t] = V::zero();
    // group g of sub-block pair j: the low and high nibbles (+16 where Q5's high bit is set)
    const auto unpack = [&](int j, int g, I& lo, I& hi) {
      const I raw = V::load(pl.Q + 256 * j + 64 * g);
      lo = V::lo_nib(raw);
      hi = V::hi_nib(raw);
      if (Q5) {
        lo = V::add_bits(lo, pl.H + 64 * j + 16 * g, 0x10);
        hi = V::add_bits(hi, pl.H + 64 * j + 16 * g + 8, 0x10);
      }
    };
    for (int j = 0; j < 8; ++j) {
      const I sc = V::u8x(pl.S + 16 * j), mn = V::u8x(pl.S + 128 + 16 * j);
#if !TQ_VNNI  // (V is Ymm)
      const __m256i sc2 = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));  // 0..63 twice
      __m256i p0[NT], p1[NT];
      for (int t = 0; t < NT; ++t) p0[t] = p1[t] = V::zero();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        I lo, hi;
        unpack(j, g, lo, hi);
        for (int t = 0; t < NT; ++t) {
          const int8_t* y = ta[t].y + 256 * b + 32 * j + 4 * g;
          p0[t] = _mm256_add_epi16(p0[t], _mm256_maddubs_epi16(lo, V::set1(rd4(y))));
          p1[t] = _mm256_add_epi16(p1[t], _mm256_maddubs_epi16(hi, V::set1(rd4(y + 16))));
        }
      }
      for (int t = 0; t < NT; ++t) {
        const int16_t* bs = ta[t].bsum + 16 * b + 2 * j;
        const I sum = V::add(_mm256_madd_epi16(p0[t], sc2), _mm256_madd_epi16(p1[t], sc2));
        isc[t] = V::add(isc[t], sum);
        imn[t] = V::add(imn[t], V::mullo(mn, V::set1(bs[0] + bs[1])));
      }
#else
      constexpr int U = chains<V, NT>();
      I s[U][NT];
      for (int u = 0; u < U; ++u)
        for (int t = 0; t < NT; ++t) s[u][t] = V::zero();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        I lo, hi;
        unpack(j, g, lo, hi);
        for (int t = 0; t < NT; ++t) {
          const int8_t* y = ta[t].y + 256 * b + 32 * j;
          s[2 * g % U][t] = V::dot(s[2 * g % U][t], lo, y + 4 * g);
          s[(2 * g + 1) % U][t] = V::dot(s[(2 * g + 1) % U][t], hi, y + 16 + 4 * g);
        }
      }
      for (int t = 0; t < NT; ++t) {
        const int16_t* bs = ta[t].bsum + 16 * b + 2 * j;
        I sum = s[0][t];
        for (int u = 1; u < U; ++u) sum = V::add(sum, s[u][t]);
        isc[t] = V::add(isc[t], V::mullo(sum, sc));
        imn[t] = V::add(imn[t], V::mullo(mn, V::set1(bs[0] + bs[1])));
      }
#endif
    }
    const F dw = V::halves(pl.D), dm = V::halves(pl.D + 32);
    for (int t = 0; t < NT; ++t) {
      const F dy = V::fset1(ta[t].d[b]);
      acc[t] = V::fmadd(V::cvt(isc[t]), V::fmul(dw, dy), acc[t]);
      acc[t] = V::fnmadd(V::cvt(imn[t]), V::fmul(dm, dy), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

// Q6_K: 16 sub-blocks of 16 with int8 scales, values 0..63 − 32: per sub-block the exact
// (Σ q·y − 32·Σy)·sc, summed per row over the super-block, then acc += · d·d_y.
template <class V, int NT>
void panel_q6k(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr Layout L = layout_of(Q6_K);
  Planes<V> pl(p, L, a.nb, half);
  TokenAct ta[NT];
  token_acts<NT>(a, t0, ta);
  F acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::fzero();
  for (int64_t b = 0; b < a.nb; ++b, pl.next(L), pf.block()) {
    I isum[NT];
    for (int t = 0; t < NT; ++t) isum[t] = V::zero();
    for (int c = 0; c < 8; ++c) {  // chunk c: sub-blocks 2c (low nibbles) and 2c + 1 (high)
      const I sc0 = V::s8x(pl.S + 32 * c), sc1 = V::s8x(pl.S + 32 * c + 16);
      I s0[NT], s1[NT];
      for (int t = 0; t < NT; ++t) {
        const int16_t* bs = ta[t].bsum + 16 * b + 2 * c;
        s0[t] = V::set1(-32 * bs[0]);
        s1[t] = V::set1(-32 * bs[1]);
      }
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const I raw = V::load(pl.Q + 256 * c + 64 * g);
        const uint8_t* hm = pl.H + 128 * c + 32 * g;  // bit 4 lo, hi; bit 5 lo, hi
        const I lo = V::add_bits(V::add_bits(V::lo_nib(raw), hm, 0x10), hm + 16, 0x20);
        const I hi = V::add_bits(V::add_bits(V::hi_nib(raw), hm + 8, 0x10), hm + 24, 0x20);
        for (int t = 0; t < NT; ++t) {
          const int8_t* y = ta[t].y + 256 * b + 32 * c;
          s0[t] = V::dot(s0[t], lo, y + 4 * g);
          s1[t] = V::dot(s1[t], hi, y + 16 + 4 * g);
        }
      }
      for (int t = 0; t < NT; ++t)
        isum[t] = V::add(isum[t], V::add(V::mullo(s0[t], sc0), V::mullo(s1[t], sc1)));
    }
    const F dw = V::halves(pl.D);
    for (int t = 0; t < NT; ++t)
      acc[t] = V::fmadd(V::cvt(isum[t]), V::fmul(dw, V::fset1(ta[t].d[b])), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

#if !TQ_VNNI
// Q3_K on AVX2 without VNNI, one (half, parity) quarter of a super-block: maddubs' int16
// pair sums added up over a sub-block's 4 groups in int16, the −4·Σy offset in each lane's
// low half, then one madd by the row's scale (in both int16 halves) into int32. Exact: a
// pair is ≤ 2·7·128, 4 of them plus 4·16·128 stay under 2^15; the same integers as the
// generic path's, so the same bits.
template <int NT>
inline void q3k_maddubs(const Planes<Ymm>& pl, const uint8_t* H, const TokenAct* ta, int64_t b,
                        int hh, int par, int half, __m256i* isum) {
  __m256i p[4][NT];
  for (int k = 0; k < 4; ++k)
    for (int t = 0; t < NT; ++t)
      p[k][t] = _mm256_set1_epi32(uint16_t(-4 * ta[t].bsum[16 * b + 8 * hh + 2 * k + par]));
#pragma GCC unroll 4
  for (int gi = 0; gi < 4; ++gi) {
    const int g = 4 * par + gi;
    const __m256i raw = Ymm::load(pl.Q + 512 * hh + 64 * g);
    const __m256i hn = Ymm::hnib(H + 256 * hh + 32 * g, half);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m256i u = Ymm::q3v(raw, hn, k);
      for (int t = 0; t < NT; ++t) {
        const int8_t* y = ta[t].y + 256 * b + 128 * hh + 32 * k + 4 * g;
        p[k][t] = _mm256_add_epi16(p[k][t], _mm256_maddubs_epi16(u, Ymm::set1(rd4(y))));
      }
    }
  }
  for (int k = 0; k < 4; ++k) {
    // the 8 rows' int8 scales, each in both int16 halves of its row's int32 lane
    const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pl.S + 16 * (8 * hh + 2 * k + par)));
    const __m256i sc2 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s8, s8));
    for (int t = 0; t < NT; ++t) isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p[k][t], sc2));
  }
}
#endif

// Q3_K: 16 sub-blocks of 16, values 0..7 − 4 (q3v: from the Q plane's bytes and the H
// plane's nibbles), signed scales: per sub-block the exact (Σ u·y − 4·Σy)·sc, summed per row
// over the super-block, then acc += · d·d_y. Groups 0-3 of a 128-element half feed
// sub-blocks 2k (crumb k), groups 4-7 sub-blocks 2k + 1.
template <class V, int NT>
void panel_q3k(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr Layout L = layout_of(Q3_K);
  Planes<V> pl(p, L, a.nb, half);
  const uint8_t* H = p + a.nb * (L.d + L.s);  // both halves' nibbles share each byte
  TokenAct ta[NT];
  token_acts<NT>(a, t0, ta);
  F acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::fzero();
  for (int64_t b = 0; b < a.nb; ++b, pl.next(L), H += L.h, pf.block()) {
    I isum[NT];
    for (int t = 0; t < NT; ++t) isum[t] = V::zero();
    for (int hh = 0; hh < 2; ++hh) {
      for (int par = 0; par < 2; ++par) {
#if !TQ_VNNI  // (V is Ymm)
        q3k_maddubs<NT>(pl, H, ta, b, hh, par, half, isum);
        continue;
#endif
        I s[4][NT];
        for (int k = 0; k < 4; ++k)
          for (int t = 0; t < NT; ++t) s[k][t] = V::set1(-4 * ta[t].bsum[16 * b + 8 * hh + 2 * k + par]);
#pragma GCC unroll 4
        for (int gi = 0; gi < 4; ++gi) {
          const int g = 4 * par + gi;
          const I raw = V::load(pl.Q + 512 * hh + 64 * g);
          const I hn = V::hnib(H + 256 * hh + 32 * g, half);
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k) {
            const I u = V::q3v(raw, hn, k);
            for (int t = 0; t < NT; ++t)
              s[k][t] = V::dot(s[k][t], u, ta[t].y + 256 * b + 128 * hh + 32 * k + 4 * g);
          }
        }
        for (int k = 0; k < 4; ++k) {
          const I sc = V::s8x(pl.S + 16 * (8 * hh + 2 * k + par));
          for (int t = 0; t < NT; ++t) isum[t] = V::add(isum[t], V::mullo(s[k][t], sc));
        }
      }
    }
    const F dw = V::halves(pl.D);
    for (int t = 0; t < NT; ++t)
      acc[t] = V::fmadd(V::cvt(isum[t]), V::fmul(dw, V::fset1(ta[t].d[b])), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

// IQ4_LEVELS + 128 as bytes: what the IQ4_XS kernel's table lookups give.
alignas(16) constexpr uint8_t IQ4_U8[16] = {1, 24, 45, 63, 79, 93, 106, 118,
                                            129, 141, 153, 166, 181, 197, 217, 241};

// IQ4_XS: 8 sub-blocks of 32, nibbles looked up to level + 128 (one byte shuffle), signed
// scales: per sub-block the exact Σ L·y (VNNI: Σ (L+128)·y − 128·Σy; AVX2's maddubs would
// saturate on those, so |L|·sign(y, L) as Q8_0 does), times sc, summed over the super-block.
template <class V, int NT>
void panel_iq4xs(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr Layout L = layout_of(IQ4_XS);
  constexpr bool SIGNED = !V::EXACT_U8;
  Planes<V> pl(p, L, a.nb, half);
  TokenAct ta[NT];
  token_acts<NT>(a, t0, ta);
  const I table = V::table16(IQ4_U8);
  F acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::fzero();
  for (int64_t b = 0; b < a.nb; ++b, pl.next(L), pf.block()) {
    I isum[NT];
    for (int t = 0; t < NT; ++t) isum[t] = V::zero();
    for (int j = 0; j < 8; ++j) {
      I s[2][NT];  // low and high nibbles: two independent sums
      for (int t = 0; t < NT; ++t) {
        const int16_t* bs = ta[t].bsum + 16 * b + 2 * j;
        s[0][t] = SIGNED ? V::zero() : V::set1(-128 * (bs[0] + bs[1]));
        s[1][t] = V::zero();
      }
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const I raw = V::load(pl.Q + 256 * j + 64 * g);
        const I lo = V::lut(table, V::lo_nib(raw)), hi = V::lut(table, V::hi_nib(raw));
        for (int t = 0; t < NT; ++t) {
          const int8_t* y = ta[t].y + 256 * b + 32 * j;
          s[0][t] = SIGNED ? V::dot_s8(s[0][t], lo, y + 4 * g) : V::dot(s[0][t], lo, y + 4 * g);
          s[1][t] = SIGNED ? V::dot_s8(s[1][t], hi, y + 16 + 4 * g) : V::dot(s[1][t], hi, y + 16 + 4 * g);
        }
      }
      const I sc = V::s8x(pl.S + 16 * j);
      for (int t = 0; t < NT; ++t) isum[t] = V::add(isum[t], V::mullo(V::add(s[0][t], s[1][t]), sc));
    }
    const F dw = V::halves(pl.D);
    for (int t = 0; t < NT; ++t)
      acc[t] = V::fmadd(V::cvt(isum[t]), V::fmul(dw, V::fset1(ta[t].d[b])), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

// MXFP4's doubled E2M1 values + 12 (0..24) as bytes, by nibble: what its table lookups give.
alignas(16) constexpr uint8_t MXFP4_U8[16] = {12, 13, 14, 15, 16, 18, 20, 24,
                                              12, 11, 10, 9,  8,  6,  4,  0};

// W rows' E8M0 bytes → 2^(e − 128) as float32, subnormal for e < 2 (moe.cpp's e8m0_half,
// ggml_e8m0_to_fp32_half): (e − 1) << 23 as float bits, or 0x00200000 << e.
#if TQ_AVX512
inline __m512 e8m0_halves(const Zmm*, const uint8_t* e) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e)));
  const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(v, _mm512_set1_epi32(1)), 23);
  const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), v);
  const __mmask16 small = _mm512_cmplt_epu32_mask(v, _mm512_set1_epi32(2));
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(small, normal, sub));
}
#endif
inline __m256 e8m0_halves(const Ymm*, const uint8_t* e) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e)));
  const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(v, _mm256_set1_epi32(1)), 23);
  const __m256i sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), v);
  const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), v);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, sub, small));
}

// MXFP4 (gpt-oss's experts): 32-element blocks, nibbles looked up to value + 12 (one byte
// shuffle), per block the exact Σ (v+12)·y − 12·Σy per row (values ≤ 24: maddubs' pairs stay
// far from saturating), then acc += that · (2^(e−128) · d_y) in float32, block after block:
// the terms of moe.cpp's dot_row<MXFP4> (ggml_vec_dot_mxfp4_q8_0).
template <class V, int NT>
void panel_mxfp4(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr Layout L = layout_of(MXFP4);
  const uint8_t* D = p + half * V::W;  // one E8M0 byte per row
  const uint8_t* Q = p + a.nb * L.d + half * V::W * 4;
  TokenAct ta[NT];
  token_acts<NT>(a, t0, ta);
  const I table = V::table16(MXFP4_U8);
  F acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::fzero();
  for (int64_t b = 0; b < a.nb; ++b, D += L.d, Q += L.q, pf.block()) {
    constexpr int U = std::max(2, chains<V, NT>());
    I s[U][NT];  // independent sums (at least the low and the high nibbles' two)
    for (int t = 0; t < NT; ++t) {
      s[0][t] = V::set1(-12 * ta[t].sum[b]);
      for (int u = 1; u < U; ++u) s[u][t] = V::zero();
    }
#if !TQ_VNNI  // (V is Ymm) maddubs' pairs added up in int16 over the 4 groups (a pair is
    // ≤ 2·24·127, four of them < 2^15: exact), then one madd per sum into int32
    __m256i p16[2][NT];
    for (int t = 0; t < NT; ++t) p16[0][t] = p16[1][t] = V::zero();
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const I raw = V::load(Q + 64 * g);
      const I lo = V::lut(table, V::lo_nib(raw)), hi = V::lut(table, V::hi_nib(raw));
      for (int t = 0; t < NT; ++t) {
        const int8_t* y = ta[t].y + 32 * b + 4 * g;
        p16[0][t] = _mm256_add_epi16(p16[0][t], _mm256_maddubs_epi16(lo, V::set1(rd4(y))));
        p16[1][t] = _mm256_add_epi16(p16[1][t], _mm256_maddubs_epi16(hi, V::set1(rd4(y + 16))));
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int t = 0; t < NT; ++t) {
      s[0][t] = V::add(s[0][t], _mm256_madd_epi16(p16[0][t], ones));
      s[1][t] = _mm256_madd_epi16(p16[1][t], ones);
    }
#else
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const I raw = V::load(Q + 64 * g);
      const I lo = V::lut(table, V::lo_nib(raw)), hi = V::lut(table, V::hi_nib(raw));
      for (int t = 0; t < NT; ++t) {
        const int8_t* y = ta[t].y + 32 * b + 4 * g;
        s[2 * g % U][t] = V::dot(s[2 * g % U][t], lo, y);
        s[(2 * g + 1) % U][t] = V::dot(s[(2 * g + 1) % U][t], hi, y + 16);
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int u = 2; u < U; ++u) s[u % 2][t] = V::add(s[u % 2][t], s[u][t]);
#endif
    const F dw = e8m0_halves(static_cast<const V*>(nullptr), D);
    for (int t = 0; t < NT; ++t)
      acc[t] = V::fmadd(V::cvt(V::add(s[0][t], s[1][t])), V::fmul(dw, V::fset1(ta[t].d[b])), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

template <class V, int TYPE, int NT>
inline void panel_dot(const uint8_t* p, int half, const Act& a, int64_t t0, typename V::F* out,
                Prefetch& pf) {
  if constexpr (TYPE == Q4_K) panel_q4k<V, NT>(p, half, a, t0, out, pf);
  else if constexpr (TYPE == Q5_K) panel_q4k<V, NT, true>(p, half, a, t0, out, pf);
  else if constexpr (TYPE == Q3_K) panel_q3k<V, NT>(p, half, a, t0, out, pf);
  else if constexpr (TYPE == IQ4_XS) panel_iq4xs<V, NT>(p, half, a, t0, out, pf);
  else if constexpr (TYPE == Q6_K) panel_q6k<V, NT>(p, half, a, t0, out, pf);
  else if constexpr (TYPE == MXFP4) panel_mxfp4<V, NT>(p, half, a, t0, out, pf);
  else panel32<V, TYPE, NT>(p, half, a, t0, out, pf);
}

// Tokens per pass over a panel (register tile): as many as the registers hold.
template <int TYPE> constexpr int max_tokens() {
  // AVX2 Q6_K: its 4 mask expansions per group are shared by 8 tokens (spills and all, the
  // fastest choice measured: docs/kernels.md)
  if (Vec::W == 8 && TYPE == Q6_K) return 8;
  return (layout_of(TYPE).bs == 32 ? 8 : 4) / (Vec::W == 16 ? 1 : 2);
}
constexpr int64_t TILE_BYTES = 128 << 10;  // M > 1: panels per chunk, kept in L2
constexpr int64_t MAX_CHUNK_BYTES = 1 << 20;
// M ≤ NT (decode): the lead, in bytes of panels, that software prefetch (prefetcht0) keeps
// ahead of the reads. A panel reads its planes as several short streams (D, S, Q: 64, 256,
// 2048 bytes a block at Q4_K), which the hardware prefetchers barely follow; the requests
// are spread over the blocks (Prefetch), about a block's bytes per block read. Measured in
// docs/kernels.md (first a burst per panel: qwen35-0.8B Q4_K decode 46 → 70 tok/s; then
// spread: cold single-matrix decode Q4_K 32 → 41 GB/s, MXFP4 26 → 37).
constexpr int64_t PREFETCH_BYTES = 8 << 10;

struct PanelPart {
  const uint8_t* w;
  int64_t pstride, N;  // bytes from one panel to the next; output rows
  float* y;            // (M, N)
};

template <int TYPE, int NT>
inline void tile(const PanelPart& part, int64_t p, const Act& a, int64_t t0, Prefetch& pf) {
  for (int half = 0; half < R / Vec::W; ++half) {
    const int64_t row0 = p * R + half * Vec::W, rows = std::min<int64_t>(Vec::W, part.N - row0);
    if (rows <= 0) break;
    typename Vec::F o[NT];
    panel_dot<Vec, TYPE, NT>(part.w + p * part.pstride, half, a, t0, o, pf);
    for (int t = 0; t < NT; ++t) Vec::store(part.y + (t0 + t) * part.N + row0, o[t], int(rows));
  }
}

// Panels [p0, p1) of a part against tokens [t0, t1), NT tokens (a register tile) per pass:
// each panel is read from memory for the first pass and from cache for the others.
template <int TYPE>
void tokens(const PanelPart& part, int64_t p0, int64_t p1, const Act& a, int64_t t0, int64_t t1) {
  constexpr int NT = max_tokens<TYPE>();
  Prefetch pf;
  if (t1 - t0 <= NT) {  // one pass (decode): the chunk's bytes asked for ahead of the reads
    const int64_t pbytes = panel_bytes(TYPE, a.K), visits = a.nb * (R / Vec::W);
    const char* at = reinterpret_cast<const char*>(part.w + p0 * part.pstride);
    pf.end = reinterpret_cast<const char*>(part.w + (p1 - 1) * part.pstride) + pbytes;
    for (const char* lead = std::min(pf.end, at + PREFETCH_BYTES); at < lead; at += 64)
      _mm_prefetch(at, _MM_HINT_T0);
    pf.ahead = at;
    pf.step = (pbytes + visits - 1) / visits;  // a panel's bytes over its block visits
  }
  for (; t0 < t1; t0 += NT) {
    const int64_t nt = std::min<int64_t>(NT, t1 - t0);
    for (int64_t p = p0; p < p1; ++p) {
      switch (nt) {
        case 8: if constexpr (NT >= 8) { tile<TYPE, 8>(part, p, a, t0, pf); break; } [[fallthrough]];
        case 7: if constexpr (NT >= 7) { tile<TYPE, 7>(part, p, a, t0, pf); break; } [[fallthrough]];
        case 6: if constexpr (NT >= 6) { tile<TYPE, 6>(part, p, a, t0, pf); break; } [[fallthrough]];
        case 5: if constexpr (NT >= 5) { tile<TYPE, 5>(part, p, a, t0, pf); break; } [[fallthrough]];
        case 4: tile<TYPE, 4>(part, p, a, t0, pf); break;
        case 3: tile<TYPE, 3>(part, p, a, t0, pf); break;
        case 2: tile<TYPE, 2>(part, p, a, t0, pf); break;
        default: tile<TYPE, 1>(part, p, a, t0, pf); break;
      }
    }
  }
}

// Panels are cut into chunks (about 8 per thread over all parts); within a chunk each panel
// is read from memory once, for the first group of tokens, and from cache for the others.
// Where one group holds every token (decode: M ≤ NT), a chunk is one pass over its panels,
// with software prefetch PREFETCH_BYTES ahead of the reads (Prefetch).
template <int TYPE>
void run(const std::vector<PanelPart>& parts, const Act& a) {
  const int64_t M = a.M, pbytes = panel_bytes(TYPE, a.K);
  const int64_t threads = kernel_threads();
  int64_t total = 0;
  for (const PanelPart& part : parts) total += (part.N + R - 1) / R;
  int64_t per = (total + threads * 8 - 1) / (threads * 8);
  per = std::min(per, std::max<int64_t>(1, (M <= max_tokens<TYPE>() ? MAX_CHUNK_BYTES : TILE_BYTES) / pbytes));
  per = std::max<int64_t>(per, 1);
  std::vector<std::pair<int, int64_t>> chunks;  // (part, first panel)
  for (int i = 0; i < int(parts.size()); ++i)
    for (int64_t p0 = 0; p0 * R < parts[i].N; p0 += per) chunks.emplace_back(i, p0);
  parallel_chunks(int64_t(chunks.size()), [&](int64_t c) {
    const PanelPart& part = parts[chunks[c].first];
    const int64_t p0 = chunks[c].second, p1 = std::min((part.N + R - 1) / R, p0 + per);
    tokens<TYPE>(part, p0, p1, a, 0, M);
  });
}

// Rows sorted by expert (mixture of experts): each part (common.h ExpertRows) is one
// expert's panels (a slice of the (E·N/16, panel_bytes) panels of all experts) against the
// rows that chose it, rows [begin, end) of the Act and of y, which share the sorted order.
// Chunks as in `run`, per expert: an expert's panels are one contiguous stream, read from
// memory once per call.

template <int TYPE>
void run_routed(const std::vector<ExpertRows>& parts, const Act& a) {
  const int64_t pbytes = panel_bytes(TYPE, a.K), threads = kernel_threads();
  int64_t total = 0;
  for (const ExpertRows& part : parts) total += (part.N + R - 1) / R;
  const int64_t balanced = std::max<int64_t>(1, (total + threads * 8 - 1) / (threads * 8));
  struct Chunk { int64_t part, p0, p1; };
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < int64_t(parts.size()); ++i) {
    const ExpertRows& part = parts[i];
    const int64_t P = (part.N + R - 1) / R;
    // one pass over the panels (rows ≤ a register tile): long chunks, prefetched ahead
    const bool one_pass = part.end - part.begin <= max_tokens<TYPE>();
    const int64_t cap = (one_pass ? MAX_CHUNK_BYTES : TILE_BYTES) / pbytes;
    const int64_t per = std::max<int64_t>(1, std::min(balanced, cap));
    for (int64_t p0 = 0; p0 < P; p0 += per) chunks.push_back({i, p0, std::min(P, p0 + per)});
  }
  parallel_chunks(int64_t(chunks.size()), [&](int64_t c) {
    const ExpertRows& part = parts[chunks[c].part];
    tokens<TYPE>({part.w, part.pstride, part.N, part.y}, chunks[c].p0, chunks[c].p1, a, part.begin,
                 part.end);
  });
}

// f(std::integral_constant<int, TYPE>{}) for a panel type; a value-initialised result (a null
// function pointer) for any other.
template <class F>
auto with_type(int type, F f) {
  using C = std::integral_constant<int, Q4_0>;
  switch (type) {
    case Q4_0: return f(C{});
    case Q4_1: return f(std::integral_constant<int, Q4_1>{});
    case Q5_0: return f(std::integral_constant<int, Q5_0>{});
    case Q8_0: return f(std::integral_constant<int, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int, Q6_K>{});
    case Q3_K: return f(std::integral_constant<int, Q3_K>{});
    case IQ4_XS: return f(std::integral_constant<int, IQ4_XS>{});
    case MXFP4: return f(std::integral_constant<int, MXFP4>{});
    default: return decltype(f(C{})){};
  }
}

using RunFn = void (*)(const std::vector<PanelPart>&, const Act&);
using RoutedFn = void (*)(const std::vector<ExpertRows>&, const Act&);

RunFn run_for(int type) {
  return with_type(type, [](auto t) { return RunFn(&run<decltype(t)::value>); });
}

RoutedFn routed_for(int type) {
  return with_type(type, [](auto t) { return RoutedFn(&run_routed<decltype(t)::value>); });
}

int act_kind(int type) {  // MXFP4: Q8_0, as llama.cpp's vec_dot_mxfp4_q8_0
  return type == Q4_1 ? A_Q8_1 : layout_of(type).bs == 256 ? A_Q8_K : A_Q8_0;
}
#endif  // TQ_AVX2

}  // namespace

// The routed panel products for other files (moe_ffn.cpp): common.h's declarations.
namespace tq {
#if TQ_AVX2
int panel_act_kind(int type) { return act_kind(type); }
int64_t panel_row_bytes(int type, int64_t K) { return panel_bytes(type, K); }
int64_t panel_block(int type) { return layout_of(type).bs; }

void routed_panels(int type, const std::vector<ExpertRows>& rows, const Act& a) {
  routed_for(type)(rows, a);
}

std::vector<ExpertRows> expert_rows(const ExpertGroups& groups, const torch::Tensor& panels,
                                    int64_t N, float* y) {
  const int64_t P = N / R, stride = panels.stride(0);
  const uint8_t* w = panels.data_ptr<uint8_t>();
  std::vector<ExpertRows> rows;
  for (int64_t g = 0; g < groups.size(); ++g)
    rows.push_back({w + groups.expert[g] * P * stride, stride, N, y, groups.start[g],
                    groups.start[g + 1]});
  return rows;
}
#endif
}  // namespace tq

namespace {

// Whether this build multiplies panels of `type` (imatmul); interleave works in every build.
bool interleaved_supports(int64_t type) {
#if TQ_AVX2
  return has_layout(int(type));
#else
  (void)type;
  return false;
#endif
}

// x (M, K) float32 against panels of one type, each with its own row count N_i → (M, N_i).
std::vector<torch::Tensor> imatmul_many(torch::Tensor x, std::vector<torch::Tensor> panels,
                                        std::vector<int64_t> ns, int64_t type) {
  TORCH_CHECK(interleaved_supports(type), "imatmul: no panel kernel for ggml type ", type,
              " in this build (", TQ_AVX2 ? "it has them for Q4_0, Q4_1, Q5_0, Q8_0, Q3_K, Q4_K, "
              "Q5_K, Q6_K, IQ4_XS, MXFP4"
              : "the portable one has none", ")");
#if TQ_AVX2
  const Layout L = layout_of(int(type));
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat32,
              "imatmul: x must be a (M, K) float32 CPU tensor");
  TORCH_CHECK(panels.size() == ns.size(), "imatmul: one row count per panel tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0 && K % L.bs == 0, "imatmul: K=", K, " is not whole ", L.bs, "-element blocks");
  const int64_t pbytes = panel_bytes(int(type), K);
  std::vector<torch::Tensor> ys;
  std::vector<PanelPart> parts;
  for (size_t i = 0; i < panels.size(); ++i) {
    const torch::Tensor& w = panels[i];
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == torch::kUInt8 &&
                w.size(1) == pbytes && w.stride(1) == 1 && w.size(0) * R >= ns[i] && ns[i] >= 0,
                "imatmul: panels ", i, " must be (>= ceil(N/16), ", pbytes, ") uint8 rows for K=", K);
    ys.push_back(torch::empty({M, ns[i]}, x.options()));
    if (ns[i] > 0) parts.push_back({w.data_ptr<uint8_t>(), w.stride(0), ns[i], ys.back().data_ptr<float>()});
  }
  if (M == 0 || parts.empty()) return ys;
  x = x.contiguous();
  const Act a = quantize_act(x.data_ptr<float>(), M, K, act_kind(int(type)));
  run_for(int(type))(parts, a);
  return ys;
#else
  return {};
#endif
}

// Routed matmuls over experts' panels (mixture of experts): y_i (R, N_i) with row r =
// x[src[r]] · W_i[expert[r]]ᵀ, where panels_i (E·N_i/16, panel_bytes) is
// `interleave(W_i.view(E·N_i, row_bytes))` — expert e's rows are panels [e·N_i/16, (e+1)·N_i/16)
// — and N_i a multiple of 16. Rows are grouped by expert, so each chosen expert's panels are
// read once per call for all its rows; the gathered rows are quantized once.
std::vector<torch::Tensor> imoe_matmul_many(torch::Tensor x, std::vector<torch::Tensor> panels,
                                            std::vector<int64_t> ns, int64_t type,
                                            torch::Tensor src, torch::Tensor expert) {
  TORCH_CHECK(interleaved_supports(type), "imoe_matmul: no panel kernel for ggml type ", type,
              " in this build");
#if TQ_AVX2
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat32,
              "imoe_matmul: x must be a (T, K) float32 CPU tensor");
  TORCH_CHECK(src.dim() == 1 && expert.dim() == 1 && src.size(0) == expert.size(0) &&
              src.scalar_type() == torch::kInt64 && expert.scalar_type() == torch::kInt64,
              "imoe_matmul: src and expert must be (R,) int64");
  TORCH_CHECK(!panels.empty() && panels.size() == ns.size(),
              "imoe_matmul: one row count per panel tensor, at least one");
  x = x.contiguous();
  src = src.contiguous();
  expert = expert.contiguous();
  const int64_t T = x.size(0), K = x.size(1), Rows = src.size(0);
  const Layout L = layout_of(int(type));
  TORCH_CHECK(K > 0 && K % L.bs == 0, "imoe_matmul: K=", K, " is not whole ", L.bs,
              "-element blocks");
  const int64_t pbytes = panel_bytes(int(type), K);
  TORCH_CHECK(ns[0] > 0 && ns[0] % R == 0, "imoe_matmul: N=", ns[0], " is not a multiple of 16");
  const int64_t E = panels[0].size(0) / (ns[0] / R);
  for (size_t i = 0; i < panels.size(); ++i) {
    const torch::Tensor& w = panels[i];
    TORCH_CHECK(ns[i] > 0 && ns[i] % R == 0 && w.device().is_cpu() && w.dim() == 2 &&
                w.scalar_type() == torch::kUInt8 && w.size(1) == pbytes && w.stride(1) == 1 &&
                w.size(0) == E * (ns[i] / R),
                "imoe_matmul: panels ", i, " must be (", E, "·N/16, ", pbytes,
                ") uint8 for K=", K, ", N=", ns[i], " a multiple of 16");
  }
  if (Rows == 0) {
    std::vector<torch::Tensor> ys;
    for (int64_t n : ns) ys.push_back(torch::empty({0, n}, x.options()));
    return ys;
  }
  const ExpertGroups groups =
      group_by_expert(expert.data_ptr<int64_t>(), src.data_ptr<int64_t>(), Rows, E, T);
  // The rows in sorted order, gathered (R, K), quantized once.
  const torch::Tensor order = torch::from_blob(const_cast<int64_t*>(groups.order.data()),
                                               {Rows}, torch::kInt64);
  const torch::Tensor sorted_src = src.index_select(0, order);
  const torch::Tensor xs = x.index_select(0, sorted_src).contiguous();
  std::vector<torch::Tensor> ys, sorted;
  const Act a = quantize_act(xs.data_ptr<float>(), Rows, K, act_kind(int(type)));
  std::vector<ExpertRows> parts;
  int64_t bytes = 0;
  for (size_t i = 0; i < panels.size(); ++i) {
    sorted.push_back(torch::empty({Rows, ns[i]}, x.options()));
    const std::vector<ExpertRows> rows =
        tq::expert_rows(groups, panels[i], ns[i], sorted.back().data_ptr<float>());
    parts.insert(parts.end(), rows.begin(), rows.end());
    bytes += groups.size() * (ns[i] / R) * pbytes;
  }
  routed_for(int(type))(parts, a);
  moe_counters().add(groups.size() * int64_t(panels.size()), bytes);
  for (torch::Tensor& y : sorted) ys.push_back(torch::empty_like(y).index_copy_(0, order, y));
  return ys;
#else
  (void)x, (void)panels, (void)ns, (void)src, (void)expert;
  return {};
#endif
}

}  // namespace

void register_interleaved(pybind11::module& m) {
  m.def("interleave", &interleave, "GGML rows (N, row_bytes) → 16-row panels (ceil(N/16), panel_bytes)",
        py::call_guard<py::gil_scoped_release>());
  m.def("deinterleave", &deinterleave, "the GGML rows `ids` of N rows in panels, (len(ids), row_bytes)",
        py::call_guard<py::gil_scoped_release>());
  m.def("imatmul_many", &imatmul_many, "[x · W_iᵀ] for panels of one type sharing the input x",
        py::call_guard<py::gil_scoped_release>());
  m.def("imoe_matmul_many", &imoe_matmul_many,
        "[y_i (R, N_i)]: row r = x[src[r]] · W_i[expert[r]]ᵀ over experts' panels, rows grouped by expert",
        py::call_guard<py::gil_scoped_release>());
  m.def("interleaved_supports", &interleaved_supports, "whether imatmul has a kernel for the type here");
  m.def("panel_bytes", [](int64_t type, int64_t K) { check_type(type); return panel_bytes(int(type), K); },
        "bytes of one 16-row panel of K-element rows");
}
